"""The model-based checker: the real engine against a reference model it keeps itself.

A hypothesis state machine drives :class:`kapbit.Kapbit` on a :class:`MemRepository`
through :class:`kapbit.testing.FaultyRepository`. Rules start workflows of random
definitions (steps that succeed, fail, raise, block until released, return ``None``, a
wrong type, a value too large for the log, or a durable timer: ``Sleep`` / ``SleepUntil``),
program append faults (transient failures, lost acks that leave a second copy, rejections,
appends held before they land, and acks held after the record landed; also aimed at timer
outcomes), crash the instance (``abort``) or close it (then no instance runs for a while of
the clock), start a second instance while the first still runs, and move the instances'
one :class:`~kapbit.testing.ManualClock` (small and large jumps, exactly to the next fire
time or just before it, the wall clock stepped back). A third of the examples run with
tight limits (one workflow running, two running or sleeping). After every rule, and at
quiescence at the end of each example (where the clock moves on until every workflow has
ended), it checks:

* every workflow whose ``WorkflowCreated`` is in the live log (zombie writes excluded)
  reaches exactly one terminal event, and the live instance knows it (``wait_result``);
* no step outcome is acted on twice: a step runs again only if its previous call raised,
  or the node running it crashed, closed or was taken over first and its outcome is not in
  the live log;
* the outcomes follow the saga rules of the model: execute in order up to a Failure,
  compensations only for succeeded steps, in reverse order, the rollback stopping at a
  compensation that returns Failure; a wrong return type ends the workflow at once;
* what every caller received agrees with the log, and every outcome in the log is one a
  step really returned; nothing a fenced node wrote is acted on;
* the idempotency window refuses the ids it must;
* the status rows of a projector (:class:`StatusModel`) agree with the log;
* durable timers: every timer outcome carries the fire time its timer gives, the same in
  every copy; no step after a timer runs before that time by the clock; a due timer (also
  one that expired while no instance ran) is acted on by the owner; ``stats.sleeping`` and
  handles' ``sleeping`` agree with the log.

Profiles: the default runs derandomized within CI's time; ``KAPBIT_MODEL_PROFILE=long``
runs 2,000 random examples. ``KAPBIT_MODEL_SKIP`` (comma-separated: behaviours, optionally
as ``execute:none``; fault modes, optionally as ``lost_ack:workflow_created``; append kinds;
the ``reuse_id`` rule) leaves some out, to look past a known defect while it is open.
A summary (examples, rules fired, crashes, takeovers, duplicates injected, faults by kind,
sleeps, clock jumps and other timer counts, defects) is printed at the end, and written as
JSON to ``KAPBIT_MODEL_SUMMARY`` when set.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kapbit import (
    CheckpointPolicy,
    DeadLettered,
    Definition,
    DuplicateWorkflow,
    Failure,
    Fenced,
    GateClosed,
    InstanceClosed,
    Kapbit,
    KapbitError,
    PayloadTooLarge,
    Progress,
    RecordRejected,
    Sleep,
    SleepUntil,
    Step,
    Success,
    TooManyWorkflows,
    WillRetryLater,
    WorkflowNotFound,
    WorkflowRejected,
    partition_for,
)
from kapbit.codecs import JsonCodec
from kapbit.events import (
    TERMINAL_KINDS,
    DeadLetter,
    EventKind,
    Rejected,
    StepOutcome,
    WorkflowResult,
)
from kapbit.projection import Projector, StatusModel, WorkflowStatus
from kapbit.repository import Checkpoint, MemRepository, Record
from kapbit.snapshots import load_snapshot
from kapbit.testing import FaultyRepository, ManualClock
from kapbit.testing.faults import Call, Fault, Operation
from tests.helpers import (
    Incarnation,
    assert_compensations_followed_successes,
    assert_no_step_reran_after_its_outcome,
    fast_options,
    ids_in_partition,
    incarnations,
    live_records,
)

PARTITIONS = 2
MAX_ATTEMPTS = 3
MAX_PAYLOAD = 1024
BIG = 1500  # characters of a "big" step value: its StepOutcome is over MAX_PAYLOAD
SETTLE_TIMEOUT = 1.0
BUSY_TIMEOUT = 10.0
#: Polling rounds (of about a millisecond each) that must pass, too, before the engine is
#: taken for stalled or for busy without end: see :class:`Watchdog`.
SETTLE_ROUNDS = 1000
BUSY_ROUNDS = 5000
#: The saga rule for a compensation returning Failure: the rollback stops there (issue 10,
#: item 3). Set to False to model "the rollback goes on with the next compensation".
COMPENSATION_FAILURE_STOPS = True

EXECUTE_BEHAVIOURS = [
    *("ok", "ok", "ok", "fail", "raise1", "raise9", "block", "none", "bad", "big"),
    *("sleep", "sleep", "until", "rsleep"),
]
#: A compensation returning a timer is a wrong return (the rollback may not wait).
COMPENSATE_BEHAVIOURS = ["ok", "ok", "ok", "fail", "raise1", "block", "none", "bad", "sleep"]
#: Steps returning a durable timer: ``Sleep(delay)`` or ``SleepUntil(submitted + offset)``;
#: ``rsleep`` raises once first (the retry worker's attempt then sleeps). A timer on the
#: last step or a compensation ends the workflow with InvalidReturn.
TIMER_BEHAVIOURS = frozenset({"sleep", "until", "rsleep"})
SLEEP_DELAYS = (0.0, 0.5, 60.0, 86_400.0)
UNTIL_OFFSETS = (-5.0, 30.0, 3_600.0, 40 * 86_400.0)
#: The clock rule's jumps (seconds); ``to_next`` lands exactly on the next fire time of a
#: sleeping workflow, ``before_next`` a millisecond before it; ``wall_back`` steps the wall
#: clock back an hour (as NTP may): no timer may fire early for it.
CLOCK_JUMPS: dict[str, float] = {
    "tick": 0.001,
    "second": 1.0,
    "minute": 61.0,
    "hour": 3_600.0,
    "day": 86_400.0,
    "weeks": 40 * 86_400.0,
    "to_next": 0.0,
    "before_next": 0.0,
    "wall_back": -3_600.0,
}
#: How long no instance runs between a crash or close and the next start.
DOWNTIMES: dict[str, float] = {"none": 0.0, "minute": 61.0, "weeks": 40 * 86_400.0}
T0 = datetime(2026, 1, 1, tzinfo=UTC)
FAULT_MODES = ["fail", "lost_ack", "reject", "too_large", "hold", "late_ack", "checkpoint"]
FAULT_KINDS = [
    "workflow_created",
    "workflow_created",
    "step_outcome",
    "step_outcome",
    "workflow_result",
    "workflow_retry",
    "dead_letter",
    "rejected",
    "sleep_outcome",  # a StepOutcome carrying fire_at
]
SKIP = frozenset(s for s in os.environ.get("KAPBIT_MODEL_SKIP", "").split(",") if s)
PROFILE = os.environ.get("KAPBIT_MODEL_PROFILE", "ci")


def _allowed(values: list[str], prefix: str = "") -> list[str]:
    """``values`` less those skipped, by name or as ``prefix:name``."""
    return [v for v in values if v not in SKIP and f"{prefix}:{v}" not in SKIP] or ["ok"]


# --- the outside world: steps, their calls, and the repository ---------------------------------


@dataclass
class StepCall:
    """One real call of a step action: the side effect the model counts."""

    node: str
    sub: int
    workflow_id: str
    step: int
    phase: str
    number: int  # the n-th call of this (submission, step, phase)
    started_at: int  # position in the journal
    clock_at: float  # the instances' clock when the call began
    state: str = "running"  # running, blocked, returned, raised, cancelled
    value: Any = None

    def journal_entry(self) -> tuple[Any, ...]:
        return ("call", self.node, self.started_at, self.sub, self.step, self.phase)


@dataclass(frozen=True)
class Shape:
    """A workflow definition's structure: its steps and which of them compensate."""

    steps: int
    compensable: frozenset[int]


