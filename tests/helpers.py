"""Shared test helpers: a recording 3-step saga and readers of the in-memory log."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pybreaker

from kapbit import (
    Backoff,
    BreakerPolicy,
    Definition,
    Failure,
    JsonCodec,
    MsgpackCodec,
    Options,
    Progress,
    RetryPolicy,
    Sleep,
    Step,
    Success,
)
from kapbit.codecs import Codec
from kapbit.events import (
    TERMINAL_KINDS,
    DeadLetter,
    Event,
    EventKind,
    Rejected,
    StepOutcome,
    WorkflowCreated,
    WorkflowResult,
    WorkflowRetry,
)
from kapbit.log_reader import PartitionReader
from kapbit.partitioner import partition_for
from kapbit.repository import Checkpoint, MemRepository, Record
from kapbit.restore import decode_event
from kapbit.snapshots import load_snapshot


@dataclass
class Script:
    """What each step does, by (step, phase): "ok", "fail" (business Failure) or "raise"."""

    behaviour: dict[tuple[int, str], str] = field(default_factory=dict)
    calls: list[tuple[str, int, str]] = field(default_factory=list)
    seen: list[tuple[int, str, list[tuple[int, Any]]]] = field(default_factory=list)

    def action(self, step: int, phase: str) -> Callable[[Any, Progress], Any]:
        async def act(input: Any, progress: Progress) -> Any:
            wid = input["id"] if isinstance(input, dict) else str(input)
            self.calls.append((wid, step, phase))
            self.seen.append((step, phase, [(i, o.value) for i, o in progress.executions]))
            what = self.behaviour.get((step, phase), "ok")
            if what == "raise":
                raise ConnectionError(f"step {step} {phase} unavailable")
            if what == "fail":
                return Failure(f"no-{step}")
            return Success(f"{phase[:4]}-{step}")

        return act


def saga(
    script: Script, steps: int = 3, compensate: tuple[int, ...] | None = None, name: str = "saga"
) -> Definition:
    """A ``steps``-step saga; steps listed in ``compensate`` (all by default) compensate."""
    with_comp = range(steps) if compensate is None else compensate
    return Definition(
        name,
        steps=[
            Step(
                script.action(i, "execute"),
                script.action(i, "compensate") if i in with_comp else None,
                name=f"s{i}",
            )
            for i in range(steps)
        ],
        result=lambda input, progress: {
            "values": progress.values(),
            "compensated": [i for i, _ in progress.compensations],
        },
        input_type=dict[str, Any],
        outcome_type=str,
    )


def log_events(repo: MemRepository, codec: Codec | None = None) -> list[tuple[int, int, Event]]:
    """Every record of the log decoded, as ``(partition, offset, event)``."""
    codec = codec or JsonCodec()
    return [(r.partition, r.offset, decode_event(codec, r)) for r in repo.records()]


def kinds(repo: MemRepository, workflow_id: str | None = None) -> list[str]:
    """The kinds of the records of the log (of one workflow when an id is given)."""
    return [r.kind for r in repo.records() if workflow_id is None or r.key == workflow_id]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` on every loop turn until it holds; fail after ``timeout``."""

    async def _poll() -> None:
        while not predicate():  # noqa: ASYNC110 - engine state has no event to wait on
            await asyncio.sleep(0.001)

    await asyncio.wait_for(_poll(), timeout)


# --- resilience helpers (emitter, breaker, retry worker, faults) ------------------------------


class Clock:
    """An injectable ``sleep`` that records every delay and returns on the next loop turn.

    Delays of at least ``hold_from`` seconds (the retry worker's slow interval) instead wait
    for a :meth:`tick` each, so a test decides when a slow interval has passed.
    """

    def __init__(self, hold_from: float | None = None) -> None:
        self.delays: list[float] = []
        self.hold_from = hold_from
        self.held = 0
        self._ticks = asyncio.Semaphore(0)

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.hold_from is not None and delay >= self.hold_from:
            self.held += 1
            try:
                await self._ticks.acquire()
            finally:
                self.held -= 1
        else:
            await asyncio.sleep(0)

    def tick(self) -> None:
        """Let one held (slow) sleep finish."""
        self._ticks.release()


