"""The FastAPI example, served over ASGI (lifespan included) to a real HTTP client."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from kapbit import (
    Backoff,
    Definition,
    GroupOptions,
    Kapbit,
    LogLost,
    NotOwner,
    Options,
    RetryPolicy,
    Step,
    Success,
    partition_for,
)
from kapbit.fencing import OwnerTracker
from kapbit.repository import MemRepository
from kapbit.repository.kafka import KafkaRepository
from kapbit.request_log import MemRequestLog
from kapbit.testing import ManualPlacement
from tests.helpers import load_example, wait_until

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


def _noop(_input: str, _progress: Any) -> Success[None]:
    return Success(None)


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
    # a client retrying (even with another body) gets the order placed under the key
    again = await http.post("/orders", json={"sku": "b", "qty": 9}, headers=_key("k-1"))
    assert (again.status_code, again.json()) == (201, first.json())
    assert app.state.orders.kapbit.stats.started == 1
    assert len((await http.get("/orders")).json()) == 1


async def test_a_key_taken_by_another_workflow_type_gets_409(tmp_path: Path) -> None:
    repo = MemRepository()
    other = Definition("other", steps=[Step(_noop)], input_type=str)
    async with Kapbit([other, example.ORDER], repo) as kbit:  # the log holds an "other"
        await kbit.exec_workflow(other, "k-2", "x")
    async with serve(repo, tmp_path / "s.db", FAST) as (app, http):
        taken = await http.post("/orders", json={"sku": "a", "qty": 1}, headers=_key("k-2"))
        assert taken.status_code == 409
        assert "another workflow" in taken.json()["detail"]
        assert app.state.orders.kapbit.stats.started == 0


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


async def test_a_repeated_post_answers_202_within_its_bound_while_the_order_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attaching waits through retries; the POST answers 202 after ANSWER_WITHIN instead
    of holding the client until the retry (30 s away here)."""
    monkeypatch.setattr(example, "ANSWER_WITHIN", 0.2)
    async with serve(MemRepository(), tmp_path / "s.db", SLOW) as (app, http):
        body = {"sku": "cup", "qty": 1, "card": "flaky"}
        first = await http.post("/orders", json=body, headers=_key("b-1"))
        assert first.status_code == 202
        again = await http.post("/orders", json=body, headers=_key("b-1"))
        assert (again.status_code, again.json()) == (202, first.json())
        assert app.state.orders.kapbit.stats.started == 1


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


