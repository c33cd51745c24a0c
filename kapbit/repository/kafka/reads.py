"""Reads of a topic with long-lived consumers, and the broker quirks they work around.

A :class:`Lane` is a consumer with every partition it reads assigned and paused: a read
seeks and resumes one partition, then pauses it again, so nothing polls in the background.
Each read is bounded by offsets known to exist, so a read that makes no progress means the
broker is unreachable (or answers oddly, see :class:`Lane`), never that it waits for data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from kapbit._log import fields
from kapbit.errors import LogLost, TransientStorageError
from kapbit.repository.base import Record
from kapbit.repository.kafka.errors import transient
from kapbit.repository.kafka.records import to_record

logger = logging.getLogger("kapbit.kafka")

READ_BATCH = 10_000

_R = TypeVar("_R")


class Lane:
    """A long-lived consumer and the lock serialising its reads.

    tansu answers a fetch whose max wait is too short to find the offset in a large log
    with nothing, fetch after fetch. A read that gets nothing where records exist makes
    the lane slower (:meth:`slow_down`): a new consumer waiting ten times longer, up to
    ``max_wait_ms``. Kafka answers as soon as data exists, so a longer wait costs nothing
    there; it slows down only during an outage.
    """

    def __init__(
        self,
        new_consumer: Callable[[int], AIOKafkaConsumer],
        wait_ms: int,
        max_wait_ms: int,
        partitions: list[TopicPartition],
    ) -> None:
        self._new_consumer = new_consumer
        self.wait_ms = wait_ms
        self._max_wait_ms = max(wait_ms, max_wait_ms)
        self._partitions = partitions
        self.consumer = new_consumer(wait_ms)
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        await _start_paused(self.consumer, self._partitions)

    async def slow_down(self) -> bool:
        """Replace the consumer by one waiting ten times longer; False at the maximum."""
        if self.wait_ms >= self._max_wait_ms:
            return False
        wait_ms = min(self.wait_ms * 10, self._max_wait_ms)
        consumer = self._new_consumer(wait_ms)
        try:
            await _start_paused(consumer, self._partitions)
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        old, self.consumer, self.wait_ms = self.consumer, consumer, wait_ms
        with contextlib.suppress(Exception):
            await old.stop()
        logger.info(
            "a fetch of existing records came back empty: reading with a %d ms fetch wait",
            wait_ms,
            extra=fields(),
        )
        return True

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.consumer.stop()


async def _start_paused(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    await consumer.start()
    consumer.assign(partitions)
    consumer.pause(*partitions)


async def fetch_records(
    lane: Lane, tp: TopicPartition, start: int, stop: int, read_timeout: float
) -> AsyncIterator[list[Record]]:
    """Yield the kapbit records of ``tp`` with ``start <= offset < stop`` as :func:`fetch`
    does; a record that is not a kapbit record raises
    :class:`~kapbit.errors.CorruptRecord`."""
    partition = tp.partition
    async for messages in fetch(lane, tp, start, stop, read_timeout):
        yield [to_record(partition, message) for message in messages]


async def fetch(
    lane: Lane, tp: TopicPartition, start: int, stop: int, read_timeout: float
) -> AsyncIterator[list[Any]]:
    """Yield the aiokafka records of ``tp`` with ``start <= offset < stop``, all of which
    exist.

    Raises TransientStorageError after ``read_timeout`` seconds without progress, and
    LogLost if the broker no longer has offset ``start`` and starts over below it.
    """
    async with lane.lock:
        consumer = lane.consumer
        consumer.seek(tp, start)
        consumer.resume(tp)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + read_timeout
        try:
            while (position := await consumer.position(tp)) < stop:
                # No more than asked for: aiokafka decodes every record it hands out, and a
                # fetch holds many more past a short read's stop.
                wanted = min(READ_BATCH, stop - position)
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=wanted)
                messages = fetched.get(tp, ())
                if messages and messages[0].offset < start:
                    # Offset ``start`` was out of range and the consumer started over.
                    raise LogLost(
                        f"offset {start} of {tp.topic}/{tp.partition} is no longer in the "
                        f"log, which now starts again at offset {messages[0].offset}: "
                        "the log lost records"
                    )
                batch = [message for message in messages if message.offset < stop]
                if batch:
                    deadline = loop.time() + read_timeout
                    yield batch
                elif loop.time() > deadline:
                    raise TransientStorageError(
                        f"no progress reading {tp.topic}/{tp.partition} at offset {position} "
                        f"for {read_timeout} s"
                    )
                elif await lane.slow_down():
                    consumer = lane.consumer
                    consumer.seek(tp, position)
                    consumer.resume(tp)
        finally:
            lane.consumer.pause(tp)
            _drop_prefetched(lane.consumer, tp, start)


async def follow(
    new_consumer: Callable[[], AIOKafkaConsumer],
    tp: TopicPartition,
    start: int,
    convert: Callable[[int, Any], _R],
    what: str,
) -> AsyncIterator[Sequence[_R]]:
    """Yield the records of ``tp`` from ``start`` on as ``convert(partition, message)``
    makes them, waiting for new ones, until cancelled, with a consumer of its own made by
    ``new_consumer`` when the first batch is asked for. Broker errors are transient
    (``what`` failed)."""
    consumer = new_consumer()
    try:
        with transient(what):
            await consumer.start()
            consumer.assign([tp])
            consumer.seek(tp, max(start, 0))
            while True:
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=READ_BATCH)
                batch = [convert(tp.partition, message) for message in fetched.get(tp, ())]
                if batch:
                    yield batch
    finally:
        await consumer.stop()


async def end_offset(lane: Lane, tp: TopicPartition) -> int:
    """The true end of ``tp``: the high watermark of a fetch of its last record.

    ListOffsets alone is not trusted: some Kafka-protocol brokers answer it with the base
    offset of the last batch plus one.
    """
    with transient(f"end offset of {tp.topic}/{tp.partition}"):
        async with lane.lock:
            consumer = lane.consumer
            reported: int = (await consumer.end_offsets([tp]))[tp]
            if reported == 0:
                return 0
            while True:
                consumer.seek(tp, reported - 1)
                consumer.resume(tp)
                try:
                    fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
                finally:
                    consumer.pause(tp)
                    highwater: int | None = consumer.highwater(tp)
                    _drop_prefetched(consumer, tp, reported - 1)
                if fetched.get(tp) or not await lane.slow_down():
                    break
                consumer = lane.consumer
    return max(reported, highwater or 0)


async def beginning_offsets(lane: Lane, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The first offset still in each of ``tps``."""
    with transient("beginning offsets"):
        async with lane.lock:
            found: dict[TopicPartition, int] = await lane.consumer.beginning_offsets(tps)
    return found


def _drop_prefetched(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    """Discard what the consumer prefetched for the paused ``tp`` beyond what was read.

    aiokafka holds back every fetch to a broker while a partition of it has unconsumed
    prefetched records, for up to 100 ms (its prefetch backoff): a read that stopped
    short of the data fetched would delay the next read of any other partition. A seek
    drops the buffered records, and a fetch still in flight is discarded on arrival
    because its offset no longer matches; every read seeks before it fetches anyway.
    """
    consumer.seek(tp, offset)
