"""One workflow execution: the saga state machine that runs steps and persists outcomes.

The next action is always derived from the persisted progress, so an execution rebuilt
from the log (recovery) or resumed after a step raised (retry worker) continues exactly
after its last persisted outcome.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, NoReturn

import msgspec
import pybreaker

from kapbit.codecs import Codec
from kapbit.emitter import Emitter
from kapbit.errors import (
    CircuitBreakerOpen,
    EncodeError,
    RecordRejected,
    WorkflowRejected,
    describe_error,
)
from kapbit.events import Rejected, StepOutcome, WorkflowResult
from kapbit.workflow import Definition, Failure, Outcome, Phase, Progress, Success, _call


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
        """The step and phase to run next, or ``None`` when only the result remains."""
        steps = self.definition.steps
        progress = self.progress
        failed = progress.failed_step
        if failed is None:
            done = len(progress)
            return (done, "execute") if done < len(steps) else None
        for index in range(failed - 1, -1, -1):
            if steps[index].compensate is not None and progress.compensation(index) is None:
                return index, "compensate"
        return None

    async def run(self, emitter: Emitter, codec: Codec) -> tuple[Any, bool]:
        """Run to the end; return ``(result, compensated)`` once WorkflowResult is durable.

        Raises :class:`StepRaised` when an action raises (nothing of that step is
        persisted) and :class:`~kapbit.errors.WorkflowRejected` when storage refuses one
        of the workflow's events (a Rejected event then terminates it).
        """
        definition = self.definition
        steps = definition.steps
        progress = self.progress
        while (action := self.next_action()) is not None:
            index, phase = action
            step = steps[index]
            try:
                if phase == "execute":
                    outcome = await _call(step.execute, step._execute_async, self.input, progress)
                    _check_outcome(outcome, index)
                else:
                    assert step.compensate is not None
                    outcome = await _call(
                        step.compensate, step._compensate_async, self.input, progress
                    )
                    if outcome is None:
                        outcome = Success(None)
                    _check_outcome(outcome, index)
            except asyncio.CancelledError as exc:
                if _being_cancelled():
                    raise
                raise StepRaised(self.id, index, phase, exc) from exc  # raised by the step
            except Exception as exc:  # any error means "retry later"
                raise StepRaised(self.id, index, phase, exc) from exc
            value = await self._encode(emitter, codec, outcome.value, "step_outcome")
            event = StepOutcome(
                self.id, index, phase, isinstance(outcome, Success), value, time.time()
            )
            await self._persist(emitter, codec, event)
            progress._record(phase, index, outcome)

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
            await self._reject(emitter, kind, str(exc))

    async def _persist(
        self, emitter: Emitter, codec: Codec, event: StepOutcome | WorkflowResult
    ) -> None:
        try:
            await emitter.emit(self.partition, self.id, event)
        except (RecordRejected, EncodeError) as exc:
            kind = "step_outcome" if isinstance(event, StepOutcome) else "workflow_result"
            await self._reject(emitter, kind, str(exc))

    async def _reject(self, emitter: Emitter, kind: str, reason: str) -> NoReturn:
        """Terminate the workflow with a Rejected event and raise WorkflowRejected."""
        await emitter.emit(self.partition, self.id, Rejected(self.id, kind, reason, time.time()))
        raise WorkflowRejected(self.id, f"{kind}: {reason}")


def _being_cancelled() -> bool:
    """Whether the running task was asked to stop (a CancelledError a step raises on its
    own, without that, is an error of the step)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _check_outcome(outcome: object, step: int) -> None:
    if not isinstance(outcome, Success | Failure):
        raise TypeError(
            f"step {step} returned {type(outcome).__name__}; "
            "an action must return Success(value) or Failure(value)"
        )


def restore_outcome(success: bool, value: Any) -> Outcome:
    """Rebuild an outcome read from the log."""
    return Success(value) if success else Failure(value)
