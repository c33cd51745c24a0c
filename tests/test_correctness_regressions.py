"""Regression tests of the engine defects of the correctness issues: each test names the
defect it pins down in its docstring and failed on the engine before that defect's fix."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from kapbit import (
    Backoff,
    BreakerPolicy,
    CheckpointPolicy,
    Definition,
    DuplicateWorkflow,
    Failure,
    InstanceClosed,
    Kapbit,
    Options,
    Progress,
    RecordRejected,
    RetryPolicy,
    Step,
    Success,
    WillRetryLater,
    WorkflowRejected,
    partition_for,
)
from kapbit.errors import InvalidReturnValue
from kapbit.events import EventKind, InvalidReturn, Rejected, StepOutcome, WorkflowResult
from kapbit.idempotency import IdempotencyWindow
from kapbit.projection import Projector, StatusModel, WorkflowStatus
from kapbit.repository import Checkpoint, MemRepository
from kapbit.testing import FaultyRepository
from tests.helpers import kinds, log_events, wait_until

TINY = Backoff(initial=0.001, maximum=0.002, jitter=0.001)
FAST_RETRY = RetryPolicy(fast=TINY, slow_interval=0.01, max_attempts=3)
NO_BREAKER = BreakerPolicy(fail_max=1_000_000, reset_timeout=60.0)


class Steps:
    """Step actions that record their calls; ``(workflow id, step, phase)`` listed in
    ``block`` waits for ``release``; ``answers`` replace what a step returns."""

    def __init__(self, block: Iterable[tuple[str, int, str]] = (), name: str = "wf") -> None:
        self.block = set(block)
        self.calls: list[tuple[str, int, str]] = []
        self.entered: dict[tuple[str, int, str], asyncio.Event] = {}
        self.release = asyncio.Event()
        self.raise_once: set[tuple[str, int, str]] = set()
        self.answers: dict[tuple[int, str], Callable[[str], Any]] = {}
        self.name = name

    def entered_event(self, workflow_id: str, step: int, phase: str) -> asyncio.Event:
        return self.entered.setdefault((workflow_id, step, phase), asyncio.Event())

    def action(self, step: int, phase: str) -> Callable[[dict[str, str], Progress], Any]:
        async def act(input: dict[str, str], progress: Progress) -> Any:
            wid = input["id"]
            self.calls.append((wid, step, phase))
            self.entered_event(wid, step, phase).set()
            if (wid, step, phase) in self.raise_once:
                self.raise_once.discard((wid, step, phase))
                raise ConnectionError(f"step {step} unavailable")
            if (wid, step, phase) in self.block:
                await self.release.wait()
            answer = self.answers.get((step, phase))
            if answer is not None:
                return answer(wid)
            return Success(f"{wid}-{phase[:4]}-{step}")

        return act

    def definition(self, steps: int = 2) -> Definition:
        return Definition(
            self.name,
            steps=[
                Step(self.action(i, "execute"), self.action(i, "compensate"), name=f"s{i}")
                for i in range(steps)
            ],
            result=lambda input, progress: progress.values(),
            input_type=dict[str, str],
            outcome_type=Any,
        )

    def count(self, workflow_id: str, step: int, phase: str = "execute") -> int:
        return self.calls.count((workflow_id, step, phase))


def _id_in(partition: int, partitions: int, prefix: str) -> str:
    """The first id ``prefix-N`` that lands in ``partition``."""
    n = 0
    while partition_for(f"{prefix}-{n}", partitions) != partition:
        n += 1
    return f"{prefix}-{n}"


async def _saved(repo: MemRepository, partition: int) -> Checkpoint:
    return (await repo.load_checkpoints()).get(partition, Checkpoint())


async def _wait_checkpoint(
    repo: MemRepository, partition: int, holds: Callable[[Checkpoint], bool]
) -> Checkpoint:
    """Wait until the saved checkpoint of ``partition`` satisfies ``holds``."""

    async def _poll() -> Checkpoint:
        while not holds(checkpoint := await _saved(repo, partition)):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        return checkpoint

    return await asyncio.wait_for(_poll(), 5)


def _offsets(repo: MemRepository, workflow_id: str, kind: str) -> list[int]:
    return [r.offset for r in repo.records() if r.key == workflow_id and r.kind == kind]


# --- defect 1: a WorkflowCreated written twice, and a checkpoint while the workflow is open


async def _checkpoint_between_copies(kind: str) -> None:
    """Run workflow ``w`` whose ``kind`` event lands twice (a lost ack), save a checkpoint
    while it is open, crash, and check a second instance finishes it exactly once."""
    partitions = 2
    inner = MemRepository(partitions=partitions)
    faults = FaultyRepository(inner)
    done, w = _id_in(0, partitions, "done"), _id_in(0, partitions, "w")
    later = _id_in(1, partitions, "later")
    options = Options(
        node_id="first", emit_backoff=TINY, checkpoints=CheckpointPolicy(every=1), retry=FAST_RETRY
    )
    steps = Steps(block={(w, 1, "execute")})
    if kind == "workflow_retry":
        steps.raise_once.add((w, 0, "execute"))
    first = Kapbit([steps.definition()], faults, options=options)
    await first.start()
    # One earlier finished workflow in the window of partition 0, its checkpoint saved.
    assert await first.exec_workflow(done, "wf", {"id": done}) == [
        f"{done}-exec-0",
        f"{done}-exec-1",
    ]
    end = len(inner.records(0))
    await _wait_checkpoint(inner, 0, lambda c: c.offset == end)

    lost = faults.fail(times=1, kinds=kind, when=lambda call: call.key == w, lost_ack=True)
    task = asyncio.create_task(first.exec_workflow(w, "wf", {"id": w}))
    await asyncio.wait_for(steps.entered_event(w, 1, "execute").wait(), 5)
    assert lost.hits == 1
    assert len(_offsets(inner, w, kind)) == 2  # the record landed twice
    # Another workflow terminates (on another partition): a checkpoint is saved while
    # ``w`` is open; partition 0 is saved before partition 1 in the same round.
    before = await _saved(inner, 1)
    assert await first.exec_workflow(later, "wf", {"id": later}) is not None
    await _wait_checkpoint(inner, 1, lambda c: c.offset > before.offset)
    first_created = _offsets(inner, w, "workflow_created")[0]
    assert (await _saved(inner, 0)).offset <= first_created
    first.abort()
    with pytest.raises(WillRetryLater if kind == "workflow_retry" else InstanceClosed):
        await task

    resumed = Steps()
    async with Kapbit(
        [resumed.definition()],
        inner,
        options=Options(node_id="second", emit_backoff=TINY, retry=FAST_RETRY),
    ) as second:
        assert second.stats.recovered == 1
        assert await second.wait_result(w, timeout=5) == [f"{w}-exec-0", f"{w}-exec-1"]
        with pytest.raises(DuplicateWorkflow):
            await second.exec_workflow(w, "wf", {"id": w})
    assert resumed.calls == [(w, 1, "execute")]  # step 0's outcome was durable
    assert kinds(inner, w).count("workflow_result") == 1


async def test_defect1_open_workflow_survives_a_checkpoint_between_two_created_copies() -> None:
    """Defect 1 (issue 10): WorkflowCreated lands twice (lost ack + emitter retry) and a
    checkpoint is saved while the workflow is open. The checkpoint used to hold at the
    second copy, so recovery read the first copy as a finished id and dropped the real
    one as a duplicate: the workflow was lost and its id refused forever."""
    await _checkpoint_between_copies("workflow_created")


@pytest.mark.parametrize("kind", ["step_outcome", "workflow_retry"])
async def test_defect1_other_events_written_twice_survive_a_checkpoint(kind: str) -> None:
    """Defect 1's shape for the other events an open workflow writes: a second copy of a
    StepOutcome or WorkflowRetry with a checkpoint saved while the workflow is open."""
    await _checkpoint_between_copies(kind)


# --- defect 2: an execute action returning None or a wrong type -----------------------------


async def test_defect2_execute_returning_none_is_success_none_and_runs_once() -> None:
    """Defect 2 (issue 10): an execute action that returns None (a forgotten ``return``)
    was treated as an error and re-run until dead-lettered. None is Success(None)."""
    steps = Steps()
    steps.answers[(0, "execute")] = lambda wid: None
    repo = MemRepository()
    async with Kapbit(
        [steps.definition()], repo, options=Options(retry=FAST_RETRY, emit_backoff=TINY)
    ) as kbit:
        assert await kbit.exec_workflow("w", "wf", {"id": "w"}) == [None, "w-exec-1"]
    assert steps.count("w", 0) == 1
    assert kinds(repo, "w") == [
        "workflow_created",
        "step_outcome",
        "step_outcome",
        "workflow_result",
    ]


async def test_defect2_wrong_return_type_ends_the_workflow_at_once_with_a_typed_error(
    tmp_path: Path,
) -> None:
    """Defect 2 (issue 10): an action returning neither Success, Failure nor None ends the
    workflow at once with an InvalidReturn event naming the step and the type; callers get
    InvalidReturnValue; the side effect never runs again, not even after a restart."""
    steps = Steps()
    steps.answers[(1, "execute")] = lambda wid: 42
    repo = MemRepository()
    options = Options(retry=FAST_RETRY, emit_backoff=TINY)
    async with Kapbit([steps.definition()], repo, options=options) as kbit:
        with pytest.raises(InvalidReturnValue) as raised:
            await kbit.exec_workflow("w", "wf", {"id": "w"})
        assert raised.value.workflow_id == "w"
        assert raised.value.step == 1
        assert "int" in raised.value.reason and "s1" in raised.value.reason
        with pytest.raises(InvalidReturnValue):
            await kbit.wait_result("w")
        assert kbit.stats.invalid_returns == 1 and kbit.stats.retrying == 0
    assert steps.count("w", 1) == 1
    assert steps.count("w", 0, "compensate") == 0
    terminal = [e for _, _, e in log_events(repo) if isinstance(e, InvalidReturn)]
    assert len(terminal) == 1
    assert (terminal[0].step, terminal[0].phase) == (1, "execute")
    assert "returned int" in terminal[0].reason

    async with Kapbit([steps.definition()], repo, options=options) as kbit:
        assert kbit.stats.recovered == 0
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "wf", {"id": "w"})
    assert steps.count("w", 1) == 1

    model = StatusModel(tmp_path / "status.db")
    async with model, Projector(repo, model, definitions=[steps.definition()]) as projector:
        await projector.catch_up()
        row = await model.get("w")
    assert row is not None and row.status is WorkflowStatus.INVALID_RETURN
    assert row.finished_at is not None and "int" in (row.last_error or "")


async def test_defect2_compensation_returning_a_wrong_type_ends_the_workflow() -> None:
    """Defect 2 (issue 10), compensate phase: a compensation returning a wrong type ends
    the workflow with InvalidReturn (phase compensate) and is not retried."""
    steps = Steps()
    steps.answers[(1, "execute")] = lambda wid: Failure("declined")
    steps.answers[(0, "compensate")] = lambda wid: "undone"
    repo = MemRepository()
    async with Kapbit(
        [steps.definition()], repo, options=Options(retry=FAST_RETRY, emit_backoff=TINY)
    ) as kbit:
        with pytest.raises(InvalidReturnValue) as raised:
            await kbit.exec_workflow("w", "wf", {"id": "w"})
    assert raised.value.step == 0 and "str" in raised.value.reason
    assert steps.count("w", 0, "compensate") == 1
    assert kinds(repo, "w")[-1] == "invalid_return"


# --- defect 3: a compensation returning Failure stops the rollback --------------------------


def _rollback_steps(block_result: asyncio.Event | None = None) -> tuple[Steps, Definition]:
    """Three steps: step 2 fails, step 1's compensation fails; step 0 compensates."""
    steps = Steps()
    steps.answers[(2, "execute")] = lambda wid: Failure("declined")
    steps.answers[(1, "compensate")] = lambda wid: Failure("refund refused")
    seen: list[Any] = []

    async def result(input: dict[str, str], progress: Progress) -> dict[str, Any]:
        if block_result is not None:
            await block_result.wait()
        seen.append(progress.compensation_failed_step)
        return {
            "compensation_failed_step": progress.compensation_failed_step,
            "compensated": [i for i, _ in progress.compensations],
        }

    definition = Definition(
        "wf",
        steps=[
            Step(steps.action(i, "execute"), steps.action(i, "compensate"), name=f"s{i}")
            for i in range(3)
        ],
        result=result,
        input_type=dict[str, str],
    )
    return steps, definition


