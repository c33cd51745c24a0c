"""The retry worker: resumes workflows whose step raised, and gives up on them in the end.

Fast mode retries each workflow with capped exponential backoff (tenacity). While the
entry gate is closed (a breaker is open) it switches to slow mode: one workflow at a time
probes the dependency, at ``slow_interval``; a probe that completes a workflow reopens the
gate and the others follow at fast pace. Every attempt is recorded in the log first
(``WorkflowRetry``), so attempt counts survive restarts; after ``max_attempts`` the
workflow is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from kapbit.execution import StepRaised, WorkflowExecution
from kapbit.gate import EntryGate
from kapbit.options import RetryPolicy

logger = logging.getLogger("kapbit.retry")

#: Runs one attempt: records it, resumes the execution, finishes it on success.
Attempt = Callable[[WorkflowExecution], Awaitable[None]]
#: Terminates an execution that used up its attempts.
GiveUp = Callable[[WorkflowExecution], Awaitable[None]]


class RetryWorker:
    """Owns the workflows waiting for another attempt, one task each."""

    def __init__(
        self,
        policy: RetryPolicy,
        gate: EntryGate,
        attempt: Attempt,
        give_up: GiveUp,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._policy = policy
        self._gate = gate
        self._attempt = attempt
        self._give_up = give_up
        self._sleep = sleep
        self._probe = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._tasks

    def schedule(self, execution: WorkflowExecution) -> None:
        """Take over ``execution`` until it terminates or the worker stops."""
        task = asyncio.create_task(self._retry(execution), name=f"kapbit-retry-{execution.id}")
        self._tasks[execution.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(execution.id, None))

    async def stop(self) -> None:
        """Cancel every pending retry and wait; the workflows stay open in the log."""
        tasks = self.abort()
        await asyncio.gather(*tasks, return_exceptions=True)

    def abort(self) -> list[asyncio.Task[None]]:
        """Cancel every pending retry without waiting; returns the cancelled tasks."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        return tasks

    async def _retry(self, execution: WorkflowExecution) -> None:
        policy = self._policy

        def exhausted(_: RetryCallState) -> bool:
            return execution.attempts >= policy.max_attempts

        def log_failure(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            logger.log(
                logging.WARNING if execution.attempts < policy.max_attempts else logging.ERROR,
                "workflow %r attempt %d of %d failed: %s",
                execution.id,
                execution.attempts,
                policy.max_attempts,
                error,
                extra=_extra(execution),
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StepRaised),
            stop=exhausted,
            wait=policy.fast.wait(),
            before_sleep=log_failure,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            if execution.attempts < policy.max_attempts:
                await self._sleep(policy.fast.initial)
                async for attempt in retrying:
                    with attempt:
                        await self._paced_attempt(execution)
                return
        except StepRaised:
            pass  # attempts exhausted: fall through to the dead letter
        await self._give_up(execution)

    async def _paced_attempt(self, execution: WorkflowExecution) -> None:
        if self._gate.is_open:
            await self._attempt(execution)
            return
        async with self._probe:  # slow mode: one probe at a time
            if not self._gate.is_open:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gate.wait_open(), self._policy.slow_interval)
            if not self._gate.is_open:
                logger.info("probing with workflow %r", execution.id, extra=_extra(execution))
                await self._attempt(execution)
                return
        await self._attempt(execution)


def _extra(execution: WorkflowExecution) -> dict[str, object]:
    return {
        "workflow_id": execution.id,
        "workflow_type": execution.definition.type,
        "partition": execution.partition,
    }
