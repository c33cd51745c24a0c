"""kapbit on Kafka against the raw aiokafka producer, on the same broker in the same run.

Starts a local broker (or uses ``--bootstrap`` / ``KAPBIT_TEST_BOOTSTRAP``), then prints the
raw producer's events/s (pipelined ``send()``, acks=all: the baseline) and kapbit's
workflows/s for the 3-step order saga (5 events each) sequentially and with 1,000 in
flight, p50/p99 latency, the CPU microseconds kapbit's process used per workflow (the broker
runs in its own process and is not counted) and kapbit's event rate as a share of the raw
producer's.
``--snapshots off`` runs kapbit with offset-only checkpoints (snapshots are on by default).
With ``PYTHONPATH`` naming an older checkout the same script measures that kapbit: the way
before/after figures are taken in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from _common import EVENTS_PER_WORKFLOW, SAGA, RunStats, drive, machine, machine_line, order
from aiokafka import AIOKafkaProducer

from kapbit import CheckpointPolicy, Kapbit, Options
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing import LocalBroker

EVENTS = EVENTS_PER_WORKFLOW["ok"]
T = TypeVar("T")


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
    bootstrap: str, partitions: int, count: int, in_flight: int, snapshots: bool
) -> RunStats:
    repo = KafkaRepository(bootstrap, f"bench-kapbit-{uuid.uuid4().hex[:8]}", partitions=partitions)
    # Only "off" names the policy, so the script also runs an older kapbit (PYTHONPATH).
    checkpoints = {} if snapshots else {"checkpoints": CheckpointPolicy(snapshots=False)}
    options = Options(max_workflows=in_flight + 10, **checkpoints)
    async with Kapbit([SAGA], repo, options=options) as kbit:
        return await drive(
            lambda i: kbit.exec_workflow(f"w{i}", "order", order(i, "ok")), count, in_flight
        )


async def on_broker(bootstrap: str | None, measure: Callable[[str], Awaitable[T]]) -> T:
    """Run ``measure`` on the given broker, or on a fresh local one: the memory-only test
    broker slows down as it fills, so each measurement gets an empty one."""
    if bootstrap is not None:
        return await measure(bootstrap)
    async with LocalBroker() as broker:
        return await measure(broker.bootstrap_servers)


async def main(
    bootstrap: str | None, partitions: int, workflows: int, sequential: int, snapshots: bool
) -> None:
    raw = await on_broker(bootstrap, lambda b: raw_producer(b, partitions, workflows * EVENTS))
    seq = await on_broker(bootstrap, lambda b: kapbit_run(b, partitions, sequential, 1, snapshots))
    par = await on_broker(
        bootstrap, lambda b: kapbit_run(b, partitions, workflows, 1_000, snapshots)
    )
    print(machine_line(machine()))
    where = bootstrap or "a fresh local tansu broker per run"
    print(
        f"broker: {where}; {partitions} partitions; order saga, 5 events per workflow; "
        f"snapshots {'on' if snapshots else 'off'}"
    )
    header = f"{'run':28} {'workflows/s':>12} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8}"
    print(f"{header} {'CPU us/wf':>10}")
    print(f"{'raw aiokafka producer':28} {'':>12} {raw:10,.0f} {'':>8} {'':>8}")
    for name, stats in (("kapbit sequential", seq), ("kapbit 1,000 in flight", par)):
        p50, p99 = stats.percentile(0.5) * 1e3, stats.percentile(0.99) * 1e3
        events = stats.rate * EVENTS
        cpu = stats.cpu_per_workflow_us
        print(f"{name:28} {stats.rate:12,.0f} {events:10,.0f} {p50:8.2f} {p99:8.2f} {cpu:10,.0f}")
    print(f"kapbit event rate / raw producer (1,000 in flight): {par.rate * EVENTS / raw:.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default=os.environ.get("KAPBIT_TEST_BOOTSTRAP"))
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--workflows", type=int, default=20_000)
    parser.add_argument("--sequential", type=int, default=2_000)
    parser.add_argument("--snapshots", choices=("on", "off"), default="on")
    args = parser.parse_args()
    asyncio.run(
        main(
            args.bootstrap,
            args.partitions,
            args.workflows,
            args.sequential,
            args.snapshots == "on",
        )
    )
