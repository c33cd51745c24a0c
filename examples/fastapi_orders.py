"""An order service on FastAPI: the idempotency key is the workflow id.

    POST /orders          header ``Idempotency-Key: <key>`` (the order's workflow id), body
                          {"sku": "book", "qty": 1, "card": "ok"}
                          201 done (succeeded or compensated), with the receipt; a POST
                              repeating a key answers with the order placed under it
                              (kapbit's attach: it is not placed twice)
                          202 a service was down (kapbit retries it), or the order
                              did not end within ``ANSWER_WITHIN`` seconds: poll
                              ``status_url``
                          307 group mode: another instance owns the key (``Location``)
                          409 the key names a workflow of another type
                          422 invalid body or key (FastAPI's validation)
                          503 gate closed, too many in flight, instance stopping or
                              replaced, no owner of the key known (a rebalance), the
                              owner did not take a forwarded call in time;
                              ``Retry-After`` says when to try again
    GET  /orders/{key}    the order's status, from the status read model; 404; in group
                          mode 307 to the key's owner when another instance owns it
    GET  /orders?status=  the orders in a status (all without it)

Statuses are the read model's (:class:`~kapbit.projection.WorkflowStatus`): ``running``,
``retrying``, ``succeeded``, ``compensated``, ... A ``POST`` waits until the projector has
seen what it did, and a ``GET`` until its projector has caught up with the log, so the
answer of a ``POST`` and the next ``GET`` agree, also on another replica.

The app's lifespan starts the kapbit instance, the SQLite status model and a projector that
follows the log into it, and stops them in reverse order. ``card`` picks how the payment
goes: "ok", "declined" (a business failure: the stock reservation is compensated) or
"flaky" (the payment service is down once: the order is retried, then succeeds).

Several replicas share one Kafka topic in group mode (``KAPBIT_GROUP``, with
``KAPBIT_ENDPOINT`` the base URL this replica advertises to the others). A request for a
key whose partition another replica owns reaches the owner in one of two ways:

- ``KAPBIT_ROUTING=redirect`` (the default): routing at the edge. The answer is
  ``307 Temporary Redirect`` to the same path on the owner's endpoint, which a client (or
  the edge proxy) follows with the same method, body and ``Idempotency-Key``; while no
  replica is known to own the key (a rebalance) it is ``503`` with ``Retry-After``.
- ``KAPBIT_ROUTING=log``: kapbit forwards the call through the request log
  ``<topic>-requests`` and this replica answers with the owner's answer; no redirect.

Run it::

    pip install -e '.[examples]'
    uvicorn --app-dir examples fastapi_orders:app      # in-memory log
    KAPBIT_BOOTSTRAP=localhost:9092 KAPBIT_TOPIC=orders \\
        uvicorn --app-dir examples fastapi_orders:app
    curl -i -X POST localhost:8000/orders -H 'Idempotency-Key: order-1' \\
         -H 'content-type: application/json' -d '{"sku": "book", "qty": 1}'
    # two replicas in group mode, each advertising its own base URL:
    export KAPBIT_BOOTSTRAP=localhost:9092 KAPBIT_TOPIC=orders-web KAPBIT_PARTITIONS=4 \\
        KAPBIT_GROUP=orders-web
    KAPBIT_ENDPOINT=http://localhost:8001 uvicorn --app-dir examples --port 8001 \\
        fastapi_orders:app &
    KAPBIT_ENDPOINT=http://localhost:8002 uvicorn --app-dir examples --port 8002 \\
        fastapi_orders:app &
    curl -iL -X POST localhost:8001/orders -H 'Idempotency-Key: order-2' \\
         -H 'content-type: application/json' -d '{"sku": "book", "qty": 1}'

On Kafka an existing topic is used with the partitions it has; ``KAPBIT_PARTITIONS``
creates a missing one (and its request topic). ``KAPBIT_STATUS_DB`` keeps the status
database at a path instead of a temporary one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from orders import ORDER, Order
from pydantic import BaseModel, ConfigDict, Field

from kapbit import (
    DuplicateWorkflow,
    Fenced,
    GateClosed,
    GroupOptions,
    InstanceClosed,
    Kapbit,
    KapbitError,
    NotOwner,
    Options,
    PayloadTooLarge,
    Placement,
    RequestTimedOut,
    TooManyWorkflows,
    WillRetryLater,
    WorkflowRejected,
)
from kapbit.projection import Projector, StatusModel, WorkflowRow, WorkflowStatus
from kapbit.repository import MemRepository, Repository
from kapbit.request_log import RequestLog

# --- HTTP models -------------------------------------------------------------------------------


class OrderIn(BaseModel):
    """The body of ``POST /orders``."""

    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=100)
    qty: int = Field(ge=1, le=1000)
    card: Literal["ok", "declined", "flaky"] = "ok"


IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="the order's id; the same key is never run twice",
    ),
]

#: Seconds a client should wait before trying again, by refusal.
RETRY_AFTER: dict[type[KapbitError], int] = {
    GateClosed: 10,  # a breaker is open: the retry worker probes it
    TooManyWorkflows: 1,  # in-flight workflows finish in moments
    InstanceClosed: 5,  # stopping: another instance (or this one, restarted) takes over
    Fenced: 5,  # replaced by another instance
    NotOwner: 1,  # a rebalance: the group settles in seconds
    RequestTimedOut: 1,  # forwarded, unanswered: the request may still be served (attach)
}
#: Seconds a POST waits for the order's end before answering 202 (it runs on regardless).
ANSWER_WITHIN = 10.0


def unavailable(error: KapbitError) -> JSONResponse:
    """``503`` with the ``Retry-After`` of ``error``'s class (or of a class it derives from:
    ``LogLost`` is a ``Fenced``)."""
    seconds = next(s for cls, s in RETRY_AFTER.items() if isinstance(error, cls))
    return JSONResponse(
        {"detail": str(error)}, status_code=503, headers={"Retry-After": str(seconds)}
    )


def accepted(key: str, status: str) -> JSONResponse:
    """``202``: the order is placed and not done yet; its status URL says when it is."""
    url = f"/orders/{key}"
    return JSONResponse(
        {"id": key, "status": status, "status_url": url},
        status_code=202,
        headers={"Location": url},
    )


# --- the app -----------------------------------------------------------------------------------


@dataclass
class Orders:
    """What the routes use, made by the lifespan: the instance and the status read side."""

    kapbit: Kapbit
    model: StatusModel
    projector: Projector
    redirect: bool  # group mode without a request log: 307 to the owner of a key

    async def status_after(self, order_id: str) -> str:
        """The status of an order this request created once the projector has seen it."""
        # Not projected within the timeout: it was created and has not terminated.
        return await self.projected(order_id) or WorkflowStatus.RUNNING.value

    async def projected(self, order_id: str) -> str | None:
        """The order's status once the projector has caught up (``None``: not in the log)."""
        row = await self.row(order_id)
        return row.status.value if row is not None else None

    async def row(self, order_id: str) -> WorkflowRow | None:
        """The order's row once the projector has caught up with the log as it is now."""
        await self.caught_up()
        return await self.model.get(order_id)

    async def caught_up(self) -> None:
        """Wait (at most 5 s) until the projector has applied the log as it is now: what
        any replica answered before is then in this replica's read model, whose projector
        may lag behind a POST another replica served."""
        with contextlib.suppress(TimeoutError):
            await self.projector.wait_caught_up(timeout=5.0)


