"""Durable timers on a real broker: workflows asleep survive a crash (abort, connections
dropped) and a takeover, and wake once on the instance that owns them, at the fire time
written in the log. Time is a ManualClock: nothing waits for days, or at all."""

from __future__ import annotations

import asyncio
import contextlib

from kapbit import Fenced, Kapbit
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing import ManualClock
from tests.helpers import wait_until
from tests.test_timers_engine import DAY, T0, Journal, options, trial

USERS = [f"u{n}" for n in range(3)]


async def test_sleeping_workflows_survive_a_crash_and_a_takeover_on_kafka(
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
