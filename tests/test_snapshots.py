"""Snapshot checkpoints on the in-memory repository: recovery reads the snapshot plus the
log after it; a crash between a snapshot's chunks and its checkpoint loses nothing;
replaced chunks are deleted; a snapshot over the limit, damaged, of a smaller window or
of an older version is not used and recovery falls back to the checkpoint's offsets."""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import Any

import msgspec
import pytest

from kapbit import CheckpointPolicy, CodecMismatch, DuplicateWorkflow, Kapbit, MsgpackCodec, Options
from kapbit.repository import Checkpoint, MemRepository
from kapbit.testing import FaultyRepository
from tests.helpers import CrashRepository, gated_saga, wait_until

NEVER = 3600.0


def other_slot(slot: str) -> str:
    """The other slot of the start that wrote into ``slot``."""
    return slot[:-1] + ("1" if slot.endswith("0") else "0")


def _options(node: str, window: int = 5, **policy: Any) -> Options:
    policy.setdefault("every", 10**6)
    policy.setdefault("interval", NEVER)
    policy.setdefault("snapshot_after", 0)  # a snapshot at every save: its mechanics
    return Options(node_id=node, idempotency_window=window, checkpoints=CheckpointPolicy(**policy))


async def _open_then_finished(
    repo: Any, finished: int, *, window: int = 5, **policy: Any
) -> tuple[Kapbit, list[asyncio.Task[Any]]]:
    """An instance with workflows s0 and s1 open (blocked in step 1) at the log's start and
    ``finished`` workflows q0.. after them; it is returned running."""
    calls: list[tuple[str, int]] = []
    release = asyncio.Event()
    kbit = Kapbit(
        [gated_saga(None, calls), gated_saga(release, calls, name="slow")],
        repo,
        options=_options("first", window, **policy),
    )
    await kbit.start()
    stuck = [asyncio.create_task(kbit.exec_workflow(s, "slow", {"id": s})) for s in ("s0", "s1")]
    await wait_until(lambda: {("s0", 1), ("s1", 1)} <= set(calls))
    for i in range(finished):
        await kbit.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
    return kbit, stuck


async def _second(repo: Any, window: int = 5) -> tuple[Kapbit, list[tuple[str, int]]]:
    calls: list[tuple[str, int]] = []
    kbit = Kapbit(
        [gated_saga(None, calls), gated_saga(None, calls, name="slow")],
        repo,
        options=_options("second", window),
    )
    await kbit.start()
    return kbit, calls


async def _check_second(kbit: Kapbit, calls: list[tuple[str, int]], finished: int) -> None:
    """The second instance resumed s0 and s1 once, from step 1, and refuses the window's
    ids."""
    assert kbit.stats.recovered == 2
    assert await kbit.wait_result("s0", timeout=5) == ["s0", "s0-0", "s0-1", "s0-2"]
    assert await kbit.wait_result("s1", timeout=5) == ["s1", "s1-0", "s1-1", "s1-2"]
    assert sorted(calls) == [("s0", 1), ("s0", 2), ("s1", 1), ("s1", 2)]
    for i in range(finished - 5, finished):
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})


async def test_recovery_reads_the_snapshot_and_only_the_log_after_it() -> None:
    repo = CrashRepository()
    first, stuck = await _open_then_finished(repo, 300)
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    checkpoint = (await repo.load_checkpoints())[0]
    log_length = len(repo.records(0))
    assert checkpoint.snapshot_offset == log_length  # the close saved the whole log
    assert checkpoint.offset < 5  # its offsets stay at the oldest open workflow, s0
    assert first.stats.snapshot_bytes == checkpoint.snapshot_size > 0

    repo.reset_counters()
    # decoding any record but the last (read to check the anchor and the codec) fails
    repo.garble_below[0] = log_length - 1
    second, calls = await _second(repo)
    try:
        assert repo.lowest_read[0] == log_length - 1
        assert repo.records_read[0] == 2  # the anchor and the codec probe: the same record
        await _check_second(second, calls, 300)
    finally:
        await second.close()
    assert repo.checkpoint_errors == []


