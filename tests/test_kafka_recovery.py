"""The recovery and fencing scenarios, on a real Kafka-protocol broker.

A crash is :meth:`Kapbit.abort` (every task cancelled, nothing more written) followed by a
new instance on a new :class:`KafkaRepository` on the same topic. The final log is read
back with the zombie-filtering reader of ``tests/kafka_worker.py``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from kapbit import (
    CheckpointPolicy,
    Definition,
    DuplicateWorkflow,
    Fenced,
    Kapbit,
    Options,
    Progress,
    Step,
    Success,
    WorkflowNotFound,
)
from kapbit.events import StepOutcome
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing.faults import Call, Fault, FaultyRepository
from tests.helpers import Script, saga, wait_until
from tests.kafka_worker import Entry, read_log

EXECUTE_PATH = [
    "workflow_created",
    (0, "execute"),
    (1, "execute"),
    (2, "execute"),
    "workflow_result",
]
COMPENSATE_PATH = [
    "workflow_created",
    (0, "execute"),
    (1, "execute"),
    (2, "execute"),
    (1, "compensate"),
    (0, "compensate"),
    "workflow_result",
]
RESULTS = {
    "execute": {"values": ["exec-0", "exec-1", "exec-2"], "compensated": []},
    "compensate": {"values": ["exec-0", "exec-1"], "compensated": [1, 0]},
}


def crash_after(inner: KafkaRepository, n: int) -> tuple[FaultyRepository, Fault]:
    """A repository whose appends of workflow events block after the first ``n``.

    The instance on it is then killed with the next event unwritten: a crash right after
    the ``n``-th event became durable. The fault's first hit is that blocked append.
    """
    repository = FaultyRepository(inner)
    seen = 0

    def beyond_n(call: Call) -> bool:
        nonlocal seen
        if call.kind == "active_writer":
            return False
        seen += 1
        return seen > n

    return repository, repository.slow(when=beyond_n)


def _shape(entries: list[Entry]) -> list[Any]:
    """A workflow's admitted records as kinds, step outcomes as ``(step, phase)``."""
    return [
        (e.event.step, e.event.phase) if isinstance(e.event, StepOutcome) else e.kind
        for e in entries
    ]


async def _crash(kbit: Kapbit, repository: KafkaRepository) -> None:
    """Kill ``kbit`` as a crash would, and drop its connections as the process would."""
    kbit.abort()
    await repository.close()


# --- a crash at every event boundary ----------------------------------------------------------

CRASH_POINTS = [("execute", n) for n in range(len(EXECUTE_PATH) + 1)] + [
    ("compensate", n) for n in range(len(COMPENSATE_PATH) + 1)
]


@pytest.mark.parametrize(("phase", "written"), CRASH_POINTS)
async def test_crash_after_each_event_resumes_exactly_where_the_log_stops(
    kafka_bootstrap: str, topic: str, phase: str, written: int
) -> None:
    path = EXECUTE_PATH if phase == "execute" else COMPENSATE_PATH
    behaviour = {} if phase == "execute" else {(2, "execute"): "fail"}
    before, after = Script(dict(behaviour)), Script(dict(behaviour))

    inner = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    crashing, blocked = crash_after(inner, written)
    old = Kapbit([saga(before)], crashing)
    await old.start()
    call = asyncio.create_task(old.exec_workflow("w", "saga", {"id": "w"}))
    if written < len(path):
        await blocked.wait_hits(1, timeout=20)
    else:
        await asyncio.wait_for(asyncio.shield(call), 20)
    await _crash(old, inner)
    await asyncio.gather(call, return_exceptions=True)

    new = Kapbit([saga(after)], KafkaRepository(kafka_bootstrap, topic))
    async with new:
        if written == 0:  # nothing durable: the workflow never existed
            assert new.stats.recovered == 0
            assert await new.exec_workflow("w", "saga", {"id": "w"}) == RESULTS[phase]
        elif written == len(path):  # terminated before the crash: nothing to resume
            assert new.stats.recovered == 0
            with pytest.raises(WorkflowNotFound):
                await new.wait_result("w")
            with pytest.raises(DuplicateWorkflow):
                await new.exec_workflow("w", "saga", {"id": "w"})
        else:
            assert new.stats.recovered == 1
            assert await new.wait_result("w", timeout=20) == RESULTS[phase]

    log = await read_log(kafka_bootstrap, topic)
    assert log.zombies() == []
    assert _shape(log.by_workflow()["w"]) == path
    assert log.results() == {"w": [RESULTS[phase]]}
    # Steps persisted before the crash never ran again; the one whose outcome was being
    # appended when it crashed ran in both instances; the rest ran after the restart only.
    steps = [e for e in path if isinstance(e, tuple)]
    persisted = [e for e in path[:written] if isinstance(e, tuple)]
    interrupted = [e for e in path[written : written + 1] if isinstance(e, tuple)]
    assert [(s, p) for _, s, p in before.calls] == persisted + interrupted
    assert [(s, p) for _, s, p in after.calls] == steps[len(persisted) :]


