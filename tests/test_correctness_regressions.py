"""Regression tests of the engine defects of the correctness issues: each test names the
defect it pins down in its docstring and failed on the engine before that defect's fix."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from kapbit import (
    Backoff,
    BreakerPolicy,
    CheckpointPolicy,
    Definition,
    DuplicateWorkflow,
    InstanceClosed,
    Kapbit,
    MemRepository,
    Options,
    Progress,
    RetryPolicy,
    Step,
    Success,
    WillRetryLater,
    partition_for,
)
from kapbit.repository import Checkpoint
from kapbit.testing import FaultyRepository
from tests.helpers import kinds

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
