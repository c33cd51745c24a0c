"""The scheduler loop on a ManualClock with a recording starter (no instance, no log)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kapbit.errors import (
    DuplicateWorkflow,
    Fenced,
    GateClosed,
    InstanceClosed,
    InvalidSchedule,
)
from kapbit.scheduler import RETRY_DELAY, Scheduler, check_schedules
from kapbit.schedules import CatchUp, Schedule
from kapbit.testing import ManualClock

T0 = datetime(2026, 11, 21, tzinfo=UTC)
HOUR = timedelta(hours=1)


def hourly(catch_up: CatchUp = CatchUp.SKIP, name: str = "hourly") -> Schedule:
    return Schedule(name, "report", every=HOUR, catch_up=catch_up, input={"kind": name})


def firing_id(name: str, at: datetime) -> str:
    return f"{name}@{at.strftime('%Y-%m-%dT%H:%M:%SZ')}"


class Starter:
    """Records each start; refuses the ids in ``refuse`` with the error given."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str, Any]] = []
        self.refuse: dict[str, Exception] = {}

    async def __call__(self, workflow_id: str, workflow_type: str, input: Any) -> object:
        error = self.refuse.get(workflow_id)
        if error is not None:
            raise error
        self.started.append((workflow_id, workflow_type, input))
        return None

    @property
    def ids(self) -> list[str]:
        return [started[0] for started in self.started]


def always(_workflow_id: str) -> bool:
    return True


async def test_last_firing_comes_from_the_known_ids() -> None:
    clock = ManualClock(T0 + 5 * HOUR + timedelta(seconds=10))
    known = ["other", firing_id("hourly", T0 + HOUR), firing_id("hourly", T0 + 2 * HOUR), "x@y"]
    scheduler = Scheduler([hourly(CatchUp.ALL(max=10))], clock, known, always)
    assert scheduler.last == {"hourly": T0 + 2 * HOUR}
    starter = Starter()
    done, retry = await scheduler.fire_due(starter)
    assert not retry
    assert starter.ids == [firing_id("hourly", T0 + k * HOUR) for k in (3, 4, 5)]
    assert [d.how for d in done] == ["started"] * 3
    assert starter.started[0][1:] == ("report", {"kind": "hourly"})
    assert scheduler.last == {"hourly": T0 + 5 * HOUR}


async def test_duplicate_counts_as_started_and_not_owned_is_left_to_the_owner() -> None:
    clock = ManualClock(T0 + 3 * HOUR)
    owned = {firing_id("hourly", T0 + 2 * HOUR), firing_id("hourly", T0 + 3 * HOUR)}
    scheduler = Scheduler(
        [hourly(CatchUp.ALL(max=10))], clock, [firing_id("hourly", T0)], owned.__contains__
    )
    starter = Starter()
    starter.refuse[firing_id("hourly", T0 + 2 * HOUR)] = DuplicateWorkflow("already")
    done, retry = await scheduler.fire_due(starter)
    assert not retry
    assert [d.how for d in done] == ["not-owner", "duplicate", "started"]
    assert starter.ids == [firing_id("hourly", T0 + 3 * HOUR)]
    assert scheduler.last == {"hourly": T0 + 3 * HOUR}


async def test_a_passing_refusal_holds_that_firing_and_the_later_ones() -> None:
    clock = ManualClock(T0 + 3 * HOUR)
    scheduler = Scheduler([hourly(CatchUp.ALL(max=10))], clock, [firing_id("hourly", T0)], always)
    starter = Starter()
    starter.refuse[firing_id("hourly", T0 + 2 * HOUR)] = GateClosed("storage down")
    done, retry = await scheduler.fire_due(starter)
    assert retry
    assert [(d.firing.workflow_id, d.how) for d in done] == [
        (firing_id("hourly", T0 + HOUR), "started")
    ]
    assert starter.ids == [firing_id("hourly", T0 + HOUR)]
    assert scheduler.last == {"hourly": T0 + HOUR}
    starter.refuse.clear()
    _, retry = await scheduler.fire_due(starter)
    assert not retry
    assert starter.ids[1:] == [firing_id("hourly", T0 + k * HOUR) for k in (2, 3)]


