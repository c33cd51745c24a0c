"""Durable timers in the engine, on a ManualClock: a step returning Sleep / SleepUntil ends
with one StepOutcome carrying the fire time; the workflow sleeps in the instance's timer
queue (no task) and resumes at its next step when the timer fires, also after a crash, a
restart, a takeover and when it expired while no instance ran; snapshots carry it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from kapbit import (
    CheckpointPolicy,
    Definition,
    Failure,
    Fenced,
    InstanceClosed,
    InvalidReturnValue,
    Kapbit,
    Progress,
    Sleep,
    SleepUntil,
    Step,
    Success,
    TooManyWorkflows,
    WillRetryLater,
)
from kapbit.errors import InvalidTimer
from kapbit.events import StepOutcome
from kapbit.projection import WorkflowStatus
from kapbit.repository import MemRepository
from kapbit.testing import FaultyRepository, ManualClock, fast_options
from tests.helpers import load_example, napper, wait_until

T0 = datetime(2026, 11, 21, tzinfo=UTC)
DAY = 86_400.0


class Journal:
    """The step calls of the trial saga, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def count(self, step: str) -> int:
        return sum(1 for _, name in self.calls if name == step)


def trial(journal: Journal) -> Definition[str, str, list[str]]:
    """welcome, then sleep 12 days; remind, then sleep until day 14; end the trial."""

    async def welcome(user: str, _: Progress) -> Sleep[str]:
        journal.calls.append((user, "welcome"))
        return Sleep(timedelta(days=12), value="welcomed")

    async def remind(user: str, _: Progress) -> SleepUntil[str]:
        journal.calls.append((user, "remind"))
        return SleepUntil(T0 + timedelta(days=14), value="reminded")

    async def end(user: str, _: Progress) -> Success[str]:
        journal.calls.append((user, "end"))
        return Success("ended")

    return Definition(
        "trial",
        steps=[Step(welcome), Step(remind), Step(end)],
        result=lambda _user, progress: progress.values(),
        input_type=str,
        outcome_type=str,
        result_type=list[str],
    )


def options(clock: ManualClock, node: str, **kwargs: Any) -> Any:
    return fast_options(clock=clock, node_id=node, **kwargs)


def outcomes(repo: MemRepository, workflow_id: str) -> list[StepOutcome]:
    found = []
    for record in repo.records():
        if record.key == workflow_id and record.kind == "step_outcome":
            found.append(msgspec.json.decode(record.value, type=StepOutcome))
    return found


async def test_a_workflow_sleeps_without_a_task_and_resumes_when_its_timer_fires() -> None:
    clock, journal, repo = ManualClock(T0), Journal(), MemRepository(2)
    definition = trial(journal)
    async with Kapbit([definition], repo, options=options(clock, "a")) as kbit:
        handle = await kbit.start_workflow(definition, "u1", "u1")
        await wait_until(lambda: kbit.stats.sleeping == 1)
        assert kbit.stats.in_flight == 0  # a sleeping workflow is not running
        assert journal.calls == [("u1", "welcome")]
        assert await handle.status() == WorkflowStatus.SLEEPING
        [sleeping] = outcomes(repo, "u1")
        assert sleeping.fire_at == T0.timestamp() + 12 * DAY
        assert sleeping.at == T0.timestamp()  # events are stamped by the instance's clock

        clock.advance(12 * DAY - 1)
        await clock.wait_for_sleepers(1)
        assert journal.count("remind") == 0  # one second early: still asleep

        clock.advance(1)
        await wait_until(lambda: journal.count("remind") == 1)
        assert await handle.status() == WorkflowStatus.SLEEPING  # until day 14 now
        clock.advance_to(T0 + timedelta(days=14))
        assert await asyncio.wait_for(handle.result(), 5) == ["welcomed", "reminded", "ended"]
    assert [c[1] for c in journal.calls] == ["welcome", "remind", "end"]


async def test_exec_workflow_waits_through_the_sleep() -> None:
    clock, journal, repo = ManualClock(T0), Journal(), MemRepository(1)
    definition = trial(journal)
    async with Kapbit([definition], repo, options=options(clock, "a")) as kbit:
        call = asyncio.create_task(kbit.exec_workflow(definition, "u1", "u1"))
        await wait_until(lambda: kbit.stats.sleeping == 1)
        assert not call.done()
        clock.advance(14 * DAY)
        assert await asyncio.wait_for(call, 5) == ["welcomed", "reminded", "ended"]


