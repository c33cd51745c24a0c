"""The reader that takes snapshots, on the in-memory repository.

It takes what this instance appended and claimed (and had acknowledged) from the journal
the emitter writes through, and reads from the log only what that leaves out: a first
copy whose acknowledgement was lost, a zombie's write. Whatever it was fed from, the snapshot
is the state a reader from the log's start builds. In group mode each owned partition is
followed from its recovery on and given up with the partition: a save under way when the
partition is revoked stores nothing for it, so the new owner's snapshot stays the one named.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from kapbit import CheckpointPolicy, Fenced, JsonCodec, Kapbit, Options
from kapbit.events import EventKind, StepOutcome
from kapbit.log_reader import PartitionReader, ReaderState
from kapbit.repository import Checkpoint, MemRepository, Repository
from kapbit.snapshots import load_snapshot
from kapbit.testing import FaultyRepository, ManualPlacement
from tests.helpers import CrashRepository, gated_saga, ids_in_partition, wait_until

NEVER = 3600.0
WINDOW = 5
PARTITIONS = 4
CODEC = JsonCodec()


def _options(node: str, **policy: Any) -> Options:
    policy.setdefault("every", 10**6)
    policy.setdefault("interval", NEVER)
    policy.setdefault("snapshot_after", 0)  # followed all the time: the reader's rules
    return Options(
        node_id=node,
        idempotency_window=WINDOW,
        close_timeout=0.5,
        checkpoints=CheckpointPolicy(**policy),
    )


def _ids(partition: int, count: int, prefix: str = "w") -> list[str]:
    """``count`` workflow ids that hash to ``partition`` of ``PARTITIONS``."""
    return ids_in_partition(partition, count, PARTITIONS, prefix)


async def _snapshot_state(repo: MemRepository, partition: int) -> tuple[Checkpoint, ReaderState]:
    checkpoint = (await repo.load_checkpoints())[partition]
    assert checkpoint.snapshot_offset >= 0, "no snapshot was saved"
    state = await load_snapshot(repo, CODEC, partition, checkpoint, WINDOW)
    assert state is not None
    return checkpoint, state


def _assert_as_read_from_the_start(repo: MemRepository, partition: int, state: ReaderState) -> None:
    """``state`` is what a reader from the log's start has built at ``state.offset``."""
    reader = PartitionReader(CODEC, partition, "", WINDOW)
    for record in repo.records(partition)[: state.offset]:
        reader.take(record)
    expected = reader.state(state.offset)
    assert state.owner == expected.owner
    assert state.window == expected.window
    assert state.open == expected.open


async def _with_s0_stuck(repo: Repository) -> tuple[Kapbit, asyncio.Task[Any]]:
    """A started instance "n" (``gated`` and ``slow`` sagas) whose workflow s0 waits in
    step 1 for good; the task of its ``exec_workflow`` call."""
    calls: list[tuple[str, int]] = []
    kbit = Kapbit(
        [gated_saga(None, calls), gated_saga(asyncio.Event(), calls, name="slow")],
        repo,
        options=_options("n"),
    )
    await kbit.start()
    stuck = asyncio.create_task(kbit.exec_workflow("s0", "slow", {"id": "s0"}))
    await wait_until(lambda: ("s0", 1) in calls)
    return kbit, stuck


async def test_the_snapshot_reader_reads_from_the_log_only_what_this_instance_did_not_append() -> (
    None
):
    """Before the journal it read back every record this instance had written."""
    repo = CrashRepository()
    kbit, stuck = await _with_s0_stuck(repo)
    for i in range(200):
        await kbit.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
    repo.reset_counters()
    await kbit.close(timeout=0)  # the last save takes a snapshot of the whole log
    await asyncio.gather(stuck, return_exceptions=True)
    checkpoint, state = await _snapshot_state(repo, 0)
    assert checkpoint.snapshot_offset == len(repo.records(0)) > 1000
    assert repo.records_read[0] == 0  # its claim and appends came from the journal
    assert [w.id for w in state.open] == ["s0"]
    _assert_as_read_from_the_start(repo, 0, state)
    assert repo.checkpoint_errors == []


