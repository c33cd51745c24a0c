"""Snapshots only while they save recovery work, on the in-memory repository.

A partition is followed (the journal keeps its appends, a reader reads them) only while its
oldest open workflow lies ``CheckpointPolicy.snapshot_after`` records or more behind its
end. Otherwise the journal passes appends straight through and nothing is read. A save that
finds a resting partition pinned wakes its reader from the latest checkpoint (reading as
recovery reads: from there, not from the log's start) and writes a snapshot; once the pin
lifts the reader rests again, and the checkpoint drops a snapshot its offsets have passed.
A crash or a takeover at each of these moments loses nothing and runs no step twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from kapbit import CheckpointPolicy, DuplicateWorkflow, Fenced, Kapbit, Options
from kapbit.events import EventKind
from kapbit.repository import Checkpoint, MemRepository
from kapbit.snapshots import Journal
from kapbit.testing import FaultyRepository, ManualPlacement
from tests.helpers import CrashRepository, gated_saga, ids_in_partition, wait_until

NEVER = 3600.0
WINDOW = 5
AFTER = 100  # records: 20 finished workflows of the 3-step saga (5 records each)
RECORDS = 5  # per finished workflow


def _options(node: str, **policy: Any) -> Options:
    policy.setdefault("every", 10)
    policy.setdefault("interval", NEVER)
    policy.setdefault("snapshot_after", AFTER)
    return Options(
        node_id=node,
        idempotency_window=WINDOW,
        close_timeout=0.5,
        checkpoints=CheckpointPolicy(**policy),
    )


class Node:
    """An instance whose ``slow`` workflows wait in step 1 until ``release`` is set."""

    def __init__(
        self, repo: Any, name: str, group: ManualPlacement | None = None, **policy: Any
    ) -> None:
        self.calls: list[tuple[str, int]] = []
        self.release = asyncio.Event()
        self.kbit = Kapbit(
            [gated_saga(None, self.calls), gated_saga(self.release, self.calls, name="slow")],
            repo,
            options=_options(name, **policy),
            group=group,
        )
        self.stuck: list[asyncio.Task[Any]] = []

    async def finished(self, count: int, prefix: str) -> None:
        for i in range(count):
            await self.kbit.exec_workflow(f"{prefix}{i}", "gated", {"id": f"{prefix}{i}"})

    async def open(self, workflow_id: str) -> None:
        """Start a ``slow`` workflow and wait until it is stuck in step 1."""
        self.stuck.append(
            asyncio.create_task(self.kbit.exec_workflow(workflow_id, "slow", {"id": workflow_id}))
        )
        await wait_until(lambda: (workflow_id, 1) in self.calls)

    async def stop(self, *, crash: bool) -> None:
        if crash:
            self.kbit.abort()
        else:
            await self.kbit.close(timeout=0)
        await asyncio.gather(*self.stuck, return_exceptions=True)


def _latest(repo: CrashRepository, partition: int = 0) -> Checkpoint:
    return [c for p, c in repo.saves if p == partition][-1]


async def _resumes_once(repo: Any, workflow_ids: list[str], node: str = "next") -> Node:
    """A new instance on ``repo`` runs each open workflow on from step 1, once."""
    after = Node(repo, node)
    await after.kbit.start()
    after.release.set()
    for workflow_id in workflow_ids:
        result = await after.kbit.wait_result(workflow_id, timeout=5)
        assert result == [workflow_id, f"{workflow_id}-0", f"{workflow_id}-1", f"{workflow_id}-2"]
    assert sorted(after.calls) == sorted((w, s) for w in workflow_ids for s in (1, 2))
    return after


async def _pinned(repo: CrashRepository) -> Node:
    """A started node "first" with s0 open and 30 workflows finished after it: its
    partition pinned, and a snapshot past s0 saved."""
    node = Node(repo, "first")
    await node.kbit.start()
    await node.open("s0")
    await node.finished(30, "a")
    await wait_until(lambda: _latest(repo).snapshot_offset > AFTER)
    return node


async def test_an_unfollowed_partition_passes_appends_straight_through() -> None:
    """No coroutine of the journal's and nothing kept for a partition not followed; a
    followed one keeps each acknowledged append."""
    handed: list[Any] = []

    class Inner(MemRepository):
        def append(self, partition: int, kind: EventKind, key: str, node: str, value: bytes) -> Any:
            call = super().append(partition, kind, key, node, value)
            handed.append(call)
            return call

    journal = Journal(Inner(2))
    await journal.start()
    for partition in (0, 1):
        assert await journal.claim(partition, "n", b"{}") == 0
    call = journal.append(0, EventKind.WORKFLOW_CREATED, "a", "n", b"{}")
    assert call is handed[-1]  # the repository's own call, not one wrapping it
    assert await call == 1
    assert not journal.holding(0)
    held = journal.follow(1)  # from this node's claim on
    assert journal.holding(1) and list(held) == [0]
    offset = await journal.append(1, EventKind.WORKFLOW_CREATED, "b", "n", b"{}")
    assert list(held) == [0, offset] and held[offset].key == "b"
    journal.forget(1)
    assert journal.append(1, EventKind.WORKFLOW_CREATED, "c", "n", b"{}") is handed[-1]
    await handed[-1]
    assert list(held) == [0, offset]


async def test_a_partition_without_an_old_open_workflow_does_no_snapshot_work() -> None:
    repo = CrashRepository()
    node = Node(repo, "first")
    await node.kbit.start()
    repo.reset_counters()
    await node.finished(60, "q")
    await wait_until(lambda: len(repo.saves) >= 5)
    assert node.kbit.stats.snapshots_following == 0
    assert node.kbit.stats.snapshot_wakes == 0
    assert repo.records_read[0] == 0  # no reader re-reads the log
    assert repo.snapshot_chunks(0) == {}
    assert {c.snapshot_offset for _, c in repo.saves} == {-1}
    await node.stop(crash=False)
    assert repo.checkpoint_errors == []


async def test_an_old_open_workflow_wakes_the_reader_and_a_restart_reads_only_the_snapshot() -> (
    None
):
    """The reader wakes from the latest checkpoint (read from there, not from the log's
    start), the snapshot holds the open workflow, and the next start reads only the log
    after the snapshot."""
    repo = CrashRepository()
    node = Node(repo, "first")
    await node.kbit.start()
    await node.finished(60, "a")  # 300 records, none open
    await wait_until(lambda: len(repo.saves) >= 6)
    assert node.kbit.stats.snapshots_following == 0
    await node.open("s0")
    s0 = next(r.offset for r in repo.records(0) if r.key == "s0")
    repo.reset_counters()
    await node.finished(19, "b")  # 95 records past s0: not pinned yet
    await wait_until(lambda: len(repo.saves) >= 7)
    assert node.kbit.stats.snapshots_following == 0 and repo.records_read[0] == 0
    await node.finished(11, "c")
    await wait_until(lambda: node.kbit.stats.snapshot_wakes == 1)
    assert node.kbit.stats.snapshots_following == 1
    low = repo.lowest_read[0]
    assert low is not None and low >= s0 - WINDOW * RECORDS  # the window's ids, then s0 on
    await wait_until(lambda: _latest(repo).snapshot_offset > s0 + AFTER)
    assert node.kbit.stats.snapshot_bytes > 0
    await node.stop(crash=False)
    end = len(repo.records(0))
    assert _latest(repo).snapshot_offset == end

    repo.reset_counters()
    repo.garble_below[0] = end - 1  # decoding any record but the anchor fails
    after = await _resumes_once(repo, ["s0"])
    try:
        assert repo.records_read[0] == 2  # the anchor and the codec probe (the same record)
        assert after.kbit.stats.recovered == 1
        with pytest.raises(DuplicateWorkflow):
            await after.kbit.exec_workflow("c10", "gated", {"id": "c10"})
    finally:
        await after.stop(crash=False)
    assert repo.checkpoint_errors == []


async def test_the_reader_rests_once_the_pin_lifts_and_wakes_again_from_the_checkpoint() -> None:
    repo = CrashRepository()
    node = await _pinned(repo)
    assert node.kbit.stats.snapshots_following == 1
    pinned = _latest(repo)

    node.release.set()
    await node.kbit.wait_result("s0", timeout=5)
    await node.finished(10, "b")  # the next save: nothing open, the pin lifted
    await wait_until(lambda: _latest(repo).offset > pinned.snapshot_offset)
    rested = _latest(repo)
    assert node.kbit.stats.snapshots_following == 0
    assert rested.snapshot_offset == -1  # its offsets passed the snapshot: dropped ...
    assert repo.snapshot_chunks(0) == {}  # ... and deleted
    assert node.kbit.stats.snapshot_bytes == 0

    node.release.clear()
    await node.open("s1")
    s1 = next(r.offset for r in repo.records(0) if r.key == "s1")
    repo.reset_counters()
    await node.finished(30, "c")
    await wait_until(lambda: node.kbit.stats.snapshot_wakes == 2)
    low = repo.lowest_read[0]  # from the latest checkpoint: past the earlier snapshot
    assert low is not None and low > pinned.snapshot_offset and s1 > pinned.snapshot_offset
    await wait_until(lambda: _latest(repo).snapshot_offset > s1 + AFTER)
    await node.stop(crash=True)
    after = await _resumes_once(repo, ["s1"])
    await after.stop(crash=False)
    assert repo.checkpoint_errors == []


async def test_a_crash_while_pinned_before_any_snapshot_follows_from_the_next_start() -> None:
    """No save between the pin and the crash: the next start recovers from the offsets,
    finds the partition pinned and follows it from its recovered state (no wake, nothing
    read again): its close writes the snapshot."""
    repo = CrashRepository()
    node = Node(repo, "first", every=10**6)
    await node.kbit.start()
    await node.open("s0")
    await node.finished(30, "a")
    await node.stop(crash=True)
    assert repo.saves == []

    after = Node(repo, "second", every=10**6)
    await after.kbit.start()
    assert after.kbit.stats.snapshots_following == 1
    repo.reset_counters()
    await after.stop(crash=False)  # s0 stays stuck: its release is not set
    assert after.kbit.stats.snapshot_wakes == 0
    assert repo.records_read[0] == 0
    assert _latest(repo).snapshot_offset == len(repo.records(0))
    third = await _resumes_once(repo, ["s0"], "third")
    await third.stop(crash=False)
    assert repo.checkpoint_errors == []


@pytest.mark.parametrize("fault", ["crash", "storage error"])
async def test_a_wake_that_does_not_finish_loses_nothing(fault: str) -> None:
    """The wake's read is cut: by a crash (the previous checkpoint, offsets only, stays
    and the next start recovers from it), or by a storage error (the save fails, the
    partition is not left half-followed, and the next save wakes it)."""
    inner = CrashRepository()
    faulty = FaultyRepository(inner)
    node = Node(faulty, "first")
    await node.kbit.start()
    await node.open("s0")
    await node.finished(10, "a")
    await wait_until(lambda: len(inner.saves) == 1)
    before = _latest(inner)
    if fault == "crash":
        cut = faulty.slow(operations=("read",))
    else:
        cut = faulty.fail(operations=("read",))  # until released
    await node.finished(20, "b")
    await wait_until(lambda: cut.hits > 0)
    if fault == "crash":
        await node.stop(crash=True)
        cut.release()
        assert _latest(inner) == before and inner.snapshot_chunks(0) == {}
    else:
        assert node.kbit.stats.snapshots_following == 0  # not left half-followed
        assert node.kbit.stats.snapshot_wakes == 0
        cut.release()
        await node.finished(10, "c")  # the next save wakes it
        await wait_until(lambda: node.kbit.stats.snapshot_wakes == 1)
        await wait_until(lambda: _latest(inner).snapshot_offset > AFTER)
        await node.stop(crash=True)
    after = await _resumes_once(inner, ["s0"])
    await after.stop(crash=False)
    assert inner.checkpoint_errors == []


async def test_a_crash_after_the_reader_rested_recovers_from_the_offsets() -> None:
    repo = CrashRepository()
    node = await _pinned(repo)
    node.release.set()
    await node.kbit.wait_result("s0", timeout=5)
    node.release.clear()
    await node.open("s1")  # open, but recent: nothing pinned
    await node.finished(12, "b")
    await wait_until(lambda: node.kbit.stats.snapshots_following == 0)
    await node.stop(crash=True)
    rested = _latest(repo)
    assert rested.snapshot_offset == -1 and repo.snapshot_chunks(0) == {}
    repo.reset_counters()
    after = await _resumes_once(repo, ["s1"])
    try:
        assert repo.lowest_read[0] == rested.window_offset
        with pytest.raises(DuplicateWorkflow):
            await after.kbit.exec_workflow("b11", "gated", {"id": "b11"})
    finally:
        await after.stop(crash=False)
    assert repo.checkpoint_errors == []


async def test_a_takeover_while_pinned_follows_from_the_new_owners_recovery() -> None:
    repo = CrashRepository()
    first = await _pinned(repo)
    second = Node(repo, "second")
    await second.kbit.start()  # while the first runs
    try:
        assert second.kbit.stats.snapshots_following == 1  # pinned by s0 from its recovery
        assert second.kbit.stats.snapshot_wakes == 0
        second.release.set()
        assert await second.kbit.wait_result("s0", timeout=5) == ["s0", "s0-0", "s0-1", "s0-2"]
        assert sorted(second.calls) == [("s0", 1), ("s0", 2)]
        with pytest.raises(Fenced):
            await first.kbit.exec_workflow("late", "gated", {"id": "late"})
    finally:
        await second.stop(crash=False)
        await first.stop(crash=True)
    latest = _latest(repo)  # the close's: nothing open, the first's snapshot dropped
    assert latest.anchor_writer == second.kbit.writer_id and latest.snapshot_offset == -1
    assert repo.checkpoint_errors == []


PARTITIONS = 4


async def _member(repo: Any, placement: ManualPlacement, name: str) -> Node:
    node = Node(repo, name, placement, snapshot_after=40)
    await node.kbit.start()
    return node


async def test_group_mode_follows_only_pinned_owned_partitions() -> None:
    """A owns every partition; only partition 1 holds an old open workflow, so only it is
    followed and snapshotted. It goes to B, whose recovery finds it pinned and follows it;
    a wake under way on A when the partition is revoked installs nothing."""
    inner = CrashRepository(PARTITIONS)
    faulty = FaultyRepository(inner)
    a_place, b_place = ManualPlacement("a:1"), ManualPlacement("b:1")
    a_place.change(assign=range(PARTITIONS))
    b_place.change(owners={p: "a:1" for p in range(PARTITIONS)})
    a = await _member(faulty, a_place, "A")
    b = await _member(inner, b_place, "B")
    try:
        (slow,) = ids_in_partition(1, 1, PARTITIONS, "slow")
        await a.open(slow)
        cut = faulty.slow(operations=("read",), partitions=[1])  # A's wake of partition 1
        for wid in [w for p in range(PARTITIONS) for w in ids_in_partition(p, 12, PARTITIONS)]:
            await a.kbit.exec_workflow(wid, "gated", {"id": wid})
        await wait_until(lambda: cut.hits > 0)
        assert a.kbit.stats.snapshots_following == 0
        a_place.change(revoke=[1], owners={1: "b:1"})
        await a_place.applied()
        cut.release()
        revoked_at = len(inner.saves)
        (other,) = ids_in_partition(0, 1, PARTITIONS, "other")
        await a.kbit.exec_workflow(other, "gated", {"id": other})  # A saves again
        await wait_until(lambda: len(inner.saves) > revoked_at)
        assert a.kbit.stats.snapshots_following == 0 and a.kbit.stats.snapshot_wakes == 0
        assert {p for p, c in inner.saves if c.snapshot_offset >= 0} == set()
        assert 1 not in {p for p, _ in inner.saves[revoked_at:]}

        b_place.change(assign=[1], owners={p: "a:1" for p in (0, 2, 3)})
        await b_place.applied()
        assert b.kbit.stats.snapshots_following == 1  # pinned from its recovery on
        await b.kbit.close(timeout=0)
        assert _latest(inner, 1).snapshot_offset == len(inner.records(1))
        assert _latest(inner, 1).anchor_writer == b.kbit.writer_id
    finally:
        await b.stop(crash=False)
        await a.stop(crash=False)
    assert inner.checkpoint_errors == []


async def test_a_snapshot_below_its_checkpoints_offset_is_not_loaded() -> None:
    """A checkpoint of an earlier version could name a snapshot its offsets had passed (the
    last one that fitted under the limit): recovery reads from the offsets (ids only below
    them) instead of decoding everything from the old snapshot on."""
    repo = CrashRepository()
    node = Node(repo, "first", every=10**6)
    await node.kbit.start()
    await node.open("s0")
    await node.finished(30, "a")
    await node.kbit.close(timeout=0)  # a snapshot past s0
    await asyncio.gather(*node.stuck, return_exceptions=True)
    pinned = _latest(repo)
    assert 0 < pinned.offset < pinned.snapshot_offset

    node = Node(repo, "second", every=10**6)
    await node.kbit.start()
    node.release.set()
    await node.kbit.wait_result("s0", timeout=5)
    await node.finished(30, "b")
    await node.stop(crash=True)  # nothing open below the end, no save since the snapshot
    end = len(repo.records(0))
    passed = msgspec.structs.replace(pinned, offset=end, owner=node.kbit.writer_id)
    await repo.save_checkpoint(0, passed)  # offsets past the snapshot it still names

    repo.reset_counters()
    repo.garble_below[0] = end - 1  # decoding a record below the end fails
    after = Node(repo, "third")
    await after.kbit.start()
    try:
        assert after.kbit.stats.recovered == 0
        assert repo.lowest_read[0] == pinned.window_offset < pinned.snapshot_offset
        with pytest.raises(DuplicateWorkflow):
            await after.kbit.exec_workflow("b29", "gated", {"id": "b29"})
    finally:
        await after.stop(crash=False)
    assert repo.checkpoint_errors == []
