"""Memory of sleeping workflows inside a running instance, and the tasks while they sleep.

Starts ``N`` workflows of a two-step definition on the in-memory repository whose first
step returns ``Sleep(days=1)``, waits until all sleep, and reports with tracemalloc the
memory the instance holds per sleeping workflow (timer queue entry, the workflow's state
kept for waking, its id in the idempotency window and the checkpointer; the log itself,
held by the in-memory repository, is measured apart and not counted), the asyncio tasks
alive while they sleep, and the time to wake them all.

Usage: ``python benchmarks/bench_sleeping.py [--workflows N]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc
from datetime import UTC, datetime, timedelta

from _common import machine, machine_line

from kapbit import Definition, Kapbit, Options, Progress, Sleep, Step, Success
from kapbit.repository import MemRepository
from kapbit.testing import ManualClock


async def nap(order: dict[str, int], _progress: Progress) -> Sleep[int]:
    return Sleep(timedelta(days=1), value=order["n"])


async def wake(order: dict[str, int], _progress: Progress) -> Success[int]:
    return Success(order["n"] + 1)


NAPPER = Definition(
    "napper",
    steps=[Step(nap), Step(wake)],
    result=lambda _order, progress: progress.value(1),
    input_type=dict[str, int],
    outcome_type=int,
    result_type=int,
)


def log_bytes(repo: MemRepository) -> int:
    """What the in-memory log holds (records and their values), not the instance's."""
    return sum(
        r.__sizeof__() + len(r.value) + len(r.key) + 49 for r in repo.records()
    )  # 49: a str header


async def run(count: int) -> None:
    clock = ManualClock(datetime(2026, 11, 21, tzinfo=UTC))
    repo = MemRepository(partitions=8)
    options = Options(
        clock=clock, max_workflows=10_000, max_sleeping=count + 10_000, idempotency_window=count
    )
    async with Kapbit([NAPPER], repo, options=options) as kbit:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        for n in range(count):
            await kbit.start_workflow(NAPPER, f"nap-{n:012d}", {"n": n})  # handle not kept
        while kbit.stats.sleeping < count:  # noqa: ASYNC110 - the engine has no event for it
            await asyncio.sleep(0.01)
        elapsed_start = time.perf_counter() - started
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        log = log_bytes(repo)
        tasks = len(asyncio.all_tasks())
        per = (after - before - log) / count
        woken_at = time.perf_counter()
        clock.advance(timedelta(days=1).total_seconds())
        results = await asyncio.gather(
            *(kbit.wait_result(f"nap-{n:012d}", None) for n in range(count))
        )
        assert results == [n + 1 for n in range(count)]
        elapsed_wake = time.perf_counter() - woken_at
    print(machine_line(machine()))
    print(f"{'sleeping workflows':<34}{count:>14,}")
    print(f"{'instance memory per sleeping wf':<34}{per:>12,.0f} B")
    print(f"{'  (log, not counted)':<34}{log / count:>12,.0f} B")
    print(f"{'asyncio tasks while they sleep':<34}{tasks:>14,}")
    print(f"{'start + sleep, workflows/s':<34}{count / elapsed_start:>14,.0f}")
    print(f"{'wake + finish, workflows/s':<34}{count / elapsed_wake:>14,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(run(args.workflows))


if __name__ == "__main__":
    main()
