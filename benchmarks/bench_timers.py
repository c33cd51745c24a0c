"""Memory and speed of the timer queue: bytes per sleeping workflow, and tasks while they sleep.

A sleeping workflow keeps one :class:`kapbit.timers.SleepingWorkflow` (fire time,
partition, created offset, workflow id, step index) in the instance's one
:class:`~kapbit.timers.TimerQueue`: a heap slot and an index slot. This script measures
with tracemalloc, per sleeping workflow:

* the entry alone, as the msgspec Struct kapbit uses and as a ``__slots__`` class for
  comparison (ids built beforehand, so not counted);
* the queue holding the entries (entry + heap + index), ids not counted: the engine
  shares the id string with the idempotency window;
* the same with each id a fresh string of its own, as decoded from the log.

It also times arming and firing every entry, and counts the asyncio tasks while all of
them sleep: the queue's one consumer and the one clock sleep it waits on, whatever the
number of entries.

Usage: ``python benchmarks/bench_timers.py [--sizes N ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime

from kapbit.testing import ManualClock
from kapbit.timers import SleepingWorkflow, TimerQueue

START = datetime(2026, 11, 21, tzinfo=UTC).timestamp()


class SlotsSleeping:
    """The same five fields as a plain ``__slots__`` class, for comparison."""

    __slots__ = ("created_offset", "fire_at", "partition", "step", "workflow_id")

    def __init__(
        self, fire_at: float, partition: int, created_offset: int, workflow_id: str, step: int
    ) -> None:
        self.fire_at = fire_at
        self.partition = partition
        self.created_offset = created_offset
        self.workflow_id = workflow_id
        self.step = step


def workflow_id(n: int) -> str:
    return f"trial-{n:012d}"  # 18 characters, as a typical business id


def fire_times(count: int) -> list[float]:
    rng = random.Random(14)
    return [START + rng.uniform(0, 30 * 86400) for _ in range(count)]


def measure(build: Callable[[], object]) -> int:
    """Bytes still allocated by ``build()`` while its result is alive."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = build()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del kept
    gc.collect()
    return used


def rows(count: int) -> list[tuple[str, float]]:
    ids = [workflow_id(n) for n in range(count)]
    times = fire_times(count)

    def args(n: int) -> tuple[float, int, int, str, int]:
        # realistic offsets (not small cached ints); steps and partitions are small
        return (times[n], n % 12, 1_000_000 + n * 5, ids[n], 3)

    def structs() -> object:
        return [SleepingWorkflow(*args(n)) for n in range(count)]

    def slots() -> object:
        return [SlotsSleeping(*args(n)) for n in range(count)]

    def queue_shared_ids() -> object:
        queue = TimerQueue(ManualClock(START))
        for n in range(count):
            queue.add(SleepingWorkflow(*args(n)))
        return queue

    def queue_own_ids() -> object:
        queue = TimerQueue(ManualClock(START))
        for n in range(count):
            queue.add(SleepingWorkflow(times[n], n % 12, 1_000_000 + n * 5, workflow_id(n), 3))
        return queue

    list_slot = measure(lambda: [None] * count)  # the measuring list's own slots
    return [
        ("entry: msgspec Struct (kapbit)", (measure(structs) - list_slot) / count),
        ("entry: __slots__ class", (measure(slots) - list_slot) / count),
        ("queue: entry + heap + index", measure(queue_shared_ids) / count),
        ("queue, own 18-char id string", measure(queue_own_ids) / count),
    ]


async def speed(count: int) -> tuple[float, float, int]:
    """Seconds to arm ``count`` timers, seconds to fire them all, tasks while sleeping."""
    clock = ManualClock(START)
    queue = TimerQueue(clock)
    times = fire_times(count)
    began = time.perf_counter()
    for n in range(count):
        queue.add(SleepingWorkflow(times[n], n % 12, 1_000_000 + n * 5, workflow_id(n), 3))
    armed = time.perf_counter() - began
    consumer = asyncio.create_task(queue.wait_due())
    await clock.wait_for_sleepers(1)
    tasks = len(asyncio.all_tasks()) - 1  # all but this coroutine's own task
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    clock.advance(31 * 86400)
    began = time.perf_counter()
    fired = 0
    while len(queue):
        fired += len(await queue.wait_due(limit=10_000))
    drained = time.perf_counter() - began
    assert fired == count
    return armed, drained, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    sizes = parser.parse_args().sizes
    print(f"{'sleeping workflows':>18}  {'what':<32} {'bytes each':>10}")
    for count in sizes:
        for what, per in rows(count):
            print(f"{count:>18,}  {what:<32} {per:>10.1f}")
    print()
    print(f"{'sleeping workflows':>18}  {'arm (s)':>8} {'fire all (s)':>12} {'tasks asleep':>12}")
    for count in sizes:
        armed, drained, tasks = asyncio.run(speed(count))
        print(f"{count:>18,}  {armed:>8.3f} {drained:>12.3f} {tasks:>12}")


if __name__ == "__main__":
    main()
