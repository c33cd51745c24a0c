"""The checkpoint store: a compacted topic (``<topic>-checkpoints`` by default) with one
partition, keyed by log (``<topic>/<partition>``), so several logs may share one."""

from __future__ import annotations

import logging

import msgspec
from aiokafka import AIOKafkaProducer, TopicPartition

from kapbit._log import fields
from kapbit.repository.base import Checkpoint
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

    def _key(self, partition: int) -> str:
        return f"{self._topic}/{partition}"

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
        start = (await beginning_offsets(self._lane, [tp]))[tp]
        stop = await end_offset(self._lane, tp)
        if start >= stop:
            return checkpoints
        async for batch in fetch(self._lane, tp, start, stop, self._read_timeout):
            for record in batch:
                key = record.key.decode() if record.key is not None else ""
                log, _, partition = key.rpartition("/")
                if log != self._topic:
                    continue
                try:
                    checkpoints[int(partition)] = msgspec.json.decode(
                        record.value or b"", type=Checkpoint
                    )
                except (ValueError, msgspec.DecodeError) as exc:
                    logger.warning(
                        "ignoring unreadable checkpoint at offset %d: %s",
                        record.offset,
                        exc,
                        extra=fields(),
                    )
        return {p: c for p, c in checkpoints.items() if p < self._partitions}
