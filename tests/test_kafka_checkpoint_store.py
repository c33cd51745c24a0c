"""The Kafka checkpoint store on a real Kafka-protocol broker: a start reads the compacted
checkpoint topic back from its end only as far as it needs (each partition's latest
checkpoint and the chunks it names), not every snapshot ever written before compaction;
what it finds is what reading the whole topic finds."""

from __future__ import annotations

import random
from typing import Any, ClassVar

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kapbit.repository import Checkpoint
from kapbit.repository.kafka import KafkaRepository
from kapbit.repository.kafka.checkpoints import CheckpointStore
from kapbit.repository.kafka.clients import new_producer, start_clients, stop_clients
from kapbit.repository.kafka.reads import Lane

CHUNKS = 3


class CountingConsumer(AIOKafkaConsumer):  # type: ignore[misc]  # aiokafka is untyped
    """Counts the records its reads hand out, and which offsets they had."""

    records: ClassVar[int] = 0
    offsets: ClassVar[set[int]] = set()

    async def getmany(self, *partitions: Any, **kwargs: Any) -> Any:
        fetched = await super().getmany(*partitions, **kwargs)
        for batch in fetched.values():
            CountingConsumer.records += len(batch)
            CountingConsumer.offsets.update(record.offset for record in batch)
        return fetched


