"""The checkpoint store: a compacted topic (``<topic>-checkpoints`` by default) with one
partition, keyed by log (``<topic>/<partition>``), so several logs may share one.

Snapshot chunks (:mod:`kapbit.snapshots`) sit in the same topic, keyed
``<topic>/<partition>/snapshot/<slot>/<index>``: a chunk written again replaces the one
before it under compaction, and a deleted one is a tombstone (a record with no value), so
the topic keeps the live snapshot of each partition (and whatever a crashed save left in
the other slot, which the next save overwrites or deletes). Readers of older versions skip
these keys, as they are no log's checkpoint key."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer, TopicPartition

from kapbit._log import fields
from kapbit.repository.base import Checkpoint, chunk_slots, leading_chunks
from kapbit.repository.kafka.errors import transient
from kapbit.repository.kafka.reads import Lane, beginning_offsets, end_offset, fetch

logger = logging.getLogger("kapbit.kafka")


class CheckpointStore:
    """The checkpoints of the log ``topic`` (``partitions`` partitions) in ``checkpoint_topic``."""

    def __init__(
        self,
        topic: str,
        partitions: int,
        checkpoint_topic: str,
        producer: AIOKafkaProducer,
        lane: Lane,
        read_timeout: float,
    ) -> None:
        self._topic = topic
        self._partitions = partitions
        self._tp = TopicPartition(checkpoint_topic, 0)
        self._producer = producer
        self._lane = lane
        self._read_timeout = read_timeout
        #: Snapshot chunks by (partition, slot, index), read by the last load.
        self._chunks: dict[tuple[int, str, int], bytes] = {}
        self._loaded = False

    def _key(self, partition: int) -> str:
        return f"{self._topic}/{partition}"

    def _chunk_key(self, partition: int, slot: str, index: int) -> str:
        return f"{self._topic}/{partition}/snapshot/{slot}/{index}"

    async def save_chunk(self, partition: int, slot: str, index: int, data: bytes | None) -> None:
        """Store (``None``: delete) chunk ``index`` of a snapshot of ``partition``."""
        with transient("saving a snapshot chunk failed"):
            await self._producer.send_and_wait(
                self._tp.topic,
                data,
                key=self._chunk_key(partition, slot, index).encode(),
                partition=0,
            )
        key = (partition, slot, index)
        if data is None:
            self._chunks.pop(key, None)
        else:
            self._chunks[key] = data

    async def load_chunks(self, partition: int, slot: str, count: int) -> list[bytes]:
        """Chunks ``0 .. count - 1`` of ``slot``, up to the first missing, as of the last
        :meth:`load` and this store's writes since."""
        if not self._loaded:
            await self.load()
        return leading_chunks(self._chunks, partition, slot, count)

    async def slots(self, partition: int) -> dict[str, list[int]]:
        """The chunk indexes per slot of ``partition``: those the last :meth:`load` read
        and this store wrote since (another instance's later writes are not known)."""
        if not self._loaded:
            await self.load()
        return chunk_slots(self._chunks, partition)

    async def save(self, partition: int, checkpoint: Checkpoint) -> None:
        with transient("saving checkpoint failed"):
            await self._producer.send_and_wait(
                self._tp.topic,
                msgspec.json.encode(checkpoint),
                key=self._key(partition).encode(),
                partition=0,
            )

    async def load(self) -> dict[int, Checkpoint]:
        """The checkpoints of this log; those of other logs sharing the topic are skipped."""
        with transient("loading checkpoints failed"):
            return await self._load()

    async def _load(self) -> dict[int, Checkpoint]:
        tp = self._tp
        checkpoints: dict[int, Checkpoint] = {}
        chunks: dict[tuple[int, str, int], bytes] = {}
        start = (await beginning_offsets(self._lane, [tp]))[tp]
        stop = await end_offset(self._lane, tp)
        if start < stop:
            async for batch in fetch(self._lane, tp, start, stop, self._read_timeout):
                for record in batch:
                    self._take(record, checkpoints, chunks)
        self._chunks, self._loaded = chunks, True
        return {p: c for p, c in checkpoints.items() if p < self._partitions}

    def _take(
        self,
        record: Any,
        checkpoints: dict[int, Checkpoint],
        chunks: dict[tuple[int, str, int], bytes],
    ) -> None:
        """Take in one aiokafka record of the topic: a checkpoint or a snapshot chunk of
        this log."""
        key = record.key.decode(errors="replace") if record.key is not None else ""
        parts = key.split("/")
        if parts[0] != self._topic:
            return
        if len(parts) == 5 and parts[2] == "snapshot" and parts[1].isdigit() and parts[4].isdigit():
            key = (int(parts[1]), parts[3], int(parts[4]))
            if record.value:
                chunks[key] = record.value
            else:  # a tombstone
                chunks.pop(key, None)
            return
        if len(parts) != 2:
            return
        try:
            checkpoints[int(parts[1])] = msgspec.json.decode(record.value or b"", type=Checkpoint)
        except (ValueError, msgspec.DecodeError) as exc:
            logger.warning(
                "ignoring unreadable checkpoint at offset %d: %s",
                record.offset,
                exc,
                extra=fields(),
            )
