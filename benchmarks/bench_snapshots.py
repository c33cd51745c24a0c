"""Restart time with 1,000 workflows left open at the start of a log that then receives N
finished ones: snapshot checkpoints against offset-only checkpoints, in one run.

For each backend (MemRepository; with ``--kafka`` also a local Kafka-protocol broker, or
``--bootstrap``):

1. instance A starts on an empty log, runs 1,000 workflows that stop inside step 1 and
   crashes (``Kapbit.abort``): they stay open at the log's start;
2. N finished workflows (3-step saga: WorkflowCreated, 3 StepOutcomes, WorkflowResult)
   are appended after them, as A's writes (A still owns the log);
3. per mode (``offsets``: ``CheckpointPolicy(snapshots=False)``, today's checkpoint, which
   cannot move past the oldest open workflow; ``snapshot``): instance B starts (reading
   what it must), closes at once (its 1,000 resumed workflows stay open) and saves its
   checkpoint; instance C starts on it: **restart** is the time of C's ``start()``, ``read``
   the records it read. Both modes run on the same log, one after the other.

The snapshot's size (bytes, chunks) is the one B wrote. With ``--saves S``, B first
writes S snapshots, one after each of S one-step workflows, as a running instance does
every ``CheckpointPolicy.interval``: on Kafka the checkpoint topic then holds S snapshots'
chunks, as it does until the broker compacts it (``ckpt records`` counts what it holds).
B's recovered partition is pinned
(its oldest open workflow lies more than ``CheckpointPolicy.snapshot_after``, 10,000
records, behind its end: N is 2,000 or more), so B follows it from its start.

With ``--live N`` (MemRepository) the snapshot is taken while running instead: instance A
opens the 1,000 workflows, then runs N short ones through the engine (1,000 in flight,
default ``CheckpointPolicy``: a save every 10,000 terminations or 5 s), so its partition
rests until the log passes the open ones by ``snapshot_after`` records and a save wakes its
reader; A then crashes (no save at close) and C's restart is measured, against the same run
with ``snapshots=False``. ``wakes`` counts A's readers woken; ``wf/s`` is A's throughput.

Usage: ``python benchmarks/bench_snapshots.py [--finished N] [--kafka] [--kafka-finished N]
[--saves S] [--live N]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from _common import crash_with_open, finished_records, held_saga
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kapbit import CheckpointPolicy, Definition, Kapbit, Options, Progress, Step, Success
from kapbit.repository import MemRepository, Repository
from kapbit.repository.kafka import KafkaRepository
from kapbit.repository.kafka.records import headers
from kapbit.testing import LocalBroker

OPEN = 1_000
WINDOW = 10_000


async def _tick(_input: int, _progress: Progress) -> Success[int]:
    return Success(0)


#: One step: what B runs between two of the S saves.
TICK = Definition("tick", steps=[Step(_tick)], input_type=int, outcome_type=int)


def _options(snapshots: bool, every: int = 10**9) -> Options:
    return Options(
        idempotency_window=WINDOW,
        max_workflows=OPEN + 100,
        close_timeout=0,
        checkpoints=CheckpointPolicy(every=every, interval=3600.0, snapshots=snapshots),
    )


async def _append_mem(repo: MemRepository, count: int, node: str) -> None:
    for kind, key, value in finished_records(count, time.time()):
        await repo.append(0, kind, key, node, value)


async def _append_kafka(bootstrap: str, topic: str, count: int, node: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        pending = []
        for kind, key, value in finished_records(count, time.time()):
            pending.append(
                await producer.send(
                    topic, value, key=key.encode(), partition=0, headers=headers(kind, node)
                )
            )
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


class _ReadCounter(logging.Handler):
    """Picks the records read out of the instance's start log line, and counts the
    snapshots written."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = asyncio.Event()  # set at each snapshot written

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        found = re.search(r"(\d+) records read", message)
        if found:
            self.read = int(found.group(1))
        elif re.search(r"snapshot at offset \d+", message):
            self.written.set()


