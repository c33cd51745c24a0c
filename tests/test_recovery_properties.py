"""Property-based: random sagas, random step outcomes and exceptions, random crashes and
takeovers, on the in-memory repository.

Invariants, checked on the log as a zombie-filtering reader sees it:

* every created workflow terminates exactly once, and nothing of it follows the end;
* a step whose outcome is persisted never runs again (for any instance);
* compensations run only for steps that succeeded and have one, in reverse order, all of
  them before a compensated result;
* no fenced write is acted on: every result any caller got is the one in the log, a
  workflow's result is the one its (live) outcomes determine, and checkpoints are never
  ahead of the truth;
* ids in the idempotency window (or in flight) are refused by every new instance.
"""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kapbit import (
    CheckpointPolicy,
    DeadLettered,
    Definition,
    DuplicateWorkflow,
    Failure,
    Fenced,
    InstanceClosed,
    Kapbit,
    Options,
    Progress,
    RetryPolicy,
    Step,
    Success,
    WillRetryLater,
    WorkflowNotFound,
    partition_for,
)
from kapbit.events import DeadLetter, WorkflowResult
from kapbit.options import Backoff
from tests.helpers import (
    CrashRepository,
    assert_compensations_followed_successes,
    assert_no_step_reran_after_its_outcome,
    check_history,
    histories,
    live_records,
    wait_until,
)

FAST_RETRY = RetryPolicy(
    fast=Backoff(initial=0.001, maximum=0.005, jitter=0.001), slow_interval=0.01, max_attempts=3
)
PARTITIONS = 2

# What a step does: "ok", "fail" (business Failure; execute only) or raise n times first.
Behaviour = str | int


@dataclass(frozen=True)
class WorkflowPlan:
    id: str
    steps: int
    compensable: frozenset[int]
    behaviour: dict[tuple[int, str], Behaviour]
    submit_at: int  # the instance (stage) it is first submitted to

    def expected_result(self) -> dict[str, Any] | None:
        """The result if the workflow ends with one and raises nothing; ``None`` when it
        may be dead-lettered instead (a step raises)."""
        if any(isinstance(b, int) for b in self.behaviour.values()):
            return None
        values: list[str] = []
        for step in range(self.steps):
            if self.behaviour.get((step, "execute"), "ok") == "fail":
                back = [i for i in range(step - 1, -1, -1) if i in self.compensable]
                return {"values": values, "compensated": back}
            values.append(f"exec-{step}")
        return {"values": values, "compensated": []}


@dataclass(frozen=True)
class Disruption:
    kind: str  # "crash" or "takeover"
    at: int  # the n-th append of the stage
    land: bool  # crash: the held record lands before the node dies


@dataclass(frozen=True)
class Plan:
    workflows: list[WorkflowPlan]
    disruptions: list[Disruption]
    window: int
    checkpoint_every: int


_BEHAVIOURS: list[Behaviour] = ["ok", "ok", "ok", "fail", 1, 2, 4]
_COMPENSATIONS: list[Behaviour] = ["ok", "ok", 1, 2]
behaviours = st.sampled_from(_BEHAVIOURS)
compensations = st.sampled_from(_COMPENSATIONS)


@st.composite
def workflow_plans(draw: st.DrawFn, index: int, stages: int) -> WorkflowPlan:
    steps = draw(st.integers(1, 4))
    compensable = frozenset(draw(st.sets(st.integers(0, steps - 1))))
    behaviour: dict[tuple[int, str], Behaviour] = {}
    for step in range(steps):
        what = draw(behaviours)
        if what != "ok":
            behaviour[(step, "execute")] = what
        if step in compensable:
            back = draw(compensations)
            if back != "ok":
                behaviour[(step, "compensate")] = back
    submit_at = draw(st.sampled_from([0, 0, *range(stages + 1)]))
    return WorkflowPlan(f"w{index}", steps, compensable, behaviour, submit_at)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    disruptions = draw(
        st.lists(
            st.builds(
                Disruption,
                st.sampled_from(["crash", "takeover"]),
                st.integers(1, 15),
                st.booleans(),
            ),
            max_size=3,
        )
    )
    count = draw(st.integers(1, 8))
    workflows = [draw(workflow_plans(i, len(disruptions))) for i in range(count)]
    return Plan(workflows, disruptions, draw(st.sampled_from([2, 100])), draw(st.integers(1, 3)))


