"""kapbit on the in-memory repository: the 3-step order saga, sequential and 1,000 in flight.

Prints workflows/s, p50/p99 latency and peak memory for both codecs. The steps are async;
``--sync-steps`` runs the same steps as plain functions, which kapbit runs in its thread
pool (the cost of a thread hop per action). ``--otel`` turns on kapbit.otel with the
OpenTelemetry SDK's in-memory span exporter and metric reader (the cost of tracing).
Usage: ``python benchmarks/bench_mem.py [--workflows N] [--sync-steps] [--otel]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tracemalloc
from collections.abc import Awaitable, Callable

from _common import RunStats, drive, machine, machine_line, order, peak_rss_mib, saga

from kapbit import Kapbit, Options
from kapbit.codecs import Codec, JsonCodec, MsgpackCodec
from kapbit.instrumentation import Instrumentation
from kapbit.repository import MemRepository


async def run(
    count: int, codec: Codec, sync: bool = False, otel: bool = False
) -> list[tuple[str, RunStats]]:
    """A warm-up, then ``count`` workflows sequentially and ``count`` with 1,000 in flight."""
    options = Options(
        max_workflows=2_000,
        idempotency_window=count,
        instrumentation=in_memory_otel() if otel else None,
    )
    definition = saga(sync)
    async with Kapbit([definition], MemRepository(partitions=8), codec, options=options) as kbit:

        def runner(prefix: str) -> Callable[[int], Awaitable[object]]:
            return lambda i: kbit.exec_workflow(f"{prefix}-{i}", "order", order(i, "ok", prefix))

        await drive(runner("warm"), 1_000, 1)
        gc.collect()
        return [
            ("sequential", await drive(runner("seq"), count, 1)),
            ("1,000 in flight", await drive(runner("par"), count, 1_000)),
        ]


def in_memory_otel() -> Instrumentation:
    """kapbit.otel on SDK providers that keep spans and metrics in memory."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kapbit.otel import OpenTelemetry

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return OpenTelemetry(tracer_provider, meter_provider)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflows", type=int, default=20_000)
    parser.add_argument("--sync-steps", action="store_true", help="plain def steps (threads)")
    parser.add_argument("--otel", action="store_true", help="kapbit.otel, in-memory exporters")
    args = parser.parse_args()
    print(machine_line(machine()))
    kind = "sync" if args.sync_steps else "async"
    traced = ", OpenTelemetry on (in-memory exporters)" if args.otel else ""
    print(
        f"kapbit on MemRepository, 3-step saga ({kind} steps{traced}), "
        f"{args.workflows} workflows per run"
    )
    print(f"{'codec':8} {'mode':16} {'workflows/s':>12} {'p50 us':>9} {'p99 us':>9}")
    for codec in (JsonCodec(), MsgpackCodec()):
        for mode, stats in asyncio.run(run(args.workflows, codec, args.sync_steps, args.otel)):
            p50, p99 = stats.percentile(0.5) * 1e6, stats.percentile(0.99) * 1e6
            print(f"{codec.name:8} {mode:16} {stats.rate:12,.0f} {p50:9.1f} {p99:9.1f}")
    tracemalloc.start()
    asyncio.run(run(args.workflows, JsonCodec(), args.sync_steps, args.otel))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"peak traced memory of one json run: {peak / 2**20:.1f} MiB")
    print(f"process peak RSS: {peak_rss_mib():.1f} MiB (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
