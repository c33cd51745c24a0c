"""An order service on FastAPI: the idempotency key is the workflow id.

    POST /orders          header ``Idempotency-Key: <key>`` (the order's workflow id), body
                          {"sku": "book", "qty": 1, "card": "ok"}
                          201 done (succeeded or compensated), with the receipt
                          202 a service was down: kapbit retries it; poll ``status_url``
                          409 the key was used already (the answer names its status URL)
                          422 invalid body or key (FastAPI's validation)
                          503 gate closed, too many in flight, instance stopping or
                              replaced; ``Retry-After`` says when to try again
    GET  /orders/{key}    the order's status, from the status read model; 404
    GET  /orders?status=  the orders in a status (all without it)

Statuses are the read model's (:class:`~kapbit.projection.WorkflowStatus`): ``running``,
``retrying``, ``succeeded``, ``compensated``, ... A ``POST`` waits until the projector has
seen what it did, so its answer and the next ``GET`` agree.

The app's lifespan starts the kapbit instance, the SQLite status model and a projector that
follows the log into it, and stops them in reverse order. ``card`` picks how the payment
goes: "ok", "declined" (a business failure: the stock reservation is compensated) or
"flaky" (the payment service is down once: the order is retried, then succeeds).

Run it::

    pip install -e '.[examples]'
    uvicorn --app-dir examples fastapi_orders:app      # in-memory log
    KAPBIT_BOOTSTRAP=localhost:9092 KAPBIT_TOPIC=orders \\
        uvicorn --app-dir examples fastapi_orders:app
    curl -i -X POST localhost:8000/orders -H 'Idempotency-Key: order-1' \\
         -H 'content-type: application/json' -d '{"sku": "book", "qty": 1}'

On Kafka an existing topic is used with the partitions it has; ``KAPBIT_PARTITIONS``
creates a missing one. ``KAPBIT_STATUS_DB`` keeps the status database at a path instead
of a temporary one.
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
from fastapi.responses import JSONResponse
from orders import ORDER, Order
from pydantic import BaseModel, ConfigDict, Field

from kapbit import (
    DuplicateWorkflow,
    Fenced,
    GateClosed,
    InstanceClosed,
    Kapbit,
    KapbitError,
    Options,
    PayloadTooLarge,
    TooManyWorkflows,
    WillRetryLater,
    WorkflowRejected,
)
from kapbit.projection import Projector, StatusModel, WorkflowRow, WorkflowStatus
from kapbit.repository import MemRepository, Repository

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
}

# --- the app -----------------------------------------------------------------------------------


@dataclass
class Orders:
    """What the routes use, made by the lifespan: the instance and the status read side."""

    kapbit: Kapbit
    model: StatusModel
    projector: Projector

    async def status_after(self, order_id: str) -> str:
        """The order's status once the projector has seen what this request did."""
        with contextlib.suppress(TimeoutError):
            await self.projector.wait_caught_up(timeout=5.0)
        row = await self.model.get(order_id)
        # Not projected within the timeout: it was created and has not terminated.
        return row.status.value if row is not None else WorkflowStatus.RUNNING.value


def repository_from_env() -> Repository:
    """Kafka when ``KAPBIT_BOOTSTRAP`` and ``KAPBIT_TOPIC`` are set, memory otherwise."""
    bootstrap, topic = os.environ.get("KAPBIT_BOOTSTRAP"), os.environ.get("KAPBIT_TOPIC")
    if not (bootstrap and topic):
        return MemRepository(partitions=4)
    from kapbit.repository.kafka import KafkaRepository

    partitions = os.environ.get("KAPBIT_PARTITIONS")
    return KafkaRepository(bootstrap, topic, partitions=int(partitions) if partitions else None)


def create_app(
    repository: Repository | None = None,
    db_path: str | os.PathLike[str] | None = None,
    options: Options | None = None,
) -> FastAPI:
    """The order service on ``repository`` (default: from the environment)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repo = repository or repository_from_env()
        with contextlib.ExitStack() as files:
            path = db_path or os.environ.get("KAPBIT_STATUS_DB")
            if path is None:
                directory = files.enter_context(tempfile.TemporaryDirectory(prefix="orders-"))
                path = os.path.join(directory, "status.db")
            async with (
                Kapbit([ORDER], repo, options=options) as kbit,
                StatusModel(path) as model,
                Projector(repo, model, definitions=[ORDER]) as projector,
            ):
                follower = asyncio.create_task(projector.run(), name="orders-projector")
                app.state.orders = Orders(kbit, model, projector)
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
    async def place_order(body: OrderIn, key: IdempotencyKey, request: Request) -> JSONResponse:
        service = orders(request)
        url = f"/orders/{key}"
        order = Order(key, body.sku, body.qty, body.card)
        try:
            result = await service.kapbit.exec_workflow(ORDER, key, order)
        except WillRetryLater:
            status = await service.status_after(key)
            return JSONResponse(
                {"id": key, "status": status, "status_url": url},
                status_code=202,
                headers={"Location": url},
            )
        except DuplicateWorkflow:
            return JSONResponse(
                {"detail": f"order {key!r} was already placed", "status_url": url},
                status_code=409,
            )
        except (GateClosed, TooManyWorkflows, InstanceClosed, Fenced) as exc:
            return JSONResponse(
                {"detail": str(exc)},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER[type(exc)])},
            )
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

    @app.get("/orders/{key}")
    async def order_status(key: str, request: Request) -> dict[str, Any]:
        row = await orders(request).model.get(key)
        if row is None:
            raise HTTPException(status_code=404, detail=f"no order {key!r}")
        return _document(row)

    @app.get("/orders")
    async def list_orders(
        request: Request, status: WorkflowStatus | None = None
    ) -> list[dict[str, Any]]:
        rows = await orders(request).model.find(status=status, type=ORDER.type)
        return [_document(row) for row in rows]

    return app


def _document(row: WorkflowRow) -> dict[str, Any]:
    document = msgspec.structs.asdict(row)
    document["status"] = row.status.value
    document["result"] = row.result_value()
    return document


app = create_app()
