"""Topic administration: create or check the log and checkpoint topics, and refuse a topic
that another application writes before anything is written into it."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_after_delay, wait_fixed

from kapbit.errors import StartupError
from kapbit.repository.base import Checkpoint
from kapbit.repository.kafka.reads import Lane, beginning_offsets, end_offset, fetch
from kapbit.repository.kafka.records import KIND_HEADER, parse

#: Checkpoint keys: ``<topic>/<partition>``, or a bare partition (before logs named them).
_CHECKPOINT_KEY = re.compile(r"(.+/)?[0-9]+")
#: Snapshot chunk keys: ``<topic>/<partition>/snapshot/<slot>/<index>``.
_CHUNK_KEY = re.compile(r"[^/]+/[0-9]+/snapshot/[^/]+/[0-9]+")


async def ensure_topics(
    bootstrap_servers: str | list[str],
    client_options: dict[str, Any],
    topic: str,
    partitions: int | None,
    checkpoint_topic: str,
    *,
    create: bool,
    replication_factor: int,
) -> int:
    """Create the log and checkpoint topics when missing (if ``create``), check the log's
    partition count against ``partitions`` when given; the log's partition count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_options)
    try:
        await admin.start()
    except KafkaError as exc:
        raise StartupError(f"cannot connect to Kafka at {bootstrap_servers}: {exc}") from exc
    try:
        count = await _ensure_topic(admin, topic, partitions, {}, create, replication_factor)
        await _ensure_topic(
            admin, checkpoint_topic, 1, {"cleanup.policy": "compact"}, create, replication_factor
        )
    finally:
        await admin.close()
    return count


async def check_records(
    lane: Lane, partitions: list[TopicPartition], checkpoints: TopicPartition, read_timeout: float
) -> None:
    """Refuse topics another application writes, before anything is written into them: the
    first record of every non-empty log partition must carry kapbit's kind header, and the
    first record of the checkpoint topic must be a checkpoint keyed by log (or a snapshot
    chunk keyed by log)."""
    for tp, message in await _first_records(lane, partitions, read_timeout):
        if parse(tp.partition, message) is None:
            raise StartupError(
                f"topic {tp.topic!r} is not a kapbit log: its record at partition "
                f"{tp.partition}, offset {message.offset} has no {KIND_HEADER!r} header "
                "naming a kapbit event; refusing to write into it"
            )
    for _, record in await _first_records(lane, [checkpoints], read_timeout):
        key = record.key.decode(errors="replace") if record.key is not None else ""
        if _CHUNK_KEY.fullmatch(key) is not None:
            continue  # a snapshot's chunk, written before the checkpoint naming it
        try:
            msgspec.json.decode(record.value or b"", type=Checkpoint)
        except msgspec.DecodeError:
            valid = False
        else:
            valid = _CHECKPOINT_KEY.fullmatch(key) is not None
        if not valid:
            raise StartupError(
                f"topic {checkpoints.topic!r} does not hold kapbit checkpoints: its record at "
                f"offset {record.offset} is not a checkpoint keyed '<topic>/<partition>'; "
                "refusing to write into it"
            )


async def _first_records(
    lane: Lane, partitions: list[TopicPartition], read_timeout: float
) -> list[tuple[TopicPartition, Any]]:
    """The first aiokafka record of each non-empty partition of ``partitions``."""
    begins = await beginning_offsets(lane, partitions)
    first: list[tuple[TopicPartition, Any]] = []
    for tp in partitions:
        start = begins[tp]
        if await end_offset(lane, tp) > start:
            first.extend(
                [
                    (tp, record)
                    async for batch in fetch(lane, tp, start, start + 1, read_timeout)
                    for record in batch
                ]
            )
    return first


async def _ensure_topic(
    admin: AIOKafkaAdminClient,
    topic: str,
    partitions: int | None,
    configs: dict[str, str],
    create: bool,
    replication_factor: int,
) -> int:
    existing = await _partition_count(admin, topic)
    if existing is None:
        if not create:
            raise StartupError(f"topic {topic!r} does not exist")
        if partitions is None:
            raise StartupError(f"topic {topic!r} does not exist; give partitions=N to create it")
        try:
            await admin.create_topics(
                [NewTopic(topic, partitions, replication_factor, topic_configs=configs)]
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