async def test_a_lost_acknowledgement_and_a_zombie_write_are_read_from_the_log() -> None:
    """A first copy whose acknowledgement was lost and a zombie's record are not in the
    journal: the reader reads them from the log, and the snapshot is the log's state (the
    copy is not a second workflow, the zombie's outcome is not q0's)."""
    inner = CrashRepository()
    faulty = FaultyRepository(inner)
    lost = faulty.fail(
        times=1, kinds="workflow_created", lost_ack=True, when=lambda c: c.key == "q3"
    )
    kbit, stuck = await _with_s0_stuck(faulty)
    for i in range(6):
        await kbit.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
    assert lost.hits == 1
    value = msgspec.Raw(CODEC.encode("zombie"))
    zombie = CODEC.encode(StepOutcome("s0", 1, "execute", True, value))
    with pytest.raises(Fenced):
        await inner.append(0, EventKind.STEP_OUTCOME, "s0", "zombie", zombie)
    await kbit.exec_workflow("q6", "gated", {"id": "q6"})
    inner.reset_counters()
    await kbit.close(timeout=0)
    await asyncio.gather(stuck, return_exceptions=True)
    records = inner.records(0)
    assert [r.offset for r in records if r.key == "q3" and r.kind == "workflow_created"][1:]
    checkpoint, state = await _snapshot_state(inner, 0)
    assert checkpoint.snapshot_offset == len(records)
    assert 2 <= inner.records_read[0] < len(records) // 2  # the lost copy, the zombie
    (s0,) = state.open
    assert [(offset, o.step) for offset, o in s0.outcomes] == [
        (offset, o.step) for offset, o in s0.outcomes if records[offset].node != "zombie"
    ]
    assert len(s0.outcomes) == 1  # step 0 only: the zombie's step 1 does not count
    _assert_as_read_from_the_start(inner, 0, state)


def _whole(repo: CrashRepository, partition: int) -> bool:
    """Whether a checkpoint with a snapshot of the whole partition was saved."""
    end = len(repo.records(partition))
    return any(p == partition and c.snapshot_offset == end for p, c in repo.saves)


def _ends(repo: MemRepository, partition: int, workflow_id: str) -> int:
    """How many results of ``workflow_id`` its partition holds."""
    return sum(
        r.key == workflow_id and r.kind == EventKind.WORKFLOW_RESULT
        for r in repo.records(partition)
    )


async def _member(
    repo: Any,
    placement: ManualPlacement,
    node: str,
    calls: list[tuple[str, int]],
    release: asyncio.Event | None = None,
    **policy: Any,
) -> Kapbit:
    """A group member whose ``slow`` workflows wait in step 1 for ``release``."""
    kbit = Kapbit(
        [gated_saga(None, calls, tag=node), gated_saga(release, calls, name="slow")],
        repo,
        options=_options(node, **policy),
        group=placement,
    )
    await kbit.start()
    return kbit


