"""Recovery from the log on the in-memory repository: crashes at every event boundary,
in-flight workflows resumed exactly after their last outcome, the idempotency window
rebuilt, corrupt records refused."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import msgspec
import pytest

from kapbit import (
    CorruptRecord,
    DeadLettered,
    DuplicateWorkflow,
    Fenced,
    InstanceClosed,
    JsonCodec,
    Kapbit,
    Options,
    RetryPolicy,
    TooManyWorkflows,
    WillRetryLater,
    WorkflowNotFound,
    partition_for,
)
from kapbit.events import (
    ActiveWriter,
    DeadLetter,
    EventKind,
    StepOutcome,
    WorkflowCreated,
    WorkflowResult,
    WorkflowRetry,
)
from kapbit.idempotency import IdempotencyWindow
from kapbit.options import Backoff
from kapbit.repository import MemRepository
from kapbit.testing.faults import FaultyRepository
from tests.helpers import (
    CrashRepository,
    Script,
    YieldingScript,
    check_history,
    gated_saga,
    histories,
    kinds,
    saga,
    signature,
)

FAST_RETRY = RetryPolicy(
    fast=Backoff(initial=0.001, maximum=0.005, jitter=0.001), slow_interval=0.01, max_attempts=3
)

# Behaviours of the 3-step saga, and what each of one workflow's appends persists.
_EXECUTED = [(0, "execute"), (1, "execute"), (2, "execute")]
PHASES: dict[str, tuple[dict[tuple[int, str], str], list[Any]]] = {
    "execute": ({}, ["created", *_EXECUTED, "result"]),
    "compensate": (
        {(2, "execute"): "fail"},
        ["created", *_EXECUTED, (1, "compensate"), (0, "compensate"), "result"],
    ),
}
CRASH_CASES = [
    pytest.param(phase, at, land, id=f"{phase}-append{at}-{'landed' if land else 'lost'}")
    for phase, (_, appends) in PHASES.items()
    for at in range(1, len(appends) + 1)
    for land in (False, True)
]


async def _reference(
    behaviour: dict[tuple[int, str], str], workflow_id: str = "w"
) -> tuple[list[tuple[Any, ...]], Any, Script]:
    """History signature, result and script of an uninterrupted run."""
    script = Script(dict(behaviour))
    repo = MemRepository()
    async with Kapbit([saga(script)], repo) as kbit:
        result = await kbit.exec_workflow(workflow_id, "saga", {"id": workflow_id})
    return signature(histories(repo)[workflow_id]), result, script


def _terminated(repo: MemRepository, workflow_id: str) -> bool:
    return any(
        k in ("workflow_result", "dead_letter", "rejected") for k in kinds(repo, workflow_id)
    )


@pytest.mark.parametrize(("phase", "crash_at", "land"), CRASH_CASES)
async def test_crash_at_every_event_boundary(phase: str, crash_at: int, land: bool) -> None:
    """The instance dies at the ``crash_at``-th append of a 3-step saga (before or after
    that record lands); the next instance finishes the workflow with the very same log."""
    behaviour, appends = PHASES[phase]
    expected_history, expected_result, reference = await _reference(behaviour)

    script = Script(dict(behaviour))
    repo = CrashRepository()
    first = Kapbit([saga(script)], repo, options=Options(node_id="first"))
    await first.start()
    repo.hold(crash_at, land=land, then=first.abort)
    call = asyncio.create_task(first.exec_workflow("w", "saga", {"id": "w"}))
    await asyncio.wait_for(repo.held.wait(), 5)
    with pytest.raises(InstanceClosed):
        await call
    ran_before = len(script.calls)

    created = "workflow_created" in kinds(repo, "w")
    assert created == (crash_at > 1 or land)
    persisted = {
        (e.step, e.phase) for e in histories(repo).get("w", []) if isinstance(e, StepOutcome)
    }
    terminated = _terminated(repo, "w")
    assert terminated == (crash_at == len(appends) and land)

    async with Kapbit([saga(script)], repo, options=Options(node_id="second")) as second:
        assert second.stats.recovered == (1 if created and not terminated else 0)
        if not created:
            # Never written: the workflow does not exist and its id is free.
            result = await second.exec_workflow("w", "saga", {"id": "w"})
        elif terminated:
            with pytest.raises(WorkflowNotFound):
                await second.wait_result("w")
            result = expected_result
        else:
            result = await second.wait_result("w", timeout=5)
        with pytest.raises(DuplicateWorkflow):
            await second.exec_workflow("w", "saga", {"id": "w"})

    events = histories(repo)["w"]
    check_history("w", events, steps=3, compensable={0, 1, 2})
    assert signature(events) == expected_history
    final = events[-1]
    assert isinstance(final, WorkflowResult)
    assert msgspec.json.decode(final.result) == expected_result
    assert result == expected_result

    # No step whose outcome was in the log ran again, and the resumed steps saw exactly
    # the progress they see in an uninterrupted run.
    resumed = script.calls[ran_before:]
    assert not [c for c in resumed if (c[1], c[2]) in persisted]
    expected_seen = {(s, p): seen for s, p, seen in reference.seen}
    for step, step_phase, seen in script.seen[ran_before:]:
        assert seen == expected_seen[(step, step_phase)]
    # Every step ran once, except the one whose outcome was being written when the
    # instance died without it landing: that one ran again.
    counts = Counter((step, step_phase) for _, step, step_phase in script.calls)
    twice = {key for key, count in counts.items() if count == 2}
    held = appends[crash_at - 1]
    assert twice == ({held} if isinstance(held, tuple) and not land else set())
    assert max(counts.values()) <= 2
    assert sorted(counts) == sorted((s, p) for s, p, _ in reference.seen)


async def test_many_workflows_in_flight_at_a_crash_all_finish_as_without_it() -> None:
    """30 interleaved workflows on 3 partitions, two kinds (one compensates); the
    instance dies in the middle; the next one resumes every unfinished workflow."""
    ok, comp = YieldingScript(), YieldingScript({(1, "execute"): "fail"})
    definitions = [saga(ok, name="ok"), saga(comp, name="comp")]
    ids = [(f"w{i}", "ok" if i % 2 else "comp") for i in range(30)]

    reference_repo = MemRepository(partitions=3)
    async with Kapbit(
        [saga(Script(), name="ok"), saga(Script({(1, "execute"): "fail"}), name="comp")],
        reference_repo,
    ) as kbit:
        expected = dict(
            zip(
                [i for i, _ in ids],
                await asyncio.gather(*(kbit.exec_workflow(i, t, {"id": i}) for i, t in ids)),
                strict=True,
            )
        )
    expected_histories = {k: signature(v) for k, v in histories(reference_repo).items()}

    repo = CrashRepository(partitions=3)
    first = Kapbit(definitions, repo, options=Options(node_id="first"))
    await first.start()
    repo.hold(70, then=first.abort)
    calls = [asyncio.create_task(first.exec_workflow(i, t, {"id": i})) for i, t in ids]
    await asyncio.wait_for(repo.held.wait(), 5)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    finished_first = {i for (i, _), r in zip(ids, outcomes, strict=True) if isinstance(r, dict)}
    assert all(isinstance(r, dict | InstanceClosed) for r in outcomes)
    open_ids = [
        i for i, _ in ids if "workflow_created" in kinds(repo, i) and not _terminated(repo, i)
    ]
    assert len(open_ids) > 5, "the crash should catch several workflows in flight"

    async with Kapbit(definitions, repo, options=Options(node_id="second")) as second:
        assert second.stats.recovered == len(open_ids)
        results = {i: await second.wait_result(i, timeout=5) for i in open_ids}
        for i, t in ids:
            if i not in finished_first and i not in results:  # never created
                results[i] = await second.exec_workflow(i, t, {"id": i})

    for i, _ in ids:
        events = histories(repo)[i]
        check_history(i, events, steps=3, compensable={0, 1, 2})
        assert signature(events) == expected_histories[i]
        if i in results:
            assert results[i] == expected[i]


async def test_restart_rebuilds_window_and_in_flight_per_partition() -> None:
    """Finished and in-flight ids are refused after a restart; ids that left the
    (per-partition, configurable) window are accepted; in-flight workflows resume."""
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []
    repo = MemRepository(partitions=2)
    options = Options(node_id="first", idempotency_window=3)
    ids = [f"id{i}" for i in range(20)]
    by_partition: dict[int, list[str]] = {}
    for i in ids:
        by_partition.setdefault(partition_for(i, 2), []).append(i)
    assert sorted(by_partition) == [0, 1] and all(len(v) >= 4 for v in by_partition.values())

    first = Kapbit([gated_saga(None, calls)], repo, options=options)
    await first.start()
    for i in ids:
        await first.exec_workflow(i, "gated", {"id": i})
    await first.close()
    # two more workflows per partition, left in flight by a crash at step 1
    calls.clear()
    first = Kapbit([gated_saga(release, calls)], repo, options=Options(node_id="f2"))
    await first.start()
    stuck = [f"stuck{p}" for p in range(4)]
    tasks = [asyncio.create_task(first.exec_workflow(i, "gated", {"id": i})) for i in stuck]
    await asyncio.wait_for(_until(lambda: sum(s == 1 for _, s in calls) == len(stuck)), 5)
    first.abort()
    await asyncio.gather(*tasks, return_exceptions=True)

    calls.clear()
    second = Kapbit(
        [gated_saga(None, calls)], repo, options=Options(node_id="second", idempotency_window=3)
    )
    async with second:
        assert second.stats.recovered == len(stuck)
        for i in stuck:
            with pytest.raises(DuplicateWorkflow):
                await second.exec_workflow(i, "gated", {"id": i})
        for p, members in by_partition.items():
            recent_stuck = [s for s in stuck if partition_for(s, 2) == p]
            in_window = (members + recent_stuck)[-3:]
            for i in in_window:
                with pytest.raises(DuplicateWorkflow):
                    await second.exec_workflow(i, "gated", {"id": i})
            # the oldest id of the partition has left the window: a new workflow
            oldest = members[0]
            assert oldest not in in_window
            assert await second.exec_workflow(oldest, "gated", {"id": oldest}) is not None
        results = [await second.wait_result(i, timeout=5) for i in stuck]
    assert results == [[i, f"{i}-0", f"{i}-1", f"{i}-2"] for i in stuck]
    # resumed after step 0: only steps 1 and 2 ran again for them
    assert sorted(c for c in calls if c[0].startswith("stuck")) == sorted(
        (i, s) for i in stuck for s in (1, 2)
    )


async def _until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 - polls engine state with no event to wait on
        await asyncio.sleep(0.001)


async def test_recovered_workflows_hold_max_workflows_slots() -> None:
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []
    repo = MemRepository()
    first = Kapbit([gated_saga(release, calls)], repo, options=Options(node_id="first"))
    await first.start()
    tasks = [asyncio.create_task(first.exec_workflow(i, "gated", {"id": i})) for i in "ab"]
    await asyncio.wait_for(_until(lambda: len(calls) == 4), 5)
    first.abort()
    await asyncio.gather(*tasks, return_exceptions=True)

    again = asyncio.Event()
    options = Options(node_id="second", max_workflows=2)
    async with Kapbit([gated_saga(again, calls)], repo, options=options) as second:
        assert second.stats.recovered == 2 and second.stats.in_flight == 2
        with pytest.raises(TooManyWorkflows):
            await second.exec_workflow("c", "gated", {"id": "c"})
        again.set()
        assert await second.wait_result("a", timeout=5) == ["a", "a-0", "a-1", "a-2"]
        assert await second.wait_result("b", timeout=5) == ["b", "b-0", "b-1", "b-2"]
        assert await second.exec_workflow("c", "gated", {"id": "c"}) == ["c", "c-0", "c-1", "c-2"]


async def test_retrying_workflow_keeps_its_attempt_count_across_a_crash() -> None:
    """Step 1 always raises; the instance dies after the first retry attempt was
    recorded; the next one goes on with attempts 2 and 3, then dead-letters."""
    script = Script({(1, "execute"): "raise"})
    repo = CrashRepository()
    options = Options(node_id="first", retry=FAST_RETRY)
    first = Kapbit([saga(script)], repo, options=options)
    await first.start()
    # created, outcome 0, then (step 1 raises) retry 1 lands and the instance dies
    repo.hold(3, land=True)
    with pytest.raises(WillRetryLater):
        await first.exec_workflow("w", "saga", {"id": "w"})
    await asyncio.wait_for(repo.held.wait(), 5)
    first.abort()
    assert kinds(repo, "w") == ["workflow_created", "step_outcome", "workflow_retry"]

    options = Options(node_id="second", retry=FAST_RETRY)
    async with Kapbit([saga(script)], repo, options=options) as second:
        assert second.stats.recovered == 1
        with pytest.raises(DeadLettered) as caught:
            await second.wait_result("w", timeout=5)
        assert caught.value.attempts == 3
    events = histories(repo)["w"]
    check_history("w", events, steps=3, compensable={0, 1, 2})
    assert [e.attempt for e in events if isinstance(e, WorkflowRetry)] == [1, 2, 3]
    final = events[-1]
    assert isinstance(final, DeadLetter) and final.attempts == 3
    # step 0 ran once; step 1: the first call, then once per attempt after the crash
    assert Counter((s, p) for _, s, p in script.calls) == {(0, "execute"): 1, (1, "execute"): 3}


async def test_an_id_reused_after_leaving_the_window_is_a_new_workflow_on_recovery() -> None:
    """Window of 2: ``a`` finishes, ``b`` and ``c`` push it out, ``a`` is accepted again and
    is in flight at a crash: recovery must resume the second ``a``, not take its
    WorkflowCreated for a second copy of the first one."""
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []
    repo = MemRepository()
    options = Options(node_id="first", idempotency_window=2)
    first = Kapbit(
        [gated_saga(None, calls, name="quick"), gated_saga(release, calls)], repo, options=options
    )
    await first.start()
    for i in "abc":
        await first.exec_workflow(i, "quick", {"id": i})
    task = asyncio.create_task(first.exec_workflow("a", "gated", {"id": "a"}))
    await asyncio.wait_for(_until(lambda: calls[-1] == ("a", 1)), 5)
    first.abort()
    with pytest.raises(InstanceClosed):
        await task

    calls.clear()
    options = Options(node_id="second", idempotency_window=2)
    async with Kapbit(
        [gated_saga(None, calls, name="quick"), gated_saga(None, calls)], repo, options=options
    ) as second:
        assert second.stats.recovered == 1
        assert await second.wait_result("a", timeout=5) == ["a", "a-0", "a-1", "a-2"]
        with pytest.raises(DuplicateWorkflow):
            await second.exec_workflow("a", "quick", {"id": "a"})
    assert calls == [("a", 1), ("a", 2)]
    assert kinds(repo, "a").count("workflow_result") == 2


# --- corrupt records -------------------------------------------------------------------------


def _encode(event: Any) -> bytes:
    return JsonCodec().encode(event)


async def _log_with_one_open_workflow() -> tuple[MemRepository, int]:
    """A log where node ``first`` created ``w`` and persisted step 0, then died."""
    repo = MemRepository()
    await repo.claim(0, "first", _encode(ActiveWriter("first", 0.0)))
    await repo.append(
        0,
        EventKind.WORKFLOW_CREATED,
        "w",
        "first",
        _encode(WorkflowCreated("w", "saga", msgspec.Raw(b'{"id":"w"}'), 0.0)),
    )
    offset = await repo.append(
        0,
        EventKind.STEP_OUTCOME,
        "w",
        "first",
        _encode(StepOutcome("w", 0, "execute", True, msgspec.Raw(b'"exec-0"'))),
    )
    return repo, offset


# A Kafka record whose kind header names no event: tests/test_kafka_faults.py.
CORRUPTIONS = {
    "garbage payload": (EventKind.STEP_OUTCOME, "w", b"\x00\x01 not json"),
    "wrong shape": (EventKind.STEP_OUTCOME, "w", b'{"kind":EventKind.STEP_OUTCOME,"id":"w"}'),
    "key mismatch": (
        EventKind.STEP_OUTCOME,
        "w",
        _encode(StepOutcome("other", 1, "execute", True, msgspec.Raw(b'"x"'))),
    ),
    "kind mismatch": (
        EventKind.WORKFLOW_RESULT,
        "w",
        _encode(StepOutcome("w", 1, "execute", True, msgspec.Raw(b'"x"'))),
    ),
    "step out of range": (
        EventKind.STEP_OUTCOME,
        "w",
        _encode(StepOutcome("w", 7, "execute", True, msgspec.Raw(b'"x"'))),
    ),
    "undecodable outcome value": (
        EventKind.STEP_OUTCOME,
        "w",
        _encode(StepOutcome("w", 1, "execute", True, msgspec.Raw(b"[1, 2]"))),
    ),
    "finished workflow's record": (EventKind.WORKFLOW_RESULT, "done", b"garbage"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
async def test_a_corrupt_record_stops_the_start_naming_partition_offset_and_cause(
    corruption: str,
) -> None:
    repo, _ = await _log_with_one_open_workflow()
    kind, key, value = CORRUPTIONS[corruption]
    bad = await repo.append(0, kind, key, "first", value)
    before = len(repo.records())
    kbit = Kapbit([saga(Script())], repo, options=Options(node_id="second"))
    with pytest.raises(CorruptRecord) as caught:
        await kbit.start()
    error = caught.value
    assert (error.partition, error.offset) == (0, bad)
    assert f"partition 0, offset {bad}" in str(error)
    assert error.cause
    assert not kbit.is_running
    with pytest.raises(InstanceClosed):
        await kbit.exec_workflow("x", "saga", {"id": "x"})
    # nothing was written: the start reads the log up to its end before claiming it
    assert len(repo.records()) == before


async def test_an_undecodable_input_stops_the_start() -> None:
    repo = MemRepository()
    await repo.claim(0, "first", _encode(ActiveWriter("first", 0.0)))
    bad = await repo.append(
        0,
        EventKind.WORKFLOW_CREATED,
        "w",
        "first",
        _encode(WorkflowCreated("w", "saga", msgspec.Raw(b"[1]"), 0.0)),
    )
    with pytest.raises(CorruptRecord, match=rf"partition 0, offset {bad}: input"):
        await Kapbit([saga(Script())], repo).start()


async def test_a_zombie_garbage_record_is_ignored_not_decoded() -> None:
    """Records written by a node after another node's claim are never acted on: not
    even decoded."""
    repo, _ = await _log_with_one_open_workflow()
    await repo.claim(0, "other", _encode(ActiveWriter("other", 0.0)))
    with pytest.raises(Fenced):
        await repo.append(0, EventKind.STEP_OUTCOME, "w", "first", b"\x00 garbage from a zombie")
    script = Script()
    async with Kapbit([saga(script)], repo, options=Options(node_id="third")) as kbit:
        assert kbit.stats.recovered == 1
        assert (await kbit.wait_result("w", timeout=5))["values"] == ["exec-0", "exec-1", "exec-2"]
    assert script.calls == [("w", 1, "execute"), ("w", 2, "execute")]


async def test_second_copies_left_by_producer_retries_are_ignored_by_recovery() -> None:
    """A lost acknowledgement makes the emitter append WorkflowCreated and a StepOutcome
    twice; recovery counts each once, resumes after step 0 and refuses the id."""
    inner = MemRepository()
    faults = FaultyRepository(inner)
    faults.fail(times=1, kinds="workflow_created", lost_ack=True)
    faults.fail(times=1, kinds="step_outcome", lost_ack=True)
    tiny = Backoff(initial=0.001, maximum=0.002, jitter=0.001)
    release = asyncio.Event()
    calls: list[tuple[str, int]] = []
    first = Kapbit(
        [gated_saga(release, calls)], faults, options=Options(node_id="first", emit_backoff=tiny)
    )
    await first.start()
    task = asyncio.create_task(first.exec_workflow("w", "gated", {"id": "w"}))
    await asyncio.wait_for(_until(lambda: ("w", 1) in calls), 5)
    first.abort()
    with pytest.raises(InstanceClosed):
        await task
    assert kinds(inner, "w") == ["workflow_created"] * 2 + ["step_outcome"] * 2

    calls.clear()
    async with Kapbit([gated_saga(None, calls)], inner, options=Options(node_id="second")) as kbit:
        assert kbit.stats.recovered == 1
        assert await kbit.wait_result("w", timeout=5) == ["w", "w-0", "w-1", "w-2"]
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "gated", {"id": "w"})
    assert calls == [("w", 1), ("w", 2)]
    assert kinds(inner, "w").count("workflow_result") == 1


def test_idempotency_window_keeps_the_last_ids_in_order() -> None:
    window = IdempotencyWindow(3, [("a", 1), ("b", 5)])
    window.add("a", 9)  # a second copy: ignored, "a" keeps its place and offset
    window.add("c", 10)
    assert list(window.entries()) == [("a", 1), ("b", 5), ("c", 10)]
    window.add("d", 11)
    assert list(window.entries()) == [("b", 5), ("c", 10), ("d", 11)]
    assert "a" not in window and "d" in window and len(window) == 3
    assert window.oldest_offset() == 5
    assert IdempotencyWindow(1).oldest_offset() is None
    with pytest.raises(ValueError):
        IdempotencyWindow(0)