@dataclass
class Plan:
    """What one submission's steps do, by (step, phase)."""

    sub: int
    workflow_id: str
    type: str
    shape: Shape
    behaviour: dict[tuple[int, str], str]
    #: Per step, the index of its timer's delay or offset (SLEEP_DELAYS, UNTIL_OFFSETS).
    waits: dict[int, int] = field(default_factory=dict)
    #: The clock when the workflow was submitted: SleepUntil times count from it, as a
    #: date in the input would.
    submitted_at: float = 0.0

    def does(self, step: int, phase: str) -> str:
        return self.behaviour.get((step, phase), "ok")

    def sleeps_after(self, step: int) -> bool:
        """Whether ``step``'s execute returns a timer the saga honours (a next step)."""
        return self.does(step, "execute") in TIMER_BEHAVIOURS and step < self.shape.steps - 1

    def until(self, step: int) -> datetime:
        return datetime.fromtimestamp(self.submitted_at + UNTIL_OFFSETS[self.waits[step]], UTC)

    def timer(self, step: int, phase: str, value: str) -> Sleep[str] | SleepUntil[str]:
        if self.does(step, phase) == "until":
            return SleepUntil(self.until(step), value)
        return Sleep(timedelta(seconds=SLEEP_DELAYS[self.waits.get(step, 0)]), value)

    def fire_at(self, step: int, at: float) -> float:
        """The fire time ``step``'s timer outcome must carry, written at ``at``."""
        if self.does(step, "execute") == "until":
            return self.until(step).timestamp()
        return at + SLEEP_DELAYS[self.waits[step]]

    def wrong_type(self, step: int, phase: str) -> str:
        """The type name an InvalidReturn of ``step`` names."""
        what = self.does(step, phase)
        return {"sleep": "Sleep", "rsleep": "Sleep", "until": "SleepUntil"}.get(what, "int")

    def misreturns(self, step: int, phase: str) -> bool:
        """Whether the action returns something the engine must end the workflow for."""
        what = self.does(step, phase)
        if phase == "compensate":
            return what in ("bad", "sleep")
        return what == "bad" or (what in TIMER_BEHAVIOURS and step == self.shape.steps - 1)

    def expected(self) -> tuple[list[tuple[int, str, bool]], tuple[int, str] | None]:
        """The outcomes (step, phase, success) the saga rules give, in order, and the
        action returning a wrong type that ends the workflow early, if any."""
        outcomes: list[tuple[int, str, bool]] = []
        failed: int | None = None
        for step in range(self.shape.steps):
            what = self.does(step, "execute")
            if self.misreturns(step, "execute"):
                return outcomes, (step, "execute")
            if what == "fail":
                outcomes.append((step, "execute", False))
                failed = step
                break
            outcomes.append((step, "execute", True))
        if failed is None:
            return outcomes, None
        for step in range(failed - 1, -1, -1):
            if step not in self.shape.compensable:
                continue
            what = self.does(step, "compensate")
            if self.misreturns(step, "compensate"):
                return outcomes, (step, "compensate")
            outcomes.append((step, "compensate", what != "fail"))
            if what == "fail" and COMPENSATION_FAILURE_STOPS:
                break
        return outcomes, None

    def may_dead_letter(self) -> bool:
        """Whether a step raises: the retry worker may give up on it."""
        return any(b.startswith("raise") or b == "rsleep" for b in self.behaviour.values())

    def rollback_fails(self) -> bool:
        """Whether a compensation the saga reaches returns Failure."""
        return any(p == "compensate" and not ok for _, p, ok in self.expected()[0])


class LateAckRepository(MemRepository):
    """A :class:`MemRepository` that journals every landed record and can hold an
    acknowledgement after the record landed (``late``), until released or forever.

    ``position`` maps each landed record (partition, offset) to its place in the journal;
    ``saves`` counts checkpoint saves."""

    def __init__(self, journal: list[Any], partitions: int, max_payload: int) -> None:
        super().__init__(partitions, max_payload=max_payload)
        self.journal = journal
        self.late: list[LateAck] = []
        self.position: dict[tuple[int, int], int] = {}
        self.saves = 0

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        await super().save_checkpoint(partition, checkpoint)
        self.saves += 1

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        offset = await super().append(partition, kind, key, node, value)
        await self._landed(Call("append", partition, kind, key, node, value), offset)
        return offset

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        offset = await super().claim(partition, node, value)
        call = Call("append", partition, EventKind.ACTIVE_WRITER, node, node, value)
        await self._landed(call, offset)
        return offset

    async def _landed(self, call: Call, offset: int) -> None:
        """Journal a landed record; hold its acknowledgement if a late ack asks for it."""
        assert call.partition is not None
        self.position[(call.partition, offset)] = len(self.journal)
        self.journal.append(("append", call.partition, offset))
        for late in self.late:
            if late.call is None and late.matches(call):
                late.call = call
                await late.released.wait()
                break


@dataclass
class LateAck:
    """Holds the acknowledgement of the next append of ``kind`` once it has landed."""

    kind: str
    call: Call | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, call: Call) -> bool:
        if self.kind == "sleep_outcome":
            return _carries_timer(call)
        return self.kind == call.kind


def _carries_timer(call: Call) -> bool:
    """Whether an append is a StepOutcome with a fire time (the model's events are JSON)."""
    if call.kind != "step_outcome":
        return False
    return msgspec.json.decode(call.value, type=StepOutcome).fire_at is not None


@dataclass(frozen=True)
class Sleeper:
    """A workflow sleeping by the live log: submission ``sub``'s step ``step`` returned a
    timer firing at ``fire_at``; its outcome landed at journal position ``landed``."""

    sub: int
    workflow_id: str
    step: int
    fire_at: float
    landed: int


class Watchdog:
    """Tells an engine that stopped moving (or never comes to rest) from a slow machine.

    The test polls the loop in rounds and reports what it sees after each. The engine has
    stalled when nothing moved for ``SETTLE_TIMEOUT`` seconds *and* ``SETTLE_ROUNDS``
    rounds, and is busy without end after ``BUSY_TIMEOUT`` seconds and ``BUSY_ROUNDS``
    rounds. On a loaded machine the process may not run for a second or more: seconds
    pass without rounds, and the engine, whose work all runs on the loop, had no chance
    to move. A stalled engine is caught all the same: the loop polls on and the rounds
    come. The seconds still count for what the engine waits for in real time.
    """

    def __init__(self, progress: tuple[int, ...], clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._seen = progress
        self._began = self._moved = clock()
        self._rounds = self._still = 0

    def observe(self, progress: tuple[int, ...]) -> str | None:
        """After one more round: ``"stalled"``, ``"busy"`` or ``None`` (go on polling)."""
        now = self._clock()
        self._rounds += 1
        if progress != self._seen:
            self._seen, self._moved, self._still = progress, now, 0
        else:
            self._still += 1
            if self._still >= SETTLE_ROUNDS and now - self._moved > SETTLE_TIMEOUT:
                return "stalled"
        if self._rounds >= BUSY_ROUNDS and now - self._began > BUSY_TIMEOUT:
            return "busy"
        return None


@dataclass
class Submission:
    """One ``exec_workflow`` call: what it asked for, on which node, and its answer."""

    plan: Plan
    node: str
    task: asyncio.Task[Any]
    checked: bool = False


@dataclass
class Totals:
    """Figures over the whole run, printed at its end."""

    examples: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    behaviours: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    closes: int = 0
    takeovers: int = 0
    duplicates: int = 0
    zombie_records: int = 0
    zombie_calls: int = 0
    workflows: int = 0
    reused_ids: int = 0
    snapshot_modes: Counter[str] = field(default_factory=Counter)
    #: Starts whose stored checkpoint named a snapshot (recovered from it if it was whole).
    snapshot_starts: int = 0
    #: Starts whose stored snapshot held a sleeping workflow.
    snapshot_starts_with_timers: int = 0
    #: Examples by ``snapshot_after`` (with snapshots on); starts whose recovered state was
    #: pinned (followed from the start; ``snapshot_after`` 0 not counted); saves that woke a
    #: resting partition's reader;
    #: instances that woke a reader more than once (it rested in between).
    snapshot_after: Counter[int] = field(default_factory=Counter)
    pinned_starts: int = 0
    snapshot_wakes: int = 0
    woke_again: int = 0
    #: Durable timers returned where the saga honours them, by kind (sleep, until).
    sleeps: Counter[str] = field(default_factory=Counter)
    #: Timers returned by a last step or a compensation (ended with InvalidReturn).
    misplaced_timers: int = 0
    #: Timer outcomes in the log (every copy, zombies included) and the second copies.
    timer_outcomes: int = 0
    timer_outcome_copies: int = 0
    #: Storage faults that hit the append of a timer outcome, by mode.
    timer_outcome_faults: Counter[str] = field(default_factory=Counter)
    clock_jumps: Counter[str] = field(default_factory=Counter)
    #: Timers a clock jump made due; timers that expired while no instance ran.
    timers_due_by_jump: int = 0
    timers_expired_while_down: int = 0
    #: Step calls after a timer step (a workflow woken; retries and zombies' calls included).
    wakes: int = 0
    #: Crashes, closes and takeovers while at least one workflow slept.
    disruptions_while_sleeping: Counter[str] = field(default_factory=Counter)
    #: Checkpoint saves during rules that began with a workflow sleeping.
    checkpoints_while_sleeping: int = 0
    #: Handle statuses compared with the model (sleeping or not).
    handle_checks: int = 0
    #: Calls refused with nothing written, by error (TooManyWorkflows with tight limits).
    refusals: Counter[str] = field(default_factory=Counter)
    tight_limits: int = 0
    defects: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": PROFILE,
            "examples": self.examples,
            "rules_fired": sum(self.rules.values()),
            "rules": dict(self.rules),
            "workflows": self.workflows,
            "reused_ids": self.reused_ids,
            "snapshot_modes": dict(self.snapshot_modes),
            "snapshot_starts": self.snapshot_starts,
            "snapshot_after": dict(self.snapshot_after),
            "pinned_starts": self.pinned_starts,
            "snapshot_wakes": self.snapshot_wakes,
            "instances_that_woke_again": self.woke_again,
            "crashes": self.crashes,
            "graceful_restarts": self.closes,
            "takeovers": self.takeovers,
            "duplicates_injected": self.duplicates,
            "zombie_records": self.zombie_records,
            "zombie_step_calls": self.zombie_calls,
            "faults": dict(self.faults),
            "timers": {
                "sleeps": dict(self.sleeps),
                "misplaced_timers": self.misplaced_timers,
                "timer_outcomes_in_log": self.timer_outcomes,
                "timer_outcome_copies": self.timer_outcome_copies,
                "faults_on_timer_outcomes": dict(self.timer_outcome_faults),
                "clock_jumps": dict(self.clock_jumps),
                "timers_due_by_jump": self.timers_due_by_jump,
                "timers_expired_while_down": self.timers_expired_while_down,
                "calls_after_a_timer": self.wakes,
                "disruptions_while_sleeping": dict(self.disruptions_while_sleeping),
                "checkpoints_while_sleeping": self.checkpoints_while_sleeping,
                "snapshot_starts_with_timers": self.snapshot_starts_with_timers,
                "handle_checks": self.handle_checks,
                "examples_with_tight_limits": self.tight_limits,
            },
            "refusals": dict(self.refusals),
            "behaviours": dict(self.behaviours),
            "defects_found": len(self.defects),
            "defects": self.defects,
            "skipped": sorted(SKIP),
        }


