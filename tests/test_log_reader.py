"""Recovery and projection read the log with one rule (kapbit.log_reader): on the same log
they agree on which workflows exist, which are open, and what each has persisted, with
lost-ack duplicates, zombie writes, takeovers by nodes of other window sizes and ids
reused after they left a writer's window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kapbit import JsonCodec
from kapbit.events import ActiveWriter, Event, StepOutcome, WorkflowCreated, WorkflowRetry
from kapbit.log_reader import PartitionReader
from kapbit.projection import Position, ProjectedEvent, Projector
from kapbit.repository import Checkpoint, MemRepository
from kapbit.restore import restore_partition
from tests.projection_logs import append, created, outcome, result, retry

CODEC = JsonCodec()


class _Model:
    """A read model keeping every event applied and the last position, in memory."""

    def __init__(self) -> None:
        self.events: list[ProjectedEvent] = []
        self.position: Position | None = None

    async def load_positions(self) -> dict[int, Position]:
        return {} if self.position is None else {0: self.position}

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        self.events.extend(events)
        self.position = position


@dataclass
class _Seen:
    """One workflow as a reader reports it: its outcomes and attempts."""

    created_at: int
    outcomes: set[tuple[int, str]] = field(default_factory=set)
    attempts: int = 0


def _fold(events: Sequence[ProjectedEvent]) -> tuple[list[int], dict[str, _Seen]]:
    """What the projection shows: every workflow created (by offset) and those still open."""
    creations: list[int] = []
    open_: dict[str, _Seen] = {}
    for projected in events:
        event, workflow_id = projected.event, projected.workflow_id
        if isinstance(event, ActiveWriter) or workflow_id is None:
            continue
        if isinstance(event, WorkflowCreated):
            assert workflow_id not in open_, f"{workflow_id} created twice while open"
            creations.append(projected.offset)
            open_[workflow_id] = _Seen(projected.offset)
        elif isinstance(event, StepOutcome):
            open_[workflow_id].outcomes.add((event.step, event.phase))
        elif isinstance(event, WorkflowRetry):
            open_[workflow_id].attempts = event.attempt
        else:
            del open_[workflow_id]
    return creations, open_


async def _recovered(repo: MemRepository, window: int) -> dict[str, _Seen]:
    end = await repo.end_offset(0)
    part = await restore_partition(repo, CODEC, 0, end, Checkpoint(), window)
    return {
        w.id: _Seen(w.created_offset, {(o.step, o.phase) for _, o in w.outcomes}, w.attempts)
        for w in part.in_flight
    }


async def _projected(repo: MemRepository, model: _Model | None = None) -> _Model:
    """Project the log (on with ``model``: a new projector resumes from its position)."""
    model = model or _Model()
    await Projector(repo, model).catch_up()
    return model


@dataclass
class _Engine:
    """Writes a log as kapbit instances would, and knows the truth: which ids it accepted
    (an id is refused while open or in the current writer's window), which are open."""

    repo: MemRepository
    node: str = ""
    window: int = 1
    recent: list[str] = field(default_factory=list)  # ids by their last created copy
    open: dict[str, _Seen] = field(default_factory=dict)
    creations: list[int] = field(default_factory=list)
    zombie: str = ""
    claims: int = 0

    async def claim(self, window: int) -> None:
        self.zombie, self.node, self.window = self.node, f"n{self.claims}", window
        self.claims += 1
        await append(self.repo, 0, self.node, ActiveWriter(self.node, 1.0, window=window))

    def refuses(self, workflow_id: str) -> bool:
        return workflow_id in self.open or workflow_id in self.recent[-self.window :]

    async def write(self, event: Event, copies: int) -> int:
        offset = -1
        for _ in range(copies):  # a lost acknowledgement: the append is retried
            offset = await append(self.repo, 0, self.node, event)
        return offset

    async def create(self, workflow_id: str, copies: int) -> None:
        first = await append(self.repo, 0, self.node, created(workflow_id))
        await self.write(created(workflow_id), copies - 1)
        if workflow_id in self.recent:
            self.recent.remove(workflow_id)
        self.recent.append(workflow_id)  # learnt at the acknowledged (last) copy
        self.open[workflow_id] = _Seen(first)
        self.creations.append(first)


_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["create", "create", "step", "retry", "end", "zombie", "claim"]),
        st.integers(0, 5),  # which id / workflow
        st.integers(1, 3),  # copies written (2 and 3: lost acknowledgements)
        st.sampled_from([1, 2, 3, 50]),  # a new owner's window
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=_ACTIONS, window=st.sampled_from([1, 2, 50]))
async def test_recovery_and_projection_agree_with_the_engine(
    actions: list[tuple[str, int, int, int]], window: int
) -> None:
    repo = MemRepository()
    engine = _Engine(repo)
    await engine.claim(window)
    resumed = _Model()
    for index, (action, which, copies, size) in enumerate(actions):
        if index == len(actions) // 2:  # a projector stops here; another resumes below
            await _projected(repo, resumed)
        await _act(engine, action, which, copies, size)

    recovered = await _recovered(repo, window)
    model = await _projected(repo)
    creations, projected_open = _fold(model.events)
    assert recovered == engine.open
    assert projected_open == engine.open
    assert creations == engine.creations
    # skimming (claims decoded, open workflows' records at the end) judges as taking does
    records = [r async for batch in repo.read(0, 0, await repo.end_offset(0)) for r in batch]
    taken, skimmed = (PartitionReader(CODEC, 0, "", 7, adopt=True) for _ in range(2))
    for record in records:
        taken.take(record)
    skimmed.skim(records)
    skimmed.settle()
    assert skimmed.open == taken.open
    assert list(skimmed.windows.largest.entries()) == list(taken.windows.largest.entries())
    # the resumed projector rebuilt the rule's state from its horizon: the same events
    await _projected(repo, resumed)
    assert [e.offset for e in resumed.events] == [e.offset for e in model.events]


