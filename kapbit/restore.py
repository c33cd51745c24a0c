"""Recovery: rebuilding a partition's state from its log at instance start.

Per partition, after this node appended its ``ActiveWriter`` at ``claim_offset``:

1. read ``[checkpoint.window_offset, checkpoint.offset)`` for workflow ids only, to refill
   the idempotency window (no payload is decoded there);
2. read ``[checkpoint.offset, claim_offset)`` in full: every workflow created there that has
   no terminal event is in flight, with the outcomes it has persisted.

Zombie writes are skipped and second copies of an event (a producer retry) ignored, so
the work done depends on the checkpoint lag and the window size, not the log's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from kapbit.codecs import Codec
from kapbit.errors import CorruptRecord, DecodeError
from kapbit.events import (
    EVENT_TYPES,
    TERMINAL_KINDS,
    EventKind,
    StepOutcome,
    WorkflowCreated,
    WorkflowRetry,
)
from kapbit.fencing import OwnerTracker
from kapbit.repository import Checkpoint, Record, Repository


@dataclass(slots=True)
class RestoredWorkflow:
    """A workflow found in flight: created, not terminated."""

    id: str
    type: str
    created_offset: int
    input: msgspec.Raw
    outcomes: list[tuple[int, StepOutcome]] = field(default_factory=list)
    attempts: int = 0
    last_error: str = ""


@dataclass(slots=True)
class RestoredPartition:
    """What recovery learnt about one partition."""

    partition: int
    claim_offset: int
    window: list[tuple[str, int]]
    in_flight: list[RestoredWorkflow]
    owners: OwnerTracker
    records_read: int


def decode_event(codec: Codec, record: Record) -> Any:
    """Decode a record's event, checking it against the record's kind and key."""
    try:
        event_type = EVENT_TYPES[EventKind(record.kind)]
    except ValueError:
        raise CorruptRecord(
            record.partition, record.offset, f"unknown event kind {record.kind!r}"
        ) from None
    try:
        event = codec.decode(record.value, event_type)
    except DecodeError as exc:
        raise CorruptRecord(record.partition, record.offset, str(exc)) from exc
    key = getattr(event, "id", None)
    if key is not None and key != record.key:
        raise CorruptRecord(
            record.partition, record.offset, f"event id {key!r} does not match key {record.key!r}"
        )
    return event


async def restore_partition(
    repository: Repository,
    codec: Codec,
    partition: int,
    claim_offset: int,
    checkpoint: Checkpoint,
    window_size: int,
) -> RestoredPartition:
    """Read what recovery needs of ``partition`` and rebuild its state."""
    start = min(checkpoint.window_offset, checkpoint.offset)
    owners = OwnerTracker(
        checkpoint.window_owner if start < checkpoint.offset else checkpoint.owner
    )
    window: list[tuple[str, int]] = []
    read = 0
    created = EventKind.WORKFLOW_CREATED.value

    async for batch in repository.read(partition, start, checkpoint.offset):
        read += len(batch)
        for record in batch:
            if owners.admit(record) and record.kind == created:
                window.append((record.key, record.offset))

    seen = {workflow_id for workflow_id, _ in window}
    open_workflows: dict[str, RestoredWorkflow] = {}
    async for batch in repository.read(partition, checkpoint.offset, claim_offset):
        read += len(batch)
        for record in batch:
            if not owners.admit(record) or record.kind == EventKind.ACTIVE_WRITER:
                continue
            if record.kind == created:
                if record.key in seen:
                    continue  # a second copy of a WorkflowCreated
                seen.add(record.key)
                event = decode_event(codec, record)
                assert isinstance(event, WorkflowCreated)
                window.append((record.key, record.offset))
                open_workflows[record.key] = RestoredWorkflow(
                    event.id, event.type, record.offset, event.input
                )
                continue
            workflow = open_workflows.get(record.key)
            if workflow is None:
                # Terminated already, created before the checkpoint (also terminated), or
                # a duplicate: nothing to resume. Still decode it, so corruption is seen.
                decode_event(codec, record)
                continue
            event = decode_event(codec, record)
            if record.kind in TERMINAL_KINDS:
                del open_workflows[record.key]
            elif isinstance(event, StepOutcome):
                if not any(
                    o.step == event.step and o.phase == event.phase for _, o in workflow.outcomes
                ):
                    workflow.outcomes.append((record.offset, event))
            elif isinstance(event, WorkflowRetry) and event.attempt > workflow.attempts:
                workflow.attempts = event.attempt
                workflow.last_error = event.error

    return RestoredPartition(
        partition=partition,
        claim_offset=claim_offset,
        window=window[-window_size:],
        in_flight=list(open_workflows.values()),
        owners=owners,
        records_read=read,
    )