# --- idempotency across restarts --------------------------------------------------------------


async def test_ids_are_refused_after_a_crash_and_after_a_checkpointed_restart(
    kafka_bootstrap: str, topic: str
) -> None:
    options = Options(checkpoints=CheckpointPolicy(every=5, interval=0.05))
    script = Script()
    a_repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    a = Kapbit([saga(script)], a_repo, options=options)
    await a.start()
    await asyncio.gather(*(a.exec_workflow(f"d{i}", "saga", {"id": f"d{i}"}) for i in range(30)))
    await _crash(a, a_repo)

    b_repo = KafkaRepository(kafka_bootstrap, topic)
    b = Kapbit([saga(script)], b_repo, options=options)
    async with b:
        ends = [await b_repo.end_offset(p) for p in range(2)]
        for i in range(30):
            with pytest.raises(DuplicateWorkflow):
                await b.exec_workflow(f"d{i}", "saga", {"id": f"d{i}"})
        # Refusals write nothing.
        assert [await b_repo.end_offset(p) for p in range(2)] == ends
        await asyncio.gather(
            *(b.exec_workflow(f"e{i}", "saga", {"id": f"e{i}"}) for i in range(10))
        )
    # B closed cleanly: its checkpoint is past every workflow, so C refills its window
    # from the ids-only part of recovery.
    check = KafkaRepository(kafka_bootstrap, topic)
    await check.start()
    try:
        checkpoints = await check.load_checkpoints()
        assert [checkpoints[p].offset for p in range(2)] == [
            await check.end_offset(p) for p in range(2)
        ]
    finally:
        await check.close()
    c = Kapbit([saga(script)], KafkaRepository(kafka_bootstrap, topic), options=options)
    async with c:
        for workflow_id in [f"d{i}" for i in range(30)] + [f"e{i}" for i in range(10)]:
            with pytest.raises(DuplicateWorkflow):
                await c.exec_workflow(workflow_id, "saga", {"id": workflow_id})
        assert c.stats.recovered == 0
    assert len(script.calls) == 40 * 3  # every workflow ran once, none twice


# --- zombie writes ----------------------------------------------------------------------------