@dataclass
class World:
    """The shared outside world: step behaviour (exceptions counted across instances)
    and one journal of step calls and appends."""

    plan: Plan
    journal: list[tuple[Any, ...]] = field(default_factory=list)
    raised: dict[tuple[str, int, str], int] = field(default_factory=lambda: defaultdict(int))

    def definitions(self) -> list[Definition]:
        return [self._definition(w) for w in self.plan.workflows]

    def _definition(self, plan: WorkflowPlan) -> Definition:
        def action(step: int, phase: str) -> Callable[[Any, Progress], Any]:
            async def act(input: Any, progress: Progress) -> Any:
                key = (plan.id, step, phase)
                self.journal.append(("call", *key))
                await asyncio.sleep(0)  # let other workflows interleave
                what = plan.behaviour.get((step, phase), "ok")
                if isinstance(what, int) and self.raised[key] < what:
                    self.raised[key] += 1
                    raise ConnectionError(f"{key} unavailable")
                if what == "fail":
                    return Failure(f"no-{step}")
                return Success(f"{phase[:4]}-{step}")

            return act

        return Definition(
            f"t{plan.id}",
            [
                Step(
                    action(i, "execute"),
                    action(i, "compensate") if i in plan.compensable else None,
                )
                for i in range(plan.steps)
            ],
            result=lambda input, progress: {
                "values": progress.values(),
                "compensated": [i for i, _ in progress.compensations],
            },
            input_type=dict[str, str],
            outcome_type=str,
        )


def _live_state(repo: CrashRepository) -> tuple[dict[str, int], set[str]]:
    """Created workflows (id -> partition) and the terminated ones, as readers see them."""
    created: dict[str, int] = {}
    terminated: set[str] = set()
    for record in live_records(repo):
        if record.kind == "workflow_created":
            created.setdefault(record.key, record.partition)
        elif record.kind in ("workflow_result", "dead_letter", "rejected"):
            terminated.add(record.key)
    return created, terminated


def _refused_ids(repo: CrashRepository, window: int) -> set[str]:
    """Ids every new instance must refuse: the last ``window`` created per partition,
    and every workflow still open."""
    created, terminated = _live_state(repo)
    refused = set(created) - terminated
    for partition in range(PARTITIONS):
        ids = [r.key for r in live_records(repo, partition) if r.kind == "workflow_created"]
        refused.update(ids[-window:])
    return refused


