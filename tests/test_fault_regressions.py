"""Regression tests for the engine-side faults of issue 16, one test per item.

Each test reproduces what an operator met (a reused pod name, a window grown across a
restart, a checkpoint store shared by two logs, a codec changed between restarts, ...) on
the in-memory repository, through :class:`~kapbit.testing.faults.FaultyRepository` where
storage faults are involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import operator
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kapbit import (
    CheckpointPolicy,
    CodecMismatch,
    CorruptRecord,
    Definition,
    DuplicateWorkflow,
    EncodeError,
    Fenced,
    InstanceClosed,
    InvalidWorkflowId,
    JsonCodec,
    Kapbit,
    MsgpackCodec,
    Options,
    StartupError,
    Step,
    Success,
    UnknownWorkflowType,
    WillRetryLater,
    WorkflowRejected,
)
from kapbit.events import EventKind
from kapbit.fencing import OwnerTracker
from kapbit.repository import Checkpoint, MemRepository, Record
from kapbit.restore import older_ids, trusted_checkpoint
from kapbit.testing.faults import FaultyRepository
from tests.helpers import fast_options, gated_saga, live_records, wait_until

NEVER = 3600.0


def _quiet(**kwargs: Any) -> Options:
    """Fast retries, no checkpoint unless ``close`` saves one."""
    kwargs.setdefault("checkpoints", CheckpointPolicy(every=10**6, interval=NEVER))
    return fast_options(**kwargs)


def _live_terminals(repo: MemRepository) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in live_records(repo):
        if record.kind in ("workflow_result", "dead_letter", "rejected"):
            counts[record.key] = counts.get(record.key, 0) + 1
    return counts


# --- 3. a reused node_id -------------------------------------------------------------------


async def test_item3_reused_node_id_still_fences_the_replaced_instance() -> None:
    """Item 3: two starts configured with the same node_id (a pod name) are still told
    apart: the second fences the first, and each workflow terminates once."""
    repo = MemRepository()
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []
    a = Kapbit([gated_saga(release, calls)], repo, options=_quiet(node_id="pod-1"))
    await a.start()
    runs = [
        asyncio.create_task(a.exec_workflow(f"w{i}", "gated", {"id": f"w{i}"})) for i in range(5)
    ]
    await wait_until(lambda: len(calls) == 10)

    b = Kapbit([gated_saga(None, calls)], repo, options=_quiet(node_id="pod-1"))
    await b.start()
    for i in range(5):
        assert await b.wait_result(f"w{i}", timeout=5) == [f"w{i}", f"w{i}-0", f"w{i}-1", f"w{i}-2"]
    release.set()
    results = await asyncio.gather(*runs, return_exceptions=True)
    assert all(isinstance(r, Fenced) for r in results), results
    assert _live_terminals(repo) == {f"w{i}": 1 for i in range(5)}
    assert a.node_id == b.node_id == "pod-1"
    assert a.writer_id != b.writer_id
    await b.close()
    await a.close()


# --- 4. the idempotency window grown or shrunk across a restart ------------------------------


async def _run_ids(repo: MemRepository, ids: list[str], window: int) -> None:
    options = fast_options(idempotency_window=window, node_id=f"w{window}")
    async with Kapbit([gated_saga(None, [])], repo, options=options) as kbit:
        for wid in ids:
            await kbit.exec_workflow(wid, "gated", {"id": wid})


async def test_item4_grown_window_refuses_every_id_it_covers() -> None:
    """Item 4: growing idempotency_window from 5 to 50 across a restart: all 20 old ids
    are refused, although the checkpoint's window range was computed for 5 ids."""
    repo = MemRepository()
    ids = [f"id{i}" for i in range(20)]
    await _run_ids(repo, ids, window=5)
    calls: list[tuple[str, int]] = []
    async with Kapbit([gated_saga(None, calls)], repo, options=_quiet(idempotency_window=50)) as b:
        accepted = []
        for wid in ids:
            try:
                await b.exec_workflow(wid, "gated", {"id": wid})
                accepted.append(wid)
            except DuplicateWorkflow:
                pass
    assert accepted == []
    assert calls == []


