"""The FastAPI example, served over ASGI (lifespan included) to a real HTTP client."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from kapbit import Backoff, Kapbit, Options, RetryPolicy
from kapbit.repository import MemRepository
from tests.helpers import load_example

example = load_example("fastapi_orders")
FAST = Options(retry=RetryPolicy(fast=Backoff(initial=0.001, maximum=0.002, jitter=0.001)))
SLOW = Options(retry=RetryPolicy(fast=Backoff(initial=30, maximum=30, jitter=0)), close_timeout=0)


@pytest.fixture(autouse=True)
def fresh_payments(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order saga's fake payment service keeps its outages in a module global (shared
    with the other order service's tests): fresh per test."""
    monkeypatch.setattr(importlib.import_module("orders"), "PAYMENT_OUTAGES", set())


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Drive the app's ASGI lifespan as a server does: startup, then shutdown."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(outbox.get(), 30)
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        stopped = await asyncio.wait_for(outbox.get(), 30)
        assert stopped["type"] == "lifespan.shutdown.complete", stopped
        await asyncio.wait_for(task, 30)


@asynccontextmanager
async def serve(
    repository: MemRepository, db: Path, options: Options
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = example.create_app(repository, db, options)
    transport = httpx.ASGITransport(app=app)
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://shop") as http,
    ):
        yield app, http


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    async with serve(MemRepository(partitions=2), tmp_path / "s.db", FAST) as served:
        yield served


