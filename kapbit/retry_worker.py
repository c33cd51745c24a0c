"""The retry worker: resumes workflows whose step raised, and gives up on them in the end.

Fast mode retries each workflow with capped exponential backoff (tenacity), all of them
concurrently. While the entry gate is closed (a breaker is open) it is in slow mode: one
workflow at a time probes the dependency, each probe after ``slow_interval``; the others
wait for their turn (first come, first served) or for the gate to reopen. A probe that
completes a workflow reopens the gate and everyone returns to fast mode at once. Every
attempt is recorded in the log first (``WorkflowRetry``), so attempt counts survive
restarts; after ``max_attempts`` the workflow is dead-lettered. See docs/ARCHITECTURE.md,
"Failure handling".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from kapbit._lifecycle import CANCEL_GRACE, TaskHost
from kapbit._log import execution_fields, raised_fields
from kapbit.errors import Fenced, InstanceClosed
from kapbit.execution import StepRaised, WorkflowExecution
from kapbit.gate import EntryGate
from kapbit.options import RetryPolicy

logger = logging.getLogger("kapbit.retry")


class Attempts(Protocol):
    """What the retry worker asks of whoever supervises the workflows."""

    async def attempt(self, execution: WorkflowExecution) -> None:
        """Run one attempt: record it, resume the execution, finish it on success; raise
        :class:`~kapbit.execution.StepRaised` when a step raised again."""

    async def give_up(self, execution: WorkflowExecution) -> None:
        """Terminate an execution that used up its attempts (dead letter)."""


class _Scheduled(Exception):
    """Stands for the failure that brought the workflow here (tenacity's attempt 1)."""


class RetryWorker:
    """Owns the workflows waiting for another attempt, one task each (in a task group
    from :meth:`start` to :meth:`close`).

    ``probing`` is the id of the workflow currently probing in slow mode (``None`` when
    none is). ``sleep`` waits out backoffs and the slow interval (tests inject their own).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        gate: EntryGate,
        attempts: Attempts,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._policy = policy
        self._gate = gate
        self._attempts_of = attempts
        self._sleep = sleep
        self.probing: str | None = None
        self._queue: deque[tuple[str, asyncio.Future[None]]] = deque()
        self._host = TaskHost("kapbit-retry-worker")
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._tasks

    def schedule(self, execution: WorkflowExecution) -> None:
        """Take over ``execution`` until it terminates or the worker stops."""
        if execution.id in self._tasks:
            raise RuntimeError(f"workflow {execution.id!r} is already scheduled for retry")
        task = self._host.spawn(self._retry(execution), name=f"kapbit-retry-{execution.id}")
        self._tasks[execution.id] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._tasks.get(execution.id) is finished:
                del self._tasks[execution.id]

        task.add_done_callback(done)

    def cancel(self, workflow_id: str) -> None:
        """Stop retrying ``workflow_id`` (its partition was given up)."""
        task = self._tasks.pop(workflow_id, None)
        if task is not None:
            task.cancel()

    async def start(self) -> None:
        """Accept workflows to retry."""
        await self._host.start()

    async def close(self, grace: float = CANCEL_GRACE) -> bool:
        """Cancel every pending retry and wait up to ``grace`` seconds; the workflows stay
        open in the log. ``False`` when a retry ignored cancellation and was abandoned."""
        return await self._host.close(grace)

    def abort(self) -> None:
        """Cancel every pending retry without waiting."""
        self._host.abort()

    async def _retry(self, execution: WorkflowExecution) -> None:
        try:
            if execution.attempts < self._policy.max_attempts:
                try:
                    await self._attempts(execution)
                    return
                except StepRaised:
                    pass  # attempts exhausted: dead letter
            await self._attempts_of.give_up(execution)
        except (Fenced, InstanceClosed) as exc:
            logger.debug(
                "retries of %r stopped: %s", execution.id, exc, extra=execution_fields(execution)
            )
        except Exception:
            # An engine or storage error outside the step (not a StepRaised): retrying could
            # repeat a finished workflow, so leave it open for the next instance and say so.
            logger.exception(
                "retrying workflow %r failed unexpectedly; it stays open until the next start",
                execution.id,
                extra=execution_fields(execution),
            )

    async def _attempts(self, execution: WorkflowExecution) -> None:
        policy = self._policy

        def exhausted(_: RetryCallState) -> bool:
            return execution.attempts >= policy.max_attempts

        def log_failure(state: RetryCallState) -> None:
            if state.attempt_number == 1:
                return  # the failure that scheduled it, logged where it happened
            error = state.outcome.exception() if state.outcome else None
            logger.warning(
                "workflow %r attempt %d of %d failed, next in %.3f s: %s",
                execution.id,
                execution.attempts,
                policy.max_attempts,
                state.upcoming_sleep,
                error,
                extra=raised_fields(execution, error),
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type((StepRaised, _Scheduled)),
            stop=exhausted,
            wait=policy.fast.wait(),
            before_sleep=log_failure,
            sleep=self._sleep,
            reraise=True,
        )
        scheduled = True
        async for attempt in retrying:
            with attempt:
                if scheduled:
                    scheduled = False
                    raise _Scheduled  # wait the first backoff before attempt 1
                await self._paced_attempt(execution)

    async def _paced_attempt(self, execution: WorkflowExecution) -> None:
        """Attempt at once while the gate is open; in slow mode, wait to be the probe."""
        gate = self._gate
        while not gate.is_open:
            if not await self._become_probe(execution):
                continue  # the gate reopened meanwhile: look again
            try:
                await self._first(self._sleep(self._policy.slow_interval), gate.wait_open())
                if not gate.is_open:
                    logger.info(
                        "gate closed (%s): probing with workflow %r",
                        gate.reason,
                        execution.id,
                        extra=execution_fields(execution),
                    )
                    await self._attempts_of.attempt(execution)
                    return
            finally:
                self._pass_probe()
        await self._attempts_of.attempt(execution)

    async def _become_probe(self, execution: WorkflowExecution) -> bool:
        """Wait for the probe role (first come, first served): ``True`` once it is held,
        ``False`` if the gate reopened first."""
        if self.probing is None:
            self.probing = execution.id
            return True
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (execution.id, turn)
        self._queue.append(entry)
        try:
            await self._first(turn, self._gate.wait_open())
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._pass_probe()  # handed over as we were cancelled: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._queue.remove(entry)
        return turn.done() and not turn.cancelled()

    def _pass_probe(self) -> None:
        """Give the probe role to the workflow that has waited longest for it."""
        self.probing = None
        while self._queue:
            workflow_id, turn = self._queue.popleft()
            if not turn.done():
                self.probing = workflow_id
                turn.set_result(None)
                return

    @staticmethod
    async def _first(*awaitables: Awaitable[object]) -> None:
        """Wait until the first of ``awaitables`` completes; cancel the others."""
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
