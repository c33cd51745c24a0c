"""The kapbit instance: owns the log's partitions, accepts and drives workflows.

Lifecycle follows aiokafka: ``await kbit.start()`` / ``await kbit.close()``, or
``async with Kapbit(...) as kbit``. Start claims every partition (``ActiveWriter``),
recovers, and resumes the in-flight workflows in the background.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Literal, TypeVar

import msgspec
import pybreaker
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from kapbit._log import execution_fields, fields
from kapbit.checkpoints import Checkpointer
from kapbit.codecs import Codec, JsonCodec
from kapbit.emitter import Emitter, new_storage_breaker
from kapbit.errors import (
    CorruptRecord,
    DeadLettered,
    DecodeError,
    DuplicateWorkflow,
    EncodeError,
    Fenced,
    GateClosed,
    InstanceClosed,
    InvalidDefinition,
    InvalidReturnValue,
    InvalidWorkflowId,
    KapbitError,
    RecordRejected,
    StartupError,
    TooManyWorkflows,
    TransientStorageError,
    UnknownWorkflowType,
    WillRetryLater,
    WorkflowNotFound,
    WorkflowRejected,
    describe_error,
)
from kapbit.events import (
    KIND_OF,
    ActiveWriter,
    DeadLetter,
    EventKind,
    WorkflowCreated,
    WorkflowRetry,
)
from kapbit.execution import StepRaised, WorkflowExecution, restore_outcome
from kapbit.fencing import OwnerTracker
from kapbit.gate import EntryGate
from kapbit.handles import OnDuplicate, WorkflowHandle, WorkflowLog
from kapbit.idempotency import IdempotencyWindow
from kapbit.options import Options
from kapbit.partitioner import partition_for
from kapbit.repository import Checkpoint, Repository
from kapbit.restore import (
    PartitionRestorer,
    RestoredPartition,
    RestoredWorkflow,
    check_codec,
    trusted_checkpoint,
)
from kapbit.retry_worker import RetryWorker
from kapbit.stats import Stats
from kapbit.workflow import Definition

logger = logging.getLogger("kapbit")

_T = TypeVar("_T")
_State = Literal["new", "starting", "running", "closing", "closed", "fenced"]
_CREATED = EventKind.WORKFLOW_CREATED.value
_MAX_ERROR_LENGTH = 1000
_MAX_CLAIM_ROUNDS = 10
#: How long close() waits for cancelled tasks before abandoning them.
_CANCEL_GRACE = 1.0


class _StorageBreakerListener(pybreaker.CircuitBreakerListener):
    def __init__(self, gate: EntryGate) -> None:
        self._gate = gate

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self._gate.close("storage circuit breaker opened")


class Kapbit:
    """A kapbit instance: runs workflows defined by ``definitions`` on ``repository``.

    Only one instance writes to a log at a time: starting a second instance on the same
    repository fences the first, which stops and fails every call with
    :class:`~kapbit.errors.Fenced`; the second resumes its unfinished workflows.
    """

    def __init__(
        self,
        definitions: Iterable[Definition],
        repository: Repository,
        codec: Codec | None = None,
        *,
        options: Options | None = None,
    ) -> None:
        self.options = options or Options()
        self._definitions = _index_definitions(definitions)
        self._repository = repository
        self._codec = codec or JsonCodec()
        #: This instance's name: ``Options.node_id``, by default host name and process id.
        #: It may repeat across starts (a pod name); the log tells starts apart by
        #: :attr:`writer_id`.
        self.node_id = self.options.node_id or f"{socket.gethostname()}-{os.getpid()}"
        #: The unique identity of this start, written as the writer of every record:
        #: ``node_id`` plus a random start id. Fencing compares writer ids.
        self.writer_id = f"{self.node_id}/{uuid.uuid4().hex[:12]}"
        self._start_error = ""
        self._partitions = 0  # known once the repository has started
        self._state: _State = "new"
        self._fenced_error: Fenced | None = None
        self.gate = EntryGate()
        self._breaker = new_storage_breaker(
            self.options.storage_breaker.fail_max,
            self.options.storage_breaker.reset_timeout,
            _StorageBreakerListener(self.gate),
        )
        self._emitter = Emitter(
            repository,
            self._codec,
            self.writer_id,
            self._breaker,
            self.options.emit_backoff,
            self._on_fenced,
            workflow_type=self._workflow_type,
        )
        self._windows: list[IdempotencyWindow] = []
        self._retry_worker = RetryWorker(
            self.options.retry, self.gate, self._retry_attempt, self._dead_letter
        )
        self._checkpointer: Checkpointer | None = None
        self._in_flight: dict[str, WorkflowExecution] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._finished: OrderedDict[str, tuple[Any, BaseException | None]] = OrderedDict()
        self._stats = Stats()
        self._close_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Kapbit:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Check the log, claim every partition, recover, and resume in-flight workflows.

        Everything that can be checked by reading comes before this node's first write
        (its claims), recovery up to each partition's current end included: a storage that
        cannot be read, a log written with another codec
        (:class:`~kapbit.errors.CodecMismatch`), a workflow type this instance lacks or a
        corrupt record fails the start without fencing the live owner. Transient storage
        errors are retried until ``Options.start_timeout``, after which the start fails
        with :class:`~kapbit.errors.StartupError`; a start failing after its claims leaves
        them in the log, and the owner they replaced is fenced.
        """
        if self._state != "new":
            raise InstanceClosed(f"instance {self.node_id} cannot be started twice")
        self._state = "starting"
        started = time.perf_counter()
        timeout = self.options.start_timeout
        try:
            async with asyncio.timeout(timeout) as deadline:
                executions, restored = await self._start()
        except TimeoutError as exc:
            self._state = "closed"
            await self._repository.close()
            if not deadline.expired():
                raise
            raise StartupError(
                f"node {self.writer_id!r} did not start within start_timeout ({timeout} s)"
                + (f"; last storage error: {self._start_error}" if self._start_error else "")
            ) from exc
        except BaseException:
            self._state = "closed"
            await self._repository.close()
            raise
        if self._fenced_error is not None:
            raise self._fenced_error
        self._state = "running"
        assert self._checkpointer is not None
        self._background.append(
            asyncio.create_task(self._checkpointer.run(), name="kapbit-checkpoints")
        )
        for execution in executions:
            if execution.attempts > 0:
                self._retry_worker.schedule(execution)
            else:
                self._spawn(execution, None)
        self._open_gate_if_idle()
        logger.info(
            "kapbit node %s (writer %s) started on %d partitions in %.3f s: %d workflows "
            "resumed, %d records read",
            self.node_id,
            self.writer_id,
            self._partitions,
            time.perf_counter() - started,
            len(executions),
            sum(r.records_read for r in restored),
            extra=fields(),
        )

    async def _start(self) -> tuple[list[WorkflowExecution], list[RestoredPartition]]:
        """Read and check, claim, recover the rest; the executions to resume."""
        repository = self._repository
        await self._retrying("starting the repository", repository.start)
        partitions = self._partitions = repository.partitions
        self._windows = [
            IdempotencyWindow(self.options.idempotency_window) for _ in range(partitions)
        ]
        self._emitter.acked = [-1] * partitions
        loaded = await self._retrying("loading checkpoints", repository.load_checkpoints)
        # Read first: nothing is written unless the log can be recovered as it stands.
        restorers = await asyncio.gather(
            *(self._read_before_claiming(p, loaded.get(p)) for p in range(partitions))
        )
        for restorer in restorers:
            for workflow in restorer.open.values():
                self._rebuild(restorer.partition, workflow)  # a type or input it cannot take
        claims = await asyncio.gather(*(self._claim(p) for p in range(partitions)))
        await self._settle_claims(claims)
        await asyncio.gather(
            *(
                self._retrying(
                    f"recovering partition {restorer.partition}",
                    functools.partial(restorer.read_to, claims[restorer.partition]),
                )
                for restorer in restorers
            )
        )
        restored = [restorer.result(claims[restorer.partition]) for restorer in restorers]
        checkpoints = [restorer.checkpoint for restorer in restorers]
        return self._adopt(restored, checkpoints), restored

    async def _read_before_claiming(
        self, partition: int, checkpoint: Checkpoint | None
    ) -> PartitionRestorer:
        """Refuse a log of another codec, pick the checkpoint to recover from (none when
        the stored one is another log's), and recover up to the log's current end."""
        repository = self._repository

        async def check() -> tuple[int, Checkpoint]:
            end = await repository.end_offset(partition)
            await check_codec(repository, self._codec, partition, end)
            return end, await trusted_checkpoint(repository, partition, checkpoint, end)

        end, trusted = await self._retrying(f"checking partition {partition}", check)
        restorer = PartitionRestorer(
            repository, self._codec, partition, trusted, self.options.idempotency_window
        )
        what = f"recovering partition {partition}"
        await self._retrying(what, restorer.prepare)
        await self._retrying(what, functools.partial(restorer.read_to, end))
        return restorer

    async def _retrying(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, retried on transient storage errors (bounded by start_timeout)."""

        def note(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self._start_error = f"{what}: {error}"
            logger.warning(
                "%s failed (attempt %d), retrying: %s",
                what,
                state.attempt_number,
                error,
                extra=fields(),
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientStorageError),
            wait=self.options.emit_backoff.wait(),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                result = await call()
        return result

    async def _claim(self, partition: int) -> int:
        """Append this node's ActiveWriter to ``partition``; return its offset."""
        claim = ActiveWriter(
            self.writer_id,
            time.time(),
            codec=self._codec.name,
            window=self.options.idempotency_window,
        )
        return await self._emitter.emit(partition, self.writer_id, claim)

    async def _settle_claims(self, claims: list[int]) -> None:
        """Resolve a start racing another one: if another node claimed a partition after
        this node did, the greater writer id keeps the whole log, re-claiming what it lost,
        and the other gives up with Fenced before it accepts any work."""
        for _ in range(_MAX_CLAIM_ROUNDS):
            owners = await asyncio.gather(
                *(
                    self._retrying(
                        f"reading the owner of partition {p}",
                        functools.partial(self._repository.current_owner, p),
                    )
                    for p in range(self._partitions)
                )
            )
            lost = [p for p, owner in enumerate(owners) if owner != self.writer_id]
            if not lost:
                return
            rival = max(owners[p] for p in lost)
            if rival > self.writer_id:
                raise Fenced(
                    f"node {rival!r} started at the same time as {self.writer_id!r} and "
                    f"keeps the log (partitions {lost} were claimed by it after this node)"
                )
            logger.warning(
                "partitions %s were claimed by %r during start; claiming them again",
                lost,
                rival,
                extra=fields(),
            )
            for partition in lost:
                claims[partition] = await self._claim(partition)
        raise StartupError(f"node {self.writer_id!r} could not settle its claims")

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting work, wait up to ``timeout`` for in-flight workflows, release.

        Workflows still running at the timeout are cancelled; they stay open in the log and
        the next instance resumes them. Idempotent; concurrent calls share one close.
        """
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(timeout))
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float | None) -> None:
        if self._state in ("new", "starting"):
            self._state = "closed"
            await self._repository.close()
            return
        if self._state == "running":
            self._state = "closing"
        await self._await_cancelled(self._retry_worker.abort())
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(
                tasks, timeout=self.options.close_timeout if timeout is None else timeout
            )
            for task in pending:
                task.cancel()
            await self._await_cancelled(pending)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._checkpointer is not None and self._fenced_error is None:
            try:
                await self._checkpointer.save()
            except Fenced as error:  # replaced while idle: learnt only now
                self._fenced_error = error
                self._state = "fenced"
            except KapbitError as error:
                logger.warning("final checkpoint not saved: %s", error, extra=fields())
        closed = InstanceClosed(f"instance {self.node_id} closed")
        for execution in list(self._in_flight.values()):
            execution.resolve(error=self._fenced_error or closed)
        if self._state != "fenced":
            self._state = "closed"
        await self._repository.close()
        logger.info("kapbit node %s closed", self.node_id, extra=fields())

    async def _await_cancelled(self, tasks: Iterable[asyncio.Task[Any]]) -> None:
        """Wait up to ``_CANCEL_GRACE`` for cancelled ``tasks`` to end; a task still running
        then (a step that swallows cancellation) is abandoned as a crash would leave it:
        nothing it does later is written, its workflow stays open for the next instance."""
        tasks = list(tasks)
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=_CANCEL_GRACE)
        if stuck:
            logger.error(
                "kapbit node %s abandons %d tasks that ignored cancellation for %.1f s; "
                "their workflows stay open for the next instance",
                self.node_id,
                len(stuck),
                _CANCEL_GRACE,
                extra=fields(),
            )
            if self._emitter.fenced is None:
                self._emitter.fenced = Fenced(f"instance {self.node_id} closed")

    # --- workflows ------------------------------------------------------------------------

    async def exec_workflow(
        self,
        workflow_id: str,
        workflow_type: str,
        input: Any = None,
        *,
        on_duplicate: OnDuplicate = "raise",
    ) -> Any:
        """Run workflow ``workflow_id`` of type ``workflow_type`` and return its result.

        With ``on_duplicate="attach"`` an id this instance runs or keeps in its idempotency
        window is not refused: the call waits for that workflow's end and returns its result
        (or raises its error), as :meth:`WorkflowHandle.result` does, also after a restart;
        an id used by a workflow of another type still raises ``DuplicateWorkflow``.

        Nothing is written unless every check passes: the instance runs
        (:class:`~kapbit.errors.InstanceClosed`, :class:`~kapbit.errors.Fenced`), the gate is
        open (:class:`~kapbit.errors.GateClosed`), the type is registered
        (:class:`~kapbit.errors.UnknownWorkflowType`), the id is new
        (:class:`~kapbit.errors.DuplicateWorkflow`), a slot is free
        (:class:`~kapbit.errors.TooManyWorkflows`) and the input encodes
        (:class:`~kapbit.errors.EncodeError`). Once ``WorkflowCreated`` is durable the
        workflow finishes even if this call is cancelled or the process dies. A step that
        raises makes this call raise :class:`~kapbit.errors.WillRetryLater`; an action
        returning a wrong type :class:`~kapbit.errors.InvalidReturnValue`, and storage
        refusing one of the workflow's events :class:`~kapbit.errors.WorkflowRejected`
        (both terminal).
        """
        submitted = await self._submit(workflow_id, workflow_type, input, on_duplicate)
        if isinstance(submitted, WorkflowHandle):
            return await submitted.result()
        execution, task = submitted
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise self._stopped_before(execution, "finished") from None
            raise

    async def start_workflow(
        self,
        workflow_id: str,
        workflow_type: str,
        input: Any = None,
        *,
        on_duplicate: OnDuplicate = "raise",
    ) -> WorkflowHandle[Any]:
        """Start workflow ``workflow_id`` of type ``workflow_type`` and return its handle
        as soon as its ``WorkflowCreated`` is durable (the workflow then finishes, even if
        the process dies); ``await handle.result()`` waits for its end.

        Refuses as :meth:`exec_workflow` does, writing nothing; ``on_duplicate="attach"``
        returns the handle of the workflow already using the id instead of raising
        ``DuplicateWorkflow``.
        """
        submitted = await self._submit(workflow_id, workflow_type, input, on_duplicate)
        if isinstance(submitted, WorkflowHandle):
            return submitted
        execution, task = submitted
        created = execution.created()
        await asyncio.wait([created, task], return_when=asyncio.FIRST_COMPLETED)
        if not created.done():
            if task.cancelled():
                raise self._stopped_before(execution, "was created")
            task.result()  # raises what refused it
        return self._handle(workflow_id)

    def get_workflow(self, workflow_id: str) -> WorkflowHandle[Any]:
        """A handle of workflow ``workflow_id``: one this instance runs, or any id in its
        idempotency window, also one created before a restart or by the instance this one
        took over from (read from the log). :class:`~kapbit.errors.WorkflowNotFound` for
        another id."""
        self._check_running()
        partition = partition_for(workflow_id, self._partitions)
        if workflow_id not in self._in_flight and workflow_id not in self._windows[partition]:
            raise WorkflowNotFound(workflow_id)
        return self._handle(workflow_id)

    def running_type(self, workflow_id: str) -> str | None:
        """The type of workflow ``workflow_id`` if this instance runs it, else ``None``."""
        return self._workflow_type(workflow_id)

    def _handle(self, workflow_id: str) -> WorkflowHandle[Any]:
        log = WorkflowLog(self._repository, self._codec, self._definitions, self._windows)
        return WorkflowHandle(workflow_id, self, log)

    def _stopped_before(self, execution: WorkflowExecution, what: str) -> KapbitError:
        """Why a workflow's task was cancelled before it ``what``: fenced or closed."""
        if execution.created_offset < 0:
            next_ = (
                "its WorkflowCreated may have been written (not acknowledged yet); "
                "if it was, the next instance resumes it"
            )
        else:
            next_ = "the next instance resumes it"
        return self._fenced_error or InstanceClosed(
            f"instance closed before workflow {execution.id!r} {what}; {next_}"
        )

    async def _submit(
        self, workflow_id: str, workflow_type: str, input: Any, on_duplicate: OnDuplicate
    ) -> tuple[WorkflowExecution, asyncio.Task[Any]] | WorkflowHandle[Any]:
        """Check, then create and run a workflow (its execution and task), or the handle of
        the workflow already using the id (``on_duplicate="attach"``)."""
        self._check_running()
        if on_duplicate not in ("raise", "attach"):
            raise ValueError(f"on_duplicate must be 'raise' or 'attach', got {on_duplicate!r}")
        if on_duplicate == "attach" and workflow_type in self._definitions:
            _check_workflow_id(workflow_id)
            partition = partition_for(workflow_id, self._partitions)
            if workflow_id in self._in_flight or workflow_id in self._windows[partition]:
                handle = self._handle(workflow_id)
                if (await handle.describe()).type != workflow_type:
                    raise DuplicateWorkflow(workflow_id)
                return handle
        if not self.gate.is_open:
            raise GateClosed(f"entry gate closed: {self.gate.reason}")
        definition = self._definitions.get(workflow_type)
        if definition is None:
            raise UnknownWorkflowType(workflow_type, sorted(self._definitions))
        _check_workflow_id(workflow_id)
        partition = partition_for(workflow_id, self._partitions)
        if workflow_id in self._in_flight or workflow_id in self._windows[partition]:
            raise DuplicateWorkflow(workflow_id)
        if len(self._in_flight) >= self.options.max_workflows:
            raise TooManyWorkflows(self.options.max_workflows)
        codec = self._codec
        created = WorkflowCreated(
            workflow_id, workflow_type, msgspec.Raw(codec.encode(input)), time.time()
        )
        value = codec.encode(created)

        execution = WorkflowExecution(workflow_id, definition, partition, input)
        self._in_flight[workflow_id] = execution
        assert self._checkpointer is not None
        self._checkpointer.opening(partition, workflow_id)
        return execution, self._spawn(execution, value)

    async def wait_result(self, workflow_id: str, timeout: float | None = None) -> Any:
        """Await the final result of a workflow this instance runs or recently finished.

        Raises :class:`~kapbit.errors.DeadLettered`, :class:`~kapbit.errors.WorkflowRejected`
        or :class:`~kapbit.errors.InvalidReturnValue` for a workflow that ended that way,
        :class:`TimeoutError` after ``timeout``, :class:`~kapbit.errors.WorkflowNotFound`
        for an id this instance does not know, and
        :class:`~kapbit.errors.Fenced` once another instance has taken over.
        """
        if self._fenced_error is not None:
            raise self._fenced_error
        execution = self._in_flight.get(workflow_id)
        if execution is not None:
            return await asyncio.wait_for(asyncio.shield(execution.waiter()), timeout)
        finished = self._finished.get(workflow_id)
        if finished is None:
            raise WorkflowNotFound(workflow_id)
        result, error = finished
        if error is not None:
            raise error
        return result

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        stats = self._stats
        return Stats(
            started=stats.started,
            recovered=stats.recovered,
            succeeded=stats.succeeded,
            compensated=stats.compensated,
            retried=stats.retried,
            dead_lettered=stats.dead_lettered,
            rejected=stats.rejected,
            invalid_returns=stats.invalid_returns,
            in_flight=len(self._in_flight),
            retrying=len(self._retry_worker),
            gate_open=self.gate.is_open,
        )

    @property
    def is_running(self) -> bool:
        """Whether the instance accepts workflows."""
        return self._state == "running"

    # --- internals ------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "running":
            if self._fenced_error is not None:
                raise self._fenced_error
            raise InstanceClosed(f"instance {self.node_id} is {self._state}")

    def _spawn(self, execution: WorkflowExecution, created: bytes | None) -> asyncio.Task[Any]:
        task = asyncio.create_task(self._drive(execution, created))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller (if any) saw it already

    async def _drive(self, execution: WorkflowExecution, created: bytes | None) -> Any:
        """Create (when ``created`` holds the encoded event) and run an execution."""
        if created is not None:
            try:
                offset = await self._emitter.append(
                    execution.partition, _CREATED, execution.id, created
                )
            except asyncio.CancelledError:
                # Stopped (close, abort, fencing) with the append's outcome unknown: a
                # try whose ack was lost may have landed. The checkpoint keeps holding
                # below it, so the next instance finds the workflow and finishes it.
                self._in_flight.pop(execution.id, None)
                raise
            except BaseException:
                # Refused (or fenced): nothing this instance acts on was written.
                self._in_flight.pop(execution.id, None)
                if self._checkpointer is not None:
                    self._checkpointer.abandoned(execution.partition, execution.id)
                raise
            execution.mark_created(offset)
            self._windows[execution.partition].add(execution.id, offset)
            assert self._checkpointer is not None
            self._checkpointer.opened(execution.partition, execution.id, offset)
            self._stats.started += 1
        try:
            result, compensated = await execution.run(self._emitter, self._codec)
        except StepRaised as raised:
            self._note_step_raised(execution, raised)
            self._retry_worker.schedule(execution)
            raise WillRetryLater(execution.id, raised.cause) from raised.cause
        except (WorkflowRejected, InvalidReturnValue) as ended:
            self._finish(execution, error=ended)
            raise
        self._finish(execution, result=result, compensated=compensated)
        return result

    def _note_step_raised(
        self, execution: WorkflowExecution, raised: StepRaised, level: int = logging.WARNING
    ) -> None:
        # Bounded: the error goes into WorkflowRetry / DeadLetter events.
        execution.last_error = describe_error(raised.cause)[:_MAX_ERROR_LENGTH]
        logger.log(
            level,
            "%s",
            raised,
            extra=execution_fields(execution),
        )
        if raised.breaker_open:
            self.gate.close(f"workflow {execution.id!r}: {describe_error(raised.cause, str)}")

    async def _retry_attempt(self, execution: WorkflowExecution) -> None:
        """One retry-worker attempt: record it, resume, finish on success."""
        execution.attempts += 1
        self._stats.retried += 1
        try:
            await self._emit_or_reject(
                execution,
                WorkflowRetry(execution.id, execution.attempts, execution.last_error, time.time()),
            )
            result, compensated = await execution.run(self._emitter, self._codec)
        except StepRaised as raised:
            # The retry worker logs the failed attempt itself.
            self._note_step_raised(execution, raised, logging.INFO)
            raise
        except (WorkflowRejected, InvalidReturnValue) as ended:
            self._finish(execution, error=ended)
            return
        self._finish(execution, result=result, compensated=compensated)

    async def _dead_letter(self, execution: WorkflowExecution) -> None:
        try:
            await self._emit_or_reject(
                execution,
                DeadLetter(execution.id, execution.attempts, execution.last_error, time.time()),
            )
        except WorkflowRejected as rejected:
            self._finish(execution, error=rejected)
            return
        logger.error(
            "workflow %r dead-lettered after %d attempts: %s",
            execution.id,
            execution.attempts,
            execution.last_error,
            extra=execution_fields(execution),
        )
        self._finish(
            execution, error=DeadLettered(execution.id, execution.attempts, execution.last_error)
        )

    async def _emit_or_reject(
        self, execution: WorkflowExecution, event: WorkflowRetry | DeadLetter
    ) -> None:
        """Append a retry-worker event; if storage refuses it, terminate with Rejected."""
        try:
            await self._emitter.emit(execution.partition, execution.id, event)
        except (RecordRejected, EncodeError) as exc:
            await execution.reject(self._emitter, KIND_OF[type(event)].value, str(exc))

    def _workflow_type(self, workflow_id: str) -> str | None:
        execution = self._in_flight.get(workflow_id)
        return None if execution is None else execution.definition.type

    def _open_gate_if_idle(self) -> None:
        """The gate reopens when a workflow completes: with none left to probe, let one in."""
        if not self._in_flight and not self.gate.is_open:
            self.gate.open("no workflow left to probe with")

    def _finish(
        self,
        execution: WorkflowExecution,
        result: Any = None,
        compensated: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """Bookkeeping once a workflow's terminal event is durable."""
        self._in_flight.pop(execution.id, None)
        if self._checkpointer is not None:
            self._checkpointer.terminated(execution.partition, execution.id)
        stats = self._stats
        if error is None:
            if compensated:
                stats.compensated += 1
            else:
                stats.succeeded += 1
            self.gate.open()
        elif isinstance(error, DeadLettered):
            stats.dead_lettered += 1
        elif isinstance(error, InvalidReturnValue):
            stats.invalid_returns += 1
            logger.error("%s", error, extra=execution_fields(execution))
        else:
            stats.rejected += 1
            logger.error("%s", error, extra=execution_fields(execution))
        self._open_gate_if_idle()
        execution.resolve(result, error)
        finished = self._finished
        finished[execution.id] = (result, error)
        if len(finished) > self.options.result_cache:
            finished.popitem(last=False)

    def _on_fenced(self, error: Fenced) -> None:
        """Another node claimed a partition: stop everything, fail every caller."""
        if self._fenced_error is not None:
            return
        logger.error("kapbit node %s was fenced and stops: %s", self.node_id, error, extra=fields())
        self._fenced_error = error
        self._state = "fenced"
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for execution in list(self._in_flight.values()):
            execution.resolve(error=error)
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(0))

    def _adopt(
        self, restored: list[RestoredPartition], checkpoints: list[Checkpoint]
    ) -> list[WorkflowExecution]:
        """Turn what recovery found into windows, checkpoint state and executions."""
        owners: list[OwnerTracker] = []
        executions: list[WorkflowExecution] = []
        for part in restored:
            window = self._windows[part.partition]
            for workflow_id, offset in part.window:
                window.add(workflow_id, offset)
            part.owners.claimed(part.claim_offset, self.writer_id)
            owners.append(part.owners)
            if self._emitter.acked[part.partition] < part.claim_offset:
                self._emitter.acked[part.partition] = part.claim_offset
            for workflow in part.in_flight:
                executions.append(self._rebuild(part.partition, workflow))
        self._checkpointer = Checkpointer(
            self._repository,
            self.options.checkpoints,
            self._emitter.acked,
            self._windows,
            owners,
            checkpoints,
            on_fenced=self._on_fenced,
            writer=self.writer_id,
            window_size=self.options.idempotency_window,
        )
        for execution in executions:
            self._in_flight[execution.id] = execution
            self._checkpointer.opened(execution.partition, execution.id, execution.created_offset)
        self._stats.recovered = len(executions)
        return executions

    def _rebuild(self, partition: int, workflow: RestoredWorkflow) -> WorkflowExecution:
        definition = self._definitions.get(workflow.type)
        if definition is None:
            raise UnknownWorkflowType(
                workflow.type,
                sorted(self._definitions),
                f" for workflow {workflow.id!r} in flight at partition {partition}, "
                f"offset {workflow.created_offset}",
            )
        codec = self._codec
        try:
            input = codec.decode(workflow.input, definition.input_type)
        except DecodeError as exc:
            raise CorruptRecord(partition, workflow.created_offset, f"input: {exc}") from exc
        execution = WorkflowExecution(
            workflow.id,
            definition,
            partition,
            input,
            attempts=workflow.attempts,
            last_error=workflow.last_error,
        )
        execution.created_offset = workflow.created_offset
        for offset, outcome in workflow.outcomes:
            if outcome.step >= len(definition.steps):
                raise CorruptRecord(
                    partition,
                    offset,
                    f"step {outcome.step} of a {len(definition.steps)}-step workflow",
                )
            try:
                value = codec.decode(outcome.value, definition.outcome_type_of(outcome.step))
            except DecodeError as exc:
                raise CorruptRecord(partition, offset, f"outcome value: {exc}") from exc
            execution.progress._record(
                outcome.phase, outcome.step, restore_outcome(outcome.success, value)
            )
        return execution

    def abort(self) -> None:
        """Abandon the instance as a crash (SIGKILL) would: every task is cancelled at
        once, nothing more is written, nothing is released and no final checkpoint is
        saved. For tests of your own workflows' recovery: start a new instance on the same
        repository afterwards and it resumes what this one left open."""
        self._state = "closed"
        self._emitter.fenced = Fenced(f"instance {self.node_id} was killed")
        for task in [*self._tasks, *self._background]:
            task.cancel()
        self._retry_worker.abort()


def _check_workflow_id(workflow_id: object) -> None:
    """Refuse an id that is not a non-empty string of valid UTF-8 text (a lone surrogate
    cannot be a record key) with InvalidWorkflowId."""
    if not isinstance(workflow_id, str) or not workflow_id:
        raise InvalidWorkflowId(f"workflow id must be a non-empty string, got {workflow_id!r}")
    try:
        workflow_id.encode()
    except UnicodeEncodeError as exc:
        raise InvalidWorkflowId(
            f"workflow id {workflow_id!r} is not valid UTF-8 text: {exc.reason} at {exc.start}"
        ) from None


def _index_definitions(definitions: Iterable[Definition]) -> dict[str, Definition]:
    index: dict[str, Definition] = {}
    for definition in definitions:
        if not isinstance(definition, Definition):
            raise InvalidDefinition(f"expected a Definition, got {type(definition).__name__}")
        if definition.type in index:
            raise InvalidDefinition(f"workflow type {definition.type!r} is defined twice")
        index[definition.type] = definition
    if not index:
        raise InvalidDefinition("no workflow definitions given")
    return index
