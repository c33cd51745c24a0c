"""The one way kapbit reads a partition of its log: recovery, projection and workflow
handles all go through :class:`PartitionReader`, so they agree on what counts.

A partition is read in offset order. For each record:

- **zombies**: a record written by a node that is not the partition's owner (the node of
  the latest ``ActiveWriter`` read) is never acted on: the fencing rule of
  :mod:`kapbit.fencing` (:class:`~kapbit.fencing.OwnerTracker`);
- **second copies** (a producer retry after a lost acknowledgement can land a record twice):
  a ``WorkflowCreated`` is a copy exactly when its writer would have refused the id there:
  the id is still in the idempotency window *of the node that wrote it* (each
  ``ActiveWriter`` names its writer's window size) or its workflow is still open. A copy
  moves the id to its place in the window, as the engine learns an id at the copy whose
  append was acknowledged. An id that has left the writer's window starts a new workflow.
  Of a workflow's other events only the first ``StepOutcome`` per step and phase, a
  ``WorkflowRetry`` with a higher attempt than seen so far, and the first terminal event
  count; events of a workflow that is not open are late copies;
- **values** (inputs, outcome values, results) are decoded with the types of the
  workflow's definition (:func:`decode_value`), generically without one.

A reader that starts in the middle of the log (a projector following only new events)
may meet events of a workflow created before it started: with ``adopt=True`` such a
workflow is taken as open from its first event on, with an unknown type, unless its id is
in the window (then it terminated, and the event is a late copy).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kapbit.codecs import Codec
from kapbit.errors import CorruptRecord, DecodeError
from kapbit.events import (
    EVENT_TYPES,
    TERMINAL_KINDS,
    ActiveWriter,
    Event,
    EventKind,
    StepOutcome,
    WorkflowCreated,
    WorkflowResult,
    WorkflowRetry,
)
from kapbit.fencing import OwnerTracker, is_claim
from kapbit.idempotency import IdempotencyWindow
from kapbit.repository import Record
from kapbit.workflow import Definition

_CREATED = EventKind.WORKFLOW_CREATED
_NO_INPUT = msgspec.Raw(b"")


def decode_event(codec: Codec, record: Record) -> Any:
    """Decode a record's event, checking it against the record's kind, key and writer."""
    event_type = EVENT_TYPES.get(record.kind)
    if event_type is None:
        raise CorruptRecord(record.partition, record.offset, f"unknown event kind {record.kind!r}")
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


def decode_claim(codec: Codec, record: Record) -> ActiveWriter:
    """A claim's event. A claim that does not decode with ``codec`` (its writer used
    another codec: two instances configured differently that started at once on an empty
    log) still switches the owner, as the repositories' fencing decides by the record's
    kind and writer alone; it reads as a claim by that writer with nothing else known.
    Starting refuses a log whose newest claim is such a one (:func:`check_codec`)."""
    try:
        claim: ActiveWriter = decode_event(codec, record)
    except CorruptRecord:
        return ActiveWriter(record.node, 0.0)
    return claim


def decode_value(
    codec: Codec, definition: Definition | None, event: Event, partition: int, offset: int
) -> Any:
    """The user value ``event`` carries (the input of ``WorkflowCreated``, the outcome value
    of ``StepOutcome``, the result of ``WorkflowResult``; ``None`` for other kinds), decoded
    with ``definition``'s declared types, or generically (dicts, lists, primitives) without
    one. A value that does not decode is a :class:`~kapbit.errors.CorruptRecord` at
    ``partition``/``offset``."""
    target: Any = Any
    if isinstance(event, WorkflowCreated):
        return decode_input(codec, definition, event.input, partition, offset)
    if isinstance(event, StepOutcome):
        raw, what = event.value, "outcome value"
        if definition is not None:
            if not 0 <= event.step < len(definition.steps):
                raise CorruptRecord(
                    partition,
                    offset,
                    f"step {event.step} of a {len(definition.steps)}-step workflow",
                )
            target = definition.outcome_type_of(event.step)
    elif isinstance(event, WorkflowResult):
        raw, what = event.result, "result"
        if definition is not None:
            target = definition.result_type
    else:
        return None
    return _decode(codec, raw, target, what, partition, offset)


def decode_input(
    codec: Codec, definition: Definition | None, raw: msgspec.Raw, partition: int, offset: int
) -> Any:
    """A workflow's input (``WorkflowCreated.input`` at ``partition``/``offset``), decoded
    as :func:`decode_value` does."""
    target: Any = Any if definition is None else definition.input_type
    return _decode(codec, raw, target, "input", partition, offset)


def _decode(
    codec: Codec, raw: msgspec.Raw, target: Any, what: str, partition: int, offset: int
) -> Any:
    try:
        return codec.decode(raw, target)
    except DecodeError as exc:
        raise CorruptRecord(partition, offset, f"{what}: {exc}") from exc


class Verdict(enum.Enum):
    """What a record read in order is: a new event to act on, or one to skip."""

    NEW = "new"
    COPY = "copy"
    ZOMBIE = "zombie"


@dataclass(slots=True)
class OpenWorkflow:
    """A workflow created (or, adopted, first seen) and not terminated yet.

    ``type`` is ``""`` and ``input`` empty for an adopted workflow, whose
    ``created_offset`` is where it was first seen; ``outcomes`` lists the first copy of
    each step outcome with its offset; ``trace`` is the trace context its
    ``WorkflowCreated`` stored (``None``: it stored none). ``fire_at`` is set while the
    workflow sleeps: its newest event is a step outcome with a durable timer.
    """

    id: str
    type: str
    created_offset: int
    input: msgspec.Raw
    outcomes: list[tuple[int, StepOutcome]] = field(default_factory=list)
    attempts: int = 0
    last_error: str = ""
    trace: dict[str, str] | None = None
    fire_at: float | None = None

    def has_outcome(self, step: int, phase: str) -> bool:
        """Whether an outcome of ``step`` in ``phase`` was read already."""
        for _, outcome in self.outcomes:  # noqa: SIM110 (per event: no generator)
            if outcome.step == step and outcome.phase == phase:
                return True
        return False


class ReaderState(msgspec.Struct, kw_only=True):
    """What a :class:`PartitionReader` knows after reading every record below ``offset``:
    enough to go on reading from ``offset`` as if it had read from the log's start. It is
    what a snapshot checkpoint stores (:mod:`kapbit.snapshots`).

    ``claims`` are the ownership changes (as ``OwnerTracker.writers``) from the last one
    before the oldest offset still asked about; ``writer_window`` is the window the writer
    in force at ``offset`` is judged by; ``window`` the ids (oldest first) of the largest
    window kept, of ``window_size`` ids; ``open`` the open workflows.
    """

    offset: int
    owner: str
    claims: list[tuple[int, str]]
    writer_window: int
    window_size: int
    window: list[tuple[str, int]]
    open: list[OpenWorkflow]


class Windows:
    """The idempotency window kept at every window size met while reading (the reader's
    own, the checkpoint saver's, each writer's), so each ``WorkflowCreated`` is judged by
    the window of the node that wrote it."""

    __slots__ = ("_by_size", "_largest")

    def __init__(self, sizes: set[int]) -> None:
        self._by_size = {size: IdempotencyWindow(size) for size in sizes}
        self._largest = self._by_size[max(sizes)]

    def add(self, workflow_id: str, offset: int) -> None:
        """``workflow_id``'s ``WorkflowCreated`` (first or later copy) at ``offset``."""
        for window in self._by_size.values():
            window.renew(workflow_id, offset)

    def of(self, size: int) -> IdempotencyWindow:
        """The window of ``size`` ids."""
        window = self._by_size.get(size)
        if window is None:  # a size first met here: seeded from the largest window kept
            window = IdempotencyWindow(size, list(self._largest.entries())[-size:])
            self._by_size[size] = window
            if size > self._largest.size:
                self._largest = window
        return window

    @property
    def largest(self) -> IdempotencyWindow:
        """The window of the most ids: every id any writer's window still holds."""
        return self._largest


