"""Durable timers on the real broker: workflows sleeping on Kafka survive a crash of their
instance and are woken once, at their next step, by the instance that takes over (also
when their timers expired while no instance ran)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kapbit import Fenced, Kapbit, WillRetryLater
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing import ManualClock
from tests.helpers import napper, wait_until
from tests.test_timers_engine import DAY, T0, Journal, options, trial


async def test_sleeping_workflows_survive_a_crash_and_wake_once_after_a_takeover(
    kafka_bootstrap: str, topic: str
) -> None:
    clock, journal = ManualClock(T0), Journal()
    definition = trial(journal)
    first = Kapbit(
        [definition],
        KafkaRepository(kafka_bootstrap, topic, partitions=3),
        options=options(clock, "a"),
    )
    await first.start()
    second: Kapbit | None = None
    try:
        for n in range(6):
            await first.start_workflow(definition, f"u{n}", f"u{n}")
        await wait_until(lambda: first.stats.sleeping == 6, timeout=30)
        first.abort()  # a crash: its timers die with it

        clock.advance(13 * DAY)  # the reminders expire while no instance runs
        second = Kapbit(
            [definition], KafkaRepository(kafka_bootstrap, topic), options=options(clock, "b")
        )
        await second.start()
        assert second.stats.recovered == 6
        await wait_until(lambda: journal.count("remind") == 6, timeout=30)
        assert journal.count("end") == 0  # day 13: the trials end on day 14
        clock.advance(DAY)
        for n in range(6):
            result = await asyncio.wait_for(second.wait_result(f"u{n}", None), 30)
            assert result == ["welcomed", "reminded", "ended"]
    finally:
        await first.close()
        if second is not None:
            await second.close()
    for n in range(6):
        for step in ("welcome", "remind", "end"):
            assert journal.calls.count((f"u{n}", step)) == 1


USERS = [f"u{n}" for n in range(3)]


async def test_workflows_sleeping_through_a_live_takeover_wake_once_on_the_new_owner(
    kafka_bootstrap: str, topic: str
) -> None:
    clock, journal = ManualClock(T0), Journal()
    definition = trial(journal)

    a_repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    a = Kapbit([definition], a_repo, options=options(clock, "a"))
    await a.start()
    for user in USERS:
        await a.start_workflow(definition, user, user)
    await wait_until(lambda: a.stats.sleeping == len(USERS), timeout=30)
    a.abort()  # a crash: nothing more is written, the connections go with the process
    await a_repo.close()

    clock.advance(12 * DAY)  # the first timers expire while no instance runs
    b = Kapbit([definition], KafkaRepository(kafka_bootstrap, topic), options=options(clock, "b"))
    await b.start()
    await wait_until(lambda: journal.count("remind") == len(USERS), timeout=30)
    await wait_until(lambda: b.stats.sleeping == len(USERS), timeout=30)  # until day 14 now

    # C takes the partitions over while every workflow sleeps on B.
    c = Kapbit([definition], KafkaRepository(kafka_bootstrap, topic), options=options(clock, "c"))
    await c.start()
    try:
        assert c.stats.sleeping == len(USERS)
        with contextlib.suppress(Fenced):
            await b.close()
        clock.advance_to(T0.timestamp() + 14 * DAY)
        for user in USERS:
            result = await asyncio.wait_for(c.wait_result(user, None), 30)
            assert result == ["welcomed", "reminded", "ended"]
    finally:
        await c.close()
    for user in USERS:
        assert [name for who, name in journal.calls if who == user] == [
            "welcome",
            "remind",
            "end",
        ]


async def test_exec_workflow_on_kafka_hears_will_retry_later_from_a_step_after_the_wake(
    kafka_bootstrap: str, topic: str
) -> None:
    """As without a timer: the caller waits through the sleep, then hears WillRetryLater
    when the step after the wake raises; the handle waits for the end the retry reaches."""
    clock = ManualClock(T0)
    definition, runs = napper(1, raises=1)
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    async with Kapbit([definition], repo, options=options(clock, "a")) as kbit:
        call = asyncio.create_task(kbit.exec_workflow(definition, "n1", "n1"))
        await wait_until(lambda: kbit.stats.sleeping == 1, timeout=30)
        clock.advance(3600)
        with pytest.raises(WillRetryLater, match="n1"):
            await asyncio.wait_for(call, 30)
        result = await asyncio.wait_for(kbit.get_workflow("n1").result(), 30)
        assert result == ["napped", "done"]
        assert runs == [2]