async def test_item4_shrunk_window_refuses_only_the_newest_ids() -> None:
    """Item 4: shrinking the window from 50 to 5 keeps exactly the 5 newest ids."""
    repo = MemRepository()
    ids = [f"id{i}" for i in range(20)]
    await _run_ids(repo, ids, window=50)
    async with Kapbit([gated_saga(None, [])], repo, options=_quiet(idempotency_window=5)) as b:
        refused = []
        for wid in reversed(ids):  # newest first: an accepted id pushes older ones out
            try:
                await b.exec_workflow(wid, "gated", {"id": wid})
            except DuplicateWorkflow:
                refused.append(wid)
    assert refused == ids[:-6:-1]


async def test_item4_grown_window_keeps_an_id_reused_under_the_smaller_window() -> None:
    """Item 4: an id that had left a 5-id window was legitimately started again; a restart
    with a 50-id window must resume that second workflow, not drop it as a duplicate."""
    repo = MemRepository()
    release = asyncio.Event()
    release.set()
    calls: list[tuple[str, int]] = []
    a = Kapbit([gated_saga(release, calls)], repo, options=_quiet(idempotency_window=5))
    await a.start()
    for i in range(6):
        await a.exec_workflow(f"id{i}", "gated", {"id": f"id{i}"})
    release.clear()
    reuse = asyncio.create_task(a.exec_workflow("id0", "gated", {"id": "id0"}))
    await wait_until(lambda: calls.count(("id0", 1)) == 2)
    a.abort()
    with pytest.raises(InstanceClosed):
        await reuse
    b = Kapbit([gated_saga(None, [])], repo, options=_quiet(idempotency_window=50))
    await b.start()
    assert await b.wait_result("id0", timeout=5) == ["id0", "id0-0", "id0-1", "id0-2"]
    await b.close()


async def test_item4_reading_back_skips_zombie_ids_and_keeps_the_old_owners() -> None:
    """Item 4: the ids read back beyond the checkpoint's window cross a takeover: ids the
    old owner created before it are kept, its zombie WorkflowCreated after it is not."""
    repo = MemRepository()
    small = _quiet(idempotency_window=3)
    a = Kapbit([gated_saga(None, [])], repo, options=small)
    await a.start()
    for wid in ("a1", "a2"):
        await a.exec_workflow(wid, "gated", {"id": wid})
    b = Kapbit([gated_saga(None, [])], repo, options=small)
    await b.start()
    with pytest.raises(Fenced):
        await a.exec_workflow("zombie", "gated", {"id": "zombie"})
    assert [r.node for r in repo.records(0) if r.key == "zombie"] == [a.writer_id]
    for i in range(1, 6):
        await b.exec_workflow(f"b{i}", "gated", {"id": f"b{i}"})
    await b.close()
    await a.close()
    async with Kapbit([gated_saga(None, [])], repo, options=_quiet(idempotency_window=50)) as c:
        for wid in ("a1", "a2", "b1", "b2", "b3", "b4", "b5"):
            with pytest.raises(DuplicateWorkflow):
                await c.exec_workflow(wid, "gated", {"id": wid})
        assert await c.exec_workflow("zombie", "gated", {"id": "zombie"}) == [
            "zombie",
            "zombie-0",
            "zombie-1",
            "zombie-2",
        ]


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["claim", "create"]), st.sampled_from("abc"), st.integers(0, 9)),
        max_size=60,
    ),
    wanted=st.integers(1, 12),
    chunk=st.integers(1, 8),
)
def test_item4_ids_read_back_match_a_forward_read(
    ops: list[tuple[str, str, int]], wanted: int, chunk: int
) -> None:
    """Item 4: reading ids backwards (the window grew) keeps exactly the ids a forward read
    from the log's start keeps: the newest ``wanted`` created by their owner in force."""

    async def run() -> None:
        repo = MemRepository()
        for op, node, n in ops:
            with contextlib.suppress(Fenced):
                if op == "claim":
                    await repo.claim(0, node, b"")
                else:
                    await repo.append(0, EventKind.WORKFLOW_CREATED, f"id{n}", node, b"")
        records = repo.records(0)
        owners = OwnerTracker("")
        forward: dict[str, int] = {}
        for record in records:
            if owners.admit(record) and record.kind == "workflow_created":
                forward.pop(record.key, None)
                forward[record.key] = record.offset
        expected = list(forward.items())[-wanted:]
        found = await older_ids(repo, 0, len(records), owners.owner, wanted, chunk)
        assert found == expected

    asyncio.run(run())


