"""kapbit._lifecycle: the task hosts owners run their tasks in, and the fence."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest

from kapbit import Fenced
from kapbit._lifecycle import AsyncResource, TaskHost, TaskSet
from kapbit.fencing import Fence

HostType = type[TaskHost] | type[TaskSet]
HOSTS = pytest.mark.parametrize("host_type", [TaskHost, TaskSet])


@HOSTS
async def test_a_task_aborted_before_it_ran_is_cancelled_and_the_host_ends(
    host_type: type[TaskHost | TaskSet],
) -> None:
    """A workflow submitted and aborted in the same loop turn: its caller, awaiting the
    task, learns it was cancelled instead of waiting forever."""
    host = host_type("test")
    await host.start()
    task = host.spawn(asyncio.sleep(10, "never"))
    host.abort()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), 1)
    assert task.cancelled()
    assert await host.close(1.0)


@HOSTS
async def test_close_cancels_the_rest_and_abandons_a_task_that_ignores_cancellation(
    host_type: type[TaskHost | TaskSet],
) -> None:
    host = host_type("test")
    await host.start()
    release, running = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        running.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallowed, as a badly written step does

    polite = host.spawn(asyncio.sleep(10))
    host.spawn(stubborn())
    await asyncio.wait_for(running.wait(), 1)  # cancelled before its first step, it would end
    assert await host.close(0.05) is False
    assert polite.cancelled()
    release.set()
    await asyncio.sleep(0)


@HOSTS
async def test_nothing_can_be_spawned_once_closed(host_type: HostType) -> None:
    host = host_type("test")
    await host.start()
    assert await host.close(1.0)
    with pytest.raises(RuntimeError, match="not running"):
        host.spawn(asyncio.sleep(0))


async def test_fence_records_the_first_refusal_and_not_its_own_stop() -> None:
    fence = Fence()
    fence.check()
    fence.stop("closed")
    with pytest.raises(Fenced, match="closed") as stopped:
        fence.check()
    fence.fenced(stopped.value)  # the emitter re-raising the stop is not a fencing
    assert fence.error is None
    first, second = Fenced("node b claimed"), Fenced("node c claimed")
    fence.fenced(first)
    fence.fenced(second)
    assert await asyncio.wait_for(fence.wait(), 1) is first
    with pytest.raises(Fenced, match="node b"):
        fence.check()


async def test_async_with_starts_and_closes() -> None:
    calls: list[str] = []

    class Resource(AsyncResource):
        async def start(self) -> None:
            calls.append("start")

        async def close(self) -> None:
            calls.append("close")

    async with Resource() as resource:
        assert isinstance(resource, Resource)
    assert calls == ["start", "close"]


@HOSTS
async def test_task_host_counts_running_tasks_and_sweeps_finished_ones(
    host_type: type[TaskHost | TaskSet],
) -> None:
    """Finished tasks leave ``len`` and ``tasks`` at once and the host's memory in sweeps:
    after many short tasks it holds a bounded number, the running ones among them."""
    host = host_type("test")
    await host.start()
    release = asyncio.Event()

    async def blocked() -> None:
        await release.wait()

    async def short(i: int) -> int:
        return i

    try:
        running = [host.spawn(blocked()) for _ in range(3)]
        early = []
        for i in range(2_000):
            task = host.spawn(short(i))
            assert await task == i
            if i < 100:
                early.append(weakref.ref(task))
        del task
        gc.collect()
        assert [ref for ref in early if ref() is not None] == []  # swept, not kept
        assert len(host) == 3
        assert host.tasks == frozenset(running)
        release.set()
        await asyncio.wait_for(host.wait(None), 5)
        assert len(host) == 0
    finally:
        assert await host.close(1.0)


async def test_in_a_task_set_a_task_that_raises_is_logged_and_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tasks report by their result; one that raises anyway leaves its siblings running
    and its error is logged once the set drops it (here: at close)."""
    host = TaskSet("test")
    await host.start()

    async def broken() -> None:
        raise RuntimeError("a bug in a task")

    failed = host.spawn(broken(), name="broken")
    sibling = host.spawn(asyncio.sleep(10, "still running"))
    await asyncio.wait([failed], timeout=1)
    assert failed.done() and not sibling.done()
    with caplog.at_level(logging.ERROR, logger="kapbit"):
        assert await host.close(1.0)
    assert sibling.cancelled()
    assert [r.getMessage() for r in caplog.records] == ["test: task broken failed"]
    assert "a bug in a task" in caplog.text


async def test_in_a_task_host_a_task_that_raises_cancels_its_siblings_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The owner's background tasks share one TaskGroup: one that raises (a bug) stops
    its siblings at once instead of leaving the owner half working; the error is logged
    at close."""
    host = TaskHost("test")
    await host.start()

    async def broken() -> None:
        raise RuntimeError("a bug in a task")

    sibling = host.spawn(asyncio.sleep(10, "still running"))
    failed = host.spawn(broken(), name="broken")
    await asyncio.wait([sibling], timeout=1)
    assert failed.done() and sibling.cancelled()
    with caplog.at_level(logging.ERROR, logger="kapbit"):
        assert await host.close(1.0)
    assert "a bug in a task" in caplog.text
