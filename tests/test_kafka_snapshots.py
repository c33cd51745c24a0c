"""Snapshot checkpoints on a real Kafka-protocol broker: chunks and tombstones in the
compacted checkpoint topic, checkpoints of older versions, and a crash between a
snapshot's chunks and its checkpoint (the instance aborted there)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kapbit import CheckpointPolicy, DuplicateWorkflow, Kapbit, Options
from kapbit.repository import Checkpoint
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing import FaultyRepository
from tests.helpers import gated_saga, wait_until
from tests.test_snapshots import other_slot

NEVER = 3600.0


async def _topic_records(bootstrap: str, topic: str) -> list[tuple[str, bytes | None]]:
    """``(key, value)`` of every record of the checkpoint topic, in order."""
    tp = TopicPartition(f"{topic}-checkpoints", 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        found: list[tuple[str, bytes | None]] = []
        while await consumer.position(tp) < end:
            fetched = await consumer.getmany(tp, timeout_ms=1000)
            found += [(m.key.decode(), m.value) for m in fetched.get(tp, [])]
        return found
    finally:
        await consumer.stop()


async def test_chunks_round_trip_and_deleted_ones_are_tombstones(
    kafka_bootstrap: str, topic: str
) -> None:
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    await repo.start()
    try:
        for index, chunk in enumerate([b"ab", b"cd", b"e"]):
            await repo.save_snapshot_chunk(1, "a-0", index, chunk)
        await repo.save_snapshot_chunk(1, "a-1", 0, b"other slot")
        await repo.save_snapshot_chunk(1, "a-0", 2, None)
        assert await repo.load_snapshot_chunks(1, "a-0", 3) == [b"ab", b"cd"]
    finally:
        await repo.close()
    again = KafkaRepository(kafka_bootstrap, topic)
    await again.start()
    try:
        assert await again.load_checkpoints() == {}
        assert await again.load_snapshot_chunks(1, "a-0", 3) == [b"ab", b"cd"]
        assert await again.load_snapshot_chunks(1, "a-1", 5) == [b"other slot"]
        assert await again.load_snapshot_chunks(0, "a-0", 5) == []
        assert await again.snapshot_slots(1) == {"a-0": [0, 1], "a-1": [0]}
    finally:
        await again.close()
    records = await _topic_records(kafka_bootstrap, topic)
    assert (f"{topic}/1/snapshot/a-0/2", None) in records  # a tombstone: compaction drops it


async def test_a_checkpoint_saved_before_snapshots_existed_still_loads(
    kafka_bootstrap: str, topic: str
) -> None:
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=1)
    await repo.start()
    await repo.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        old = b'{"offset":7,"owner":"a","window_offset":3,"window_owner":"a","window_size":5}'
        await producer.send_and_wait(
            f"{topic}-checkpoints", old, key=f"{topic}/0".encode(), partition=0
        )
    finally:
        await producer.stop()
    again = KafkaRepository(kafka_bootstrap, topic)
    await again.start()
    try:
        assert await again.load_checkpoints() == {
            0: Checkpoint(7, "a", 3, "a", 5, snapshot_offset=-1)
        }
    finally:
        await again.close()


def _options(node: str, **policy: Any) -> Options:
    return Options(
        node_id=node,
        idempotency_window=5,
        checkpoints=CheckpointPolicy(interval=NEVER, snapshot_after=0, **policy),
    )


async def test_a_crash_between_the_chunks_and_the_checkpoint_loses_nothing(
    kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workflows stay open at the log's start; snapshots (of many chunks) move past
    them; the instance is aborted after a snapshot's chunks were written but not its
    checkpoint. The next instance recovers from the previous snapshot, reading only the
    log after it, and the next save leaves the topic with the live snapshot only."""
    inner = KafkaRepository(kafka_bootstrap, topic, partitions=1)
    faulty = FaultyRepository(inner)
    calls: list[tuple[str, int]] = []
    first = Kapbit(
        [gated_saga(None, calls), gated_saga(asyncio.Event(), calls, name="slow")],
        faulty,
        options=_options("first", every=10, snapshot_chunk=100),
    )
    await first.start()
    stuck = [asyncio.create_task(first.exec_workflow(s, "slow", {"id": s})) for s in ("s0", "s1")]
    await wait_until(lambda: {("s0", 1), ("s1", 1)} <= set(calls), timeout=30)
    for i in range(20):
        await first.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
    await eventually(inner, lambda c: c.snapshot_offset >= 0)

    fault = faulty.fail(operations=("save_checkpoint",))
    for i in range(20, 30):
        await first.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
    await wait_until(lambda: fault.hits > 0, timeout=30)
    first.abort()
    await asyncio.gather(*stuck, return_exceptions=True)
    # saves run one after another: the one before the failed save has completed
    previous = (await inner.load_checkpoints())[0]
    await inner.close()
    assert previous.snapshot_chunks > 1
    assert previous.offset < 3 < previous.snapshot_offset  # s0 and s1 are open behind it
    assert await saved_by_new_repository(kafka_bootstrap, topic) == previous
    last = await _last_by_key(kafka_bootstrap, topic)
    other = f"{topic}/0/snapshot/{other_slot(previous.snapshot_slot)}/0"
    assert last.get(other) is not None  # the unnamed chunks the crashed save left

    second_calls: list[tuple[str, int]] = []
    repo = KafkaRepository(kafka_bootstrap, topic)
    second = Kapbit(
        [gated_saga(None, second_calls), gated_saga(None, second_calls, name="slow")],
        repo,
        options=_options("second"),
    )
    with caplog.at_level(logging.INFO, "kapbit"):
        await second.start()
    try:
        assert second.stats.recovered == 2
        match = re.search(r"2 workflows resumed, (\d+) records read", caplog.text)
        assert match is not None
        log_end = await repo.end_offset(0)
        # from the previous snapshot on: the anchor, then the log after the snapshot
        assert int(match.group(1)) <= log_end - previous.snapshot_offset + 2
        assert await second.wait_result("s0", timeout=30) == ["s0", "s0-0", "s0-1", "s0-2"]
        assert await second.wait_result("s1", timeout=30) == ["s1", "s1-0", "s1-1", "s1-2"]
        assert sorted(second_calls) == [("s0", 1), ("s0", 2), ("s1", 1), ("s1", 2)]
        with pytest.raises(DuplicateWorkflow):
            await second.exec_workflow("q29", "gated", {"id": "q29"})
    finally:
        await second.close()
    latest = await saved_by_new_repository(kafka_bootstrap, topic)
    assert latest.snapshot_offset > previous.snapshot_offset
    # what compaction keeps: the last record per key; dead chunks end in a tombstone
    last = await _last_by_key(kafka_bootstrap, topic)
    live_chunks = {
        key
        for key, value in last.items()
        if key.startswith(f"{topic}/0/snapshot/") and value is not None
    }
    assert live_chunks == {
        f"{topic}/0/snapshot/{latest.snapshot_slot}/{i}" for i in range(latest.snapshot_chunks)
    }
    decoded = msgspec.json.decode(last[f"{topic}/0"] or b"", type=Checkpoint)
    assert decoded == latest


async def saved_by_new_repository(bootstrap: str, topic: str) -> Checkpoint:
    repo = KafkaRepository(bootstrap, topic)
    await repo.start()
    try:
        return (await repo.load_checkpoints())[0]
    finally:
        await repo.close()


async def eventually(repo: KafkaRepository, holds: Any, timeout: float = 30.0) -> Checkpoint:
    """The stored checkpoint of partition 0 once ``holds`` it (read again until then)."""
    async with asyncio.timeout(timeout):
        while True:
            checkpoint = (await repo.load_checkpoints()).get(0)
            if checkpoint is not None and holds(checkpoint):
                return checkpoint


async def _last_by_key(bootstrap: str, topic: str) -> dict[str, bytes | None]:
    """What compaction keeps of the checkpoint topic: the last value per key."""
    return dict(await _topic_records(bootstrap, topic))
