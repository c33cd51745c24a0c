"""Workflow supervision: the tasks that drive workflows, from creation to their end.

The supervisor owns every execution this instance runs: it appends ``WorkflowCreated``,
drives the saga, hands a workflow whose step raised to the retry worker (and runs the
worker's attempts and dead letters), and finishes workflows: checkpoint bookkeeping,
counters, the entry gate, the result cache. It reports to the front by return values and
raised errors. See docs/ARCHITECTURE.md, "The life of a workflow".
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from kapbit._lifecycle import CANCEL_GRACE, TaskHost, TaskSet
from kapbit._log import execution_fields, raised_fields, step_fields
from kapbit.actions import ActionRunner
from kapbit.checkpoints import Checkpointer
from kapbit.codecs import Codec
from kapbit.emitter import Emitter
from kapbit.errors import (
    DeadLettered,
    DuplicateWorkflow,
    EncodeError,
    InvalidReturnValue,
    RecordRejected,
    TooManyWorkflows,
    WillRetryLater,
    WorkflowNotFound,
    WorkflowRejected,
    describe_error,
)
from kapbit.events import KIND_OF, DeadLetter, EventKind, WorkflowRetry
from kapbit.execution import StepRaised, WorkflowExecution, WorkflowSleeps
from kapbit.gate import EntryGate
from kapbit.idempotency import IdempotencyWindow
from kapbit.options import Options
from kapbit.retry_worker import RetryWorker
from kapbit.stats import Stats
from kapbit.timers import SleepingWorkflow, TimerQueue

logger = logging.getLogger("kapbit")

_CREATED = EventKind.WORKFLOW_CREATED

#: How a workflow run by the supervisor ended: ``(result, None)`` or ``(None, error)``.
Ended = tuple[Any, BaseException | None]
_MAX_ERROR_LENGTH = 1000


class Supervisor:
    """Runs and finishes the workflows of one started instance.

    ``windows`` are the partitions' idempotency windows as recovery left them and
    ``checkpointer`` the checkpoint state of the same start; ``stats`` is counted in;
    ``actions`` runs the steps' actions.
    """

    def __init__(
        self,
        emitter: Emitter,
        codec: Codec,
        gate: EntryGate,
        options: Options,
        windows: list[IdempotencyWindow],
        checkpointer: Checkpointer,
        stats: Stats,
        actions: ActionRunner,
    ) -> None:
        self._emitter = emitter
        self._codec = codec
        self._gate = gate
        self._options = options
        self._windows = windows
        self._checkpointer = checkpointer
        self._stats = stats
        self._actions = actions
        self._in_flight: dict[str, WorkflowExecution] = {}
        self._finished: OrderedDict[str, tuple[Any, BaseException | None]] = OrderedDict()
        self._tasks = TaskSet("kapbit-workflows")
        self._retry_worker = RetryWorker(options.retry, gate, self)
        self._clock = options.clock
        #: Workflows waiting on a durable timer: an entry in the queue and their state.
        self._timers = TimerQueue(options.clock)
        self._sleeping: dict[str, WorkflowExecution] = {}
        self._timer_task = TaskHost("kapbit-timers")
        self._slot_freed = asyncio.Event()
        # Made on the loop it runs on, kept for the futures made per workflow: each lookup
        # of the running loop costs a getpid() system call (asyncio checks the process).
        self._loop = asyncio.get_running_loop()

    def __len__(self) -> int:
        """The workflows in flight (running, not sleeping)."""
        return len(self._in_flight)

    @property
    def sleeping(self) -> int:
        """The workflows waiting on a durable timer."""
        return len(self._sleeping)

    def wakes_at(self, workflow_id: str) -> float | None:
        """When ``workflow_id``'s timer fires, if it sleeps here."""
        entry = self._timers.get(workflow_id)
        return None if entry is None else entry.fire_at

    def created_offset(self, workflow_id: str) -> int | None:
        """Where ``workflow_id``'s ``WorkflowCreated`` is, if it runs or sleeps here and the
        append was acknowledged (its id may have left the idempotency window meanwhile)."""
        execution = self._in_flight.get(workflow_id) or self._sleeping.get(workflow_id)
        if execution is None or execution.created_offset < 0:
            return None
        return execution.created_offset

    def ids(self) -> list[str]:
        """The ids of the workflows in flight."""
        return list(self._in_flight)

    @property
    def retrying(self) -> int:
        """The workflows waiting for another attempt."""
        return len(self._retry_worker)

    def running_type(self, workflow_id: str) -> str | None:
        """The type of ``workflow_id`` if it runs here, else ``None``."""
        execution = self._in_flight.get(workflow_id) or self._sleeping.get(workflow_id)
        return None if execution is None else execution.definition.type

    def knows(self, workflow_id: str, partition: int) -> bool:
        """Whether ``workflow_id`` runs, sleeps or is in its partition's idempotency window."""
        return (
            workflow_id in self._in_flight
            or workflow_id in self._sleeping
            or workflow_id in self._windows[partition]
        )

    def admit(self, workflow_id: str, partition: int) -> None:
        """Refuse a new workflow ``workflow_id`` of ``partition`` unless it may start now:
        :class:`~kapbit.errors.DuplicateWorkflow` for an id it knows (:meth:`knows`),
        :class:`~kapbit.errors.TooManyWorkflows` when ``max_workflows`` run or
        ``max_sleeping`` are reached by the running and sleeping ones."""
        if self.knows(workflow_id, partition):
            raise DuplicateWorkflow(workflow_id)
        options = self._options
        running = len(self._in_flight)
        if running >= options.max_workflows:
            raise TooManyWorkflows(options.max_workflows)
        if running + len(self._sleeping) >= options.max_sleeping:
            raise TooManyWorkflows(options.max_sleeping, "max_sleeping")

    async def start(self, executions: list[WorkflowExecution]) -> None:
        """Resume ``executions`` (found open by recovery) and accept new workflows."""
        await self._tasks.start()
        await self._retry_worker.start()
        await self._timer_task.start()
        self._timer_task.spawn(self._wake_due(), name="kapbit-timer-queue")
        self.adopt(executions)

    def adopt(self, executions: list[WorkflowExecution]) -> None:
        """Resume ``executions``, found open by recovery (at start, or of a partition
        this instance was assigned in group mode)."""
        checkpointer = self._checkpointer
        instrumentation = self._options.instrumentation
        for execution in executions:
            if instrumentation is not None:
                execution.telemetry = instrumentation.workflow(
                    execution.id,
                    execution.definition.type,
                    execution.partition,
                    execution.trace or {},
                )
            checkpointer.opened(execution.partition, execution.id, execution.created_offset)
            if execution.fire_at is None:
                self._in_flight[execution.id] = execution
        self._stats.recovered += len(executions)
        for execution in executions:
            if execution.fire_at is not None:
                self._sleep(execution, execution.fire_at)
            elif execution.attempts > 0:
                self._retry_worker.schedule(execution)
            else:
                execution.task = self._tasks.spawn(self._resume(execution))
        self._open_gate_if_idle()

    def drop_partition(self, partition: int, error: BaseException) -> int:
        """Stop driving the workflows of ``partition`` (given up in group mode): cancel
        their tasks and retries and fail their callers with ``error``; the new owner
        resumes them from the log. The caller has stopped writing to the partition first.
        Returns how many workflows were dropped."""
        dropped = [e for e in self._in_flight.values() if e.partition == partition]
        for execution in dropped:
            del self._in_flight[execution.id]
            if execution.task is not None:
                execution.task.cancel()  # a task that has ended ignores it
            self._retry_worker.cancel(execution.id)
            execution.resolve(error=error)
            _stop_following(execution, error)
            self._interrupted(execution, describe_error(error, str))
        sleeping = [e for e in self._sleeping.values() if e.partition == partition]
        for execution in sleeping:
            del self._sleeping[execution.id]
            self._timers.cancel(execution.id)
            execution.resolve(error=error)
            _stop_following(execution, error)
            self._interrupted(execution, describe_error(error, str))
        return len(dropped) + len(sleeping)

    def submit(self, execution: WorkflowExecution, created: bytes) -> asyncio.Future[Ended]:
        """Create ``execution`` (``created`` is its encoded ``WorkflowCreated``) and run it;
        the future is how this first run stops: its result or error, or cancelled when
        it was stopped first (close, abort). The run goes on when the caller stops
        waiting (cancelling the future cancels nothing else)."""
        self._in_flight[execution.id] = execution
        self._checkpointer.opening(execution.partition, execution.id)
        stopped = execution.run_stopped = self._loop.create_future()
        execution.task = self._tasks.spawn(self._drive(execution, created))
        return stopped

    async def wait_result(self, workflow_id: str, timeout: float | None) -> Any:
        """The result of a workflow running or recently finished here."""
        execution = self._in_flight.get(workflow_id) or self._sleeping.get(workflow_id)
        if execution is not None:
            return await asyncio.wait_for(asyncio.shield(execution.waiter()), timeout)
        finished = self._finished.get(workflow_id)
        if finished is None:
            raise WorkflowNotFound(workflow_id)
        result, error = finished
        if error is not None:
            raise error
        return result

    async def close(self, timeout: float) -> bool:
        """Stop retries, wait up to ``timeout`` for running workflows, cancel the rest.

        ``False`` when a task ignored cancellation and was abandoned (its workflow stays
        open in the log, and the caller must make sure nothing more is written)."""
        await self._timer_task.close(CANCEL_GRACE)
        retries_ended = await self._retry_worker.close(CANCEL_GRACE)
        await self._tasks.wait(timeout)
        closed = await self._tasks.close(CANCEL_GRACE)
        self._stop_following_all()  # tasks cancelled before they ran settled nothing
        return closed and retries_ended

    def fail_all(self, error: BaseException) -> None:
        """Fail every caller still waiting for a workflow of this instance."""
        for execution in [*self._in_flight.values(), *self._sleeping.values()]:
            execution.resolve(error=error)
            _stop_following(execution, error)
            self._interrupted(execution, describe_error(error, str))

    @staticmethod
    def _interrupted(execution: WorkflowExecution, reason: str) -> None:
        """This instance stops reporting on ``execution`` before its end."""
        telemetry = execution.telemetry
        if telemetry is not None:
            execution.telemetry = None
            telemetry.interrupted(reason)

    def abort(self) -> None:
        """Cancel every task at once (a crash)."""
        self._timer_task.abort()
        self._tasks.abort()
        self._retry_worker.abort()
        self._stop_following_all()

    def _stop_following_all(self) -> None:
        """Every run still awaited was cancelled (its task may never have started, so it
        settled nothing): cancel what its caller waits on."""
        for execution in [*self._in_flight.values(), *self._sleeping.values()]:
            _stop_following(execution, None)

    # --- driving --------------------------------------------------------------------------

    async def _drive(self, execution: WorkflowExecution, created: bytes | None) -> Ended:
        """Create (when ``created`` holds the encoded event) and run an execution.

        How the run stops (an error included, never raised) settles the execution's
        :attr:`~kapbit.execution.WorkflowExecution.run_stopped`, if a caller waits on it,
        and is the task's result."""
        try:
            if created is not None:
                try:
                    offset = await self._emitter.append(
                        execution.partition,
                        _CREATED,
                        execution.id,
                        created,
                        workflow_type=execution.definition.type,
                    )
                except asyncio.CancelledError:
                    # Stopped (close, abort, fencing) with the append's outcome unknown: a
                    # try whose ack was lost may have landed. The checkpoint keeps holding
                    # below it, so the next instance finds the workflow and finishes it.
                    self._in_flight.pop(execution.id, None)
                    self._interrupted(execution, "stopped while WorkflowCreated was appended")
                    raise
                except BaseException as refused:
                    # Refused (or fenced): nothing this instance acts on was written.
                    self._in_flight.pop(execution.id, None)
                    self._interrupted(execution, f"not created: {describe_error(refused, str)}")
                    self._checkpointer.abandoned(execution.partition, execution.id)
                    raise
                execution.mark_created(offset)
                self._windows[execution.partition].add(execution.id, offset)
                self._checkpointer.opened(execution.partition, execution.id, offset)
                self._stats.started += 1
            try:
                result, compensated = await execution.run(self._emitter, self._codec, self._actions)
            except StepRaised as raised:
                self._note_step_raised(execution, raised)
                self._retry_worker.schedule(execution)
                later = WillRetryLater(execution.id, raised.cause)
                later.__cause__ = raised.cause
                return _settled(execution, (None, later))
            except (WorkflowRejected, InvalidReturnValue) as ended:
                self._finish(execution, error=ended)
                return _settled(execution, (None, ended))
            except WorkflowSleeps as sleeps:
                stopped = _settled(execution, (None, sleeps))
                self._sleep(execution, sleeps.fire_at)
                return stopped
        except asyncio.CancelledError:
            _stop_following(execution, None)
            raise
        except Exception as error:  # handed to the caller, who raises it
            return _settled(execution, (None, error))
        self._finish(execution, result=result, compensated=compensated)
        return _settled(execution, (result, None))

    async def _resume(self, execution: WorkflowExecution) -> None:
        await self._drive(execution, None)  # its waiters (handles) learn the end

    async def after_wake(self, execution: WorkflowExecution) -> Ended | None:
        """How ``execution``, whose run ended asleep while its caller followed it
        (:attr:`~kapbit.execution.WorkflowExecution.followed`), stops after its timers,
        as its first run would have: its end, ``WillRetryLater`` of the first run after a
        wake whose step raised (the retry worker resumes it), or the error that stopped it
        here (fenced, closed, partition lost); ``None`` when the task driving it was
        cancelled first."""
        while True:
            run = execution.run_stopped
            if run is None:
                if execution.fire_at is None:
                    raise RuntimeError(f"workflow {execution.id!r} is not followed asleep")
                # Asleep before its caller followed it (its first run ran before the call
                # could, as with an eager task factory): followed from this sleep.
                run = execution.run_stopped = self._loop.create_future()
            try:
                ended = await asyncio.shield(run)
            except asyncio.CancelledError:
                if run.cancelled():
                    return None
                raise
            if not isinstance(ended[1], WorkflowSleeps):
                return ended

    # --- durable timers -------------------------------------------------------------------

    def _sleep(self, execution: WorkflowExecution, fire_at: float) -> None:
        """``execution``'s timer outcome is durable: it leaves the running workflows (its
        slot is free) and waits in the timer queue, with no task of its own."""
        self._in_flight.pop(execution.id, None)
        execution.fire_at = fire_at
        execution.task = None
        self._sleeping[execution.id] = execution
        if execution.followed:  # its caller waits for how the run after the wake stops
            execution.run_stopped = self._loop.create_future()
        self._timers.add(
            SleepingWorkflow(
                fire_at,
                execution.partition,
                execution.created_offset,
                execution.id,
                len(execution.progress) - 1,
            )
        )
        self._slot_freed.set()
        self._open_gate_if_idle()

    async def _wake_due(self) -> None:
        """The one timer task: wake due workflows, oldest fire time first, as running slots
        free up (a woken workflow counts as running, like a new one)."""
        limit = self._options.max_workflows
        while True:
            while len(self._in_flight) >= limit:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            for entry in await self._timers.wait_due(limit - len(self._in_flight)):
                execution = self._sleeping.pop(entry.workflow_id)
                execution.fire_at = None
                self._in_flight[execution.id] = execution
                execution.task = self._tasks.spawn(self._resume(execution))

    def _note_step_raised(
        self, execution: WorkflowExecution, raised: StepRaised, level: int = logging.WARNING
    ) -> None:
        # Bounded: the error goes into WorkflowRetry / DeadLetter events.
        execution.last_error = describe_error(raised.cause)[:_MAX_ERROR_LENGTH]
        logger.log(level, "%s", raised, extra=raised_fields(execution, raised))
        if raised.breaker_open:
            self._gate.close(f"workflow {execution.id!r}: {describe_error(raised.cause, str)}")

    async def attempt(self, execution: WorkflowExecution) -> None:
        """One retry-worker attempt: record it, resume, finish on success."""
        execution.attempts += 1
        self._stats.retried += 1
        try:
            await self._emit_or_reject(
                execution,
                WorkflowRetry(
                    execution.id, execution.attempts, execution.last_error, self._clock.now()
                ),
            )
            if execution.telemetry is not None:
                execution.telemetry.retried(execution.attempts, execution.last_error, False)
            result, compensated = await execution.run(self._emitter, self._codec, self._actions)
        except StepRaised as raised:
            # The retry worker logs the failed attempt itself.
            self._note_step_raised(execution, raised, logging.INFO)
            raise
        except (WorkflowRejected, InvalidReturnValue) as ended:
            self._finish(execution, error=ended)
            return
        except WorkflowSleeps as sleeps:
            self._sleep(execution, sleeps.fire_at)
            return
        self._finish(execution, result=result, compensated=compensated)

    async def give_up(self, execution: WorkflowExecution) -> None:
        """Dead-letter an execution that used up its attempts."""
        try:
            await self._emit_or_reject(
                execution,
                DeadLetter(
                    execution.id, execution.attempts, execution.last_error, self._clock.now()
                ),
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
            await self._emitter.emit(
                execution.partition, execution.id, event, workflow_type=execution.definition.type
            )
        except (RecordRejected, EncodeError) as exc:
            await execution.reject(self._emitter, KIND_OF[type(event)].value, str(exc))

    def _open_gate_if_idle(self) -> None:
        """The gate reopens when a workflow completes: with none left to probe, let one in."""
        if not self._in_flight and not self._gate.is_open:
            self._gate.open("no workflow left to probe with")

    def _finish(
        self,
        execution: WorkflowExecution,
        result: Any = None,
        compensated: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """Bookkeeping once a workflow's terminal event is durable."""
        self._in_flight.pop(execution.id, None)
        self._slot_freed.set()
        self._checkpointer.terminated(execution.partition, execution.id)
        stats = self._stats
        if error is None:
            if compensated:
                stats.compensated += 1
                outcome = "compensated"
            else:
                stats.succeeded += 1
                outcome = "succeeded"
            if not self._gate.is_open:
                self._gate.open()
        elif isinstance(error, DeadLettered):
            stats.dead_lettered += 1
            outcome = "dead_lettered"
        elif isinstance(error, InvalidReturnValue):
            stats.invalid_returns += 1
            outcome = "invalid_return"
            step = error.step if error.step >= 0 else None
            extra = step_fields(execution, step, error.phase, execution.step_attempt)
            logger.error("%s", error, extra=extra)
        else:
            stats.rejected += 1
            outcome = "rejected"
            logger.error("%s", error, extra=execution_fields(execution))
        if execution.telemetry is not None:
            execution.telemetry.ended(outcome, error)
        if not self._gate.is_open:
            self._open_gate_if_idle()
        execution.resolve(result, error)
        finished = self._finished
        finished[execution.id] = (result, error)
        if len(finished) > self._options.result_cache:
            finished.popitem(last=False)


def _settled(execution: WorkflowExecution, ended: Ended) -> Ended:
    """``ended``, how ``execution``'s run stopped, given to the caller waiting on it."""
    waiting = execution.run_stopped
    if waiting is not None:
        execution.run_stopped = None
        if not waiting.done():
            waiting.set_result(ended)
    return ended


def _stop_following(execution: WorkflowExecution, error: BaseException | None) -> None:
    """``execution`` is no longer driven here: the caller waiting on its run learns
    ``error`` (or that the run was cancelled, for ``None``)."""
    if error is not None:
        _settled(execution, (None, error))
        return
    waiting = execution.run_stopped
    if waiting is not None:
        execution.run_stopped = None
        waiting.cancel()  # a future already settled ignores it
