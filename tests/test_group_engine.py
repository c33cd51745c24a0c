"""Group mode in the engine, driven by a ManualPlacement on the in-memory repository.

Each test says which partitions an instance gains and loses, in order, and checks what the
instance does: claims and recovers an assigned partition, stops writing to and drops a
revoked one (also while one of its steps runs), leaves a retained one alone (no read, no
claim, no re-run), is fenced on one partition only, and refuses ids it does not own with
NotOwner, writing nothing.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from kapbit import (
    Definition,
    DuplicateWorkflow,
    Fenced,
    GroupNotSupported,
    GroupOptions,
    InstanceClosed,
    JsonCodec,
    Kapbit,
    NotOwner,
    Options,
    Progress,
    Sleep,
    Step,
    Success,
    WorkflowRefused,
)
from kapbit.events import ActiveWriter, WorkflowResult
from kapbit.projection import WorkflowStatus
from kapbit.repository import MemRepository
from kapbit.request_log import MemRequestLog
from kapbit.testing import ManualClock, ManualPlacement, fast_options
from tests.helpers import check_history, gated_saga, histories, ids_in_partition, wait_until

PARTITIONS = 4


def _ids(partition: int, count: int = 2) -> list[str]:
    """``count`` workflow ids that hash to ``partition``."""
    return ids_in_partition(partition, count, PARTITIONS)


def _claims(repo: MemRepository, partition: int) -> list[str]:
    return [r.node for r in repo.records(partition) if r.kind == "active_writer"]


def _results(repo: MemRepository) -> dict[str, int]:
    counts: dict[str, int] = {}
    for workflow_id, events in histories(repo).items():
        counts[workflow_id] = sum(isinstance(e, WorkflowResult) for e in events)
    return counts


async def _member(
    repo: MemRepository,
    placement: ManualPlacement,
    calls: list[tuple[str, int]],
    release: asyncio.Event | None,
    node: str,
) -> Kapbit:
    kbit = Kapbit(
        [gated_saga(release, calls, tag=node)],
        repo,
        options=Options(node_id=node, close_timeout=0.5),
        group=placement,
    )
    await kbit.start()
    return kbit


async def test_group_options_on_a_repository_without_groups_is_a_typed_error() -> None:
    with pytest.raises(GroupNotSupported, match="MemRepository"):
        Kapbit([gated_saga(None, [])], MemRepository(), group=GroupOptions(name="g"))


async def test_assigned_partitions_are_claimed_and_others_refused_with_not_owner() -> None:
    repo = MemRepository(PARTITIONS)
    placement = ManualPlacement(endpoint="a:1")
    placement.change(assign=[0, 1], owners={2: "b:1", 3: "b:1"})
    calls: list[tuple[str, int]] = []
    kbit = await _member(repo, placement, calls, None, "A")
    try:
        assert [len(_claims(repo, p)) for p in range(PARTITIONS)] == [1, 1, 0, 0]
        mine, theirs = _ids(0)[0], _ids(2)[0]
        assert await kbit.exec_workflow(mine, "gated", {"id": mine}) == [
            mine,
            f"{mine}-0A",
            f"{mine}-1A",
            f"{mine}-2A",
        ]
        owner = kbit.owner_of(theirs)
        assert (owner.partition, owner.local, owner.endpoint) == (2, False, "b:1")
        assert kbit.owner_of(mine).local and kbit.owner_of(mine).endpoint == "a:1"
        before = len(repo.records())
        with pytest.raises(NotOwner, match=r"partition 2.*b:1") as refused:
            await kbit.exec_workflow(theirs, "gated", {"id": theirs})
        assert isinstance(refused.value, WorkflowRefused)
        assert (refused.value.partition, refused.value.endpoint) == (2, "b:1")
        with pytest.raises(NotOwner):
            await kbit.start_workflow(theirs, "gated", {"id": theirs})
        with pytest.raises(NotOwner):
            kbit.get_workflow(theirs)
        assert len(repo.records()) == before, "a refusal writes nothing"
    finally:
        await kbit.close()
    assert placement.closed


async def test_retained_partition_is_not_read_claimed_or_rerun() -> None:
    repo = MemRepository(PARTITIONS)
    placement = ManualPlacement(endpoint="a:1")
    placement.change(assign=[0, 1])
    calls: list[tuple[str, int]] = []
    release = asyncio.Event()
    kbit = await _member(repo, placement, calls, release, "A")
    try:
        wid = _ids(0)[0]
        running = asyncio.create_task(kbit.exec_workflow(wid, "gated", {"id": wid}))
        await wait_until(lambda: (wid, 1) in calls)
        records = len(repo.records())
        placement.change(assign=[2], revoke=[1])  # 0 retained, 1 revoked, 2 assigned
        await placement.applied()
        assert [len(_claims(repo, p)) for p in range(PARTITIONS)] == [1, 1, 1, 0]
        assert len(repo.records()) == records + 1, "only the claim of partition 2"
        release.set()
        assert (await running)[0] == wid
        assert calls.count((wid, 0)) == 1 and calls.count((wid, 1)) == 1
    finally:
        await kbit.close()


async def test_revoke_during_a_running_step_hands_the_workflow_over_exactly_once() -> None:
    """A runs a workflow of partition 1 into its step 1 and loses partition 1: its caller
    gets Fenced, A writes nothing more there. B is assigned partition 1, resumes the
    workflow from the log and finishes it; steps 0 is not run again."""
    repo = MemRepository(PARTITIONS)
    a_place, b_place = ManualPlacement("a:1"), ManualPlacement("b:1")
    a_place.change(assign=[0, 1, 2, 3])
    b_place.change(assign=[], owners={p: "a:1" for p in range(PARTITIONS)})
    a_calls: list[tuple[str, int]] = []
    b_calls: list[tuple[str, int]] = []
    hold = asyncio.Event()
    a = await _member(repo, a_place, a_calls, hold, "A")
    b = await _member(repo, b_place, b_calls, None, "B")
    try:
        wid = _ids(1)[0]
        running = asyncio.create_task(a.exec_workflow(wid, "gated", {"id": wid}))
        await wait_until(lambda: (wid, 1) in a_calls)
        a_place.change(revoke=[1], owners={1: "b:1"})
        await a_place.applied()
        with pytest.raises(Fenced, match="partition 1 was handed"):
            await running
        assert a.in_flight() == []
        with pytest.raises(NotOwner, match="b:1"):
            await a.exec_workflow(_ids(1)[1], "gated", {"id": _ids(1)[1]})
        written = len(repo.records(1))
        hold.set()  # A's abandoned step returns: nothing of it may be written
        await asyncio.sleep(0)
        assert len(repo.records(1)) == written
        b_place.change(assign=[1], owners={p: "a:1" for p in (0, 2, 3)})
        await b_place.applied()
        handle = b.get_workflow(wid)
        assert (await handle.result())[0] == wid
        assert (wid, 0) not in b_calls and b_calls == [(wid, 1), (wid, 2)]
        check_history(wid, histories(repo)[wid], steps=3, compensable=range(3))
        assert _results(repo) == {wid: 1}
        assert _claims(repo, 1) == [a.writer_id, b.writer_id]
    finally:
        await b.close()
        await a.close()


@pytest.mark.parametrize("forwarding", [True, False], ids=["request-log", "no-request-log"])
async def test_a_handle_kept_while_its_partition_moved_follows_the_workflow(
    forwarding: bool,
) -> None:
    """A's handles of a workflow of partition 0 (from start_workflow and get_workflow) are
    asked for the result after partition 0 moved to B, which finished the workflow: with a
    request log they return B's result, without one they refuse with NotOwner. They used
    to raise WorkflowNotFound, as if the workflow did not exist."""
    repo = MemRepository(PARTITIONS)
    requests = MemRequestLog(PARTITIONS) if forwarding else None
    a_place, b_place = ManualPlacement("a:1"), ManualPlacement("b:1")
    a_place.change(assign=range(PARTITIONS))
    calls: list[tuple[str, int]] = []
    hold = asyncio.Event()
    members = []
    for node, placement in (("A", a_place), ("B", b_place)):
        kbit = Kapbit(
            [gated_saga(hold, calls)],
            repo,
            options=Options(node_id=node, close_timeout=0.5),
            group=placement,
            requests=requests,
        )
        members.append(kbit)
    a, b = members
    await a.start()
    try:
        wid = _ids(0)[0]
        started = await a.start_workflow(wid, "gated", {"id": wid})
        got = a.get_workflow(wid)
        a_place.change(revoke=[0], owners={0: "b:1"})
        await a_place.applied()
        b_place.change(assign=[0], owners={p: "a:1" for p in range(1, PARTITIONS)})
        await b.start()
        hold.set()
        expected = await b.get_workflow(wid).result(timeout=5)
        for handle in (started, got):
            if forwarding:
                assert await asyncio.wait_for(handle.result(), 5) == expected
                assert await handle.status() is WorkflowStatus.SUCCEEDED
            else:
                with pytest.raises(NotOwner, match="b:1"):
                    await handle.result()
        assert _results(repo) == {wid: 1}
    finally:
        await b.close()
        await a.close()


async def test_a_foreign_claim_fences_one_partition_only() -> None:
    """Another writer claims partition 0 behind the group's back: A's next write there is
    fenced and A gives up partition 0 alone; partition 1 keeps working."""
    repo = MemRepository(PARTITIONS)
    placement = ManualPlacement("a:1")
    placement.change(assign=[0, 1])
    calls: list[tuple[str, int]] = []
    release = asyncio.Event()
    kbit = await _member(repo, placement, calls, release, "A")
    try:
        wid0, wid1 = _ids(0)[0], _ids(1)[0]
        lost = asyncio.create_task(kbit.exec_workflow(wid0, "gated", {"id": wid0}))
        await wait_until(lambda: (wid0, 1) in calls)
        claim = JsonCodec().encode(ActiveWriter("intruder", 0.0))
        await repo.claim(0, "intruder", claim)
        release.set()
        with pytest.raises(Fenced):
            await lost
        await wait_until(lambda: not kbit.owner_of(wid0).local)
        assert kbit.is_running
        assert (await kbit.exec_workflow(wid1, "gated", {"id": wid1}))[0] == wid1
        with pytest.raises(NotOwner):
            await kbit.exec_workflow(_ids(0)[1], "gated", {"id": _ids(0)[1]})
        # the group still assigns 0 (a retained partition the log took): claimed again
        placement.change(assign=[2])
        await placement.applied()
        assert kbit.owner_of(wid0).local
        assert _claims(repo, 0) == [kbit.writer_id, "intruder", kbit.writer_id]
        # the workflow the intruder's claim cut off is resumed and finished once
        await wait_until(lambda: _results(repo).get(wid0) == 1)
    finally:
        await kbit.close()


async def test_reassigned_after_revoke_recovers_from_the_log() -> None:
    """A loses partition 2 with a workflow open and gets it back later: it claims again,
    reads what it had written (the window knows the id) and finishes the workflow."""
    repo = MemRepository(PARTITIONS)
    placement = ManualPlacement("a:1")
    placement.change(assign=[2])
    calls: list[tuple[str, int]] = []
    release = asyncio.Event()
    kbit = await _member(repo, placement, calls, release, "A")
    try:
        done_id, open_id = _ids(2)
        release.set()
        await kbit.exec_workflow(done_id, "gated", {"id": done_id})
        release.clear()
        running = asyncio.create_task(kbit.exec_workflow(open_id, "gated", {"id": open_id}))
        await wait_until(lambda: (open_id, 1) in calls)
        placement.change(revoke=[2])
        await placement.applied()
        with pytest.raises(Fenced):
            await running
        release.set()
        placement.change(assign=[2])
        await placement.applied()
        assert _claims(repo, 2) == [kbit.writer_id, kbit.writer_id]
        assert (await kbit.get_workflow(open_id).result())[0] == open_id
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow(done_id, "gated", {"id": done_id})
        assert _results(repo) == {done_id: 1, open_id: 1}
    finally:
        await kbit.close()


async def test_abort_writes_nothing_more_and_leaves_the_placement() -> None:
    """A crash on purpose: the workflow stays open in the log, the placement is left (so
    the others take over), and a second member assigned the partition finishes it once."""
    repo = MemRepository(PARTITIONS)
    a_place, b_place = ManualPlacement("a:1"), ManualPlacement("b:1")
    a_place.change(assign=[3])
    b_place.change(assign=[0, 1, 2])
    calls: list[tuple[str, int]] = []
    hold = asyncio.Event()
    a = await _member(repo, a_place, calls, hold, "A")
    b = await _member(repo, b_place, calls, None, "B")
    try:
        wid = _ids(3)[0]
        running = asyncio.create_task(a.exec_workflow(wid, "gated", {"id": wid}))
        await wait_until(lambda: (wid, 1) in calls)
        written = len(repo.records(3))
        a.abort()
        await wait_until(lambda: a_place.closed)
        hold.set()
        with pytest.raises(InstanceClosed, match="next instance resumes it"):
            await running
        assert len(repo.records(3)) == written
        b_place.change(assign=[3])
        await b_place.applied()
        assert (await b.get_workflow(wid).result())[0] == wid
        assert _results(repo) == {wid: 1}
    finally:
        await b.close()
        await a.close()


async def test_owned_partitions_follows_the_placement_and_is_empty_once_closed() -> None:
    """The public view of the owned partitions: what was claimed, not what was revoked;
    every partition outside group mode; nothing once closed."""
    repo = MemRepository(PARTITIONS)
    placement = ManualPlacement("a:1")
    placement.change(assign=[0, 1])
    kbit = await _member(repo, placement, [], None, "A")
    try:
        assert kbit.owned_partitions == frozenset({0, 1})
        placement.change(assign=[3], revoke=[0])
        await placement.applied()
        assert kbit.owned_partitions == frozenset({1, 3})
    finally:
        await kbit.close()
    assert kbit.owned_partitions == frozenset()
    single = Kapbit([gated_saga(None, [])], MemRepository(PARTITIONS))
    assert single.owned_partitions == frozenset()
    async with single:
        assert single.owned_partitions == frozenset(range(PARTITIONS))


async def _napping_member(
    entered: asyncio.Event, cancelled: asyncio.Event
) -> tuple[ManualClock, ManualPlacement, Definition[str, str, list[str]], Kapbit]:
    """A started member "A" owning every partition, on a manual clock, of a workflow that
    sleeps an hour, then runs a step that sets ``entered`` and waits until it is
    cancelled (then it sets ``cancelled``)."""
    clock = ManualClock(datetime(2026, 11, 21, tzinfo=UTC))
    placement = ManualPlacement("a:1")
    placement.change(assign=list(range(PARTITIONS)))

    async def nap(_: str, __: Progress) -> Sleep[str]:
        return Sleep(timedelta(hours=1), value="napped")

    async def after(_: str, __: Progress) -> Success[str]:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Success("never")

    definition = Definition(
        "napper", steps=[Step(nap), Step(after)], input_type=str, outcome_type=str
    )
    kbit = Kapbit(
        [definition],
        MemRepository(PARTITIONS),
        options=fast_options(clock=clock, node_id="A", close_timeout=0.5),
        group=placement,
    )
    await kbit.start()
    return clock, placement, definition, kbit


async def test_a_workflow_woken_from_sleep_is_stopped_when_its_partition_is_revoked() -> None:
    """A workflow sleeps on A, its timer fires and its next step runs; A then loses the
    partition: the step's task is cancelled (as for any running workflow), not left to
    run on beside the new owner."""
    entered, cancelled = asyncio.Event(), asyncio.Event()
    clock, placement, definition, kbit = await _napping_member(entered, cancelled)
    try:
        wid = _ids(1)[0]
        handle = await kbit.start_workflow(definition, wid, wid)
        await wait_until(lambda: kbit.stats.sleeping == 1)
        clock.advance(3600)
        await asyncio.wait_for(entered.wait(), 5)
        placement.change(revoke=[1], owners={1: "b:1"})
        await placement.applied()
        await asyncio.wait_for(cancelled.wait(), 5)
        with pytest.raises(NotOwner, match="b:1"):  # the handle follows the workflow there
            await asyncio.wait_for(handle.result(), 5)
        assert kbit.in_flight() == []
    finally:
        await kbit.close()


@pytest.mark.parametrize("when", ["asleep", "woken"])
async def test_an_exec_waiting_through_a_sleep_hears_fenced_when_its_partition_is_revoked(
    when: str,
) -> None:
    """The caller of exec_workflow waits through the timer; the partition is handed to
    another instance while the workflow sleeps, or once its next step runs: the caller
    raises Fenced (the new owner finishes it), it does not wait for ever."""
    entered = asyncio.Event()
    clock, placement, definition, kbit = await _napping_member(entered, asyncio.Event())
    try:
        wid = _ids(1, 1)[0]
        call = asyncio.create_task(kbit.exec_workflow(definition, wid, wid))
        await wait_until(lambda: kbit.stats.sleeping == 1)
        if when == "woken":
            clock.advance(3600)
            await asyncio.wait_for(entered.wait(), 5)
        placement.change(revoke=[1], owners={1: "b:1"})
        await placement.applied()
        with pytest.raises(Fenced, match="handed to another instance"):
            await asyncio.wait_for(call, 5)
    finally:
        await kbit.close()
