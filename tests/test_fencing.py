"""Fencing on the in-memory repository: a second instance takes over, the first stops on
its next write, and nobody ever acts on what it wrote after losing the log."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from kapbit import Fenced, JsonCodec, Kapbit, Options, WorkflowNotFound, partition_for
from kapbit.errors import InvalidAppend
from kapbit.events import (
    KIND_OF,
    ActiveWriter,
    EventKind,
    StepOutcome,
    WorkflowCreated,
    WorkflowResult,
)
from kapbit.fencing import OwnerTracker, displaces, is_claim
from kapbit.repository import Checkpoint, MemRepository, Record
from kapbit.testing.faults import FaultyRepository
from tests.helpers import (
    CrashRepository,
    Script,
    YieldingScript,
    assert_no_step_reran_after_its_outcome,
    check_history,
    gated_saga,
    histories,
    kinds,
    live_records,
    saga,
    wait_until,
)


def _claims(repo: MemRepository, partition: int) -> list[str]:
    return [r.node for r in repo.records(partition) if r.kind == "active_writer"]


def _zombies(repo: MemRepository) -> list[Any]:
    live = {(r.partition, r.offset) for r in live_records(repo)}
    return [r for r in repo.records() if (r.partition, r.offset) not in live]


def _result_value(repo: MemRepository, workflow_id: str) -> Any:
    final = histories(repo)[workflow_id][-1]
    assert isinstance(final, WorkflowResult)
    return msgspec.json.decode(final.result)


async def test_second_instance_claims_every_partition_and_resumes_the_work() -> None:
    """A's workflows wait inside step 1. B starts on the same log: it claims all three
    partitions, recovers A's workflows and finishes them. A, released, writes once, is
    fenced and stops; every pending and later call on A raises Fenced."""
    repo = CrashRepository(partitions=3)
    a_calls: list[tuple[str, int]] = []
    b_calls: list[tuple[str, int]] = []
    release_a = asyncio.Event()
    a = Kapbit([gated_saga(release_a, a_calls, tag="A")], repo, options=Options(node_id="A"))
    await a.start()
    ids = [f"w{i}" for i in range(6)]
    assert {partition_for(i, 3) for i in ids} == {0, 1, 2}
    pending = {i: asyncio.create_task(a.exec_workflow(i, "gated", {"id": i})) for i in ids}
    await wait_until(lambda: sorted(a_calls) == sorted((i, s) for i in ids for s in (0, 1)))

    b = Kapbit([gated_saga(None, b_calls, tag="B")], repo, options=Options(node_id="B"))
    await b.start()
    for p in range(3):
        assert _claims(repo, p) == [a.writer_id, b.writer_id]
    assert b.stats.recovered == 6
    results = {i: await b.wait_result(i, timeout=5) for i in ids}
    # B resumed after step 0 (A's value kept), ran steps 1 and 2 itself
    assert results == {i: [i, f"{i}-0A", f"{i}-1B", f"{i}-2B"] for i in ids}
    assert sorted(b_calls) == sorted((i, s) for i in ids for s in (1, 2))

    assert a.is_running  # A has not written since: it cannot know yet
    release_a.set()
    for i in ids:
        with pytest.raises(Fenced):
            await pending[i]
    assert not a.is_running
    with pytest.raises(Fenced):
        await a.exec_workflow("new", "gated", {"id": "new"})
    with pytest.raises(Fenced):
        await a.wait_result("w0")
    with pytest.raises(Fenced):
        await a.wait_result("unknown")
    await a.close()  # closing a fenced instance is harmless

    # A wrote exactly one record after B's claim (its first write failed and it stopped),
    # and no reader acts on it.
    zombies = _zombies(repo)
    assert [(z.node, z.kind) for z in zombies] == [(a.writer_id, "step_outcome")]
    for i in ids:
        check_history(i, histories(repo)[i], steps=3, compensable=())
        assert _result_value(repo, i) == results[i]
    await b.close()
    assert repo.checkpoint_errors == []


async def test_fenced_instance_never_returns_a_result_the_new_owner_does_not_see() -> None:
    """``done`` finished on A before the takeover (returned, and B sees it). The result
    of ``late`` was being written when B took over: it lands after B's claim, so A's
    caller gets Fenced, not that result; B finishes ``late`` itself."""
    repo = CrashRepository()
    a_calls: list[tuple[str, int]] = []
    a = Kapbit([gated_saga(None, a_calls, tag="A")], repo, options=Options(node_id="A"))
    await a.start()
    done = await a.exec_workflow("done", "gated", {"id": "done"})
    repo.hold(5)  # created, 3 outcomes, then the result append is held
    late = asyncio.create_task(a.exec_workflow("late", "gated", {"id": "late"}))
    await asyncio.wait_for(repo.held.wait(), 5)

    b_calls: list[tuple[str, int]] = []
    async with Kapbit(
        [gated_saga(None, b_calls, tag="B")], repo, options=Options(node_id="B")
    ) as b:
        assert b.stats.recovered == 1
        repo.release()  # A's result lands now, behind B's claim
        with pytest.raises(Fenced):
            await late
        assert await b.wait_result("late", timeout=5) == ["late", "late-0A", "late-1A", "late-2A"]
        with pytest.raises(WorkflowNotFound):
            await b.wait_result("done")
    assert b_calls == []  # every step of "late" had its outcome in the log
    assert _result_value(repo, "done") == done
    zombies = [(z.node, z.kind, z.key) for z in _zombies(repo)]
    assert zombies == [(a.writer_id, "workflow_result", "late")]
    for i in ("done", "late"):
        assert kinds(repo, i).count("workflow_result") == (2 if i == "late" else 1)
        check_history(i, histories(repo)[i], steps=3, compensable=())


async def test_an_idle_fenced_instance_learns_it_on_its_next_write() -> None:
    repo = MemRepository()
    calls: list[tuple[str, int]] = []
    a = Kapbit([gated_saga(None, calls)], repo, options=Options(node_id="A"))
    await a.start()
    b = Kapbit([gated_saga(None, calls)], repo, options=Options(node_id="B"))
    await b.start()
    with pytest.raises(Fenced):
        await a.exec_workflow("n", "gated", {"id": "n"})
    assert calls == []  # no step runs before WorkflowCreated is durable
    assert not a.is_running
    # A's WorkflowCreated is a zombie: the id is free for the owner.
    assert await b.exec_workflow("n", "gated", {"id": "n"}) == ["n", "n-0", "n-1", "n-2"]
    await asyncio.gather(a.close(), b.close())
    assert [r.node for r in live_records(repo) if r.key == "n"] == [b.writer_id] * 5


def _encode(event: Any) -> bytes:
    return JsonCodec().encode(event)


async def _zombie_log() -> tuple[MemRepository, dict[str, int]]:
    """A created ``w1`` and persisted step 0; B claimed the partition and died at once;
    A, not knowing, went on writing: step 1 and the result of ``w1``, and a new ``w2``."""
    repo = MemRepository()
    at: dict[str, int] = {}

    async def put(name: str, key: str, node: str, event: Any) -> None:
        kind = KIND_OF[type(event)]
        try:
            if kind is EventKind.ACTIVE_WRITER:
                at[name] = await repo.claim(0, node, _encode(event))
            else:
                at[name] = await repo.append(0, kind, key, node, _encode(event))
        except Fenced:
            at[name] = len(repo.records(0)) - 1

    raw = msgspec.Raw
    await put("claim-a", "A", "A", ActiveWriter("A", 0.0))
    await put(
        "w1",
        "w1",
        "A",
        WorkflowCreated("w1", "saga", raw(b'{"id":"w1"}'), 0),
    )
    await put(
        "w1-0",
        "w1",
        "A",
        StepOutcome("w1", 0, "execute", True, raw(b'"a0"')),
    )
    await put("claim-b", "B", "B", ActiveWriter("B", 0.0))
    await put(
        "w1-1",
        "w1",
        "A",
        StepOutcome("w1", 1, "execute", True, raw(b'"a1"')),
    )
    await put("w1-r", "w1", "A", WorkflowResult("w1", raw(b'"a"'), False, 0.0))
    await put(
        "w2",
        "w2",
        "A",
        WorkflowCreated("w2", "saga", raw(b'{"id":"w2"}'), 0),
    )
    return repo, at


@pytest.mark.parametrize("checkpoint", ["none", "before-claim", "window-across-claim"])
async def test_recovery_ignores_records_written_after_another_nodes_claim(checkpoint: str) -> None:
    repo, at = await _zombie_log()
    if checkpoint == "before-claim":
        # saved by A while w1 was open: recovery starts at w1 with A as the owner
        await repo.save_checkpoint(
            0,
            Checkpoint(at["w1"], "A", at["w1"], "A", anchor_offset=at["w1"], anchor_writer="A"),
        )
    elif checkpoint == "window-across-claim":
        # a (hand-made) checkpoint after everything, with ids to refill from the start:
        # the ids-only pass must skip the zombie WorkflowCreated of w2 as well
        end = len(repo.records(0))
        await repo.save_checkpoint(
            0,
            Checkpoint(end, "B", at["claim-a"], "", anchor_offset=at["claim-b"], anchor_writer="B"),
        )
    script = Script()
    async with Kapbit([saga(script)], repo, options=Options(node_id="C")) as c:
        if checkpoint != "window-across-claim":
            assert c.stats.recovered == 1
            result = await c.wait_result("w1", timeout=5)
            # resumed after step 0 (A's value), not after A's zombie step 1
            assert result["values"] == ["a0", "exec-1", "exec-2"]
            assert script.calls == [("w1", 1, "execute"), ("w1", 2, "execute")]
        # w2's WorkflowCreated is a zombie: w2 does not exist, its id is free
        assert (await c.exec_workflow("w2", "saga", {"id": "w2"}))["values"] == [
            "exec-0",
            "exec-1",
            "exec-2",
        ]
    if checkpoint != "window-across-claim":
        check_history("w1", histories(repo)["w1"], steps=3, compensable={0, 1, 2})
    check_history("w2", histories(repo)["w2"], steps=3, compensable={0, 1, 2})


async def test_takeover_while_workflows_run_on_the_first_instance() -> None:
    """40 workflows (half of them compensating) interleave on A; B starts in the middle
    of it. Every workflow ends exactly once in the live log, with the result any caller
    got; A stops on its first write after B's claim; nothing A wrote after it counts."""
    journal: list[tuple[Any, ...]] = []
    repo = CrashRepository(partitions=2, journal=journal)
    ok, comp = YieldingScript(), YieldingScript({(2, "execute"): "fail"})
    ok.calls = comp.calls = journal  # one timeline of step calls and appends
    definitions = [saga(ok, name="ok"), saga(comp, name="comp")]
    ids = [(f"w{i}", "ok" if i % 2 else "comp") for i in range(40)]

    a = Kapbit(definitions, repo, options=Options(node_id="A"))
    b = Kapbit(definitions, repo, options=Options(node_id="B"))
    await a.start()
    # B starts when A makes its 10th append (which waits, then lands as a zombie write); B
    # reads the log before it claims, so A's workflows go on for a few loop turns meanwhile
    b_starting: list[asyncio.Task[None]] = []
    repo.hold(10, then=lambda: b_starting.append(asyncio.create_task(b.start())))
    on_a = {i: asyncio.create_task(a.exec_workflow(i, t, {"id": i})) for i, t in ids}
    await asyncio.wait_for(repo.held.wait(), 5)
    await b_starting[0]
    repo.release()
    assert b.stats.recovered > 10, "B should take over several workflows in flight"
    from_a = dict(
        zip(on_a, await asyncio.gather(*on_a.values(), return_exceptions=True), strict=True)
    )
    assert all(isinstance(r, dict | Fenced) for r in from_a.values()), from_a
    assert not a.is_running

    results: dict[str, Any] = {}
    for i, t in ids:
        if "workflow_created" not in [r.kind for r in live_records(repo) if r.key == i]:
            results[i] = await b.exec_workflow(i, t, {"id": i})  # A never created it
        elif isinstance(from_a[i], dict):
            results[i] = from_a[i]
        else:
            results[i] = await b.wait_result(i, timeout=5)
    await b.close()

    all_histories = histories(repo)
    for i, t in ids:
        check_history(i, all_histories[i], steps=3, compensable={0, 1, 2})
        assert _result_value(repo, i) == results[i]
        assert results[i]["compensated"] == ([] if t == "ok" else [1, 0])
    assert {z.node for z in _zombies(repo)} <= {a.writer_id}
    assert_no_step_reran_after_its_outcome(repo, journal)
    assert repo.checkpoint_errors == []