async def test_a_subclass_of_a_refusal_gets_its_503_too(
    shop: tuple[Any, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LogLost`` is a ``Fenced``: the Retry-After table is looked up by class hierarchy
    (it was looked up by exact class, and LogLost failed the request with a KeyError)."""
    app, http = shop

    async def lost(*_args: Any, **_kwargs: Any) -> Any:
        raise LogLost("the log no longer holds records this instance had confirmed")

    monkeypatch.setattr(app.state.orders.kapbit, "exec_workflow", lost)
    refused = await http.post("/orders", json={"sku": "a", "qty": 1}, headers=_key("x-1"))
    assert (refused.status_code, refused.headers["retry-after"]) == (503, "5")
    assert "no longer holds" in refused.json()["detail"]


async def test_listing_by_status(shop: tuple[Any, httpx.AsyncClient]) -> None:
    _, http = shop
    for key, card in (("l-1", "ok"), ("l-2", "declined"), ("l-3", "ok")):
        body = {"sku": "x", "qty": 1, "card": card}
        assert (await http.post("/orders", json=body, headers=_key(key))).status_code == 201
    shipped = (await http.get("/orders", params={"status": "succeeded"})).json()
    assert [row["id"] for row in shipped] == ["l-1", "l-3"]
    assert [row["id"] for row in (await http.get("/orders")).json()] == ["l-1", "l-2", "l-3"]


# --- group mode: two replicas sharing one log --------------------------------------------------

A, B = "http://a.shop", "http://b.shop"


def _id_in(partition: int) -> str:
    """An order key of log ``partition`` (of 2)."""
    return next(f"g-{n}" for n in range(100) if partition_for(f"g-{n}", 2) == partition)


def _created(repository: MemRepository) -> int:
    return sum(record.kind == "workflow_created" for record in repository.records())


@dataclass
class Replicas:
    """Two replicas of the service on one 2-partition log: ``a`` owns partition 0, ``b``
    partition 1 (placed by hand, as a consumer group would); ``http`` reaches both."""

    repository: MemRepository
    placements: dict[str, ManualPlacement]
    apps: dict[str, Any]
    http: httpx.AsyncClient

    def kapbit(self, replica: str) -> Kapbit:
        found: Kapbit = self.apps[replica].state.orders.kapbit
        return found


@asynccontextmanager
async def replicas(
    tmp_path: Path, requests: MemRequestLog | None = None, options: Options = FAST
) -> AsyncIterator[Replicas]:
    repository = MemRepository(partitions=2)
    placements = {A: ManualPlacement(A), B: ManualPlacement(B)}
    placements[A].change(assign=[0], owners={1: B})
    placements[B].change(assign=[1], owners={0: A})
    apps = {
        url: example.create_app(
            repository, tmp_path / f"{n}.db", options, group=placements[url], requests=requests
        )
        for n, url in enumerate((A, B))
    }
    mounts: dict[str, httpx.AsyncBaseTransport] = {
        url: httpx.ASGITransport(app=app) for url, app in apps.items()
    }
    async with lifespan(apps[A]), lifespan(apps[B]), httpx.AsyncClient(mounts=mounts) as http:
        yield Replicas(repository, placements, apps, http)


async def test_a_key_owned_by_the_other_replica_is_redirected_there(tmp_path: Path) -> None:
    async with replicas(tmp_path) as group:
        http, key = group.http, _id_in(1)  # b's
        body = {"sku": "book", "qty": 2}
        moved = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert moved.status_code == 307
        assert moved.headers["location"] == f"{B}/orders"
        assert _created(group.repository) == 0  # a wrote nothing

        placed = await http.post(f"{A}/orders", json=body, headers=_key(key), follow_redirects=True)
        assert [r.status_code for r in placed.history] == [307]
        assert (placed.status_code, str(placed.url)) == (201, f"{B}/orders")
        assert placed.json()["result"] == {
            "order": key,
            "status": "shipped",
            "tracking": f"TRK-{key}",
        }
        assert (group.kapbit(A).stats.started, group.kapbit(B).stats.started) == (0, 1)

        # a client retrying its POST, through either replica, attaches to the order
        for replica in (A, B):
            again = await http.post(
                f"{replica}/orders", json=body, headers=_key(key), follow_redirects=True
            )
            assert (again.status_code, again.json()) == (201, placed.json())
        assert _created(group.repository) == 1

        shown = await http.get(f"{A}/orders/{key}")
        assert (shown.status_code, shown.headers["location"]) == (307, f"{B}/orders/{key}")
        followed = await http.get(f"{A}/orders/{key}", follow_redirects=True)
        assert (followed.status_code, followed.json()["status"]) == (200, "succeeded")

        mine = _id_in(0)  # a's own keys are answered where they arrive
        local = await http.post(f"{A}/orders", json=body, headers=_key(mine))
        assert (local.status_code, group.kapbit(A).stats.started) == (201, 1)
        assert (await http.get(f"{A}/orders/{mine}")).status_code == 200


async def test_during_a_rebalance_a_key_without_owner_gets_503(tmp_path: Path) -> None:
    async with replicas(tmp_path) as group:
        http, key, body = group.http, _id_in(1), {"sku": "pen", "qty": 1}
        placed = await http.post(f"{A}/orders", json=body, headers=_key(key), follow_redirects=True)
        assert placed.status_code == 201

        # b gives partition 1 up; nobody owns it yet, and a knows it
        group.placements[B].change(revoke=[1], owners={1: None})
        group.placements[A].change(owners={1: None})
        await group.placements[B].applied()
        await group.placements[A].applied()
        for replica in (A, B):
            refused = await http.post(f"{replica}/orders", json=body, headers=_key(_id_in(1)))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "partition 1" in refused.json()["detail"]
        assert _created(group.repository) == 1  # nothing written
        # a read needs no owner: the read model answers
        shown = await http.get(f"{A}/orders/{key}")
        assert (shown.status_code, shown.json()["status"]) == (200, "succeeded")

        # a takes partition 1 over; b learns the new owner
        group.placements[A].change(assign=[1])
        group.placements[B].change(owners={1: A})
        await group.placements[A].applied()
        await group.placements[B].applied()
        moved = await http.post(f"{B}/orders", json=body, headers=_key(key))
        assert (moved.status_code, moved.headers["location"]) == (307, f"{A}/orders")
        again = await http.post(f"{B}/orders", json=body, headers=_key(key), follow_redirects=True)
        assert (again.status_code, again.json()) == (201, placed.json())  # attached on a
        assert _created(group.repository) == 1


async def test_a_get_answered_where_it_arrives_waits_for_that_replicas_projector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET that no owner is known for is answered from the read model of the replica it
    reached, whose projector may lag behind a POST another replica answered: it first
    waits until that projector has caught up with the log, so it agrees with the POST.
    (The projector of a is held here until the GET asks it to catch up.)"""
    lagging, release, asked = str(tmp_path / "0.db"), asyncio.Event(), asyncio.Event()

    class HeldModel(example.StatusModel):  # type: ignore[misc,name-defined]
        async def apply(self, partition: int, events: Any, position: Any) -> None:
            if self.path == lagging:
                await release.wait()
            await super().apply(partition, events, position)

    class WatchedProjector(example.Projector):  # type: ignore[misc,name-defined]
        async def wait_caught_up(self, timeout: float | None = None) -> None:
            asked.set()
            await super().wait_caught_up(timeout)

    monkeypatch.setattr(example, "StatusModel", HeldModel)
    monkeypatch.setattr(example, "Projector", WatchedProjector)
    async with replicas(tmp_path) as group:
        try:
            http, key, body = group.http, _id_in(1), {"sku": "pen", "qty": 1}
            placed = await http.post(
                f"{A}/orders", json=body, headers=_key(key), follow_redirects=True
            )
            assert (placed.status_code, placed.json()["status"]) == (201, "succeeded")  # by b
            group.placements[B].change(revoke=[1], owners={1: None})
            group.placements[A].change(owners={1: None})
            await group.placements[B].applied()
            await group.placements[A].applied()

            asked.clear()
            shown = asyncio.create_task(http.get(f"{A}/orders/{key}"))
            waiting = asyncio.create_task(asked.wait())
            await asyncio.wait([shown, waiting], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            release.set()  # a's projector catches up now
            answer = await shown
            assert (answer.status_code, answer.json().get("status")) == (200, "succeeded")
            assert asked.is_set()
        finally:
            release.set()  # closing a's projector waits for a commit in progress


async def test_a_replica_taking_a_key_over_answers_503_not_a_redirect_to_itself() -> None:
    """The group already names this replica as the owner, which is still recovering the
    partition (so kapbit refuses): 503, never a redirect to itself."""
    request = Request(
        {"type": "http", "method": "POST", "path": "/orders", "query_string": b"", "headers": []}
    )
    recovering = example.to_owner(request, NotOwner("k", 1, A), A)
    assert (recovering.status_code, recovering.headers["retry-after"]) == (503, "1")
    unknown = example.to_owner(request, NotOwner("k", 1, None), A)
    assert unknown.status_code == 503
    moved = example.to_owner(request, NotOwner("k", 1, f"{B}/"), A)
    assert (moved.status_code, moved.headers["location"]) == (307, f"{B}/orders")


async def test_with_a_request_log_kapbit_forwards_instead_of_redirecting(tmp_path: Path) -> None:
    async with replicas(tmp_path, MemRequestLog(partitions=2)) as group:
        http, key, body = group.http, _id_in(1), {"sku": "cup", "qty": 3}
        placed = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert placed.status_code == 201  # answered by a, run by b
        assert placed.json()["result"]["tracking"] == f"TRK-{key}"
        assert (group.kapbit(A).stats.started, group.kapbit(B).stats.started) == (0, 1)
        again = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert (again.status_code, again.json()) == (201, placed.json())
        shown = await http.get(f"{A}/orders/{key}")  # a's read model: no redirect
        assert (shown.status_code, shown.json()["status"]) == (200, "succeeded")
        assert _created(group.repository) == 1


class Server(httpx.AsyncBaseTransport):
    """An ASGI app behind a server, as uvicorn runs it: :meth:`stop` refuses new
    connections and waits for the requests in flight; the app's lifespan shutdown comes
    after that."""

    def __init__(self, app: Any) -> None:
        self._app = httpx.ASGITransport(app=app)
        self._listening = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # A connection is a suspension point. Without one, a request the app answers
        # without waiting (a redirect) never lets the event loop run, and a client
        # following redirects between the two replicas would starve the rebalance.
        await asyncio.sleep(0)
        if not self._listening:
            raise httpx.ConnectError("connection refused", request=request)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._app.handle_async_request(request)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def stop(self) -> None:
        self._listening = False
        await self._idle.wait()


@dataclass
class KafkaReplicas:
    """Two replicas in one consumer group on the broker, settled: one partition each."""

    a: Kapbit
    b: Kapbit
    http: httpx.AsyncClient
    servers: dict[str, Server]
    stack: AsyncExitStack  # b's lifespan: closing it stops b's kapbit (after its server)


@asynccontextmanager
async def kafka_replicas(
    bootstrap: str, topic: str, tmp_path: Path
) -> AsyncIterator[KafkaReplicas]:
    def replica(url: str, db: str) -> Any:
        return example.create_app(
            KafkaRepository(bootstrap, topic, partitions=2),
            tmp_path / db,
            Options(close_timeout=2.0, start_timeout=30.0),
            group=GroupOptions(
                f"{topic}-web", endpoint=url, session_timeout=2.0, heartbeat_interval=0.1
            ),
        )

    apps = {A: replica(A, "a.db"), B: replica(B, "b.db")}
    servers = {url: Server(app) for url, app in apps.items()}
    mounts: dict[str, httpx.AsyncBaseTransport] = dict(servers)
    async with (
        lifespan(apps[A]),
        AsyncExitStack() as stack,
        httpx.AsyncClient(mounts=mounts) as http,
    ):
        await stack.enter_async_context(lifespan(apps[B]))
        a: Kapbit = apps[A].state.orders.kapbit
        b: Kapbit = apps[B].state.orders.kapbit

        def settled() -> bool:  # one partition each, and each knows where the other is
            mine, theirs = a.owned_partitions, b.owned_partitions
            return (
                len(mine) == len(theirs) == 1
                and mine != theirs
                and a.owner_of(_id_in(min(theirs))).endpoint == B
                and b.owner_of(_id_in(min(mine))).endpoint == A
            )

        await wait_until(settled, timeout=30)
        yield KafkaReplicas(a, b, http, servers, stack)


async def test_on_kafka_a_replica_redirects_to_the_owner_the_group_chose(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """Two replicas in one consumer group on the real broker: each learns from the group
    which partitions the other owns and at which endpoint."""
    async with kafka_replicas(kafka_bootstrap, topic, tmp_path) as group:
        a, b, http = group.a, group.b, group.http
        key = _id_in(min(b.owned_partitions))
        body = {"sku": "book", "qty": 1}
        moved = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert (moved.status_code, moved.headers["location"]) == (307, f"{B}/orders")
        placed = await http.post(f"{A}/orders", json=body, headers=_key(key), follow_redirects=True)
        assert (placed.status_code, str(placed.url)) == (201, f"{B}/orders")
        assert placed.json()["result"]["tracking"] == f"TRK-{key}"
        again = await http.post(f"{A}/orders", json=body, headers=_key(key), follow_redirects=True)
        assert (again.status_code, again.json()) == (201, placed.json())
        assert (a.stats.started, b.stats.started) == (0, 1)
        shown = await http.get(f"{A}/orders/{key}", follow_redirects=True)
        assert (str(shown.url), shown.json()["status"]) == (f"{B}/orders/{key}", "succeeded")


async def test_on_kafka_while_a_replica_stops_its_keys_are_redirected_refused_or_placed_once(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """b stops gracefully (its server first, then its kapbit: the group hands b's
    partition to a) while clients keep placing orders of b's partition through a and b.
    Every answer is a redirect to the other replica, a 503 with Retry-After, or the right
    receipt (a refused connection sends the client to a); in the end a owns the partition
    and every order is in the log exactly once."""
    async with kafka_replicas(kafka_bootstrap, topic, tmp_path) as group:
        a, http = group.a, group.http
        partition = min(group.b.owned_partitions)
        keys = (k for k in (f"s-{n}" for n in range(100_000)) if partition_for(k, 2) == partition)
        answers: list[tuple[str, int]] = []
        placed: list[str] = []
        b_placed = asyncio.Event()  # b has placed a few orders: stop it then
        enough = asyncio.Event()  # a has placed a few after the hand-over: stop the clients

        async def place(key: str, via: str) -> None:
            """A client placing one order: retries until it gets 201, as told."""
            while True:
                try:
                    answer = await http.post(
                        f"{via}/orders", json={"sku": "s", "qty": 1}, headers=_key(key)
                    )
                except httpx.ConnectError:  # b's server stopped: the balancer picks a
                    assert via == B
                    via = A
                    await asyncio.sleep(0.05)  # the client's backoff
                    continue
                answers.append((via, answer.status_code))
                if answers.count((B, 201)) >= 3:
                    b_placed.set()
                if answer.status_code == 201:
                    assert answer.json()["result"] == {
                        "order": key,
                        "status": "shipped",
                        "tracking": f"TRK-{key}",
                    }
                    return
                if answer.status_code == 307:
                    other = B if via == A else A
                    assert answer.headers["location"] == f"{other}/orders"
                    via = other  # follow it
                else:
                    assert answer.status_code == 503, answer.text
                    assert answer.headers["retry-after"]
                    via = A  # b is going away: a client's balancer sends it to a
                    await asyncio.sleep(0.05)

        async def client(via: str) -> None:
            """Places one new order after another, first through ``via``."""
            while not enough.is_set():
                key = next(keys)
                await place(key, via)
                placed.append(key)

        clients = [asyncio.create_task(client(A if n % 2 else B)) for n in range(4)]
        await asyncio.wait_for(b_placed.wait(), 30)
        await asyncio.wait_for(group.servers[B].stop(), 30)  # b stops: server, then kapbit
        await group.stack.aclose()
        await wait_until(lambda: a.owned_partitions == frozenset({0, 1}), timeout=30)
        after = len(placed)
        await wait_until(lambda: len(placed) >= after + 8, timeout=30)
        enough.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)

        assert {code for _, code in answers} <= {201, 307, 503}
        assert (A, 307) in answers and (B, 201) in answers and (A, 201) in answers
        created = await _created_on_kafka(kafka_bootstrap, topic)
        assert {key: created.get(key) for key in placed} == dict.fromkeys(placed, 1)
        assert set(created) == set(placed)  # and nothing else


async def _created_on_kafka(bootstrap: str, topic: str) -> dict[str, int]:
    """WorkflowCreated records per id, writes of a replaced writer left out."""
    reader = KafkaRepository(bootstrap, topic)
    await reader.start()
    try:
        counts: dict[str, int] = {}
        for partition in range(reader.partitions):
            owners = OwnerTracker("")
            end = await reader.end_offset(partition)
            async for batch in reader.read(partition, 0, end):
                for record in batch:
                    if owners.admit(record) and record.kind == "workflow_created":
                        counts[record.key] = counts.get(record.key, 0) + 1
        return counts
    finally:
        await reader.close()


async def test_a_forwarded_call_nobody_answers_gets_503_and_a_retry_places_it_once(
    tmp_path: Path,
) -> None:
    options = Options(retry=FAST.retry, forward_timeout=0.3)
    async with replicas(tmp_path, MemRequestLog(partitions=2), options) as group:
        http, key, body = group.http, _id_in(1), {"sku": "cup", "qty": 1}
        group.placements[B].change(revoke=[1], owners={1: None})  # nobody serves 1 now
        await group.placements[B].applied()
        unanswered = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert (unanswered.status_code, unanswered.headers["retry-after"]) == (503, "1")
        assert "no owner of partition 1 answered" in unanswered.json()["detail"]

        group.placements[A].change(assign=[1])  # a takes 1 over; the client retries
        await group.placements[A].applied()
        placed = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert placed.status_code == 201
        assert _created(group.repository) == 1


async def test_a_forwarded_call_not_taken_within_the_bound_is_503_not_a_202(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ANSWER_WITHIN elapses before the owner has taken the forwarded request: nothing is
    in the log, so the answer is "ask again", never "accepted" (a 202 here said "running"
    for an order that might never be placed)."""
    monkeypatch.setattr(example, "ANSWER_WITHIN", 0.2)
    async with replicas(tmp_path, MemRequestLog(partitions=2)) as group:
        http, key, body = group.http, _id_in(1), {"sku": "cup", "qty": 1}
        group.placements[B].change(revoke=[1], owners={1: None})  # nobody serves 1 now
        await group.placements[B].applied()
        waiting = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert (waiting.status_code, waiting.headers["retry-after"]) == (503, "1")
        assert "ask again" in waiting.json()["detail"]
        assert _created(group.repository) == 0

        group.placements[A].change(assign=[1])  # a takes 1 over and serves what waits
        await group.placements[A].applied()
        placed = await http.post(f"{A}/orders", json=body, headers=_key(key))
        assert placed.status_code == 201  # created by the waiting request or this one
        assert _created(group.repository) == 1


def test_group_mode_from_the_environment_needs_a_base_url_to_redirect_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KAPBIT_ROUTING", raising=False)
    monkeypatch.delenv("KAPBIT_ENDPOINT", raising=False)
    monkeypatch.delenv("KAPBIT_GROUP", raising=False)
    assert example.group_from_env() is None
    monkeypatch.setenv("KAPBIT_GROUP", "orders-web")
    for endpoint in (None, "10.0.0.7:8000"):
        if endpoint is not None:
            monkeypatch.setenv("KAPBIT_ENDPOINT", endpoint)
        with pytest.raises(ValueError, match="KAPBIT_ENDPOINT must be this replica's base URL"):
            example.group_from_env()
    monkeypatch.setenv("KAPBIT_ENDPOINT", "http://10.0.0.7:8000")
    group = example.group_from_env()
    assert group is not None
    assert (group.name, group.endpoint) == ("orders-web", "http://10.0.0.7:8000")
    monkeypatch.delenv("KAPBIT_ENDPOINT")
    monkeypatch.setenv("KAPBIT_ROUTING", "log")  # forwarding in the log needs no URL
    assert example.group_from_env() == example.GroupOptions("orders-web")
    monkeypatch.setenv("KAPBIT_ROUTING", "carrier-pigeon")
    with pytest.raises(ValueError, match="KAPBIT_ROUTING must be"):
        example.requests_from_env()