TOTALS = Totals()


# --- the state machine --------------------------------------------------------------------------


class EngineModel(RuleBasedStateMachine):
    """Drives the real engine and checks it against the model after every rule."""

    def __init__(self) -> None:
        super().__init__()
        TOTALS.examples += 1
        self.loop = asyncio.new_event_loop()
        self.journal: list[Any] = []
        self.calls: list[StepCall] = []
        self.calls_of: dict[tuple[int, int, str], list[StepCall]] = {}
        self.counts: Counter[tuple[int, int, str]] = Counter()
        self.blocks: dict[tuple[int, int, str], asyncio.Event] = {}
        self.plans: dict[int, Plan] = {}
        self.submissions: list[Submission] = []
        self.nodes: list[Kapbit] = []
        self.stopped: dict[str, int] = {}  # node -> journal position it crashed/closed/lost
        self.holds: list[Fault] = []  # appends held before they land ...
        self.released: list[Fault] = []  # ... and those let go
        self.faults: list[Fault] = []
        self.shapes: list[Shape] = []
        self.window = 1
        self.zombie_calls = 0
        self.wakes = 0
        self.timer_records = 0
        self.timer_copies = 0
        self.draining = False
        self.checkpoint_every = 1
        self.checkpoint_interval = 3600.0
        self.snapshots = "off"
        self.snapshot_after = 0
        #: One clock for every instance of the example; it moves by the clock rule, across
        #: downtime, and with ``drift`` by a millisecond per poll while the test waits.
        self.clock = ManualClock(T0)
        self.drift = False
        self.max_workflows = 10_000
        self.max_sleeping = 1_000_000
        self.downtime = 0.0
        self.outcomes: dict[tuple[int, int], StepOutcome] = {}  # decoded, by position
        self.sleepers_cache: tuple[int, dict[int, Sleeper]] = (-1, {})
        self.slept = False  # a workflow slept when the last rule began
        self.saves_seen = 0
        self.ids = 0
        self.next_sub = 0
        self.repo: LateAckRepository
        self.faulty: FaultyRepository
        self.tmp = tempfile.TemporaryDirectory(prefix="kapbit-model-")

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    # --- set-up -----------------------------------------------------------------------------

    @initialize(
        shapes=st.lists(
            st.integers(1, 4).flatmap(
                lambda n: st.builds(
                    Shape, st.just(n), st.frozensets(st.integers(0, n - 1)).map(frozenset)
                )
            ),
            min_size=1,
            max_size=3,
        ),
        window=st.sampled_from([1, 2, 3, 1000]),
        checkpoint_every=st.sampled_from([1, 1, 2, 1000]),
        checkpoint_interval=st.sampled_from([3600.0, 3600.0, 0.002]),
        snapshots=st.sampled_from(["off", "on", "on", "chunks", "limit"]),
        snapshot_after=st.sampled_from([0, 3, 8, 20]),
        tight=st.sampled_from([False, False, True]),
    )
    def set_up(
        self,
        shapes: list[Shape],
        window: int,
        checkpoint_every: int,
        checkpoint_interval: float,
        snapshots: str,
        snapshot_after: int,
        tight: bool,
    ) -> None:
        """Checkpoints are saved after every (or every 2nd) termination, and with a short
        interval also by the clock, at moments the rules do not choose (the clock then
        drifts while the test waits, as real time would). They carry snapshots (in one
        chunk or many tiny ones), none, or only while the snapshot stays under a limit a
        few workflows exceed (then the last one that fitted stays named); taken at every
        save (``snapshot_after`` 0) or only while the oldest open workflow lies that many
        records behind, so readers rest, wake and rest again. With ``tight``
        limits, one workflow runs and two run or sleep at most: admission refuses more,
        and due timers wake only as running slots free up."""
        self.shapes = shapes
        self.drift = checkpoint_interval < 1
        self.window = window
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.snapshots = snapshots
        self.snapshot_after = snapshot_after
        if snapshots != "off":
            TOTALS.snapshot_after[snapshot_after] += 1
        self.max_workflows, self.max_sleeping = (1, 2) if tight else (10_000, 1_000_000)
        TOTALS.tight_limits += tight
        TOTALS.snapshot_modes[snapshots] += 1
        asyncio.set_event_loop(self.loop)
        self.repo = LateAckRepository(self.journal, PARTITIONS, MAX_PAYLOAD)
        self.faulty = FaultyRepository(self.repo)
        self.run(self._start_node())

    def _definitions(self, node: str) -> list[Definition]:
        return [
            Definition(
                f"d{index}",
                [
                    Step(
                        self._action(node, step, "execute"),
                        self._action(node, step, "compensate")
                        if step in shape.compensable
                        else None,
                        name=f"s{step}",
                    )
                    for step in range(shape.steps)
                ],
                result=lambda input, progress: {
                    "values": progress.values(),
                    "compensated": [i for i, _ in progress.compensations],
                },
                input_type=dict[str, Any],
            )
            for index, shape in enumerate(self.shapes)
        ]

    def _action(self, node: str, step: int, phase: str) -> Callable[[Any, Progress], Any]:
        async def act(input: dict[str, Any], progress: Progress) -> Any:
            sub = input["sub"]
            plan = self.plans[sub]
            key = (sub, step, phase)
            self.counts[key] += 1
            call = StepCall(
                node,
                sub,
                plan.workflow_id,
                step,
                phase,
                self.counts[key],
                len(self.journal),
                self.clock.now(),
            )
            self.calls.append(call)
            self.calls_of.setdefault(key, []).append(call)
            self.journal.append(call.journal_entry())
            what = plan.does(step, phase)
            try:
                await asyncio.sleep(0)  # let other workflows interleave
                if what == "block" and call.number == 1 and not self.draining:
                    call.state = "blocked"
                    await self.blocks.setdefault(key, asyncio.Event()).wait()
                    call.state = "running"
                if what == "rsleep" and call.number == 1:
                    raise ConnectionError(f"{key} not yet (call 1)")
                if what.startswith("raise") and call.number <= int(what[5:]):
                    raise ConnectionError(f"{key} unavailable (call {call.number})")
            except asyncio.CancelledError:
                call.state = "cancelled"
                raise
            except Exception:
                call.state = "raised"
                raise
            value: Any
            # Every value names the submission: the outcome of any copy names its workflow.
            if what == "fail":
                value = Failure(f"no{step}.{call.number}/{sub}")
            elif what == "none":
                value = None
            elif what == "bad":
                value = 42
            elif what == "big":
                value = Success("x" * BIG)
            elif what in TIMER_BEHAVIOURS:
                value = plan.timer(step, phase, f"{phase[0]}{step}.{call.number}/{sub}")
                if plan.misreturns(step, phase):
                    TOTALS.misplaced_timers += 1
                else:
                    TOTALS.sleeps[what] += 1
            else:
                value = Success(f"{phase[0]}{step}.{call.number}/{sub}")
            call.state = "returned"
            call.value = value
            return value

        return act

    async def _start_node(self) -> Kapbit:
        node_id = f"n{len(self.nodes):03d}"
        kbit = Kapbit(
            self._definitions(node_id),
            self.faulty,
            options=fast_options(
                max_attempts=MAX_ATTEMPTS,
                node_id=node_id,
                clock=self.clock,
                max_workflows=self.max_workflows,
                max_sleeping=self.max_sleeping,
                idempotency_window=self.window,
                checkpoints=CheckpointPolicy(
                    every=self.checkpoint_every,
                    interval=self.checkpoint_interval,
                    snapshots=self.snapshots != "off",
                    snapshot_chunk=48 if self.snapshots == "chunks" else 256 * 1024,
                    snapshot_limit=900 if self.snapshots == "limit" else 1 << 26,
                    snapshot_after=self.snapshot_after,
                ),
                close_timeout=0.01,
            ),
        )
        self.nodes.append(kbit)
        stored = await self.repo.load_checkpoints()
        TOTALS.snapshot_starts += any(c.snapshot_offset >= 0 for c in stored.values())
        for partition, checkpoint in stored.items():
            if checkpoint.snapshot_offset >= 0:
                state = await load_snapshot(self.repo, JsonCodec(), partition, checkpoint, 1)
                if state is not None and any(w.fire_at is not None for w in state.open):
                    TOTALS.snapshot_starts_with_timers += 1
                    break
        await kbit.start()
        TOTALS.pinned_starts += self.snapshot_after > 0 and kbit.stats.snapshots_following > 0
        for earlier in self.nodes[:-1]:
            self.stopped.setdefault(earlier.node_id, len(self.journal))
        return kbit

    @property
    def current(self) -> Kapbit:
        return self.nodes[-1]

    # --- rules: workflows -------------------------------------------------------------------

    def _behaviours(self) -> st.SearchStrategy[list[tuple[str, str, int]]]:
        return st.lists(
            st.tuples(
                st.sampled_from(_allowed(EXECUTE_BEHAVIOURS, "execute")),
                st.sampled_from(_allowed(COMPENSATE_BEHAVIOURS, "compensate")),
                st.integers(0, len(SLEEP_DELAYS) - 1),
            ),
            min_size=4,
            max_size=4,
        )

    def _submit(
        self, workflow_id: str, type_index: int, behaviour: list[tuple[str, str, int]]
    ) -> None:
        shape = self.shapes[type_index % len(self.shapes)]
        sub = self.next_sub
        self.next_sub += 1
        plan = Plan(sub, workflow_id, f"d{type_index % len(self.shapes)}", shape, {})
        plan.submitted_at = self.clock.now()
        for step in range(shape.steps):
            execute, compensate, wait = behaviour[step]
            plan.waits[step] = wait
            plan.behaviour[(step, "execute")] = execute
            TOTALS.behaviours[f"execute:{execute}"] += 1
            if step in shape.compensable:
                plan.behaviour[(step, "compensate")] = compensate
                TOTALS.behaviours[f"compensate:{compensate}"] += 1
        self.plans[sub] = plan
        kbit = self.current
        task = self.loop.create_task(
            kbit.exec_workflow(workflow_id, plan.type, {"id": workflow_id, "sub": sub})
        )
        self.submissions.append(Submission(plan, kbit.node_id, task))
        self.settle()

    @rule(type_index=st.integers(0, 2), behaviour=st.data())
    def start_workflow(self, type_index: int, behaviour: st.DataObject) -> None:
        drawn = behaviour.draw(self._behaviours())
        if not self.current.is_running:
            return
        TOTALS.rules["start_workflow"] += 1
        TOTALS.workflows += 1
        self.ids += 1
        self._submit(f"w{self.ids}", type_index, drawn)

    @precondition(lambda self: "reuse_id" not in SKIP)
    @rule(pick=st.integers(0, 1000), type_index=st.integers(0, 2), behaviour=st.data())
    def reuse_id(self, pick: int, type_index: int, behaviour: st.DataObject) -> None:
        """Submit an id used before: refused while in the window or open, else a new run."""
        drawn = behaviour.draw(self._behaviours())
        if not self.current.is_running or self.ids == 0:
            return
        TOTALS.rules["reuse_id"] += 1
        TOTALS.reused_ids += 1
        self._submit(f"w{pick % self.ids + 1}", type_index, drawn)

    # Rules whose use depends on the engine's timing draw the same data either way and do
    # nothing when there is nothing to do: a precondition on such state would make
    # hypothesis's replay of an example (to shrink it) draw differently.
    @rule(pick=st.integers(0, 1000))
    def release_step(self, pick: int) -> None:
        blocked = [c for c in self.calls if c.state == "blocked"]
        if not blocked:
            return
        TOTALS.rules["release_step"] += 1
        call = blocked[pick % len(blocked)]
        self.blocks[(call.sub, call.step, call.phase)].set()
        self.settle()

    # --- rules: storage faults --------------------------------------------------------------

    @rule(
        mode=st.sampled_from(_allowed(FAULT_MODES)),
        kind=st.sampled_from(_allowed(FAULT_KINDS)),
        times=st.integers(1, 4),
    )
    def storage_fault(self, mode: str, kind: str, times: int) -> None:
        """Program a fault for the next appends of ``kind`` (of any node)."""
        if f"{mode}:{kind}" in SKIP:
            return
        TOTALS.rules["storage_fault"] += 1
        TOTALS.faults[f"{mode}:{kind}"] += 1
        faulty = self.faulty
        when = None
        if kind == "sleep_outcome":
            kind, when = "step_outcome", _carries_timer
        if mode == "checkpoint":
            # The next saves of snapshot chunks, or of the checkpoint naming them, fail: a
            # crash between a snapshot's chunks and its checkpoint, as the saver sees it.
            operation: Operation = (
                "save_snapshot_chunk" if FAULT_KINDS.index(kind) % 2 else "save_checkpoint"
            )
            self.faults.append(faulty.fail(times=times, operations=(operation,)))
        elif mode == "fail":
            self.faults.append(faulty.fail(times=times, kinds=kind, when=when))
        elif mode == "lost_ack":
            self.faults.append(
                faulty.fail(times=min(times, 2), kinds=kind, when=when, lost_ack=True)
            )
        elif mode == "reject":
            self.faults.append(faulty.reject(times=1, kinds=kind, when=when))
        elif mode == "too_large":
            self.faults.append(
                faulty.reject(
                    times=1,
                    kinds=kind,
                    when=when,
                    error=lambda call: PayloadTooLarge(len(call.value), 100),
                )
            )
        elif mode == "hold":
            self.holds.append(faulty.slow(times=1, kinds=kind, when=when))
        else:
            self.repo.late.append(LateAck("sleep_outcome" if when else kind))
        self.settle()

    def _pending_holds(self) -> list[Fault | LateAck]:
        pending: list[Fault | LateAck] = [
            h for h in self.holds if h.hits and h not in self.released
        ]
        pending += [a for a in self.repo.late if a.call is not None and not a.released.is_set()]
        return pending

    @rule(pick=st.integers(0, 1000))
    def release_append(self, pick: int) -> None:
        """Let one held append land, or one held acknowledgement come back."""
        pending = self._pending_holds()
        if not pending:
            return
        TOTALS.rules["release_append"] += 1
        held = pending[pick % len(pending)]
        if isinstance(held, Fault):
            self.released.append(held)
            held.release()
        else:
            held.released.set()
        self.settle()

    # --- rules: crashes, restarts, takeovers -------------------------------------------------

    @rule(
        how=st.sampled_from(["crash_and_restart", "close_and_restart", "takeover"]),
        downtime=st.sampled_from(["none", "none", "minute", "weeks"]),
    )
    def disrupt(self, how: str, downtime: str) -> None:
        """One rule for the three disruptions, so that they do not crowd out the work.
        After a crash or a close, no instance runs for ``downtime`` of the clock: timers
        expire meanwhile and must fire once the next instance has recovered."""
        if self._asleep():
            TOTALS.disruptions_while_sleeping[how] += 1
        self.downtime = DOWNTIMES[downtime]
        getattr(self, how)()
        self.run(self._check_handles())

    def _pass_downtime(self) -> None:
        now = self.clock.now()
        later = now + self.downtime
        TOTALS.timers_expired_while_down += sum(
            1 for s in self._sleepers().values() if now < s.fire_at <= later
        )
        self._advance_to(later)

    def crash_and_restart(self) -> None:
        """The process dies (nothing closed, no final checkpoint) and a new one starts."""
        TOTALS.rules["crash_and_restart"] += 1
        TOTALS.crashes += 1
        old = self.current
        self.stopped.setdefault(old.node_id, len(self.journal))
        old.abort()
        self._pass_downtime()
        self.run(self._start_node())
        self.settle()

    def close_and_restart(self) -> None:
        """A graceful restart: close (in-flight work is cancelled after a short timeout)."""
        TOTALS.rules["close_and_restart"] += 1
        TOTALS.closes += 1
        old = self.current
        self.run(old.close(0.01))
        self.stopped.setdefault(old.node_id, len(self.journal))
        self._pass_downtime()
        self.run(self._start_node())
        self.settle()

    def takeover(self) -> None:
        """A second instance starts while the first still runs: the first is fenced."""
        TOTALS.rules["takeover"] += 1
        TOTALS.takeovers += 1
        self.run(self._start_node())
        self.settle()

    # --- rules: the clock --------------------------------------------------------------------

    @rule(jump=st.sampled_from(list(CLOCK_JUMPS)))
    def time_passes(self, jump: str) -> None:
        """Time passes for every instance: a small or a large jump, or exactly to (or just
        before) the next fire time of a sleeping workflow, or the wall clock steps back.
        Due workflows must wake, the others must not."""
        TOTALS.rules["time_passes"] += 1
        TOTALS.clock_jumps[jump] += 1
        now = self.clock.now()
        later = sorted(s.fire_at for s in self._sleepers().values() if s.fire_at > now)
        if jump == "wall_back":
            self.clock.set_wall(now + CLOCK_JUMPS[jump])
            self.settle()
            self.run(self._check_handles())
            return
        if jump in ("to_next", "before_next") and later:
            target = later[0] if jump == "to_next" else max(now, later[0] - 0.001)
        else:
            target = now + (CLOCK_JUMPS[jump] or 1.0)
        self._advance_to(target)
        TOTALS.timers_due_by_jump += sum(1 for f in later if f <= self.clock.now())
        self.settle()
        self.run(self._check_handles())

    def _advance_to(self, when: float) -> None:
        """Move the clock to exactly ``when`` (not back)."""
        now = self.clock.now()
        if when <= now:
            return
        self.clock.advance(when - now)
        if self.clock.now() < when:  # float rounding: land on the fire time itself
            self.clock.set_wall(when)

    # --- durable timers, as the log shows them ---------------------------------------------

    def _sleepers(self) -> dict[int, Sleeper]:
        """The workflows sleeping by the live log (cached until a record lands)."""
        landed = len(self.repo.position)
        if self.sleepers_cache[0] != landed:
            by_id, _ = incarnations(self.repo)
            self.sleepers_cache = (landed, self._sleepers_of(by_id))
        return self.sleepers_cache[1]

    def _sleepers_of(self, by_id: dict[str, list[Incarnation]]) -> dict[int, Sleeper]:
        """By submission, the open workflows whose newest live event is a timer outcome
        (their fire time may have passed: then the next step is due)."""
        found: dict[int, Sleeper] = {}
        for runs in by_id.values():
            run = runs[-1]
            last = run.events[-1]
            if run.terminal is None and isinstance(last, StepOutcome) and last.fire_at is not None:
                sub = msgspec.json.decode(bytes(run.created.input))["sub"]
                record = run.records[-1]
                landed = self.repo.position[(record.partition, record.offset)]
                found[sub] = Sleeper(sub, run.id, last.step, last.fire_at, landed)
        return found

    def _asleep(self) -> bool:
        now = self.clock.now()
        return any(s.fire_at > now for s in self._sleepers().values())

    def _full(self, kbit: Kapbit) -> bool:
        """Whether ``kbit`` runs ``max_workflows``: a due timer then waits for a slot."""
        return kbit.stats.in_flight >= self.max_workflows

    def _unfired(self, node: str) -> list[Sleeper]:
        """Sleeping workflows whose timer is due, and whose next step ``node`` (the owner)
        has not called since the timer outcome landed."""
        now = self.clock.now()
        return [
            s
            for s in self._sleepers().values()
            if s.fire_at <= now
            and not any(
                c.node == node and c.started_at > s.landed
                for c in self.calls_of.get((s.sub, s.step + 1, "execute"), [])
            )
        ]

    async def _check_handles(self) -> None:
        """Handles of the open workflows say ``sleeping`` exactly when the newest live
        event is a timer outcome (the handle reads the log, not the clock)."""
        current = self.current
        if not current.is_running:
            return
        by_id, _ = incarnations(self.repo)
        sleeping = {s.workflow_id for s in self._sleepers_of(by_id).values()}
        open_ids = sorted(i for i, runs in by_id.items() if runs[-1].terminal is None)
        for workflow_id in open_ids[:6]:
            try:
                status = await current.get_workflow(workflow_id).status()
            except WorkflowNotFound:
                assert workflow_id not in sleeping, (
                    f"{current.node_id}: no handle of sleeping workflow {workflow_id!r}"
                )
                continue
            TOTALS.handle_checks += 1
            assert (status == WorkflowStatus.SLEEPING) == (workflow_id in sleeping), (
                f"{current.node_id}: handle of {workflow_id!r} says {status.value}; the log "
                f"has {[type(e).__name__ for e in by_id[workflow_id][-1].events]}, newest "
                f"{by_id[workflow_id][-1].events[-1]}"
            )

    # --- settling -----------------------------------------------------------------------------

    def _blocked(self, node: str) -> set[str]:
        """Workflow ids a node runs that wait for the test: a held step or append."""
        blocked = {c.workflow_id for c in self.calls if c.node == node and c.state == "blocked"}
        for held in self._pending_holds():
            call = held.calls[0] if isinstance(held, Fault) else held.call
            if call is not None and _wrote(node, call.node):
                blocked.add(call.key)
        return blocked

    def _quiet(self) -> bool:
        now = self.clock.now()
        asleep = {s.sub for s in self._sleepers().values() if s.fire_at > now}
        for kbit in self.nodes:
            if not kbit.is_running:
                continue
            blocked = self._blocked(kbit.node_id)
            if blocked and not kbit.stats.gate_open:
                # The storage breaker is open and one held append may be its probe: every
                # other append of the node waits for it, hence for the test.
                continue
            if kbit is self.current:
                unfired = self._unfired(kbit.node_id)
                if not self._full(kbit):
                    if any(s.workflow_id not in blocked for s in unfired):
                        return False  # a due timer the owner has not acted on yet
                else:  # the due ones wait for a running slot: for the test
                    asleep |= {s.sub for s in unfired}
            if kbit.stats.in_flight > len(blocked):
                return False
            # A caller of a sleeping workflow waits for the clock, hence for the test. A
            # node already replaced may sleep on a timer outcome it wrote as a zombie.
            waiting = sum(
                1
                for sub in self.submissions
                if sub.node == kbit.node_id
                and not sub.task.done()
                and sub.plan.workflow_id not in blocked
                and sub.plan.sub not in asleep
            )
            if waiting > (0 if kbit is self.current else kbit.stats.sleeping):
                return False
        return True

    def _stuck(self) -> str:
        lines = []
        for kbit in self.nodes:
            if kbit.is_running:
                lines.append(
                    f"{kbit.node_id}: {kbit.stats.in_flight} in flight, "
                    f"{kbit.stats.sleeping} sleeping, "
                    f"blocked by the test: {sorted(self._blocked(kbit.node_id))}"
                )
        unfired = self._unfired(self.current.node_id)
        if unfired:
            lines.append(f"due timers {self.current.node_id} did not fire: {unfired}")
        return "; ".join(lines)

    def _progress(self) -> tuple[int, ...]:
        """Changes whenever the engine does anything the test can see."""
        return (
            len(self.journal),
            sum(self.faulty.calls.values()),
            sum(kbit.stats.in_flight for kbit in self.nodes),
        )

    async def _until(self, predicate: Callable[[], bool]) -> bool:
        """Run the loop until ``predicate`` holds (True) or nothing has moved for
        ``SETTLE_TIMEOUT`` seconds and ``SETTLE_ROUNDS`` rounds (False)."""
        watchdog = Watchdog(self._progress())
        while not predicate():
            await asyncio.sleep(0.001)
            if self.drift:
                self.clock.advance(0.001)
            verdict = watchdog.observe(self._progress())
            if verdict == "stalled":
                return False
            if verdict == "busy":
                raise AssertionError(
                    f"the engine kept busy for {BUSY_TIMEOUT} s and {BUSY_ROUNDS} rounds "
                    f"without coming to rest: "
                    f"{self._stuck()}; last appends: {self.repo.records()[-5:]}"
                )
        return True

    def settle(self) -> None:
        """Run the loop until every running node waits only for the test."""
        if not self.run(self._until(self._quiet)):
            raise AssertionError(
                f"the engine stopped moving for {SETTLE_TIMEOUT} s and {SETTLE_ROUNDS} rounds "
                f"without coming to rest: "
                f"{self._stuck()}"
            )

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def log_agrees_with_the_model(self) -> None:
        if not self.nodes:
            return
        self.check(final=False)

    def check(self, final: bool) -> dict[str, list[Incarnation]]:
        by_id, problems = incarnations(self.repo)
        assert not problems, problems
        by_sub: dict[int, Incarnation] = {}
        for runs in by_id.values():
            for run in runs:
                sub = msgspec.json.decode(bytes(run.created.input))["sub"]
                assert sub not in by_sub, f"submission {sub} created twice: {run.id}"
                by_sub[sub] = run
                self._check_run(run, self.plans[sub], final)
        self._check_window(by_id)
        self._check_calls(by_sub)
        self._check_timers(by_id, final)
        for submission in self.submissions:
            if submission.task.done() and not submission.checked:
                submission.checked = True
                self._check_answer(submission, by_sub.get(submission.plan.sub))
        return by_id

    def _outcome(self, record: Record) -> StepOutcome:
        key = (record.partition, record.offset)
        outcome = self.outcomes.get(key)
        if outcome is None:
            outcome = self.outcomes[key] = msgspec.json.decode(record.value, type=StepOutcome)
        return outcome

    def _check_timers(self, by_id: dict[str, list[Incarnation]], final: bool) -> None:
        """Durable timers against the model:

        * every timer outcome in the log (zombies' too) carries the fire time its step's
          timer gives (``at`` + delay, or the SleepUntil time), the same in every copy of
          an append; no other outcome carries one;
        * no step after a timer runs before the fire time its node acted on (by the clock);
        * the owner's ``stats.sleeping`` counts the workflows sleeping by the live log.
        """
        live = {(r.partition, r.offset) for r in live_records(self.repo)}
        timers: dict[tuple[int, int], list[tuple[int, float, bool, str]]] = {}
        copies: dict[tuple[Any, ...], set[tuple[float, float]]] = {}
        records = 0
        for record in self.repo.records():
            if record.kind != "step_outcome":
                continue
            outcome = self._outcome(record)
            value = msgspec.json.decode(bytes(outcome.value))
            sub = int(value.rsplit("/", 1)[1]) if isinstance(value, str) and "/" in value else -1
            timer = sub >= 0 and outcome.phase == "execute"
            timer = timer and self.plans[sub].sleeps_after(outcome.step)
            if not timer:
                assert outcome.fire_at is None, f"{record}: a fire time on a plain outcome"
                continue
            plan = self.plans[sub]
            where = f"timer outcome {outcome} of submission {sub} ({plan.behaviour}, {record})"
            assert outcome.fire_at == plan.fire_at(outcome.step, outcome.at), (
                f"{where}: fire_at is not what the step's timer gives "
                f"({plan.fire_at(outcome.step, outcome.at)})"
            )
            records += 1
            key = (sub, outcome.step)
            # A record without a position landed from an append that raised Fenced: its
            # writer never acted on it.
            position = self.repo.position.get((record.partition, record.offset))
            if position is not None:
                at = (record.partition, record.offset)
                timers.setdefault(key, []).append(
                    (position, outcome.fire_at, at in live, record.node)
                )
            copies.setdefault((record.node, *key, bytes(outcome.value)), set()).add(
                (outcome.at, outcome.fire_at)
            )
        for key, stamps in copies.items():
            assert len(stamps) == 1, f"copies of one timer outcome {key} differ: {stamps}"
        wakes = 0
        for call in self.calls:
            if call.phase != "execute" or not call.step:
                continue
            if not self.plans[call.sub].sleeps_after(call.step - 1):
                continue
            wakes += 1
            before = [
                t
                for t in timers.get((call.sub, call.step - 1), [])
                if t[0] < call.started_at and (t[2] or _wrote(call.node, t[3]))
            ]
            where = (
                f"step {call.step} of {call.workflow_id!r} (submission {call.sub}) on {call.node}"
            )
            assert before, f"{where} ran with no timer outcome of its previous step in the log"
            acted_on = [t for t in before if t[2]]
            if not acted_on or self._zombie(call.journal_entry()):
                acted_on = before
            fire_at = min(t[1] for t in acted_on)
            assert call.clock_at >= fire_at, (
                f"{where} ran at {call.clock_at}, before its timer fired at {fire_at}"
            )
        self.wakes = wakes
        self.timer_records = records
        self.timer_copies = records - len(copies)
        self._check_sleeping(self._sleepers_of(by_id), final)

    def _check_sleeping(self, sleepers: dict[int, Sleeper], final: bool) -> None:
        """The owner sleeps exactly the workflows the live log says sleep, unless the test
        holds them (an acknowledgement it has not had yet)."""
        current = self.current
        if not current.is_running:
            return
        now = self.clock.now()
        blocked = self._blocked(current.node_id)
        stats = current.stats
        # Due timers wait in the queue while every running slot is taken.
        unfired = set(self._unfired(current.node_id)) if self._full(current) else set()
        asleep = sorted(
            s.workflow_id
            for s in sleepers.values()
            if (s.fire_at > now or s in unfired) and s.workflow_id not in blocked
        )
        where = (
            f"{current.node_id}: stats.sleeping is {stats.sleeping}, the log has {asleep} "
            f"asleep at {now} ({sorted(sleepers.values(), key=lambda s: s.sub)})"
        )
        if blocked and not stats.gate_open:
            # Waiting behind a probe the test holds: a timer outcome may have landed with
            # its ack still to come, and a due timer may not have been woken yet.
            assert stats.sleeping <= len(asleep) + len(self._unfired(current.node_id)), where
        else:
            assert stats.sleeping == len(asleep), where
        assert not final or not asleep, f"still asleep at the end: {asleep}"
        if self.slept:
            TOTALS.checkpoints_while_sleeping += self.repo.saves - self.saves_seen
        self.saves_seen = self.repo.saves
        self.slept = bool(asleep)

    def _check_window(self, by_id: dict[str, list[Incarnation]]) -> None:
        """An id is accepted again only after ``window`` newer workflows of its partition."""
        created: dict[int, list[int]] = {}
        for runs in by_id.values():
            for run in runs:
                created.setdefault(run.partition, []).append(run.records[0].offset)
        for runs in by_id.values():
            for before, after in itertools.pairwise(runs):
                first, second = before.records[0].offset, after.records[0].offset
                newer = sum(1 for o in created[before.partition] if first < o < second)
                assert newer >= self.window, (
                    f"{after.id!r} accepted again at {after.partition}/{second} after only "
                    f"{newer} newer workflows; the idempotency window is {self.window}"
                )

    def _check_run(self, run: Incarnation, plan: Plan, final: bool) -> None:
        where = f"workflow {run.id!r} (submission {plan.sub}, {plan.behaviour})"
        assert run.partition == partition_for(run.id, PARTITIONS), where
        outcomes = [e for e in run.events if isinstance(e, StepOutcome)]
        actual = [(o.step, o.phase, o.success) for o in outcomes]
        expected, bad = plan.expected()
        assert actual == expected[: len(actual)], f"{where}: outcomes {actual}, model {expected}"
        for outcome in outcomes:
            returned = {
                _encoded_value(c.value)
                for c in self.calls
                if (c.sub, c.step, c.phase) == (plan.sub, outcome.step, outcome.phase)
                and c.state == "returned"
            }
            assert bytes(outcome.value) in returned, (
                f"{where}: outcome {outcome} is not what a call of the step returned"
            )
        terminal = run.terminal
        if terminal is None:
            assert not final, f"{where}: never terminated: {[type(e).__name__ for e in run.events]}"
            return
        assert run.events[-1] is terminal, f"{where}: events after its terminal event"
        if isinstance(terminal, WorkflowResult):
            assert bad is None, f"{where}: a wrong return type did not end the workflow"
            assert actual == expected, f"{where}: ended with {actual}, model {expected}"
            assert terminal.compensated == any(not s for _, p, s in expected if p == "execute")
            assert msgspec.json.decode(bytes(terminal.result)) == _result_of(outcomes), where
        ended_early = bad is not None and actual == expected
        # How the engine ends a rollback that stopped at a failed compensation is its
        # choice (a result or another terminal event); the outcomes are the model's.
        ended_early = ended_early or (plan.rollback_fails() and actual == expected)
        if isinstance(terminal, DeadLetter):
            assert plan.may_dead_letter() or ended_early, (
                f"{where}: dead-lettered but no step raised"
            )
        elif isinstance(terminal, Rejected):
            refused = self._rejected(run.id) or plan.does(len(actual), "execute") == "big"
            assert refused or ended_early, f"{where}: rejected with nothing refused: {terminal}"
        elif not isinstance(terminal, WorkflowResult):
            assert ended_early, f"{where}: ended with {terminal}"
        if bad is not None and actual == expected and not self._rejected(run.id):
            assert bad is not None
            step, phase = bad
            text = msgspec.json.encode(terminal).decode()
            type_name = plan.wrong_type(step, phase)
            came = any(
                (c.sub, c.step, c.phase, c.state) == (plan.sub, step, phase, "returned")
                for c in self.calls
            )
            if not came:  # it raised each time (rsleep raises first) until the retries ran out
                assert isinstance(terminal, DeadLetter), (
                    f"{where}: step {step} never returned, yet the workflow ended with {text}"
                )
                return
            assert type_name in text and (f"step {step}" in text or f"s{step}" in text), (
                f"{where}: the terminal event does not name the step and the type: {text}"
            )

    def _rejected(self, workflow_id: str) -> bool:
        return any(
            f.action == "reject" and any(c.key == workflow_id for c in f.calls) for f in self.faults
        )

    def _check_calls(self, by_sub: dict[int, Incarnation]) -> None:
        """A step runs again only if its previous call raised, or that call's node was
        stopped (crashed, closed, taken over) before the new call started."""
        last: dict[tuple[int, int, str], StepCall] = {}
        self.zombie_calls = 0
        for call in self.calls:
            if self._zombie(call.journal_entry()):
                # A node taken over runs on until its next write fails with Fenced: its
                # calls are side effects fencing cannot prevent; none of their outcomes
                # may be acted on (the log checks see to that).
                self.zombie_calls += 1
                continue
            key = (call.sub, call.step, call.phase)
            before = last.get(key)
            last[key] = call
            if before is None or before.state == "raised":
                continue
            stopped = self.stopped.get(before.node)
            assert stopped is not None and stopped <= call.started_at, (
                f"step {call.step} ({call.phase}) of {call.workflow_id!r} (submission "
                f"{call.sub}, {self.plans[call.sub].behaviour}) ran again on {call.node} "
                f"although its call on {before.node} ended {before.state!r} "
                f"({before.value!r}) and that node was not stopped"
            )
            plan = self.plans[call.sub]
            _, bad = plan.expected()
            assert bad != (call.step, call.phase) or before.state != "returned", (
                f"{call.workflow_id!r}: an action that returned a wrong type ran again"
            )

        # By position: two workflows of one id may write byte-identical records.
        subs = {(r.partition, r.offset): sub for sub, run in by_sub.items() for r in run.records}

        def outcome_key(record: Record, outcome: StepOutcome) -> tuple[Any, ...]:
            sub = subs.get((record.partition, record.offset), -1)
            return (sub, outcome.step, outcome.phase)

        journal = [entry for entry in self.journal if not self._zombie(entry)]
        assert_no_step_reran_after_its_outcome(self.repo, journal, outcome_key)
        assert_compensations_followed_successes(self.repo, journal, outcome_key)

    def _zombie(self, entry: tuple[Any, ...]) -> bool:
        """Whether a journal entry is a step call by a node that was already replaced."""
        if entry[0] != "call":
            return False
        stopped = self.stopped.get(entry[1])
        return stopped is not None and stopped <= entry[2]

    def _check_answer(self, submission: Submission, run: Incarnation | None) -> None:
        task = submission.task
        plan = submission.plan
        where = f"caller of {plan.workflow_id!r} (submission {plan.sub}, {plan.behaviour})"
        if task.cancelled():
            raise AssertionError(f"{where}: the call was cancelled")
        error = task.exception()
        if error is None:
            assert run is not None and isinstance(run.terminal, WorkflowResult), (
                f"{where}: got {task.result()!r}, the log has {run and run.terminal}"
            )
            assert msgspec.json.decode(bytes(run.terminal.result)) == task.result(), where
        elif isinstance(error, DuplicateWorkflow | GateClosed | RecordRejected | TooManyWorkflows):
            TOTALS.refusals[type(error).__name__] += 1
            assert run is None, f"{where}: refused with {error!r} but created in the log"
            if isinstance(error, DuplicateWorkflow):
                assert any(
                    s.plan.workflow_id == plan.workflow_id and s.plan.sub < plan.sub
                    for s in self.submissions
                ), f"{where}: {error!r} for an id never used"
        elif isinstance(error, WillRetryLater):
            assert run is not None, f"{where}: {error!r} but nothing in the log"
        elif isinstance(error, WorkflowRejected):
            assert run is not None and isinstance(run.terminal, Rejected), (
                f"{where}: {error!r}, the log has {run and run.terminal}"
            )
        elif isinstance(error, DeadLettered):
            assert run is not None and isinstance(run.terminal, DeadLetter), where
        elif isinstance(error, InstanceClosed | Fenced):
            pass  # the node stopped; the next owner finishes what is in the log
        elif isinstance(error, KapbitError) and (
            plan.expected()[1] is not None or plan.rollback_fails()
        ):
            assert run is not None and run.terminal is not None, (
                f"{where}: {error!r} but the workflow did not end"
            )
            assert not isinstance(run.terminal, WorkflowResult), where
        else:
            raise AssertionError(f"{where}: unexpected error {error!r}") from error

    # --- quiescence ---------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.nodes:
                self.run(self._quiesce())
        finally:
            self.run(self._stop_all())
            self.loop.close()
            asyncio.set_event_loop(None)
            self.tmp.cleanup()
            TOTALS.zombie_calls += self.zombie_calls
            TOTALS.zombie_records += (
                len(self.repo.records()) - len(live_records(self.repo)) if self.nodes else 0
            )
            TOTALS.duplicates += sum(f.hits for f in self.faults if f.lost_ack) if self.nodes else 0
            TOTALS.wakes += self.wakes
            TOTALS.timer_outcomes += self.timer_records
            TOTALS.timer_outcome_copies += self.timer_copies
            modes = {"fail": "fail", "reject": "reject", "delay": "hold"}
            for fault in [*self.faults, *self.holds]:
                mode = "lost_ack" if fault.lost_ack else modes[fault.action]
                hits = sum(1 for call in fault.calls if _carries_timer(call))
                TOTALS.timer_outcome_faults[mode] += hits
            TOTALS.timer_outcome_faults["late_ack"] += sum(
                1 for late in self.repo.late if late.call is not None and _carries_timer(late.call)
            )

    async def _quiesce(self) -> None:
        """Release everything, finish everything, then check the end state."""
        for fault in [*self.faults, *self.holds]:
            fault.release()
        self.released.extend(self.holds)
        for late in self.repo.late:
            late.released.set()
        self.draining = True  # steps block no more
        for event in self.blocks.values():
            event.set()
        if not self.current.is_running:
            await self._start_node()
        current = self.current
        started_open = self._open_at_start(current.node_id)

        def done() -> bool:
            by_id, _ = incarnations(self.repo)
            return self._quiet() and all(runs[-1].terminal is not None for runs in by_id.values())

        def later() -> list[float]:
            now = self.clock.now()
            return [s.fire_at for s in self._sleepers().values() if s.fire_at > now]

        def sleeping_only() -> bool:
            """Quiet but for workflows sleeping by the live log, their fire time ahead."""
            return bool(later()) and self._quiet()

        # The steps released above go on once the loop runs: until then they look blocked.
        await self._until(lambda: not any(c.state == "blocked" for c in self.calls))
        # Whenever only sleeping workflows are left, move the clock to their fire times
        # (each workflow sleeps at most three times).
        for _ in range(3 * len(self.submissions) + 3):
            if not await self._until(lambda: done() or sleeping_only()) or done():
                break
            self._advance_to(max(later()))
        await self._until(done)  # if it does not come, check() names what never terminated
        await asyncio.sleep(0)
        by_id = self.check(final=True)
        for workflow_id in started_open | self._created_by(current.node_id):
            run = by_id[workflow_id][-1]
            try:
                answer: Any = await current.wait_result(workflow_id, timeout=1)
            except (DeadLettered, WorkflowRejected, KapbitError) as error:
                answer = error
            where = f"wait_result({workflow_id!r}) on {current.node_id}"
            assert not isinstance(answer, WorkflowNotFound | TimeoutError), (
                f"{where}: {answer!r}; the log has {run.terminal}"
            )
            terminal = run.terminal
            if isinstance(terminal, WorkflowResult):
                assert answer == msgspec.json.decode(bytes(terminal.result)), where
            elif isinstance(terminal, DeadLetter):
                assert isinstance(answer, DeadLettered), f"{where}: {answer!r}"
            elif isinstance(terminal, Rejected):
                assert isinstance(answer, KapbitError), f"{where}: {answer!r}"
        await self._check_projection(by_id)

    def _open_at_start(self, node: str) -> set[str]:
        """Ids whose workflow was open in the live log when ``node`` claimed the log."""
        open_ids: set[str] = set()
        claims = {
            r.partition: r.offset
            for r in self.repo.records()
            if _wrote(node, r.node) and r.kind == "active_writer"
        }
        for partition, claim in claims.items():
            for record in live_records(self.repo, partition):
                if record.offset >= claim:
                    break
                if record.kind == "workflow_created":
                    open_ids.add(record.key)
                elif record.kind in TERMINAL_KINDS:
                    open_ids.discard(record.key)
        return open_ids

    def _created_by(self, node: str) -> set[str]:
        return {
            r.key
            for r in live_records(self.repo)
            if r.kind == "workflow_created" and _wrote(node, r.node)
        }

    async def _check_projection(self, by_id: dict[str, list[Incarnation]]) -> None:
        path = Path(self.tmp.name) / f"status-{time.monotonic_ns()}.sqlite3"
        async with StatusModel(path) as model:
            projector = Projector(
                self.repo,
                model,
                definitions=self._definitions("projector"),
                idempotency_window=self.window,
            )
            async with projector:
                await projector.catch_up()
            for workflow_id, runs in by_id.items():
                run = runs[-1]
                row = await model.get(workflow_id)
                assert row is not None, f"projection: no row for {workflow_id!r}"
                terminal = run.terminal
                where = f"projection of {workflow_id!r}: {row}, the log has {terminal}"
                if isinstance(terminal, WorkflowResult):
                    status = (
                        WorkflowStatus.COMPENSATED
                        if terminal.compensated
                        else WorkflowStatus.SUCCEEDED
                    )
                    assert row.status == status, where
                    assert row.result_value() == msgspec.json.decode(bytes(terminal.result))
                elif isinstance(terminal, DeadLetter):
                    assert row.status == WorkflowStatus.DEAD_LETTERED, where
                elif isinstance(terminal, Rejected):
                    assert row.status == WorkflowStatus.REJECTED, where
                outcomes = [e for e in run.events if isinstance(e, StepOutcome)]
                done = sum(1 for o in outcomes if o.phase == "execute" and o.success)
                assert row.steps_done == done, where

    async def _stop_all(self) -> None:
        for kbit in self.nodes:
            TOTALS.snapshot_wakes += kbit.stats.snapshot_wakes
            TOTALS.woke_again += kbit.stats.snapshot_wakes > 1
            if kbit.is_running:
                kbit.abort()
        tasks = [s.task for s in self.submissions]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pending = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _wrote(node: str, writer: str) -> bool:
    """Whether a record's ``writer`` is the instance configured as ``node``: the writer is
    the node id, or the node id with a start id appended (``node/start``)."""
    return writer == node or writer.startswith(f"{node}/")