@pytest.mark.parametrize("naps", [1, 2])
async def test_exec_workflow_raises_will_retry_later_when_a_step_after_the_wake_raises(
    naps: int,
) -> None:
    """As without a timer: the step after the wake raises, the caller hears WillRetryLater
    (with the cause) at once; the retry worker finishes the workflow and the handle's
    result() waits for that end."""
    clock, repo = ManualClock(T0), MemRepository(1)
    definition, runs = napper(naps, raises=1)
    async with Kapbit([definition], repo, options=options(clock, "a")) as kbit:
        call = asyncio.create_task(kbit.exec_workflow(definition, "n1", "n1"))
        for nap in range(naps):  # each nap's outcome is written, then its timer fires

            def asleep(written: int = nap + 1) -> bool:
                return kbit.stats.sleeping == 1 and len(outcomes(repo, "n1")) == written

            await wait_until(asleep)
            clock.advance(3600)
        with pytest.raises(WillRetryLater) as later:
            await asyncio.wait_for(call, 5)
        assert later.value.workflow_id == "n1"
        assert isinstance(later.value.__cause__, ConnectionError)
        assert "run 1" in str(later.value.__cause__)
        handle = kbit.get_workflow("n1")
        assert await asyncio.wait_for(handle.result(), 5) == ["napped"] * naps + ["done"]
        assert runs == [2]


async def test_a_zero_sleep_wakes_at_once_and_the_caller_still_hears_will_retry_later() -> None:
    """The timer fires before the caller has heard that the first run ended asleep: the run
    after the wake is not missed."""
    clock, repo = ManualClock(T0), MemRepository(1)

    async def nap(_: str, __: Progress) -> Sleep[str]:
        return Sleep(timedelta(0), value="napped")

    async def down(_: str, __: Progress) -> Success[str]:
        raise ConnectionError("provider down")

    definition = Definition("zero", steps=[Step(nap), Step(down)], input_type=str)
    async with Kapbit([definition], repo, options=options(clock, "a", max_attempts=1)) as kbit:
        with pytest.raises(WillRetryLater, match="provider down"):
            await asyncio.wait_for(kbit.exec_workflow(definition, "z", "z"), 5)


@pytest.mark.parametrize("how", ["close", "abort", "takeover"])
async def test_a_caller_waiting_through_a_sleep_hears_when_the_instance_stops(how: str) -> None:
    """Closed, crashed or replaced while the workflow sleeps: the waiting exec_workflow
    raises (InstanceClosed, or Fenced for a takeover) instead of waiting for ever."""
    clock, repo = ManualClock(T0), MemRepository(1)
    definition, _ = napper(1, raises=0)
    kbit = Kapbit([definition], repo, options=options(clock, "a"))
    await kbit.start()
    call = asyncio.create_task(kbit.exec_workflow(definition, "n1", "n1"))
    await wait_until(lambda: kbit.stats.sleeping == 1)
    second = None
    if how == "close":
        await kbit.close()
    elif how == "abort":
        kbit.abort()
    else:
        second = Kapbit([definition], repo, options=options(clock, "b"))
        await second.start()
        clock.advance(3600)  # the first instance's queue fires too: its write is refused
    expected = Fenced if how == "takeover" else InstanceClosed
    with pytest.raises(expected):
        await asyncio.wait_for(call, 5)
    await kbit.close()
    if second is not None:
        assert await asyncio.wait_for(second.wait_result("n1", None), 5) == ["napped", "done"]
        await second.close()


async def test_attach_to_a_sleeping_workflow_waits_for_its_end_through_retries() -> None:
    """``on_duplicate="attach"`` answers as the handle does, timer or not: it waits for the
    end through the retries of a step that raised after the wake."""
    clock, repo = ManualClock(T0), MemRepository(1)
    definition, runs = napper(1, raises=2)
    async with Kapbit([definition], repo, options=options(clock, "a")) as kbit:
        await kbit.start_workflow(definition, "n1", "n1")
        await wait_until(lambda: kbit.stats.sleeping == 1)
        attached = asyncio.create_task(
            kbit.exec_workflow(definition, "n1", "n1", on_duplicate="attach")
        )
        clock.advance(3600)
        assert await asyncio.wait_for(attached, 5) == ["napped", "done"]
        assert runs == [3]
        assert kbit.stats.retried == 2


async def test_a_crash_while_sleeping_and_a_restart_after_the_fire_time_resume_at_once() -> None:
    clock, journal, repo = ManualClock(T0), Journal(), MemRepository(2)
    definition = trial(journal)
    first = Kapbit([definition], repo, options=options(clock, "a"))
    await first.start()
    await first.start_workflow(definition, "u1", "u1")
    await wait_until(lambda: first.stats.sleeping == 1)
    first.abort()  # a crash: nothing more is written

    clock.advance(20 * DAY)  # both timers expire while no instance runs
    async with Kapbit([definition], repo, options=options(clock, "b")) as second:
        assert await asyncio.wait_for(second.wait_result("u1", None), 5) == [
            "welcomed",
            "reminded",
            "ended",
        ]
    assert journal.count("welcome") == 1  # the step before the sleep never runs again


