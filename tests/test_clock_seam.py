"""Options.clock also times the waits a test wants to move: step timeouts, in-place step retries and
the checkpoint interval move with a ManualClock and never with real time, so these tests
would wait hours (and time out) if any of them still slept on the loop's clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from kapbit import (
    Backoff,
    CheckpointPolicy,
    Definition,
    Failure,
    Kapbit,
    Progress,
    Step,
    StepRetry,
    Success,
)
from kapbit.errors import WillRetryLater
from kapbit.repository import Checkpoint, MemRepository
from kapbit.testing import ManualClock, fast_options
from tests.helpers import wait_until

T0 = datetime(2026, 11, 21, tzinfo=UTC)
HOUR = 3600.0


def single(step: Step[str, Any]) -> Definition[str, str, str]:
    return Definition(
        "one",
        steps=[step],
        result=lambda _input, progress: str(progress.values()),
        input_type=str,
        outcome_type=str,
        result_type=str,
    )


async def test_a_step_timeout_runs_on_the_instance_clock() -> None:
    clock, started = ManualClock(T0), asyncio.Event()

    async def stuck(_: str, __: Progress) -> Success[str]:
        started.set()
        await asyncio.Event().wait()
        return Success("never")

    async def undo(_: str, __: Progress) -> Success[str]:
        return Success("undone")

    definition = single(Step(stuck, undo, timeout=HOUR))
    async with Kapbit([definition], MemRepository(1), options=fast_options(clock=clock)) as kbit:
        call = asyncio.create_task(kbit.exec_workflow(definition, "w1", "x"))
        await asyncio.wait_for(started.wait(), 5)
        await clock.wait_for_sleepers(2)  # the checkpointer's interval and the timeout
        clock.advance(HOUR - 1)
        await asyncio.sleep(0)
        assert not call.done()  # one second before the timeout the step still runs
        clock.advance(1)
        with pytest.raises(WillRetryLater, match="timed out after 3600 s"):
            await asyncio.wait_for(call, 5)


async def test_in_place_step_retries_back_off_on_the_instance_clock() -> None:
    clock, calls = ManualClock(T0), []

    async def flaky(_: str, __: Progress) -> Success[str] | Failure[str]:
        calls.append(clock.monotonic())
        if len(calls) < 3:
            raise RuntimeError("blip")
        return Success("done")

    policy = StepRetry(max_attempts=3, backoff=Backoff(initial=HOUR, maximum=HOUR, jitter=0))
    definition = single(Step(flaky, retry=policy))
    async with Kapbit([definition], MemRepository(1), options=fast_options(clock=clock)) as kbit:
        call = asyncio.create_task(kbit.exec_workflow(definition, "w1", "x"))
        for attempt in (1, 2):
            await wait_until(lambda n=attempt: len(calls) == n)  # type: ignore[misc]
            await clock.wait_for_sleepers(2)  # the checkpointer's interval and the backoff
            assert not call.done()
            clock.advance(HOUR)
        assert await asyncio.wait_for(call, 5) == "['done']"
    assert calls == [0.0, HOUR, 2 * HOUR]


class SavesWatched(MemRepository):
    """A MemRepository that says when a checkpoint was saved."""

    def __init__(self, partitions: int) -> None:
        super().__init__(partitions)
        self.saved = asyncio.Event()

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        await super().save_checkpoint(partition, checkpoint)
        self.saved.set()


async def test_checkpoints_are_saved_by_interval_of_the_instance_clock() -> None:
    clock, repo = ManualClock(T0), SavesWatched(1)

    async def act(_: str, __: Progress) -> Success[str]:
        return Success("ok")

    definition = single(Step(act))
    policy = CheckpointPolicy(every=1_000_000, interval=HOUR)
    options = fast_options(clock=clock, checkpoints=policy)
    async with Kapbit([definition], repo, options=options) as kbit:
        assert await kbit.exec_workflow(definition, "w1", "x") == "['ok']"
        before = await repo.load_checkpoints()
        await clock.wait_for_sleepers(1)
        clock.advance(HOUR)
        await asyncio.wait_for(repo.saved.wait(), 5)
    assert before == {}
