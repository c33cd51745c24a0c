"""Tests for the test/dev helpers in ``kapbit.testing`` (broker resolution and TCP proxy)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from kapbit.testing import LocalBroker, TcpProxy
from kapbit.testing.broker import (
    BOOTSTRAP_ENV,
    BrokerUnavailable,
    docker_available,
    kafka_metadata_brokers,
)

STEP_TIMEOUT = 20.0


@pytest.fixture
def bootstrap(kafka_bootstrap: str) -> str:
    """The session's broker (see conftest), resolved env -> Docker -> tansu."""
    return kafka_bootstrap


def _topic() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(name, partitions, 1)])
        assert [err for _, err, *_ in response.topic_errors] == [0]
    finally:
        await admin.close()


# -- broker ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_broker_answers_metadata(bootstrap: str) -> None:
    host, _, port = bootstrap.rpartition(":")
    brokers = await kafka_metadata_brokers(host, int(port))
    assert len(brokers) >= 1


@pytest.mark.asyncio
async def test_create_topic_with_three_partitions(bootstrap: str) -> None:
    name = _topic()
    await _create_topic(bootstrap, name, 3)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert name in await admin.list_topics()
        (described,) = await admin.describe_topics([name])
    finally:
        await admin.close()
    assert described["error_code"] == 0
    assert sorted(p["partition"] for p in described["partitions"]) == [0, 1, 2]


@pytest.mark.asyncio
async def test_produce_with_headers_and_fetch_by_offset(bootstrap: str) -> None:
    name = _topic()
    await _create_topic(bootstrap, name, 3)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        offsets = []
        for i in range(5):
            meta = await producer.send_and_wait(
                name, f"v{i}".encode(), partition=1, headers=[("seq", str(i).encode())]
            )
            offsets.append(meta.offset)
    finally:
        await producer.stop()
    assert offsets == [0, 1, 2, 3, 4]

    tp = TopicPartition(name, 1)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 2)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while len(records) < 3:
            batch = await asyncio.wait_for(consumer.getmany(tp, timeout_ms=1000), STEP_TIMEOUT)
            records.extend(batch.get(tp, []))
    finally:
        await consumer.stop()
    assert [(r.offset, r.value, list(r.headers)) for r in records] == [
        (2, b"v2", [("seq", b"2")]),
        (3, b"v3", [("seq", b"3")]),
        (4, b"v4", [("seq", b"4")]),
    ]


@pytest.mark.asyncio
async def test_env_backend_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOOTSTRAP_ENV, "127.0.0.1:1")
    async with LocalBroker() as broker:
        assert broker.kind == "env"
        assert broker.bootstrap_servers == "127.0.0.1:1"
        assert broker.pid is None
    assert broker.kind is None


@pytest.mark.asyncio
async def test_no_backend_raises_broker_unavailable() -> None:
    broker = LocalBroker(use_env=False, use_docker=False, use_tansu=False)
    with pytest.raises(BrokerUnavailable, match="all backends disabled"):
        await broker.start()


@pytest.mark.asyncio
async def test_tansu_process_is_terminated_on_stop() -> None:
    broker = LocalBroker(use_env=False, use_docker=False)
    await broker.start()
    try:
        assert broker.kind == "tansu" and broker.pid is not None
        host, _, port = broker.listen_address.rpartition(":")
        assert await kafka_metadata_brokers(host, int(port))
    finally:
        await broker.close()
    assert broker.pid is None
    with pytest.raises(OSError):
        await kafka_metadata_brokers(host, int(port))


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "expected"), [(b"200 OK", True), (b"500 Oops", False)])
async def test_docker_ping_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: bytes, expected: bool
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        assert request.startswith(b"GET /_ping ")
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nOK")
        await writer.drain()
        writer.close()

    sock = tmp_path / "docker.sock"
    server = await asyncio.start_unix_server(handle, str(sock))
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
        assert await docker_available(timeout=2.0) is expected
    finally:
        server.close()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'missing.sock'}")
    assert await docker_available(timeout=2.0) is False


# -- proxy -------------------------------------------------------------------------------------


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 2.0)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_proxy_forwards_cuts_and_restores(echo_server: int) -> None:
    async with TcpProxy("127.0.0.1", echo_server) as proxy:
        assert await _roundtrip(proxy.port, b"hello") == b"hello"
        assert proxy.connections_total == 1

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await proxy.wait_for_connections(2)
        await proxy.cut()
        assert proxy.is_cut and proxy.connections_active == 0
        # The live connection was aborted: reading hits EOF/reset instead of hanging.
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 2.0)
        writer.close()
        # New connections are closed straight away while cut.
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port, b"x")
        assert proxy.connections_rejected == 1

        await proxy.restore()
        assert await _roundtrip(proxy.port, b"again") == b"again"
        assert proxy.connections_total == 3


@pytest.mark.asyncio
async def test_proxy_blackhole_drops_data(echo_server: int) -> None:
    async with TcpProxy("127.0.0.1", echo_server) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await proxy.wait_for_connections(1)
        await proxy.cut(blackhole=True)
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        await proxy.restore()
        # Connections that lost bytes are aborted on restore; fresh ones work.
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 2.0)
        writer.close()
        assert await _roundtrip(proxy.port, b"ok") == b"ok"


@pytest.mark.asyncio
async def test_broker_behind_proxy_advertises_proxy() -> None:
    async with LocalBroker.behind_proxy() as setup:
        host, _, port = setup.broker.listen_address.rpartition(":")
        brokers = await kafka_metadata_brokers(host, int(port))
        assert [(h, p) for _, h, p in brokers] == [("127.0.0.1", setup.proxy.port)]
        assert setup.bootstrap_servers == setup.proxy.address != setup.broker.listen_address


@pytest.mark.asyncio
async def test_proxy_cut_fails_produce_and_restore_recovers() -> None:
    async with LocalBroker.behind_proxy() as setup:
        name = _topic()
        await _create_topic(setup.bootstrap_servers, name, 1)
        producer = AIOKafkaProducer(
            bootstrap_servers=setup.bootstrap_servers,
            acks="all",
            request_timeout_ms=1500,
            retry_backoff_ms=50,
        )
        await producer.start()
        try:
            first = await asyncio.wait_for(producer.send_and_wait(name, b"a"), STEP_TIMEOUT)
            assert first.offset == 0
            used = setup.proxy.connections_total
            assert used >= 1 and setup.broker.kind == "tansu"

            await setup.proxy.cut()
            with pytest.raises(KafkaError):
                await asyncio.wait_for(producer.send_and_wait(name, b"b"), STEP_TIMEOUT)
            assert setup.proxy.connections_total == used  # nothing got through

            await setup.proxy.restore()
            third = await asyncio.wait_for(producer.send_and_wait(name, b"c"), STEP_TIMEOUT)
            assert third.offset == 1  # "b" was never written
            assert setup.proxy.connections_total > used
        finally:
            await producer.stop()