class BreakerStates(pybreaker.CircuitBreakerListener):
    """Records a breaker's state changes, e.g. ``["open", "half-open", "closed"]``."""

    def __init__(self) -> None:
        self.changes: list[str] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes.append(new_state.name)


def expire_reset_timeout(storage: pybreaker.CircuitMemoryStorage, seconds: float) -> None:
    """Move an open breaker's clock past ``seconds``, as if its reset timeout had passed."""
    storage.opened_at = datetime.now(UTC) - timedelta(seconds=seconds + 1)


class LogCapture(logging.Handler):
    """Collects the records of the ``kapbit`` loggers (use as a context manager)."""

    def __init__(self, logger: str = "kapbit") -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(logger)
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> LogCapture:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def of(self, name: str) -> list[logging.LogRecord]:
        """The records of logger ``name`` (exactly)."""
        return [r for r in self.records if r.name == name]


def fast_options(
    *,
    max_attempts: int = 5,
    slow_interval: float = 0.01,
    fail_max: int = 3,
    reset_timeout: float = 0.05,
    **kwargs: Any,
) -> Options:
    """Options with millisecond backoffs, so resilience tests run without waiting."""
    tiny = Backoff(initial=0.001, maximum=0.004, jitter=0.001)
    return Options(
        emit_backoff=tiny,
        retry=RetryPolicy(fast=tiny, slow_interval=slow_interval, max_attempts=max_attempts),
        storage_breaker=BreakerPolicy(fail_max=fail_max, reset_timeout=reset_timeout),
        **kwargs,
    )


# --- recovery, checkpoint and fencing helpers -------------------------------------------------


class CrashRepository(MemRepository):
    """A :class:`MemRepository` that counts what goes through it and can freeze an append.

    ``hold(n, land=..., then=...)`` arms the ``n``-th append from now: that call never
    returns (the writer crashed mid-call), ``held`` is set and ``then`` is called at once
    (e.g. ``kbit.abort``, so the crash happens exactly there). With ``land=True`` the record
    lands first (the writer died before the acknowledgement), otherwise it does not land
    until :meth:`release` lets the call go on — landing *now*, after whatever happened
    meanwhile (e.g. another node's claim: a zombie write).

    Reads are counted (``records_read``, ``lowest_read`` per partition); payloads below
    ``garble_below[partition]`` are handed out garbled, so decoding one fails loudly. Every
    saved checkpoint is kept in ``saves`` and checked against the log as it stands
    (``checkpoint_errors``). ``journal`` (optional, shared with the steps of a test) gets
    ``("append", partition, offset)`` for each landed record, so the order of step calls
    and appends can be compared.
    """

    def __init__(
        self, partitions: int = 1, *, journal: list[tuple[Any, ...]] | None = None, **kw: Any
    ) -> None:
        super().__init__(partitions, **kw)
        self.journal = journal
        self.appends = 0
        self.held = asyncio.Event()
        self._hold_at: int | None = None
        self._hold_land = False
        self._hold_then: Callable[[], None] | None = None
        self._release = asyncio.Event()
        self.records_read = [0] * partitions
        self.lowest_read: list[int | None] = [None] * partitions
        self.garble_below: dict[int, int] = {}
        self.saves: list[tuple[int, Checkpoint]] = []
        self.checkpoint_errors: list[str] = []

    def hold(
        self, after: int = 1, *, land: bool = False, then: Callable[[], None] | None = None
    ) -> None:
        """Freeze the ``after``-th append from now (see the class docstring)."""
        self._hold_at = self.appends + after
        self._hold_land = land
        self._hold_then = then
        self.held = asyncio.Event()
        self._release = asyncio.Event()

    def disarm(self) -> None:
        """Forget an armed hold that has not been hit."""
        self._hold_at = None

    def release(self) -> None:
        """Let a held append (one that had not landed) go on."""
        self._release.set()

    def reset_counters(self) -> None:
        self.records_read = [0] * self.partitions
        self.lowest_read = [None] * self.partitions

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        write = functools.partial(super().append, partition, kind, key, node, value)
        return await self._write(partition, write)

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        return await self._write(
            partition, functools.partial(super().claim, partition, node, value)
        )

    async def _write(self, partition: int, write: Callable[[], Awaitable[int]]) -> int:
        """Count, hold and journal one write (an append or a claim) of the log."""
        self.appends += 1
        hit = self.appends == self._hold_at
        if hit:
            self._hold_at = None
            if not self._hold_land:
                self._spring()
                await self._release.wait()
        try:
            offset = await write()
        finally:
            if self.journal is not None:
                self.journal.append(("append", partition, len(self.records(partition)) - 1))
        if hit and self._hold_land:
            self._spring()
            await asyncio.Event().wait()  # never acknowledged
        return offset

    def _spring(self) -> None:
        self.held.set()
        if self._hold_then is not None:
            self._hold_then()

    async def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        garble = self.garble_below.get(partition, -1)
        async for batch in super().read(partition, start, stop):
            if batch:
                self.records_read[partition] += len(batch)
                low = self.lowest_read[partition]
                if low is None or batch[0].offset < low:
                    self.lowest_read[partition] = batch[0].offset
            if batch and batch[0].offset < garble:
                batch = [
                    Record(r.partition, r.offset, r.kind, r.key, r.node, b"\xff garbled")
                    if r.offset < garble
                    else r
                    for r in batch
                ]
            yield batch

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        self.saves.append((partition, checkpoint))
        self.checkpoint_errors.extend(checkpoint_problems(self, partition, checkpoint))
        self.checkpoint_errors.extend(await snapshot_problems(self, partition, checkpoint))
        await super().save_checkpoint(partition, checkpoint)