def _encoded_value(value: Any) -> bytes:
    if value is None:
        return b"null"
    if isinstance(value, Success | Failure | Sleep | SleepUntil):
        return msgspec.json.encode(value.value)
    return msgspec.json.encode(value)


def _result_of(outcomes: Sequence[StepOutcome]) -> dict[str, Any]:
    return {
        "values": [
            msgspec.json.decode(bytes(o.value))
            for o in sorted(outcomes, key=lambda o: o.step)
            if o.phase == "execute" and o.success
        ],
        "compensated": [o.step for o in outcomes if o.phase == "compensate"],
    }


PROFILES = {
    "ci": settings(
        max_examples=int(os.environ.get("KAPBIT_MODEL_EXAMPLES", "600")),
        stateful_step_count=20,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    ),
    "long": settings(
        max_examples=2000,
        stateful_step_count=40,
        derandomize=False,
        database=None,
        report_multiple_bugs=False,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    ),
}


class _Ticks:
    """A clock the watchdog tests move by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_takes_a_process_that_did_not_run_for_slow_not_stalled() -> None:
    """Seconds without polling rounds (the machine ran something else) are no stall: the
    engine had no chance to move. Before the rounds counted, the first such gap failed
    the model checker on a loaded machine."""
    ticks = _Ticks()
    watchdog = Watchdog((0,), ticks)
    for _ in range(3):
        ticks.now += 5 * SETTLE_TIMEOUT  # descheduled between two rounds
        assert watchdog.observe((0,)) is None
    assert watchdog.observe((1,)) is None  # it moves as soon as it runs


def test_the_watchdog_catches_an_engine_that_stopped_moving() -> None:
    ticks = _Ticks()
    watchdog = Watchdog((0,), ticks)
    verdicts = []
    for _ in range(2 * SETTLE_ROUNDS + int(SETTLE_TIMEOUT * 1000)):
        ticks.now += 0.001  # the loop polls on, nothing moves
        verdicts.append(watchdog.observe((0,)))
    first = verdicts.index("stalled")
    assert verdicts[:first] == [None] * first
    assert SETTLE_TIMEOUT <= (first + 1) * 0.001 <= SETTLE_TIMEOUT + 0.002
    assert first + 1 >= SETTLE_ROUNDS


def test_the_watchdog_catches_an_engine_that_never_comes_to_rest() -> None:
    ticks = _Ticks()
    watchdog = Watchdog((0,), ticks)
    for n in range(1, BUSY_ROUNDS):
        ticks.now += 1.0  # slow: seconds pass, but not enough rounds yet
        assert watchdog.observe((n,)) is None
    ticks.now += 1.0
    assert watchdog.observe((BUSY_ROUNDS,)) == "busy"


@pytest.mark.timeout(3600 if PROFILE == "long" else 300)
def test_engine_agrees_with_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    try:
        run_state_machine_as_test(EngineModel, settings=PROFILES[PROFILE])
    except BaseException as error:
        TOTALS.defects.append(f"{type(error).__name__}: {str(error)[:2000]}")
        raise
    else:
        if PROFILE == "long":  # the random runs reached every state of snapshot following
            reached = (TOTALS.pinned_starts, TOTALS.snapshot_wakes, TOTALS.woke_again)
            assert all(reached), reached
    finally:
        summary = TOTALS.as_dict()
        summary["seconds"] = round(time.monotonic() - started, 1)
        text = json.dumps(summary, indent=1, sort_keys=True)
        with capsys.disabled():  # shown also when the test passes
            print(f"\nmodel checker summary:\n{text}", file=sys.stderr)
        if target := os.environ.get("KAPBIT_MODEL_SUMMARY"):
            Path(target).write_text(text)


def _scripted(steps: int, snapshots: str, snapshot_after: int) -> EngineModel:
    """The model set up for a scripted run (rules called by the test, nothing generated):
    one workflow type of ``steps`` steps without compensations, a window of one id, and a
    checkpoint saved after every termination."""
    model = EngineModel()
    model.set_up(
        shapes=[Shape(steps, frozenset())],
        window=1,
        checkpoint_every=1,
        checkpoint_interval=3600.0,
        snapshots=snapshots,
        snapshot_after=snapshot_after,
        tight=False,
    )
    return model


def test_a_wrong_return_the_retry_worker_gave_up_before_is_no_model_violation() -> None:
    """Found by the checker itself: steps 0 to 2 raise once each, which uses up
    ``MAX_ATTEMPTS``; the last step raises first and would return a timer (a wrong return)
    on its second call, which never comes. The workflow is dead-lettered naming the raise,
    never the timer's type: the model must not demand it."""
    model = _scripted(steps=4, snapshots="off", snapshot_after=0)
    try:
        behaviour = [("raise1", "ok", 0), ("raise1", "ok", 0), ("rsleep", "ok", 0)]
        model._submit("w1", 0, [*behaviour, ("rsleep", "ok", 0)])
        model.log_agrees_with_the_model()
    finally:
        model.teardown()
    (run,) = incarnations(model.repo)[0]["w1"]
    assert isinstance(run.terminal, DeadLetter) and "not yet" in run.terminal.error


