"""The timer queue and the Sleep / SleepUntil outcomes, driven by a ManualClock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kapbit.errors import InvalidTimer, KapbitError
from kapbit.testing import ManualClock
from kapbit.timers import Sleep, SleepingWorkflow, SleepUntil, TimerQueue

START = datetime(2026, 11, 21, tzinfo=UTC)
T0 = START.timestamp()


def entry(workflow_id: str, delay: float, partition: int = 0, offset: int = 0) -> SleepingWorkflow:
    return SleepingWorkflow(T0 + delay, partition, offset, workflow_id, 2)


def ids(entries: list[SleepingWorkflow]) -> list[str]:
    return [e.workflow_id for e in entries]


# --- Sleep / SleepUntil ---------------------------------------------------------------------


def test_sleep_fires_after_its_delay_and_keeps_the_value() -> None:
    sleep = Sleep(timedelta(days=12), value="reminder due")
    assert sleep.fire_at(T0) == T0 + 12 * 86400
    assert sleep.value == "reminder due"
    assert Sleep(timedelta(0)).fire_at(T0) == T0


def test_sleep_until_fires_at_its_moment_in_any_zone() -> None:
    when = datetime(2026, 12, 5, 9, 0, tzinfo=timezone(timedelta(hours=1)))
    assert SleepUntil(when).fire_at(T0) == datetime(2026, 12, 5, 8, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Sleep(timedelta(seconds=-1)), "zero or more"),
        (lambda: Sleep(30), "needs a timedelta, got int"),  # type: ignore[arg-type]
        (lambda: Sleep("1 day"), "needs a timedelta, got str"),  # type: ignore[arg-type]
        (lambda: SleepUntil(datetime(2026, 12, 5, 9, 0)), "aware datetime"),
        (lambda: SleepUntil("2026-12-05"), "needs a datetime, got str"),  # type: ignore[arg-type]
    ],
)
def test_bad_timers_raise_a_typed_error(build: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidTimer, match=message) as raised:
        build()
    assert isinstance(raised.value, KapbitError)


# --- TimerQueue -------------------------------------------------------------------------------


def test_due_entries_come_out_in_fire_order_ties_by_log_position() -> None:
    queue = TimerQueue(ManualClock(START))
    queue.add(entry("late", 30))
    queue.add(entry("tie-p1", 10, partition=1, offset=5))
    queue.add(entry("tie-p0-b", 10, partition=0, offset=9))
    queue.add(entry("early", 5))
    queue.add(entry("tie-p0-a", 10, partition=0, offset=3))
    assert queue.next_fire_at() == T0 + 5
    assert queue.pop_due(T0 + 4) == []
    assert ids(queue.pop_due(T0 + 10)) == ["early", "tie-p0-a", "tie-p0-b", "tie-p1"]
    assert ids(queue.pop_due(T0 + 10)) == []
    assert len(queue) == 1 and "late" in queue


def test_cancel_and_replace() -> None:
    queue = TimerQueue(ManualClock(START))
    queue.add(entry("a", 10))
    queue.add(entry("b", 20))
    cancelled = queue.cancel("a")
    assert cancelled is not None and cancelled.workflow_id == "a"
    assert queue.cancel("a") is None
    assert queue.cancel("never") is None
    queue.add(entry("b", 50))  # re-armed later: the first timer is gone
    assert queue.get("b") == entry("b", 50)
    assert queue.next_fire_at() == T0 + 50
    assert queue.pop_due(T0 + 49) == []
    assert ids(queue.pop_due(T0 + 50)) == ["b"]
    assert len(queue) == 0 and queue.next_fire_at() is None


def test_pop_due_respects_a_limit_and_keeps_the_rest_due() -> None:
    queue = TimerQueue(ManualClock(START))
    for n in range(5):
        queue.add(entry(f"w{n}", n))
    assert ids(queue.pop_due(T0 + 10, limit=2)) == ["w0", "w1"]
    assert ids(queue.pop_due(T0 + 10, limit=2)) == ["w2", "w3"]
    assert ids(queue.pop_due(T0 + 10)) == ["w4"]


def test_entries_encode_compactly_for_snapshots() -> None:
    sleeping = entry("trial-42", 60, partition=3, offset=1234)
    data = msgspec.msgpack.encode(sleeping)
    assert msgspec.msgpack.decode(data, type=SleepingWorkflow) == sleeping
    assert len(data) < 40


async def test_wait_due_sleeps_until_the_head_fires_and_fires_each_exactly_once() -> None:
    clock = ManualClock(START)
    queue = TimerQueue(clock)
    queue.add(entry("a", 10))
    queue.add(entry("b", 20))
    waiter = asyncio.create_task(queue.wait_due())
    await clock.wait_for_sleepers(1)
    clock.advance(9)
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(1)
    async with asyncio.timeout(5):
        assert ids(await waiter) == ["a"]
    waiter = asyncio.create_task(queue.wait_due())
    await clock.wait_for_sleepers(1)
    clock.advance(100)
    async with asyncio.timeout(5):
        assert ids(await waiter) == ["b"]
    assert len(queue) == 0
    waiter = asyncio.create_task(queue.wait_due())  # nothing left: waits for an add
    await asyncio.sleep(0)
    assert not waiter.done() and clock.sleepers == 0
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_an_earlier_entry_added_while_waiting_wakes_the_waiter() -> None:
    clock = ManualClock(START)
    queue = TimerQueue(clock)
    queue.add(entry("far", 3600))
    waiter = asyncio.create_task(queue.wait_due())
    await clock.wait_for_sleepers(1)
    assert clock.next_deadline() == T0 + 3600
    queue.add(entry("near", 5))
    await clock.wait_for_deadline(T0 + 5)  # the waiter re-slept until "near"
    clock.advance(5)
    async with asyncio.timeout(5):
        assert ids(await waiter) == ["near"]


async def test_an_entry_added_to_an_empty_queue_wakes_the_waiter() -> None:
    clock = ManualClock(START)
    queue = TimerQueue(clock)
    waiter = asyncio.create_task(queue.wait_due())
    await asyncio.sleep(0)
    queue.add(entry("now", 0))
    async with asyncio.timeout(5):
        assert ids(await waiter) == ["now"]


async def test_a_timer_that_expired_while_nothing_ran_is_due_at_once() -> None:
    clock = ManualClock(START)
    queue = TimerQueue(clock)  # as rebuilt by recovery, after the fire time
    queue.add(entry("overdue", -86400))
    async with asyncio.timeout(5):
        assert ids(await queue.wait_due()) == ["overdue"]
    assert clock.sleepers == 0


async def test_a_cancelled_head_does_not_fire() -> None:
    clock = ManualClock(START)
    queue = TimerQueue(clock)
    queue.add(entry("cancelled", 10))
    queue.add(entry("kept", 20))
    waiter = asyncio.create_task(queue.wait_due())
    await clock.wait_for_sleepers(1)
    queue.cancel("cancelled")
    clock.advance(10)  # the waiter wakes for the cancelled one, finds nothing, sleeps on
    await clock.wait_for_sleepers(1)
    assert not waiter.done()
    clock.advance(10)
    async with asyncio.timeout(5):
        assert ids(await waiter) == ["kept"]


async def test_one_waiter_at_a_time() -> None:
    queue = TimerQueue(ManualClock(START))
    first = asyncio.create_task(queue.wait_due())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already being awaited"):
        await queue.wait_due()
    with pytest.raises(ValueError, match="at least 1"):
        await queue.wait_due(limit=0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_wall_clock_step_forward_fires_what_became_due() -> None:
    clock = ManualClock(START)
    queue = TimerQueue(clock)
    queue.add(entry("tomorrow", 86400))
    waiter = asyncio.create_task(queue.wait_due())
    await clock.wait_for_sleepers(1)
    clock.set_wall(T0 + 86400)  # NTP step: wall time jumps, monotonic time does not
    async with asyncio.timeout(5):
        assert ids(await waiter) == ["tomorrow"]


async def test_100k_entries_fire_once_each_in_order_with_cancellations() -> None:
    clock = ManualClock(START)
    queue = TimerQueue(clock)
    rng = random.Random(14)
    count = 100_000
    delays = {f"wf-{n}": rng.randrange(0, 30 * 86400) for n in range(count)}
    for n, (workflow_id, delay) in enumerate(delays.items()):
        queue.add(SleepingWorkflow(T0 + delay, n % 12, n, workflow_id, 1))
    cancelled = set(rng.sample(sorted(delays), 20_000))
    for workflow_id in cancelled:
        assert queue.cancel(workflow_id) is not None
    assert len(queue) == count - len(cancelled)

    fired: list[SleepingWorkflow] = []
    async with asyncio.timeout(60):
        while queue.next_fire_at() is not None:
            waiter = asyncio.create_task(queue.wait_due(limit=5_000))
            await asyncio.sleep(0)
            if not waiter.done():
                await clock.wait_for_sleepers(1)
                next_at = queue.next_fire_at()
                assert next_at is not None
                clock.advance_to(next_at + 3600)  # jump an hour past the next timer
            fired.extend(await waiter)

    assert len(fired) == count - len(cancelled)
    assert {e.workflow_id for e in fired} == set(delays) - cancelled
    assert fired == sorted(fired)  # fire time, then partition and offset
    assert all(e.fire_at <= clock.now() for e in fired)
    assert len(queue) == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 15), st.integers(0, 100)),
            st.tuples(st.just("cancel"), st.integers(0, 15), st.just(0)),
            st.tuples(st.just("advance"), st.just(0), st.integers(0, 40)),
        ),
        max_size=80,
    )
)
def test_the_queue_agrees_with_a_plain_model(ops: list[tuple[str, int, int]]) -> None:
    """Random adds (re-adds replace), cancels and clock moves: every armed timer fires once,
    at or after its time, unless cancelled or replaced first, in (time, log position)
    order."""
    queue = TimerQueue(ManualClock(START))
    model: dict[str, SleepingWorkflow] = {}
    now = T0
    for op, key, amount in ops:
        workflow_id = f"w{key}"
        if op == "add":
            armed = SleepingWorkflow(now + amount, key % 3, key, workflow_id, 0)
            queue.add(armed)
            model[workflow_id] = armed
        elif op == "cancel":
            assert queue.cancel(workflow_id) == model.pop(workflow_id, None)
        else:
            now += amount
            expected = sorted(e for e in model.values() if e.fire_at <= now)
            assert queue.pop_due(now) == expected
            for fired in expected:
                del model[fired.workflow_id]
        assert len(queue) == len(model)
        assert queue.next_fire_at() == min((e.fire_at for e in model.values()), default=None)
