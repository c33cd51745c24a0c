"""Checkpoints on the in-memory repository: saved by count and by time, never ahead of the
oldest open workflow, and recovery reads from them (plus the idempotency window's ids)."""

from __future__ import annotations

import asyncio
import functools
import operator

import pytest

from kapbit import (
    CheckpointPolicy,
    DuplicateWorkflow,
    Fenced,
    JsonCodec,
    Kapbit,
    Options,
    partition_for,
)
from kapbit.checkpoints import Checkpointer
from kapbit.fencing import OwnerTracker
from kapbit.idempotency import IdempotencyWindow
from kapbit.repository import Checkpoint, MemRepository
from kapbit.restore import restore_partition
from tests.helpers import CrashRepository, gated_saga, wait_until

NEVER = 3600.0  # an interval no test waits for


def _created_offsets(repo: MemRepository, partition: int = 0) -> dict[str, int]:
    return {r.key: r.offset for r in repo.records(partition) if r.kind == "workflow_created"}


async def test_checkpoints_are_saved_after_every_n_terminated_workflows() -> None:
    repo = CrashRepository()
    calls: list[tuple[str, int]] = []
    options = Options(node_id="n", checkpoints=CheckpointPolicy(every=5, interval=NEVER))
    async with Kapbit([gated_saga(None, calls)], repo, options=options) as kbit:
        for i in range(4):
            await kbit.exec_workflow(f"w{i}", "gated", {"id": f"w{i}"})
        assert repo.saves == []  # 4 < every; the interval is far away
        await kbit.exec_workflow("w4", "gated", {"id": "w4"})
        await wait_until(lambda: len(repo.saves) == 1)
        partition, checkpoint = repo.saves[0]
        end = len(repo.records())
        # nothing open: everything below the end of the log has terminated
        n = kbit.writer_id
        assert (partition, checkpoint.offset, checkpoint.owner) == (0, end, n)
        assert (checkpoint.window_offset, checkpoint.window_owner) == (1, n)
        assert (checkpoint.anchor_offset, checkpoint.anchor_writer) == (end - 1, n)
    assert repo.checkpoint_errors == []


async def test_checkpoints_are_saved_periodically() -> None:
    repo = CrashRepository(partitions=2)
    calls: list[tuple[str, int]] = []
    options = Options(node_id="n", checkpoints=CheckpointPolicy(every=10**6, interval=0.01))
    async with Kapbit([gated_saga(None, calls)], repo, options=options) as kbit:
        ids = ["a", "b", "c", "d"]
        assert {partition_for(i, 2) for i in ids} == {0, 1}
        for i in ids:
            await kbit.exec_workflow(i, "gated", {"id": i})
        await wait_until(
            lambda: {p for p, c in repo.saves if c.offset == len(repo.records(p))} == {0, 1}
        )
    assert repo.checkpoint_errors == []


async def test_a_checkpoint_is_never_ahead_of_the_oldest_open_workflow() -> None:
    """Slow workflows interleaved with quick ones; the slow ones finish one by one, the
    oldest first. The checkpoint follows the oldest open one, never beyond it (every save
    is also checked against the log by the repository)."""
    repo = CrashRepository()
    calls: list[tuple[str, int]] = []
    releases = [asyncio.Event() for _ in range(4)]
    definitions = [gated_saga(None, calls)] + [
        gated_saga(release, calls, name=f"slow{k}") for k, release in enumerate(releases)
    ]
    options = Options(node_id="n", checkpoints=CheckpointPolicy(every=1, interval=0.001))

    def last_saved_at(offset: int) -> bool:
        return repo.saves[-1][1].offset == offset

    async with Kapbit(definitions, repo, options=options) as kbit:
        slow = []
        for k in range(4):
            for i in range(3):
                await kbit.exec_workflow(f"q{k}-{i}", "gated", {"id": f"q{k}-{i}"})
            slow.append(
                asyncio.create_task(kbit.exec_workflow(f"s{k}", f"slow{k}", {"id": f"s{k}"}))
            )
            await wait_until(functools.partial(operator.contains, calls, (f"s{k}", 1)))
        for i in range(3):
            await kbit.exec_workflow(f"tail{i}", "gated", {"id": f"tail{i}"})
        created = _created_offsets(repo)
        await wait_until(lambda: bool(repo.saves) and repo.saves[-1][1].offset == created["s0"])
        for k in range(4):
            releases[k].set()
            await slow[k]
            moved_to = created[f"s{k + 1}"] if k < 3 else len(repo.records())
            await wait_until(functools.partial(last_saved_at, moved_to))
            assert all(c.offset <= moved_to for _, c in repo.saves)
    offsets = [c.offset for _, c in repo.saves]
    assert offsets == sorted(offsets)  # never goes back
    assert len(set(offsets)) >= 5
    assert repo.checkpoint_errors == []