async def _save_snapshots(saver: Kapbit, counter: _ReadCounter, saves: int) -> None:
    """Make ``saver`` (saving after every termination) write ``saves`` snapshots, one after
    each tick workflow."""
    for n in range(saves):
        counter.written.clear()
        await saver.exec_workflow(TICK, f"tick-{n}", n)
        await counter.written.wait()  # the save runs in the background


async def _run(
    new_repo: Any, append: Any, finished: int, saves: int = 0, topic_records: Any = None
) -> list[tuple[str, float, int, int, int, int, int]]:
    """Build the log, then per mode: B saves its checkpoint, C's restart is measured."""
    hold = asyncio.Event()
    opened: list[Repository] = []

    def repository() -> Repository:
        opened.append(new_repo())
        return opened[-1]

    first = await crash_with_open(
        lambda saga: Kapbit([saga], repository(), options=_options(False)), OPEN
    )
    started = time.perf_counter()
    await append(first.writer_id)
    print(
        f"  built: {OPEN:,} open + {finished:,} finished in {time.perf_counter() - started:.1f} s"
    )

    counter = _ReadCounter()
    logger = logging.getLogger("kapbit")
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("kapbit.snapshots").setLevel(logging.DEBUG)  # every snapshot written
    rows = []
    restarted = first
    try:
        for mode in ("offsets", "snapshot"):
            snapshots = mode == "snapshot"
            every = 1 if snapshots and saves else 10**9
            saver = Kapbit(
                [held_saga(hold), TICK], repository(), options=_options(snapshots, every)
            )
            await saver.start()
            if snapshots:
                await _save_snapshots(saver, counter, saves)
            await saver.close(timeout=0)
            size = saver.stats.snapshot_bytes
            repo = repository()
            checkpoint = (await _loaded(repo))[0]
            gc.collect()
            held = topic_records and await topic_records()
            restarted = Kapbit([held_saga(hold), TICK], repo, options=_options(snapshots))
            t0 = time.perf_counter()
            await restarted.start()
            restart = time.perf_counter() - t0
            assert restarted.stats.recovered == OPEN, restarted.stats
            restarted.abort()
            start = (
                checkpoint.snapshot_offset
                if snapshots
                else min(checkpoint.offset, checkpoint.window_offset)
            )
            chunks = checkpoint.snapshot_chunks
            rows.append((mode, restart, counter.read, size, chunks, start, held or 0))
    finally:
        logger.removeHandler(counter)
        for aborted in (first, restarted):  # an aborted instance leaves its repository open
            await aborted.close()
        for opened_repo in opened:
            await opened_repo.close()
    return rows


async def _loaded(repo: Repository) -> dict[int, Any]:
    await repo.start()
    try:
        return await repo.load_checkpoints()
    finally:
        await repo.close()


def _print(
    where: str, finished: int, rows: Sequence[tuple[str, float, int, int, int, int, int]]
) -> None:
    print(
        f"{'backend':>8} {'finished':>10} {'checkpoint':>10} {'from offset':>11} "
        f"{'records read':>13} {'restart ms':>11} {'snapshot B':>11} {'chunks':>6} "
        f"{'ckpt records':>12}"
    )
    for mode, restart, read, size, chunks, offset, held in rows:
        print(
            f"{where:>8} {finished:>10,} {mode:>10} {offset:>11,} {read:>13,} "
            f"{restart * 1e3:>11.1f} {size if mode == 'snapshot' else '-':>11} "
            f"{chunks if mode == 'snapshot' else '-':>6} {held or '-':>12}"
        )


async def _mem(finished: int, saves: int) -> None:
    repo = MemRepository()
    rows = await _run(lambda: repo, lambda node: _append_mem(repo, finished, node), finished, saves)
    _print("memory", finished, rows)


async def _kafka(bootstrap: str | None, finished: int, saves: int) -> None:
    if bootstrap is None:
        async with LocalBroker() as broker:
            await _kafka_on(broker.bootstrap_servers, finished, saves)
    else:
        await _kafka_on(bootstrap, finished, saves)


