"""The projector: reads the event log partition by partition and feeds a read model.

It needs nothing but a :class:`~kapbit.repository.Repository` (and the codec the instances
write with), so it runs alongside an instance or in a process of its own. Per partition it
starts from the position the read model stored, skips zombie writes and second copies of
an event (a producer retry can write one record twice) exactly as recovery does, decodes
the events and their user values, and hands
them, in log order, to :meth:`ReadModel.apply` together with the position they lead to. The
read model commits both in one transaction, so a restart neither loses nor re-applies an
event.

Which records count is decided by the log reader (:class:`~kapbit.log_reader.PartitionReader`)
that recovery uses too, so a projection and the engine agree: the same zombie rule, the
same second-copy rule (a ``WorkflowCreated`` is a copy exactly when its writer's
idempotency window or an open workflow holds the id; an id reused after it left the
window is a new workflow), the same value decoding.

That rule needs memory of what was read: the open workflows and the idempotency window.
That memory is not stored; the position carries a *horizon* instead, the offset from which
re-reading the log (without applying) rebuilds it, the way an instance's checkpoint bounds
its recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import msgspec
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from kapbit._checks import at_least_one
from kapbit._lifecycle import AsyncResource
from kapbit._log import fields
from kapbit.codecs import Codec, JsonCodec
from kapbit.errors import TransientStorageError
from kapbit.events import KIND_OF, Event, EventKind, StepOutcome
from kapbit.log_reader import PartitionReader, Verdict, decode_value
from kapbit.options import Backoff, Options
from kapbit.repository import Checkpoint, Record, Repository
from kapbit.workflow import Definition

logger = logging.getLogger("kapbit.projection")

#: The window assumed for writers whose claim names none: the instances' default.
_DEFAULT_WINDOW = Options().idempotency_window


class Position(msgspec.Struct, frozen=True):
    """Where the projection of one partition resumes; store it with the changes it ends.

    ``offset`` is the next record to read and ``owner`` the partition's owner in force there
    (so zombie writes right after the position are still recognised). ``horizon`` (at most
    ``offset``; ``None`` means ``offset``) is where a restarting projector re-reads, without
    applying anything, to learn which events it already applied; ``horizon_owner`` is the
    owner in force at the horizon and ``horizon_window`` the idempotency window that owner
    is judged by (its claim names it, but may lie before the horizon).
    """

    offset: int = 0
    owner: str = ""
    horizon: int | None = None
    horizon_owner: str | None = None
    horizon_window: int | None = None


@dataclass(frozen=True, slots=True)
class ProjectedEvent:
    """One event as a read model receives it: decoded, with where it sits in the log.

    ``workflow_type`` is the type of the event's workflow when the projector saw it created
    (``None`` for ``ActiveWriter`` and for workflows created before projection started).
    ``value`` is the decoded user value: the input of ``WorkflowCreated``, the outcome value
    of ``StepOutcome``, the result of ``WorkflowResult``, ``None`` for the other kinds. It is
    decoded with the workflow's declared types when its definition was given to the
    projector, generically (dicts, lists, primitives) otherwise. ``step_name`` names the step
    of a ``StepOutcome`` when the definition was given (see :func:`step_label`).
    """

    partition: int
    offset: int
    node: str
    event: Event
    workflow_type: str | None = None
    value: Any = None
    step_name: str | None = None

    @property
    def kind(self) -> EventKind:
        """The kind of the event."""
        return KIND_OF[type(self.event)]

    @property
    def workflow_id(self) -> str | None:
        """The id of the event's workflow (``None`` for ``ActiveWriter``)."""
        workflow_id: str | None = getattr(self.event, "id", None)
        return workflow_id


@runtime_checkable
class ReadModel(Protocol):
    """The seam between the projector and a user's read model.

    ``apply`` must be atomic: either the model's changes for ``events`` *and* ``position``
    are committed together, or neither is (raise). ``load_positions`` returns what was last
    committed; partitions never applied are absent and start at the beginning of the log.
    ``apply`` is also called with no events when only the position moved (zombie writes,
    second copies, a gap in the offsets).
    """

    async def load_positions(self) -> dict[int, Position]:
        """The positions committed so far, by partition."""
        ...

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        """Apply ``events`` (in log order) and store ``position``, in one transaction."""
        ...