async def test_the_checkpoint_is_saved_on_close_with_the_windows_start() -> None:
    repo = CrashRepository()
    calls: list[tuple[str, int]] = []
    options = Options(node_id="n", idempotency_window=3, checkpoints=CheckpointPolicy(10**6, NEVER))
    async with Kapbit([gated_saga(None, calls)], repo, options=options) as kbit:
        for i in range(10):
            await kbit.exec_workflow(f"w{i}", "gated", {"id": f"w{i}"})
        assert repo.saves == []
    [(_, checkpoint)] = repo.saves
    assert checkpoint.offset == len(repo.records())
    # the window holds w7, w8, w9: ids are read again from w7's WorkflowCreated on
    assert checkpoint.window_offset == _created_offsets(repo)["w7"]
    assert repo.checkpoint_errors == []


async def _log_behind_a_checkpoint(
    finished: int, window: int = 5, snapshots: bool = False
) -> tuple[CrashRepository, dict[str, int]]:
    """``finished`` workflows, then 2 left open (closed with a timeout of 0), with 2 more
    finished in between; checkpoints saved as the engine does (offsets only, unless
    ``snapshots``)."""
    repo = CrashRepository()
    calls: list[tuple[str, int]] = []
    release = asyncio.Event()
    options = Options(
        node_id="first",
        idempotency_window=window,
        checkpoints=CheckpointPolicy(every=10, interval=NEVER, snapshots=snapshots),
    )
    kbit = Kapbit(
        [gated_saga(None, calls), gated_saga(release, calls, name="slow")], repo, options=options
    )
    await kbit.start()
    for i in range(finished):
        await kbit.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
    stuck = [asyncio.create_task(kbit.exec_workflow(s, "slow", {"id": s})) for s in ("s0", "s1")]
    await wait_until(lambda: {("s0", 1), ("s1", 1)} <= set(calls))
    for i in range(finished, finished + 2):
        await kbit.exec_workflow(f"q{i}", "gated", {"id": f"q{i}"})
    await kbit.close(timeout=0)
    await asyncio.gather(*stuck, return_exceptions=True)
    return repo, _created_offsets(repo)


async def test_recovery_reads_from_the_checkpoint_and_the_windows_ids_only() -> None:
    repo, created = await _log_behind_a_checkpoint(finished=60)
    checkpoint = (await repo.load_checkpoints())[0]
    assert checkpoint.offset == created["s0"]  # the oldest open workflow
    # window of 5: q59, s0, s1, q60, q61 -> ids are read from q59's WorkflowCreated
    assert checkpoint.window_offset == created["q59"]
    log_length = len(repo.records())

    repo.reset_counters()
    repo.garble_below[0] = checkpoint.offset  # decoding anything there would fail
    calls: list[tuple[str, int]] = []
    options = Options(node_id="second", idempotency_window=5)
    async with Kapbit(
        [gated_saga(None, calls), gated_saga(None, calls, name="slow")], repo, options=options
    ) as kbit:
        claim = log_length  # the claim is the first record after the old log
        assert repo.records(0)[claim].node == kbit.writer_id
        assert repo.lowest_read[0] == checkpoint.window_offset
        # and, before claiming, the record the checkpoint names (to check it is this log's)
        # and the log's last record (to check the codec)
        assert repo.records_read[0] == claim - checkpoint.window_offset + 1 + 1
        assert repo.records_read[0] < log_length // 10
        assert kbit.stats.recovered == 2
        for workflow_id in ("q59", "s0", "s1", "q60", "q61"):
            with pytest.raises(DuplicateWorkflow):
                await kbit.exec_workflow(workflow_id, "gated", {"id": workflow_id})
        # q58 has left the window: a new workflow
        assert await kbit.exec_workflow("q58", "gated", {"id": "q58"}) is not None
        assert await kbit.wait_result("s0", timeout=5) == ["s0", "s0-0", "s0-1", "s0-2"]
        assert await kbit.wait_result("s1", timeout=5) == ["s1", "s1-0", "s1-1", "s1-2"]
    assert sorted(calls) == sorted(
        [("q58", 0), ("q58", 1), ("q58", 2), ("s0", 1), ("s0", 2), ("s1", 1), ("s1", 2)]
    )
    assert repo.checkpoint_errors == []


