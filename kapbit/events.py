"""The events that make up the log: one msgspec Struct per kind, tagged by kind.

User values (inputs, outcome values, results) are stored as ``msgspec.Raw``: already
encoded by the codec, decoded with the workflow's declared types only when needed. The
record also carries the kind, workflow id and writer node outside the payload (see
:class:`kapbit.repository.Record`), so readers can filter without decoding.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, TypeAlias

import msgspec


class EventKind(StrEnum):
    """The kind of an event, stored outside its payload (a Kafka header)."""

    ACTIVE_WRITER = "active_writer"
    WORKFLOW_CREATED = "workflow_created"
    STEP_OUTCOME = "step_outcome"
    WORKFLOW_RESULT = "workflow_result"
    WORKFLOW_RETRY = "workflow_retry"
    DEAD_LETTER = "dead_letter"
    REJECTED = "rejected"
    INVALID_RETURN = "invalid_return"


class _Event(msgspec.Struct, frozen=True, tag_field="kind"):
    """Base of every event: frozen, tagged with its kind under ``"kind"``."""


class ActiveWriter(_Event, frozen=True, tag="active_writer"):
    """Instance start: ``node`` now owns the partition; later foreign records are zombies.

    ``node`` is the start's unique writer id (the record's writer): the configured node id,
    which may repeat across starts, ``/`` and a random start id. ``codec`` and ``window``
    (the idempotency window size) tell later readers how this writer encoded records and
    refused ids (empty/0 in claims written before they were recorded).
    """

    node: str
    at: float
    codec: str = ""
    window: int = 0


class WorkflowCreated(_Event, frozen=True, tag="workflow_created"):
    """The workflow was accepted; from here on it will finish, even across crashes."""

    id: str
    type: str
    input: msgspec.Raw
    at: float


class StepOutcome(_Event, frozen=True, tag="step_outcome"):
    """The persisted outcome of step ``step`` in ``phase``."""

    id: str
    step: int
    phase: Literal["execute", "compensate"]
    success: bool
    value: msgspec.Raw
    at: float = 0.0


class WorkflowResult(_Event, frozen=True, tag="workflow_result"):
    """The final result; the workflow is terminated. ``compensated`` after a Failure."""

    id: str
    result: msgspec.Raw
    compensated: bool
    at: float


class WorkflowRetry(_Event, frozen=True, tag="workflow_retry"):
    """The retry worker started attempt ``attempt`` (counts survive restarts)."""

    id: str
    attempt: int
    error: str
    at: float


class DeadLetter(_Event, frozen=True, tag="dead_letter"):
    """The retry worker gave up after ``attempts``; the workflow is terminated."""

    id: str
    attempts: int
    error: str
    at: float


class Rejected(_Event, frozen=True, tag="rejected"):
    """Storage rejected an event of the workflow (``event`` names its kind); terminated."""

    id: str
    event: str
    reason: str
    at: float


class InvalidReturn(_Event, frozen=True, tag="invalid_return"):
    """An action of step ``step`` (``phase``) returned neither ``Success``, ``Failure`` nor
    ``None``: a programming error, so the workflow is terminated at once and the action is
    never run again. ``reason`` names the step and the type it returned."""

    id: str
    step: int
    phase: Literal["execute", "compensate"]
    reason: str
    at: float


Event: TypeAlias = (
    ActiveWriter
    | WorkflowCreated
    | StepOutcome
    | WorkflowResult
    | WorkflowRetry
    | DeadLetter
    | Rejected
    | InvalidReturn
)

EVENT_TYPES: dict[EventKind, type[Event]] = {
    EventKind.ACTIVE_WRITER: ActiveWriter,
    EventKind.WORKFLOW_CREATED: WorkflowCreated,
    EventKind.STEP_OUTCOME: StepOutcome,
    EventKind.WORKFLOW_RESULT: WorkflowResult,
    EventKind.WORKFLOW_RETRY: WorkflowRetry,
    EventKind.DEAD_LETTER: DeadLetter,
    EventKind.REJECTED: Rejected,
    EventKind.INVALID_RETURN: InvalidReturn,
}

KIND_OF: dict[type[Event], EventKind] = {cls: kind for kind, cls in EVENT_TYPES.items()}

#: Kinds after which a workflow has terminated.
TERMINAL_KINDS = frozenset(
    {
        EventKind.WORKFLOW_RESULT,
        EventKind.DEAD_LETTER,
        EventKind.REJECTED,
        EventKind.INVALID_RETURN,
    }
)
