"""The example order service, called as an ASGI app (no server, no sockets)."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kapbit import Backoff, Options, RetryPolicy
from kapbit.repository import MemRepository
from kapbit.repository.kafka import KafkaRepository
from tests.helpers import load_example

service_module = load_example("status_service")
FAST = Options(retry=RetryPolicy(fast=Backoff(initial=0.001, maximum=0.002, jitter=0.001)))


@pytest.fixture(autouse=True)
def fresh_payments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order saga's fake payment service keeps its outages in a module global (shared
    with the other order service's tests): fresh per test."""
    monkeypatch.setattr(importlib.import_module("orders"), "PAYMENT_OUTAGES", set())


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    service = service_module.OrderService(MemRepository(partitions=2), tmp_path / "s.db", FAST)
    async with (
        service,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service), base_url="http://shop"
        ) as http,
    ):
        yield service, http


async def test_an_order_that_ships(client: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = client
    placed = await http.post("/orders", json={"id": "o-1", "sku": "book", "qty": 2})
    assert placed.status_code == 201
    assert placed.json() == {
        "id": "o-1",
        "status": "succeeded",
        "result": {"order": "o-1", "status": "shipped", "tracking": "TRK-o-1"},
    }
    shown = await http.get("/orders/o-1")
    assert shown.status_code == 200
    status = shown.json()
    assert (status["status"], status["steps_done"], status["type"]) == ("succeeded", 3, "order")
    assert status["result"] == {"order": "o-1", "status": "shipped", "tracking": "TRK-o-1"}
    assert status["finished_at"] >= status["created_at"]


async def test_a_declined_card_is_compensated(client: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = client
    placed = await http.post(
        "/orders", json={"id": "o-2", "sku": "pen", "qty": 1, "card": "declined"}
    )
    assert placed.status_code == 201
    assert placed.json()["result"]["status"] == "cancelled"
    assert placed.json()["status"] == "compensated"
    status = (await http.get("/orders/o-2")).json()
    assert (status["status"], status["failed_step"], status["compensated_steps"]) == (
        "compensated",
        1,
        1,
    )


async def test_a_payment_outage_is_retried(client: tuple[Any, httpx.AsyncClient]) -> None:
    service, http = client
    placed = await http.post("/orders", json={"id": "o-3", "sku": "cup", "qty": 1, "card": "flaky"})
    assert placed.status_code == 202
    body = placed.json()
    assert body["id"] == "o-3" and body["status_url"] == "/orders/o-3"
    assert body["status"] in {"running", "retrying", "succeeded"}
    await service.kapbit.wait_result("o-3", timeout=10)
    await service.projector.wait_caught_up(timeout=10)
    status = (await http.get(body["status_url"])).json()
    assert (status["status"], status["attempts"]) == ("succeeded", 1)
    assert "payment service unavailable" in status["last_error"]


async def test_post_and_get_use_one_status_vocabulary(tmp_path: Path) -> None:
    """Right after a 202, POST's status is what GET shows (the retry is 30 s away)."""
    slow = Options(
        retry=RetryPolicy(fast=Backoff(initial=30, maximum=30, jitter=0)), close_timeout=0.0
    )
    service = service_module.OrderService(MemRepository(partitions=2), tmp_path / "s.db", slow)
    transport = httpx.ASGITransport(app=service)
    async with service, httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
        placed = await http.post(
            "/orders", json={"id": "v-1", "sku": "a", "qty": 1, "card": "flaky"}
        )
        assert placed.status_code == 202
        shown = await http.get("/orders/v-1")
        assert placed.json()["status"] == shown.json()["status"] == "running"
        statuses = {s.value for s in service_module.WorkflowStatus}
        assert placed.json()["status"] in statuses


async def test_invalid_orders_get_422(client: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = client
    for body in (
        {"id": "n-1", "sku": "a", "qty": -1},
        {"id": "n-2", "sku": "a", "qty": 0},
        {"id": "", "sku": "a", "qty": 1},
        {"sku": "", "qty": 1},
        {"sku": "a", "qty": 1, "card": "stolen"},
        {"sku": "a"},
        {"sku": "a", "qty": 1, "extra": True},
    ):
        answer = await http.post("/orders", json=body)
        assert answer.status_code == 422, body
        assert answer.json()["error"]
    assert (await http.post("/orders", content=b"not json")).status_code == 422
    assert (await http.get("/orders")).json() == []  # nothing was placed


async def test_ids_and_bodies_are_checked(client: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = client
    assert (await http.post("/orders", json={"id": "o-4", "sku": "a", "qty": 1})).status_code == 201
    again = await http.post("/orders", json={"id": "o-4", "sku": "a", "qty": 1})
    assert again.status_code == 409
    assert (await http.get("/orders/none")).status_code == 404
    assert (await http.delete("/orders/o-4")).status_code == 405
    assert (await http.get("/elsewhere")).status_code == 404


async def test_generated_ids_and_listing(client: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = client
    placed = [
        (await http.post("/orders", json={"sku": "x", "qty": 1, "card": card})).json()
        for card in ("ok", "ok", "declined")
    ]
    ids = [p["id"] for p in placed]
    assert len(set(ids)) == 3
    shipped = (await http.get("/orders", params={"status": "succeeded"})).json()
    assert sorted(row["id"] for row in shipped) == sorted(ids[:2])
    everything = (await http.get("/orders")).json()
    assert len(everything) == 3
    assert (await http.get("/orders", params={"status": "lost"})).status_code == 422


async def test_asgi_lifespan_starts_and_stops_the_service(tmp_path: Path) -> None:
    service = service_module.OrderService(MemRepository(), tmp_path / "s.db")
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(service({"type": "lifespan"}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert await asyncio.wait_for(outbox.get(), 10) == {"type": "lifespan.startup.complete"}
    assert service.kapbit.is_running
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service), base_url="http://shop"
    ) as http:
        placed = await http.post("/orders", json={"id": "l-1", "sku": "a", "qty": 1})
        assert placed.status_code == 201
        assert (await http.get("/orders/l-1")).json()["status"] == "succeeded"
    await inbox.put({"type": "lifespan.shutdown"})
    assert await asyncio.wait_for(outbox.get(), 10) == {"type": "lifespan.shutdown.complete"}
    await asyncio.wait_for(lifespan, 10)
    assert not service.kapbit.is_running


async def test_on_the_topic_of_the_order_example(
    kafka_bootstrap: str, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order example makes its topic with 3 partitions; the service uses it as it is."""
    made = KafkaRepository(kafka_bootstrap, topic, partitions=3)
    await made.start()
    await made.close()
    monkeypatch.setenv("KAPBIT_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("KAPBIT_TOPIC", topic)
    monkeypatch.setenv("KAPBIT_STATUS_DB", str(tmp_path / "s.db"))
    monkeypatch.delenv("KAPBIT_PARTITIONS", raising=False)
    service = service_module.OrderService.from_env()
    transport = httpx.ASGITransport(app=service)
    async with service, httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
        assert service.repository.partitions == 3
        placed = await http.post("/orders", json={"id": "k-1", "sku": "a", "qty": 1})
        assert (placed.status_code, placed.json()["status"]) == (201, "succeeded")


async def test_a_missing_topic_is_made_with_kapbit_partitions(
    kafka_bootstrap: str, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAPBIT_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("KAPBIT_TOPIC", topic)
    monkeypatch.setenv("KAPBIT_STATUS_DB", str(tmp_path / "s.db"))
    monkeypatch.setenv("KAPBIT_PARTITIONS", "2")
    service = service_module.OrderService.from_env()
    async with service:
        assert service.repository.partitions == 2