def test_owner_tracker_follows_claims_and_tells_zombies_apart() -> None:
    def rec(offset: int, kind: EventKind, node: str) -> Record:
        return Record(0, offset, kind, "k", node, b"")

    tracker = OwnerTracker("a")
    assert tracker.admit(rec(0, EventKind.STEP_OUTCOME, "a"))
    assert tracker.admit(rec(1, EventKind.ACTIVE_WRITER, "b"))
    assert not tracker.admit(rec(2, EventKind.STEP_OUTCOME, "a"))  # a zombie write
    assert tracker.admit(rec(3, EventKind.STEP_OUTCOME, "b"))
    tracker.claimed(4, "c")
    assert not tracker.admit(rec(5, EventKind.STEP_OUTCOME, "b"))
    assert [tracker.owner_at(o) for o in (0, 1, 2, 4, 5, 99)] == ["a", "a", "b", "b", "c", "c"]


@pytest.mark.parametrize(("first", "second"), [("node-a", "node-b"), ("node-z", "node-b")])
async def test_two_instances_starting_at_once_leave_exactly_one_owner(
    first: str, second: str
) -> None:
    """The claims interleave (first claims p0, second claims p0 and p1, first claims p1);
    whichever node id is greater keeps the whole log, the other refuses to start."""
    log = MemRepository(partitions=2)
    first_view, second_view = FaultyRepository(log), FaultyRepository(log)
    late_claim = first_view.slow(kinds="active_writer", partitions=[1])
    second_settles = second_view.slow(operations=("current_owner",), times=2)
    definition = saga(Script())
    a = Kapbit([definition], first_view, options=Options(node_id=first))
    b = Kapbit([definition], second_view, options=Options(node_id=second))

    a_start = asyncio.create_task(a.start())
    await late_claim.wait_hits(1)  # first has claimed p0 only
    b_start = asyncio.create_task(b.start())
    await second_settles.wait_hits(2)  # second has claimed both, not yet checked
    late_claim.release()  # first's claim of p1 lands after second's ...
    await wait_until(lambda: log.records(1)[-1].node == a.writer_id)
    second_settles.release()  # ... and before second checks its claims
    results = await asyncio.gather(a_start, b_start, return_exceptions=True)

    winner, loser = (a, b) if a.writer_id > b.writer_id else (b, a)
    loser_result = results[0] if loser is a else results[1]
    assert isinstance(loser_result, Fenced)
    assert winner.is_running and not loser.is_running
    assert [await log.current_owner(p) for p in range(2)] == [winner.writer_id] * 2
    try:
        # The winner writes to both partitions without being fenced.
        ids = ["w0", "w1", "w2", "w3", "w4", "w5"]
        assert {partition_for(i, 2) for i in ids} == {0, 1}
        for workflow_id in ids:
            await winner.exec_workflow(workflow_id, "saga", {"id": workflow_id})
        assert winner.stats.succeeded == len(ids)
    finally:
        await winner.close()


