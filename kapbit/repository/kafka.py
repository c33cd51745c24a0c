"""The Kafka repository: kapbit's log in a Kafka topic, on aiokafka.

Records: key = workflow id, value = encoded event, headers = event kind and writer node.
The producer uses ``acks="all"`` and neither idempotence nor transactions, so it works on
any Kafka-protocol broker. Fencing lives in the log (see DESIGN.md): an append is
acknowledged only once every offset between this node's ``ActiveWriter`` and the record is
known to be harmless. Its own acknowledgements usually arrive contiguous, so a confirmed
frontier just moves forward; only a gap (another writer's record, a duplicate from a
producer retry) is read back, in one fetch that returns at once because the data exists.

A log that loses records under a running instance (a broker restarted without its data, a
topic deleted and created again) shows itself by offsets: an acknowledgement at or below
one this node already had, a log end below it, a read that the broker moved back to the
start. Each raises :class:`~kapbit.errors.LogLost`, and the partition accepts nothing more.

Checkpoints live in a second, compacted topic (``<topic>-checkpoints`` by default), keyed
by log (``<topic>/<partition>``), so several logs may share one checkpoint topic.

Every error leaving the repository is a :mod:`kapbit.errors` type: aiokafka's errors and
timeouts are mapped (:func:`_transient`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
)
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from kapbit._log import fields
from kapbit.errors import (
    Fenced,
    LogLost,
    PayloadTooLarge,
    RecordRejected,
    StartupError,
    TransientStorageError,
)
from kapbit.events import EventKind
from kapbit.repository.base import Checkpoint, Record

logger = logging.getLogger("kapbit.kafka")

KIND_HEADER = "kapbit-kind"
NODE_HEADER = "kapbit-node"
_ACTIVE_WRITER = EventKind.ACTIVE_WRITER.value
_KINDS = frozenset(kind.value for kind in EventKind)
_REJECTIONS = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
_READ_BATCH = 10_000
#: Room for the record's key, headers and batch framing above ``max_payload``.
_RECORD_OVERHEAD = 16 * 1024
#: Defaults of every aiokafka client (``client_options`` override them). They decide how
#: fast an unreachable broker is noticed: a request fails after ``request_timeout_ms``
#: (aiokafka's own default, 40 s, would keep callers waiting long after the storage
#: breaker should have opened), a failed connection is retried after ``retry_backoff_ms``,
#: and a moved partition leader is looked up again after ``metadata_max_age_ms``.
CLIENT_DEFAULTS: dict[str, Any] = {
    "request_timeout_ms": 5_000,
    "retry_backoff_ms": 100,
    "metadata_max_age_ms": 60_000,
}


class _PartitionFence:
    """This node's claim on one partition and the frontier of confirmed offsets."""

    __slots__ = (
        "acked",
        "claim_offset",
        "fenced",
        "frontier",
        "gap_reader",
        "highest",
        "node",
        "waiters",
    )

    def __init__(self) -> None:
        self.node: str | None = None
        self.claim_offset = -1
        self.frontier = -1
        #: The highest offset Kafka acknowledged to this node: the log holds at least that.
        self.highest = -1
        self.acked: set[int] = set()
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.fenced: Fenced | None = None
        self.gap_reader: asyncio.Task[None] | None = None

    def claim(self, node: str, offset: int) -> None:
        self.node = node
        self.claim_offset = offset
        self.frontier = offset
        self.acked = {o for o in self.acked if o > offset}
        self.fenced = None
        self.advance()

    def advance(self) -> None:
        """Move the frontier over contiguous known offsets and release their waiters."""
        acked = self.acked
        frontier = self.frontier
        while frontier + 1 in acked:
            frontier += 1
            acked.discard(frontier)
        self.frontier = frontier
        if self.waiters:
            for offset in [o for o in self.waiters if o <= frontier]:
                waiter = self.waiters.pop(offset)
                if not waiter.done():
                    waiter.set_result(offset)

    def fence(self, error: Fenced, at: int) -> None:
        """A foreign ActiveWriter sits at ``at``: everything of ours after it is void."""
        self.fenced = error
        self.frontier = max(self.frontier, at - 1)
        self.advance()
        for offset, waiter in list(self.waiters.items()):
            if offset > at and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()
        self.waiters.clear()

    def lose(self, error: LogLost) -> None:
        """The log lost records: every pending and future append of this node fails."""
        if self.fenced is None or not isinstance(self.fenced, LogLost):
            logger.critical("%s", error, extra=fields())
            self.fenced = error
        _fail(list(self.waiters.values()), self.fenced)
        self.waiters.clear()

    def check_end(self, partition: int, end: int, acknowledged: int) -> None:
        """Raise LogLost if the log ends at or below ``acknowledged``, an offset Kafka had
        acknowledged to this node before the end was asked for."""
        if end <= acknowledged:
            error = LogLost(
                f"the log of partition {partition} ends at offset {end}, but offset "
                f"{acknowledged} was acknowledged to node {self.node!r}: the log lost records "
                "(broker data lost, or the topic deleted and created again); stopping"
            )
            self.lose(error)
            raise error

    def delivered(self, partition: int, base: int, count: int) -> LogLost | None:
        """Record the acknowledged offsets ``base .. base+count-1`` of one batch; a batch
        at or below an earlier acknowledgement means the log lost records.

        aiokafka has one batch per partition in flight at a time, so a healthy log
        acknowledges this node's batches at rising offsets."""
        if base <= self.highest:
            self.lose(
                LogLost(
                    f"Kafka acknowledged a write to partition {partition} at offset {base}, "
                    f"at or below offset {self.highest} it had acknowledged to node "
                    f"{self.node!r} before: the log lost records (broker data lost, or the "
                    "topic deleted and created again); stopping"
                )
            )
            assert isinstance(self.fenced, LogLost)
            return self.fenced
        self.highest = base + count - 1
        return None


