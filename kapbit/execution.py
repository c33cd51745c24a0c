"""One workflow execution: the saga state machine that runs steps and persists outcomes.

The next action is always derived from the persisted progress, so an execution rebuilt
from the log (recovery) or resumed after a step raised (retry worker) continues exactly
after its last persisted outcome.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import msgspec
import pybreaker
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
)

from kapbit._log import execution_fields, step_fields
from kapbit.actions import ActionRunner
from kapbit.clock import SYSTEM_CLOCK, Clock
from kapbit.codecs import Codec
from kapbit.codecs.checked import TypeMismatch, encode_checked
from kapbit.emitter import Emitter
from kapbit.errors import (
    CircuitBreakerOpen,
    EncodeError,
    InvalidReturnValue,
    NonRetryable,
    RecordRejected,
    WorkflowRejected,
    describe_error,
)
from kapbit.events import InvalidReturn, Rejected, StepOutcome, WorkflowResult, WorkflowRetry
from kapbit.instrumentation import WorkflowObserver
from kapbit.options import Backoff
from kapbit.step_context import CURRENT_STEP, StepFields
from kapbit.timers import Sleep, SleepUntil, Timer
from kapbit.workflow import Definition, Failure, Outcome, Phase, Progress, Step, Success, _call

logger = logging.getLogger("kapbit")

#: Longest reason stored in a Rejected event (as kapbit-go); longer ones are cut.
MAX_REASON_LENGTH = 256
_TRUNCATED = "... (truncated)"
#: Longest error text kept for WorkflowRetry / DeadLetter events.
MAX_ERROR_LENGTH = 1000
#: The step index an InvalidReturn event gives the result builder.
RESULT_BUILDER = -1
#: How often a refused minimal terminal event is tried again.
_TERMINAL_BACKOFF = Backoff()
#: What an action may return besides ``None`` (a tuple: no union built per check).
_OUTCOMES = (Success, Failure)
_TIMERS = (Sleep, SleepUntil)
_TIMER_WHERE = (
    "a durable timer (Sleep / SleepUntil) may end only an execute step that has a next step"
)


class StepRaised(Exception):
    """A step action or the result builder raised: a dependency is unavailable.

    ``step`` is ``None`` for the result builder, ``name`` the step's name, ``attempt``
    the step's attempt that raised.
    ``breaker_open`` says the cause was an open circuit breaker, which closes the entry
    gate.
    """

    def __init__(
        self,
        workflow_id: str,
        step: int | None,
        phase: Phase,
        cause: BaseException,
        name: str | None = None,
        attempt: int = 1,
    ):
        if step is None:
            where = "result builder"
        elif name is None:
            where = f"step {step} ({phase})"
        else:
            where = f"step {name!r} ({step}, {phase})"
        super().__init__(f"workflow {workflow_id!r}: {where} raised {describe_error(cause)}")
        self.step = step
        self.name = name
        self.phase = phase
        self.attempt = attempt
        self.cause = cause
        self.breaker_open = _is_breaker_error(cause)


def _is_breaker_error(error: BaseException) -> bool:
    return isinstance(error, pybreaker.CircuitBreakerError | CircuitBreakerOpen)


class WorkflowSleeps(Exception):
    """The workflow's step ``step`` returned a durable timer and its outcome is durable:
    the workflow sleeps until ``fire_at`` (wall time), then runs its next step."""

    def __init__(self, fire_at: float, step: int) -> None:
        super().__init__(f"sleeps until {fire_at} after step {step}")
        self.fire_at = fire_at
        self.step = step


class _ActionRaised(Exception):
    """An action raised ``cause`` (wrapped, so that in-place retries retry nothing else)."""

    def __init__(self, cause: Exception | asyncio.CancelledError) -> None:
        super().__init__(describe_error(cause))
        self.cause = cause


class WorkflowExecution:
    """The in-memory state of one workflow that has been created and not yet terminated."""

    __slots__ = (
        "_created",
        "_waiter",
        "attempts",
        "clock",
        "created_offset",
        "definition",
        "fire_at",
        "id",
        "input",
        "last_error",
        "partition",
        "progress",
        "step_base",
        "task",
        "telemetry",
        "trace",
    )

    def __init__(
        self,
        workflow_id: str,
        definition: Definition[Any, Any, Any],
        partition: int,
        input: Any,
        progress: Progress | None = None,
        attempts: int = 0,
        last_error: str = "",
        trace: dict[str, str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.id = workflow_id
        self.definition = definition
        self.partition = partition
        self.input = input
        self.progress = progress if progress is not None else definition.new_progress()
        self.attempts = attempts
        self.last_error = last_error
        self.created_offset = -1
        #: ``attempts`` when the current action became current (its step's attempt 1).
        self.step_base = 0
        #: The trace context stored in its ``WorkflowCreated`` (``None``: none was).
        self.trace = trace
        #: What reports this workflow's run to traces and metrics (``None``: nothing does).
        self.telemetry: WorkflowObserver | None = None
        #: Stamps this workflow's events and times its timers.
        self.clock = clock
        #: The task driving it now, if any (the supervisor's, to cancel it).
        self.task: asyncio.Task[Any] | None = None
        #: While the workflow sleeps on a durable timer: when it wakes (wall time).
        self.fire_at: float | None = None
        self._waiter: asyncio.Future[Any] | None = None
        self._created: asyncio.Future[int] | None = None

    def created(self) -> asyncio.Future[int]:
        """A future resolved with the offset of the workflow's ``WorkflowCreated`` once it
        is durable (created on first use)."""
        if self._created is None:
            self._created = asyncio.get_running_loop().create_future()
            if self.created_offset >= 0:
                self._created.set_result(self.created_offset)
        return self._created

    def mark_created(self, offset: int) -> None:
        """The workflow's ``WorkflowCreated`` is durable at ``offset``."""
        self.created_offset = offset
        if self._created is not None and not self._created.done():
            self._created.set_result(offset)

    def waiter(self) -> asyncio.Future[Any]:
        """A future resolved with the final result or error (created on first use)."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Complete the waiter, if anyone asked for it."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(result)
        else:
            waiter.set_exception(error)
            # Waiters are optional: an error nobody awaited is not worth a warning.
            waiter.exception()

    def next_action(self) -> tuple[int, Phase] | None:
        """The step and phase to run next, or ``None`` when only the result remains.

        After a step's ``Failure`` the succeeded steps are compensated in reverse order;
        a compensation that returns ``Failure`` stops the rollback there (the steps
        before it stay as they are) and the result is built.
        """
        steps = self.definition.steps
        progress = self.progress
        failed = progress.failed_step
        if failed is None:
            done = len(progress)
            return (done, "execute") if done < len(steps) else None
        for index in range(failed - 1, -1, -1):
            if steps[index].compensate is None:
                continue
            compensation = progress.compensation(index)
            if compensation is None:
                return index, "compensate"
            if isinstance(compensation, Failure):
                return None
        return None

    @property
    def step_attempt(self) -> int:
        """The current action's attempt number: 1, plus the retries recorded since."""
        return self.attempts - self.step_base + 1

    async def run(self, emitter: Emitter, codec: Codec, actions: ActionRunner) -> tuple[Any, bool]:
        """Run to the end; return ``(result, compensated)`` once WorkflowResult is durable.

        Raises :class:`StepRaised` when an action raises (nothing of that step is
        persisted), :class:`~kapbit.errors.WorkflowRejected` when storage refuses one of
        the workflow's events (a Rejected event then terminates it) and
        :class:`~kapbit.errors.InvalidReturnValue` when an action returns neither
        ``Success``, ``Failure`` nor ``None``, or a value not of its declared type (an
        InvalidReturn event terminates it).
        """
        definition = self.definition
        steps = definition.steps
        progress = self.progress
        while (action := self.next_action()) is not None:
            index, phase = action
            step = steps[index]
            if step.retry is None and self.telemetry is None:
                # the common case, inline: no frames of kapbit's own
                fn, is_async = step.actions[phase]
                context: StepFields = (
                    self.id,
                    definition.type,
                    step.label,
                    index,
                    phase,
                    self.attempts - self.step_base + 1,
                    actions.node_id,
                )
                token = CURRENT_STEP.set(context)
                try:
                    if is_async and step.timeout is None:  # as ActionRunner.start, inlined
                        returned = await fn(self.input, progress)
                    else:
                        returned = await actions.start(
                            fn, is_async, (self.input, progress), context, step.timeout
                        )
                except asyncio.CancelledError as exc:
                    if _being_cancelled():
                        raise
                    returned = self._step_failed(step, index, phase, exc)  # raised by the step
                except Exception as exc:  # any error means "retry later", unless told otherwise
                    returned = self._step_failed(step, index, phase, exc)
                finally:
                    CURRENT_STEP.reset(token)
            elif step.retry is None:
                try:
                    returned = await self._attempt(actions, step, index, phase)
                except _ActionRaised as raised:
                    returned = self._step_failed(step, index, phase, raised.cause)
            else:
                returned = await self._retry_in_place(emitter, actions, step, index, phase)
            # Checked outside the action's error handling: a wrong return value is a
            # programming error, and retrying would run the action's side effect again.
            outcome = Success(None) if returned is None else returned
            timer: Timer | None = None
            if isinstance(outcome, _TIMERS):
                if phase != "execute" or index == len(steps) - 1:
                    await self._invalid_return(emitter, index, phase, returned, _TIMER_WHERE)
                timer = outcome
                outcome = Success(timer.value)
            if not isinstance(outcome, _OUTCOMES):
                await self._invalid_return(emitter, index, phase, returned)
            try:
                data, value = encode_checked(codec, outcome.value, definition.outcome_checks[index])
            except EncodeError as exc:
                await self.reject(emitter, "step_outcome", str(exc))
            except TypeMismatch as mismatch:
                await self._wrong_type(emitter, index, phase, mismatch)
            success = isinstance(outcome, Success)
            now = self.clock.now()
            fire_at = None if timer is None else timer.fire_at(now)
            event = StepOutcome(self.id, index, phase, success, msgspec.Raw(data), now, fire_at)
            try:
                await emitter.emit(self.partition, self.id, event, workflow_type=definition.type)
            except (RecordRejected, EncodeError) as exc:
                await self.reject(emitter, "step_outcome", str(exc))
            if value is not outcome.value:  # keep what was read back, as after a restart
                outcome = Success(value) if success else Failure(value)
            progress.record(phase, index, outcome)
            self.step_base = self.attempts
            if phase == "compensate" and not success:
                logger.warning(
                    "workflow %r: compensation of step %r (%d) failed (%r); the rollback "
                    "stops, steps before it are not compensated",
                    self.id,
                    step.label,
                    index,
                    value,
                    extra=step_fields(self, index, phase, self.step_attempt),
                )
            if fire_at is not None:
                raise WorkflowSleeps(fire_at, index)

        try:
            result = await _call(definition.result, definition._result_async, self.input, progress)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            raise StepRaised(self.id, None, "execute", exc, attempt=self.step_attempt) from exc
        except Exception as exc:
            raise StepRaised(self.id, None, "execute", exc, attempt=self.step_attempt) from exc
        compensated = progress.failed
        try:
            data, result = encode_checked(codec, result, definition.result_check)
        except EncodeError as exc:
            await self.reject(emitter, "workflow_result", str(exc))
        except TypeMismatch as mismatch:
            await self._wrong_type(emitter, RESULT_BUILDER, "execute", mismatch)
        ended = WorkflowResult(self.id, msgspec.Raw(data), compensated, self.clock.now())
        try:
            await emitter.emit(self.partition, self.id, ended, workflow_type=definition.type)
        except (RecordRejected, EncodeError) as exc:
            await self.reject(emitter, "workflow_result", str(exc))
        return result, compensated

    def _context(
        self, actions: ActionRunner, step: Step[Any, Any], index: int, phase: Phase
    ) -> StepFields:
        """What :func:`kapbit.context` tells the action (its fields; the common path in
        :meth:`run` builds the same tuple inline)."""
        return (
            self.id,
            self.definition.type,
            step.label,
            index,
            phase,
            self.attempts - self.step_base + 1,
            actions.node_id,
        )

    def _step_failed(
        self, step: Step[Any, Any], index: int, phase: Phase, error: BaseException
    ) -> Failure[Any]:
        """What an action's error means: a ``Failure`` if the step may not retry it (it is
        :class:`~kapbit.errors.NonRetryable`, of a type its policy lists, or its policy is
        used up), else :class:`StepRaised` for the retry worker."""
        if isinstance(error, NonRetryable):
            return Failure(error.value)
        policy = step.retry
        if policy is not None and not _is_breaker_error(error):
            if isinstance(error, policy.non_retryable):
                return Failure(_error_text(error))
            return Failure(f"gave up after {self.step_attempt} attempts: {_error_text(error)}")
        raise StepRaised(self.id, index, phase, error, step.label, self.step_attempt) from error

    async def _retry_in_place(
        self,
        emitter: Emitter,
        actions: ActionRunner,
        step: Step[Any, Any],
        index: int,
        phase: Phase,
    ) -> Any:
        """Run the action under its step's policy until it returns or the policy gives up
        (tenacity); what it returned, or :meth:`_step_failed` of its last error. Each retry
        is a WorkflowRetry event first, so attempt counts survive restarts."""
        policy = step.retry
        assert policy is not None
        if self.step_attempt > policy.max_attempts:  # used up before a restart
            return self._step_failed(
                step, index, phase, RuntimeError(self.last_error or "no error recorded")
            )

        def retryable(error: BaseException) -> bool:
            if not isinstance(error, _ActionRaised):
                return False
            cause = error.cause
            return not (
                isinstance(cause, (NonRetryable, *policy.non_retryable)) or _is_breaker_error(cause)
            )

        def used_up(_: RetryCallState) -> bool:
            return self.step_attempt >= policy.max_attempts

        retrying = AsyncRetrying(
            retry=retry_if_exception(retryable),
            stop=used_up,
            wait=policy.backoff.wait(),
            sleep=self.clock.sleep,
            reraise=True,
        )
        last: _ActionRaised | None = None
        try:
            async for call in retrying:
                with call:
                    if last is not None:
                        await self.record_retry(emitter, last.cause, in_place=True)
                    try:
                        return await self._attempt(actions, step, index, phase)
                    except _ActionRaised as raised:
                        last = raised
                        raise
        except _ActionRaised as raised:
            return self._step_failed(step, index, phase, raised.cause)
        raise AssertionError("unreachable: tenacity returns or re-raises")  # pragma: no cover

    async def _attempt(
        self, actions: ActionRunner, step: Step[Any, Any], index: int, phase: Phase
    ) -> Any:
        """Run the action once, in its context and (with telemetry) its span: what it
        returned, or :class:`_ActionRaised` if it raised."""
        fn, is_async = step.actions[phase]
        context = self._context(actions, step, index, phase)
        token = CURRENT_STEP.set(context)
        telemetry = self.telemetry
        observed = None
        if telemetry is not None:
            observed = telemetry.step(step.label, index, phase, context[5])
        try:
            returned = await actions.start(
                fn, is_async, (self.input, self.progress), context, step.timeout
            )
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                if observed is not None:
                    observed.cancelled()
                raise
            if observed is not None:
                observed.raised(exc)
            raise _ActionRaised(exc) from exc  # raised by the step itself
        except Exception as exc:  # any error means "retry later", unless told otherwise
            if observed is not None:
                observed.raised(exc)
            raise _ActionRaised(exc) from exc
        except BaseException:
            if observed is not None:
                observed.cancelled()
            raise
        finally:
            CURRENT_STEP.reset(token)
        if observed is not None:
            observed.returned(returned)
        return returned

    async def record_retry(
        self, emitter: Emitter, cause: BaseException, in_place: bool = False
    ) -> None:
        """Count another attempt and record it (``WorkflowRetry``) before it runs;
        ``in_place`` says the step's own policy retries it, not the retry worker."""
        self.last_error = describe_error(cause)[:MAX_ERROR_LENGTH]
        self.attempts += 1
        event = WorkflowRetry(self.id, self.attempts, self.last_error, self.clock.now())
        try:
            await emitter.emit(self.partition, self.id, event, workflow_type=self.definition.type)
        except (RecordRejected, EncodeError) as exc:
            await self.reject(emitter, "workflow_retry", str(exc))
        if self.telemetry is not None:
            self.telemetry.retried(self.attempts, self.last_error, in_place)

    async def reject(self, emitter: Emitter, kind: str, reason: str) -> NoReturn:
        """Terminate the workflow with a Rejected event and raise WorkflowRejected.

        The stored reason is cut to :data:`MAX_REASON_LENGTH` characters; if storage
        refuses that record too, a Rejected without a reason is written instead.
        """
        await self._terminate(
            emitter,
            Rejected(self.id, kind, _bounded(reason), self.clock.now()),
            Rejected(self.id, kind, "", self.clock.now()),
        )
        raise WorkflowRejected(self.id, f"{kind}: {reason}")

    async def _invalid_return(
        self,
        emitter: Emitter,
        index: int,
        phase: Phase,
        returned: object,
        rule: str = "an action must return Success(value), Failure(value) or None",
    ) -> NoReturn:
        """Terminate the workflow with an InvalidReturn event, raise InvalidReturnValue."""
        step = self.definition.steps[index]
        name = step.name or getattr(step.execute, "__name__", "")
        reason = f"step {index} ({name!r}) {phase} returned {type(returned).__qualname__}; {rule}"
        await self._terminate(
            emitter,
            InvalidReturn(self.id, index, phase, _bounded(reason), self.clock.now()),
            InvalidReturn(self.id, index, phase, "", self.clock.now()),
        )
        raise InvalidReturnValue(self.id, index, phase, reason, actual=type(returned).__qualname__)

    async def _wrong_type(
        self, emitter: Emitter, index: int, phase: Phase, mismatch: TypeMismatch
    ) -> NoReturn:
        """Terminate with InvalidReturn: a value is not of its declared type."""
        if index == RESULT_BUILDER:
            where = "the result builder"
        else:
            where = f"step {index} ({self.definition.steps[index].label!r}) {phase}"
        reason = (
            f"{where} returned a value of type {mismatch.actual} where {mismatch.declared} is "
            f"declared: {mismatch.detail}"
        )
        await self._terminate(
            emitter,
            InvalidReturn(self.id, index, phase, _bounded(reason), self.clock.now()),
            InvalidReturn(self.id, index, phase, "", self.clock.now()),
        )
        raise InvalidReturnValue(
            self.id, index, phase, reason, declared=mismatch.declared, actual=mismatch.actual
        )

    async def _terminate(
        self,
        emitter: Emitter,
        event: Rejected | InvalidReturn,
        minimal: Rejected | InvalidReturn,
    ) -> None:
        """Append a terminal event, or its ``minimal`` form if storage refuses it.

        The minimal form must land: the caller is told the workflow ended, and a log
        without its terminal event would make the next instance run the step again. So a
        refusal of it is retried with backoff, for as long as the storage refuses (logged
        as an error each time), like an outage.
        """
        try:
            await self._emit(emitter, event)
            return
        except (RecordRejected, EncodeError):
            pass

        def refused(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            logger.error(
                "workflow %r: storage refused its minimal terminal %s event (%s); "
                "retrying in %.3f s",
                self.id,
                type(minimal).__name__,
                error,
                state.upcoming_sleep,
                extra=execution_fields(self),
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(RecordRejected),
            wait=_TERMINAL_BACKOFF.wait(),
            before_sleep=refused,
            reraise=True,
        ):
            with attempt:
                await self._emit(emitter, minimal)

    async def _emit(self, emitter: Emitter, event: Rejected | InvalidReturn) -> None:
        await emitter.emit(self.partition, self.id, event, workflow_type=self.definition.type)


def _being_cancelled() -> bool:
    """Whether the running task was asked to stop (a CancelledError a step raises on its
    own, without that, is an error of the step)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _bounded(reason: str) -> str:
    """``reason`` cut to :data:`MAX_REASON_LENGTH` characters (marked as cut)."""
    if len(reason) <= MAX_REASON_LENGTH:
        return reason
    return reason[:MAX_REASON_LENGTH] + _TRUNCATED


def _error_text(error: BaseException) -> str:
    """An error as a Failure value: its type and message."""
    return f"{type(error).__name__}: {describe_error(error, str)}"[:MAX_ERROR_LENGTH]


def restore_outcome(success: bool, value: Any) -> Outcome:
    """Rebuild an outcome read from the log."""
    return Success(value) if success else Failure(value)