async def _act(engine: _Engine, action: str, which: int, copies: int, size: int) -> None:
    repo = engine.repo
    ids = sorted(engine.open)
    if action == "create":
        workflow_id = f"w{which}"
        if not engine.refuses(workflow_id):
            await engine.create(workflow_id, copies)
    elif action == "claim":
        await engine.claim(size)
    elif action == "zombie" and engine.zombie:
        # the fenced owner goes on writing: a creation and an outcome nobody may act on
        await append(repo, 0, engine.zombie, created(f"w{which}"))
        await append(repo, 0, engine.zombie, outcome(f"w{which}", 0))
    elif action in ("step", "retry", "end") and ids:
        workflow_id = ids[which % len(ids)]
        seen = engine.open[workflow_id]
        if action == "step":
            step = len(seen.outcomes)
            await engine.write(outcome(workflow_id, step), copies)
            seen.outcomes.add((step, "execute"))
        elif action == "retry":
            seen.attempts += 1
            await engine.write(retry(workflow_id, seen.attempts), copies)
        else:
            await engine.write(result(workflow_id), copies)
            del engine.open[workflow_id]


async def test_an_id_reused_after_the_writers_window_is_a_new_workflow_for_both() -> None:
    """The writer keeps 1 id: "w" is accepted again once "v" pushed it out. Before the
    projector used recovery's rule it remembered 1,000 terminated ids of its own, took the
    second "w" for a late copy and never showed the second workflow."""
    repo = MemRepository()
    await append(repo, 0, "n", ActiveWriter("n", 1.0, window=1))
    events: list[Event] = [created("w"), result("w"), created("v"), result("v"), created("w")]
    for event in events:
        await append(repo, 0, "n", event)
    await append(repo, 0, "n", outcome("w", 0))
    model = await _projected(repo)
    creations, projected_open = _fold(model.events)
    assert creations == [1, 3, 5]
    assert set(projected_open) == {"w"}
    recovered = await _recovered(repo, 10)
    assert recovered == projected_open == {"w": _Seen(5, {(0, "execute")})}


async def test_a_lost_ack_copy_after_another_id_is_still_a_copy() -> None:
    """A window of 1: "w"'s first append lost its ack, "v" was created meanwhile, then the
    retried append of "w" landed. "w" was open: the second record is a copy for both."""
    repo = MemRepository()
    await append(repo, 0, "n", ActiveWriter("n", 1.0, window=1))
    events: list[Event] = [
        created("w"),
        created("v"),
        created("w"),
        outcome("w", 0),
        outcome("w", 0),
    ]
    for event in events:
        await append(repo, 0, "n", event)
    model = await _projected(repo)
    creations, projected_open = _fold(model.events)
    assert creations == [1, 2]
    recovered = await _recovered(repo, 1)
    assert recovered == projected_open
    assert recovered["w"] == _Seen(1, {(0, "execute")})


async def test_a_resumed_projector_judges_by_the_window_of_a_claim_before_its_horizon() -> None:
    """The writer (window 1) claimed at 0; a projector stops at 3 with its horizon at 1, past
    that claim. Resumed, it must still judge "w0" by a window of 1 (the position names it),
    or the reused "w0" at 4 is taken for a copy."""
    repo = MemRepository()
    await append(repo, 0, "n", ActiveWriter("n", 1.0, window=1))
    events: list[Event] = [created("w0"), created("w1")]
    for event in events:
        await append(repo, 0, "n", event)
    model = await _projected(repo)
    assert model.position == Position(3, "n", 1, "n", 1)
    later: list[Event] = [result("w0"), created("w0")]
    for event in later:
        await append(repo, 0, "n", event)
    await _projected(repo, model)
    assert [e.offset for e in model.events] == [0, 1, 2, 3, 4]