async def test_a_restart_before_the_fire_time_keeps_the_workflow_asleep() -> None:
    clock, journal, repo = ManualClock(T0), Journal(), MemRepository(2)
    definition = trial(journal)
    async with Kapbit([definition], repo, options=options(clock, "a")) as first:
        await first.start_workflow(definition, "u1", "u1")
        await wait_until(lambda: first.stats.sleeping == 1)

    clock.advance(3 * DAY)
    async with Kapbit([definition], repo, options=options(clock, "b")) as second:
        assert second.stats.sleeping == 1
        assert second.stats.in_flight == 0
        handle = second.get_workflow("u1")
        clock.advance(9 * DAY)  # day 12: the reminder
        await wait_until(lambda: journal.count("remind") == 1)
        assert journal.count("end") == 0
        clock.advance(2 * DAY)
        assert await asyncio.wait_for(handle.result(), 5) == ["welcomed", "reminded", "ended"]
    assert journal.count("welcome") == 1


async def test_a_takeover_while_sleeping_wakes_the_workflow_once_on_the_new_owner() -> None:
    clock, journal, repo = ManualClock(T0), Journal(), MemRepository(2)
    definition = trial(journal)
    first = Kapbit([definition], repo, options=options(clock, "a"))
    await first.start()
    for n in range(4):
        await first.start_workflow(definition, f"u{n}", f"u{n}")
    await wait_until(lambda: first.stats.sleeping == 4)

    async with Kapbit([definition], repo, options=options(clock, "b")) as second:
        assert second.stats.sleeping == 4
        clock.advance(14 * DAY)
        for n in range(4):
            assert (await asyncio.wait_for(second.wait_result(f"u{n}", None), 5))[-1] == "ended"
        # The first instance's queue fired too; its writes are refused by the log.
        with pytest.raises(Fenced):
            await asyncio.wait_for(first.wait_result("u0", None), 5)
    await first.close()
    for n in range(4):
        assert journal.calls.count((f"u{n}", "end")) == 1
        assert journal.calls.count((f"u{n}", "welcome")) == 1


async def test_a_snapshot_carries_sleeping_workflows() -> None:
    clock, journal, repo = ManualClock(T0), Journal(), MemRepository(1)
    definition = trial(journal)
    # u1 sleeps at offset 1: once the log is 4 records past it, its partition is pinned
    policy = CheckpointPolicy(every=1, interval=3600.0, snapshot_after=4)
    async with Kapbit([definition], repo, options=options(clock, "a", checkpoints=policy)) as a:
        await a.start_workflow(definition, "u1", "u1")
        await wait_until(lambda: a.stats.sleeping == 1)
        for n in range(5):  # workflows after it let the checkpoint pass the sleeping one
            await a.start_workflow(definition, f"v{n}", f"v{n}")
        await wait_until(lambda: a.stats.sleeping == 6)
    [checkpoint] = (await repo.load_checkpoints()).values()
    assert checkpoint.snapshot_offset > 0  # a snapshot past the sleeping workflows' creation

    async with Kapbit([definition], repo, options=options(clock, "b", checkpoints=policy)) as b:
        assert b.stats.sleeping == 6
        clock.advance(14 * DAY)
        assert (await asyncio.wait_for(b.wait_result("u1", None), 5))[-1] == "ended"
    assert journal.count("welcome") == 6


async def test_max_workflows_counts_running_ones_and_max_sleeping_all() -> None:
    clock, journal, repo = ManualClock(T0), Journal(), MemRepository(1)
    definition = trial(journal)
    kbit = Kapbit([definition], repo, options=options(clock, "a", max_workflows=1, max_sleeping=2))
    async with kbit:
        await kbit.start_workflow(definition, "u1", "u1")
        await wait_until(lambda: kbit.stats.sleeping == 1)
        await kbit.start_workflow(definition, "u2", "u2")  # the sleeping one frees its slot
        await wait_until(lambda: kbit.stats.sleeping == 2)
        with pytest.raises(TooManyWorkflows) as refused:
            await kbit.start_workflow(definition, "u3", "u3")
        assert refused.value.name == "max_sleeping"
        assert refused.value.limit == 2
        assert [r.key for r in repo.records() if r.kind == "workflow_created"] == ["u1", "u2"]

        clock.advance(12 * DAY)  # both due: woken one at a time (max_workflows=1)
        await wait_until(lambda: journal.count("remind") == 2)
        clock.advance(2 * DAY)
        for workflow_id in ("u1", "u2"):
            assert (await asyncio.wait_for(kbit.wait_result(workflow_id, None), 5))[-1] == "ended"