def test_snapshot_following_rests_wakes_and_wakes_again_under_the_model() -> None:
    """The states of adaptive snapshot following, reached by construction (the random
    runs reach them by chance: their coverage is asserted in the long profile). A blocked
    workflow pins its partition and a save wakes the reader; a restart starts pinned; once
    the workflow ends the reader rests, and a second blocked one wakes it again."""
    model = _scripted(steps=1, snapshots="on", snapshot_after=3)
    ok = [("ok", "ok", 0)] * 4
    blocked = [("block", "ok", 0), *ok[1:]]
    first, *short = ids_in_partition(0, 9, PARTITIONS, prefix="p")
    try:
        model._submit(first, 0, blocked)
        for workflow_id in short[:3]:
            model._submit(workflow_id, 0, ok)
        assert model.current.stats.snapshot_wakes == 1
        model.crash_and_restart()  # the first workflow's step runs again, unblocked
        restarted = model.current.stats
        assert (restarted.snapshots_following, restarted.snapshot_wakes) == (1, 0)  # pinned
        for workflow_id in short[3:5]:
            model._submit(workflow_id, 0, ok)
        assert model.current.stats.snapshots_following == 0  # the pin lifted: it rests
        second = ids_in_partition(0, 1, PARTITIONS, prefix="q")[0]
        model._submit(second, 0, blocked)
        for workflow_id in short[5:]:
            model._submit(workflow_id, 0, ok)
        woke = model.current.stats
        assert (woke.snapshots_following, woke.snapshot_wakes) == (1, 1)  # woken again
        model.log_agrees_with_the_model()
    finally:
        model.teardown()
