"""kapbit on Kafka against the raw aiokafka producer, on the same broker in the same run.

Starts a local broker (or uses ``--bootstrap`` / ``KAPBIT_TEST_BOOTSTRAP``), then prints:
raw producer events/s (pipelined, acks=all, the ceiling), and kapbit workflows/s for a
3-step saga (5 events each) sequentially and with 1,000 in flight, p50/p99 latency, and
kapbit's event rate as a share of the raw producer's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

from aiokafka import AIOKafkaProducer

from kapbit import Definition, Kapbit, Options, Progress, Step, Success
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing import LocalBroker

EVENTS_PER_WORKFLOW = 5  # created, 3 outcomes, result


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


def _p50_p99(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def raw_producer(bootstrap: str, partitions: int, events: int) -> float:
    """Events/s of a pipelined aiokafka producer, acks=all, ~100-byte values with headers."""
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    repo = KafkaRepository(bootstrap, topic, partitions=partitions)  # creates the topic
    await repo.start()
    await repo.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    value = b"x" * 100
    headers = [("kapbit-kind", b"step_outcome"), ("kapbit-node", b"bench")]
    try:
        started = time.perf_counter()
        window = []
        for i in range(events):
            window.append(
                await producer.send(
                    topic, value, key=f"w{i}".encode(), partition=i % partitions, headers=headers
                )
            )
            if len(window) >= 5_000:
                await asyncio.gather(*window)
                window.clear()
        await asyncio.gather(*window)
        return events / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def kapbit_run(
    bootstrap: str, partitions: int, count: int, in_flight: int
) -> tuple[float, float, float]:
    topic = f"bench-kapbit-{uuid.uuid4().hex[:8]}"
    repo = KafkaRepository(bootstrap, topic, partitions=partitions)
    latencies: list[float] = []
    clock = time.perf_counter
    ids = iter(range(count))
    async with Kapbit([SAGA], repo, options=Options(max_workflows=in_flight + 10)) as kbit:

        async def worker() -> None:
            for i in ids:
                t0 = clock()
                await kbit.exec_workflow(f"w{i}", "saga", {"amount": i})
                latencies.append(clock() - t0)

        started = clock()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = clock() - started
    p50, p99 = _p50_p99(latencies)
    return count / elapsed, p50, p99


async def main(bootstrap: str | None, partitions: int, workflows: int, sequential: int) -> None:
    broker = LocalBroker() if bootstrap is None else None
    if broker is not None:
        await broker.start()
        bootstrap = broker.bootstrap_servers
    assert bootstrap is not None
    try:
        raw = await raw_producer(bootstrap, partitions, workflows * EVENTS_PER_WORKFLOW)
        seq = await kapbit_run(bootstrap, partitions, sequential, 1)
        par = await kapbit_run(bootstrap, partitions, workflows, 1_000)
    finally:
        if broker is not None:
            await broker.stop()
    kind = "local tansu" if broker is not None else "given"
    print(
        f"broker: {kind} at {bootstrap}; {partitions} partitions; Python {sys.version.split()[0]}"
    )
    print(f"{'run':28} {'workflows/s':>12} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'raw aiokafka producer':28} {'':>12} {raw:10,.0f} {'':>8} {'':>8}")
    for name, (rate, p50, p99) in (("kapbit sequential", seq), ("kapbit 1,000 in flight", par)):
        events = rate * EVENTS_PER_WORKFLOW
        print(f"{name:28} {rate:12,.0f} {events:10,.0f} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f}")
    ratio = par[0] * EVENTS_PER_WORKFLOW / raw
    print(f"kapbit event rate / raw producer (1,000 in flight): {ratio:.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default=os.environ.get("KAPBIT_TEST_BOOTSTRAP"))
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--workflows", type=int, default=20_000)
    parser.add_argument("--sequential", type=int, default=2_000)
    args = parser.parse_args()
    asyncio.run(main(args.bootstrap, args.partitions, args.workflows, args.sequential))
