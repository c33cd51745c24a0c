"""Faults a real deployment meets on Kafka (issue 16): each test names the fault it proves.

Against a real broker: topics shared or owned by another application, calls made while
the broker is unreachable (through :class:`~kapbit.testing.TcpProxy`), a broker that lost
its log under a running instance, and the confirmer reading long runs of small batches.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from kapbit import Backoff, Kapbit, KapbitError, LogLost, Options, StartupError, StorageError
from kapbit.errors import CorruptRecord, InvalidAppend
from kapbit.events import EventKind
from kapbit.repository import Checkpoint
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing.broker import LocalBroker
from tests.helpers import Script, saga

#: Failures surface within a second or two instead of aiokafka's 40 s request timeout.
FAST_CLIENT = {"request_timeout_ms": 2000, "retry_backoff_ms": 50}


async def test_two_logs_sharing_one_checkpoint_topic_keep_their_own_checkpoints(
    kafka_bootstrap: str, topic: str
) -> None:
    shared = f"{topic}-shared-checkpoints"
    first = KafkaRepository(kafka_bootstrap, f"{topic}-a", partitions=2, checkpoint_topic=shared)
    second = KafkaRepository(kafka_bootstrap, f"{topic}-b", partitions=2, checkpoint_topic=shared)
    await first.start()
    await second.start()
    try:
        await first.save_checkpoint(0, Checkpoint(offset=11, owner="a"))
        await second.save_checkpoint(0, Checkpoint(offset=22, owner="b"))
        await second.save_checkpoint(1, Checkpoint(offset=33, owner="b"))
        assert await first.load_checkpoints() == {0: Checkpoint(offset=11, owner="a")}
        assert await second.load_checkpoints() == {
            0: Checkpoint(offset=22, owner="b"),
            1: Checkpoint(offset=33, owner="b"),
        }
    finally:
        await first.close()
        await second.close()


async def test_topic_of_another_application_is_refused_before_anything_is_written(
    kafka_bootstrap: str, topic: str
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        # Some other application's topic: records without kapbit's headers.
        repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
        await repo.start()  # creates the topic; empty, so it is fine
        await repo.close()
        for n in range(3):
            await producer.send_and_wait(topic, f"order {n}".encode(), key=b"k", partition=1)
    finally:
        await producer.stop()
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    with pytest.raises(StartupError, match=f"{topic!r}.*not a kapbit log"):
        await repo.start()
    await repo.close()
    # Nothing was written into it: still the three foreign records only.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(2)])
        assert sorted((tp.partition, end) for tp, end in ends.items()) == [(0, 0), (1, 3)]
    finally:
        await consumer.stop()


async def test_checkpoint_topic_of_another_application_is_refused_before_anything_is_written(
    kafka_bootstrap: str, topic: str
) -> None:
    foreign = f"{topic}-orders"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(foreign, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(foreign, b'{"order": 1}', key=b"order-1", partition=0)
    finally:
        await producer.stop()
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=1, checkpoint_topic=foreign)
    with pytest.raises(StartupError, match=f"{foreign!r} does not hold kapbit checkpoints"):
        await repo.start()
    await repo.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(foreign, 0), TopicPartition(topic, 0)])
        assert sorted(ends.values()) == [0, 1]  # still the one foreign record, an empty log
    finally:
        await consumer.stop()


async def test_a_partition_the_topic_does_not_have_is_a_typed_error(
    kafka_bootstrap: str, topic: str
) -> None:
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    await repo.start()
    try:
        for call in (
            lambda: repo.claim(2, "n1", b"aw"),
            lambda: repo.end_offset(-1),
            lambda: repo.current_owner(7),
            lambda: repo.save_checkpoint(2, Checkpoint()),
        ):
            with pytest.raises(StorageError, match="has partitions 0 to 1"):
                await call()
    finally:
        await repo.close()


async def _call_all(repo: KafkaRepository) -> dict[str, BaseException | None]:
    """Every public call of the repository once; what each raised (None: returned)."""

    async def read() -> None:
        async for _ in repo.read(0, 0, 10):
            pass

    calls: dict[str, Any] = {
        "load_checkpoints": repo.load_checkpoints,
        "save_checkpoint": lambda: repo.save_checkpoint(0, Checkpoint(offset=1)),
        "end_offset": lambda: repo.end_offset(0),
        "current_owner": lambda: repo.current_owner(0),
        "read": read,
        "append": lambda: repo.append(0, EventKind.WORKFLOW_CREATED, "w-cut", "n1", b"v"),
    }
    raised: dict[str, BaseException | None] = {}
    for name, call in calls.items():
        try:
            await asyncio.wait_for(call(), 60)
        except TimeoutError:
            raise AssertionError(f"{name} hung for 60 s with the broker unreachable") from None
        except BaseException as exc:
            raised[name] = exc
        else:
            raised[name] = None
    return raised


@pytest.mark.parametrize("blackhole", [False, True], ids=["reset", "blackhole"])
async def test_every_call_with_the_broker_unreachable_raises_kapbit_errors_only(
    topic: str, blackhole: bool
) -> None:
    async with LocalBroker.behind_proxy() as broker:
        repo = KafkaRepository(
            broker.bootstrap_servers,
            topic,
            partitions=1,
            read_timeout=2.0,
            client_options={"request_timeout_ms": 1000, "retry_backoff_ms": 50},
        )
        await repo.start()
        try:
            assert await repo.claim(0, "n1", b"aw") == 0
            await repo.save_checkpoint(0, Checkpoint(offset=1, owner="n1"))
            await broker.proxy.cut(blackhole=blackhole)
            raised = await _call_all(repo)
        finally:
            await repo.close()
    untyped = {name: repr(exc) for name, exc in raised.items() if not isinstance(exc, KapbitError)}
    assert untyped == {}


async def test_broker_that_lost_its_log_stops_the_running_instance_with_log_lost(
    topic: str,
) -> None:
    # tansu keeps its data in memory: a restart is a broker that lost its disk. It accepts
    # writes to the old topic afterwards, from offset 0 again.
    async with LocalBroker(use_env=False, use_docker=False) as broker:
        repo = KafkaRepository(
            broker.bootstrap_servers, topic, partitions=1, client_options=FAST_CLIENT
        )
        kbit = Kapbit(
            [saga(Script())], repo, options=Options(emit_backoff=Backoff(0.02, 0.2, 0.02))
        )
        await kbit.start()
        try:
            for n in range(20):
                await kbit.exec_workflow(f"w{n}", "saga", {"id": f"w{n}"})
            await broker.restart()
            after = await asyncio.wait_for(
                asyncio.gather(
                    *(kbit.exec_workflow(f"x{n}", "saga", {"id": f"x{n}"}) for n in range(20)),
                    return_exceptions=True,
                ),
                60,
            )
            with pytest.raises(KapbitError):  # stopped: refuses new work
                await kbit.exec_workflow("late", "saga", {"id": "late"})
        finally:
            await kbit.close()
    # Not one workflow is confirmed into the log that no longer holds its records.
    assert [r for r in after if not isinstance(r, BaseException)] == []
    assert [r for r in after if not isinstance(r, KapbitError)] == []
    assert any(isinstance(r, LogLost) for r in after), after


async def _recreate(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and create it again, empty, as an operator (or auto-creation) would."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()


@pytest.mark.parametrize("how", ["broker-restarted", "topic-recreated"])
async def test_idle_repository_learns_of_a_lost_log_at_its_next_checkpoint(
    topic: str, how: str
) -> None:
    async with LocalBroker(use_env=False, use_docker=False) as broker:
        repo = KafkaRepository(
            broker.bootstrap_servers, topic, partitions=1, client_options=FAST_CLIENT
        )
        await repo.start()
        try:
            await repo.claim(0, "n1", b"aw")
            for n in range(5):
                await repo.append(0, EventKind.WORKFLOW_CREATED, f"w{n}", "n1", b"v")
            if how == "broker-restarted":
                await broker.restart()
            else:
                await _recreate(broker.bootstrap_servers, topic)
            with pytest.raises(LogLost, match="lost records"):
                await asyncio.wait_for(repo.save_checkpoint(0, Checkpoint(offset=6)), 60)
            with pytest.raises(LogLost):  # and nothing more is written
                await repo.append(0, EventKind.WORKFLOW_CREATED, "w9", "n1", b"v")
        finally:
            await repo.close()


async def test_confirmer_keeps_progressing_through_a_long_run_of_small_foreign_batches(
    kafka_bootstrap: str, topic: str
) -> None:
    # Another writer floods the partition with small batches, so nearly every append of
    # ours has a gap below it that the confirmer must read. tansu answers a fetch whose
    # max wait is too short to find the offset in a large log with nothing, every time.
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=1)
    await repo.start()
    await repo.claim(0, "n1", b"aw")
    producers = [AIOKafkaProducer(bootstrap_servers=kafka_bootstrap) for _ in range(4)]
    headers = [("kapbit-kind", b"step_outcome"), ("kapbit-node", b"other")]
    done = asyncio.Event()
    confirmed: list[int] = []

    async def flood(producer: AIOKafkaProducer) -> None:
        while not done.is_set():
            sent = [
                await producer.send(topic, b"z", key=b"z", partition=0, headers=headers)
                for _ in range(5)
            ]
            await asyncio.gather(*sent)

    async def ours(task: int) -> None:
        for n in range(100):
            confirmed.append(
                await repo.append(0, EventKind.STEP_OUTCOME, f"w{task}-{n}", "n1", b"v")
            )
            await asyncio.sleep(0.001 * (task % 3))  # spread ours among the foreign batches

    for producer in producers:
        await producer.start()
    # A large log first (what makes tansu's short fetches come back empty), then the
    # flood goes on in small batches while ours are appended among them.
    prefill = [
        await producers[0].send(topic, b"z", key=b"z", partition=0, headers=headers)
        for _ in range(20_000)
    ]
    await asyncio.gather(*prefill)
    flooding = [asyncio.create_task(flood(producer)) for producer in producers]
    try:
        await asyncio.wait_for(asyncio.gather(*(ours(t) for t in range(20))), 180)
    finally:
        done.set()
        await asyncio.gather(*flooding, return_exceptions=True)
        for producer in producers:
            await producer.stop()
        await repo.close()
    assert len(set(confirmed)) == 2000
    ordered = sorted(confirmed)
    assert ordered[0] > 20_000
    below = sum(1 for low, high in itertools.pairwise(ordered) if high - low > 1)
    assert below >= 100, f"only {below} of ours had foreign records below: it proved nothing"


async def test_a_record_that_is_no_kapbit_record_is_a_corrupt_record_where_read(
    kafka_bootstrap: str, topic: str
) -> None:
    # Foreign records amid kapbit's: an unknown kind header (a newer kapbit, another
    # program) and none at all. Reads name them; the confirmer, which only looks for
    # claims, passes over them; the wire format of kapbit's own records is the same.
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=1)
    await repo.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        assert await repo.claim(0, "n1", b"aw") == 0
        unknown = [("kapbit-kind", b"workflow_paused"), ("kapbit-node", b"n1")]
        await producer.send_and_wait(topic, b"v", key=b"w", partition=0, headers=unknown)
        await producer.send_and_wait(topic, b"v", key=b"w", partition=0)
        assert await repo.append(0, EventKind.STEP_OUTCOME, "w", "n1", b"v") == 3
        with pytest.raises(CorruptRecord) as caught:
            [r async for batch in repo.read(0, 0, 4) for r in batch]
        assert (caught.value.partition, caught.value.offset) == (0, 1)
        assert "'kapbit-kind' header is b'workflow_paused'" in str(caught.value)
        with pytest.raises(CorruptRecord, match="offset 2: it has no 'kapbit-kind' header"):
            [r async for batch in repo.read(0, 2, 4) for r in batch]
        [claim] = [r async for batch in repo.read(0, 0, 1) for r in batch]
        assert (claim.kind, claim.key, claim.node) == (EventKind.ACTIVE_WRITER, "n1", "n1")
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        tp = TopicPartition(topic, 0)
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, 3)
            message = await asyncio.wait_for(consumer.getone(tp), 10)
        finally:
            await consumer.stop()
        assert list(message.headers) == [("kapbit-kind", b"step_outcome"), ("kapbit-node", b"n1")]
        with pytest.raises(InvalidAppend):
            await repo.append(0, EventKind.ACTIVE_WRITER, "n2", "n2", b"aw")
        for _ in range(2):  # the owner's own claim kind too, every time (headers are cached)
            with pytest.raises(InvalidAppend):
                await repo.append(0, EventKind.ACTIVE_WRITER, "n1", "n1", b"aw")
            with pytest.raises(InvalidAppend):  # also by its name, from untyped code
                await repo.append(0, "active_writer", "n1", "n1", b"aw")  # type: ignore[arg-type]
        assert await repo.end_offset(0) == 4  # nothing written
    finally:
        await producer.stop()
        await repo.close()