@pytest.mark.parametrize("finished", [20, 200, 2000])
async def test_records_read_at_recovery_do_not_depend_on_the_logs_length(finished: int) -> None:
    repo, created = await _log_behind_a_checkpoint(finished)
    checkpoint = (await repo.load_checkpoints())[0]
    claim = len(repo.records())
    restored = await restore_partition(repo, JsonCodec(), 0, claim, checkpoint, 5)
    assert [w.id for w in restored.in_flight] == ["s0", "s1"]
    last = [f"q{finished - 1}", "s0", "s1", f"q{finished}", f"q{finished + 1}"]
    assert [i for i, _ in restored.window] == last
    # 5 window ids at 5 records per finished workflow, from q(n-1) to the claim: always
    # the same count, and only the records from the checkpoint on are decoded
    assert restored.records_read == claim - created[f"q{finished - 1}"] == 19
    assert restored.records_decoded == claim - checkpoint.offset == 14


async def test_without_a_checkpoint_recovery_reads_the_whole_log() -> None:
    repo = CrashRepository()
    calls: list[tuple[str, int]] = []
    release = asyncio.Event()
    options = Options(node_id="first", checkpoints=CheckpointPolicy(every=10**6, interval=NEVER))
    first = Kapbit([gated_saga(release, calls)], repo, options=options)
    await first.start()
    task = asyncio.create_task(first.exec_workflow("w", "gated", {"id": "w"}))
    await wait_until(lambda: len(calls) == 2)
    first.abort()
    await asyncio.gather(task, return_exceptions=True)
    assert repo.saves == []
    repo.reset_counters()
    async with Kapbit([gated_saga(None, calls)], repo, options=Options(node_id="second")) as kbit:
        assert kbit.stats.recovered == 1
        # the log's last record (checked against the codec before claiming), then from
        # the start: claim of first, created, step 0
        assert repo.records_read[0] == 1 + 3
        assert await kbit.wait_result("w", timeout=5) == ["w", "w-0", "w-1", "w-2"]


async def test_checkpoints_after_a_takeover_and_a_stale_one_from_the_old_owner() -> None:
    """B takes over from an idle A, works and saves checkpoints naming itself. A, which
    never wrote again and so never learnt it was fenced, then closes and saves its own,
    older checkpoint: that one lags, which is safe; C recovers correctly from it."""
    repo = CrashRepository()
    calls: list[tuple[str, int]] = []
    a_policy = CheckpointPolicy(every=10**6, interval=NEVER)  # A saves on close only
    a = Kapbit([gated_saga(None, calls)], repo, options=Options(node_id="A", checkpoints=a_policy))
    await a.start()
    await a.exec_workflow("a1", "gated", {"id": "a1"})
    release = asyncio.Event()
    b = Kapbit(
        [gated_saga(None, calls), gated_saga(release, calls, name="slow")],
        repo,
        options=Options(node_id="B", checkpoints=CheckpointPolicy(every=1, interval=NEVER)),
    )
    await b.start()
    b_claim = len(repo.records()) - 1
    await b.exec_workflow("b1", "gated", {"id": "b1"})
    stuck = asyncio.create_task(b.exec_workflow("b2", "slow", {"id": "b2"}))
    await b.exec_workflow("b3", "gated", {"id": "b3"})
    await wait_until(lambda: repo.saves[-1][1].owner == b.writer_id)
    # held at or below b2's WorkflowCreated (at the bound set before it was appended)
    assert b_claim < repo.saves[-1][1].offset <= _created_offsets(repo)["b2"]
    await b.close(timeout=0)
    await asyncio.gather(stuck, return_exceptions=True)
    await a.close()  # A saves its stale checkpoint over B's
    assert repo.saves[-1][1].owner == a.writer_id and repo.saves[-1][1].offset <= b_claim
    assert repo.checkpoint_errors == []

    calls.clear()
    async with Kapbit(
        [gated_saga(None, calls), gated_saga(None, calls, name="slow")],
        repo,
        options=Options(node_id="C"),
    ) as c:
        assert c.stats.recovered == 1
        assert await c.wait_result("b2", timeout=5) == ["b2", "b2-0", "b2-1", "b2-2"]
        for workflow_id in ("a1", "b1", "b3"):
            with pytest.raises(DuplicateWorkflow):
                await c.exec_workflow(workflow_id, "gated", {"id": workflow_id})
    assert calls == [("b2", 1), ("b2", 2)]