async def test_defect3_a_failed_compensation_stops_the_rollback() -> None:
    """Defect 3 (issue 10): a compensation returning Failure did not stop the rollback.
    Now, as in kapbit-go, the rollback stops there: earlier steps are not compensated,
    the result builder runs and sees which compensation failed."""
    steps, definition = _rollback_steps()
    repo = MemRepository()
    async with Kapbit([definition], repo) as kbit:
        result = await kbit.exec_workflow("w", "wf", {"id": "w"})
    assert result == {"compensation_failed_step": 1, "compensated": [1]}
    assert steps.count("w", 1, "compensate") == 1
    assert steps.count("w", 0, "compensate") == 0
    events = [e for _, _, e in log_events(repo) if getattr(e, "id", None) == "w"]
    compensations = [(e.step, e.success) for e in events if isinstance(e, StepOutcome)][3:]
    assert compensations == [(1, False)]
    assert isinstance(events[-1], WorkflowResult) and events[-1].compensated


async def test_defect3_a_failed_compensation_stops_the_rollback_across_a_crash() -> None:
    """Defect 3 (issue 10), across a crash between the failed compensation and the
    result: the next instance does not resume the rollback, it builds the result."""
    hold = asyncio.Event()
    steps, definition = _rollback_steps(block_result=hold)
    repo = MemRepository()
    first = Kapbit([definition], repo, options=Options(node_id="first"))
    await first.start()
    task = asyncio.create_task(first.exec_workflow("w", "wf", {"id": "w"}))
    await wait_until(lambda: steps.count("w", 1, "compensate") == 1 and len(kinds(repo, "w")) == 5)
    first.abort()
    with pytest.raises(InstanceClosed):
        await task

    steps2, definition2 = _rollback_steps()
    async with Kapbit([definition2], repo, options=Options(node_id="second")) as second:
        assert second.stats.recovered == 1
        result = await second.wait_result("w", timeout=5)
    assert result == {"compensation_failed_step": 1, "compensated": [1]}
    assert steps2.calls == []
    assert kinds(repo, "w").count("workflow_result") == 1