def live_records(repo: MemRepository, partition: int | None = None) -> list[Record]:
    """The records a reader acts on: a node's records after another node's ActiveWriter
    (zombie writes) are left out; ActiveWriter records are kept."""
    kept: list[Record] = []
    for p in range(repo.partitions) if partition is None else [partition]:
        owner = None
        for record in repo.records(p):
            if record.kind == "active_writer":
                owner = record.node
                kept.append(record)
            elif record.node == owner:
                kept.append(record)
    return kept


def histories(repo: MemRepository, codec: Codec | None = None) -> dict[str, list[Event]]:
    """Each workflow's live events (zombie writes left out), decoded, in log order."""
    codec = codec or JsonCodec()
    by_id: dict[str, list[Event]] = {}
    for record in live_records(repo):
        if record.kind != "active_writer":
            by_id.setdefault(record.key, []).append(decode_event(codec, record))
    return by_id


def signature(events: Sequence[Event]) -> list[tuple[Any, ...]]:
    """A workflow's history without timestamps, to compare two runs."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, WorkflowCreated):
            out.append(("created", e.type, bytes(e.input)))
        elif isinstance(e, StepOutcome):
            out.append(("outcome", e.step, e.phase, e.success, bytes(e.value)))
        elif isinstance(e, WorkflowResult):
            out.append(("result", bytes(e.result), e.compensated))
        elif isinstance(e, WorkflowRetry):
            out.append(("retry", e.attempt))
        elif isinstance(e, DeadLetter):
            out.append(("dead_letter", e.attempts))
        elif isinstance(e, Rejected):
            out.append(("rejected", e.event))
    return out


def check_history(
    workflow_id: str, events: Sequence[Event], steps: int, compensable: Collection[int]
) -> None:
    """Assert the saga invariants on one workflow's live history.

    Created first; exactly one terminal event, last; each (step, phase) outcome at most
    once; execute outcomes for steps 0, 1, ... in order, successes up to at most one
    Failure; compensations only after a Failure, only of succeeded steps that have a
    compensation, in reverse order, and all of them before a WorkflowResult.
    """
    where = f"workflow {workflow_id!r}: {signature(events)}"
    assert events and isinstance(events[0], WorkflowCreated), where
    terminals = [e for e in events if isinstance(e, WorkflowResult | DeadLetter | Rejected)]
    assert len(terminals) == 1 and events[-1] is terminals[0], where
    outcomes = [e for e in events if isinstance(e, StepOutcome)]
    keys = [(o.step, o.phase) for o in outcomes]
    assert len(keys) == len(set(keys)), f"an outcome is persisted twice: {where}"
    executed = [o for o in outcomes if o.phase == "execute"]
    compensated = [o for o in outcomes if o.phase == "compensate"]
    assert [o.step for o in executed] == list(range(len(executed))), where
    assert all(o.success for o in executed[:-1]), where
    failed = executed[-1].step if executed and not executed[-1].success else None
    # every compensation comes after the last execute outcome
    if compensated:
        assert failed is not None, f"compensation without a failure: {where}"
        assert outcomes.index(compensated[0]) > outcomes.index(executed[-1]), where
    expected = [i for i in range(failed - 1, -1, -1) if i in compensable] if failed else []
    steps_back = [o.step for o in compensated]
    assert steps_back == expected[: len(steps_back)], f"wrong compensations: {where}"
    final = terminals[0]
    if isinstance(final, WorkflowResult):
        assert final.compensated == (failed is not None), where
        if failed is None:
            assert len(executed) == steps, where
        assert steps_back == expected, f"missing compensations: {where}"


def checkpoint_problems(repo: MemRepository, partition: int, checkpoint: Checkpoint) -> list[str]:
    """What is wrong with ``checkpoint`` given the log as it stands now: a live workflow
    created below ``checkpoint.offset`` without a live terminal event (the checkpoint
    leads), or an owner that is not the one in force at the offset."""
    problems: list[str] = []
    open_ids: dict[str, int] = {}
    for record in live_records(repo, partition):
        if record.kind == "workflow_created":
            open_ids.setdefault(record.key, record.offset)
        elif record.kind in TERMINAL_KINDS:
            open_ids.pop(record.key, None)
    for workflow_id, offset in open_ids.items():
        if offset < checkpoint.offset:
            problems.append(
                f"partition {partition}: checkpoint {checkpoint.offset} is ahead of open "
                f"workflow {workflow_id!r} created at {offset}"
            )
    for offset, owner in (
        (checkpoint.offset, checkpoint.owner),
        (checkpoint.window_offset, checkpoint.window_owner),
    ):
        writers = [
            r.node
            for r in repo.records(partition)
            if r.kind == "active_writer" and r.offset < offset
        ]
        if writers and writers[-1] != owner:
            problems.append(
                f"partition {partition}: checkpoint owner {owner!r} at {offset}, "
                f"the log says {writers[-1]!r}"
            )
    return problems


async def snapshot_problems(
    repo: MemRepository, partition: int, checkpoint: Checkpoint
) -> list[str]:
    """How the snapshot ``checkpoint`` names differs from reading the partition from its
    start up to the snapshot's offset (the oracle: the state recovery without the snapshot
    reaches there); nothing for a checkpoint without a snapshot."""
    if checkpoint.snapshot_offset < 0:
        return []
    if checkpoint.anchor_writer != await repo.current_owner(partition):
        # A replaced writer's late save (it did not know yet): its snapshot may name chunks
        # the new owner has deleted since. Recovery then falls back to the checkpoint's
        # offsets (test_a_snapshot_that_cannot_be_used_falls_back_to_the_offsets).
        return []
    for codec in (JsonCodec(), MsgpackCodec()):
        state = await load_snapshot(repo, codec, partition, checkpoint, 1)
        if state is not None:
            break
    else:
        return [f"partition {partition}: the snapshot {checkpoint} does not load"]
    reference = PartitionReader(codec, partition, "", 1)
    for record in repo.records(partition)[: state.offset]:
        reference.take(record)
    problems: list[str] = []

    def summary(workflows: Any) -> dict[str, Any]:
        return {
            w.id: (w.type, w.created_offset, [o for o, _ in w.outcomes], w.attempts)
            for w in workflows
        }

    if summary(state.open) != summary(reference.open.values()):
        problems.append(
            f"partition {partition}: snapshot at {state.offset} has open "
            f"{summary(state.open)}, the log {summary(reference.open.values())}"
        )
    size = state.writer_window
    window = list(reference.windows.of(size).entries())
    if state.window[-size:] != window[-size:]:
        problems.append(
            f"partition {partition}: snapshot at {state.offset} has window "
            f"{state.window[-size:]}, the log {window[-size:]}"
        )
    if state.owner != reference.owners.owner:
        problems.append(f"partition {partition}: snapshot owner {state.owner!r}")
    return problems


class YieldingScript(Script):
    """A :class:`Script` whose actions yield to the event loop once before acting, so that
    concurrent workflows interleave their events."""

    def action(self, step: int, phase: str) -> Callable[[Any, Progress], Any]:
        act = super().action(step, phase)

        async def yielding(input: Any, progress: Progress) -> Any:
            await asyncio.sleep(0)  # a scheduling point, not a wait
            return await act(input, progress)

        return yielding


def gated_saga(
    release: asyncio.Event | None,
    calls: list[tuple[str, int]],
    name: str = "gated",
    tag: str = "",
) -> Definition:
    """A 3-step saga whose step 1 waits for ``release`` (runs straight on when ``None``).

    ``calls`` gets ``(workflow id, step)`` per execute call; step values are
    ``f"{id}-{step}{tag}"`` (a tag tells instances apart); the result is the input id and
    the step values.
    """

    def step(index: int) -> Callable[[Any, Progress], Any]:
        async def act(input: Any, progress: Progress) -> Any:
            calls.append((input["id"], index))
            if index == 1 and release is not None:
                await release.wait()
            return Success(f"{input['id']}-{index}{tag}")

        return act

    return Definition(
        name,
        steps=[Step(step(i), name=f"s{i}") for i in range(3)],
        result=lambda input, progress: [input["id"], *progress.values()],
        input_type=dict[str, Any],
        outcome_type=str,
    )


def _outcome_key(record: Record, outcome: StepOutcome) -> tuple[Any, ...]:
    return (outcome.id, outcome.step, outcome.phase)


#: Names the workflow a step call or a persisted outcome belongs to, as ``(workflow,
#: step, phase)``: by default the workflow id; a test reusing ids names the incarnation.
OutcomeKey = Callable[[Record, StepOutcome], tuple[Any, ...]]


def assert_no_step_reran_after_its_outcome(
    repo: MemRepository,
    journal: Sequence[tuple[Any, ...]],
    key: OutcomeKey = _outcome_key,
) -> None:
    """No step call in ``journal`` comes after the live outcome of the same step and phase.

    ``journal`` interleaves ``("append", partition, offset)`` (from a
    :class:`CrashRepository`) with step calls whose last three items are ``(workflow,
    step, phase)``, the workflow named as ``key`` names the outcome's.
    """
    live = {(r.partition, r.offset): r for r in live_records(repo)}
    codec = JsonCodec()
    persisted: set[tuple[Any, ...]] = set()
    for entry in journal:
        if entry[0] == "append":
            record = live.get((entry[1], entry[2]))
            if record is not None and record.kind == "step_outcome":
                persisted.add(key(record, codec.decode(record.value, StepOutcome)))
        else:
            call = tuple(entry[-3:])
            assert call not in persisted, f"{call} ran again after its outcome was persisted"


def assert_compensations_followed_successes(
    repo: MemRepository,
    journal: Sequence[tuple[Any, ...]],
    key: OutcomeKey = _outcome_key,
) -> None:
    """A compensation is called only after its step's successful execute outcome and a
    later step's Failure are both in the (live) log (``journal`` as for
    :func:`assert_no_step_reran_after_its_outcome`)."""
    live = {(r.partition, r.offset): r for r in live_records(repo)}
    codec = JsonCodec()
    succeeded: set[tuple[Any, int]] = set()
    failed: dict[Any, int] = {}
    for entry in journal:
        if entry[0] == "append":
            record = live.get((entry[1], entry[2]))
            if record is None or record.kind != "step_outcome":
                continue
            outcome = codec.decode(record.value, StepOutcome)
            if outcome.phase == "execute":
                workflow = key(record, outcome)[0]
                if outcome.success:
                    succeeded.add((workflow, outcome.step))
                else:
                    failed[workflow] = outcome.step
        elif entry[-1] == "compensate":
            workflow, step = entry[-3], entry[-2]
            assert (workflow, step) in succeeded, f"{entry}: its step did not succeed"
            assert failed.get(workflow, -1) > step, f"{entry}: no later step failed"


@dataclass
class Incarnation:
    """One workflow of an id: its live events from a ``WorkflowCreated`` on, second copies
    (byte-identical records of the same writer, a producer retry) left out."""

    id: str
    partition: int
    records: list[Record] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def created(self) -> WorkflowCreated:
        first = self.events[0]
        assert isinstance(first, WorkflowCreated)
        return first

    @property
    def terminal(self) -> Event | None:
        """The first terminal event (of any of ``TERMINAL_KINDS``), if any."""
        for record, event in zip(self.records, self.events, strict=True):
            if record.kind in TERMINAL_KINDS:
                return event
        return None


def incarnations(
    repo: MemRepository, codec: Codec | None = None
) -> tuple[dict[str, list[Incarnation]], list[str]]:
    """Each id's workflows as a reader acting on the live log sees them, and what is wrong
    with the log's shape: an event of an id with no open workflow, a second, different
    ``WorkflowCreated`` while the id's workflow is open (the id was accepted twice)."""
    codec = codec or JsonCodec()
    by_id: dict[str, list[Incarnation]] = {}
    seen: set[tuple[int, str, str, bytes, int]] = set()
    problems: list[str] = []
    for record in live_records(repo):
        if record.kind == "active_writer":
            continue
        ids = by_id.setdefault(record.key, [])
        # A copy repeats a record of the same workflow: two workflows of one id may write
        # byte-identical events (same values, same clock reading), which are no copies.
        workflow = -1 if record.kind == "workflow_created" else len(ids)
        copy = (record.partition, record.key, record.kind, record.value, workflow)
        if copy in seen:
            continue
        seen.add(copy)
        event = decode_event(codec, record)
        current = ids[-1] if ids else None
        where = f"{record.kind} of {record.key!r} at {record.partition}/{record.offset}"
        if isinstance(event, WorkflowCreated):
            if current is not None and current.terminal is None:
                problems.append(f"{where}: the id was accepted again while its workflow is open")
            ids.append(Incarnation(record.key, record.partition, [record], [event]))
            continue
        if current is None or current.terminal is not None:
            problems.append(f"{where}: no open workflow of that id")
            continue
        current.records.append(record)
        current.events.append(event)
    return by_id, problems


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as module ``<name>_example`` (examples are scripts,
    not a package; they import each other as top-level modules, as when run)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.append(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TailWatched(MemRepository):
    """A log that tells when a tail has started on each partition (``tailing``): a test
    appends what the tail must see as new only after that."""

    def __init__(self, partitions: int) -> None:
        super().__init__(partitions)
        self.tailing = [asyncio.Event() for _ in range(partitions)]

    async def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        self.tailing[partition].set()
        async for batch in super().tail(partition, start):
            yield batch


def napper(naps: int, raises: int) -> tuple[Definition[str, str, list[str]], list[int]]:
    """``naps`` steps that each sleep an hour, then a step that raises ConnectionError on its
    first ``raises`` runs (the list counts its runs)."""
    runs = [0]

    async def nap(_: str, __: Progress) -> Sleep[str]:
        return Sleep(timedelta(hours=1), value="napped")

    async def flaky(_: str, __: Progress) -> Success[str]:
        runs[0] += 1
        if runs[0] <= raises:
            raise ConnectionError(f"provider down (run {runs[0]})")
        return Success("done")

    definition = Definition(
        "napper",
        steps=[*(Step(nap, name=f"nap{n}") for n in range(naps)), Step(flaky, name="flaky")],
        result=lambda _input, progress: progress.values(),
        input_type=str,
        outcome_type=str,
        result_type=list[str],
    )
    return definition, runs


def ids_in_partition(partition: int, count: int, partitions: int, prefix: str = "w") -> list[str]:
    """The first ``count`` ids ``<prefix><n>`` that hash to ``partition`` of ``partitions``."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        candidate = f"{prefix}{n}"
        if partition_for(candidate, partitions) == partition:
            found.append(candidate)
        n += 1
    return found
