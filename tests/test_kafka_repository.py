"""KafkaRepository against a real broker: topics, records, fencing, checkpoints, errors."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator

import pytest

from kapbit import Fenced, PayloadTooLarge, StartupError, TransientStorageError
from kapbit.events import EventKind
from kapbit.repository import Checkpoint
from kapbit.repository.kafka import KafkaRepository


@pytest.fixture
async def writers(
    kafka_bootstrap: str, topic: str
) -> AsyncIterator[tuple[KafkaRepository, KafkaRepository]]:
    """Two started repositories on one single-partition topic, as two instances would be."""
    a = KafkaRepository(kafka_bootstrap, topic, partitions=1)
    b = KafkaRepository(kafka_bootstrap, topic, partitions=1)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _all(
    repo: KafkaRepository, partition: int, start: int = 0
) -> list[tuple[int, str, str, str, bytes]]:
    end = await repo.end_offset(partition)
    return [
        (r.offset, r.kind, r.key, r.node, r.value)
        async for batch in repo.read(partition, start, end)
        for r in batch
    ]


async def test_creates_the_topic_and_round_trips_records(kafka_bootstrap: str, topic: str) -> None:
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=3)
    await repo.start()
    try:
        assert repo.partitions == 3
        assert await repo.claim(1, "n1", b"aw") == 0
        offsets = await asyncio.gather(
            *(
                repo.append(1, EventKind.STEP_OUTCOME, f"w{i}", "n1", f"v{i}".encode())
                for i in range(50)
            )
        )
        assert sorted(offsets) == list(range(1, 51))
        assert await repo.end_offset(1) == 51
        assert await repo.end_offset(0) == 0
        records = await _all(repo, 1)
        assert records[0] == (0, "active_writer", "n1", "n1", b"aw")
        assert {r[2]: r[4] for r in records[1:]} == {f"w{i}": f"v{i}".encode() for i in range(50)}
        assert all(r[1] == "step_outcome" and r[3] == "n1" for r in records[1:])
        middle = [r.offset async for batch in repo.read(1, 10, 20) for r in batch]
        assert middle == list(range(10, 20))
    finally:
        await repo.close()


async def test_existing_topic_with_other_partition_count_refuses_to_start(
    kafka_bootstrap: str, topic: str
) -> None:
    first = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    await first.start()
    await first.close()
    with pytest.raises(StartupError, match="has 2 partitions, but 4 were requested"):
        await KafkaRepository(kafka_bootstrap, topic, partitions=4).start()
    existing = KafkaRepository(kafka_bootstrap, topic)
    await existing.start()
    assert existing.partitions == 2
    await existing.close()


async def test_missing_topic_without_creation_is_a_startup_error(
    kafka_bootstrap: str, topic: str
) -> None:
    with pytest.raises(StartupError, match="does not exist"):
        await KafkaRepository(kafka_bootstrap, topic, create_topic=False).start()


async def test_unreachable_broker_is_a_startup_error(topic: str) -> None:
    repo = KafkaRepository(
        "127.0.0.1:1", topic, partitions=1, client_options={"request_timeout_ms": 2000}
    )
    with pytest.raises(StartupError, match="cannot connect"):
        await repo.start()


async def test_payload_over_the_limit_is_refused_and_nothing_written(
    kafka_bootstrap: str, topic: str
) -> None:
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=1, max_payload=1000)
    await repo.start()
    try:
        await repo.claim(0, "n", b"")
        with pytest.raises(PayloadTooLarge):
            await repo.append(0, EventKind.WORKFLOW_CREATED, "w", "n", b"x" * 1001)
        assert await repo.end_offset(0) == 1
    finally:
        await repo.close()


async def test_second_writer_fences_the_first(
    writers: tuple[KafkaRepository, KafkaRepository],
) -> None:
    a, b = writers
    await a.claim(0, "a", b"")
    assert await a.append(0, EventKind.STEP_OUTCOME, "w", "a", b"1") == 1
    assert await b.claim(0, "b", b"") == 2
    with pytest.raises(Fenced, match="'b' claimed partition 0 at offset 2"):
        await a.append(0, EventKind.STEP_OUTCOME, "w", "a", b"zombie")
    with pytest.raises(Fenced):
        await a.append(0, EventKind.STEP_OUTCOME, "w", "a", b"again")
    assert await b.append(0, EventKind.STEP_OUTCOME, "w", "b", b"2") == 4
    kinds = [(o, node) for o, _, _, node, _ in await _all(b, 0)]
    # The fenced write landed (a zombie every reader ignores); b's write is after it.
    assert kinds == [(0, "a"), (1, "a"), (2, "b"), (3, "a"), (4, "b")]


async def test_checkpoints_are_saved_and_loaded(kafka_bootstrap: str, topic: str) -> None:
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    await repo.start()
    try:
        assert await repo.load_checkpoints() == {}
        await repo.save_checkpoint(0, Checkpoint(5, "a", 1, "a"))
        await repo.save_checkpoint(1, Checkpoint(3, "a", 0, ""))
        await repo.save_checkpoint(0, Checkpoint(9, "b", 2, "a"))
    finally:
        await repo.close()
    again = KafkaRepository(kafka_bootstrap, topic)
    await again.start()
    try:
        assert await again.load_checkpoints() == {
            0: Checkpoint(9, "b", 2, "a"),
            1: Checkpoint(3, "a", 0, ""),
        }
    finally:
        await again.close()


async def test_a_replaced_writer_cannot_save_a_checkpoint(
    writers: tuple[KafkaRepository, KafkaRepository],
) -> None:
    a, b = writers
    await a.claim(0, "a", b"")
    await a.save_checkpoint(0, Checkpoint(1, "a", 0, ""))
    await b.claim(0, "b", b"")
    await b.save_checkpoint(0, Checkpoint(2, "b", 0, ""))
    # a never wrote again, so only the checkpoint save can tell it was replaced.
    with pytest.raises(Fenced, match="'b' claimed partition 0"):
        await a.save_checkpoint(0, Checkpoint(1, "a", 0, ""))
    assert (await b.load_checkpoints())[0] == Checkpoint(2, "b", 0, "")


async def test_current_owner_is_the_latest_claimer(
    writers: tuple[KafkaRepository, KafkaRepository],
) -> None:
    a, b = writers
    assert await b.current_owner(0) == ""
    await a.claim(0, "a", b"")
    await a.append(0, EventKind.STEP_OUTCOME, "w", "a", b"1")
    assert await a.current_owner(0) == "a"
    assert await b.current_owner(0) == "a"  # never claimed: reads the partition
    await b.claim(0, "b", b"")
    assert await a.current_owner(0) == "b"
    assert await b.current_owner(0) == "b"


async def test_a_repository_shared_by_an_instance_and_a_projector_stays_open_until_the_last_close(
    kafka_bootstrap: str, topic: str
) -> None:
    """Whoever starts a repository closes it: each start is paired with one close, and the
    clients stop at the last close only."""
    from kapbit import Definition, Kapbit, Step
    from kapbit.projection import Projector, StatusModel

    repo = KafkaRepository(kafka_bootstrap, topic, partitions=1)
    saga = Definition("shared", [Step(lambda _input, _progress: None)])
    kbit = Kapbit([saga], repo)
    await kbit.start()
    model = StatusModel(":memory:")
    async with model, Projector(repo, model, definitions=[saga]) as projector:
        await kbit.exec_workflow(saga, "w1", None)
        await projector.catch_up()
    # The projector closed its start; the instance's start keeps the clients running.
    # (a closed repository would make the emitter retry until the timeout)
    assert await asyncio.wait_for(kbit.exec_workflow(saga, "w2", None), 20) == [None]
    await kbit.close()
    with pytest.raises(TransientStorageError, match="not started"):
        await repo.end_offset(0)


async def test_a_tail_that_cannot_start_leaves_no_consumer_open() -> None:
    # Nothing listens on port 1: the tail's consumer fails to start. It must be stopped
    # (aiokafka warns "Unclosed AIOKafkaConsumer" when an unstopped one is collected).
    repo = KafkaRepository("127.0.0.1:1", "t", client_options={"request_timeout_ms": 500})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TransientStorageError, match="following partition 0"):
            async for _ in repo.tail(0, 0):
                pass
        gc.collect()
    assert not [w for w in caught if "AIOKafkaConsumer" in str(w.message)]