# --- defect 4: a Rejected record that is itself too large -----------------------------------


def _big_outcome_steps(raise_first: bool = False) -> Steps:
    steps = Steps()
    steps.answers[(0, "execute")] = lambda wid: Success("x" * 60)
    if raise_first:
        steps.raise_once.add(("w", 0, "execute"))
    return steps


async def test_defect4_a_rejection_too_large_to_write_still_terminates_the_workflow() -> None:
    """Defect 4 (issue 10): with MemRepository(max_payload=120) a step whose outcome is
    60 characters is refused, and so was the Rejected record naming the refusal: the
    workflow stayed open forever (re-run at every restart), wait_result hung and
    exec_workflow raised PayloadTooLarge although records were written."""
    repo = MemRepository(max_payload=120)
    steps = _big_outcome_steps()
    options = Options(retry=FAST_RETRY, emit_backoff=TINY)
    async with Kapbit([steps.definition()], repo, options=options) as kbit:
        with pytest.raises(WorkflowRejected) as raised:
            await kbit.exec_workflow("w", "wf", {"id": "w"})
        assert "step_outcome" in raised.value.reason
        with pytest.raises(WorkflowRejected):
            await kbit.wait_result("w", timeout=5)
        assert kbit.stats.rejected == 1 and kbit.stats.in_flight == 0
    assert kinds(repo, "w") == ["workflow_created", "rejected"]
    async with Kapbit([steps.definition()], repo, options=options) as kbit:
        assert kbit.stats.recovered == 0
    assert steps.count("w", 0) == 1