# --- 5. a checkpoint that belongs to another log -------------------------------------------


class SharedCheckpoints:
    """A repository whose log is ``log`` and whose checkpoints live in ``store``: two logs
    can share one store, or a log can be replaced (recreated) while the store survives."""

    def __init__(self, log: MemRepository, store: dict[int, Checkpoint]) -> None:
        self.log = log
        self.store = store

    @property
    def partitions(self) -> int:
        return self.log.partitions

    async def start(self) -> None:
        await self.log.start()

    async def close(self) -> None:
        await self.log.close()

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        return await self.log.append(partition, kind, key, node, value)

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        return await self.log.claim(partition, node, value)

    def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        return self.log.read(partition, start, stop)

    def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        return self.log.tail(partition, start)

    async def end_offset(self, partition: int) -> int:
        return await self.log.end_offset(partition)

    async def current_owner(self, partition: int) -> str:
        return await self.log.current_owner(partition)

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        self.store[partition] = checkpoint

    async def load_checkpoints(self) -> dict[int, Checkpoint]:
        return dict(self.store)


async def _leave_open(repo: SharedCheckpoints, wid: str, then: int = 0) -> None:
    """Start ``wid`` (blocked in step 1), run ``then`` more workflows, crash: no checkpoint."""
    blocked: list[tuple[str, int]] = []
    kbit = Kapbit([gated_saga(asyncio.Event(), blocked)], repo, options=_quiet())
    await kbit.start()
    task = asyncio.create_task(kbit.exec_workflow(wid, "gated", {"id": wid}))
    await wait_until(lambda: (wid, 1) in blocked)
    for i in range(then):
        other = asyncio.create_task(kbit.exec_workflow(f"{wid}-x{i}", "gated", {"id": f"x{i}"}))
        await wait_until(functools.partial(operator.contains, blocked, (f"x{i}", 1)))
        other.cancel()
    kbit.abort()
    with pytest.raises(InstanceClosed):
        await task


async def test_item5_two_logs_sharing_a_checkpoint_store() -> None:
    """Item 5: a checkpoint saved for one log is not trusted for another log sharing the
    store: the second log's open workflow is resumed and its id refused."""
    store: dict[int, Checkpoint] = {}
    first = SharedCheckpoints(MemRepository(), store)
    async with Kapbit([gated_saga(None, [])], first, options=_quiet()) as kbit:
        for i in range(6):
            await kbit.exec_workflow(f"a{i}", "gated", {"id": f"a{i}"})
    assert store[0].offset > 10
    second = SharedCheckpoints(MemRepository(), store)
    await _leave_open(second, "open")
    async with Kapbit([gated_saga(None, [])], second, options=_quiet()) as kbit:
        assert await kbit.wait_result("open", timeout=5) == ["open", "open-0", "open-1", "open-2"]
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("open", "gated", {"id": "open"})


async def test_item5_recreated_log_with_a_surviving_checkpoint() -> None:
    """Item 5: the log is recreated (empty) while its checkpoint survives, and grows past
    the old checkpoint's offset: the checkpoint is recognised as another log's."""
    store: dict[int, Checkpoint] = {}
    async with Kapbit([gated_saga(None, [])], SharedCheckpoints(MemRepository(), store)) as k:
        for i in range(3):
            await k.exec_workflow(f"a{i}", "gated", {"id": f"a{i}"})
    saved = store[0].offset
    recreated = SharedCheckpoints(MemRepository(), store)
    await _leave_open(recreated, "open", then=saved)
    assert await recreated.end_offset(0) > saved
    async with Kapbit([gated_saga(None, [])], recreated, options=_quiet()) as kbit:
        assert await kbit.wait_result("open", timeout=5) == ["open", "open-0", "open-1", "open-2"]