async def test_records_a_fenced_node_wrote_after_the_takeover_are_ignored_by_recovery(
    kafka_bootstrap: str, topic: str
) -> None:
    """A writes after B's claim: a step outcome, a result and a new workflow, all zombies.
    C, recovering after B, ignores all three and finishes the workflows itself."""
    release = asyncio.Event()
    waiting: list[str] = []
    never = asyncio.Event()

    def definition(by: str, hold: bool) -> Definition:
        async def step(index: int, input: str) -> Success[str]:
            if hold and (by == "B" or input == "z1"):
                waiting.append(f"{by}:{input}")
                await (release if by == "A" else never).wait()
            return Success(f"{by}{index}")

        async def first(input: str, progress: Progress) -> Success[str]:
            return await step(0, input)

        async def second(input: str, progress: Progress) -> Success[str]:
            return Success(f"{by}1")

        async def result(input: str, progress: Progress) -> dict[str, Any]:
            if hold and by == "A" and input == "z2":
                waiting.append(f"A:{input}:result")
                await release.wait()
            if hold and by == "B":
                await never.wait()
            return {"by": by, "values": progress.values()}

        return Definition("z", [Step(first), Step(second)], result=result, input_type=str)

    a = Kapbit(
        [definition("A", hold=True)],
        KafkaRepository(kafka_bootstrap, topic, partitions=1),
        options=Options(node_id="node-a"),
    )
    await a.start()
    z1 = asyncio.create_task(a.exec_workflow("z1", "z", "z1"))  # A holds it in step 0
    z2 = asyncio.create_task(a.exec_workflow("z2", "z", "z2"))  # A holds it in its result
    await wait_until(lambda: sorted(waiting) == ["A:z1", "A:z2:result"], timeout=20)

    b_repo = KafkaRepository(kafka_bootstrap, topic)
    b = Kapbit([definition("B", hold=True)], b_repo, options=Options(node_id="node-b"))
    await b.start()
    assert b.stats.recovered == 2
    # A, not knowing yet, writes z1's step outcome, z2's result and creates z3.
    z3 = asyncio.create_task(a.exec_workflow("z3", "z", "z3"))
    release.set()
    for call in (z1, z2, z3):
        with pytest.raises(Fenced):
            await asyncio.wait_for(call, 20)
    await a.close()
    await _crash(b, b_repo)  # B never wrote anything but its claim

    log = await read_log(kafka_bootstrap, topic)
    zombies = {(e.kind, e.key) for e in log.zombies()}
    assert {e.node for e in log.zombies()} == {a.writer_id}
    assert zombies >= {("step_outcome", "z1"), ("workflow_result", "z2")}, zombies
    zombie_z3 = ("workflow_created", "z3") in zombies

    c = Kapbit([definition("C", hold=False)], KafkaRepository(kafka_bootstrap, topic))
    async with c:
        assert c.stats.recovered == 2  # z1 and z2; z3 was never created for real
        assert await c.wait_result("z1", timeout=20) == {"by": "C", "values": ["C0", "C1"]}
        assert await c.wait_result("z2", timeout=20) == {"by": "C", "values": ["A0", "A1"]}
        assert await c.exec_workflow("z3", "z", "z3") == {"by": "C", "values": ["C0", "C1"]}

    log = await read_log(kafka_bootstrap, topic)
    workflows = log.by_workflow()
    assert _shape(workflows["z1"]) == [
        "workflow_created",
        (0, "execute"),
        (1, "execute"),
        "workflow_result",
    ]
    assert [e.node for e in workflows["z1"][1:]] == [c.writer_id] * 3
    assert _shape(workflows["z2"])[-1] == "workflow_result"
    assert workflows["z2"][-1].node == c.writer_id
    assert [e.node for e in workflows["z3"]] == [c.writer_id] * 4
    assert log.results() == {
        "z1": [{"by": "C", "values": ["C0", "C1"]}],
        "z2": [{"by": "C", "values": ["A0", "A1"]}],
        "z3": [{"by": "C", "values": ["C0", "C1"]}],
    }
    print(f"A's WorkflowCreated of z3 landed as a zombie: {zombie_z3}")


# --- takeover under load ----------------------------------------------------------------------


async def test_takeover_while_workflows_run_loses_nothing(kafka_bootstrap: str, topic: str) -> None:
    never = asyncio.Event()

    def definition(hold: bool) -> Definition:
        async def step(input: int, progress: Progress) -> Success[int]:
            if hold and input < 0 and len(progress) == 1:
                await never.wait()  # in flight until B takes over
            return Success(input * 10 + len(progress))

        return Definition("load", [Step(step)] * 3, input_type=int, outcome_type=int)

    a = Kapbit([definition(True)], KafkaRepository(kafka_bootstrap, topic, partitions=3))
    await a.start()
    returned: dict[str, Any] = {}
    counter = iter(range(1_000_000))

    async def submit() -> None:
        while True:
            n = next(counter)
            try:
                returned[f"l{n}"] = await a.exec_workflow(f"l{n}", "load", n)
            except Fenced:
                return

    held = [asyncio.create_task(a.exec_workflow(f"h{i}", "load", -1 - i)) for i in range(5)]
    submitters = [asyncio.create_task(submit()) for _ in range(16)]
    await wait_until(lambda: len(returned) >= 100, timeout=30)

    b = Kapbit([definition(False)], KafkaRepository(kafka_bootstrap, topic))
    await b.start()
    try:
        await asyncio.wait_for(asyncio.gather(*submitters), 20)
        for call in held:
            with pytest.raises(Fenced):
                await call
        assert not a.is_running
        assert b.stats.recovered >= 5
        for i in range(5):
            n = -1 - i
            assert await b.wait_result(f"h{i}", timeout=20) == [n * 10, n * 10 + 1, n * 10 + 2]
        await wait_until(lambda: b.stats.in_flight == 0, timeout=30)
    finally:
        await b.close()
        await a.close()

    log = await read_log(kafka_bootstrap, topic)
    created, terminals, results = log.created(), log.terminals(), log.results()
    assert set(terminals) == set(created)
    assert all(len(entries) == 1 for entries in (*created.values(), *terminals.values()))
    assert results == {wid: [_load_result(wid)] for wid in created}
    # Whatever A returned is in the log, and A's writes after B's claim are ignored.
    assert {wid: results[wid][0] for wid in returned} == returned
    assert log.zombies(), "A can only have learnt it was fenced from a record after B's claim"
    b_claims = {e.partition: e.offset for e in log.claims() if e.node == b.writer_id}
    assert all(e.offset > b_claims[e.partition] for e in log.zombies())
    assert all(terminals[f"h{i}"][0].node == b.writer_id for i in range(5))


