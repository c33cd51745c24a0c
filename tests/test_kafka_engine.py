"""The engine on Kafka: workflows run, survive a restart, and a second instance takes over."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kapbit import CheckpointPolicy, Definition, Fenced, Kapbit, Options, Progress, Step, Success
from kapbit.repository.kafka import KafkaRepository
from tests.helpers import Script, saga, wait_until


async def test_saga_runs_on_kafka_with_the_exact_log(kafka_bootstrap: str, topic: str) -> None:
    script = Script({(2, "execute"): "fail"})
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    async with Kapbit([saga(script)], repo) as kbit:
        results = await asyncio.gather(
            *(kbit.exec_workflow(f"w{i}", "saga", {"id": f"w{i}"}) for i in range(20))
        )
    assert all(r == {"values": ["exec-0", "exec-1"], "compensated": [1, 0]} for r in results)
    check = KafkaRepository(kafka_bootstrap, topic)
    await check.start()
    try:
        kinds: dict[str, list[str]] = {}
        for p in range(2):
            async for batch in check.read(p, 0, await check.end_offset(p)):
                for record in batch:
                    if record.kind != "active_writer":
                        kinds.setdefault(record.key, []).append(record.kind)
    finally:
        await check.close()
    assert len(kinds) == 20
    assert all(
        k == ["workflow_created", *["step_outcome"] * 5, "workflow_result"] for k in kinds.values()
    )


async def test_restart_resumes_in_flight_workflows(kafka_bootstrap: str, topic: str) -> None:
    release = asyncio.Event()
    runs: list[str] = []

    async def first(input: Any, progress: Progress) -> Success[str]:
        runs.append(f"first-{input}")
        return Success("one")

    async def blocked(input: Any, progress: Progress) -> Success[str]:
        runs.append(f"second-{input}")
        await release.wait()
        return Success("two")

    definition = Definition("two", [Step(first), Step(blocked)])
    old = Kapbit([definition], KafkaRepository(kafka_bootstrap, topic, partitions=2))
    await old.start()
    callers = [asyncio.create_task(old.exec_workflow(f"r{i}", "two", i)) for i in range(5)]
    await wait_until(lambda: len(runs) == 10, timeout=20)
    old.abort()  # a crash: nothing more is written
    await asyncio.gather(*callers, return_exceptions=True)

    release.set()
    new = Kapbit([definition], KafkaRepository(kafka_bootstrap, topic))
    async with new:
        assert new.stats.recovered == 5
        results = [await new.wait_result(f"r{i}", timeout=20) for i in range(5)]
    assert results == [["one", "two"]] * 5
    # Step 0's outcome was persisted before the crash: it never ran again.
    assert sorted(r for r in runs if r.startswith("first")) == [f"first-{i}" for i in range(5)]


async def test_second_instance_fences_the_first(kafka_bootstrap: str, topic: str) -> None:
    release = asyncio.Event()

    async def wait(input: Any, progress: Progress) -> Success[None]:
        await release.wait()
        return Success()

    definition = Definition("wait", [Step(wait), Step(wait)])
    a = Kapbit(
        [definition],
        KafkaRepository(kafka_bootstrap, topic, partitions=1),
        options=Options(node_id="a"),
    )
    await a.start()
    pending = asyncio.create_task(a.exec_workflow("t1", "wait"))
    await wait_until(lambda: a.stats.started == 1, timeout=20)
    b = Kapbit([definition], KafkaRepository(kafka_bootstrap, topic), options=Options(node_id="b"))
    await b.start()
    try:
        assert b.stats.recovered == 1
        release.set()
        with pytest.raises(Fenced):
            await pending
        with pytest.raises(Fenced):
            await a.exec_workflow("t2", "wait")
        assert await b.wait_result("t1", timeout=20) == [None, None]
    finally:
        await b.close()
        await a.close()


async def test_a_replaced_instance_does_not_overwrite_the_new_owners_checkpoints(
    kafka_bootstrap: str, topic: str
) -> None:
    definition = saga(Script())
    quiet = Options(node_id="a", checkpoints=CheckpointPolicy(every=10_000, interval=3600))
    a = Kapbit([definition], KafkaRepository(kafka_bootstrap, topic, partitions=2), options=quiet)
    await a.start()
    await a.exec_workflow("before", "saga", {"id": "before"})  # a's checkpoint moved, unsaved
    b = Kapbit([definition], KafkaRepository(kafka_bootstrap, topic), options=Options(node_id="b"))
    await b.start()
    await b.exec_workflow("after", "saga", {"id": "after"})
    await b.close()  # saves b's checkpoints
    reader = KafkaRepository(kafka_bootstrap, topic)
    await reader.start()
    try:
        saved_by_b = await reader.load_checkpoints()
        assert saved_by_b
        await a.close()  # a still thinks it owns the log and tries to save its checkpoints
        assert await reader.load_checkpoints() == saved_by_b
        with pytest.raises(Fenced):
            await a.exec_workflow("late", "saga", {"id": "late"})
    finally:
        await reader.close()
