"""Forwarded calls on the real broker: a caller that owns no partition reaches the owner
through ``<topic>-requests`` and gets the owner's answers (results, refusals, attach, unknown
types, terminal errors); requests sent before any owner runs are served once one does, and
a request whose owner was killed mid-workflow is answered by the next owner, once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kapbit import (
    Definition,
    DuplicateWorkflow,
    InvalidReturnValue,
    Kapbit,
    KapbitError,
    Step,
    UnknownWorkflowType,
    WorkflowNotFound,
)
from kapbit.forwarding import Forwarder, RemoteWorkflows
from kapbit.projection import WorkflowStatus
from kapbit.repository.kafka import KafkaRepository, KafkaRequestLog
from tests.forwarding_workflows import BROKEN, CODEC, ENTERED, GREET, HELD, greet
from tests.helpers import fast_options

PARTITIONS = 3
OTHER = Definition("other", steps=[Step(greet)], input_type=str)


class Caller:
    """Owns nothing: every call goes through the request log."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.log = KafkaRepository(bootstrap, topic, partitions=PARTITIONS)
        self.requests = KafkaRequestLog(bootstrap, topic, partitions=PARTITIONS)
        self.forwarder = Forwarder(
            self.requests,
            self.log,
            CODEC,
            {d.type: d for d in (GREET, BROKEN, OTHER)},
            "caller/1",
            30.0,
        )
        self.remote = RemoteWorkflows(self.forwarder, PARTITIONS)

    async def start(self) -> None:
        await self.log.start()
        await self.requests.start()
        await self.forwarder.start()

    async def close(self) -> None:
        await self.forwarder.close()
        await self.requests.close()
        await self.log.close()

    async def exec(
        self, workflow_type: str, workflow_id: str, name: str, dup: str = "raise"
    ) -> Any:
        return await self.remote.exec(workflow_id, workflow_type, CODEC.encode(name), dup)


@pytest.fixture
async def caller(kafka_bootstrap: str, topic: str) -> AsyncIterator[Caller]:
    caller = Caller(kafka_bootstrap, topic)
    await caller.start()
    yield caller
    await caller.close()


def _owner(bootstrap: str, topic: str) -> Kapbit:
    return Kapbit(
        [GREET, BROKEN],
        KafkaRepository(bootstrap, topic, partitions=PARTITIONS),
        options=fast_options(max_attempts=2),
        requests=KafkaRequestLog(bootstrap, topic, partitions=PARTITIONS),
    )


async def test_calls_for_ids_owned_elsewhere_get_the_owners_answers(
    kafka_bootstrap: str, topic: str, caller: Caller
) -> None:
    async with _owner(kafka_bootstrap, topic) as owner:
        assert await caller.exec("greet", "k-1", "ada") == "hello ada"
        with pytest.raises(DuplicateWorkflow):
            await caller.exec("greet", "k-1", "ada")
        assert await caller.exec("greet", "k-1", "ada", dup="attach") == "hello ada"
        with pytest.raises(UnknownWorkflowType):
            await caller.exec("other", "k-2", "x")
        with pytest.raises(InvalidReturnValue):
            await caller.exec("broken", "k-3", "x")
        handle = await caller.remote.start("k-4", "greet", CODEC.encode("bo"), "raise")
        assert await handle.result(timeout=30) == "hello bo"
        assert await handle.status() is WorkflowStatus.SUCCEEDED
        with pytest.raises(WorkflowNotFound):
            await caller.remote.handle("k-none").status()
        assert owner.stats.started == 3  # k-1, k-3, k-4: refusals and attach wrote nothing


async def test_requests_sent_before_any_owner_and_one_whose_owner_died_are_served(
    kafka_bootstrap: str, topic: str, caller: Caller
) -> None:
    early = [asyncio.create_task(caller.exec("greet", f"e-{i}", str(i))) for i in range(5)]
    first = _owner(kafka_bootstrap, topic)
    await first.start()
    assert await asyncio.wait_for(asyncio.gather(*early), 60) == [f"hello {i}" for i in range(5)]

    HELD["held"], ENTERED["held"] = asyncio.Event(), asyncio.Event()
    call = asyncio.create_task(caller.exec("greet", "d-1", "held"))
    await asyncio.wait_for(ENTERED["held"].wait(), 30)
    first.abort()  # a crash with the workflow created and its exec unanswered
    HELD.pop("held").set()
    async with _owner(kafka_bootstrap, topic) as second:
        assert await asyncio.wait_for(call, 60) == "hello held"
        assert second.stats.recovered == 1 and second.stats.started == 0


async def test_calls_during_a_takeover_are_answered_correctly_or_refused_with_a_type(
    kafka_bootstrap: str, topic: str, caller: Caller
) -> None:
    """A second owner takes the log over while forwarded calls stream in: every call gets
    its own workflow's result or a typed error, never another's answer or a duplicate."""
    first = _owner(kafka_bootstrap, topic)
    await first.start()
    count = 40
    names = [f"held{i}" if i == 5 else str(i) for i in range(count)]
    HELD["held5"], ENTERED["held5"] = asyncio.Event(), asyncio.Event()
    calls: list[asyncio.Task[Any]] = []
    second: Kapbit | None = None
    try:
        for i in range(count):
            calls.append(asyncio.create_task(caller.exec("greet", f"r-{i}", names[i])))
            if i == count // 2:
                await asyncio.wait_for(ENTERED["held5"].wait(), 30)  # in flight on the first
                second = _owner(kafka_bootstrap, topic)  # fences the first owner
                await second.start()
                HELD.pop("held5").set()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 90)
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, KapbitError), repr(outcome)
                assert not isinstance(outcome, DuplicateWorkflow), (i, outcome)
            else:
                assert outcome == f"hello {names[i]}", (i, outcome)
        answered = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException)]
        assert len(answered) == count, outcomes  # the new owner served what the first left
        assert second is not None
        for i in answered:  # the log agrees, one workflow per id
            result = await second.get_workflow(f"r-{i}").result(timeout=30)
            assert result == f"hello {names[i]}"
        assert second.stats.recovered >= 1  # r-5, created by the first, ended by the second
        assert first.stats.started + second.stats.started == count  # each id created once
    finally:
        await first.close()
        if second is not None:
            await second.close()
