"""The kapbit instance: a thin front over the parts that run workflows on a log.

The front owns the lifecycle (``await kbit.start()`` / ``await kbit.close()``, or
``async with Kapbit(...) as kbit``), admission (the checks of :meth:`Kapbit.exec_workflow`
that write nothing) and the reaction to being fenced. Recovery
(:mod:`kapbit.recovery`) reads the log and claims it through partition ownership
(:mod:`kapbit.ownership`); the supervisor (:mod:`kapbit.supervisor`) runs the workflows;
:mod:`kapbit.group` decides which partitions (and so which ids) are this instance's and, in
group mode, applies the group's changes; :mod:`kapbit.serving` serves forwarded requests
and forwards calls for ids another instance owns. See docs/ARCHITECTURE.md."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Literal, TypeVar, overload

import msgspec
import pybreaker

from kapbit._lifecycle import CANCEL_GRACE, AsyncResource, TaskHost
from kapbit._log import fields
from kapbit._start_retries import StartRetries
from kapbit.actions import ActionRunner
from kapbit.checkpoints import Checkpointer
from kapbit.clock import Clock
from kapbit.codecs import Codec, JsonCodec
from kapbit.codecs.checked import TypeMismatch, encode_checked
from kapbit.emitter import Emitter, new_storage_breaker
from kapbit.errors import (
    DuplicateWorkflow,
    EncodeError,
    Fenced,
    GateClosed,
    InstanceClosed,
    InvalidDefinition,
    InvalidInput,
    KapbitError,
    StartupError,
    UnknownWorkflowType,
    WorkflowNotFound,
)
from kapbit.events import WorkflowCreated
from kapbit.execution import WorkflowExecution, WorkflowSleeps, being_cancelled
from kapbit.fencing import Fence, OwnerTracker
from kapbit.forwarding import Forwarder, RemoteWorkflows
from kapbit.gate import EntryGate
from kapbit.group import GroupMember, OwnedPartitions, Routed, check_workflow_id, placement_of
from kapbit.handles import OnDuplicate, WorkflowHandle, WorkflowLog
from kapbit.idempotency import IdempotencyWindow
from kapbit.options import Options
from kapbit.ownership import Ownership
from kapbit.placement import GroupOptions, Owner, Placement
from kapbit.recovery import Recovered, Recovery
from kapbit.repository import Checkpoint, Repository
from kapbit.request_log import RequestLog
from kapbit.scheduler import Scheduler, check_schedules
from kapbit.schedules import Schedule
from kapbit.serving import Forward, Served, Serving, Submitted
from kapbit.snapshots import Journal, snapshot_store
from kapbit.stats import Stats
from kapbit.supervisor import Ended, Supervisor
from kapbit.workflow import Definition, parse_call

logger = logging.getLogger("kapbit")

_State = Literal["new", "starting", "running", "closing", "closed", "fenced"]

I = TypeVar("I")  # noqa: E741 - a workflow's input type, as in kapbit.workflow
R = TypeVar("R")


class _StorageBreakerListener(pybreaker.CircuitBreakerListener):
    def __init__(self, gate: EntryGate) -> None:
        self._gate = gate

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self._gate.close("storage circuit breaker opened")


class Kapbit(AsyncResource):
    """A kapbit instance: runs workflows defined by ``definitions`` on ``repository``.

    Only one instance writes to a log at a time: starting a second instance on the same
    repository fences the first, which stops and fails every call with
    :class:`~kapbit.errors.Fenced`; the second resumes its unfinished workflows. The
    instance owns the repository it is given: it starts it, and closes it on close or
    when its start fails.

    With ``group`` (a :class:`~kapbit.GroupOptions`, or any :class:`~kapbit.Placement`
    such as :class:`kapbit.testing.ManualPlacement`) instances configured with the same
    group share the log's partitions instead: each claims and recovers the partitions the
    group assigns it, gives up those it loses, and refuses ids of partitions it does not
    own with :class:`~kapbit.errors.NotOwner` (see :meth:`owner_of`).

    ``schedules`` (:class:`kapbit.schedules.Schedule`) start their workflows at their fire
    times while the instance runs, each firing at most once across restarts and takeovers;
    a schedule naming an unregistered type or with an input not of that type is refused
    here with :class:`~kapbit.errors.InvalidSchedule`.
    """

    def __init__(
        self,
        definitions: Iterable[Definition],
        repository: Repository,
        codec: Codec | None = None,
        *,
        options: Options | None = None,
        requests: RequestLog | None = None,
        schedules: Iterable[Schedule] = (),
        group: GroupOptions | Placement | None = None,
    ) -> None:
        self.options = options or Options()
        self._placement = placement_of(group, repository)
        #: The partitions this instance owns (every one, unless a group shares them).
        self._owned = OwnedPartitions(self._placement)
        #: The endpoint this instance advertises in group mode (``None`` outside it).
        self.endpoint = self._owned.endpoint
        self._definitions = _index_definitions(definitions)
        self._repository = repository
        self._codec = codec or JsonCodec()
        self._clock: Clock = self.options.clock
        self._schedules = check_schedules(schedules, self._schedule_problem)
        #: This instance's name: ``Options.node_id``, by default host name and process id.
        #: It may repeat across starts (a pod name); the log tells starts apart by
        #: :attr:`writer_id`.
        self.node_id = self.options.node_id or f"{socket.gethostname()}-{os.getpid()}"
        #: The unique identity of this start, written as the writer of every record:
        #: ``node_id`` plus a random start id. Fencing compares writer ids.
        self.writer_id = f"{self.node_id}/{uuid.uuid4().hex[:12]}"
        self._state: _State = "new"
        self.gate = EntryGate()
        self._breaker = new_storage_breaker(
            self.options.storage_breaker.fail_max,
            self.options.storage_breaker.reset_timeout,
            _StorageBreakerListener(self.gate),
        )
        self._fence = Fence(per_partition=self._placement is not None)
        self._placement_closing: asyncio.Task[None] | None = None
        # With snapshots, the emitter writes through a journal that keeps what it appends
        # for the snapshots' readers, which then need not read it back from the log.
        self._journal = (
            Journal(repository)
            if self.options.checkpoints.snapshots and snapshot_store(repository) is not None
            else None
        )
        self._emitter = Emitter(
            self._journal or repository,
            self._codec,
            self.writer_id,
            self._breaker,
            self.options.emit_backoff,
            self._fence,
        )
        self._actions = ActionRunner(
            self.node_id,
            self.options.action_executor,
            self.options.action_threads,
            self._clock,
        )
        self._stats = Stats()
        self._supervisor: Supervisor | None = None
        self._unwatch: Callable[[], None] | None = None
        self._workflow_log: WorkflowLog | None = None
        self._checkpointer: Checkpointer | None = None
        self._scheduler: Scheduler | None = None
        self._background = TaskHost("kapbit-background")
        self._close_task: asyncio.Task[None] | None = None
        #: The request log (see :mod:`kapbit.forwarding`): this instance serves the
        #: requests of the partitions it owns and forwards calls for the others.
        self._requests = requests
        self._serving: Serving | None = None
        self._remote: RemoteWorkflows | None = None
        #: Group mode: where a handle's calls go (the owner of its id's partition then).
        self._routed: Routed | None = None

    # --- lifecycle ------------------------------------------------------------------------

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
        retries = StartRetries(self.options.emit_backoff)
        recovery = Recovery(
            self._repository,
            self._codec,
            self._definitions,
            self.options.idempotency_window,
            retries,
            self._clock,
        )
        ownership = Ownership(
            self._repository,
            self._emitter,
            self.writer_id,
            self._codec.name,
            self.options.idempotency_window,
            retries,
            self.endpoint,
            self._clock,
        )
        try:
            async with asyncio.timeout(timeout) as deadline:
                if self._placement is None:
                    recovered = await recovery.run(ownership)
                    self._fence.check()
                    await self._run(recovered)
                else:
                    recovered = await self._join(recovery, ownership, retries)
        except TimeoutError as exc:
            await self._fail_start()
            if not deadline.expired():
                raise
            error = retries.last_error
            raise StartupError(
                f"node {self.writer_id!r} did not start within start_timeout ({timeout} s)"
                + (f"; last storage error: {error}" if error else "")
            ) from exc
        except BaseException:
            await self._fail_start()
            raise
        self._state = "running"
        if self._scheduler is not None:  # its starts are admitted once the instance runs
            self._background.spawn(self._scheduler.run(self._start_firing), name="kapbit-scheduler")
        logger.info(
            "kapbit node %s (writer %s) started on %d partitions in %.3f s: %d workflows "
            "resumed, %d records read",
            self.node_id,
            self.writer_id,
            self._owned.partitions,
            time.perf_counter() - started,
            len(recovered.executions),
            recovered.records_read,
            extra=fields(),
        )

    async def _join(
        self, recovery: Recovery, ownership: Ownership, retries: StartRetries
    ) -> Recovered:
        """Group mode's start: set the parts to work on no partition, join the group and
        wait until its first assignment is claimed and recovered."""
        placement = self._placement
        assert placement is not None
        await retries.run("starting the repository", self._repository.start)
        partitions = self._repository.partitions
        size = self.options.idempotency_window
        nothing = Recovered(
            [IdempotencyWindow(size) for _ in range(partitions)],
            [OwnerTracker("") for _ in range(partitions)],
            [Checkpoint() for _ in range(partitions)],
            [],
            0,
            [],
        )
        await self._run(nothing)
        assert self._supervisor is not None and self._checkpointer is not None
        self._checkpointer.owned.clear()
        member = GroupMember(
            placement,
            self._owned,
            self._fence,
            recovery,
            ownership,
            self._supervisor,
            self._checkpointer,
            nothing.windows,
            size,
            self._serving,
            self._background,
            self.node_id,
        )
        placed = asyncio.get_running_loop().create_future()
        await placement.start()
        self._background.spawn(self._follow_group(member, placed), name="kapbit-placement")
        await asyncio.shield(placed)
        return nothing

    async def _follow_group(self, member: GroupMember, placed: asyncio.Future[None]) -> None:
        """The placement task; a group that cannot be used any more (or a partition not
        recovered) fails the start, or stops the instance once it runs."""
        try:
            await member.run(placed)
        except Exception as error:
            logger.error(
                "kapbit node %s stops: group mode failed: %s", self.node_id, error, extra=fields()
            )
            if not placed.done():
                placed.set_exception(error)
            elif self._close_task is None:
                self._close_task = asyncio.create_task(self._close(0))

    async def _run(self, recovered: Recovered) -> None:
        """Set the parts to work on what recovery found."""
        self._owned.partitions = len(recovered.windows)
        checkpointer = self._checkpointer = Checkpointer(
            self._repository,
            self.options.checkpoints,
            self._emitter.acked,
            recovered.windows,
            recovered.owners,
            recovered.checkpoints,
            writer=self.writer_id,
            window_size=self.options.idempotency_window,
            codec=self._codec,
            states=recovered.states,  # none in group mode: each is adopted when assigned
            clock=self._clock,
            journal=self._journal,
        )
        supervisor = self._supervisor = Supervisor(
            self._emitter,
            self._codec,
            self.gate,
            self.options,
            recovered.windows,
            checkpointer,
            self._stats,
            self._actions,
        )
        log = self._workflow_log = WorkflowLog(
            self._repository,
            self._codec,
            self._definitions,
            recovered.windows,
            running=supervisor.created_offset,
        )
        await self._background.start()
        self._background.spawn(self._save_checkpoints(checkpointer), name="kapbit-checkpoints")
        self._background.spawn(self._watch_fence(), name="kapbit-fence-watcher")
        await supervisor.start(recovered.executions)
        if self._requests is not None:
            await self._start_requests(self._requests, supervisor, log)
        if self._owned.grouped:  # the id's partition may move while a handle is kept
            self._routed = Routed(self._owned, supervisor, log, self._remote, self)
        if self._schedules:
            known = [id_ for window in recovered.windows for id_, _ in window.entries()]
            self._scheduler = Scheduler(self._schedules, self._clock, known, self._starts_firing)
        instrumentation = self.options.instrumentation
        if instrumentation is not None:
            self._unwatch = instrumentation.watch(self.node_id, lambda: self.stats)

    async def _start_requests(
        self, requests: RequestLog, supervisor: Supervisor, log: WorkflowLog
    ) -> None:
        """Serve the requests of every partition this instance owns; forward the others."""
        forwarder = Forwarder(
            requests,
            self._repository,
            self._codec,
            self._definitions,
            self.writer_id,
            self.options.forward_timeout,
        )
        serving = self._serving = Serving(requests, self._codec, forwarder)
        served = Served(
            self.writer_id,
            self._codec,
            self._definitions,
            self._repository,
            supervisor,
            log,
            submit=self._submit,
            answer=self._answer,
            until_created=self._until_created,
            handle=self.get_workflow,
        )
        partitions = self._owned.partitions
        self._remote = await serving.start(partitions, served, self._owned.current())

    async def _stop_requests(self) -> None:
        """Stop serving and forwarding (requests left unanswered go to the next owner)."""
        if self._serving is not None:
            await self._serving.stop()

    def _schedule_problem(self, schedule: Schedule) -> str | None:
        """Why ``schedule``'s firings could not start here (``None``: they can): its
        workflow type is not registered or its input is not of that type's input."""
        definition = self._definitions.get(schedule.workflow)
        if definition is None:
            return f"unknown workflow type; registered: {', '.join(sorted(self._definitions))}"
        try:
            encode_checked(self._codec, schedule.input, definition.input_check)
        except EncodeError as exc:
            return f"its input does not encode: {exc}"
        except TypeMismatch as mismatch:
            return f"its input is {mismatch.actual}, not {mismatch.declared}: {mismatch.detail}"
        return None

    def _starts_firing(self, workflow_id: str) -> bool:
        """Whether this instance starts the schedule firing ``workflow_id``: the one place
        that decides it. A single instance owns every partition, so it starts them all;
        with partitions shared by a group it must be the owner of
        ``partition_for(workflow_id, partitions)``, so that one instance starts each."""
        return True

    async def _start_firing(self, workflow_id: str, workflow_type: str, input: Any) -> object:
        return await self.start_workflow(workflow_id, workflow_type, input)

    def _stop_watching(self) -> None:
        """The instrumentation stops reading this instance's gauges."""
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()

    async def _fail_start(self) -> None:
        self._state = "closed"
        self._stop_watching()
        if self._supervisor is not None:
            await self._supervisor.close(0)
        await self._background.close(CANCEL_GRACE)
        await self._stop_requests()
        self._actions.close()
        if self._placement is not None:
            await self._placement.close()
        await self._repository.close()

    async def _save_checkpoints(self, checkpointer: Checkpointer) -> None:
        try:
            await checkpointer.run()
        except Fenced as error:
            self._fence.fenced(error)

    async def _watch_fence(self) -> None:
        """Another writer claimed a partition: stop everything, fail every caller."""
        error = await self._fence.wait()
        logger.error("kapbit node %s was fenced and stops: %s", self.node_id, error, extra=fields())
        self._state = "fenced"
        if self._supervisor is not None:
            self._supervisor.fail_all(error)
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(0))

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
            if self._placement is not None:
                await self._placement.close()
            await self._repository.close()
            return
        if self._state == "running":
            self._state = "closing"
        supervisor = self._supervisor
        if supervisor is not None:
            drain = self.options.close_timeout if timeout is None else timeout
            if not await supervisor.close(drain):
                # A task ignored cancellation: whatever it does later is not written.
                self._fence.stop(f"instance {self.node_id} closed")
            # Nothing runs here any more: whoever waits for a workflow the drain did not end
            # (a caller, a forwarded request being served) learns it now, not after the
            # grace periods below; the next owner finishes it.
            supervisor.fail_all(self._closed_error())
        if self._serving is not None and self._fence.error is None:
            await self._serving.drain(CANCEL_GRACE)  # answer what drained
        await self._stop_requests()
        await self._background.close(CANCEL_GRACE)
        if self._checkpointer is not None and self._fence.error is None:
            try:
                await self._checkpointer.save()
            except Fenced as error:  # replaced while idle: learnt only now
                self._fence.fenced(error)
                self._state = "fenced"
            except KapbitError as error:
                logger.warning("final checkpoint not saved: %s", error, extra=fields())
        if self._placement is not None:
            # Written and saved all it will: now leave, so the others take over at once.
            await self._placement.close()
        if supervisor is not None:
            supervisor.fail_all(self._closed_error())
        if self._state != "fenced":
            self._state = "closed"
        self._stop_watching()
        self._actions.close()
        await self._repository.close()
        logger.info("kapbit node %s closed", self.node_id, extra=fields())

    def _closed_error(self) -> KapbitError:
        """What callers of workflows this instance stopped driving get when it closes."""
        return self._fence.error or InstanceClosed(f"instance {self.node_id} closed")

    def abort(self) -> None:
        """Abandon the instance as a crash (SIGKILL) would: every task is cancelled at
        once, nothing more is written, nothing is released and no final checkpoint is
        saved. For tests of your own workflows' recovery: start a new instance on the same
        repository afterwards and it resumes what this one left open."""
        self._state = "closed"
        self._fence.stop(f"instance {self.node_id} was killed")
        if self._supervisor is not None:
            self._supervisor.abort()
        self._background.abort()
        if self._serving is not None:
            self._serving.abort()
        self._stop_watching()
        self._actions.close()
        if self._placement is not None and self._placement_closing is None:
            # In a process the group's heartbeats would go on: leave (nothing is written).
            self._placement_closing = asyncio.get_running_loop().create_task(
                self._placement.close()
            )

    # --- workflows ------------------------------------------------------------------------

    @overload
    async def exec_workflow(
        self,
        workflow: Definition[I, Any, R],
        workflow_id: str,
        input: I,
        *,
        on_duplicate: OnDuplicate = "raise",
    ) -> R: ...

    @overload
    async def exec_workflow(
        self,
        workflow_id: str,
        workflow_type: str,
        input: Any = None,
        *,
        on_duplicate: OnDuplicate = "raise",
    ) -> Any: ...

    async def exec_workflow(
        self, *args: Any, on_duplicate: OnDuplicate = "raise", **kwargs: Any
    ) -> Any:
        """Run a workflow and return its result.

        Two forms: ``exec_workflow(ORDER, "order-42", order)`` runs the registered
        definition ``ORDER`` (a type checker then checks the input and knows the result's
        type), and ``exec_workflow("order-42", "order", order)`` runs the definition
        registered under the type name ``"order"`` (for callers that only know the name;
        the result is ``Any``). The definition comes first, as the thing to run; the string
        form keeps its historical order (id, type name, input). Arguments may be passed
        by keyword, named as in either form.

        Nothing is written unless every check passes (each refusal is a
        :class:`~kapbit.errors.WorkflowRefused`, except the first two): the instance runs
        (:class:`~kapbit.errors.InstanceClosed`, :class:`~kapbit.errors.Fenced`), the gate is
        open (:class:`~kapbit.errors.GateClosed`), the type is registered
        (:class:`~kapbit.errors.UnknownWorkflowType`), the id is new
        (:class:`~kapbit.errors.DuplicateWorkflow`), a slot is free
        (:class:`~kapbit.errors.TooManyWorkflows`) and the input encodes and is of the
        declared ``input_type`` (:class:`~kapbit.errors.InvalidInput`). Once
        ``WorkflowCreated`` is durable the workflow finishes even if this call is cancelled
        or the process dies. A step that raises, also one after a durable timer's wake
        (the call waits through timers), makes this call raise
        :class:`~kapbit.errors.WillRetryLater`; an action returning a wrong value or type
        :class:`~kapbit.errors.InvalidReturnValue`, and storage refusing one of the
        workflow's events :class:`~kapbit.errors.WorkflowRejected` (both terminal).

        With ``on_duplicate="attach"`` an id this instance runs or keeps in its idempotency
        window is not refused: the call waits for that workflow's end and returns its result
        (or raises its error) as :meth:`WorkflowHandle.result` does, also after a restart
        or a takeover, and writes nothing; an id used by a workflow of another type still
        raises ``DuplicateWorkflow``.
        """
        submitted = await self._submit(args, kwargs, on_duplicate)
        if isinstance(submitted, WorkflowHandle):
            return await submitted.result()
        if isinstance(submitted, Forward):
            assert self._remote is not None
            return await self._remote.exec(*submitted)
        result, error = await self._answer(*submitted)
        if error is not None:
            raise error
        return result

    @overload
    async def start_workflow(
        self,
        workflow: Definition[I, Any, R],
        workflow_id: str,
        input: I,
        *,
        on_duplicate: OnDuplicate = "raise",
    ) -> WorkflowHandle[R]: ...

    @overload
    async def start_workflow(
        self,
        workflow_id: str,
        workflow_type: str,
        input: Any = None,
        *,
        on_duplicate: OnDuplicate = "raise",
    ) -> WorkflowHandle[Any]: ...

    async def start_workflow(
        self, *args: Any, on_duplicate: OnDuplicate = "raise", **kwargs: Any
    ) -> WorkflowHandle[Any]:
        """Start a workflow and return its :class:`~kapbit.WorkflowHandle` as soon as its
        ``WorkflowCreated`` is durable (from then on it finishes, even if the process dies);
        ``await handle.result()`` waits for its end.

        Takes the forms and arguments of :meth:`exec_workflow` and refuses as it does,
        writing nothing; ``on_duplicate="attach"`` returns the handle of the workflow
        already using the id instead of raising ``DuplicateWorkflow``.
        """
        submitted = await self._submit(args, kwargs, on_duplicate)
        if isinstance(submitted, WorkflowHandle):
            return submitted
        if isinstance(submitted, Forward):
            assert self._remote is not None
            return await self._remote.start(*submitted)
        execution, outcome = submitted
        await self._until_created(execution, outcome)
        return self._handle(self._running(), execution.id)

    def _answer(
        self, execution: WorkflowExecution, first_run: asyncio.Future[Ended]
    ) -> Coroutine[Any, Any, Ended]:
        """What ``exec_workflow`` answers for ``execution``, which the call created
        (``first_run``: how its first run stops): how that run stops or, if it ended
        asleep, how the runs after its wakes do (:meth:`Supervisor.after_wake`), as an
        error its result or ``WillRetryLater`` when a step raised. The execution is
        followed from here, before its first run can sleep, so no wake is missed."""
        execution.followed = True
        return self._answered(execution, first_run)

    async def _answered(
        self, execution: WorkflowExecution, first_run: asyncio.Future[Ended]
    ) -> Ended:
        try:
            ended = await first_run
        except asyncio.CancelledError:
            execution.followed = False
            if being_cancelled():  # the caller stops waiting; the workflow goes on
                raise
            return None, self._stopped_before(execution, "finished")
        if isinstance(ended[1], WorkflowSleeps):  # resumes on its timer
            try:
                woken = await self._running().after_wake(execution)
            finally:
                execution.followed = False
            return woken or (None, self._stopped_before(execution, "finished"))
        execution.followed = False
        return ended

    async def _until_created(
        self, execution: WorkflowExecution, outcome: asyncio.Future[Ended]
    ) -> None:
        """Return once ``execution``'s WorkflowCreated is durable; raise the refusal if it
        ended before (nothing was written), or why it was stopped first."""
        created = execution.created()
        either: list[asyncio.Future[Any]] = [created, outcome]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not created.done():
            if outcome.cancelled():
                raise self._stopped_before(execution, "was created")
            refused = outcome.result()[1]
            assert refused is not None  # it ended before it was created: refused
            raise refused

    def get_workflow(self, workflow_id: str) -> WorkflowHandle[Any]:
        """A handle of workflow ``workflow_id``: one this instance runs, or any id in its
        idempotency window, also one created before a restart or by the instance this one
        took over from (its status and result are then read from the log).
        :class:`~kapbit.errors.WorkflowNotFound` for another id."""
        supervisor = self._running()
        if self._remote is not None and self._owned.forwards(workflow_id):
            return self._remote.handle(workflow_id)
        partition = self._owned.refuse_unless_owned(workflow_id)
        if not supervisor.knows(workflow_id, partition):
            raise WorkflowNotFound(workflow_id)
        return self._handle(supervisor, workflow_id)

    def owner_of(self, workflow_id: str) -> Owner:
        """Who owns ``workflow_id``: its partition, whether this instance owns it, and the
        owner's advertised endpoint (group mode; as last known, so it may be stale during
        a rebalance: the instance there refuses what it does not own). Outside group mode
        this instance owns every id."""
        if self._owned.partitions == 0:  # not known before the start
            check_workflow_id(workflow_id)
            raise InstanceClosed(f"instance {self.node_id} is {self._state}")
        return self._owned.owner_of(workflow_id)

    def _definition(
        self, workflow_type: Any, given: Definition[Any, Any, Any] | None
    ) -> Definition[Any, Any, Any]:
        """The definition registered as ``workflow_type``, which must be ``given`` when a
        definition was passed; UnknownWorkflowType otherwise."""
        definition = self._definitions.get(workflow_type)
        if definition is None:
            raise UnknownWorkflowType(workflow_type, sorted(self._definitions))
        if given is not None and definition is not given and definition != given:
            raise UnknownWorkflowType(
                workflow_type,
                sorted(self._definitions),
                " (the definition passed is not the one registered under that name)",
            )
        return definition

    def _handle(self, supervisor: Supervisor, workflow_id: str) -> WorkflowHandle[Any]:
        routed = self._routed
        if routed is not None:  # group mode: the id's partition may move meanwhile
            return WorkflowHandle(workflow_id, routed, routed)
        assert self._workflow_log is not None
        return WorkflowHandle(workflow_id, supervisor, self._workflow_log)

    async def _submit(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_duplicate: OnDuplicate,
        request: str | None = None,
    ) -> Submitted:
        """Check a call of either form, then create and run its workflow (the execution
        and the future of its outcome), or, attaching, the handle of the workflow already
        using the id; for an id another instance owns, what to forward (checked here as
        far as it can be without the owner: id, type, input). ``request`` is the id of the
        forwarded request this call serves."""
        if kwargs or len(args) != 3:  # keywords or a default (rare): bind either form's names
            given, workflow_type, workflow_id, input = parse_call(args, kwargs)
        elif isinstance(args[0], Definition):
            given, workflow_id, input = args
            workflow_type = given.type
        else:
            workflow_id, workflow_type, input = args
            given = None
        if isinstance(workflow_type, Definition):
            raise UnknownWorkflowType(
                workflow_type.type,
                sorted(self._definitions),
                " given second: the definition goes first, exec_workflow(definition, id, input)",
            )
        supervisor = self._running()
        if self._remote is not None and self._owned.forwards(workflow_id):
            return self._forward(workflow_type, workflow_id, input, given, on_duplicate)
        if on_duplicate != "raise":
            handle = await self._attach(supervisor, workflow_id, workflow_type, on_duplicate)
            if handle is not None:
                return handle
        if not self.gate.is_open:
            raise GateClosed(f"entry gate closed: {self.gate.reason}")
        definition = self._definition(workflow_type, given)
        partition = self._owned.refuse_unless_owned(workflow_id)
        supervisor.admit(workflow_id, partition)
        codec = self._codec
        data, input = self._encode_input(definition, input)
        instrumentation = self.options.instrumentation
        telemetry = trace = None
        if instrumentation is not None:
            telemetry = instrumentation.workflow(workflow_id, workflow_type, partition, None)
            trace = telemetry.trace
        clock = self._clock
        created = WorkflowCreated(
            workflow_id, workflow_type, msgspec.Raw(data), clock.now(), trace, request
        )
        value = codec.encode(created)

        execution = WorkflowExecution(
            workflow_id, definition, partition, input, trace=trace, clock=clock
        )
        execution.telemetry = telemetry
        return execution, supervisor.submit(execution, value)

    def _forward(
        self,
        workflow_type: Any,
        workflow_id: str,
        input: Any,
        given: Definition | None,
        on_duplicate: str,
    ) -> Forward:
        """Check what can be checked here of a call to forward (the type is registered, the
        input is of its input type) and encode its input."""
        if on_duplicate not in ("raise", "attach"):
            raise ValueError(f"on_duplicate must be 'raise' or 'attach', got {on_duplicate!r}")
        definition = self._definition(workflow_type, given)
        check_workflow_id(workflow_id)
        data, _ = self._encode_input(definition, input)
        return Forward(workflow_id, workflow_type, data, on_duplicate)

    def _encode_input(self, definition: Definition, input: Any) -> tuple[bytes, Any]:
        """The input encoded and checked against the input type, and the value read back
        (InvalidInput when it does not encode or is not of that type)."""
        workflow_type = definition.type
        try:
            return encode_checked(self._codec, input, definition.input_check)
        except EncodeError as exc:
            raise InvalidInput(
                workflow_type, definition.input_check.name, type(input).__qualname__, str(exc)
            ) from exc
        except TypeMismatch as mismatch:
            raise InvalidInput(
                workflow_type, mismatch.declared, mismatch.actual, mismatch.detail
            ) from mismatch

    async def _attach(
        self, supervisor: Supervisor, workflow_id: Any, workflow_type: Any, on_duplicate: str
    ) -> WorkflowHandle[Any] | None:
        """The handle of the workflow of ``workflow_type`` using ``workflow_id`` already
        (``None`` if none does); DuplicateWorkflow if one of another type uses it."""
        if on_duplicate != "attach":
            raise ValueError(f"on_duplicate must be 'raise' or 'attach', got {on_duplicate!r}")
        if workflow_type not in self._definitions:
            raise UnknownWorkflowType(workflow_type, sorted(self._definitions))
        if not supervisor.knows(workflow_id, self._owned.refuse_unless_owned(workflow_id)):
            return None
        handle = self._handle(supervisor, workflow_id)
        if (await handle.describe()).type != workflow_type:
            raise DuplicateWorkflow(workflow_id)
        return handle

    def _stopped_before(self, execution: WorkflowExecution, what: str) -> KapbitError:
        """Why a workflow's task was cancelled before it ``what``: fenced or closed."""
        if execution.created_offset < 0:
            next_ = (
                "its WorkflowCreated may have been written (not acknowledged yet); "
                "if it was, the next instance resumes it"
            )
        else:
            next_ = "the next instance resumes it"
        return (
            self._fence.error
            or self._fence.lost.get(execution.partition)
            or InstanceClosed(f"instance closed before workflow {execution.id!r} {what}; {next_}")
        )

    async def wait_result(self, workflow_id: str, timeout: float | None = None) -> Any:
        """Await the final result of a workflow this instance runs or recently finished.

        Raises :class:`~kapbit.errors.DeadLettered`, :class:`~kapbit.errors.WorkflowRejected`
        or :class:`~kapbit.errors.InvalidReturnValue` for a workflow that ended that way,
        :class:`TimeoutError` after ``timeout``, :class:`~kapbit.errors.WorkflowNotFound`
        for an id this instance does not know, and
        :class:`~kapbit.errors.Fenced` once another instance has taken over.
        """
        if self._fence.error is not None:
            raise self._fence.error
        if self._supervisor is None:
            raise WorkflowNotFound(workflow_id)
        return await self._supervisor.wait_result(workflow_id, timeout)

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters."""
        stats = self._stats
        supervisor = self._supervisor
        return Stats(
            started=stats.started,
            recovered=stats.recovered,
            succeeded=stats.succeeded,
            compensated=stats.compensated,
            retried=stats.retried,
            dead_lettered=stats.dead_lettered,
            rejected=stats.rejected,
            invalid_returns=stats.invalid_returns,
            in_flight=0 if supervisor is None else len(supervisor),
            retrying=0 if supervisor is None else supervisor.retrying,
            sleeping=0 if supervisor is None else supervisor.sleeping,
            gate_open=self.gate.is_open,
            **self._snapshot_stats(),
        )

    def _snapshot_stats(self) -> dict[str, int]:
        snapshots = None if self._checkpointer is None else self._checkpointer.snapshots
        if snapshots is None:
            return {}
        return {
            "snapshot_bytes": sum(snapshots.sizes),
            "snapshots_too_large": snapshots.too_large,
            "snapshots_following": snapshots.followed,
            "snapshot_wakes": snapshots.wakes,
        }

    def in_flight(self) -> list[str]:
        """The ids of the workflows this instance runs now (new, resumed or retrying)."""
        return [] if self._supervisor is None else self._supervisor.ids()

    @property
    def is_running(self) -> bool:
        """Whether the instance accepts workflows."""
        return self._state == "running"

    @property
    def owned_partitions(self) -> frozenset[int]:
        """The partitions this instance owns now: in group mode those it has claimed and
        recovered (the group's current share, minus any the log fenced it out of);
        outside group mode every partition. Empty unless the instance is running."""
        if self._state != "running":
            return frozenset()
        return self._owned.current()

    def _running(self) -> Supervisor:
        """The supervisor, if the instance accepts workflows; else why it does not."""
        if self._state != "running" or self._supervisor is None:
            if self._fence.error is not None:
                raise self._fence.error
            raise InstanceClosed(f"instance {self.node_id} is {self._state}")
        return self._supervisor


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