def _key(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def test_an_order_that_ships(shop: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = shop
    placed = await http.post("/orders", json={"sku": "book", "qty": 2}, headers=_key("o-1"))
    assert placed.status_code == 201
    assert placed.headers["location"] == "/orders/o-1"
    assert placed.json() == {
        "id": "o-1",
        "status": "succeeded",
        "result": {"order": "o-1", "status": "shipped", "tracking": "TRK-o-1"},
    }
    shown = await http.get("/orders/o-1")
    assert shown.status_code == 200
    document = shown.json()
    assert (document["status"], document["steps_done"], document["type"]) == (
        "succeeded",
        3,
        "order",
    )
    assert document["result"]["tracking"] == "TRK-o-1"


async def test_a_declined_card_is_compensated(shop: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = shop
    body = {"sku": "pen", "qty": 1, "card": "declined"}
    placed = await http.post("/orders", json=body, headers=_key("o-2"))
    assert placed.status_code == 201
    assert (placed.json()["status"], placed.json()["result"]["status"]) == (
        "compensated",
        "cancelled",
    )
    document = (await http.get("/orders/o-2")).json()
    assert (document["failed_step"], document["compensated_steps"]) == (1, 1)


async def test_the_key_is_the_workflow_id_and_runs_once(
    shop: tuple[Any, httpx.AsyncClient],
) -> None:
    app, http = shop
    first = await http.post("/orders", json={"sku": "a", "qty": 1}, headers=_key("k-1"))
    assert first.status_code == 201
    again = await http.post("/orders", json={"sku": "b", "qty": 9}, headers=_key("k-1"))
    assert again.status_code == 409
    assert again.json()["status_url"] == "/orders/k-1"
    assert app.state.orders.kapbit.stats.started == 1
    assert len((await http.get("/orders")).json()) == 1


async def test_a_payment_outage_answers_202_and_is_retried(
    shop: tuple[Any, httpx.AsyncClient],
) -> None:
    app, http = shop
    body = {"sku": "cup", "qty": 1, "card": "flaky"}
    placed = await http.post("/orders", json=body, headers=_key("o-3"))
    assert placed.status_code == 202
    answer = placed.json()
    assert answer["status_url"] == placed.headers["location"] == "/orders/o-3"
    assert answer["status"] in {"running", "retrying", "succeeded"}
    orders = app.state.orders
    await orders.kapbit.wait_result("o-3", timeout=10)
    await orders.projector.wait_caught_up(timeout=10)
    document = (await http.get(answer["status_url"])).json()
    assert (document["status"], document["attempts"]) == ("succeeded", 1)


async def test_post_and_get_agree_on_the_status(tmp_path: Path) -> None:
    async with serve(MemRepository(), tmp_path / "s.db", SLOW) as (_, http):
        body = {"sku": "cup", "qty": 1, "card": "flaky"}
        placed = await http.post("/orders", json=body, headers=_key("v-1"))
        assert placed.status_code == 202
        shown = await http.get("/orders/v-1")
        assert placed.json()["status"] == shown.json()["status"] == "running"


async def test_invalid_requests_get_422(shop: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = shop
    for body, headers in (
        ({"sku": "a", "qty": 1}, {}),  # no key
        ({"sku": "a", "qty": 1}, _key("")),
        ({"sku": "a", "qty": 1}, _key("x" * 201)),
        ({"sku": "a", "qty": -1}, _key("n-1")),
        ({"sku": "a", "qty": 0}, _key("n-2")),
        ({"sku": "", "qty": 1}, _key("n-3")),
        ({"sku": "a", "qty": 1, "card": "stolen"}, _key("n-4")),
        ({"sku": "a"}, _key("n-5")),
        ({"sku": "a", "qty": 1, "extra": 1}, _key("n-6")),
    ):
        answer = await http.post("/orders", json=body, headers=headers)
        assert answer.status_code == 422, (body, headers)
        assert answer.json()["detail"]
    broken = await http.post(
        "/orders",
        content=b"{not json",
        headers={**_key("n-7"), "content-type": "application/json"},
    )
    assert broken.status_code == 422
    assert (await http.get("/orders", params={"status": "lost"})).status_code == 422
    assert (await http.get("/orders")).json() == []  # nothing was placed
    assert (await http.get("/orders/n-1")).status_code == 404


async def test_too_many_in_flight_gets_503_with_retry_after(tmp_path: Path) -> None:
    options = Options(
        max_workflows=1,
        retry=RetryPolicy(fast=Backoff(initial=30, maximum=30, jitter=0)),
        close_timeout=0,
    )
    async with serve(MemRepository(), tmp_path / "s.db", options) as (_, http):
        body = {"sku": "a", "qty": 1, "card": "flaky"}
        waiting = await http.post("/orders", json=body, headers=_key("t-1"))
        assert waiting.status_code == 202  # in flight until its retry, 30 s away
        refused = await http.post("/orders", json={"sku": "a", "qty": 1}, headers=_key("t-2"))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "max_workflows" in refused.json()["detail"]
        assert (await http.get("/orders/t-2")).status_code == 404  # nothing written


async def test_a_replaced_instance_gets_503(tmp_path: Path) -> None:
    repo = MemRepository()
    async with serve(repo, tmp_path / "s.db", FAST) as (app, http):
        assert (
            await http.post("/orders", json={"sku": "a", "qty": 1}, headers=_key("r-1"))
        ).status_code == 201
        async with Kapbit([example.ORDER], repo):  # another instance takes the log over
            refused = await http.post("/orders", json={"sku": "a", "qty": 1}, headers=_key("r-2"))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "5"
        assert not app.state.orders.kapbit.is_running


async def test_a_stopped_instance_gets_503(tmp_path: Path) -> None:
    async with serve(MemRepository(), tmp_path / "s.db", FAST) as (app, http):
        await app.state.orders.kapbit.close()
        refused = await http.post("/orders", json={"sku": "a", "qty": 1}, headers=_key("s-1"))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"


async def test_listing_by_status(shop: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = shop
    for key, card in (("l-1", "ok"), ("l-2", "declined"), ("l-3", "ok")):
        body = {"sku": "x", "qty": 1, "card": card}
        assert (await http.post("/orders", json=body, headers=_key(key))).status_code == 201
    shipped = (await http.get("/orders", params={"status": "succeeded"})).json()
    assert [row["id"] for row in shipped] == ["l-1", "l-3"]
    assert [row["id"] for row in (await http.get("/orders")).json()] == ["l-1", "l-2", "l-3"]