async def test_a_crash_between_the_chunks_and_the_checkpoint_keeps_the_previous_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = CrashRepository()
    faulty = FaultyRepository(inner)
    first, stuck = await _open_then_finished(faulty, 20, every=10, snapshot_chunk=64)
    await wait_until(lambda: inner.saves != [])
    await wait_until(lambda: inner.saves[-1][1].snapshot_offset > inner.records(0)[-1].offset)
    previous = (await inner.load_checkpoints())[0]
    assert previous.snapshot_chunks > 1
    live = {(previous.snapshot_slot, i) for i in range(previous.snapshot_chunks)}
    assert set(inner.snapshot_chunks(0)) == live

    # the next snapshot's chunks are written, its checkpoint never is: then the process dies
    fault = faulty.fail(operations=("save_checkpoint",))
    with caplog.at_level(logging.WARNING, "kapbit.checkpoints"):
        for i in range(20, 30):
            await first.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
        await wait_until(lambda: fault.hits > 0)
    first.abort()
    await asyncio.gather(*stuck, return_exceptions=True)
    assert (await inner.load_checkpoints())[0] == previous
    orphans = set(inner.snapshot_chunks(0)) - live
    assert orphans and {slot for slot, _ in orphans} == {other_slot(previous.snapshot_slot)}

    fault.release()
    second, calls = await _second(inner)
    try:
        await _check_second(second, calls, 30)
    finally:
        await second.close()
    latest = (await inner.load_checkpoints())[0]
    assert latest.snapshot_offset > previous.snapshot_offset
    # only the live snapshot's chunks are left: the replaced ones were deleted
    assert set(inner.snapshot_chunks(0)) == {
        (latest.snapshot_slot, i) for i in range(latest.snapshot_chunks)
    }
    assert inner.checkpoint_errors == []


async def test_a_snapshot_over_the_limit_is_not_written(caplog: pytest.LogCaptureFixture) -> None:
    repo = CrashRepository()
    with caplog.at_level(logging.WARNING, "kapbit.snapshots"):
        first, stuck = await _open_then_finished(repo, 30, snapshot_limit=200)
        await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    checkpoint = (await repo.load_checkpoints())[0]
    assert checkpoint.snapshot_offset == -1  # offsets only, as before snapshots
    assert first.stats.snapshots_too_large >= 1
    assert first.stats.snapshot_bytes == 0
    assert "over snapshot_limit=200" in caplog.text
    assert repo.snapshot_chunks(0) == {}
    second, calls = await _second(repo)
    try:
        assert repo.lowest_read[0] is not None and repo.lowest_read[0] <= checkpoint.offset
        await _check_second(second, calls, 30)
    finally:
        await second.close()


async def test_an_oversized_snapshot_leaves_the_last_one_that_fitted_named() -> None:
    repo = CrashRepository()
    first, stuck = await _open_then_finished(repo, 3, every=1, snapshot_limit=1500)
    named = (await repo.load_checkpoints())[0]
    assert named.snapshot_offset > 0
    for i in range(3, 40):  # the window of 5 ids soon stays full; long ids make it grow
        await first.exec_workflow(f"q{i}" + "x" * 200, "gated", {"id": f"q{i}"})
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    assert first.stats.snapshots_too_large > 0
    latest = (await repo.load_checkpoints())[0]
    assert latest.snapshot_offset < len(repo.records(0))  # an earlier snapshot, still true
    assert latest.snapshot_offset >= named.snapshot_offset
    calls: list[tuple[str, int]] = []
    second = Kapbit(
        [gated_saga(None, calls), gated_saga(None, calls, name="slow")],
        repo,
        options=_options("second"),
    )
    async with second:
        assert second.stats.recovered == 2
        assert await second.wait_result("s1", timeout=5) == ["s1", "s1-0", "s1-1", "s1-2"]
        with pytest.raises(DuplicateWorkflow):
            await second.exec_workflow("q39" + "x" * 200, "gated", {"id": "q39"})
    assert repo.checkpoint_errors == []


