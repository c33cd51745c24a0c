"""The request log on Kafka: ``<log>-requests``, co-partitioned with the log.

Calls for ids another instance owns travel here (:mod:`kapbit.forwarding`): the topic has
the log's partition count and records are placed by the same partitioner, so request
partition ``p`` holds the requests for the ids of log partition ``p``. Records look like
the log's (key, value, ``kapbit-kind`` and ``kapbit-node`` headers); appends are plain
``acks="all"`` sends, not fenced: which answers count is decided by their readers. Each
partition's progress (where the next serving session resumes) is kept in the log's
compacted checkpoint topic under the key ``<log>-requests/<partition>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kapbit.errors import StartupError, StorageError, TransientStorageError
from kapbit.repository.base import Checkpoint
from kapbit.repository.kafka.admin import ensure_topics
from kapbit.repository.kafka.checkpoints import CheckpointStore
from kapbit.repository.kafka.clients import (
    new_consumer,
    new_producer,
    start_clients,
    stop_clients,
    with_defaults,
)
from kapbit.repository.kafka.errors import BROKER_ERRORS, append_error
from kapbit.repository.kafka.reads import Lane, end_offset, follow
from kapbit.repository.kafka.records import KIND_HEADER, NODE_HEADER
from kapbit.request_log import REQUEST_KINDS, RequestRecord

#: How long a follower's fetch waits for new records: the latency a forwarded call pays
#: twice (the owner reading the request, the caller reading the answer).
_TAIL_WAIT_MS = 2


class KafkaRequestLog:
    """The request log of the kapbit log ``topic``: the topic ``<topic>-requests`` with
    ``partitions`` partitions (the log's; created when missing unless ``create_topic`` is
    false). ``client_options`` go to every aiokafka client, as for
    :class:`~kapbit.repository.kafka.KafkaRepository`."""

    def __init__(
        self,
        bootstrap_servers: str | list[str],
        topic: str,
        *,
        partitions: int | None = None,
        replication_factor: int = 1,
        create_topic: bool = True,
        checkpoint_topic: str | None = None,
        read_timeout: float = 10.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = f"{topic}-requests"
        self.checkpoint_topic = checkpoint_topic or f"{topic}-checkpoints"
        self.read_timeout = read_timeout
        self._requested = partitions
        self._replication_factor = replication_factor
        self._create_topic = create_topic
        self._client_options = with_defaults(client_options)
        self._partitions = partitions or 0
        self._producer: AIOKafkaProducer | None = None
        self._lane: Lane | None = None
        self._progress: CheckpointStore | None = None
        self._users = 0

    @property
    def partitions(self) -> int:
        if not self._partitions:
            raise StartupError(f"the partition count of {self.topic!r} is known after start()")
        return self._partitions

    async def start(self) -> None:
        """Create or check the topic and start the clients (paired with :meth:`close`)."""
        if self._producer is not None:
            self._users += 1
            return
        self._partitions = await ensure_topics(
            self.bootstrap_servers,
            self._client_options,
            self.topic,
            self._requested,
            self.checkpoint_topic,
            create=self._create_topic,
            replication_factor=self._replication_factor,
        )
        producer = new_producer(self.bootstrap_servers, self._client_options)
        partitions = [TopicPartition(self.topic, p) for p in range(self._partitions)]
        lane = Lane(
            self._consumer, 20, 1_000, [*partitions, TopicPartition(self.checkpoint_topic, 0)]
        )
        await start_clients(self.bootstrap_servers, [producer, lane])
        self._producer, self._lane = producer, lane
        self._progress = CheckpointStore(
            self.topic, self._partitions, self.checkpoint_topic, producer, lane, self.read_timeout
        )
        self._users = 1

    async def close(self) -> None:
        """Close one start; the last stops the clients."""
        if self._users > 1:
            self._users -= 1
            return
        self._users = 0
        clients = [client for client in (self._producer, self._lane) if client is not None]
        self._producer = self._lane = None
        await stop_clients(clients)

    def _consumer(self, fetch_max_wait_ms: int = 20) -> AIOKafkaConsumer:
        return new_consumer(self.bootstrap_servers, self._client_options, fetch_max_wait_ms)

    def _started(self, partition: int) -> tuple[AIOKafkaProducer, Lane]:
        if self._producer is None or self._lane is None:
            raise TransientStorageError("the request log is not started")
        if not (isinstance(partition, int) and 0 <= partition < self._partitions):
            raise StorageError(f"{self.topic!r} has no partition {partition!r}")
        return self._producer, self._lane

    async def append(self, partition: int, kind: str, key: str, node: str, value: bytes) -> int:
        producer, _ = self._started(partition)
        try:
            metadata = await producer.send_and_wait(
                self.topic,
                value,
                key=key.encode(),
                partition=partition,
                headers=[(KIND_HEADER, kind.encode()), (NODE_HEADER, node.encode())],
            )
        except BROKER_ERRORS as exc:
            raise append_error(exc) from exc
        offset: int = metadata.offset
        return offset

    def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[RequestRecord]]:
        self._started(partition)
        tp = TopicPartition(self.topic, partition)
        return follow(
            lambda: self._consumer(_TAIL_WAIT_MS),
            tp,
            start,
            _record,
            f"following request partition {partition} failed",
        )

    async def end_offset(self, partition: int) -> int:
        _, lane = self._started(partition)
        return await end_offset(lane, TopicPartition(self.topic, partition))

    async def save_progress(self, partition: int, offset: int) -> None:
        assert self._progress is not None
        await self._progress.save(partition, Checkpoint(offset=offset))

    async def load_progress(self) -> dict[int, int]:
        if self._progress is None:
            raise TransientStorageError("the request log is not started")
        return {p: c.offset for p, c in (await self._progress.load()).items()}


def _record(partition: int, message: Any) -> RequestRecord:
    """The request log record of an aiokafka ``ConsumerRecord`` (kind ``""`` when its kind
    header names none of :data:`~kapbit.forwarding.REQUEST_KINDS`: readers skip it)."""
    kind = node = ""
    for name, value in message.headers or ():
        if name == KIND_HEADER:
            kind = value.decode(errors="replace")
        elif name == NODE_HEADER:
            node = value.decode(errors="replace")
    if kind not in REQUEST_KINDS:
        kind = ""
    key = message.key.decode(errors="replace") if message.key is not None else ""
    return RequestRecord(partition, message.offset, kind, key, node, message.value or b"")