def _load_result(workflow_id: str) -> list[int]:
    n = -1 - int(workflow_id[1:]) if workflow_id.startswith("h") else int(workflow_id[1:])
    return [n * 10, n * 10 + 1, n * 10 + 2]


# --- recovery reads from the checkpoint -------------------------------------------------------


async def test_restart_reads_from_the_checkpoint_not_the_whole_log(
    kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    never = asyncio.Event()
    holding: list[int] = []
    options = Options(checkpoints=CheckpointPolicy(every=10, interval=0.05), idempotency_window=10)

    def definition(hold: bool) -> Definition:
        async def step(input: int, progress: Progress) -> Success[int]:
            if hold and input < 0 and len(progress) == 1:
                holding.append(input)
                await never.wait()
            return Success(len(progress))

        return Definition("cp", [Step(step)] * 3, input_type=int, outcome_type=int)

    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    a = Kapbit([definition(True)], repo, options=options)
    await a.start()
    for chunk in range(4):
        await asyncio.gather(
            *(a.exec_workflow(f"c{i}", "cp", i) for i in range(chunk * 50, chunk * 50 + 50))
        )
    for i in range(200, 240):  # a sequential tail: the window's ids are not interleaved
        await a.exec_workflow(f"c{i}", "cp", i)
    ends = [await repo.end_offset(p) for p in range(2)]
    open_calls = [asyncio.create_task(a.exec_workflow(f"o{i}", "cp", -1 - i)) for i in range(4)]
    await wait_until(lambda: len(holding) == 4, timeout=20)  # created, step 0 persisted

    # The periodic checkpoint catches up with every workflow that finished.
    async def saved() -> bool:
        checkpoints = await repo.load_checkpoints()
        return all(p in checkpoints and checkpoints[p].offset >= ends[p] for p in range(2))

    async def checkpointed() -> None:
        while not await saved():  # noqa: ASYNC110 - the checkpoint topic has no event to wait on
            await asyncio.sleep(0.02)

    await asyncio.wait_for(checkpointed(), 20)
    total = sum(ends) + 4 * 2  # the log: 240 workflows, 4 open ones with one outcome each
    await _crash(a, repo)
    await asyncio.gather(*open_calls, return_exceptions=True)

    caplog.set_level(logging.INFO, logger="kapbit")
    b = Kapbit([definition(False)], KafkaRepository(kafka_bootstrap, topic), options=options)
    async with b:
        assert b.stats.recovered == 4
        for i in range(4):
            assert await b.wait_result(f"o{i}", timeout=20) == [0, 1, 2]
        # The window was refilled: the latest ids are still refused.
        with pytest.raises(DuplicateWorkflow):
            await b.exec_workflow("c239", "cp", 239)
    started = [r.getMessage() for r in caplog.records if "records read" in r.getMessage()]
    assert started, "no start line logged"
    read = int(re.search(r"(\d+) records read", started[0]).group(1))  # type: ignore[union-attr]
    # At most: from the checkpoint, the 4 open workflows (created + one outcome each); before
    # it, ids only, as far back as the 10th newest id of each partition (the sequential
    # tail: 5 records per workflow).
    bound = 4 * 2 + 2 * 10 * 5
    assert read <= bound, f"read {read} of {total} records; expected at most {bound}"
    assert read * 5 < total
    print(f"restart read {read} of {total} records")
