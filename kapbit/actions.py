"""Running user actions: async ones on the event loop, sync ones in a bounded thread pool.

A sync action may block (a database driver, ``requests``, ``time.sleep``); run on the loop
it would stall every other workflow of the instance. :class:`ActionRunner` runs it in a
thread pool instead, with the step's :func:`kapbit.context` copied into the thread, and
enforces a step's timeout: an overrunning action is cancelled and reported as
:class:`~kapbit.errors.StepTimedOut`. A thread cannot be stopped, so a sync action that
overran keeps its thread until it returns, and its result is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from kapbit.clock import SYSTEM_CLOCK, Clock
from kapbit.errors import StepTimedOut
from kapbit.step_context import StepFields


class ActionRunner:
    """Runs step actions for one instance; owns the default thread pool it starts lazily.

    ``executor`` replaces the default pool of ``threads`` threads; the runner shuts down
    only a pool it started itself. Step timeouts wait on ``clock`` (monotonic time), so a
    test moves them with a :class:`kapbit.testing.ManualClock`.
    """

    def __init__(
        self,
        node_id: str,
        executor: Executor | None = None,
        threads: int = 32,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.node_id = node_id
        self._clock = clock
        self._executor = executor
        self._owned: ThreadPoolExecutor | None = None
        self._threads = threads

    def start(
        self,
        fn: Callable[..., Any],
        is_async: bool,
        args: tuple[Any, ...],
        context: StepFields,
        timeout: float | None,
    ) -> Awaitable[Any]:
        """The awaitable that runs ``fn(*args)``; it raises StepTimedOut after ``timeout``.

        Await it with ``context`` set in :data:`~kapbit.step_context.CURRENT_STEP` (a sync
        action's thread gets a copy of it). An async action without a timeout is returned
        as it is: the common case costs no frame of its own.
        """
        if is_async and timeout is None:
            awaitable: Awaitable[Any] = fn(*args)
            return awaitable
        call = self._call(fn, is_async, args)
        return call if timeout is None else self._timed(call, context, timeout)

    async def _timed(self, call: Awaitable[Any], context: StepFields, timeout: float) -> Any:
        """Await ``call``, raising StepTimedOut once it has taken ``timeout`` seconds of the
        clock's time (the action is cancelled then, and awaited until it has stopped)."""
        action = asyncio.ensure_future(call)
        timer = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            await asyncio.wait((action, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not action.done():
                action.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await action
        if action.cancelled():
            workflow_id, _, step_name, _, phase, _, _ = context
            raise StepTimedOut(workflow_id, step_name, phase, timeout)
        return action.result()

    async def _call(self, fn: Callable[..., Any], is_async: bool, args: tuple[Any, ...]) -> Any:
        if is_async:
            return await fn(*args)
        loop = asyncio.get_running_loop()
        # A cancelled future (timeout, close) drops the thread's late result.
        result = await loop.run_in_executor(self._pool(), contextvars.copy_context().run, fn, *args)
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            result = await result
        return result

    def _pool(self) -> Executor:
        if self._executor is not None:
            return self._executor
        if self._owned is None:
            self._owned = ThreadPoolExecutor(self._threads, thread_name_prefix="kapbit-action")
        return self._owned

    def close(self) -> None:
        """Shut down the pool this runner started, without waiting for running actions."""
        if self._owned is not None:
            self._owned.shutdown(wait=False, cancel_futures=True)
            self._owned = None