async def test_defect4_retry_worker_path_terminates_on_a_too_large_rejection() -> None:
    """Defect 4 (issue 10), retry worker path: the step raises first, the retried step's
    outcome and its Rejected are too large; the workflow still terminates."""
    repo = MemRepository(max_payload=120)
    steps = _big_outcome_steps(raise_first=True)
    async with Kapbit(
        [steps.definition()], repo, options=Options(retry=FAST_RETRY, emit_backoff=TINY)
    ) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "wf", {"id": "w"})
        with pytest.raises(WorkflowRejected):
            await kbit.wait_result("w", timeout=5)
        assert kbit.stats.in_flight == 0 and kbit.stats.rejected == 1
    assert kinds(repo, "w")[-1] == "rejected"


async def test_defect4_a_long_rejection_reason_is_cut_to_256_characters() -> None:
    """Defect 4 (issue 10): the reason stored in Rejected is bounded."""
    faults = FaultyRepository(MemRepository())
    faults.reject(kinds="step_outcome", error=lambda call: RecordRejected("y" * 5000))
    steps = Steps()
    async with Kapbit([steps.definition()], faults, options=Options(emit_backoff=TINY)) as kbit:
        with pytest.raises(WorkflowRejected):
            await kbit.exec_workflow("w", "wf", {"id": "w"})
    rejected = [e for _, _, e in log_events(faults.inner) if isinstance(e, Rejected)]  # type: ignore[arg-type]
    assert len(rejected) == 1 and len(rejected[0].reason) <= 256 + len("... (truncated)")