# --- the repository seam: claim() and append() ----------------------------------------------


@pytest.mark.parametrize("wrapped", [False, True])
async def test_append_refuses_a_claim_and_writes_nothing(wrapped: bool) -> None:
    mem = MemRepository()
    repo: MemRepository | FaultyRepository = FaultyRepository(mem) if wrapped else mem
    with pytest.raises(InvalidAppend, match="claim"):
        await repo.append(0, EventKind.ACTIVE_WRITER, "A", "A", b"")
    with pytest.raises(InvalidAppend, match="claim"):  # the kind's name, from untyped code
        await repo.append(0, "active_writer", "A", "A", b"")  # type: ignore[arg-type]
    with pytest.raises(InvalidAppend, match="'no_such_kind' is not an event kind"):
        await repo.append(0, "no_such_kind", "A", "A", b"")  # type: ignore[arg-type]
    assert mem.records() == []
    assert await repo.current_owner(0) == ""


async def test_append_takes_a_kinds_name_as_the_kind() -> None:
    repo = MemRepository()
    await repo.claim(0, "A", b"a")
    assert await repo.append(0, "step_outcome", "w", "A", b"") == 1  # type: ignore[arg-type]
    assert repo.records(0)[1].kind is EventKind.STEP_OUTCOME


async def test_claim_is_never_fenced_and_fences_every_other_writer() -> None:
    repo = MemRepository()
    assert await repo.claim(0, "A", b"a") == 0
    assert await repo.append(0, EventKind.STEP_OUTCOME, "w", "A", b"") == 1
    assert await repo.claim(0, "B", b"b") == 2  # B claims over A: not refused
    with pytest.raises(Fenced, match=r"'B' claimed partition 0.*'A' is fenced"):
        await repo.append(0, EventKind.STEP_OUTCOME, "w", "A", b"")
    assert await repo.claim(0, "A", b"a2") == 4  # A may claim back
    assert await repo.append(0, EventKind.STEP_OUTCOME, "w", "A", b"") == 5
    assert [r.kind for r in repo.records(0)] == [
        EventKind.ACTIVE_WRITER,
        EventKind.STEP_OUTCOME,
        EventKind.ACTIVE_WRITER,
        EventKind.STEP_OUTCOME,  # A's zombie write: it landed, and was refused
        EventKind.ACTIVE_WRITER,
        EventKind.STEP_OUTCOME,
    ]
    assert (repo.records(0)[0].key, repo.records(0)[0].node) == ("A", "A")