async def _kafka_on(bootstrap: str, finished: int, saves: int) -> None:
    topic = f"bench-snapshots-{uuid.uuid4().hex[:8]}"

    async def checkpoint_records() -> int:
        """The records the checkpoint topic holds (its end offset minus its start)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            tp = TopicPartition(f"{topic}-checkpoints", 0)
            end = (await consumer.end_offsets([tp]))[tp]
            return int(end - (await consumer.beginning_offsets([tp]))[tp])
        finally:
            await consumer.stop()

    rows = await _run(
        lambda: KafkaRepository(bootstrap, topic, partitions=1),
        lambda node: _append_kafka(bootstrap, topic, finished, node),
        finished,
        saves,
        checkpoint_records,
    )
    _print("kafka", finished, rows)


async def _live_run(mode: str, finished: int, counter: _ReadCounter) -> tuple[Any, ...]:
    """One ``--live`` run: A opens ``OPEN`` workflows, runs ``finished`` short ones and
    crashes; C restarts."""
    repo = MemRepository()
    options = Options(
        idempotency_window=WINDOW,
        max_workflows=OPEN + 1_100,
        close_timeout=0,
        checkpoints=CheckpointPolicy(snapshots=mode == "snapshot"),
    )
    hold, all_inside = asyncio.Event(), asyncio.Event()
    first = Kapbit(
        [held_saga(hold, OPEN, all_inside), held_saga(None, name="short")], repo, options=options
    )
    await first.start()
    stuck = [
        asyncio.create_task(first.exec_workflow(f"open-{i:04d}", "saga", {"n": i}))
        for i in range(OPEN)
    ]
    await all_inside.wait()
    slots = asyncio.Semaphore(1_000)

    async def one(i: int) -> None:
        async with slots:
            await first.exec_workflow(f"short-{i:07d}", "short", {"n": i})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(finished)))
    rate = finished / (time.perf_counter() - t0)
    wakes = first.stats.snapshot_wakes
    first.abort()
    await asyncio.gather(*stuck, return_exceptions=True)
    await first.close()
    checkpoint = (await repo.load_checkpoints())[0]
    gc.collect()
    restarted = Kapbit([held_saga(hold), held_saga(None, name="short")], repo, options=options)
    t0 = time.perf_counter()
    await restarted.start()
    restart = time.perf_counter() - t0
    assert restarted.stats.recovered == OPEN, restarted.stats
    restarted.abort()
    await restarted.close()
    length = await repo.end_offset(0)
    return mode, rate, wakes, checkpoint.snapshot_offset, length, counter.read, restart


async def _live(finished: int) -> None:
    counter = _ReadCounter()
    logger = logging.getLogger("kapbit")
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        rows = [await _live_run(mode, finished, counter) for mode in ("offsets", "snapshot")]
    finally:
        logger.removeHandler(counter)
    print(
        f"{'backend':>8} {'finished':>10} {'checkpoint':>10} {'wf/s':>8} {'wakes':>5} "
        f"{'snapshot at':>11} {'log end':>10} {'records read':>13} {'restart ms':>11}"
    )
    for mode, rate, wakes, at, length, read, restart in rows:
        print(
            f"{'memory':>8} {finished:>10,} {mode:>10} {rate:>8,.0f} {wakes:>5} "
            f"{at if at >= 0 else '-':>11} {length:>10,} {read:>13,} {restart * 1e3:>11.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finished", type=int, default=1_000_000, help="on MemRepository")
    parser.add_argument("--kafka", action="store_true", help="also on a Kafka-protocol broker")
    parser.add_argument("--kafka-finished", type=int, default=100_000)
    parser.add_argument("--bootstrap", default=os.environ.get("KAPBIT_TEST_BOOTSTRAP"))
    parser.add_argument("--saves", type=int, default=0, help="snapshots B writes first")
    parser.add_argument("--live", type=int, default=0, help="snapshots taken while running")
    args = parser.parse_args()
    print(
        f"kapbit restart with {OPEN:,} workflows open at the log's start, 1 partition, window "
        f"{WINDOW:,} ids, Python {sys.version.split()[0]}"
    )
    if args.live:
        asyncio.run(_live(args.live))
        return
    asyncio.run(_mem(args.finished, args.saves))
    if args.kafka:
        asyncio.run(_kafka(args.bootstrap, args.kafka_finished, args.saves))


if __name__ == "__main__":
    main()