async def test_defect4_a_refused_minimal_rejected_is_written_before_callers_hear_of_it() -> None:
    """Defect 4 (issue 10), and N4 found by the model checker: when storage refuses the
    Rejected records too, the minimal one is tried again until it lands. Callers get
    WorkflowRejected only once the log says so (before, the log had no terminal event and
    the next instance ran the step again)."""
    inner = MemRepository()
    faults = FaultyRepository(inner)
    faults.reject(kinds="step_outcome")
    refused = faults.reject(kinds="rejected", times=4)
    steps = Steps()
    async with Kapbit([steps.definition()], faults, options=Options(emit_backoff=TINY)) as kbit:
        with pytest.raises(WorkflowRejected):
            await kbit.exec_workflow("w", "wf", {"id": "w"})
        assert refused.hits == 4  # the bounded reason, then the minimal record three times
        assert [r.kind for r in inner.records() if r.key == "w"][-1] == "rejected"
        with pytest.raises(WorkflowRejected):
            await kbit.wait_result("w", timeout=5)
        assert kbit.stats.in_flight == 0
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "wf", {"id": "w"})


# --- issue 16, item 1: lost ack, then close() -------------------------------------------------


async def test_issue16_item1_created_with_lost_ack_then_close_is_resumed_not_accepted_again() -> (
    None
):
    """Issue 16 item 1: the WorkflowCreated append landed but its ack was lost; while the
    emitter retries, close() cancels it. The id was marked abandoned, the final checkpoint
    passed the landed record and the next instance accepted the id again. Now the append
    of unknown outcome keeps holding the checkpoint: the next instance resumes the
    workflow and refuses its id."""
    inner = MemRepository()
    faults = FaultyRepository(inner)
    steps = Steps()
    options = Options(node_id="first", emit_backoff=TINY, storage_breaker=NO_BREAKER)
    first = Kapbit([steps.definition()], faults, options=options)
    await first.start()
    faults.fail(times=1, kinds="workflow_created", when=lambda c: c.key == "w", lost_ack=True)
    outage = faults.fail(kinds="workflow_created", when=lambda c: c.key == "w")
    task = asyncio.create_task(first.exec_workflow("w", "wf", {"id": "w"}))
    await outage.wait_hits(1)
    # Another workflow finishes after the landed copy: acknowledged offsets pass it.
    assert await first.exec_workflow("later", "wf", {"id": "later"}) is not None
    await first.close(timeout=0.01)
    with pytest.raises(InstanceClosed) as closed:
        await task
    assert len(_offsets(inner, "w", "workflow_created")) == 1
    assert steps.count("w", 0) == 0

    resumed = Steps()
    async with Kapbit(
        [resumed.definition()], inner, options=Options(node_id="second", emit_backoff=TINY)
    ) as second:
        assert second.stats.recovered == 1
        assert await second.wait_result("w", timeout=5) == ["w-exec-0", "w-exec-1"]
        with pytest.raises(DuplicateWorkflow):
            await second.exec_workflow("w", "wf", {"id": "w"})
    assert resumed.count("w", 0) == 1 and resumed.count("w", 1) == 1
    assert len(_offsets(inner, "w", "workflow_created")) == 1
    assert kinds(inner, "w").count("workflow_result") == 1
    assert "may have been written" in str(closed.value)


