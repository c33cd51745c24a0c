"""Workflow handles: a workflow's status and result, also after a restart or a takeover.

``await kbit.start_workflow(...)`` returns a :class:`WorkflowHandle` once the workflow's
``WorkflowCreated`` is durable, and ``kbit.get_workflow(id)`` one for any id the instance
runs or keeps in its idempotency window. A handle asks the instance first (a workflow it
runs, or finished recently) and otherwise reads the log: the window knows where the
workflow's ``WorkflowCreated`` lies, and :func:`read_workflow` reads forward from there
with the log reader every reader uses (:class:`~kapbit.log_reader.PartitionReader`),
decoding the result with the definition's types. So a client that retries a request
after the process died can learn what happened to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, Protocol, TypeVar

from kapbit import events
from kapbit.codecs import Codec
from kapbit.errors import (
    DeadLettered,
    InstanceClosed,
    InvalidReturnValue,
    KapbitError,
    WorkflowNotFound,
    WorkflowRejected,
)
from kapbit.fencing import is_claim
from kapbit.idempotency import IdempotencyWindow
from kapbit.log_reader import PartitionReader, Verdict, decode_value
from kapbit.partitioner import partition_for
from kapbit.projection.status import WorkflowStatus, status_after
from kapbit.repository import Repository
from kapbit.workflow import Definition

R = TypeVar("R")


#: What submitting an id the instance already knows does: ``"raise"``
#: :class:`~kapbit.errors.DuplicateWorkflow` (the default), or ``"attach"`` to that workflow.
OnDuplicate = Literal["raise", "attach"]


@dataclass(frozen=True, slots=True)
class WorkflowState:
    """What the log tells of one workflow (:meth:`WorkflowHandle.describe`).

    ``status`` uses the status read model's words; ``result`` is the decoded result once
    it ``SUCCEEDED`` or was ``COMPENSATED``, ``error`` the typed error of a workflow that
    ended otherwise (:class:`~kapbit.errors.DeadLettered`,
    :class:`~kapbit.errors.WorkflowRejected`, :class:`~kapbit.errors.InvalidReturnValue`).
    ``created_offset`` is ``-1`` while this instance has not yet seen its ``WorkflowCreated``
    acknowledged.
    """

    id: str
    type: str
    partition: int
    created_offset: int
    status: WorkflowStatus
    steps_done: int = 0
    compensated_steps: int = 0
    attempts: int = 0
    last_error: str = ""
    result: Any = None
    error: KapbitError | None = None
    failed_step: int | None = None


def terminal_error(workflow_id: str, event: events.Event) -> KapbitError | None:
    """The error a caller gets for a workflow that ended with ``event`` (``None`` for a
    result), the same exec_workflow raises."""
    if isinstance(event, events.DeadLetter):
        return DeadLettered(workflow_id, event.attempts, event.error)
    if isinstance(event, events.Rejected):
        return WorkflowRejected(workflow_id, f"{event.event}: {event.reason}")
    if isinstance(event, events.InvalidReturn):
        return InvalidReturnValue(workflow_id, event.step, event.phase, event.reason)
    return None


async def read_workflow(
    repository: Repository,
    codec: Codec,
    definitions: Mapping[str, Definition],
    workflow_id: str,
    partition: int,
    created_offset: int,
) -> WorkflowState:
    """The state of the workflow created at ``created_offset`` of ``partition``: read from
    there up to the partition's current end, or to the workflow's terminal event.

    The record at ``created_offset`` counted (the idempotency window names only such), so
    its writer is the owner in force there; the reader judges the rest as recovery does.
    """
    end = await repository.end_offset(partition)
    reader: PartitionReader | None = None
    state: WorkflowState | None = None
    async for batch in repository.read(partition, created_offset, end):
        for record in batch:
            if reader is None:  # the first record: this workflow's WorkflowCreated
                if record.offset != created_offset or record.key != workflow_id:
                    raise WorkflowNotFound(workflow_id)
                reader = PartitionReader(codec, partition, record.node, 1)
            elif record.key != workflow_id and not is_claim(record):
                continue  # another workflow's: only claims matter (who owns the partition)
            verdict, event, _ = reader.take(record)
            if verdict is not Verdict.NEW or record.key != workflow_id:
                continue
            if state is None:
                if not isinstance(event, events.WorkflowCreated):
                    raise WorkflowNotFound(workflow_id)
                state = WorkflowState(
                    workflow_id, event.type, partition, created_offset, WorkflowStatus.RUNNING
                )
                continue
            state = _after(state, event, codec, definitions.get(state.type), record.offset)
            if state.status.terminal:
                return state
    if state is None:  # not there (any more): removed by retention, or another log
        raise WorkflowNotFound(workflow_id)
    return state


def _after(
    state: WorkflowState,
    event: events.Event,
    codec: Codec,
    definition: Definition | None,
    offset: int,
) -> WorkflowState:
    """``state`` moved past ``event``: its status by the status read model's rule
    (:func:`~kapbit.projection.status.status_after`), its counts and values as the model
    keeps them."""
    status = status_after(event, state.failed_step is not None) or state.status
    if isinstance(event, events.StepOutcome):
        if event.phase == "compensate":
            return replace(state, status=status, compensated_steps=state.compensated_steps + 1)
        if not event.success:
            return replace(state, status=status, failed_step=event.step)
        return replace(state, status=status, steps_done=max(state.steps_done, event.step + 1))
    if isinstance(event, events.WorkflowRetry):
        return replace(state, status=status, attempts=event.attempt, last_error=event.error)
    if isinstance(event, events.WorkflowResult):
        result = decode_value(codec, definition, event, state.partition, offset)
        return replace(state, status=status, result=result)
    if isinstance(event, events.DeadLetter):
        error = terminal_error(state.id, event)
        return replace(
            state, status=status, attempts=event.attempts, last_error=event.error, error=error
        )
    if isinstance(event, events.Rejected | events.InvalidReturn):
        return replace(state, status=status, error=terminal_error(state.id, event))
    return state


class RunningWorkflows(Protocol):
    """What a handle asks the instance that gave it out."""

    def running_type(self, workflow_id: str) -> str | None:
        """The type of ``workflow_id`` if it runs on this instance (else ``None``)."""
        ...

    async def wait_result(self, workflow_id: str, timeout: float | None) -> Any:
        """The result of a workflow running or recently finished here (raising its
        error); :class:`~kapbit.errors.WorkflowNotFound` for any other."""
        ...


class WorkflowLookup(Protocol):
    """Where a handle finds a workflow in the log: :class:`WorkflowLog` on the owner, the
    owner's answer through the request log elsewhere (:mod:`kapbit.forwarding`)."""

    def locate(self, workflow_id: str) -> tuple[int, int | None]:
        """``workflow_id``'s partition and the offset of its ``WorkflowCreated`` if known."""
        ...

    async def read(self, workflow_id: str) -> WorkflowState:
        """The state of ``workflow_id`` as the log shows it now."""
        ...


