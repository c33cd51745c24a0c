"""The events that make up the log: one msgspec Struct per kind, tagged by kind.

These types are public: read the log with them instead of decoding JSON by hand. A
:class:`kapbit.repository.Record` carries the kind (:class:`EventKind`), the workflow id
(the key) and the writer node outside the payload, so readers can filter without
decoding; its value decodes with the instance's codec as the kind's type::

    from kapbit import JsonCodec
    from kapbit.events import EVENT_TYPES, EventKind

    event = JsonCodec().decode(record.value, EVENT_TYPES[record.kind])

(:class:`kapbit.projection.Projector` does this for you, skipping zombie writes and second copies
as recovery does.) User values (inputs, outcome values, results) are fields of type
``msgspec.Raw``: already encoded by the codec, decoded with the workflow's declared types
(``codec.decode(event.input, definition.input_type)``). ``at`` is the writer's wall clock
in seconds since the epoch.

A workflow's life in the log: ``WorkflowCreated``, then one ``StepOutcome`` per action
run to its end (execute phase in step order; after a ``Failure``, compensate phase in
reverse), ``WorkflowRetry`` before each retry, and exactly one terminal event:
``WorkflowResult``, ``DeadLetter``, ``Rejected`` or ``InvalidReturn``
(:data:`TERMINAL_KINDS`). ``ActiveWriter`` events belong to no workflow: they fence.
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


class _Event(msgspec.Struct, frozen=True, tag_field="kind", omit_defaults=True, gc=False):
    """Base of every event: frozen, tagged with its kind under ``"kind"``; a field left at
    its default (no timer, no trace context) is not written, so records stay as small as
    before the field existed. Not tracked by the garbage collector (``gc=False``): an
    event holds strings, numbers, encoded values and a dict of strings, so it can be in no
    reference cycle, and the collector need not walk the events of every open workflow."""


class ActiveWriter(_Event, frozen=True, tag="active_writer", omit_defaults=True):
    """Instance start: ``node`` now owns the partition; later foreign records are zombies.

    ``node`` is the start's unique writer id (the record's writer): the configured node id,
    which may repeat across starts, ``/`` and a random start id. ``codec`` and ``window``
    (the idempotency window size) tell later readers how this writer encoded records and
    refused ids (empty/0 in claims written before they were recorded). ``endpoint`` is
    the address the writer advertises in group mode (``None`` outside it).
    """

    node: str
    at: float
    codec: str = ""
    window: int = 0
    endpoint: str | None = None


class WorkflowCreated(_Event, frozen=True, tag="workflow_created", omit_defaults=True):
    """The workflow was accepted; from here on it will finish, even across crashes.

    ``id`` is the workflow id, ``type`` the definition's type name, ``input`` the encoded
    input (checked against the definition's ``input_type`` before it was written).
    ``trace`` is the W3C trace context (``traceparent``, ``tracestate``) of the workflow's
    span when it was created with tracing on (:mod:`kapbit.otel`), so that an instance
    resuming it continues the trace; ``None`` (not written) otherwise, and in records
    written before the field existed. ``request`` is the id of the forwarded request that
    created the workflow (:mod:`kapbit.forwarding`), so an owner serving that request again
    answers it the same way; ``None`` (not written) for a local call.
    """

    id: str
    type: str
    input: msgspec.Raw
    at: float
    trace: dict[str, str] | None = None
    request: str | None = None


class StepOutcome(_Event, frozen=True, tag="step_outcome"):
    """The persisted outcome of step ``step`` (its index) in ``phase``.

    ``success`` is true for ``Success``, false for ``Failure`` (a step that failed for good
    after ``NonRetryable``, a listed error or its retries, too); ``value`` is the encoded
    outcome value, of the step's outcome type or ``None``. ``fire_at`` is set when the
    action returned a durable timer (:class:`kapbit.Sleep` / :class:`kapbit.SleepUntil`):
    the step succeeded and the workflow sleeps until that wall time (seconds since the
    epoch), then runs its next step.
    """

    id: str
    step: int
    phase: Literal["execute", "compensate"]
    success: bool
    value: msgspec.Raw
    at: float = 0.0
    fire_at: float | None = None


class WorkflowResult(_Event, frozen=True, tag="workflow_result"):
    """The final result; the workflow is terminated.

    ``result`` is the encoded result (of the definition's ``result_type``);
    ``compensated`` is true when a step failed and the saga compensated.
    """

    id: str
    result: msgspec.Raw
    compensated: bool
    at: float


class WorkflowRetry(_Event, frozen=True, tag="workflow_retry"):
    """Attempt ``attempt`` of the workflow starts (counts survive restarts).

    Written by the retry worker, and by a step retrying in place under its ``StepRetry``,
    before the attempt runs. ``attempt`` counts the workflow's retries (1, 2, ...);
    ``error`` is the ``repr`` of the error that made the previous attempt fail (for a
    timeout it names the step and the seconds), cut to 1,000 characters.
    """

    id: str
    attempt: int
    error: str
    at: float


class DeadLetter(_Event, frozen=True, tag="dead_letter"):
    """The retry worker gave up after ``attempts``; the workflow is terminated.

    ``error`` is the last error, as in :class:`WorkflowRetry`. A person should look.
    """

    id: str
    attempts: int
    error: str
    at: float


class Rejected(_Event, frozen=True, tag="rejected"):
    """Storage rejected an event of the workflow (``event`` names its kind); terminated.

    ``reason`` is the storage's or codec's reason, cut to 256 characters, or empty if
    storage refused the full record too.
    """

    id: str
    event: str
    reason: str
    at: float


class InvalidReturn(_Event, frozen=True, tag="invalid_return"):
    """An action of step ``step`` (``phase``) returned neither ``Success``, ``Failure`` nor
    ``None``, or a value not of its declared type: a programming error, so the workflow is
    terminated at once and the action is never run again. ``step`` is ``-1`` when the result
    builder returned a value not of the ``result_type``. ``reason`` names the step, the
    declared and the returned type (cut to 256 characters)."""

    id: str
    step: int
    phase: Literal["execute", "compensate"]
    reason: str
    at: float


#: Any event.
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

#: The event type of each kind: what a record's value decodes as.
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

#: The kind of each event type.
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