async def test_defect1_recovery_orders_a_created_twice_id_where_the_engine_did() -> None:
    """Defect 1, recovery's second-copy rule: the engine learns a twice-written id at its
    acknowledged (last) copy, so another id created between the copies is older in its
    window. Recovery kept the first copy's place instead, evicted a different id, and then
    dropped an id the engine had rightly accepted again as a duplicate: that workflow,
    open at the crash, was lost."""
    inner = MemRepository()
    faults = FaultyRepository(inner)
    steps = Steps()
    options = Options(node_id="first", emit_backoff=TINY, idempotency_window=2)
    first = Kapbit([steps.definition()], faults, options=options)
    await first.start()
    faults.fail(times=1, kinds="workflow_created", when=lambda c: c.key == "w", lost_ack=True)
    retry = faults.slow(times=1, kinds="workflow_created", when=lambda c: c.key == "w")
    task = asyncio.create_task(first.exec_workflow("w", "wf", {"id": "w"}))
    await retry.wait_hits(1)  # the first copy landed, the retry is held
    await first.exec_workflow("x", "wf", {"id": "x"})  # created between w's copies
    retry.release()
    await task
    assert len(_offsets(inner, "w", "workflow_created")) == 2
    await first.exec_workflow("y", "wf", {"id": "y"})  # the engine's window: w, y
    steps.block.add(("x", 0, "execute"))
    again = asyncio.create_task(first.exec_workflow("x", "wf", {"id": "x"}))  # accepted
    await asyncio.wait_for(steps.entered_event("x", 0, "execute").wait(), 5)
    assert steps.count("x", 0) == 2
    first.abort()
    with pytest.raises(InstanceClosed):
        await again

    resumed = Steps()
    async with Kapbit(
        [resumed.definition()], inner, options=Options(node_id="second", idempotency_window=2)
    ) as second:
        assert second.stats.recovered == 1
        assert await second.wait_result("x", timeout=5) == ["x-exec-0", "x-exec-1"]
        for workflow_id in ("x", "y"):
            with pytest.raises(DuplicateWorkflow):
                await second.exec_workflow(workflow_id, "wf", {"id": workflow_id})
    assert kinds(inner, "x").count("workflow_result") == 2