class _Trimmed(SharedCheckpoints):
    """A log whose records below ``first`` were removed (Kafka retention)."""

    def __init__(self, log: MemRepository, store: dict[int, Checkpoint], first: int) -> None:
        super().__init__(log, store)
        self.first = first

    def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        return self.log.read(partition, max(start, self.first), stop)


async def test_item5_which_checkpoints_are_trusted() -> None:
    """Item 5: a checkpoint is trusted only if its log holds, at the offset it names, a
    record of the writer it names; one naming nothing, or pointing past the log's end, is
    not; one whose record was removed by retention cannot be checked and is kept."""
    log = MemRepository()
    for offset in range(4):
        with contextlib.suppress(Fenced):
            if offset == 0:
                await log.claim(0, "w/1", b"")
            else:
                await log.append(0, EventKind.STEP_OUTCOME, "k", "w/1", b"")
    good = Checkpoint(3, "w/1", 2, "w/1", anchor_offset=3, anchor_writer="w/1")
    repo = SharedCheckpoints(log, {})
    assert await trusted_checkpoint(repo, 0, good, 4) == good
    assert await trusted_checkpoint(repo, 0, None, 4) == Checkpoint()
    for bad in (
        msgspec.structs.replace(good, anchor_writer="w/2"),  # another log's record there
        msgspec.structs.replace(good, anchor_offset=-1, anchor_writer=""),  # names nothing
        msgspec.structs.replace(good, anchor_offset=4),  # its record is past the end
        msgspec.structs.replace(good, offset=5),  # past the end
    ):
        assert await trusted_checkpoint(repo, 0, bad, 4) == Checkpoint(), bad
    trimmed = _Trimmed(log, {}, first=4)
    assert await trusted_checkpoint(trimmed, 0, good, 4) == good


# --- 6. a codec changed between restarts ----------------------------------------------------


@pytest.mark.parametrize(
    ("written", "restarted"), [(JsonCodec, MsgpackCodec), (MsgpackCodec, JsonCodec)]
)
async def test_item6_other_codec_is_refused_before_writing(written: Any, restarted: Any) -> None:
    """Item 6: a log written with one codec, restarted with another: start refuses with
    CodecMismatch and writes nothing; the right codec still starts."""
    repo = MemRepository()
    async with Kapbit([gated_saga(None, [])], repo, written(), options=_quiet()) as kbit:
        await kbit.exec_workflow("w", "gated", {"id": "w"})
    before = repo.records(0)
    with pytest.raises(CodecMismatch) as refused:
        await Kapbit([gated_saga(None, [])], repo, restarted(), options=_quiet()).start()
    assert restarted().name in str(refused.value)
    assert repo.records(0) == before
    async with Kapbit([gated_saga(None, [])], repo, written(), options=_quiet()) as kbit:
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "gated", {"id": "w"})