async def test_group_mode_snapshots_owned_partitions_and_a_new_owner_recovers_from_them() -> None:
    """A owns every partition and snapshots them past an open workflow; partition 1 goes
    to B, which recovers it from A's snapshot (reading the anchor record only), resumes
    the open workflow once, then follows partition 1 and snapshots it itself; A saves
    nothing for partition 1 after giving it up."""
    repo = CrashRepository(PARTITIONS)
    a_place, b_place = ManualPlacement("a:1"), ManualPlacement("b:1")
    a_place.change(assign=range(PARTITIONS))
    b_place.change(owners={p: "a:1" for p in range(PARTITIONS)})
    a_calls: list[tuple[str, int]] = []
    b_calls: list[tuple[str, int]] = []
    a = await _member(repo, a_place, "A", a_calls, asyncio.Event(), every=1)
    b = await _member(repo, b_place, "B", b_calls, every=1)
    try:
        (slow,) = _ids(1, 1, "slow")
        stuck = asyncio.create_task(a.exec_workflow(slow, "slow", {"id": slow}))
        await wait_until(lambda: (slow, 1) in a_calls)
        for wid in [w for p in range(PARTITIONS) for w in _ids(p, 8)]:
            await a.exec_workflow(wid, "gated", {"id": wid})
        await wait_until(lambda: all(_whole(repo, p) for p in range(PARTITIONS)))
        _, state = await _snapshot_state(repo, 1)
        assert [w.id for w in state.open] == [slow]
        _assert_as_read_from_the_start(repo, 1, state)

        a_place.change(revoke=[1], owners={1: "b:1"})
        await a_place.applied()
        with pytest.raises(Fenced):
            await stuck
        revoked_at = len(repo.saves)
        repo.reset_counters()
        b_place.change(assign=[1], owners={p: "a:1" for p in (0, 2, 3)})
        await b_place.applied()
        # the anchor and the codec probe (the same record); B's snapshot reader takes B's
        # claim from the journal
        assert repo.records_read[1] == 2 < 30 < len(repo.records(1))
        await wait_until(lambda: _ends(repo, 1, slow) == 1)
        assert b_calls == [(slow, 1), (slow, 2)]  # resumed once, after its step 0
        for wid in _ids(1, 4, "b"):
            await b.exec_workflow(wid, "gated", {"id": wid})
        await wait_until(lambda: _whole(repo, 1))
        assert {c.anchor_writer for p, c in repo.saves[revoked_at:] if p == 1} == {b.writer_id}
        _, state = await _snapshot_state(repo, 1)
        assert state.open == [] and state.owner == b.writer_id
        _assert_as_read_from_the_start(repo, 1, state)
    finally:
        await b.close()
        await a.close()
    assert repo.checkpoint_errors == []


async def test_a_save_under_way_when_the_partition_is_revoked_stores_nothing_for_it() -> None:
    """A's snapshot of partition 2 is being written when the partition goes to B; B saves
    its own checkpoint and snapshot; A's save then goes on: it stores no checkpoint for
    partition 2, so the new owner's snapshot stays the one named."""
    inner = CrashRepository(PARTITIONS)
    faulty = FaultyRepository(inner)
    a_place, b_place = ManualPlacement("a:1"), ManualPlacement("b:1")
    a_place.change(assign=range(PARTITIONS))
    b_place.change(owners={p: "a:1" for p in range(PARTITIONS)})
    calls: list[tuple[str, int]] = []
    a = await _member(faulty, a_place, "A", calls, every=1)
    b = await _member(inner, b_place, "B", calls, every=1)
    try:
        first, *others = _ids(2, 4)
        await a.exec_workflow(first, "gated", {"id": first})
        await wait_until(lambda: any(p == 2 and c.snapshot_offset > 0 for p, c in inner.saves))
        held = faulty.slow(times=1, operations=("save_snapshot_chunk",), partitions=[2])
        await a.exec_workflow(others[0], "gated", {"id": others[0]})
        await held.wait_hits()
        a_place.change(revoke=[2], owners={2: "b:1"})
        await a_place.applied()
        revoked_at = len(inner.saves)
        b_place.change(assign=[2], owners={p: "a:1" for p in (0, 1, 3)})
        await b_place.applied()
        for wid in others[1:]:
            await b.exec_workflow(wid, "gated", {"id": wid})
        await wait_until(lambda: _whole(inner, 2))
        held.release()
        # A's save goes on with the other partitions: wait until it has passed them
        (wid3,) = _ids(3, 1, "after")
        await a.exec_workflow(wid3, "gated", {"id": wid3})
        await wait_until(lambda: _whole(inner, 3))
        assert {c.anchor_writer for p, c in inner.saves[revoked_at:] if p == 2} == {b.writer_id}
        checkpoint, state = await _snapshot_state(inner, 2)
        assert checkpoint.anchor_writer == b.writer_id
        _assert_as_read_from_the_start(inner, 2, state)
    finally:
        await b.close()
        await a.close()
    assert inner.checkpoint_errors == []
