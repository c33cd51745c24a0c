"""kapbit on the in-memory repository: a 3-step saga, sequential and 1,000 in flight.

Prints workflows/s, p50/p99 latency and peak memory (tracemalloc of the run, and the
process's peak RSS). Usage: ``python benchmarks/bench_mem.py [--workflows N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import sys
import time
import tracemalloc

from kapbit import Definition, Kapbit, MemRepository, Options, Progress, Step, Success
from kapbit.codecs import Codec, JsonCodec, MsgpackCodec


def _step(_input: dict[str, int], _progress: Progress) -> Success[int]:
    return Success(1)


SAGA = Definition(
    "saga",
    steps=[Step(_step, _step), Step(_step, _step), Step(_step, _step)],
    result=lambda input, progress: sum(progress.values()),
    input_type=dict[str, int],
    outcome_type=int,
    result_type=int,
)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def _sequential(kbit: Kapbit, count: int, prefix: str) -> tuple[float, list[float]]:
    latencies = []
    clock = time.perf_counter
    started = clock()
    for i in range(count):
        t0 = clock()
        await kbit.exec_workflow(f"{prefix}-{i}", "saga", {"amount": i})
        latencies.append(clock() - t0)
    return clock() - started, latencies


async def _concurrent(
    kbit: Kapbit, count: int, in_flight: int, prefix: str
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    clock = time.perf_counter
    next_id = iter(range(count))

    async def worker() -> None:
        for i in next_id:
            t0 = clock()
            await kbit.exec_workflow(f"{prefix}-{i}", "saga", {"amount": i})
            latencies.append(clock() - t0)

    started = clock()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return clock() - started, latencies


async def run(count: int, codec: Codec) -> list[tuple[str, float, float, float]]:
    repo = MemRepository(partitions=8)
    options = Options(max_workflows=2_000, idempotency_window=count)
    rows = []
    async with Kapbit([SAGA], repo, codec, options=options) as kbit:
        await _sequential(kbit, 1_000, "warm")
        gc.collect()
        elapsed, latencies = await _sequential(kbit, count, "seq")
        latencies.sort()
        rows.append(
            (
                "sequential",
                count / elapsed,
                _percentile(latencies, 0.5),
                _percentile(latencies, 0.99),
            )
        )
        elapsed, latencies = await _concurrent(kbit, count, 1_000, "par")
        latencies.sort()
        rows.append(
            (
                "1,000 in flight",
                count / elapsed,
                _percentile(latencies, 0.5),
                _percentile(latencies, 0.99),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflows", type=int, default=20_000)
    args = parser.parse_args()
    print(
        f"kapbit on MemRepository, 3-step saga, {args.workflows} workflows per run, "
        f"Python {sys.version.split()[0]}"
    )
    print(f"{'codec':8} {'mode':16} {'workflows/s':>12} {'p50 us':>9} {'p99 us':>9}")
    for codec in (JsonCodec(), MsgpackCodec()):
        for mode, rate, p50, p99 in asyncio.run(run(args.workflows, codec)):
            print(f"{codec.name:8} {mode:16} {rate:12,.0f} {p50 * 1e6:9.1f} {p99 * 1e6:9.1f}")
    tracemalloc.start()
    asyncio.run(run(args.workflows, JsonCodec()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak traced memory of one json run: {peak / 2**20:.1f} MiB")
    print(f"process peak RSS: {rss:.1f} MiB")


if __name__ == "__main__":
    main()