async def test_two_codecs_starting_at_once_on_an_empty_log_leave_one_owner() -> None:
    """Two instances configured with different codecs start at the same moment on an
    empty log: both claim before either reads the other's claim. The later claim wins and
    its instance runs (the loser's claim, undecodable to it, is still a claim); the loser
    is fenced. Afterwards the loser's codec is refused with CodecMismatch, writing nothing,
    and the winner's codec starts. (Before: the winner failed with CorruptRecord on the
    loser's claim, and no codec could start on the log again.)"""
    repo = MemRepository()
    codecs = {"json": JsonCodec(), "msgpack": MsgpackCodec()}
    instances = {
        name: Kapbit([gated_saga(None, [])], repo, codec, options=_quiet(node_id=name))
        for name, codec in codecs.items()
    }
    started = await asyncio.gather(
        *(kbit.start() for kbit in instances.values()), return_exceptions=True
    )
    outcomes = dict(zip(instances, started, strict=True))
    winners = [name for name, outcome in outcomes.items() if outcome is None]
    assert len(winners) == 1, outcomes
    (winner,) = winners
    (loser,) = set(instances) - {winner}
    assert isinstance(outcomes[loser], Fenced), outcomes
    try:
        assert await instances[winner].exec_workflow("w", "gated", {"id": "w"}) is not None
    finally:
        await instances[winner].close()
    before = repo.records(0)
    with pytest.raises(CodecMismatch) as refused:
        await Kapbit([gated_saga(None, [])], repo, codecs[loser], options=_quiet()).start()
    assert codecs[loser].name in str(refused.value) and winner in str(refused.value)
    assert repo.records(0) == before
    async with Kapbit([gated_saga(None, [])], repo, codecs[winner], options=_quiet()) as kbit:
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "gated", {"id": "w"})


# --- 7. NaN and infinity --------------------------------------------------------------------


def _float_saga(value: float) -> Definition:
    async def step(input: Any, progress: Any) -> Success[float]:
        return Success(value)

    return Definition(
        "floats",
        steps=[Step(step, name="s0")],
        result=lambda input, progress: progress.values()[0],
        input_type=Any,
        outcome_type=float,
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_item7_non_finite_json_input_is_refused_before_writing(value: float) -> None:
    """Item 7: NaN/±inf in an input cannot round-trip through JSON: EncodeError, nothing
    written."""
    repo = MemRepository()
    async with Kapbit([_float_saga(1.0)], repo, options=_quiet()) as kbit:
        with pytest.raises(EncodeError):
            await kbit.exec_workflow("w", "floats", {"nested": [1.0, value]})
        assert [r.kind for r in repo.records(0)] == ["active_writer"]


async def test_item7_non_finite_json_outcome_rejects_and_restart_works() -> None:
    """Item 7: a step outcome of NaN ends the workflow with Rejected (nothing undecodable
    is written), and the next start reads the log."""
    repo = MemRepository()
    async with Kapbit([_float_saga(math.nan)], repo, options=_quiet()) as kbit:
        with pytest.raises(WorkflowRejected):
            await kbit.exec_workflow("w", "floats", None)
    assert "step_outcome" not in [r.kind for r in repo.records(0)]
    async with Kapbit([_float_saga(1.0)], repo, options=_quiet()) as kbit:
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "floats", None)


async def test_item7_msgpack_round_trips_non_finite_floats() -> None:
    """Item 7: MessagePack carries NaN and ±inf exactly; they survive a restart."""
    repo = MemRepository()
    codec = MsgpackCodec()
    release = asyncio.Event()
    seen: list[float] = []

    async def first(input: Any, progress: Any) -> Success[float]:
        return Success(-math.inf)

    async def second(input: Any, progress: Any) -> Success[float]:
        seen.append(progress.values()[0])
        await release.wait()
        return Success(math.nan)

    definition = Definition(
        "floats",
        steps=[Step(first, name="s0"), Step(second, name="s1")],
        result=lambda input, progress: [input, *progress.values()],
        input_type=list[float],
        outcome_type=float,
    )
    a = Kapbit([definition], repo, codec, options=_quiet())
    await a.start()
    task = asyncio.create_task(a.exec_workflow("w", "floats", [math.inf, math.nan]))
    await wait_until(lambda: len(seen) == 1)
    a.abort()
    with pytest.raises(InstanceClosed):
        await task
    release.set()
    async with Kapbit([definition], repo, codec, options=_quiet()) as b:
        result = await b.wait_result("w", timeout=5)
    assert seen == [-math.inf, -math.inf]
    assert result[0][0] == math.inf and math.isnan(result[0][1])
    assert result[1] == -math.inf and math.isnan(result[2])


# --- 8. a step raising CancelledError, or an exception whose repr fails ------------------------