async def _run(plan: Plan) -> None:
    world = World(plan)
    repo = CrashRepository(partitions=PARTITIONS, journal=world.journal)
    stages = len(plan.disruptions) + 1
    options = [
        Options(
            node_id=f"n{k}",
            idempotency_window=plan.window,
            retry=FAST_RETRY,
            checkpoints=CheckpointPolicy(every=plan.checkpoint_every, interval=0.002),
        )
        for k in range(stages)
    ]
    nodes = [Kapbit(world.definitions(), repo, options=options[k]) for k in range(stages)]
    started = [False] * stages
    by_id = {w.id: w for w in plan.workflows}
    answers: list[tuple[str, Any]] = []  # (workflow id, result or exception) from callers
    node_tasks: list[dict[str, asyncio.Task[Any]]] = [{} for _ in range(stages)]

    async def start(k: int) -> None:
        started[k] = True
        await nodes[k].start()

    for k in range(stages):
        node = nodes[k]
        if not started[k]:
            await start(k)
        # A new owner refuses every id in the window and every open workflow.
        for workflow_id in sorted(_refused_ids(repo, plan.window)):
            with pytest.raises(DuplicateWorkflow):
                await node.exec_workflow(workflow_id, f"t{workflow_id}", {"id": workflow_id})
        created, _ = _live_state(repo)
        last = k == stages - 1
        for w in plan.workflows:
            if w.id not in created and (w.submit_at == k or last):
                node_tasks[k][w.id] = asyncio.create_task(
                    node.exec_workflow(w.id, f"t{w.id}", {"id": w.id})
                )
        if last:
            break

        disruption = plan.disruptions[k]
        starting: list[asyncio.Task[None]] = []
        if disruption.kind == "crash":
            repo.hold(disruption.at, land=disruption.land, then=node.abort)
        else:

            def take_over(k: int = k, starting: list[asyncio.Task[None]] = starting) -> None:
                starting.append(asyncio.create_task(start(k + 1)))

            repo.hold(disruption.at, then=take_over)

        def quiet(node: Kapbit = node, k: int = k) -> bool:
            return repo.held.is_set() or (
                all(t.done() for t in node_tasks[k].values()) and node.stats.in_flight == 0
            )

        await wait_until(quiet, timeout=10)
        event(f"{disruption.kind} {'while writing' if repo.held.is_set() else 'when idle'}")
        repo.disarm()
        if disruption.kind == "crash":
            if not repo.held.is_set():
                node.abort()
            stopped_with: type[Exception] = InstanceClosed
        else:
            stopped_with = Fenced
            if not repo.held.is_set():
                # Nothing was being written: the next node takes over an idle one, which
                # learns it on its next write (a zombie WorkflowCreated nobody acts on).
                await start(k + 1)
                with pytest.raises(Fenced):
                    await node.exec_workflow(f"probe{k}", f"t{plan.workflows[0].id}", {"id": "p"})
            else:
                await starting.pop()
                repo.release()  # the held append lands behind the new claim: fenced
            await wait_until(functools.partial(_stopped, node), timeout=10)
            await node.close()
        for workflow_id, task in node_tasks[k].items():
            answer = await asyncio.gather(task, return_exceptions=True)
            assert isinstance(answer[0], dict | WillRetryLater | stopped_with), repr(answer[0])
            answers.append((workflow_id, answer[0]))

    final = nodes[-1]

    def all_terminated() -> bool:
        created, terminated = _live_state(repo)
        return set(created) == set(by_id) and set(created) <= terminated

    await wait_until(all_terminated, timeout=10)
    for workflow_id, task in node_tasks[-1].items():
        answers.append((workflow_id, (await asyncio.gather(task, return_exceptions=True))[0]))
    for workflow_id in by_id:
        try:
            answers.append((workflow_id, await final.wait_result(workflow_id, timeout=10)))
        except (DeadLettered, WorkflowNotFound) as error:
            answers.append((workflow_id, error))
    await final.close()
    event(f"zombie records: {len(repo.records()) - len(live_records(repo))}")

    # --- the invariants ----------------------------------------------------------------
    all_histories = histories(repo)
    assert set(all_histories) == set(by_id), "a workflow is missing or a zombie one counts"
    for workflow_id, events in all_histories.items():
        workflow = by_id[workflow_id]
        check_history(workflow_id, events, workflow.steps, workflow.compensable)
        final_event = events[-1]
        expected = workflow.expected_result()
        if expected is not None:
            assert isinstance(final_event, WorkflowResult), (workflow_id, events)
            assert msgspec.json.decode(final_event.result) == expected
        partitions = {r.partition for r in live_records(repo) if r.key == workflow_id}
        assert partitions == {partition_for(workflow_id, PARTITIONS)}
    for workflow_id, answer in answers:
        final_event = all_histories[workflow_id][-1]
        if isinstance(answer, dict):
            # whatever any instance returned is what the log says
            assert isinstance(final_event, WorkflowResult)
            assert msgspec.json.decode(final_event.result) == answer
        elif isinstance(answer, DeadLettered):
            assert isinstance(final_event, DeadLetter)
    assert_no_step_reran_after_its_outcome(repo, world.journal)
    assert_compensations_followed_successes(repo, world.journal)
    assert repo.checkpoint_errors == []


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(plans())
def test_random_sagas_crashes_and_takeovers_keep_the_invariants(plan: Plan) -> None:
    asyncio.run(asyncio.wait_for(_run(plan), 60))


def _stopped(node: Kapbit) -> bool:
    return not node.is_running