@pytest.mark.parametrize("where", ["last step", "compensation"])
async def test_a_timer_where_no_step_follows_ends_the_workflow_and_is_never_rerun(
    where: str,
) -> None:
    clock, repo = ManualClock(T0), MemRepository(1)
    calls: list[str] = []

    async def sleeps(_: str, __: Progress) -> Sleep[str]:
        calls.append("sleeps")
        return Sleep(timedelta(hours=1), value="v")

    async def fails(_: str, __: Progress) -> Failure[str]:
        return Failure("no")

    async def ok(_: str, __: Progress) -> Success[str]:
        return Success("ok")

    # The type checker already refuses a compensation returning a timer (arg-type).
    compensation_sleeps = [Step(ok, sleeps), Step(fails)]  # type: ignore[arg-type]
    steps = [Step(ok), Step(sleeps)] if where == "last step" else compensation_sleeps
    definition = Definition("t", steps=steps, input_type=str, outcome_type=str)
    async with Kapbit([definition], repo, options=options(clock, "a")) as kbit:
        with pytest.raises(InvalidReturnValue, match="durable timer"):
            await kbit.exec_workflow(definition, "w", "w")
    async with Kapbit([definition], repo, options=options(clock, "b")) as again:
        assert again.stats.recovered == 0
    assert calls == ["sleeps"]


def test_bad_timers_are_refused_where_they_are_made() -> None:
    with pytest.raises(InvalidTimer, match="naive"):
        SleepUntil(datetime(2026, 12, 1))
    with pytest.raises(InvalidTimer, match="zero or more"):
        Sleep(timedelta(seconds=-1))


async def test_the_trial_example_ends_the_trial_on_day_14_after_a_reminder_on_day_12() -> None:
    example = load_example("trial")
    example.sent.clear()
    assert await example.main(MemRepository(partitions=2)) == "ended"
    assert [m for m in example.sent if m != "nightly report"] == [
        "welcome to ada@example.com",
        "2 days left to ada@example.com",
        "trial over to ada@example.com",
    ]
    assert example.sent.count("nightly report") == 15


async def test_the_trial_example_survives_a_crash_on_day_5() -> None:
    example = load_example("trial")
    example.sent.clear()
    clock, repo = ManualClock(T0), MemRepository(2)
    signup = example.SignUp("bo@example.com", T0)
    first = Kapbit([example.TRIAL], repo, options=options(clock, "a"))
    await first.start()
    await first.start_workflow(example.TRIAL, "trial-bo", signup)
    await wait_until(lambda: first.stats.sleeping == 1)
    clock.advance(5 * DAY)
    first.abort()

    async with Kapbit([example.TRIAL], repo, options=options(clock, "b")) as second:
        clock.advance(7 * DAY)  # day 12
        await wait_until(lambda: len(example.sent) == 2)
        assert example.sent[-1] == "2 days left to bo@example.com"
        clock.advance(2 * DAY)  # day 14
        assert await asyncio.wait_for(second.wait_result("trial-bo", None), 5) == "ended"
    assert example.sent.count("welcome to bo@example.com") == 1


async def test_a_relative_sleep_rerun_after_a_crash_counts_from_the_rerun() -> None:
    """The step returned Sleep(12 days) but its outcome never landed (the append hung
    and the process died): the restart runs the step again an hour later, and the delay
    counts from then, as the README says."""
    clock, journal, inner = ManualClock(T0), Journal(), MemRepository(1)
    repo = FaultyRepository(inner)
    definition = trial(journal)
    first = Kapbit([definition], repo, options=options(clock, "a"))
    await first.start()
    fault = repo.slow(times=1, kinds="step_outcome")
    await first.start_workflow(definition, "u1", "u1")
    await fault.wait_hits()
    first.abort()
    fault.release()
    assert outcomes(inner, "u1") == []  # the hung append died with the process

    clock.advance(3600)
    async with Kapbit([definition], repo, options=options(clock, "b")) as second:
        await wait_until(lambda: second.stats.sleeping == 1)
        [sleeping] = outcomes(inner, "u1")
        assert sleeping.fire_at == T0.timestamp() + 3600 + 12 * DAY
        clock.advance(12 * DAY - 1)
        await clock.wait_for_sleepers(1)
        assert journal.count("remind") == 0  # 12 days after the crash, not yet after the re-run
        clock.advance(1)
        await wait_until(lambda: journal.count("remind") == 1)
    assert journal.count("welcome") == 2