class _Unprintable(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("repr is broken")

    def __str__(self) -> str:
        raise RuntimeError("str is broken")


@pytest.mark.parametrize("error", [asyncio.CancelledError, _Unprintable])
async def test_item8_odd_step_errors_go_to_the_retry_worker(error: type[BaseException]) -> None:
    """Item 8: a step raising CancelledError without being cancelled, or an exception whose
    repr fails, counts as a raised step: WillRetryLater, then retried to the end."""
    raised: list[int] = []

    async def flaky(input: Any, progress: Any) -> Success[str]:
        if not raised:
            raised.append(1)
            raise error()
        return Success("done")

    definition = Definition("odd", steps=[Step(flaky, name="s0")], result=lambda i, p: p.values())
    async with Kapbit([definition], MemRepository(), options=_quiet()) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "odd", None)
        assert await kbit.wait_result("w", timeout=5) == ["done"]


# --- 9. close() with a step that swallows cancellation ---------------------------------------


async def test_item9_close_is_bounded_when_a_step_swallows_cancellation() -> None:
    """Item 9: close(timeout) returns although a step ignores cancellation; the workflow
    stays open for the next instance, which finishes it."""
    repo = MemRepository()
    stop = asyncio.Event()
    entered = asyncio.Event()

    async def stubborn(input: Any, progress: Any) -> Success[str]:
        entered.set()
        while not stop.is_set():
            try:
                await stop.wait()
            except asyncio.CancelledError:
                continue  # swallowed
        return Success("late")

    definition = Definition("stubborn", steps=[Step(stubborn, name="s0")], result=lambda i, p: 1)
    kbit = Kapbit([definition], repo, options=_quiet())
    await kbit.start()
    task = asyncio.create_task(kbit.exec_workflow("w", "stubborn", None))
    await entered.wait()
    try:
        await asyncio.wait_for(kbit.close(timeout=0.01), 5)
    finally:
        stop.set()
    with pytest.raises((InstanceClosed, Fenced)):
        await task
    assert "workflow_result" not in [r.kind for r in live_records(repo)]

    async def quick(input: Any, progress: Any) -> Success[str]:
        return Success("resumed")

    again = Definition("stubborn", steps=[Step(quick, name="s0")], result=lambda i, p: 2)
    async with Kapbit([again], repo, options=_quiet()) as b:
        assert await b.wait_result("w", timeout=5) == 2


async def test_item9_close_is_bounded_when_a_retried_step_swallows_cancellation() -> None:
    """Item 9: the same for a step the retry worker is running when close() is called."""
    stop, retried = asyncio.Event(), asyncio.Event()
    attempts: list[int] = []

    async def flaky(input: Any, progress: Any) -> Success[str]:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("down")
        retried.set()
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await stop.wait()
        return Success("late")

    definition = Definition("flaky", steps=[Step(flaky, name="s0")], result=lambda i, p: 1)
    kbit = Kapbit([definition], MemRepository(), options=_quiet())
    await kbit.start()
    with pytest.raises(WillRetryLater):
        await kbit.exec_workflow("w", "flaky", None)
    await retried.wait()
    try:
        await asyncio.wait_for(kbit.close(timeout=0.01), 5)
    finally:
        stop.set()


# --- 11. transient errors during start ---------------------------------------------------------


@pytest.mark.parametrize("operation", ["load_checkpoints", "end_offset", "read", "current_owner"])
async def test_item11_start_retries_transient_errors(operation: Any) -> None:
    """Item 11: a transient storage error while starting is retried, not fatal."""
    inner = MemRepository()
    async with Kapbit([gated_saga(None, [])], inner, options=_quiet()) as kbit:
        await kbit.exec_workflow("w", "gated", {"id": "w"})
    faults = FaultyRepository(inner)
    fault = faults.fail(times=3, operations=(operation,))
    async with Kapbit([gated_saga(None, [])], faults, options=_quiet()) as kbit:
        assert fault.hits == 3
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "gated", {"id": "w"})


