"""Issue 16's engine-side items against the real (local) broker: a reused node id, a codec
changed between restarts, and two topics sharing one checkpoint topic."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kapbit import (
    CodecMismatch,
    Definition,
    DuplicateWorkflow,
    Fenced,
    InstanceClosed,
    Kapbit,
    MsgpackCodec,
    Options,
    Progress,
    Step,
    Success,
)
from kapbit.repository.kafka import KafkaRepository
from tests.helpers import wait_until


def _blocking(release: asyncio.Event, entered: list[str]) -> Definition:
    async def first(input: Any, progress: Progress) -> Success[str]:
        entered.append(input)
        await release.wait()
        return Success("one")

    async def second(input: Any, progress: Progress) -> Success[str]:
        return Success("two")

    return Definition("two", [Step(first), Step(second)])


async def _ends(bootstrap: str, topic: str) -> list[int]:
    reader = KafkaRepository(bootstrap, topic)
    await reader.start()
    try:
        return [await reader.end_offset(p) for p in range(reader.partitions)]
    finally:
        await reader.close()


async def test_item3_a_reused_node_id_still_fences_on_kafka(
    kafka_bootstrap: str, topic: str
) -> None:
    """Item 3: two starts with the same node_id (a pod name): the second fences the first,
    which finishes nothing."""
    release = asyncio.Event()
    entered: list[str] = []
    same = Options(node_id="pod-0")
    a = Kapbit(
        [_blocking(release, entered)],
        KafkaRepository(kafka_bootstrap, topic, partitions=2),
        options=same,
    )
    await a.start()
    on_a = [asyncio.create_task(a.exec_workflow(f"w{i}", "two", f"w{i}")) for i in range(4)]
    await wait_until(lambda: len(entered) == 4, timeout=20)
    b_entered: list[str] = []
    b_release = asyncio.Event()
    b_release.set()
    b = Kapbit(
        [_blocking(b_release, b_entered)], KafkaRepository(kafka_bootstrap, topic), options=same
    )
    await b.start()
    try:
        assert b.stats.recovered == 4
        release.set()
        results = await asyncio.gather(*on_a, return_exceptions=True)
        assert all(isinstance(r, Fenced) for r in results), results
        for i in range(4):
            assert await b.wait_result(f"w{i}", timeout=20) == ["one", "two"]
    finally:
        await b.close()
        await a.close()


async def test_item6_another_codec_is_refused_on_kafka(kafka_bootstrap: str, topic: str) -> None:
    """Item 6: a topic written with JSON, restarted with MessagePack: CodecMismatch and
    nothing written."""
    release = asyncio.Event()
    release.set()
    definition = _blocking(release, [])
    async with Kapbit([definition], KafkaRepository(kafka_bootstrap, topic, partitions=2)) as k:
        await k.exec_workflow("w", "two", "w")
    before = await _ends(kafka_bootstrap, topic)
    with pytest.raises(CodecMismatch):
        await Kapbit([definition], KafkaRepository(kafka_bootstrap, topic), MsgpackCodec()).start()
    assert await _ends(kafka_bootstrap, topic) == before


async def test_item5_two_topics_sharing_a_checkpoint_topic(
    kafka_bootstrap: str, topic: str
) -> None:
    """Item 5: a second topic given the first one's checkpoint topic does not trust the
    first topic's checkpoints: its open workflow is resumed and its id refused."""
    shared = f"{topic}-shared-checkpoints"
    release = asyncio.Event()
    release.set()
    first = KafkaRepository(kafka_bootstrap, topic, partitions=1, checkpoint_topic=shared)
    async with Kapbit([_blocking(release, [])], first) as kbit:
        for i in range(5):
            await kbit.exec_workflow(f"a{i}", "two", f"a{i}")
    other = f"{topic}-other"

    def repo() -> KafkaRepository:
        return KafkaRepository(kafka_bootstrap, other, partitions=1, checkpoint_topic=shared)

    held, entered = asyncio.Event(), list[str]()
    crashed = Kapbit([_blocking(held, entered)], repo())
    await crashed.start()
    caller = asyncio.create_task(crashed.exec_workflow("open", "two", "open"))
    await wait_until(lambda: entered == ["open"], timeout=20)
    crashed.abort()
    with pytest.raises(InstanceClosed):
        await caller
    async with Kapbit([_blocking(release, [])], repo()) as kbit:
        assert kbit.stats.recovered == 1
        assert await kbit.wait_result("open", timeout=20) == ["one", "two"]
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("open", "two", "open")