class WorkflowLog:
    """Finds workflows in the log by the idempotency windows of a started instance."""

    def __init__(
        self,
        repository: Repository,
        codec: Codec,
        definitions: Mapping[str, Definition],
        windows: Sequence[IdempotencyWindow],
        running: Callable[[str], int | None] = lambda workflow_id: None,
    ) -> None:
        self._repository = repository
        self._codec = codec
        self._definitions = definitions
        self._windows = windows
        self._running = running

    def locate(self, workflow_id: str) -> tuple[int, int | None]:
        """``workflow_id``'s partition and the offset of its ``WorkflowCreated``: from the
        window, else from ``running`` (a workflow open here, e.g. sleeping for longer than
        its id stays in the window); ``None`` when neither knows it."""
        partition = partition_for(workflow_id, len(self._windows))
        offset = self._windows[partition].offset_of(workflow_id)
        return partition, self._running(workflow_id) if offset is None else offset

    async def read(self, workflow_id: str) -> WorkflowState:
        """The state of ``workflow_id`` as the log shows it now."""
        partition, offset = self.locate(workflow_id)
        if offset is None:
            raise WorkflowNotFound(workflow_id)
        return await read_workflow(
            self._repository, self._codec, self._definitions, workflow_id, partition, offset
        )


class WorkflowHandle(Generic[R]):
    """A workflow of a kapbit instance, by id: its status and its result.

    Handles are cheap and hold no state of their own: each call asks the instance (a
    workflow it runs, or finished recently) or reads the log, so a handle taken after a
    restart or a takeover answers as one taken before. ``R`` is the definition's result
    type when the handle came from a definition object.
    """

    __slots__ = ("_log", "_running", "id")

    def __init__(self, workflow_id: str, running: RunningWorkflows, log: WorkflowLookup) -> None:
        self.id = workflow_id
        self._running = running
        self._log = log

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the workflow's end and return its result.

        Raises as ``exec_workflow`` does for a workflow that ended otherwise
        (:class:`~kapbit.errors.DeadLettered`, :class:`~kapbit.errors.WorkflowRejected`,
        :class:`~kapbit.errors.InvalidReturnValue`); unlike ``exec_workflow`` it waits
        through retries instead of raising :class:`~kapbit.errors.WillRetryLater`.
        :class:`TimeoutError` after ``timeout``; :class:`~kapbit.errors.Fenced` or
        :class:`~kapbit.errors.InstanceClosed` once this instance no longer runs it.
        """
        try:
            result: R = await self._running.wait_result(self.id, timeout)
            return result
        except WorkflowNotFound:
            pass
        state = await self._log.read(self.id)
        if state.error is not None:
            raise state.error
        if state.status.terminal:
            ended: R = state.result
            return ended
        # Open in the log, yet not run here: this instance let it go (storage refused even
        # its minimal terminal record) or stopped; the next instance resumes it.
        raise InstanceClosed(
            f"workflow {self.id!r} is open in the log but this instance does not run it; "
            "the next instance resumes it"
        )

    async def describe(self) -> WorkflowState:
        """The workflow's state as the log shows it now."""
        try:
            return await self._log.read(self.id)
        except WorkflowNotFound:
            workflow_type = self._running.running_type(self.id)
            if workflow_type is None:
                raise
        # Running here, its WorkflowCreated not acknowledged yet.
        partition, _ = self._log.locate(self.id)
        return WorkflowState(self.id, workflow_type, partition, -1, WorkflowStatus.RUNNING)

    async def status(self) -> WorkflowStatus:
        """The workflow's status as the log shows it now."""
        return (await self.describe()).status
