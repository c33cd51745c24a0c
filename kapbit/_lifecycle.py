"""The one lifecycle convention: ``await x.start()`` / ``await x.close()``, or ``async with``.

Every long-lived kapbit object (the instance, repositories, the projector, read models,
test brokers) derives from :class:`AsyncResource`. The tasks an object owns run in a
:class:`TaskHost` (an :class:`asyncio.TaskGroup`) that lives from the owner's start to its
close; the supervisor's workflows, many and independent, in a :class:`TaskSet`. See
docs/ARCHITECTURE.md, "Lifecycle and ownership".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from kapbit._log import fields

logger = logging.getLogger("kapbit")

_T = TypeVar("_T")

#: How long a close waits for cancelled tasks before abandoning them.
CANCEL_GRACE = 1.0

#: A task host drops its finished tasks once it holds this many (or twice as many as
#: were running at the last drop): a sweep now and then instead of a done callback per task.
_SWEEP_AT = 256


class Closing:
    """``async with`` closes the object on the way out: ``await close()``.

    For objects that need no start (a factory of started things); others derive from
    :class:`AsyncResource`.
    """

    async def close(self) -> None:
        """Release what the object holds; safe to call more than once."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncResource(Closing):
    """``start()`` acquires, ``close()`` releases; ``async with`` does both.

    ``close()`` must be safe to call more than once and after a failed ``start()``.
    """

    async def start(self) -> None:
        """Acquire what the object needs (connections, tasks)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self


class _Tasks:
    """What both hosts of tasks share: the set of tasks (swept now and then) and waiting."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()  # running ones, and some finished
        self._sweep_at = _SWEEP_AT

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        """The tasks still running."""
        return frozenset(self._running())

    def __len__(self) -> int:
        return len(self._running())

    def _running(self) -> list[asyncio.Task[Any]]:
        return [task for task in self._tasks if not task.done()]

    def _add(self, task: asyncio.Task[Any]) -> None:
        tasks = self._tasks
        tasks.add(task)
        if len(tasks) >= self._sweep_at:
            self._tasks = self._drop_finished(tasks)
            self._sweep_at = max(_SWEEP_AT, 2 * len(self._tasks))

    def _drop_finished(self, tasks: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
        """The running ones of ``tasks``; a finished one that raised is logged."""
        running: set[asyncio.Task[Any]] = set()
        for task in tasks:
            if not task.done():
                running.add(task)
            elif not task.cancelled() and task.exception() is not None:
                logger.error(
                    "%s: task %s failed",
                    self._name,
                    task.get_name(),
                    exc_info=task.exception(),
                    extra=fields(),
                )
        return running

    async def wait(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for the running tasks to end by themselves."""
        running = self._running()
        if running:
            await asyncio.wait(running, timeout=timeout)

    def _abandons(self, count: int, grace: float) -> bool:
        logger.error(
            "%s abandons %d tasks that ignored cancellation for %.1f s",
            self._name,
            count,
            grace,
            extra=fields(),
        )
        return False


class TaskHost(_Tasks):
    """The tasks one owner runs, in one :class:`asyncio.TaskGroup` held by a host task
    that lives from the owner's start to its close.

    :meth:`spawn` adds a task from anywhere (also from plain functions) while the host
    runs; :meth:`close` cancels what is left and waits for it, up to a grace period: a
    task that ignores cancellation (a step swallowing it) is abandoned, as a crash would
    leave it, so closing stays bounded.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._group: asyncio.TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the host task and wait until the group accepts tasks."""
        ready = asyncio.Event()
        self._host = asyncio.create_task(self._run(ready), name=self._name)
        await ready.wait()

    async def _run(self, ready: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            ready.set()
            await asyncio.Event().wait()  # until cancelled by close() or abort()

    def spawn(self, coro: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Task[_T]:
        """Run ``coro`` in the group. It must not raise (but for cancellation): an error
        would cancel its siblings, so a task reports its outcome as its result."""
        if self._group is None:
            coro.close()
            raise RuntimeError(f"{self._name} is not running")
        task = self._group.create_task(coro, name=name)
        self._add(task)
        return task

    async def close(self, grace: float) -> bool:
        """Cancel every task and wait up to ``grace`` seconds; ``False`` when some ignored
        cancellation and were abandoned."""
        host = self._host
        if host is None:
            return True
        self._group = None
        host.cancel()
        done, _ = await asyncio.wait([host], timeout=grace)
        if done:
            if not host.cancelled() and host.exception() is not None:
                logger.error("%s failed", self._name, exc_info=host.exception(), extra=fields())
            return True
        return self._abandons(len(self._running()), grace)

    def abort(self) -> None:
        """Cancel every task at once without waiting (a crash)."""
        self._group = None
        for task in self._tasks:
            task.cancel()
        if self._host is not None:
            self._host.cancel()


class TaskSet(_Tasks):
    """Many independent short tasks one owner runs (a task per workflow): plain tasks the
    owner cancels and waits for at its close, as :class:`TaskHost` does, but without a
    :class:`asyncio.TaskGroup`. A group adds a done callback to every task (a loop callback
    per workflow, measurable on the hot path) and would cancel every workflow when one
    task failed. A task reports its outcome as its result; one that raised anyway is
    logged once the set drops it (in a sweep, or at close).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._open = False
        # The loop the set runs on, kept at start: looking it up per task costs a
        # getpid() system call (asyncio checks the process on every lookup).
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Accept tasks from now on."""
        self._loop = asyncio.get_running_loop()
        self._open = True

    def spawn(self, coro: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Task[_T]:
        """Run ``coro`` as a task of the set."""
        loop = self._loop
        if not self._open or loop is None:
            coro.close()
            raise RuntimeError(f"{self._name} is not running")
        task = loop.create_task(coro, name=name)
        self._add(task)
        return task

    async def close(self, grace: float) -> bool:
        """Cancel every task and wait up to ``grace`` seconds; ``False`` when some ignored
        cancellation and were abandoned."""
        self._open = False
        running = self._running()
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=grace)
        self._tasks = self._drop_finished(self._tasks)
        return not self._tasks or self._abandons(len(self._tasks), grace)

    def abort(self) -> None:
        """Cancel every task at once without waiting (a crash)."""
        self._open = False
        for task in self._tasks:
            task.cancel()
