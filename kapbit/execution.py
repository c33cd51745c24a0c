"""One workflow execution: the saga state machine that runs steps and persists outcomes.

The next action is always derived from the persisted progress, so an execution rebuilt
from the log (recovery) or resumed after a step raised (retry worker) continues exactly
after its last persisted outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NoReturn

import msgspec
import pybreaker

from kapbit._log import execution_fields
from kapbit.codecs import Codec
from kapbit.emitter import Emitter
from kapbit.errors import (
    CircuitBreakerOpen,
    EncodeError,
    InvalidReturnValue,
    RecordRejected,
    WorkflowRejected,
    describe_error,
)
from kapbit.events import InvalidReturn, Rejected, StepOutcome, WorkflowResult
from kapbit.workflow import Definition, Failure, Outcome, Phase, Progress, Success, _call

logger = logging.getLogger("kapbit")

#: Longest reason stored in a Rejected event (as kapbit-go); longer ones are cut.
MAX_REASON_LENGTH = 256
_TRUNCATED = "... (truncated)"


class StepRaised(Exception):
    """A step action or the result builder raised: a dependency is unavailable.

    ``step`` is ``None`` for the result builder. ``breaker_open`` says the cause was an
    open circuit breaker, which closes the entry gate.
    """

    def __init__(self, workflow_id: str, step: int | None, phase: Phase, cause: BaseException):
        where = "result builder" if step is None else f"step {step} ({phase})"
        super().__init__(f"workflow {workflow_id!r}: {where} raised {describe_error(cause)}")
        self.step = step
        self.phase = phase
        self.cause = cause
        self.breaker_open = isinstance(cause, pybreaker.CircuitBreakerError | CircuitBreakerOpen)


class WorkflowExecution:
    """The in-memory state of one workflow that has been created and not yet terminated."""

    __slots__ = (
        "_created",
        "_waiter",
        "attempts",
        "created_offset",
        "definition",
        "id",
        "input",
        "last_error",
        "partition",
        "progress",
    )

    def __init__(
        self,
        workflow_id: str,
        definition: Definition,
        partition: int,
        input: Any,
        progress: Progress | None = None,
        attempts: int = 0,
        last_error: str = "",
    ) -> None:
        self.id = workflow_id
        self.definition = definition
        self.partition = partition
        self.input = input
        self.progress = progress if progress is not None else definition.new_progress()
        self.attempts = attempts
        self.last_error = last_error
        self.created_offset = -1
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

    async def run(self, emitter: Emitter, codec: Codec) -> tuple[Any, bool]:
        """Run to the end; return ``(result, compensated)`` once WorkflowResult is durable.

        Raises :class:`StepRaised` when an action raises (nothing of that step is
        persisted), :class:`~kapbit.errors.WorkflowRejected` when storage refuses one of
        the workflow's events (a Rejected event then terminates it) and
        :class:`~kapbit.errors.InvalidReturnValue` when an action returns neither
        ``Success``, ``Failure`` nor ``None`` (an InvalidReturn event terminates it).
        """
        definition = self.definition
        steps = definition.steps
        progress = self.progress
        while (action := self.next_action()) is not None:
            index, phase = action
            step = steps[index]
            try:
                if phase == "execute":
                    returned = await _call(step.execute, step._execute_async, self.input, progress)
                else:
                    assert step.compensate is not None
                    returned = await _call(
                        step.compensate, step._compensate_async, self.input, progress
                    )
            except asyncio.CancelledError as exc:
                if _being_cancelled():
                    raise
                raise StepRaised(self.id, index, phase, exc) from exc  # raised by the step
            except Exception as exc:  # any error means "retry later"
                raise StepRaised(self.id, index, phase, exc) from exc
            # Checked outside the handler above: a wrong return value is a programming
            # error, and retrying would run the action's side effect again.
            outcome = Success(None) if returned is None else returned
            if not isinstance(outcome, Success | Failure):
                await self._invalid_return(emitter, index, phase, returned)
            value = await self._encode(emitter, codec, outcome.value, "step_outcome")
            event = StepOutcome(
                self.id, index, phase, isinstance(outcome, Success), value, time.time()
            )
            await self._persist(emitter, codec, event)
            progress._record(phase, index, outcome)
            if phase == "compensate" and isinstance(outcome, Failure):
                logger.warning(
                    "workflow %r: compensation of step %d failed (%r); the rollback stops, "
                    "steps before it are not compensated",
                    self.id,
                    index,
                    outcome.value,
                    extra=execution_fields(self),
                )

        try:
            result = await _call(definition.result, definition._result_async, self.input, progress)
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            raise StepRaised(self.id, None, "execute", exc) from exc
        except Exception as exc:
            raise StepRaised(self.id, None, "execute", exc) from exc
        compensated = progress.failed
        encoded = await self._encode(emitter, codec, result, "workflow_result")
        await self._persist(
            emitter, codec, WorkflowResult(self.id, encoded, compensated, time.time())
        )
        return result, compensated

    async def _encode(self, emitter: Emitter, codec: Codec, value: Any, kind: str) -> msgspec.Raw:
        try:
            return msgspec.Raw(codec.encode(value))
        except EncodeError as exc:
            await self.reject(emitter, kind, str(exc))

    async def _persist(
        self, emitter: Emitter, codec: Codec, event: StepOutcome | WorkflowResult
    ) -> None:
        try:
            await emitter.emit(self.partition, self.id, event)
        except (RecordRejected, EncodeError) as exc:
            kind = "step_outcome" if isinstance(event, StepOutcome) else "workflow_result"
            await self.reject(emitter, kind, str(exc))

    async def reject(self, emitter: Emitter, kind: str, reason: str) -> NoReturn:
        """Terminate the workflow with a Rejected event and raise WorkflowRejected.

        The stored reason is cut to :data:`MAX_REASON_LENGTH` characters; if storage
        refuses that record too, a Rejected without a reason is written instead.
        """
        await self._terminate(
            emitter,
            Rejected(self.id, kind, _bounded(reason), time.time()),
            Rejected(self.id, kind, "", time.time()),
        )
        raise WorkflowRejected(self.id, f"{kind}: {reason}")

    async def _invalid_return(
        self, emitter: Emitter, index: int, phase: Phase, returned: object
    ) -> NoReturn:
        """Terminate the workflow with an InvalidReturn event, raise InvalidReturnValue."""
        step = self.definition.steps[index]
        name = step.name or getattr(step.execute, "__name__", "")
        reason = (
            f"step {index} ({name!r}) {phase} returned {type(returned).__qualname__}; "
            "an action must return Success(value), Failure(value) or None"
        )
        await self._terminate(
            emitter,
            InvalidReturn(self.id, index, phase, _bounded(reason), time.time()),
            InvalidReturn(self.id, index, phase, "", time.time()),
        )
        raise InvalidReturnValue(self.id, index, phase, reason)

    async def _terminate(
        self,
        emitter: Emitter,
        event: Rejected | InvalidReturn,
        minimal: Rejected | InvalidReturn,
    ) -> None:
        """Append a terminal event, or its ``minimal`` form if storage refuses it.

        If storage refuses both, the engine still treats the workflow as terminated (its
        caller is told so): nothing it could write would end it, and running it again
        would repeat its side effects. The error is logged.
        """
        error: Exception | None = None
        for candidate in (event, minimal):
            try:
                await emitter.emit(self.partition, self.id, candidate)
                return
            except (RecordRejected, EncodeError) as exc:
                error = exc
        logger.error(
            "workflow %r: storage refused its terminal %s event (%s); the workflow is "
            "treated as terminated but the log does not say so",
            self.id,
            type(event).__name__,
            error,
            extra=execution_fields(self),
        )


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


def restore_outcome(success: bool, value: Any) -> Outcome:
    """Rebuild an outcome read from the log."""
    return Success(value) if success else Failure(value)