async def test_item11_a_start_that_cannot_read_does_not_fence_the_live_owner() -> None:
    """Item 11: a start failing on storage errors gives up after start_timeout with
    StartupError, before it claims anything: the live owner keeps working."""
    inner = MemRepository()
    live = Kapbit([gated_saga(None, [])], inner, options=_quiet())
    await live.start()
    faults = FaultyRepository(inner)
    faults.fail(operations=("load_checkpoints", "read", "end_offset"))
    claims = len([r for r in inner.records(0) if r.kind == "active_writer"])
    failing = Kapbit([gated_saga(None, [])], faults, options=_quiet(start_timeout=0.2))
    with pytest.raises(StartupError):
        await failing.start()
    assert len([r for r in inner.records(0) if r.kind == "active_writer"]) == claims
    assert await live.exec_workflow("after", "gated", {"id": "after"}) == [
        "after",
        "after-0",
        "after-1",
        "after-2",
    ]
    await live.close()


async def test_item11_a_start_that_cannot_recover_the_log_does_not_fence_the_owner() -> None:
    """Item 11: a start that would fail on what it reads (a workflow type it does not
    know) fails before it claims anything: the live owner finishes its work."""
    repo = MemRepository()
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []
    live = Kapbit([gated_saga(release, calls)], repo, options=_quiet())
    await live.start()
    task = asyncio.create_task(live.exec_workflow("w", "gated", {"id": "w"}))
    await wait_until(lambda: ("w", 1) in calls)
    before = repo.records(0)
    other = Kapbit([gated_saga(None, [], name="other")], repo, options=_quiet())
    with pytest.raises(UnknownWorkflowType):
        await other.start()
    assert repo.records(0) == before
    release.set()
    assert await task == ["w", "w-0", "w-1", "w-2"]
    await live.close()


async def test_item11_starts_succeed_through_random_transient_faults() -> None:
    """Item 11: 20 restarts, each with 30% of its storage calls (reads, owner checks,
    checkpoint loads and saves, appends) failing transiently: every start succeeds and
    recovers the log's ids."""
    inner = MemRepository(partitions=4)
    ids = [f"w{i}" for i in range(20)]
    await _run_ids(inner, ids, window=100)
    rng = random.Random(16)
    operations: Any = ("append", "read", "end_offset", "current_owner", "load_checkpoints")
    failures = 0
    for _ in range(20):
        faults = FaultyRepository(inner)
        fault = faults.fail(when=lambda call: rng.random() < 0.3, operations=operations)
        async with Kapbit([gated_saga(None, [])], faults, options=_quiet()) as kbit:
            failures += fault.hits
            fault.release()
            wid = rng.choice(ids)
            with pytest.raises(DuplicateWorkflow):
                await kbit.exec_workflow(wid, "gated", {"id": wid})
    assert failures > 20


# --- wrong or untyped errors -----------------------------------------------------------------


async def test_lone_surrogate_workflow_id_is_an_invalid_id_and_writes_nothing() -> None:
    """Untyped errors: a workflow id that is not valid UTF-8 text raises InvalidWorkflowId."""
    repo = MemRepository(partitions=3)
    async with Kapbit([gated_saga(None, [])], repo, options=_quiet()) as kbit:
        with pytest.raises(InvalidWorkflowId):
            await kbit.exec_workflow("bad-\ud800", "gated", {"id": "x"})
    assert {r.kind for r in repo.records()} == {"active_writer"}


async def test_deeply_nested_input_is_an_encode_error_and_writes_nothing() -> None:
    """Untyped errors: an input nested too deeply to encode raises EncodeError."""
    nested: Any = []
    for _ in range(100_000):
        nested = [nested]
    repo = MemRepository()
    async with Kapbit([gated_saga(None, [])], repo, options=_quiet()) as kbit:
        with pytest.raises(EncodeError):
            await kbit.exec_workflow("w", "gated", nested)
    assert {r.kind for r in repo.records()} == {"active_writer"}


def test_codec_mismatch_is_a_corrupt_record() -> None:
    """A CodecMismatch is caught by handlers of CorruptRecord (what it was before)."""
    assert issubclass(CodecMismatch, CorruptRecord)
