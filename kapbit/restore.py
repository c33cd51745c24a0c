"""Recovery: rebuilding a partition's state from its log at instance start.

Per partition, after this node appended its ``ActiveWriter`` at ``claim_offset``:

1. read ``[checkpoint.window_offset, checkpoint.offset)`` for workflow ids only, to refill
   the idempotency window: only the record's kind, key and writer are looked at, no payload
   is decoded there (every workflow created below the checkpoint has terminated);
2. read ``[checkpoint.offset, claim_offset)`` in full: every record is decoded (a record that
   cannot be is a :class:`~kapbit.errors.CorruptRecord` and stops the start), and every
   workflow created there that has no terminal event is in flight, with the outcomes it has
   persisted.

Zombie writes (records of a node written after another node's ``ActiveWriter``) are
skipped, and second copies of an event (a producer retry) are ignored, so the work done
depends on the checkpoint lag and the window size, not the log's length.

A ``WorkflowCreated`` counts as a second copy exactly when the engine would have refused
the id at that point: the id is still in the idempotency window or its workflow is still
open. An id that has left the window may be used again, and then starts a new workflow.
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
from kapbit.idempotency import IdempotencyWindow
from kapbit.repository import Checkpoint, Record, Repository

_ACTIVE_WRITER = EventKind.ACTIVE_WRITER.value
_CREATED = EventKind.WORKFLOW_CREATED.value


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
    """What recovery learnt about one partition.

    ``window`` lists ``(workflow id, created offset)`` of the idempotency window, oldest
    first; ``records_read`` counts the records read, ``records_decoded`` those of them whose
    payload was decoded (only records at or after the checkpoint).
    """

    partition: int
    claim_offset: int
    window: list[tuple[str, int]]
    in_flight: list[RestoredWorkflow]
    owners: OwnerTracker
    records_read: int
    records_decoded: int = 0


def decode_event(codec: Codec, record: Record) -> Any:
    """Decode a record's event, checking it against the record's kind, key and writer."""
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
    node = getattr(event, "node", None)
    if node is not None and node != record.node:
        raise CorruptRecord(
            record.partition,
            record.offset,
            f"active writer {node!r} does not match the record's writer {record.node!r}",
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
    window = IdempotencyWindow(window_size)
    read = decoded = 0

    # 1. Ids only: every workflow created here has terminated; nothing is decoded.
    async for batch in repository.read(partition, start, checkpoint.offset):
        read += len(batch)
        for record in batch:
            kind = record.kind
            if kind == _CREATED:
                if record.node == owners.owner:
                    window.renew(record.key, record.offset)
            elif kind == _ACTIVE_WRITER:
                owners.admit(record)

    # 2. In full, from the checkpoint up to this node's claim.
    open_workflows: dict[str, RestoredWorkflow] = {}
    async for batch in repository.read(partition, checkpoint.offset, claim_offset):
        read += len(batch)
        for record in batch:
            if not owners.admit(record):
                continue  # a zombie write: never acted on
            event = decode_event(codec, record)
            decoded += 1
            kind = record.kind
            if kind == _ACTIVE_WRITER:
                continue
            workflow_id = record.key
            if kind == _CREATED:
                if workflow_id in open_workflows or workflow_id in window:
                    # A second copy: the engine would have refused the id here. It knows
                    # the id at its last copy, so the window does too.
                    window.renew(workflow_id, record.offset)
                    continue
                assert isinstance(event, WorkflowCreated)
                window.add(workflow_id, record.offset)
                open_workflows[workflow_id] = RestoredWorkflow(
                    workflow_id, event.type, record.offset, event.input
                )
                continue
            workflow = open_workflows.get(workflow_id)
            if workflow is None:
                # Terminated already (or created before the checkpoint, hence terminated):
                # a late or second copy, nothing to resume.
                continue
            if kind in TERMINAL_KINDS:
                del open_workflows[workflow_id]
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
        window=list(window.entries()),
        in_flight=list(open_workflows.values()),
        owners=owners,
        records_read=read,
        records_decoded=decoded,
    )