@pytest.mark.parametrize("kind", ["workflow_created", "step_outcome", "workflow_result"])
async def test_defect4_a_refusal_after_a_lost_ack_honours_the_copy_that_landed(kind: str) -> None:
    """Defect 4's exact refusals: an append whose first try landed with its ack lost and
    whose retry storage then refused. The engine took the refusal for the truth: the
    caller heard "refused" (PayloadTooLarge, or WorkflowRejected after a WorkflowResult
    that is in the log) while the log says otherwise. The emitter now looks for the
    landed copy and, when it finds it, the append succeeded."""
    inner = MemRepository()
    faults = FaultyRepository(inner)
    faults.fail(times=1, kinds=kind, when=lambda c: c.key == "w", lost_ack=True)
    refused = faults.reject(times=1, kinds=kind, when=lambda c: c.key == "w")
    steps = Steps()
    async with Kapbit([steps.definition()], faults, options=Options(emit_backoff=TINY)) as kbit:
        assert await kbit.exec_workflow("w", "wf", {"id": "w"}) == ["w-exec-0", "w-exec-1"]
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "wf", {"id": "w"})
    assert refused.hits == 1
    assert kinds(inner, "w") == [
        "workflow_created",
        "step_outcome",
        "step_outcome",
        "workflow_result",
    ]
    assert steps.count("w", 0) == 1 and steps.count("w", 1) == 1
    async with Kapbit([steps.definition()], inner) as kbit:
        assert kbit.stats.recovered == 0


# --- found by the model checker's long profile: a late acknowledgement --------------------------


def test_the_window_keeps_ids_in_log_order_when_an_ack_arrives_late() -> None:
    """An id whose acknowledgement arrives after those of later records is older in the log:
    a full window evicts it, not the newest id (recovery reads the log in order)."""
    window = IdempotencyWindow(2)
    window.add("w4", 11)
    window.add("w5", 12)
    window.add("w3", 10)  # landed first, acknowledged last
    assert list(window.entries()) == [("w4", 11), ("w5", 12)]
    window.add("w6", 13)
    assert list(window.entries()) == [("w5", 12), ("w6", 13)]


class _LateAck(MemRepository):
    """Holds the acknowledgement of one id's WorkflowCreated after the record landed."""

    def __init__(self, held: str) -> None:
        super().__init__(partitions=1)
        self.held = held
        self.landed = asyncio.Event()
        self.release = asyncio.Event()

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        offset = await super().append(partition, kind, key, node, value)
        if kind is EventKind.WORKFLOW_CREATED and key == self.held:
            self.landed.set()
            await self.release.wait()
        return offset


async def test_a_late_ack_does_not_evict_a_newer_id_from_the_window() -> None:
    """Found by the model checker (long profile): with a window of 1, w3's WorkflowCreated
    landed first but was acknowledged after w4's and w5's; the engine then kept w3 and let
    w5 (the newest in the log) be used again, while a restarted instance refused it."""
    repo = _LateAck("w3")
    steps = Steps()
    options = Options(idempotency_window=1, emit_backoff=TINY)
    async with Kapbit([steps.definition()], repo, options=options) as kbit:
        late = asyncio.create_task(kbit.exec_workflow("w3", "wf", {"id": "w3"}))
        await asyncio.wait_for(repo.landed.wait(), 5)
        await kbit.exec_workflow("w4", "wf", {"id": "w4"})
        await kbit.exec_workflow("w5", "wf", {"id": "w5"})
        repo.release.set()
        await late
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w5", "wf", {"id": "w5"})
    async with Kapbit([steps.definition()], repo, options=options) as restarted:
        with pytest.raises(DuplicateWorkflow):
            await restarted.exec_workflow("w5", "wf", {"id": "w5"})