@pytest.mark.parametrize("error", [Fenced("replaced"), InstanceClosed("closed")])
async def test_fire_due_raises_when_the_instance_stops(error: Exception) -> None:
    scheduler = Scheduler([hourly()], ManualClock(T0), [], always)
    starter = Starter()
    starter.refuse[firing_id("hourly", T0)] = error
    with pytest.raises(type(error)):
        await scheduler.fire_due(starter)


async def test_run_sleeps_to_each_fire_time_and_fires_once() -> None:
    clock = ManualClock(T0 + timedelta(minutes=30))
    schedules = [hourly(), Schedule("quarter", "sync", every=timedelta(minutes=15))]
    scheduler = Scheduler(schedules, clock, [], always)
    starter = Starter()
    task = asyncio.create_task(scheduler.run(starter))
    try:
        # 00:30 is the on-time firing of "quarter" only; the earliest next is 00:45
        await clock.wait_for_deadline((T0 + timedelta(minutes=45)).timestamp())
        assert starter.ids == [firing_id("quarter", T0 + timedelta(minutes=30))]
        clock.advance_to(T0 + timedelta(minutes=45))
        await clock.wait_for_deadline((T0 + HOUR).timestamp())
        clock.advance_to(T0 + HOUR)
        await clock.wait_for_deadline((T0 + timedelta(minutes=75)).timestamp())
        assert starter.ids == [
            firing_id("quarter", T0 + timedelta(minutes=30)),
            firing_id("quarter", T0 + timedelta(minutes=45)),
            firing_id("hourly", T0 + HOUR),
            firing_id("quarter", T0 + HOUR),
        ]
    finally:
        task.cancel()


async def test_run_tries_a_refused_firing_again_after_the_retry_delay() -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler([hourly()], clock, [], always)
    starter = Starter()
    starter.refuse[firing_id("hourly", T0)] = GateClosed("storage down")
    task = asyncio.create_task(scheduler.run(starter))
    try:
        await clock.wait_for_deadline((T0 + RETRY_DELAY).timestamp())
        assert starter.ids == []
        starter.refuse.clear()
        clock.advance(RETRY_DELAY.total_seconds())
        await clock.wait_for_deadline((T0 + HOUR).timestamp())
        assert starter.ids == [firing_id("hourly", T0)]
    finally:
        task.cancel()


async def test_run_returns_when_the_instance_closes() -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler([hourly()], clock, [], always)
    starter = Starter()
    starter.refuse[firing_id("hourly", T0)] = InstanceClosed("closed")
    await asyncio.wait_for(scheduler.run(starter), 5)
    assert clock.sleepers == 0


async def test_no_schedules_no_loop() -> None:
    clock = ManualClock(T0)
    scheduler = Scheduler([], clock, [], always)
    await asyncio.wait_for(scheduler.run(Starter()), 5)
    assert scheduler.next_wake(T0) is None


def test_check_schedules_names_the_bad_schedule() -> None:
    def fine(_schedule: Schedule) -> str | None:
        return None

    with pytest.raises(InvalidSchedule, match=r"'hourly'.*declared twice") as twice:
        check_schedules([hourly(), hourly()], fine)
    assert twice.value.schedule == "hourly"
    with pytest.raises(InvalidSchedule, match="expected a Schedule"):
        check_schedules(["hourly"], fine)
    with pytest.raises(InvalidSchedule, match=r"'hourly'.*'report'.*no such type") as bad:
        check_schedules([hourly()], lambda _s: "no such type")
    assert bad.value.reason == "no such type"
    assert check_schedules([hourly(), hourly(name="b")], fine) == (hourly(), hourly(name="b"))


class Broken(Schedule):
    """A schedule whose fire times cannot be computed (a bug, or cron giving up)."""

    def next_after(self, after: datetime) -> datetime:
        raise InvalidSchedule(self.name, "-", "no fire time within 50 years")


async def test_a_schedule_that_fails_stops_the_scheduler_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = Broken("broken", "report", every=HOUR)
    scheduler = Scheduler([broken], ManualClock(T0), [], always)
    await asyncio.wait_for(scheduler.run(Starter()), 5)  # returns, does not raise
    assert "the scheduler stops" in caplog.text