class _PartitionState:
    """What the projector knows about one partition: position and the log reader's state
    (owners, idempotency windows, open workflows), which tells what was applied."""

    __slots__ = ("committed", "offset", "partition", "reader")

    def __init__(self, reader: PartitionReader, offset: int, owner: str) -> None:
        self.partition = reader.partition
        self.offset = offset  # the next record to read: ahead of ``committed`` while applying
        self.committed = Position(offset, owner)
        self.reader = reader

    def position(self) -> Position:
        """The position to store now, with the horizon that rebuilds this state."""
        reader = self.reader
        horizon = reader.horizon(self.offset)
        return Position(
            self.offset,
            reader.owners.owner,
            horizon,
            reader.owners.owner_at(horizon),
            reader.window_at(horizon),
        )


def step_label(definition: Definition, step: int) -> str | None:
    """What to call step ``step`` of ``definition``: its name, else its action's name.

    ``None`` when neither says anything (an unnamed lambda) or the index is out of range.
    """
    if not 0 <= step < len(definition.steps):
        return None
    declared = definition.steps[step]
    if declared.name is not None:
        return declared.name
    action: str | None = getattr(declared.execute, "__name__", None)
    return None if action is None or action.startswith("<") else action


def _step_name(definition: Definition, event: Event) -> str | None:
    return step_label(definition, event.step) if isinstance(event, StepOutcome) else None


async def positions_at_end(
    repository: Repository, partitions: Iterable[int] | None = None
) -> dict[int, Position]:
    """Positions at the current end of each partition: to follow only new events.

    The owner in force at the end is not known without reading, so each position's horizon
    is the partition's checkpoint (whose owner is stored with it): the projector re-reads
    from there to the end, applying nothing, before it follows the log.
    """
    checkpoints = await repository.load_checkpoints()
    positions: dict[int, Position] = {}
    for partition in partitions if partitions is not None else range(repository.partitions):
        end = await repository.end_offset(partition)
        checkpoint = checkpoints.get(partition)
        start = min(checkpoint.offset, end) if checkpoint is not None else 0
        owner = checkpoint.owner if checkpoint is not None else ""
        size = None
        if checkpoint is not None and checkpoint.anchor_writer == owner:
            size = checkpoint.window_size or None
        positions[partition] = Position(end, owner, start, owner, size)
    return positions