@pytest.mark.parametrize("damage", ["missing chunk", "changed chunk", "other version"])
async def test_a_snapshot_that_cannot_be_used_falls_back_to_the_offsets(
    damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    repo = CrashRepository()
    first, stuck = await _open_then_finished(repo, 60, snapshot_chunk=100)
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    checkpoint = (await repo.load_checkpoints())[0]
    slot, last = checkpoint.snapshot_slot, checkpoint.snapshot_chunks - 1
    if damage == "missing chunk":
        await repo.save_snapshot_chunk(0, slot, last, None)
    elif damage == "changed chunk":
        (chunk,) = await _chunks(repo, slot, last)
        await repo.save_snapshot_chunk(0, slot, last, chunk[:-1] + b" ")
    else:
        data = b"".join(await _chunks(repo, slot, 0, last + 1)).replace(
            b'"version":1', b'"version":9'
        )
        await _replace_snapshot(repo, checkpoint, data)
    repo.reset_counters()
    with caplog.at_level(logging.WARNING, "kapbit.snapshots"):
        second, calls = await _second(repo)
    try:
        assert "not using the snapshot" in caplog.text
        assert repo.lowest_read[0] == min(checkpoint.offset, checkpoint.window_offset)
        await _check_second(second, calls, 60)
    finally:
        await second.close()


async def test_a_start_with_a_larger_window_does_not_use_a_smaller_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = CrashRepository()
    first, stuck = await _open_then_finished(repo, 60, window=5)
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    with caplog.at_level(logging.WARNING, "kapbit.snapshots"):
        second, calls = await _second(repo, window=20)
    try:
        assert "keeps 5 ids, this instance's window is 20" in caplog.text
        await _check_second(second, calls, 60)
        with pytest.raises(DuplicateWorkflow):  # read back from the log: 18 ids before
            await second.exec_workflow("q42", "gated", {"id": "q42"})
    finally:
        await second.close()


async def test_a_checkpoint_of_an_older_version_still_loads() -> None:
    """Saved before snapshots existed: no snapshot fields, recovery uses its offsets."""
    old = b'{"offset":7,"owner":"a","window_offset":3,"window_owner":"a","window_size":5}'
    checkpoint = msgspec.json.decode(old, type=Checkpoint)
    assert checkpoint.snapshot_offset == -1
    assert (checkpoint.offset, checkpoint.window_offset) == (7, 3)


async def test_snapshots_off_write_offset_only_checkpoints() -> None:
    repo = MemRepository()
    first, stuck = await _open_then_finished(repo, 10, snapshots=False)
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    assert (await repo.load_checkpoints())[0].snapshot_offset == -1
    assert repo.snapshot_chunks(0) == {}


async def _chunks(
    repo: MemRepository, slot: str, first: int, stop: int | None = None
) -> list[bytes]:
    chunks = await repo.load_snapshot_chunks(0, slot, first + 1 if stop is None else stop)
    return chunks[first:]


async def _replace_snapshot(repo: MemRepository, checkpoint: Checkpoint, data: bytes) -> None:
    """Store ``data`` as ``checkpoint``'s snapshot, with a matching size and CRC."""
    slot = checkpoint.snapshot_slot
    for index in range(checkpoint.snapshot_chunks):
        await repo.save_snapshot_chunk(0, slot, index, None)
    await repo.save_snapshot_chunk(0, slot, 0, data)
    await repo.save_checkpoint(
        0,
        msgspec.structs.replace(
            checkpoint, snapshot_chunks=1, snapshot_size=len(data), snapshot_crc=zlib.crc32(data)
        ),
    )


async def test_a_workflow_created_twice_across_the_snapshot_is_resumed_once() -> None:
    """x's WorkflowCreated lands, its ack is lost; the retry is held while a snapshot is
    taken, then lands above it: recovery from the snapshot takes it as a second copy."""
    inner = CrashRepository()
    faulty = FaultyRepository(inner)
    lost = faulty.fail(
        times=1, kinds="workflow_created", lost_ack=True, when=lambda c: c.key == "x"
    )
    hold = faulty.slow(
        times=1, kinds="workflow_created", when=lambda c: c.key == "x" and lost.hits > 0
    )
    calls: list[tuple[str, int]] = []
    first = Kapbit(
        [gated_saga(None, calls), gated_saga(asyncio.Event(), calls, name="slow")],
        faulty,
        options=_options("first", every=1),
    )
    await first.start()
    x = asyncio.create_task(first.exec_workflow("x", "slow", {"id": "x"}))
    await wait_until(lambda: hold.hits > 0)
    (first_copy,) = [r.offset for r in inner.records(0) if r.key == "x"]
    await first.exec_workflow("y", "gated", {"id": "y"})
    await wait_until(lambda: any(c.snapshot_offset > first_copy for _, c in inner.saves))
    hold.release()
    await wait_until(lambda: ("x", 1) in calls)
    copies = [r.offset for r in inner.records(0) if r.kind == "workflow_created" and r.key == "x"]
    assert len(copies) == 2
    first.abort()
    await asyncio.gather(x, return_exceptions=True)
    assert (await inner.load_checkpoints())[0].snapshot_offset in range(
        copies[0] + 1, copies[1] + 1
    )

    second, calls2 = await _second(inner)
    try:
        assert second.stats.recovered == 1
        assert await second.wait_result("x", timeout=5) == ["x", "x-0", "x-1", "x-2"]
        assert calls2 == [("x", 1), ("x", 2)]
        for workflow_id in ("x", "y"):
            with pytest.raises(DuplicateWorkflow):
                await second.exec_workflow(workflow_id, "gated", {"id": workflow_id})
    finally:
        await second.close()
    assert inner.checkpoint_errors == []


async def test_the_snapshot_of_another_log_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    """A recreated log finds the old log's checkpoint and snapshot in a shared store: the
    anchor check refuses the checkpoint, so none of the old log's open workflows come back
    and none of its ids are refused."""
    old = MemRepository()
    first, stuck = await _open_then_finished(old, 30)
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    checkpoint = (await old.load_checkpoints())[0]
    assert checkpoint.snapshot_offset > 0

    recreated = MemRepository()
    other, _ = await _open_then_finished(recreated, 40)  # a longer log of its own
    other.abort()
    await recreated.save_checkpoint(0, checkpoint)
    for index, chunk in enumerate(
        await old.load_snapshot_chunks(0, checkpoint.snapshot_slot, checkpoint.snapshot_chunks)
    ):
        await recreated.save_snapshot_chunk(0, checkpoint.snapshot_slot, index, chunk)
    with caplog.at_level(logging.WARNING, "kapbit.restore"):
        second, _ = await _second(recreated)
    try:
        assert "ignoring the checkpoint of partition 0" in caplog.text
        assert second.stats.recovered == 2  # the recreated log's own s0 and s1
        assert {"s0", "s1"} == set(second.in_flight())
        with pytest.raises(DuplicateWorkflow):
            await second.exec_workflow("q39", "gated", {"id": "q39"})  # its own ids
    finally:
        await second.close()


async def test_a_zombie_saving_a_snapshot_leaves_the_new_owners_whole() -> None:
    """B takes over from A; B's snapshot chunks are stored, its checkpoint is on its way
    when A (replaced while idle, it does not know yet) saves its own snapshot at close:
    the checkpoint B then saves still names whole chunks."""
    inner = CrashRepository()
    faulty_a, faulty_b = FaultyRepository(inner), FaultyRepository(inner)
    a, stuck = await _open_then_finished(faulty_a, 5, every=1)
    # one more open workflow: A's last snapshot lacks it, so A's close writes a new one
    stuck.append(asyncio.create_task(a.exec_workflow("s2", "slow", {"id": "s2"})))
    await wait_until(lambda: any(r.key == "s2" for r in inner.records(0)[-1:]))
    calls: list[tuple[str, int]] = []
    b = Kapbit(
        [gated_saga(None, calls), gated_saga(asyncio.Event(), calls, name="slow")],
        faulty_b,
        options=_options("b", every=1),
    )
    await b.start()
    held = faulty_b.slow(times=1, operations=("save_checkpoint",))
    await b.exec_workflow("b0", "gated", {"id": "b0"})
    await wait_until(lambda: held.hits > 0)  # B's chunks are stored, its checkpoint held
    await a.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    zombie = inner.saves[-1][1]
    assert zombie.anchor_writer == a.writer_id  # A saved a new snapshot meanwhile
    assert zombie.snapshot_offset == zombie.anchor_offset + 1
    held.release()
    await wait_until(lambda: inner.saves[-1][1].anchor_writer == b.writer_id)
    await b.close(timeout=0)
    assert inner.checkpoint_errors == []
    assert (await inner.load_checkpoints())[0].snapshot_offset >= 0


@pytest.mark.parametrize("snapshots", [True, False])
async def test_a_start_with_a_smaller_window_keeps_the_newest_ids_of_the_snapshot(
    snapshots: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A takeover with a window of 2 after a saver with 5 refuses the same ids from the
    snapshot as from reading the log (``snapshots=False``): the 2 newest."""
    repo = CrashRepository()
    first, stuck = await _open_then_finished(repo, 20, snapshots=snapshots)
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    assert ((await repo.load_checkpoints())[0].snapshot_offset >= 0) == snapshots
    calls: list[tuple[str, int]] = []
    with caplog.at_level(logging.WARNING, "kapbit.snapshots"):
        second = Kapbit(
            [gated_saga(None, calls), gated_saga(None, calls, name="slow")],
            repo,
            options=_options("second", window=2),
        )
        await second.start()
    try:
        assert "not using the snapshot" not in caplog.text
        assert second.stats.recovered == 2
        for workflow_id in ("q19", "q18", "s0", "s1"):
            with pytest.raises(DuplicateWorkflow):
                await second.exec_workflow(workflow_id, "gated", {"id": workflow_id})
        assert await second.exec_workflow("q17", "gated", {"id": "q17"}) is not None
    finally:
        await second.close()
    assert repo.checkpoint_errors == []


async def test_a_start_with_another_codec_is_refused_before_the_snapshot_is_used() -> None:
    repo = MemRepository()
    first, stuck = await _open_then_finished(repo, 10)
    await first.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    assert (await repo.load_checkpoints())[0].snapshot_offset >= 0
    other = Kapbit(
        [gated_saga(None, []), gated_saga(None, [], name="slow")],
        repo,
        options=_options("second"),
        codec=MsgpackCodec(),
    )
    with pytest.raises(CodecMismatch):
        await other.start()
    assert [r.node for r in repo.records(0)].count(other.writer_id) == 0  # nothing written