class _Lane:
    """A long-lived consumer and the lock serialising its reads. Every partition it reads
    is assigned and paused: a read seeks and resumes one, then pauses it again, so nothing
    polls in the background.

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


_Pending = tuple[bytes, bytes, list[tuple[str, bytes]], "asyncio.Future[int]"]


class _Outbox:
    """Records waiting to be sent to one partition; sent together as one batch."""

    __slots__ = ("flusher", "pending")

    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self.flusher: asyncio.Task[None] | None = None


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
        if partitions is not None and partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.checkpoint_topic = checkpoint_topic or f"{topic}-checkpoints"
        self.max_payload = max_payload
        self.read_timeout = read_timeout
        self._requested_partitions = partitions
        self._replication_factor = replication_factor
        self._create_topic = create_topic
        self._client_options = {**CLIENT_DEFAULTS, **(client_options or {})}
        self._producer_options = dict(producer_options or {})
        self._consumer_options = dict(consumer_options or {})
        self._partitions = partitions or 0
        self._producer: AIOKafkaProducer | None = None
        self._reader: _Lane | None = None
        self._confirmer: _Lane | None = None
        self._fences: list[_PartitionFence] = []
        self._outboxes: list[_Outbox] = []
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def partitions(self) -> int:
        if not self._partitions:
            raise StartupError(f"the partition count of {self.topic!r} is known after start()")
        return self._partitions

    async def start(self) -> None:
        """Connect, create or check the topics, start the clients. Idempotent."""
        if self._started:
            return
        await self._ensure_topics()
        self._fences = [_PartitionFence() for _ in range(self._partitions)]
        self._outboxes = [_Outbox() for _ in range(self._partitions)]
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=False,
            max_request_size=self.max_payload + _RECORD_OVERHEAD,
            **{
                "linger_ms": 0,
                "max_batch_size": 1_048_576,
                **self._client_options,
                **self._producer_options,
            },
        )
        log_partitions = [TopicPartition(self.topic, p) for p in range(self._partitions)]
        # The confirmer reads small gaps near the end: tansu holds a fetch for its whole
        # max wait while it finds more records, so it starts at 1 ms.
        max_wait_ms = min(1_000, int(self._client_options["request_timeout_ms"]) // 2)
        self._reader = _Lane(
            self._new_consumer,
            20,
            max_wait_ms,
            [*log_partitions, TopicPartition(self.checkpoint_topic, 0)],
        )
        self._confirmer = _Lane(self._new_consumer, 1, max_wait_ms, log_partitions)
        try:
            await self._producer.start()
            await self._reader.start()
            await self._confirmer.start()
            await self._check_records(log_partitions)
        except (KafkaError, OSError, TimeoutError, TransientStorageError) as exc:
            await self.close()
            raise StartupError(
                f"cannot connect to Kafka at {self.bootstrap_servers}: {exc}"
            ) from exc
        except BaseException:
            await self.close()
            raise
        self._started = True

    async def _check_records(self, partitions: list[TopicPartition]) -> None:
        """Refuse a topic another application writes, before anything is written into it:
        the first record of every non-empty partition must carry kapbit's kind header."""
        assert self._reader is not None
        async with self._reader.lock:
            begins = await self._reader.consumer.beginning_offsets(partitions)
        for tp in partitions:
            start = begins[tp]
            if await self._end_offset(tp) <= start:
                continue
            first = [
                record
                async for batch in self._fetch(self._reader, tp.partition, start, start + 1)
                for record in batch
            ]
            if first and first[0].kind not in _KINDS:
                raise StartupError(
                    f"topic {self.topic!r} is not a kapbit log: its record at partition "
                    f"{tp.partition}, offset {first[0].offset} has no {KIND_HEADER!r} header "
                    "naming a kapbit event; refusing to write into it"
                )

    async def close(self) -> None:
        """Stop the clients; idempotent. Pending confirmations fail as transient."""
        self._started = False
        for outbox in self._outboxes:
            if outbox.flusher is not None:
                outbox.flusher.cancel()
            _fail(
                [waiter for *_, waiter in outbox.pending],
                TransientStorageError("repository closed"),
            )
            outbox.pending.clear()
        for fence in self._fences:
            if fence.gap_reader is not None:
                fence.gap_reader.cancel()
            for waiter in fence.waiters.values():
                if not waiter.done():
                    waiter.set_exception(TransientStorageError("repository closed"))
                    waiter.exception()
            fence.waiters.clear()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        for lane in (self._reader, self._confirmer):
            if lane is not None:
                await lane.stop()
        self._producer = None
        self._reader = self._confirmer = None

    def _new_consumer(self, fetch_max_wait_ms: int = 20) -> AIOKafkaConsumer:
        options: dict[str, Any] = {
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_partition_fetch_bytes": max(1_048_576, self.max_payload + _RECORD_OVERHEAD),
            "fetch_max_bytes": 64 * 1_048_576,
            **self._client_options,
            **self._consumer_options,
            "fetch_max_wait_ms": fetch_max_wait_ms,
        }
        return AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None, **options)

    async def _ensure_topics(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers, **self._client_options
        )
        try:
            await admin.start()
        except KafkaError as exc:
            raise StartupError(
                f"cannot connect to Kafka at {self.bootstrap_servers}: {exc}"
            ) from exc
        try:
            self._partitions = await self._ensure_topic(
                admin, self.topic, self._requested_partitions, {}
            )
            await self._ensure_topic(admin, self.checkpoint_topic, 1, {"cleanup.policy": "compact"})
        finally:
            await admin.close()

    async def _ensure_topic(
        self,
        admin: AIOKafkaAdminClient,
        topic: str,
        partitions: int | None,
        configs: dict[str, str],
    ) -> int:
        existing = await _partition_count(admin, topic)
        if existing is None:
            if not self._create_topic:
                raise StartupError(f"topic {topic!r} does not exist")
            if partitions is None:
                raise StartupError(
                    f"topic {topic!r} does not exist; give partitions=N to create it"
                )
            try:
                await admin.create_topics(
                    [NewTopic(topic, partitions, self._replication_factor, topic_configs=configs)]
                )
            except TopicAlreadyExistsError:
                pass  # created concurrently by another instance: checked below
            except KafkaError as exc:
                raise StartupError(f"cannot create topic {topic!r}: {exc}") from exc
            existing = await _wait_for_topic(admin, topic)
        if partitions is not None and existing != partitions:
            raise StartupError(
                f"topic {topic!r} has {existing} partitions, but {partitions} were requested"
            )
        return existing

    # --- the log --------------------------------------------------------------------------

    async def append(self, partition: int, kind: str, key: str, node: str, value: bytes) -> int:
        if len(value) > self.max_payload:
            raise PayloadTooLarge(len(value), self.max_payload)
        fence = self._fences[partition]
        if kind != _ACTIVE_WRITER:
            if fence.fenced is not None:
                raise fence.fenced
            if fence.node != node:
                raise Fenced(f"node {node!r} has not claimed partition {partition}")
        offset = await self._send(self.topic, partition, kind, key, node, value)
        if kind == _ACTIVE_WRITER:
            fence.claim(node, offset)
            return offset
        return await self._confirm(partition, fence, offset)

    async def _send(
        self, topic: str, partition: int, kind: str, key: str, node: str, value: bytes
    ) -> int:
        """Queue one record for ``partition`` and return its offset once Kafka acked it.

        Records queued while a batch is being handed to the producer go out together in
        the next batch: one aiokafka batch per partition instead of one send per record.
        """
        if self._producer is None:
            raise TransientStorageError("the Kafka repository is not started")
        outbox = self._outboxes[partition]
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        outbox.pending.append(
            (
                key.encode(),
                value,
                [(KIND_HEADER, kind.encode()), (NODE_HEADER, node.encode())],
                waiter,
            )
        )
        if outbox.flusher is None:
            outbox.flusher = asyncio.create_task(self._flush(topic, partition, outbox))
        return await waiter

    async def _flush(self, topic: str, partition: int, outbox: _Outbox) -> None:
        fence = self._fences[partition]
        producer = self._producer
        records: list[_Pending] = []
        try:
            while outbox.pending and producer is not None:
                records, outbox.pending = outbox.pending, []
                while records:
                    batch = producer.create_batch()
                    taken = 0
                    for key, value, headers, _ in records:
                        if (
                            batch.append(key=key, value=value, timestamp=None, headers=headers)
                            is None
                        ):
                            break
                        taken += 1
                    taken = max(taken, 1)
                    sent, records = records[:taken], records[taken:]
                    try:
                        delivery = await producer.send_batch(batch, topic, partition=partition)
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
            _fail(waiters, _storage_error(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            outbox.flusher = None
            if outbox.pending and self._producer is not None:
                outbox.flusher = asyncio.create_task(self._flush(topic, partition, outbox))

    async def _confirm(self, partition: int, fence: _PartitionFence, offset: int) -> int:
        if offset <= fence.frontier:
            return offset
        fence.acked.add(offset)
        fence.advance()
        if offset <= fence.frontier:
            return offset
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fence.waiters[offset] = waiter
        if fence.gap_reader is None or fence.gap_reader.done():
            fence.gap_reader = asyncio.create_task(self._read_gaps(partition, fence))
        return await waiter

    async def _read_gaps(self, partition: int, fence: _PartitionFence) -> None:
        """Read the offsets below pending acks that this node did not write, and judge them."""
        # Our own acks for the gap may still be on their way: give them one loop turn.
        await asyncio.sleep(0)
        while fence.waiters and fence.fenced is None:
            try:
                await self._scan(partition, fence, max(fence.waiters))
            except LogLost as error:
                fence.lose(error)
                return
            except (KafkaError, OSError, TimeoutError, TransientStorageError) as exc:
                logger.warning(
                    "reading partition %d to confirm writes failed: %r",
                    partition,
                    exc,
                    extra=fields(partition=partition),
                )
                _fail(list(fence.waiters.values()), TransientStorageError(f"confirming: {exc!r}"))
                fence.waiters.clear()
                return

    async def _scan(self, partition: int, fence: _PartitionFence, stop: int) -> None:
        """Judge every offset from the frontier up to ``stop``: a foreign ActiveWriter
        fences this node; anything else (own records, duplicates, zombies) is harmless."""
        start = fence.frontier + 1
        if start >= stop:
            return
        async for batch in self._fetch(self._confirmer, partition, start, stop):
            for record in batch:
                if record.kind == _ACTIVE_WRITER and record.node != fence.node:
                    fence.fence(
                        Fenced(
                            f"node {record.node!r} claimed partition {partition} at "
                            f"offset {record.offset}; node {fence.node!r} is fenced"
                        ),
                        record.offset,
                    )
                    return
        # Every offset below ``stop`` is judged, including any the fetch skipped (control
        # records): the frontier jumps, and what it passed over is not kept.
        fence.frontier = max(fence.frontier, stop - 1)
        fence.acked = {o for o in fence.acked if o > fence.frontier}
        fence.advance()

    async def _fetch(
        self,
        lane: _Lane | None,
        partition: int,
        start: int,
        stop: int,
        topic: str | None = None,
    ) -> AsyncIterator[list[Record]]:
        """Yield the records of ``start <= offset < stop``, all of which exist."""
        if lane is None:
            raise TransientStorageError("the Kafka repository is not started")
        tp = TopicPartition(topic or self.topic, partition)
        async with lane.lock:
            consumer = lane.consumer
            consumer.seek(tp, start)
            consumer.resume(tp)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.read_timeout
            try:
                while (position := await consumer.position(tp)) < stop:
                    fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=_READ_BATCH)
                    messages = fetched.get(tp, ())
                    if messages and messages[0].offset < start:
                        # Offset ``start`` was out of range and the consumer started over.
                        raise LogLost(
                            f"offset {start} of {tp.topic}/{partition} is no longer in the "
                            f"log, which now starts again at offset {messages[0].offset}: "
                            "the log lost records"
                        )
                    batch = [
                        _to_record(partition, message)
                        for message in messages
                        if message.offset < stop
                    ]
                    if batch:
                        deadline = loop.time() + self.read_timeout
                        yield batch
                    elif loop.time() > deadline:
                        raise TransientStorageError(
                            f"no progress reading {tp.topic}/{partition} at offset {position} "
                            f"for {self.read_timeout} s"
                        )
                    elif await lane.slow_down():
                        consumer = lane.consumer
                        consumer.seek(tp, position)
                        consumer.resume(tp)
            finally:
                lane.consumer.pause(tp)
                _drop_prefetched(lane.consumer, tp, start)

    def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        return self._read(partition, start, stop)

    async def _read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        stop = min(stop, await self.end_offset(partition))
        if start >= stop:
            return
        with _transient(f"reading partition {partition} failed"):
            async for batch in self._fetch(self._reader, partition, start, stop):
                yield batch

    async def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        consumer = self._new_consumer()
        tp = TopicPartition(self.topic, partition)
        try:
            with _transient(f"following partition {partition} failed"):
                await consumer.start()
                consumer.assign([tp])
                consumer.seek(tp, start)
                while True:
                    fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=_READ_BATCH)
                    batch = [_to_record(partition, message) for message in fetched.get(tp, ())]
                    if batch:
                        yield batch
        finally:
            await consumer.stop()

    async def end_offset(self, partition: int) -> int:
        return await self._end_offset(TopicPartition(self.topic, partition))

    async def current_owner(self, partition: int) -> str:
        """Read from this node's own claim (or, never having claimed, from the start) to
        the end, and return the latest claimer."""
        fence = self._fences[partition]
        owner = fence.node or ""
        start = fence.claim_offset + 1 if fence.node is not None else 0
        stop = await self.end_offset(partition)
        if start >= stop:
            return owner
        with _transient(f"reading claims of partition {partition}"):
            async for batch in self._fetch(self._reader, partition, start, stop):
                for record in batch:
                    if record.kind == _ACTIVE_WRITER:
                        owner = record.node
        return owner

    async def _end_offset(self, tp: TopicPartition) -> int:
        """The true end of ``tp``: the high watermark of a fetch of its last record.

        ListOffsets alone is not trusted: some Kafka-protocol brokers answer it with the
        base offset of the last batch plus one.
        """
        lane = self._reader
        if lane is None:
            raise TransientStorageError("the Kafka repository is not started")
        with _transient(f"end offset of {tp.topic}/{tp.partition}"):
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

    # --- checkpoints ----------------------------------------------------------------------

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        """Store the checkpoint, after making sure this node still owns the partition.

        An instance that was replaced while idle learns it here, instead of writing a
        checkpoint older than the new owner's (safe, but recovery would read more).
        """
        if self._producer is None:
            raise TransientStorageError("the Kafka repository is not started")
        fence = self._fences[partition]
        if fence.node is not None:
            if fence.fenced is None:
                with _transient("checking ownership"):
                    acknowledged = fence.highest
                    end = await self.end_offset(partition)
                    fence.check_end(partition, end, acknowledged)
                    await self._scan(partition, fence, end)
            if fence.fenced is not None:
                raise fence.fenced
        with _transient("saving checkpoint failed"):
            await self._producer.send_and_wait(
                self.checkpoint_topic,
                msgspec.json.encode(checkpoint),
                key=self._checkpoint_key(partition).encode(),
                partition=0,
            )

    def _checkpoint_key(self, partition: int) -> str:
        return f"{self.topic}/{partition}"

    async def load_checkpoints(self) -> dict[int, Checkpoint]:
        """The checkpoints of this log; those of other logs sharing the topic are skipped."""
        with _transient("loading checkpoints failed"):
            return await self._load_checkpoints()

    async def _load_checkpoints(self) -> dict[int, Checkpoint]:
        lane = self._reader
        if lane is None:
            raise TransientStorageError("the Kafka repository is not started")
        tp = TopicPartition(self.checkpoint_topic, 0)
        checkpoints: dict[int, Checkpoint] = {}
        async with lane.lock:
            start = (await lane.consumer.beginning_offsets([tp]))[tp]
        stop = await self._end_offset(tp)
        if start >= stop:
            return checkpoints
        async for batch in self._fetch(lane, 0, start, stop, topic=self.checkpoint_topic):
            for record in batch:
                log, _, partition = record.key.rpartition("/")
                if log != self.topic:
                    continue
                try:
                    checkpoints[int(partition)] = msgspec.json.decode(record.value, type=Checkpoint)
                except (ValueError, msgspec.DecodeError) as exc:
                    logger.warning(
                        "ignoring unreadable checkpoint at offset %d: %s",
                        record.offset,
                        exc,
                        extra=fields(),
                    )
        return {p: c for p, c in checkpoints.items() if p < self._partitions}


