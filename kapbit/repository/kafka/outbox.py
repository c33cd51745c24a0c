"""Appends batched per partition into aiokafka batches.

Records queued while a batch is being handed to the producer go out together in the next
batch: one aiokafka batch per partition instead of one send per record. A batch's records
get consecutive offsets from the batch's base offset, which the partition's
:class:`~kapbit.repository.kafka.fencing.PartitionFence` is told first (it spots a log
that went backwards).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from aiokafka import AIOKafkaProducer

from kapbit.errors import TransientStorageError
from kapbit.repository.kafka.errors import append_error, fail
from kapbit.repository.kafka.fencing import PartitionFence

Headers = list[tuple[str, bytes]]
_Pending = tuple[bytes, bytes, Headers, "asyncio.Future[int]"]


class _Outbox:
    """Records waiting to be sent to one partition; sent together as one batch."""

    __slots__ = ("flusher", "pending")

    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self.flusher: asyncio.Task[None] | None = None


class Outboxes:
    """The outboxes of every partition of ``topic``, sent through one producer; made
    inside the event loop that uses them."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, fences: list[PartitionFence]):
        self._producer: AIOKafkaProducer | None = producer
        self._topic = topic
        self._fences = fences
        self._outboxes = [_Outbox() for _ in fences]
        self._loop = asyncio.get_running_loop()

    def send(
        self, partition: int, key: bytes, value: bytes, headers: Headers
    ) -> asyncio.Future[int]:
        """Queue one record for ``partition``: a future of its offset once Kafka acked it.

        A plain function returning the future, not a coroutine: an append's wake-up then
        resumes one frame less (this is the hot path of every append)."""
        if self._producer is None:
            raise TransientStorageError("the Kafka repository is closed")
        outbox = self._outboxes[partition]
        waiter: asyncio.Future[int] = self._loop.create_future()
        outbox.pending.append((key, value, headers, waiter))
        if outbox.flusher is None:
            outbox.flusher = self._loop.create_task(self._flush(partition, outbox))
        return waiter

    def close(self) -> None:
        """Stop sending; records not yet handed to the producer fail as transient."""
        self._producer = None
        for outbox in self._outboxes:
            if outbox.flusher is not None:
                outbox.flusher.cancel()
            fail(
                [waiter for *_, waiter in outbox.pending],
                TransientStorageError("repository closed"),
            )
            outbox.pending.clear()

    async def _flush(self, partition: int, outbox: _Outbox) -> None:
        fence = self._fences[partition]
        producer = self._producer
        records: list[_Pending] = []
        try:
            while outbox.pending and producer is not None:
                records, outbox.pending = outbox.pending, []
                while records:
                    batch = producer.create_batch()
                    taken = 0
                    for key, value, record_headers, _ in records:
                        appended = batch.append(
                            key=key, value=value, timestamp=None, headers=record_headers
                        )
                        if appended is None:
                            break
                        taken += 1
                    taken = max(taken, 1)
                    sent, records = records[:taken], records[taken:]
                    try:
                        delivery = await producer.send_batch(
                            batch, self._topic, partition=partition
                        )
                    except BaseException:
                        # Not handed over (e.g. no room in the accumulator before the
                        # request timeout, while the broker is unreachable): fail them too.
                        records = sent + records
                        raise
                    delivery.add_done_callback(
                        functools.partial(_delivered, partition, fence, sent)
                    )
        except BaseException as exc:
            waiters = [waiter for *_, waiter in (*records, *outbox.pending)]
            outbox.pending.clear()
            fail(waiters, append_error(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            outbox.flusher = None
            if outbox.pending and self._producer is not None:
                outbox.flusher = asyncio.create_task(self._flush(partition, outbox))


def _delivered(
    partition: int, fence: PartitionFence, sent: list[_Pending], delivery: asyncio.Future[Any]
) -> None:
    """Resolve the waiters of one batch: record ``i`` sits at the batch's base offset + i."""
    if delivery.cancelled():
        fail([waiter for *_, waiter in sent], TransientStorageError("delivery cancelled"))
        return
    error = delivery.exception()
    if error is not None:
        fail([waiter for *_, waiter in sent], append_error(error))
        return
    base: int = delivery.result().offset
    lost = fence.delivered(partition, base, len(sent))
    if lost is not None:
        fail([waiter for *_, waiter in sent], lost)
        return
    for offset, (_, _, _, waiter) in enumerate(sent, base):
        if not waiter.done():
            waiter.set_result(offset)