class Projector(AsyncResource):
    """Projects the log of ``repository`` into ``model``.

    ``definitions`` give the types user values are decoded with (by workflow type);
    without them values are decoded generically. ``codec`` must be the instances' codec.
    ``partitions`` restricts projection to some partitions. ``start_positions`` are used
    for partitions the model has no position for (default: the beginning of the log; see
    :func:`positions_at_end`). At most ``batch_size`` records go into one ``apply``.
    Every claim names its writer's idempotency window, by which the writer's
    ``WorkflowCreated`` records are judged; ``idempotency_window`` is the window assumed for
    a writer whose claim names none (written by an older kapbit) or lies before where the
    projector resumed and whose checkpoint does not name it either.

    Lifecycle: ``await start()`` / ``await close()``, or ``async with``. The projector
    starts the repository and closes it again (see :mod:`kapbit._lifecycle`). Then either
    :meth:`catch_up` (to the current end, then return) or :meth:`run` (follow the log until
    closed or cancelled).
    """

    def __init__(
        self,
        repository: Repository,
        model: ReadModel,
        *,
        codec: Codec | None = None,
        definitions: Iterable[Definition] = (),
        partitions: Iterable[int] | None = None,
        start_positions: Mapping[int, Position] | None = None,
        batch_size: int = 512,
        idempotency_window: int = _DEFAULT_WINDOW,
        retry_backoff: Backoff | None = None,
    ) -> None:
        at_least_one(batch_size=batch_size, idempotency_window=idempotency_window)
        self._repository = repository
        self._model = model
        self._codec = codec or JsonCodec()
        self._definitions = {d.type: d for d in definitions}
        self._requested = list(partitions) if partitions is not None else None
        self._start_positions = dict(start_positions or {})
        self._batch_size = batch_size
        self._window = idempotency_window
        self._backoff = retry_backoff or Backoff(initial=0.1, maximum=5.0, jitter=0.1)
        self._partitions: list[int] = []
        self._states: dict[int, _PartitionState] = {}
        self._stale = True
        self._started = False
        self._busy = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stops = 0  # counts close() calls: a run still starting up sees one it missed
        self._session_stops = 0
        self._progress = asyncio.Condition()
        self._error: BaseException | None = None
        self.applied = 0
        self.skipped_zombies = 0
        self.skipped_copies = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the repository, load the model's positions and rebuild what was applied."""
        if self._started:
            return
        await self._repository.start()
        try:
            count = self._repository.partitions
            partitions = self._requested if self._requested is not None else list(range(count))
            for partition in partitions:
                if not 0 <= partition < count:
                    raise ValueError(f"partition {partition} not in a log of {count} partitions")
            self._partitions = sorted(set(partitions))
            await self._restore()
        except BaseException:
            await self._repository.close()
            raise
        self._started = True

    async def close(self) -> None:
        """Stop a running :meth:`run` (it returns) and close the repository this
        projector started."""
        self._stops += 1
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._started:
            self._started = False
            await self._repository.close()

    @property
    def positions(self) -> dict[int, Position]:
        """The position the model committed last in each projected partition."""
        return {p: state.committed for p, state in self._states.items()}

    # --- projecting -----------------------------------------------------------------------

    def catch_up(self) -> Coroutine[Any, Any, int]:
        """Project every partition up to its current end; return the events applied.

        The ends are read when each partition starts, so events appended meanwhile may or
        may not be included. :meth:`close` ends it early, also a stop that comes after this
        call but before the returned coroutine (a task, say) begins.
        """
        return self._catch_up(self._stops)

    async def _catch_up(self, stops: int) -> int:
        if self._stops != stops:
            return 0  # stopped before it began: not even started again
        before = self.applied
        async with self._session(stops):
            with contextlib.suppress(_Stopped):
                await self._all_partitions(self._catch_up_partition)
        return self.applied - before

    def run(self) -> Coroutine[Any, Any, None]:
        """Follow every partition, applying new events as they arrive.

        Returns when :meth:`close` is called (also a stop that comes after this call but
        before the returned coroutine begins, as when ``create_task(projector.run())`` is
        followed at once by ``close()``); raises when cancelled or when a record cannot be
        decoded or the model fails. Transient storage errors are retried with backoff.
        """
        return self._run(self._stops)

    async def _run(self, stops: int) -> None:
        if self._stops != stops:
            return  # stopped before it began: not even started again
        async with self._session(stops):
            with contextlib.suppress(_Stopped):
                await self._all_partitions(self._follow_partition)

    async def wait_caught_up(self, timeout: float | None = None) -> None:
        """Wait until a running :meth:`run` has applied everything in the log right now.

        Raises :class:`TimeoutError` after ``timeout``, or the error that stopped ``run``.
        """
        partitions = self._partitions or self._requested or range(self._repository.partitions)
        ends = {p: await self._repository.end_offset(p) for p in partitions}

        def reached() -> bool:
            if self._error is not None:
                return True
            return all(
                p in self._states and self._states[p].committed.offset >= end
                for p, end in ends.items()
            )

        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(reached)
        if self._error is not None:
            raise self._error

    # --- internals ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session(self, stops: int) -> AsyncIterator[None]:
        """One catch_up or run at a time; reload from the model after a failure.

        ``stops`` is the count of :meth:`close` calls when the caller asked to project: one
        since then ends the session at once.
        """
        if self._busy:
            raise RuntimeError("the projector is already projecting (run or catch_up)")
        self._busy = True
        self._session_stops = stops
        try:
            await self.start()
            if self._stale:
                await self._restore()
            self._error = None
            async with self._progress:
                self._progress.notify_all()  # waiters may be caught up already
            try:
                yield
            except BaseException as exc:
                # State may be ahead of what the model committed: reload before going on.
                self._stale = True
                if not isinstance(exc, asyncio.CancelledError | _Stopped):
                    self._error = exc
                    async with self._progress:
                        self._progress.notify_all()
                raise
        finally:
            self._busy = False

    async def _all_partitions(self, work: Callable[[_PartitionState], Any]) -> None:
        """Run ``work`` on every partition in one task group: the first failure stops them
        all and is raised; :meth:`close` cancelling them ends the session."""
        if self._stops != self._session_stops:
            raise _Stopped  # close() came while this session was starting
        tasks: list[asyncio.Task[Any]] = []
        try:
            async with asyncio.TaskGroup() as group:
                for p in self._partitions:
                    task = group.create_task(work(self._states[p]), name=f"kapbit-projector-{p}")
                    tasks.append(task)
                    self._tasks.add(task)
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        finally:
            self._tasks.difference_update(tasks)
        if any(task.cancelled() for task in tasks):
            raise _Stopped

    async def _restore(self) -> None:
        """Load positions and re-read each partition from its horizon, applying nothing."""
        stored = await self._model.load_positions()
        checkpoints = await self._repository.load_checkpoints()
        states = await asyncio.gather(
            *(
                self._restore_partition(
                    p,
                    stored.get(p) or self._start_positions.get(p) or Position(),
                    checkpoints.get(p),
                )
                for p in self._partitions
            )
        )
        self._states = {state.partition: state for state in states}
        self._stale = False

    def _reader(
        self, partition: int, owner: str, size: int | None, checkpoint: Checkpoint | None
    ) -> PartitionReader:
        """A log reader starting where ``owner`` writes, judged by a window of ``size`` ids;
        not known (a position stored without it), the size the owner's checkpoint names."""
        if not size and checkpoint is not None and checkpoint.anchor_writer == owner:
            size = checkpoint.window_size
        return PartitionReader(
            self._codec, partition, owner, self._window, writer_window=size or None, adopt=True
        )

    async def _restore_partition(
        self, partition: int, position: Position, checkpoint: Checkpoint | None
    ) -> _PartitionState:
        horizon = position.offset if position.horizon is None else position.horizon
        horizon = min(horizon, position.offset)
        owner = position.owner
        if horizon < position.offset and position.horizon_owner is not None:
            owner = position.horizon_owner
        reader = self._reader(partition, owner, position.horizon_window, checkpoint)
        if horizon < position.offset:
            async for batch in self._repository.read(partition, horizon, position.offset):
                reader.skim(batch)
            reader.settle()
        state = _PartitionState(reader, position.offset, position.owner)
        state.committed = position
        return state

    async def _catch_up_partition(self, state: _PartitionState) -> None:
        end = await self._repository.end_offset(state.partition)
        if state.offset >= end:
            return
        async for batch in self._repository.read(state.partition, state.offset, end):
            await self._handle(state, batch)
        if state.offset < end:  # offsets without a record (Kafka control records)
            state.offset = end
            await self._commit(state, [])

    async def _follow_partition(self, state: _PartitionState) -> None:
        def log_retry(retry: RetryCallState) -> None:
            error = retry.outcome.exception() if retry.outcome else None
            logger.warning(
                "projector: reading partition %d failed (attempt %d), retrying: %s",
                state.partition,
                retry.attempt_number,
                error,
                extra=fields(partition=state.partition),
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientStorageError),
            wait=self._backoff.wait(),
            before_sleep=log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                async for batch in self._repository.tail(state.partition, state.offset):
                    if batch:
                        await self._handle(state, batch)

    async def _handle(self, state: _PartitionState, batch: Sequence[Record]) -> None:
        size = self._batch_size
        for begin in range(0, len(batch), size):
            chunk = batch[begin : begin + size]
            events = self._project(state, chunk)
            await self._commit(state, events)

    def _project(self, state: _PartitionState, records: Sequence[Record]) -> list[ProjectedEvent]:
        """Filter and decode ``records``, moving ``state`` past them."""
        events: list[ProjectedEvent] = []
        reader = state.reader
        for record in records:
            if record.offset < state.offset:
                continue  # already applied (a repository may repeat a batch after a retry)
            state.offset = record.offset + 1
            verdict, event, workflow = reader.take(record)
            if verdict is Verdict.ZOMBIE:
                self.skipped_zombies += 1
                continue
            if verdict is Verdict.COPY:
                self.skipped_copies += 1
                continue
            workflow_type = workflow.type or None if workflow is not None else None
            definition = self._definitions.get(workflow_type) if workflow_type else None
            events.append(
                ProjectedEvent(
                    record.partition,
                    record.offset,
                    record.node,
                    event,
                    workflow_type,
                    decode_value(self._codec, definition, event, record.partition, record.offset),
                    None if definition is None else _step_name(definition, event),
                )
            )
        return events

    async def _commit(self, state: _PartitionState, events: list[ProjectedEvent]) -> None:
        """Hand ``events`` and the new position to the model; not interrupted once begun.

        Cancelling while the model commits (in its own thread) waits for the commit, so
        the projector's state never drifts from what the model stored.
        """
        position = state.position()
        task = asyncio.ensure_future(self._model.apply(state.partition, events, position))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await task
            if task.done() and not task.cancelled() and task.exception() is None:
                self._applied(state, events, position)
            raise
        self._applied(state, events, position)
        async with self._progress:
            self._progress.notify_all()

    def _applied(
        self, state: _PartitionState, events: list[ProjectedEvent], position: Position
    ) -> None:
        state.committed = position
        self.applied += len(events)


class _Stopped(Exception):
    """:meth:`Projector.close` ended a run."""