def _delivered(
    partition: int, fence: _PartitionFence, sent: list[_Pending], delivery: asyncio.Future[Any]
) -> None:
    """Resolve the waiters of one batch: record ``i`` sits at the batch's base offset + i."""
    if delivery.cancelled():
        _fail([waiter for *_, waiter in sent], TransientStorageError("delivery cancelled"))
        return
    error = delivery.exception()
    if error is not None:
        _fail([waiter for *_, waiter in sent], _storage_error(error))
        return
    base: int = delivery.result().offset
    lost = fence.delivered(partition, base, len(sent))
    if lost is not None:
        _fail([waiter for *_, waiter in sent], lost)
        return
    for index, (*_, waiter) in enumerate(sent):
        if not waiter.done():
            waiter.set_result(base + index)


def _drop_prefetched(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    """Discard what the consumer prefetched for the paused ``tp`` beyond what was read.

    aiokafka holds back every fetch to a broker while a partition of it has unconsumed
    prefetched records, for up to 100 ms (its prefetch backoff): a read that stopped
    short of the data fetched would delay the next read of any other partition. A seek
    drops the buffered records, and a fetch still in flight is discarded on arrival
    because its offset no longer matches; every read seeks before it fetches anyway.
    """
    consumer.seek(tp, offset)


@contextlib.contextmanager
def _transient(what: str) -> Iterator[None]:
    """Map aiokafka's errors and timeouts (and socket errors) to TransientStorageError."""
    try:
        yield
    except (KafkaError, OSError, TimeoutError) as exc:
        raise TransientStorageError(f"{what}: {exc!r}") from exc


def _storage_error(exc: BaseException) -> Exception:
    """Map an aiokafka error to the engine's kinds: rejection or transient."""
    if isinstance(exc, _REJECTIONS):
        return RecordRejected(f"Kafka refused the record: {exc}")
    if isinstance(exc, KafkaError) and not getattr(exc, "retriable", False):
        logger.error("Kafka error on append: %r", exc, extra=fields())
    return TransientStorageError(f"Kafka append failed: {exc!r}")


def _fail(waiters: list[asyncio.Future[int]], error: Exception) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)
            waiter.exception()  # whoever awaited it has it; nobody else must warn


