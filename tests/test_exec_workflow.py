"""exec_workflow on the in-memory repository: the saga semantics and the exact log."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from kapbit import (
    Definition,
    DuplicateWorkflow,
    EncodeError,
    Failure,
    GateClosed,
    InstanceClosed,
    InvalidReturnValue,
    InvalidWorkflowId,
    Kapbit,
    Options,
    PayloadTooLarge,
    Progress,
    Step,
    Success,
    TooManyWorkflows,
    UnknownWorkflowType,
    WillRetryLater,
    partition_for,
)
from kapbit.events import ActiveWriter, StepOutcome, WorkflowCreated, WorkflowResult
from kapbit.repository import MemRepository
from tests.helpers import Script, kinds, log_events, saga, wait_until


async def test_happy_path_runs_every_step_and_returns_the_result() -> None:
    script = Script()
    repo = MemRepository(partitions=2)
    async with Kapbit([saga(script)], repo) as kbit:
        result = await kbit.exec_workflow("w1", "saga", {"id": "w1"})
    assert result == {"values": ["exec-0", "exec-1", "exec-2"], "compensated": []}
    assert script.calls == [("w1", 0, "execute"), ("w1", 1, "execute"), ("w1", 2, "execute")]
    assert kbit.stats.succeeded == 1


async def test_event_log_of_a_three_step_saga_is_exact() -> None:
    repo = MemRepository(partitions=3)
    async with Kapbit([saga(Script())], repo, options=Options(node_id="node-a")) as kbit:
        await kbit.exec_workflow("order-42", "saga", {"id": "order-42"})
    partition = partition_for("order-42", 3)
    # Every partition starts with this node's ActiveWriter.
    for p in range(3):
        first = repo.records(p)[0]
        assert (first.kind, first.node, first.offset) == ("active_writer", kbit.writer_id, 0)
    records = repo.records(partition)
    assert [r.kind for r in records] == [
        "active_writer",
        "workflow_created",
        "step_outcome",
        "step_outcome",
        "step_outcome",
        "workflow_result",
    ]
    assert [r.offset for r in records] == list(range(6))
    assert all(r.key == "order-42" for r in records[1:])
    assert all(r.node == kbit.writer_id for r in records)
    assert kbit.writer_id.startswith("node-a/") and kbit.node_id == "node-a"
    events = [e for p, _, e in log_events(repo) if p == partition]
    assert events[0] == ActiveWriter(kbit.writer_id, events[0].at, codec="json", window=10_000)
    created = events[1]
    assert isinstance(created, WorkflowCreated)
    assert (created.id, created.type) == ("order-42", "saga")
    assert msgspec.json.decode(created.input) == {"id": "order-42"}
    outcomes = events[2:5]
    assert [(o.step, o.phase, o.success) for o in outcomes if isinstance(o, StepOutcome)] == [
        (0, "execute", True),
        (1, "execute", True),
        (2, "execute", True),
    ]
    result = events[5]
    assert isinstance(result, WorkflowResult) and result.compensated is False
    assert msgspec.json.decode(result.result)["values"] == ["exec-0", "exec-1", "exec-2"]
    # Nothing of this workflow went to another partition.
    for p in range(3):
        if p != partition:
            assert [r.kind for r in repo.records(p)] == ["active_writer"]


@pytest.mark.parametrize("failing", [0, 1, 2])
async def test_failure_at_each_step_compensates_succeeded_steps_in_reverse(failing: int) -> None:
    script = Script({(failing, "execute"): "fail"})
    repo = MemRepository()
    async with Kapbit([saga(script)], repo) as kbit:
        result = await kbit.exec_workflow("w", "saga", {"id": "w"})
    expected_comp = list(range(failing - 1, -1, -1))
    assert script.calls == [("w", i, "execute") for i in range(failing + 1)] + [
        ("w", i, "compensate") for i in expected_comp
    ]
    assert result == {
        "values": [f"exec-{i}" for i in range(failing)],
        "compensated": expected_comp,
    }
    outcomes = [e for _, _, e in log_events(repo) if isinstance(e, StepOutcome)]
    assert [(o.step, o.phase, o.success) for o in outcomes] == [
        (i, "execute", i != failing) for i in range(failing + 1)
    ] + [(i, "compensate", True) for i in expected_comp]
    final = [e for _, _, e in log_events(repo) if isinstance(e, WorkflowResult)]
    assert len(final) == 1 and final[0].compensated is True
    assert kbit.stats.compensated == 1 and kbit.stats.succeeded == 0


async def test_steps_without_compensation_are_skipped_on_the_way_back() -> None:
    script = Script({(3, "execute"): "fail"})
    definition = saga(script, steps=4, compensate=(0, 2))
    async with Kapbit([definition], MemRepository()) as kbit:
        result = await kbit.exec_workflow("w", "saga", {"id": "w"})
    assert [c for c in script.calls if c[2] == "compensate"] == [
        ("w", 2, "compensate"),
        ("w", 0, "compensate"),
    ]
    assert result["compensated"] == [2, 0]


async def test_progress_seen_by_each_step_and_the_result_builder() -> None:
    seen_by_builder: list[Any] = []

    def builder(input: Any, progress: Progress) -> Any:
        seen_by_builder.append(
            (
                progress.value("s0"),
                progress.value(1),
                progress.execution("s2"),
                [i for i, _ in progress.compensations],
                progress.failed_step,
            )
        )
        return "done"

    script = Script({(2, "execute"): "fail"})
    base = saga(script)
    definition = Definition("saga", base.steps, builder, outcome_type=str)
    async with Kapbit([definition], MemRepository()) as kbit:
        assert await kbit.exec_workflow("w", "saga", {"id": "w"}) == "done"
    assert script.seen == [
        (0, "execute", []),
        (1, "execute", [(0, "exec-0")]),
        (2, "execute", [(0, "exec-0"), (1, "exec-1")]),
        (1, "compensate", [(0, "exec-0"), (1, "exec-1"), (2, "no-2")]),
        (0, "compensate", [(0, "exec-0"), (1, "exec-1"), (2, "no-2")]),
    ]
    assert seen_by_builder == [("exec-0", "exec-1", Failure("no-2"), [1, 0], 2)]


async def test_sync_and_async_actions_both_work() -> None:
    def sync_step(input: int, progress: Progress) -> Success[int]:
        return Success(input + 1)

    async def async_step(input: int, progress: Progress) -> Success[int]:
        await asyncio.sleep(0)
        return Success(progress.value(0) * 10)

    definition = Definition(
        "mixed",
        [Step(sync_step), Step(async_step)],
        result=lambda input, progress: progress.values(),
        input_type=int,
        outcome_type=int,
    )
    async with Kapbit([definition], MemRepository()) as kbit:
        assert await kbit.exec_workflow("m", "mixed", 4) == [5, 50]


# --- refusals: each is its own type and writes nothing ---------------------------------------


async def _refused(kbit: Kapbit, repo: MemRepository, error: type[Exception], *args: Any) -> None:
    before = len(repo.records())
    with pytest.raises(error):
        await kbit.exec_workflow(*args)
    assert len(repo.records()) == before, "a refused call wrote to the log"


async def test_unknown_type_is_refused_and_nothing_written() -> None:
    repo = MemRepository()
    async with Kapbit([saga(Script())], repo) as kbit:
        await _refused(kbit, repo, UnknownWorkflowType, "w", "nope", {"id": "w"})
        with pytest.raises(UnknownWorkflowType, match=r"'nope'.*registered: saga"):
            await kbit.exec_workflow("w", "nope", {})


async def test_duplicate_id_is_refused_while_running_and_after_finishing() -> None:
    release = asyncio.Event()

    async def slow(input: Any, progress: Progress) -> Success[None]:
        await release.wait()
        return Success()

    definition = Definition("slow", [Step(slow)])
    repo = MemRepository()
    async with Kapbit([definition], repo) as kbit:
        first = asyncio.create_task(kbit.exec_workflow("dup", "slow"))
        await wait_until(lambda: kbit.stats.in_flight == 1)
        await _refused(kbit, repo, DuplicateWorkflow, "dup", "slow")
        release.set()
        await first
        await _refused(kbit, repo, DuplicateWorkflow, "dup", "slow")


async def test_unencodable_input_is_refused_and_nothing_written() -> None:
    repo = MemRepository()
    async with Kapbit([saga(Script())], repo) as kbit:
        await _refused(kbit, repo, EncodeError, "w", "saga", {"id": object()})
        # The id was not consumed: a correct call with it works.
        assert (await kbit.exec_workflow("w", "saga", {"id": "w"}))["values"]


async def test_input_over_the_payload_limit_is_refused_and_nothing_written() -> None:
    repo = MemRepository(max_payload=512)
    async with Kapbit([saga(Script())], repo) as kbit:
        await _refused(kbit, repo, PayloadTooLarge, "big", "saga", {"id": "x" * 1000})
        assert kbit.stats.in_flight == 0


async def test_invalid_id_is_refused() -> None:
    repo = MemRepository()
    async with Kapbit([saga(Script())], repo) as kbit:
        await _refused(kbit, repo, InvalidWorkflowId, "", "saga", {"id": ""})


async def test_calls_on_a_closed_or_unstarted_instance_are_refused() -> None:
    repo = MemRepository()
    kbit = Kapbit([saga(Script())], repo)
    with pytest.raises(InstanceClosed):
        await kbit.exec_workflow("w", "saga", {"id": "w"})
    assert repo.records() == []
    await kbit.start()
    await kbit.close()
    await kbit.close()  # idempotent
    await _refused(kbit, repo, InstanceClosed, "w", "saga", {"id": "w"})


async def test_closed_gate_refuses_and_writes_nothing() -> None:
    repo = MemRepository()
    async with Kapbit([saga(Script())], repo) as kbit:
        kbit.gate.close("test")
        await _refused(kbit, repo, GateClosed, "w", "saga", {"id": "w"})
        kbit.gate.open()
        await kbit.exec_workflow("w", "saga", {"id": "w"})


async def test_checks_run_in_the_documented_order() -> None:
    repo = MemRepository()
    async with Kapbit([saga(Script())], repo, options=Options(max_workflows=1)) as kbit:
        await kbit.exec_workflow("done", "saga", {"id": "done"})
        kbit.gate.close("test")
        # gate before type, type before duplicate.
        with pytest.raises(GateClosed):
            await kbit.exec_workflow("done", "nope", {"id": object()})
        kbit.gate.open()
        with pytest.raises(UnknownWorkflowType):
            await kbit.exec_workflow("done", "nope", {"id": object()})
        # duplicate before encode
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("done", "saga", {"id": object()})


async def test_max_workflows_reached_and_freed() -> None:
    release = asyncio.Event()

    async def wait(input: Any, progress: Progress) -> Success[None]:
        await release.wait()
        return Success()

    repo = MemRepository()
    async with Kapbit(
        [Definition("wait", [Step(wait)])], repo, options=Options(max_workflows=3)
    ) as kbit:
        running = [asyncio.create_task(kbit.exec_workflow(f"w{i}", "wait")) for i in range(3)]
        await wait_until(lambda: kbit.stats.in_flight == 3)
        await _refused(kbit, repo, TooManyWorkflows, "w3", "wait")
        release.set()
        await asyncio.gather(*running)
        assert kbit.stats.in_flight == 0
        assert await kbit.exec_workflow("w3", "wait") == [None]


async def test_step_exception_raises_will_retry_later_and_holds_the_slot() -> None:
    script = Script({(1, "execute"): "raise"})
    repo = MemRepository()
    options = Options(max_workflows=1)
    async with Kapbit([saga(script)], repo, options=options) as kbit:
        with pytest.raises(WillRetryLater) as caught:
            await kbit.exec_workflow("w", "saga", {"id": "w"})
        assert isinstance(caught.value.__cause__, ConnectionError)
        assert kbit.stats.in_flight == 1
        with pytest.raises(TooManyWorkflows):
            await kbit.exec_workflow("other", "saga", {"id": "other"})
        # The step that raised left no outcome: only step 0's is in the log.
        assert kinds(repo, "w") == ["workflow_created", "step_outcome"]


async def test_thousand_concurrent_workflows_all_complete_with_their_results() -> None:
    async def echo(input: int, progress: Progress) -> Success[int]:
        await asyncio.sleep(0)
        return Success(input * 2)

    def add_one(input: int, progress: Progress) -> Success[int]:
        return Success(progress.value(0) + 1)

    definition = Definition(
        "calc",
        [Step(echo), Step(add_one), Step(add_one)],
        result=lambda input, progress: (input, progress.values()),
        input_type=int,
        outcome_type=int,
    )
    repo = MemRepository(partitions=4)
    async with Kapbit([definition], repo, options=Options(max_workflows=1000)) as kbit:
        results = await asyncio.gather(
            *(kbit.exec_workflow(f"c{i}", "calc", i) for i in range(1000))
        )
    assert results == [(i, [i * 2, i * 2 + 1, i * 2 + 1]) for i in range(1000)]
    assert kinds(repo).count("workflow_result") == 1000
    assert kinds(repo).count("step_outcome") == 3000
    assert kbit.stats.succeeded == 1000 and kbit.stats.in_flight == 0
    # Each workflow's events sit in the partition murmur2 gives.
    for record in repo.records():
        if record.kind != "active_writer":
            assert record.partition == partition_for(record.key, 4)


async def test_invalid_step_outcome_ends_the_workflow_without_retry() -> None:
    def bad(input: Any, progress: Progress) -> str:
        return "not an outcome"

    repo = MemRepository()
    async with Kapbit([Definition("bad", [Step(bad)])], repo) as kbit:  # type: ignore[arg-type]
        with pytest.raises(InvalidReturnValue, match="must return Success"):
            await kbit.exec_workflow("b", "bad")
        assert kbit.stats.retrying == 0


async def test_caller_cancellation_does_not_stop_the_workflow() -> None:
    gate = asyncio.Event()

    async def slow(input: Any, progress: Progress) -> Success[str]:
        await gate.wait()
        return Success("ok")

    repo = MemRepository()
    async with Kapbit([Definition("slow", [Step(slow), Step(slow)])], repo) as kbit:
        caller = asyncio.create_task(kbit.exec_workflow("c", "slow"))
        await wait_until(lambda: kbit.stats.in_flight == 1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gate.set()
        assert await kbit.wait_result("c", timeout=5) == ["ok", "ok"]
        # The dropped outcome left the instance running: the next call is served.
        assert await kbit.exec_workflow("d", "slow") == ["ok", "ok"]
    assert kinds(repo, "c")[-1] == "workflow_result"


async def test_outcome_values_round_trip_with_declared_types() -> None:
    class Item(msgspec.Struct):
        sku: str
        qty: int

    def reserve(input: list[Item], progress: Progress) -> Success[Item]:
        return Success(Item(input[0].sku, input[0].qty + 1))

    definition = Definition(
        "typed",
        [Step(reserve)],
        result=lambda input, progress: progress.value(0),
        input_type=list[Item],
        outcome_type=Item,
        result_type=Item,
    )
    repo = MemRepository()
    async with Kapbit([definition], repo) as kbit:
        assert await kbit.exec_workflow("t", "typed", [Item("a", 1)]) == Item("a", 2)
