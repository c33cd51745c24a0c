"""KafkaRepository alone: the CPU one append costs, without the engine.

Claims every partition of a fresh topic on a fresh local broker (or ``--bootstrap``), then
``--tasks`` tasks append ~120-byte records in turn (each task to one partition, as a
workflow's events go), and prints appends/s and the process CPU microseconds per append
(user + system; the broker runs in its own process and is not counted), per run and the
median. This is the Kafka half of ``bench_kafka.py``'s CPU per workflow (5 appends per
workflow): what a change to ``kapbit/repository/kafka`` moves, measured apart from the
engine. With ``PYTHONPATH`` naming an older checkout (one whose repository has ``claim()``,
from 4f6cc79 on) it measures that one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
import uuid

from _common import machine, machine_line

from kapbit.events import EventKind
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing import LocalBroker

NODE = "bench-node"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_run(bootstrap: str, partitions: int, tasks: int, appends: int) -> tuple[float, float]:
    """(appends/s, CPU us per append) of one run on a new topic."""
    repo = KafkaRepository(bootstrap, f"bench-append-{uuid.uuid4().hex[:8]}", partitions=partitions)
    await repo.start()
    try:
        for partition in range(partitions):
            await repo.claim(partition, NODE, b"{}")
        value = b"x" * 120
        per_task = max(1, appends // tasks)

        async def task(index: int) -> None:
            partition, key = index % partitions, f"w{index}"
            for _ in range(per_task):
                await repo.append(partition, EventKind.STEP_OUTCOME, key, NODE, value)

        cpu, started = _cpu(), time.perf_counter()
        await asyncio.gather(*(task(i) for i in range(tasks)))
        cpu, elapsed = _cpu() - cpu, time.perf_counter() - started
    finally:
        await repo.close()
    total = per_task * tasks
    return total / elapsed, cpu / total * 1e6


async def main(bootstrap: str | None, partitions: int, tasks: int, appends: int, runs: int) -> None:
    results = []
    for _ in range(runs):
        if bootstrap is not None:
            results.append(await one_run(bootstrap, partitions, tasks, appends))
        else:  # the memory-only test broker slows down as it fills: a fresh one per run
            async with LocalBroker() as broker:
                results.append(await one_run(broker.bootstrap_servers, partitions, tasks, appends))
    print(machine_line(machine()))
    where = bootstrap or "a fresh local tansu broker per run"
    print(f"broker: {where}; {partitions} partitions; {tasks} tasks appending in turn")
    print(f"{'run':>6} {'appends/s':>12} {'CPU us/append':>14}")
    for index, (rate, cpu) in enumerate(results, 1):
        print(f"{index:>6} {rate:12,.0f} {cpu:14.2f}")
    rate = statistics.median(r for r, _ in results)
    cpu = statistics.median(c for _, c in results)
    print(f"{'median':>6} {rate:12,.0f} {cpu:14.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default=os.environ.get("KAPBIT_TEST_BOOTSTRAP"))
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=1_000)
    parser.add_argument("--appends", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.bootstrap, args.partitions, args.tasks, args.appends, args.runs))
