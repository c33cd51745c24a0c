"""Lost acknowledgements for real: the record lands, the ack never comes (issue 10 on Kafka).

The broker advertises a :class:`~kapbit.testing.TcpProxy`; ``proxy.lose_acks(n)`` lets the
next ``n`` produce requests reach the broker and resets their connection before the
response reaches the client. aiokafka (without idempotence) sends the records again, so the
log holds second copies, exactly what a real network fault leaves behind.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from kapbit import (
    CheckpointPolicy,
    Definition,
    DuplicateWorkflow,
    Kapbit,
    Options,
    Progress,
    Step,
    Success,
)
from kapbit.events import EventKind
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing.broker import LocalBroker
from tests.helpers import wait_until
from tests.kafka_worker import read_log


async def test_a_lost_ack_lands_the_record_and_the_producer_sends_it_again(topic: str) -> None:
    async with LocalBroker.behind_proxy() as broker:
        repo = KafkaRepository(broker.bootstrap_servers, topic, partitions=1)
        await repo.start()
        try:
            await repo.claim(0, "n1", b"aw")
            broker.proxy.lose_acks(1)
            offset = await asyncio.wait_for(
                repo.append(0, EventKind.WORKFLOW_CREATED, "w1", "n1", b"created"), 30
            )
            await repo.append(0, EventKind.WORKFLOW_RESULT, "w1", "n1", b"result")
            records = [
                (r.kind, r.key, r.value)
                async for batch in repo.read(0, 0, await repo.end_offset(0))
                for r in batch
            ]
        finally:
            await repo.close()
        assert broker.proxy.acks_lost == 1
        assert broker.proxy.acks_pending == 0
    # The first copy landed although its ack was lost; the append returned the second.
    assert records == [
        ("active_writer", "n1", b"aw"),
        ("workflow_created", "w1", b"created"),
        ("workflow_created", "w1", b"created"),
        ("workflow_result", "w1", b"result"),
    ]
    assert offset == 2


def _blocking_saga(
    release: dict[str, asyncio.Event], runs: list[str], entered: list[str] | None = None
) -> Definition:
    """One step; a workflow whose id is in ``release`` blocks in it until that event is set.
    ``entered`` lists the workflows whose step started (their WorkflowCreated is durable)."""

    async def act(input: dict[str, str], progress: Progress) -> Any:
        if entered is not None:
            entered.append(input["id"])
        if (event := release.get(input["id"])) is not None:
            await event.wait()
        runs.append(input["id"])
        return Success(f"done-{input['id']}")

    return Definition(
        "one",
        steps=[Step(act)],
        result=lambda input, progress: progress.values(),
        input_type=dict[str, str],
        outcome_type=str,
    )


async def _saves_beyond(consumer: AIOKafkaConsumer, topic: str, key: str, saves: int) -> int:
    """Wait until more than ``saves`` checkpoints keyed ``key`` were written to ``topic``;
    their count. Only checkpoint records count: a save writes its snapshot's chunks first,
    and an acknowledgement lost right after a chunk would hit the checkpoint's write."""
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    count = read = 0
    while count <= saves:
        end = (await consumer.end_offsets([tp]))[tp]
        if read >= end:
            await asyncio.sleep(0.02)  # polling the checkpoint topic: nothing to wait on
            continue
        consumer.seek(tp, read)
        fetched = await consumer.getmany(tp, timeout_ms=1000)
        for record in fetched.get(tp, ()):
            count += record.key == key.encode()
            read = record.offset + 1
    return count


async def test_created_twice_by_a_lost_ack_then_checkpointed_open_is_resumed_by_the_next_owner(
    topic: str,
) -> None:
    # Issue 10, defect 1 against a real broker: the WorkflowCreated of an open workflow
    # lands twice (its first ack was lost), a checkpoint moves up to it while it is still
    # open, one finished workflow sits in the window; a second instance must resume it.
    async with LocalBroker.behind_proxy() as broker:
        address = broker.bootstrap_servers
        options = Options(checkpoints=CheckpointPolicy(every=1, interval=3600))
        early = asyncio.Event()
        first_runs: list[str] = []
        entered: list[str] = []
        first = Kapbit(
            [_blocking_saga({"early": early, "held": asyncio.Event()}, first_runs, entered)],
            KafkaRepository(address, topic, partitions=1),
            options=options,
        )
        observer = AIOKafkaConsumer(bootstrap_servers=address)
        await first.start()
        await observer.start()
        checkpoints, key = f"{topic}-checkpoints", f"{topic}/0"
        tasks: list[asyncio.Task[Any]] = []
        try:
            assert await first.exec_workflow("done", "one", {"id": "done"}) == ["done-done"]
            saves = await asyncio.wait_for(_saves_beyond(observer, checkpoints, key, 0), 30)
            tasks.append(asyncio.create_task(first.exec_workflow("early", "one", {"id": "early"})))
            await wait_until(lambda: "early" in entered, timeout=30)
            broker.proxy.lose_acks(1)
            tasks.append(asyncio.create_task(first.exec_workflow("held", "one", {"id": "held"})))
            await wait_until(lambda: broker.proxy.acks_lost == 1, timeout=30)
            await wait_until(lambda: "held" in entered, timeout=30)
            early.set()  # "early" ends: the checkpoint moves up to "held", still open
            assert await asyncio.wait_for(tasks[0], 30) == ["done-early"]
            await asyncio.wait_for(_saves_beyond(observer, checkpoints, key, saves), 30)
            first.abort()
            second_runs: list[str] = []
            second = Kapbit(
                [_blocking_saga({}, second_runs)], KafkaRepository(address, topic), options=options
            )
            async with second:
                assert await asyncio.wait_for(second.wait_result("held"), 30) == ["done-held"]
                for workflow_id in ("done", "early", "held"):
                    try:
                        await second.exec_workflow(workflow_id, "one", {"id": workflow_id})
                    except DuplicateWorkflow:
                        continue
                    raise AssertionError(f"{workflow_id!r} was accepted a second time")
        finally:
            for task in tasks:
                task.cancel()
            await observer.stop()
            await first.close()
        log = await read_log(address, topic)
    created = Counter(e.key for entries in log.created().values() for e in entries)
    assert created["held"] == 2, created  # the fault really hit the WorkflowCreated
    assert {wid: len(t) for wid, t in log.terminals().items()} == {
        "done": 1,
        "early": 1,
        "held": 1,
    }
    assert first_runs == ["done", "early"] and second_runs == ["held"]
