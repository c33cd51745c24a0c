"""The latency cost of a forwarded call against a local one, on Kafka.

Starts a local broker (or uses ``--bootstrap`` / ``KAPBIT_TEST_BOOTSTRAP``), runs an owner
instance with a request log (``<topic>-requests``) and a caller that owns no partition
(its calls travel through the request log and are answered by the owner; the result is
read from the log). Both run in this process, each with its own Kafka clients. Prints
workflows/s, p50 and p99 of the 3-step order saga called on the owner (local) and through
the caller (forwarded), in turn and with ``--in-flight`` calls at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid

from _common import SAGA, RunStats, drive, machine, machine_line, order

from kapbit import Kapbit, Options
from kapbit.codecs import JsonCodec
from kapbit.forwarding import Forwarder, RemoteWorkflows
from kapbit.repository.kafka import KafkaRepository, KafkaRequestLog
from kapbit.testing import LocalBroker


async def measure(bootstrap: str, partitions: int, count: int, in_flight: int) -> list[RunStats]:
    topic = f"bench-forward-{uuid.uuid4().hex[:8]}"
    codec = JsonCodec()
    owner = Kapbit(
        [SAGA],
        KafkaRepository(bootstrap, topic, partitions=partitions),
        codec,
        options=Options(max_workflows=in_flight * 2 + 10),
        requests=KafkaRequestLog(bootstrap, topic, partitions=partitions),
    )
    log = KafkaRepository(bootstrap, topic, partitions=partitions)
    requests = KafkaRequestLog(bootstrap, topic, partitions=partitions)
    forwarder = Forwarder(requests, log, codec, {SAGA.type: SAGA}, "bench-caller", 60.0)
    remote = RemoteWorkflows(forwarder, partitions)
    async with owner:
        await log.start()
        await requests.start()
        await forwarder.start()
        try:

            async def local(i: int, prefix: str) -> object:
                return await owner.exec_workflow(SAGA, f"{prefix}{i}", order(i, "ok"))

            async def forwarded(i: int, prefix: str) -> object:
                data = codec.encode(order(i, "ok"))
                return await remote.exec(f"{prefix}{i}", SAGA.type, data, "raise")

            await drive(lambda i: forwarded(i, "warm-f"), 20, 1)  # followers and clients up
            await drive(lambda i: local(i, "warm-l"), 20, 1)
            return [
                await drive(lambda i: local(i, "l1-"), count, 1),
                await drive(lambda i: forwarded(i, "f1-"), count, 1),
                await drive(lambda i: local(i, "ln-"), count * 2, in_flight),
                await drive(lambda i: forwarded(i, "fn-"), count * 2, in_flight),
            ]
        finally:
            await forwarder.close()
            await requests.close()
            await log.close()


async def main(bootstrap: str | None, partitions: int, count: int, in_flight: int) -> None:
    if bootstrap is None:
        async with LocalBroker() as broker:
            runs = await measure(broker.bootstrap_servers, partitions, count, in_flight)
    else:
        runs = await measure(bootstrap, partitions, count, in_flight)
    print(machine_line(machine()))
    where = bootstrap or "a fresh local tansu broker"
    print(f"broker: {where}; {partitions} partitions; order saga (5 events), one process")
    print(f"{'call':34} {'workflows/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    names = [
        "local, in turn",
        "forwarded, in turn",
        f"local, {in_flight} in flight",
        f"forwarded, {in_flight} in flight",
    ]
    for name, stats in zip(names, runs, strict=True):
        p50, p99 = stats.percentile(0.5) * 1e3, stats.percentile(0.99) * 1e3
        print(f"{name:34} {stats.rate:12,.0f} {p50:8.2f} {p99:8.2f} {stats.errors:7}")
    local, remote = runs[0].percentile(0.5), runs[1].percentile(0.5)
    print(f"forwarding adds {(remote - local) * 1e3:.2f} ms at p50 (in turn)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default=os.environ.get("KAPBIT_TEST_BOOTSTRAP"))
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.bootstrap, args.partitions, args.count, args.in_flight))
