"""KafkaRepository: the front that puts the Kafka package's parts together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kapbit._checks import at_least_one
from kapbit.errors import (
    Fenced,
    PayloadTooLarge,
    StartupError,
    StorageError,
    TransientStorageError,
)
from kapbit.events import EventKind
from kapbit.fencing import OwnerTracker, ordinary
from kapbit.placement import GroupOptions, Placement
from kapbit.repository.base import Checkpoint, Record
from kapbit.repository.kafka.admin import check_records, ensure_topics
from kapbit.repository.kafka.checkpoints import CheckpointStore
from kapbit.repository.kafka.clients import (
    new_consumer,
    new_producer,
    start_clients,
    stop_clients,
    with_defaults,
)
from kapbit.repository.kafka.errors import transient
from kapbit.repository.kafka.fencing import Confirmer, PartitionFence
from kapbit.repository.kafka.outbox import Outboxes
from kapbit.repository.kafka.reads import Lane, end_offset, fetch_records, follow
from kapbit.repository.kafka.records import headers, to_record

#: Room for the record's key, headers and batch framing above ``max_payload``.
_RECORD_OVERHEAD = 16 * 1024


class _Started:
    """The parts of a started repository."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        reader: Lane,
        confirmer_lane: Lane,
        fences: list[PartitionFence],
        outboxes: Outboxes,
        confirmer: Confirmer,
        checkpoints: CheckpointStore,
    ) -> None:
        self.producer = producer
        self.reader = reader
        self.confirmer_lane = confirmer_lane
        self.fences = fences
        self.outboxes = outboxes
        self.confirmer = confirmer
        self.checkpoints = checkpoints