def test_the_repository_side_rule_is_the_reader_side_rule() -> None:
    """A record of A counts for readers exactly when no claim of another node lies
    between A's latest claim and it: what every backend confirms."""

    def rec(offset: int, kind: EventKind, node: str) -> Record:
        return Record(0, offset, kind, "k", node, b"")

    log = [
        rec(0, EventKind.ACTIVE_WRITER, "A"),
        rec(1, EventKind.STEP_OUTCOME, "A"),
        rec(2, EventKind.ACTIVE_WRITER, "A"),  # A's claim read again
        rec(3, EventKind.STEP_OUTCOME, "A"),
        rec(4, EventKind.ACTIVE_WRITER, "B"),
        rec(5, EventKind.STEP_OUTCOME, "A"),
    ]
    tracker = OwnerTracker("")
    for record in log:
        counts = tracker.admit(record)
        if is_claim(record):
            continue
        claim = max(r.offset for r in log[: record.offset] if is_claim(r) and r.node == "A")
        between = log[claim + 1 : record.offset]
        assert counts == (not any(displaces(r, record.node) for r in between)), record
    assert [is_claim(r) for r in log] == [True, False, True, False, True, False]


def test_records_are_not_tracked_by_the_garbage_collector() -> None:
    """A log holds millions of records: with an enum member as ``kind`` each would be
    tracked (and scanned by every full collection) unless ``Record`` opts out."""
    import gc

    record = Record(0, 0, EventKind.STEP_OUTCOME, "w", "n", b"v")
    assert not gc.is_tracked(record)