async def test_a_fenced_instance_saves_no_checkpoint_when_it_stops() -> None:
    repo = CrashRepository()
    calls: list[tuple[str, int]] = []
    policy = CheckpointPolicy(every=10**6, interval=NEVER)
    a = Kapbit([gated_saga(None, calls)], repo, options=Options(node_id="A", checkpoints=policy))
    await a.start()
    b = Kapbit([gated_saga(None, calls)], repo, options=Options(node_id="B", checkpoints=policy))
    await b.start()
    with pytest.raises(Fenced):
        await a.exec_workflow("x", "gated", {"id": "x"})
    await a.close()
    assert repo.saves == []
    await b.close()
    assert [c.owner for _, c in repo.saves] == [b.writer_id]


async def test_the_checkpointer_holds_below_a_workflow_whose_creation_is_in_flight() -> None:
    """Unit: the checkpoint is the oldest open workflow's offset; while a WorkflowCreated
    is being appended it is bounded by what was acknowledged before the append began."""
    acked = [9]
    windows = [IdempotencyWindow(10)]
    owners = [OwnerTracker("old")]
    owners[0].writers.append((4, "n"))  # "n" claimed the partition at offset 4
    owners[0].owner = "n"
    checkpointer = Checkpointer(
        MemRepository(), CheckpointPolicy(), acked.__getitem__, windows, owners, [Checkpoint()]
    )
    assert checkpointer.checkpoint(0) == Checkpoint(10, "n", 10, "n")
    checkpointer.opening(0, "w")
    acked[0] = 15  # other records were acknowledged meanwhile
    assert checkpointer.checkpoint(0).offset == 10
    checkpointer.opened(0, "w", 12)
    windows[0].add("w", 12)
    windows[0].add("earlier", 3)  # acknowledged late: the window's oldest id, by offset
    # The hold stays at the bound: a lost ack may have left a first copy below 12; the
    # window's ids are read back from the oldest one's offset, under its owner there.
    assert checkpointer.checkpoint(0) == Checkpoint(10, "n", 3, "old")
    checkpointer.opened(0, "restored", 11)  # found open by recovery: held at its offset
    checkpointer.opened(0, "restored", 14)  # never moves up
    assert checkpointer.checkpoint(0).offset == 10
    checkpointer.terminated(0, "restored")
    checkpointer.terminated(0, "w")
    checkpointer.opening(0, "x")
    checkpointer.abandoned(0, "x")  # its WorkflowCreated was never written
    assert checkpointer.checkpoint(0) == Checkpoint(16, "n", 3, "old")
    assert owners[0].owner_at(3) == "old" and owners[0].owner_at(5) == "n"


async def test_the_test_checker_flags_a_checkpoint_ahead_of_an_open_workflow() -> None:
    """The checker every test repository runs on saved checkpoints does catch a leading
    checkpoint and a wrong owner (so an empty ``checkpoint_errors`` means something)."""
    repo = CrashRepository()
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []
    options = Options(node_id="n", checkpoints=CheckpointPolicy(10**6, NEVER))
    async with Kapbit([gated_saga(release, calls)], repo, options=options) as kbit:
        task = asyncio.create_task(kbit.exec_workflow("w", "gated", {"id": "w"}))
        await wait_until(lambda: len(calls) == 2)
        end = len(repo.records())
        n = kbit.writer_id
        await repo.save_checkpoint(0, Checkpoint(end, n, end, n))
        assert len(repo.checkpoint_errors) == 1 and "ahead of open" in repo.checkpoint_errors[0]
        await repo.save_checkpoint(0, Checkpoint(1, "other", 1, n))
        assert len(repo.checkpoint_errors) == 2 and "owner 'other'" in repo.checkpoint_errors[1]
        release.set()
        await task