class KafkaRepository:
    """A kapbit log in the Kafka topic ``topic``.

    ``partitions`` is required to create the topic; for an existing topic it is checked
    (a mismatch refuses to start) or, when ``None``, read from the topic.
    ``client_options`` go to every aiokafka client (TLS: ``security_protocol``,
    ``ssl_context``; SASL: ``sasl_mechanism``, ``sasl_plain_username``, ...);
    ``producer_options`` and ``consumer_options`` only to those clients. A read that
    makes no progress for ``read_timeout`` seconds (broker unreachable) fails as transient.
    :data:`CLIENT_DEFAULTS` apply to every client unless ``client_options`` say otherwise.
    """

    def __init__(
        self,
        bootstrap_servers: str | list[str],
        topic: str,
        *,
        partitions: int | None = None,
        replication_factor: int = 1,
        create_topic: bool = True,
        checkpoint_topic: str | None = None,
        max_payload: int = 1_000_000,
        read_timeout: float = 10.0,
        client_options: Mapping[str, Any] | None = None,
        producer_options: Mapping[str, Any] | None = None,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        at_least_one(partitions=partitions)
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.checkpoint_topic = checkpoint_topic or f"{topic}-checkpoints"
        self.max_payload = max_payload
        self.read_timeout = read_timeout
        self._requested_partitions = partitions
        self._replication_factor = replication_factor
        self._create_topic = create_topic
        self._client_options = with_defaults(client_options)
        self._producer_options = dict(producer_options or {})
        self._consumer_options = dict(consumer_options or {})
        self._partitions = partitions or 0
        self._parts: _Started | None = None
        self._users = 0  # starts not yet closed: the last close releases the clients
        self._fences: list[PartitionFence] = []
        self._headers: dict[tuple[EventKind, str], list[tuple[str, bytes]]] = {}

    def group_placement(self, options: GroupOptions) -> Placement:
        """The membership of one instance in the consumer group ``options.name`` on this
        log (group mode, :class:`~kapbit.GroupOptions`); same brokers and client options."""
        from kapbit.repository.kafka.group import GroupMembership  # group imports this module

        return GroupMembership(
            self.bootstrap_servers,
            self.topic,
            options.name,
            endpoint=options.endpoint,
            session_timeout=options.session_timeout,
            heartbeat_interval=options.heartbeat_interval,
            client_options=self._client_options,
        )

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def partitions(self) -> int:
        if not self._partitions:
            raise StartupError(f"the partition count of {self.topic!r} is known after start()")
        return self._partitions

    async def start(self) -> None:
        """Connect, create or check the topics, start the clients.

        Each start is paired with a :meth:`close` by whoever called it; a repository
        shared (an instance and a projector) stays connected until its last close."""
        if self._parts is not None:
            self._users += 1
            return
        self._partitions = await ensure_topics(
            self.bootstrap_servers,
            self._client_options,
            self.topic,
            self._requested_partitions,
            self.checkpoint_topic,
            create=self._create_topic,
            replication_factor=self._replication_factor,
        )
        producer = new_producer(
            self.bootstrap_servers,
            {**self._client_options, **self._producer_options},
            max_request_size=self.max_payload + _RECORD_OVERHEAD,
            max_batch_size=1_048_576,
        )
        log_partitions = [TopicPartition(self.topic, p) for p in range(self._partitions)]
        max_wait_ms = min(1_000, int(self._client_options["request_timeout_ms"]) // 2)
        reader = Lane(
            self._new_consumer,
            20,
            max_wait_ms,
            [*log_partitions, TopicPartition(self.checkpoint_topic, 0)],
        )
        # The confirmer reads small gaps near the end: tansu holds a fetch for its whole
        # max wait while it finds more records, so it starts at 1 ms.
        confirmer_lane = Lane(self._new_consumer, 1, max_wait_ms, log_partitions)
        await start_clients(
            self.bootstrap_servers,
            [producer, reader, confirmer_lane],
            lambda: check_records(
                reader,
                log_partitions,
                TopicPartition(self.checkpoint_topic, 0),
                self.read_timeout,
            ),
        )
        fences = [PartitionFence() for _ in range(self._partitions)]
        self._fences = fences
        self._parts = _Started(
            producer,
            reader,
            confirmer_lane,
            fences,
            Outboxes(producer, self.topic, fences),
            Confirmer(self.topic, fences, confirmer_lane, self.read_timeout),
            CheckpointStore(
                self.topic,
                self._partitions,
                self.checkpoint_topic,
                producer,
                reader,
                self.read_timeout,
            ),
        )
        self._users = 1

    async def close(self) -> None:
        """Close one start; the last stops the clients (more closes change nothing).
        Pending confirmations fail as transient."""
        if self._users > 1:
            self._users -= 1
            return
        self._users = 0
        parts, self._parts = self._parts, None
        if parts is None:
            return
        parts.outboxes.close()
        parts.confirmer.close()
        await stop_clients([parts.producer, parts.reader, parts.confirmer_lane])

    def _new_consumer(self, fetch_max_wait_ms: int = 20) -> AIOKafkaConsumer:
        options: dict[str, Any] = {
            "max_partition_fetch_bytes": max(1_048_576, self.max_payload + _RECORD_OVERHEAD),
            "fetch_max_bytes": 64 * 1_048_576,
            **self._client_options,
            **self._consumer_options,
        }
        return new_consumer(self.bootstrap_servers, options, fetch_max_wait_ms)

    def _started(self, partition: int | None = None) -> _Started:
        """The started parts; raises StorageError for a partition the topic does not have."""
        if self._parts is None:
            raise TransientStorageError("the Kafka repository is not started")
        if partition is not None and not (
            isinstance(partition, int) and 0 <= partition < self._partitions
        ):
            raise StorageError(
                f"topic {self.topic!r} has partitions 0 to {self._partitions - 1}, "
                f"not {partition!r}"
            )
        return self._parts

    # --- the log --------------------------------------------------------------------------

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        record_headers = self._headers.get((kind, node))
        if record_headers is None:
            record_headers = self._headers_of(kind, node)
        if len(value) > self.max_payload:
            raise PayloadTooLarge(len(value), self.max_payload)
        parts = self._parts
        if parts is None or type(partition) is not int or not 0 <= partition < self._partitions:
            parts = self._started(partition)  # raises the error saying what is wrong
        fence = parts.fences[partition]
        if fence.fenced is not None:
            raise fence.fenced
        if fence.node != node:
            raise Fenced(f"node {node!r} has not claimed partition {partition}")
        offset = await parts.outboxes.send(partition, key.encode(), value, record_headers)
        if fence.confirmed(offset):
            return offset
        return await parts.confirmer.confirm(partition, offset)

    def _headers_of(self, kind: EventKind, node: str) -> list[tuple[str, bytes]]:
        """The headers of an append of ``kind`` by ``node`` (refused for a claim), kept for
        the next append: one lookup per append instead of building them."""
        ordinary(kind)
        found = headers(kind, node)
        if len(self._headers) >= 64:  # a few kinds times the nodes of this process
            self._headers.clear()
        self._headers[(kind, node)] = found
        return found

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        if len(value) > self.max_payload:
            raise PayloadTooLarge(len(value), self.max_payload)
        parts = self._started(partition)
        offset = await parts.outboxes.send(
            partition, node.encode(), value, headers(EventKind.ACTIVE_WRITER, node)
        )
        parts.fences[partition].claim(node, offset)
        return offset

    def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        return self._read(partition, start, stop)

    async def _read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        reader = self._started(partition).reader
        start = max(start, 0)
        stop = min(stop, await self.end_offset(partition))
        if start >= stop:
            return
        tp = TopicPartition(self.topic, partition)
        with transient(f"reading partition {partition} failed"):
            async for batch in fetch_records(reader, tp, start, stop, self.read_timeout):
                yield batch

    def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        tp = TopicPartition(self.topic, partition)
        return follow(
            self._new_consumer, tp, start, to_record, f"following partition {partition} failed"
        )

    async def end_offset(self, partition: int) -> int:
        reader = self._started(partition).reader
        return await end_offset(reader, TopicPartition(self.topic, partition))

    async def current_owner(self, partition: int) -> str:
        """Read from this node's own claim (or, never having claimed, from the start) to
        the end, and return the latest claimer."""
        reader = self._started(partition).reader
        fence = self._fences[partition]
        owners = OwnerTracker(fence.node or "")
        start = fence.claim_offset + 1 if fence.node is not None else 0
        stop = await self.end_offset(partition)
        if start >= stop:
            return owners.owner
        tp = TopicPartition(self.topic, partition)
        with transient(f"reading claims of partition {partition}"):
            async for batch in fetch_records(reader, tp, start, stop, self.read_timeout):
                for record in batch:
                    owners.admit(record)
        return owners.owner

    # --- checkpoints ----------------------------------------------------------------------

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        """Store the checkpoint, after making sure this node still owns the partition.

        An instance that was replaced while idle learns it here, instead of writing a
        checkpoint older than the new owner's (safe, but recovery would read more); one
        whose log lost records learns that (LogLost).
        """
        parts = self._started(partition)
        fence = parts.fences[partition]
        if fence.node is not None:
            if fence.fenced is None:
                with transient("checking ownership"):
                    acknowledged = fence.highest
                    end = await self.end_offset(partition)
                    fence.check_end(partition, end, acknowledged)
                    await parts.confirmer.scan(partition, end)
            if fence.fenced is not None:
                raise fence.fenced
        await parts.checkpoints.save(partition, checkpoint)

    async def load_checkpoints(self) -> dict[int, Checkpoint]:
        """The checkpoints of this log; those of other logs sharing the topic are skipped."""
        return await self._started().checkpoints.load()

    @property
    def snapshots(self) -> bool:
        """Snapshot chunks are kept in the checkpoint topic."""
        return True

    async def save_snapshot_chunk(
        self, partition: int, slot: str, index: int, data: bytes | None
    ) -> None:
        await self._started().checkpoints.save_chunk(partition, slot, index, data)

    async def load_snapshot_chunks(self, partition: int, slot: str, count: int) -> list[bytes]:
        return await self._started().checkpoints.load_chunks(partition, slot, count)

    async def snapshot_slots(self, partition: int) -> dict[str, list[int]]:
        return await self._started().checkpoints.slots(partition)
