"""The clock seam: the system clock and the ManualClock tests use instead of real sleeps."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from kapbit.clock import SYSTEM_CLOCK, Clock, SystemClock, utc_now
from kapbit.testing import ManualClock

START = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(SYSTEM_CLOCK, Clock)
    assert isinstance(ManualClock(), Clock)


def test_system_clock_reads_real_time() -> None:
    before = time.time()
    now = SystemClock().now()
    assert before <= now <= time.time()
    assert abs(utc_now(SYSTEM_CLOCK).timestamp() - time.time()) < 5
    assert utc_now(SYSTEM_CLOCK).tzinfo is UTC


async def test_system_clock_sleep_until_a_past_moment_returns_at_once() -> None:
    async with asyncio.timeout(1):
        await SYSTEM_CLOCK.sleep_until(time.time() - 3600)
        await SYSTEM_CLOCK.sleep(-1)


def test_manual_clock_stands_still_until_advanced() -> None:
    clock = ManualClock(START)
    assert clock.now() == START.timestamp()
    assert clock.monotonic() == 0.0
    assert clock.advance(90) == 0
    assert clock.now_datetime() == datetime(2026, 11, 21, 2, 1, 30, tzinfo=UTC)
    assert clock.monotonic() == 90.0
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="aware"):
        ManualClock(datetime(2026, 1, 1))


async def test_sleepers_wake_in_deadline_order_only_when_due() -> None:
    clock = ManualClock(START)
    woke: list[str] = []

    async def nap(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    async def until(name: str, seconds: float) -> None:
        await clock.sleep_until(clock.now() + seconds)
        woke.append(name)

    tasks = [
        asyncio.create_task(nap("c", 30)),
        asyncio.create_task(until("a", 10)),
        asyncio.create_task(nap("b", 20)),
        asyncio.create_task(until("d", 40)),
    ]
    await clock.wait_for_sleepers(4)
    assert clock.advance(9.5) == 0
    await asyncio.sleep(0)
    assert woke == []
    assert clock.advance(20.5) == 3  # t = 30: a, b and c are due
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks[:3])
    assert woke == ["a", "b", "c"]
    assert clock.sleepers == 1
    clock.advance(10)
    async with asyncio.timeout(5):
        await tasks[3]
    assert woke == ["a", "b", "c", "d"]


async def test_a_wall_clock_step_wakes_wall_sleepers_but_not_monotonic_ones() -> None:
    clock = ManualClock(START)
    wall = asyncio.create_task(clock.sleep_until(START.timestamp() + 3600))
    mono = asyncio.create_task(clock.sleep(3600))
    await clock.wait_for_sleepers(2)
    assert clock.next_deadline() == START.timestamp() + 3600
    assert clock.set_wall(START.timestamp() + 7200) == 1
    async with asyncio.timeout(5):
        await wall
    assert not mono.done()
    assert clock.monotonic() == 0.0
    mono.cancel()
    with pytest.raises(asyncio.CancelledError):
        await mono
    assert clock.sleepers == 0


async def test_a_cancelled_sleeper_is_not_counted_nor_woken() -> None:
    clock = ManualClock(START)
    task = asyncio.create_task(clock.sleep(5))
    await clock.wait_for_sleepers(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == 0
    assert clock.advance(10) == 0


async def test_sleeping_zero_or_into_the_past_yields_without_advancing() -> None:
    clock = ManualClock(START)
    async with asyncio.timeout(1):
        await clock.sleep(0)
        await clock.sleep_until(START.timestamp() - 1)
    assert clock.sleepers == 0


async def test_wait_for_sleepers_times_out_when_nobody_sleeps() -> None:
    clock = ManualClock(START)
    with pytest.raises(TimeoutError):
        await clock.wait_for_sleepers(1, timeout=0.05)