def repository_from_env() -> Repository:
    """Kafka when ``KAPBIT_BOOTSTRAP`` and ``KAPBIT_TOPIC`` are set, memory otherwise."""
    bootstrap, topic = os.environ.get("KAPBIT_BOOTSTRAP"), os.environ.get("KAPBIT_TOPIC")
    if not (bootstrap and topic):
        return MemRepository(partitions=4)
    from kapbit.repository.kafka import KafkaRepository

    return KafkaRepository(bootstrap, topic, partitions=partitions_from_env())


def partitions_from_env() -> int | None:
    """``KAPBIT_PARTITIONS``: the partition count a missing topic is created with."""
    partitions = os.environ.get("KAPBIT_PARTITIONS")
    return int(partitions) if partitions else None


def group_from_env() -> GroupOptions | None:
    """Group mode when ``KAPBIT_GROUP`` names a group; this replica advertises
    ``KAPBIT_ENDPOINT``, its base URL (``http://host:port``), to the others. Redirecting
    needs it: a redirect goes there."""
    name, endpoint = os.environ.get("KAPBIT_GROUP"), os.environ.get("KAPBIT_ENDPOINT")
    if not name:
        return None
    redirecting = os.environ.get("KAPBIT_ROUTING", "redirect") == "redirect"
    if redirecting and not (endpoint or "").startswith(("http://", "https://")):
        raise ValueError(
            f"KAPBIT_ENDPOINT must be this replica's base URL (http://host:port) when "
            f"KAPBIT_GROUP is set and KAPBIT_ROUTING is redirect, got {endpoint!r}"
        )
    return GroupOptions(name, endpoint=endpoint)


def requests_from_env() -> RequestLog | None:
    """The request log ``<topic>-requests`` when ``KAPBIT_ROUTING=log``: kapbit forwards
    calls for keys owned elsewhere (the default, ``redirect``, answers 307 instead)."""
    routing = os.environ.get("KAPBIT_ROUTING", "redirect")
    if routing not in ("redirect", "log"):
        raise ValueError(f"KAPBIT_ROUTING must be 'redirect' or 'log', got {routing!r}")
    bootstrap, topic = os.environ.get("KAPBIT_BOOTSTRAP"), os.environ.get("KAPBIT_TOPIC")
    if routing == "redirect" or not (bootstrap and topic):
        return None
    from kapbit.repository.kafka import KafkaRequestLog

    return KafkaRequestLog(bootstrap, topic, partitions=partitions_from_env())