def _to_record(partition: int, message: Any) -> Record:
    kind = node = ""
    for name, value in message.headers or ():
        if name == KIND_HEADER:
            kind = value.decode()
        elif name == NODE_HEADER:
            node = value.decode()
    key = message.key.decode() if message.key is not None else ""
    return Record(partition, message.offset, kind, key, node, message.value or b"")


async def _partition_count(admin: AIOKafkaAdminClient, topic: str) -> int | None:
    try:
        # Listing first: describing a missing topic may auto-create it on some brokers.
        if topic not in await admin.list_topics():
            return None
        described = await admin.describe_topics([topic])
    except KafkaError as exc:
        raise StartupError(f"cannot describe topic {topic!r}: {exc}") from exc
    for entry in described:
        if entry.get("topic") == topic:
            error = entry.get("error_code", 0)
            if error == 3:  # UNKNOWN_TOPIC_OR_PARTITION
                return None
            if error:
                raise StartupError(f"topic {topic!r} cannot be used: Kafka error code {error}")
            return len(entry.get("partitions", ()))
    return None


async def _wait_for_topic(admin: AIOKafkaAdminClient, topic: str) -> int:
    """Wait for a topic just created to show up in the metadata."""
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_result(lambda count: not count),
            stop=stop_after_delay(10),
            wait=wait_fixed(0.1),
        ):
            with attempt:
                count = await _partition_count(admin, topic)
            if not attempt.retry_state.outcome.failed:  # type: ignore[union-attr]
                attempt.retry_state.set_result(count)
    except RetryError:
        raise StartupError(f"topic {topic!r} was created but does not show up") from None
    assert count is not None
    return count