class PartitionReader:
    """Reads one partition in order and applies the rules above.

    ``owner`` is the owner in force where reading starts; ``window_size`` the window assumed
    for a writer whose claim has not been read (or names no size), and ``writer_window`` the
    window of the writer in force where reading starts, if known (a checkpoint's saver).
    Feed it records in offset order: :meth:`take` in full, or :meth:`take_ids` for a stretch
    where every workflow created has terminated (only ids are learnt, nothing decoded).
    """

    __slots__ = (
        "_codec",
        "_default_size",
        "_pending",
        "_sizes",
        "_writer_window",
        "adopt",
        "open",
        "owners",
        "partition",
        "windows",
    )

    def __init__(
        self,
        codec: Codec,
        partition: int,
        owner: str,
        window_size: int,
        *,
        writer_window: int | None = None,
        adopt: bool = False,
    ) -> None:
        self._codec = codec
        self.partition = partition
        self.owners = OwnerTracker(owner)
        self._default_size = window_size
        writer_size = writer_window or window_size
        self.windows = Windows({window_size, writer_size})
        self._writer_window = self.windows.of(writer_size)
        # (claim offset, window its writer is judged by), as ``owners.writers``
        self._sizes: list[tuple[int, int]] = [(-1, writer_size)]
        self.open: dict[str, OpenWorkflow] = {}
        self.adopt = adopt
        self._pending: dict[str, list[Record]] = {}  # skimmed, decoded by settle()

    @classmethod
    def resume(
        cls, codec: Codec, partition: int, state: ReaderState, window_size: int
    ) -> PartitionReader:
        """A reader that goes on from ``state`` (judging writers without a window size by
        ``window_size``), as if it had read the partition up to ``state.offset``. The
        state must keep at least ``window_size`` ids (``state.window_size``)."""
        reader = cls(codec, partition, state.owner, window_size, writer_window=state.writer_window)
        reader.owners.writers = [(offset, node) for offset, node in state.claims] or [
            (-1, state.owner)
        ]
        windows = reader.windows
        windows.of(state.window_size)
        for workflow_id, offset in state.window:
            windows.add(workflow_id, offset)
        reader.open = {w.id: _copy(w) for w in state.open}
        return reader

    def state(self, offset: int, since: int | None = None) -> ReaderState:
        """The state after reading every record below ``offset`` (all of them must have
        been taken, and :meth:`settle` called after :meth:`skim`). ``since``: the oldest
        offset :meth:`OwnerTracker.owner_at` will still be asked about (claims before the
        one in force there, or at the oldest open workflow or id kept, are left out)."""
        writers = self.owners.writers
        if since is not None:
            since = min(since, self.horizon(offset))
            first = 0
            for index, (start, _) in enumerate(writers):
                if start < since:
                    first = index
            writers = [(-1, writers[first][1]), *writers[first + 1 :]]
        largest = self.windows.largest
        return ReaderState(
            offset=offset,
            owner=self.owners.owner,
            claims=list(writers),
            writer_window=self._writer_window.size,
            window_size=largest.size,
            window=list(largest.entries()),
            open=[_copy(w) for w in self.open.values()],
        )

    def take_ids(self, records: Sequence[Record]) -> None:
        """Learn the ids of ``records``, a stretch in which every workflow created has
        terminated: only kinds, keys and writers are looked at, no payload is decoded."""
        owners, windows = self.owners, self.windows
        for record in records:
            if record.kind is _CREATED:
                if owners.admit(record):
                    windows.add(record.key, record.offset)
            elif is_claim(record):
                owners.admit(record)

    def skim(self, records: Sequence[Record]) -> None:
        """Move past ``records`` as :meth:`take` would, decoding only claims: the records
        of workflows open at the end are kept and decoded by :meth:`settle`, which must
        follow before anything else. For re-reading a stretch already judged (a
        projector's horizon), where most workflows terminate before its end."""
        owners, windows, open_workflows, pending = (
            self.owners,
            self.windows,
            self.open,
            self._pending,
        )
        for record in records:
            if is_claim(record):
                self.take(record)
                continue
            if not owners.admit(record):
                continue
            workflow_id = record.key
            kind = record.kind
            if kind is _CREATED:
                copy = workflow_id in open_workflows or workflow_id in self._writer_window
                windows.add(workflow_id, record.offset)
                if not copy:
                    open_workflows[workflow_id] = OpenWorkflow(
                        workflow_id, "", record.offset, _NO_INPUT
                    )
                    pending[workflow_id] = [record]
                continue
            if workflow_id not in open_workflows:
                if not self.adopt or workflow_id in windows.largest:
                    continue
                open_workflows[workflow_id] = OpenWorkflow(
                    workflow_id, "", record.offset, _NO_INPUT
                )
                pending[workflow_id] = []
            if kind in TERMINAL_KINDS:
                del open_workflows[workflow_id]
                pending.pop(workflow_id, None)
            else:  # a workflow open before the stretch has no list yet
                pending.setdefault(workflow_id, []).append(record)

    def settle(self) -> None:
        """Decode what :meth:`skim` kept of the workflows still open."""
        codec, open_workflows = self._codec, self.open
        for workflow_id, records in self._pending.items():
            workflow = open_workflows[workflow_id]
            for record in records:
                event = decode_event(codec, record)
                if isinstance(event, WorkflowCreated):
                    workflow.type, workflow.input = event.type, event.input
                    workflow.trace = event.trace
                elif isinstance(event, StepOutcome):
                    if not workflow.has_outcome(event.step, event.phase):
                        workflow.outcomes.append((record.offset, event))
                        workflow.fire_at = event.fire_at
                elif isinstance(event, WorkflowRetry) and event.attempt > workflow.attempts:
                    workflow.attempts = event.attempt
                    workflow.last_error = event.error
                    workflow.fire_at = None
        self._pending = {}

    def take(self, record: Record) -> tuple[Verdict, Any, OpenWorkflow | None]:
        """Judge ``record`` (the next in offset order) and move past it: its verdict, its
        decoded event (``None`` for a zombie, which is never decoded) and the workflow it
        belongs to (``None`` for a claim and for events of no open workflow; after a
        terminal event, the workflow it ended)."""
        owners = self.owners
        if is_claim(record):
            claim = decode_claim(self._codec, record)
            # Writer ids are unique per start: the owner's claim read again is a copy.
            verdict = Verdict.COPY if record.node == owners.owner else Verdict.NEW
            owners.admit(record)
            size = claim.window or self._default_size
            self._writer_window = self.windows.of(size)
            self._sizes.append((record.offset, size))
            return verdict, claim, None
        if not owners.admit(record):
            return Verdict.ZOMBIE, None, None
        event = decode_event(self._codec, record)
        workflow_id = record.key
        open_workflows = self.open
        workflow = open_workflows.get(workflow_id)
        if isinstance(event, WorkflowCreated):
            copy = workflow is not None or workflow_id in self._writer_window
            self.windows.add(workflow_id, record.offset)
            if copy:
                return Verdict.COPY, event, workflow
            workflow = open_workflows[workflow_id] = OpenWorkflow(
                workflow_id, event.type, record.offset, event.input, trace=event.trace
            )
            return Verdict.NEW, event, workflow
        if workflow is None:
            if not self.adopt or workflow_id in self.windows.largest:
                return Verdict.COPY, event, None  # its workflow terminated: a late copy
            workflow = open_workflows[workflow_id] = OpenWorkflow(
                workflow_id, "", record.offset, _NO_INPUT
            )
        if record.kind in TERMINAL_KINDS:
            del open_workflows[workflow_id]
        elif isinstance(event, StepOutcome):
            if workflow.has_outcome(event.step, event.phase):
                return Verdict.COPY, event, workflow
            workflow.outcomes.append((record.offset, event))
            workflow.fire_at = event.fire_at
        elif isinstance(event, WorkflowRetry):
            if event.attempt <= workflow.attempts:
                return Verdict.COPY, event, workflow
            workflow.attempts = event.attempt
            workflow.last_error = event.error
            workflow.fire_at = None
        return Verdict.NEW, event, workflow

    def window_at(self, offset: int) -> int:
        """The window the writer in force for the record at ``offset`` is judged by."""
        for start, size in reversed(self._sizes):
            if start < offset:
                return size
        return self._sizes[0][1]

    def horizon(self, offset: int) -> int:
        """Where reading must start again to rebuild this state at ``offset``: the oldest
        open workflow's first event or the oldest id any window keeps."""
        horizon = offset
        if self.open:
            horizon = min(horizon, next(iter(self.open.values())).created_offset)
        oldest = self.windows.largest.oldest_offset()
        if oldest is not None:
            horizon = min(horizon, oldest)
        return horizon


def _copy(workflow: OpenWorkflow) -> OpenWorkflow:
    """``workflow`` with a list of outcomes of its own (readers append to it)."""
    return dataclasses.replace(workflow, outcomes=list(workflow.outcomes))