class Store:
    """A checkpoint store of log ``topic`` with its own producer and counting reader."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.bootstrap, self.topic, self.partitions = bootstrap, topic, partitions
        self.producer = new_producer(bootstrap, {})
        checkpoints = f"{topic}-checkpoints"

        def consumer(wait_ms: int) -> AIOKafkaConsumer:
            return CountingConsumer(
                bootstrap_servers=bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=wait_ms,
            )

        self.lane = Lane(consumer, 20, 1_000, [TopicPartition(checkpoints, 0)])
        self.store = CheckpointStore(topic, partitions, checkpoints, self.producer, self.lane, 10)

    async def __aenter__(self) -> CheckpointStore:
        await start_clients(self.bootstrap, [self.producer, self.lane])
        CountingConsumer.records, CountingConsumer.offsets = 0, set()
        return self.store

    async def __aexit__(self, *_: object) -> None:
        await stop_clients([self.producer, self.lane])


async def _create_topics(bootstrap: str, topic: str, partitions: int) -> None:
    repo = KafkaRepository(bootstrap, topic, partitions=partitions)
    await repo.start()
    await repo.close()


def _checkpoint(save: int, slot: str) -> Checkpoint:
    return Checkpoint(offset=save, snapshot_offset=save, snapshot_slot=slot, snapshot_chunks=CHUNKS)


def _chunk(partition: int, save: int, index: int) -> bytes:
    return f"p{partition} save {save} chunk {index} ".encode() * 20


async def test_a_start_reads_the_end_of_the_checkpoint_topic_not_every_snapshot_before_it(
    kafka_bootstrap: str, topic: str
) -> None:
    """60 saves per partition, each as a running instance writes them (chunks into the slot
    the checkpoint does not name, the checkpoint, tombstones for the other slot), after
    chunks an earlier start left: the start reads a fraction of the topic and finds the
    latest checkpoints and chunks; the leftovers are found when a save first asks."""
    partitions, saves = 2, 60
    await _create_topics(kafka_bootstrap, topic, partitions)
    async with Store(kafka_bootstrap, topic, partitions) as writer:
        for index in range(CHUNKS):  # what an earlier start left in a slot of its own
            await writer.save_chunk(0, "old-0", index, b"left behind")
        for save in range(saves):
            slot, other = f"w-{save % 2}", f"w-{(save + 1) % 2}"
            for partition in range(partitions):
                for index in range(CHUNKS):
                    await writer.save_chunk(partition, slot, index, _chunk(partition, save, index))
                await writer.save(partition, _checkpoint(save, slot))
                if save:
                    for index in range(CHUNKS):
                        await writer.save_chunk(partition, other, index, None)
    written = CHUNKS + saves * partitions * (2 * CHUNKS + 1) - partitions * CHUNKS

    last, slot = saves - 1, f"w-{(saves - 1) % 2}"
    async with Store(kafka_bootstrap, topic, partitions) as store:
        assert await store.load() == {p: _checkpoint(last, slot) for p in range(partitions)}
        for partition in range(partitions):
            chunks = await store.load_chunks(partition, slot, CHUNKS)
            assert chunks == [_chunk(partition, last, i) for i in range(CHUNKS)]
        read_at_start = len(CountingConsumer.offsets)
        assert read_at_start < written // 4, (read_at_start, written)

        assert await store.slots(0) == {"old-0": [0, 1, 2], slot: [0, 1, 2]}
        assert await store.slots(1) == {slot: [0, 1, 2]}
        assert len(CountingConsumer.offsets) == written  # now the rest, keys kept only
        records = CountingConsumer.records
        assert await store.slots(0) == {"old-0": [0, 1, 2], slot: [0, 1, 2]}
        assert CountingConsumer.records == records  # once


async def test_what_a_start_finds_is_what_reading_the_whole_topic_finds(
    kafka_bootstrap: str, topic: str
) -> None:
    """Random histories of checkpoints (some unreadable), chunks, tombstones and another
    log's records: the latest readable checkpoint per partition, the chunks it names and
    the live chunk keys are those of a forward read of every record."""
    partitions = 3
    for seed in range(4):
        rng = random.Random(seed)
        log = f"{topic}-{seed}"
        await _create_topics(kafka_bootstrap, log, partitions)
        checkpoints: dict[int, Checkpoint] = {}
        chunks: dict[tuple[int, str, int], bytes] = {}
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for step in range(200):
                partition, slot = rng.randrange(partitions), rng.choice(["a", "b", "c"])
                index, roll = rng.randrange(CHUNKS + 1), rng.random()
                if roll < 0.2:
                    count = rng.randrange(1, CHUNKS + 1)
                    saved = Checkpoint(
                        offset=step, snapshot_offset=step, snapshot_slot=slot, snapshot_chunks=count
                    )
                    key, value = f"{log}/{partition}", msgspec.json.encode(saved)
                    checkpoints[partition] = saved
                elif roll < 0.25:
                    key, value = f"{log}/{partition}", b"not a checkpoint"
                elif roll < 0.3:
                    key, value = f"other/{partition}/snapshot/{slot}/{index}", b"other log"
                elif roll < 0.5:
                    key, value = f"{log}/{partition}/snapshot/{slot}/{index}", None
                    chunks.pop((partition, slot, index), None)
                else:
                    value = f"{step}".encode()
                    key = f"{log}/{partition}/snapshot/{slot}/{index}"
                    chunks[(partition, slot, index)] = value
                await producer.send_and_wait(
                    f"{log}-checkpoints", value, key=key.encode(), partition=0
                )
        finally:
            await producer.stop()

        async with Store(kafka_bootstrap, log, partitions) as store:
            assert await store.load() == checkpoints, seed
            for partition, saved in checkpoints.items():
                expected = []
                for i in range(saved.snapshot_chunks):
                    if (partition, saved.snapshot_slot, i) not in chunks:
                        break
                    expected.append(chunks[(partition, saved.snapshot_slot, i)])
                found = await store.load_chunks(
                    partition, saved.snapshot_slot, saved.snapshot_chunks
                )
                assert found == expected, seed
            for partition in range(partitions):
                live: dict[str, list[int]] = {}
                for p, slot, i in sorted(chunks):
                    if p == partition:
                        live.setdefault(slot, []).append(i)
                found_slots = await store.slots(partition)
                assert {slot: sorted(ix) for slot, ix in found_slots.items()} == live, seed
