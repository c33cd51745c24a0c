"""A schedule on the real broker: it fires, and a second instance taking over does not fire
any firing again (the last firing is read back from the topic)."""

from __future__ import annotations

from datetime import timedelta

from kapbit import Kapbit
from kapbit.repository.kafka import KafkaRepository
from kapbit.schedules import CatchUp
from kapbit.testing import ManualClock
from tests.kafka_worker import read_log
from tests.test_schedules_engine import HOUR, REPORT, T0, fid, hourly, options, until_sleeping


async def test_a_schedule_fires_on_kafka_and_a_takeover_does_not_fire_it_twice(
    kafka_bootstrap: str, topic: str
) -> None:
    clock = ManualClock(T0 + timedelta(seconds=5))
    schedules = [hourly(CatchUp.ALL(max=3))]
    a = Kapbit(
        [REPORT],
        KafkaRepository(kafka_bootstrap, topic, partitions=3),
        options=options(clock, node_id="a"),
        schedules=schedules,
    )
    await a.start()
    b: Kapbit | None = None
    try:
        await until_sleeping(clock, T0 + HOUR)
        clock.advance_to(T0 + HOUR)
        await until_sleeping(clock, T0 + 2 * HOUR)

        # B takes over within the grace of 01:00, which A already started
        clock.advance(10)
        b = Kapbit(
            [REPORT],
            KafkaRepository(kafka_bootstrap, topic),
            options=options(clock, node_id="b"),
            schedules=schedules,
        )
        await b.start()
        await until_sleeping(clock, T0 + 2 * HOUR)
        clock.advance_to(T0 + 2 * HOUR)
        await until_sleeping(clock, T0 + 3 * HOUR)
        await b.get_workflow(fid(T0 + 2 * HOUR)).result()
    finally:
        await a.close()
        if b is not None:
            await b.close()

    created = (await read_log(kafka_bootstrap, topic)).created()
    # byte-identical second copies (a producer retry) are one workflow; their stamps agree
    firings = {
        wid: len({(e.partition, e.event.at) for e in entries}) for wid, entries in created.items()
    }
    assert firings == {fid(T0): 1, fid(T0 + HOUR): 1, fid(T0 + 2 * HOUR): 1}
    assert {entries[0].node.split("/")[0] for entries in created.values()} == {"a", "b"}