def to_owner(request: Request, refused: NotOwner, here: str | None) -> Response:
    """The answer to a request for a key another replica owns: ``307`` to the same path
    on the owner's endpoint, or ``503`` while no other replica is known to own the key (a
    rebalance is under way, or this replica is still taking the key's partition over)."""
    if refused.endpoint is None or refused.endpoint == here:
        return unavailable(refused)
    return redirect(request, refused.endpoint)


def redirect(request: Request, endpoint: str) -> RedirectResponse:
    """``307``: the client repeats the request (method, body, headers) at ``endpoint``."""
    url = endpoint.rstrip("/") + request.url.path
    if request.url.query:
        url += f"?{request.url.query}"
    return RedirectResponse(url, status_code=307)


def create_app(
    repository: Repository | None = None,
    db_path: str | os.PathLike[str] | None = None,
    options: Options | None = None,
    *,
    group: GroupOptions | Placement | None = None,
    requests: RequestLog | None = None,
) -> FastAPI:
    """The order service on ``repository`` (default: from the environment). With
    ``group`` it is one replica of several sharing the log; given ``requests`` (a request
    log), kapbit forwards calls for keys another replica owns, else the answer is a 307
    to that replica. Without ``repository`` all three come from the environment."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repo, placed, forwarded = repository, group, requests
        if repo is None:
            repo, placed, forwarded = repository_from_env(), group_from_env(), requests_from_env()
        with contextlib.ExitStack() as files:
            path = db_path or os.environ.get("KAPBIT_STATUS_DB")
            if path is None:
                directory = files.enter_context(tempfile.TemporaryDirectory(prefix="orders-"))
                path = os.path.join(directory, "status.db")
            async with (
                Kapbit([ORDER], repo, options=options, group=placed, requests=forwarded) as kbit,
                StatusModel(path) as model,
                Projector(repo, model, definitions=[ORDER]) as projector,
            ):
                follower = asyncio.create_task(projector.run(), name="orders-projector")
                redirect = placed is not None and forwarded is None
                app.state.orders = Orders(kbit, model, projector, redirect)
                try:
                    yield
                finally:
                    await projector.close()
                    await follower

    app = FastAPI(title="orders", lifespan=lifespan)

    def orders(request: Request) -> Orders:
        found: Orders = request.app.state.orders
        return found

    @app.post("/orders", status_code=201)
    async def place_order(body: OrderIn, key: IdempotencyKey, request: Request) -> Response:
        service = orders(request)
        url = f"/orders/{key}"
        order = Order(key, body.sku, body.qty, body.card)
        try:
            async with asyncio.timeout(ANSWER_WITHIN):
                # a client retrying its POST gets the order placed under the key: attach
                result = await service.kapbit.exec_workflow(
                    ORDER, key, order, on_duplicate="attach"
                )
        except NotOwner as elsewhere:  # group mode, no request log: the client goes there
            return to_owner(request, elsewhere, service.kapbit.endpoint)
        except WillRetryLater:
            return accepted(key, await service.status_after(key))
        except TimeoutError:  # no end within ANSWER_WITHIN: running on, or not answered yet
            status = await service.projected(key)
            if status is None:  # not in the log: a forwarded call its owner has not taken yet
                return JSONResponse(
                    {"detail": f"no answer within {ANSWER_WITHIN:g} s; ask again (it attaches)"},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            return accepted(key, status)
        except DuplicateWorkflow:  # the key names a workflow of another type
            return JSONResponse(
                {"detail": f"key {key!r} is taken by another workflow", "status_url": url},
                status_code=409,
            )
        except (GateClosed, TooManyWorkflows, InstanceClosed, Fenced, RequestTimedOut) as exc:
            return unavailable(exc)
        except PayloadTooLarge as exc:
            return JSONResponse({"detail": str(exc)}, status_code=413)
        except WorkflowRejected as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        status = await service.status_after(key)
        return JSONResponse(
            {"id": key, "status": status, "result": msgspec.to_builtins(result)},
            status_code=201,
            headers={"Location": url},
        )

    @app.get("/orders/{key}", response_model=None)
    async def order_status(key: str, request: Request) -> dict[str, Any] | Response:
        service = orders(request)
        if service.redirect:  # ask the owner, whose POST waited for its read model
            owner, here = service.kapbit.owner_of(key), service.kapbit.endpoint
            if not owner.local and owner.endpoint is not None and owner.endpoint != here:
                return redirect(request, owner.endpoint)
        row = await service.row(key)  # may be a key another replica ran: catch up first
        if row is None:
            raise HTTPException(status_code=404, detail=f"no order {key!r}")
        return _document(row)

    @app.get("/orders")
    async def list_orders(
        request: Request, status: WorkflowStatus | None = None
    ) -> list[dict[str, Any]]:
        service = orders(request)
        await service.caught_up()
        rows = await service.model.find(status=status, type=ORDER.type)
        return [_document(row) for row in rows]

    return app


def _document(row: WorkflowRow) -> dict[str, Any]:
    document = msgspec.structs.asdict(row)
    document["status"] = row.status.value
    document["result"] = row.result_value()
    return document


app = create_app()
