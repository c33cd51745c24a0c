"""Group mode on the real broker: instances sharing one log through a consumer group.

Three in-process instances on a 6-partition topic (session timeout 2 s): one starts, a
second and a third join, the second stops gracefully and the third is aborted (a crash),
all while workflows are submitted to whichever instance owns their id. Every workflow an
instance accepted terminates exactly once in the log (zombie writes left out).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from kapbit import (
    Definition,
    DuplicateWorkflow,
    Fenced,
    GroupOptions,
    InstanceClosed,
    Kapbit,
    NotOwner,
    Options,
    Step,
    Success,
)
from kapbit.fencing import OwnerTracker
from kapbit.repository.kafka import KafkaRepository

PARTITIONS = 6
SESSION = 2.0
HEARTBEAT = 0.1


def _definition(calls: list[tuple[str, int]]) -> Definition:
    def step(index: int) -> Any:
        async def act(input: Any, progress: Any) -> Any:
            calls.append((input, index))
            await asyncio.sleep(0.01)
            return Success(index)

        return act

    return Definition(
        "pair", steps=[Step(step(0), name="a"), Step(step(1), name="b")], input_type=str
    )


def _instance(bootstrap: str, topic: str, name: str, calls: list[tuple[str, int]]) -> Kapbit:
    return Kapbit(
        [_definition(calls)],
        KafkaRepository(bootstrap, topic, partitions=PARTITIONS),
        options=Options(node_id=name, close_timeout=2.0, start_timeout=30.0),
        group=GroupOptions(
            name=f"{topic}-group",
            endpoint=f"{name}:80",
            session_timeout=SESSION,
            heartbeat_interval=HEARTBEAT,
        ),
    )


async def _terminals(bootstrap: str, topic: str) -> dict[str, int]:
    """Live terminal events per workflow id (records of a writer after another writer's
    claim are zombies and left out)."""
    reader = KafkaRepository(bootstrap, topic)
    await reader.start()
    try:
        counts: dict[str, int] = {}
        for partition in range(PARTITIONS):
            owners = OwnerTracker("")
            end = await reader.end_offset(partition)
            async for batch in reader.read(partition, 0, end):
                for record in batch:
                    if owners.admit(record) and record.kind == "workflow_result":
                        counts[record.key] = counts.get(record.key, 0) + 1
        return counts
    finally:
        await reader.close()


async def test_join_graceful_leave_and_abort_lose_and_double_nothing(
    kafka_bootstrap: str, topic: str
) -> None:
    calls: list[tuple[str, int]] = []
    a = _instance(kafka_bootstrap, topic, "a", calls)
    await a.start()
    members = [a]
    accepted: set[str] = set()
    stop = asyncio.Event()
    rng = random.Random(7)

    async def submit() -> None:
        n = 0
        while not stop.is_set():
            workflow_id = f"w{n}"
            for _ in range(200):
                live = [m for m in members if m.is_running]
                if not live:
                    break
                member = rng.choice(live)
                try:
                    await member.start_workflow(workflow_id, "pair", workflow_id)
                    accepted.add(workflow_id)
                    break
                except DuplicateWorkflow:
                    # an earlier try was cut off by a revoke after its WorkflowCreated
                    # landed: the workflow exists and its new owner runs it
                    accepted.add(workflow_id)
                    break
                except (NotOwner, InstanceClosed, Fenced):
                    await asyncio.sleep(0.01)
            n += 1

    driver = asyncio.create_task(submit())
    try:
        b = _instance(kafka_bootstrap, topic, "b", calls)
        await b.start()
        members.append(b)
        c = _instance(kafka_bootstrap, topic, "c", calls)
        await c.start()
        members.append(c)
        # (two members may both think they own a partition for a moment: the old owner
        # learns of the revoke when its rebalance completes; the log fences its writes)
        await asyncio.sleep(1.0)
        await b.close()  # graceful: hands its partitions over
        await asyncio.sleep(1.0)
        c.abort()  # a crash: its partitions are taken over after it
        await asyncio.sleep(1.0)
        stop.set()
        await driver
        assert len(accepted) > 20
        for _ in range(300):
            terminals = await _terminals(kafka_bootstrap, topic)
            if set(terminals) >= accepted:
                break
            await asyncio.sleep(0.1)
        assert set(terminals) >= accepted, sorted(accepted - set(terminals))
        assert all(count == 1 for count in terminals.values()), terminals
        for _ in range(200):  # the survivor takes the aborted member's partitions over
            if all(a.owner_of(f"w{i}").local for i in range(30)):
                break
            await asyncio.sleep(0.1)
        assert all(a.owner_of(f"w{i}").local for i in range(30))
        assert (await a.exec_workflow("after", "pair", "after")) == [0, 1]
    finally:
        stop.set()
        await driver
        for member in members:
            await member.close()
