"""An order service: an order saga per request, and its status served from a read model.

    POST /orders            {"sku": "book", "qty": 1, "card": "ok"}, optional "id"
                            201 with the receipt, 202 if a service was down (retried
                            later), 409 for an id already used, 503 when overloaded or
                            stopping, 422 if the body is not a valid order
    GET  /orders/{id}       the order's workflow status, from the status read model; 404
    GET  /orders?status=S   the orders in status S (all without it); 422 for an unknown S

Every answer about an order's state uses the read model's words
(:class:`~kapbit.projection.WorkflowStatus`): ``POST`` waits until the projector has seen
what it did and answers with the order's status, so ``POST`` and ``GET`` never disagree.

One process holds the kapbit instance (which runs the sagas), a projector following the log
in the background, and the SQLite status read model it keeps. The read model could as well
be kept by another process: the projector only needs the log. ``card`` picks how the
payment goes: "ok", "declined" (a business failure: the stock is released again) or "flaky"
(the payment service is down once: the order is retried and then succeeds).

Run it (hand-written ASGI, any ASGI server works)::

    pip install -e '.[examples]'
    python examples/status_service.py            # in-memory log, on port 8000
    KAPBIT_BOOTSTRAP=localhost:9092 KAPBIT_TOPIC=orders python examples/status_service.py

On Kafka the topic is used with the partitions it has (for instance the topic of
``examples/order_saga_kafka.py``); a missing topic is created with ``KAPBIT_PARTITIONS``
partitions (then required). ``KAPBIT_STATUS_DB`` keeps the status database at a path
instead of a temporary one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import msgspec
from orders import ORDER, Order

from kapbit import (
    DuplicateWorkflow,
    Fenced,
    GateClosed,
    InstanceClosed,
    Kapbit,
    Options,
    TooManyWorkflows,
    WillRetryLater,
    WorkflowRejected,
)
from kapbit.projection import Projector, StatusModel, WorkflowRow, WorkflowStatus
from kapbit.repository import MemRepository, Repository

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class OrderRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of ``POST /orders``: a positive quantity; an ``id``, when given, not empty
    (without one the service makes one up)."""

    sku: NonEmpty
    qty: Annotated[int, msgspec.Meta(ge=1)]
    card: Literal["ok", "declined", "flaky"] = "ok"
    id: NonEmpty | None = None


# --- the service -------------------------------------------------------------------------------


class OrderService:
    """The ASGI application: the instance, the projector and the status model.

    Started by the ASGI lifespan protocol, or by ``async with service`` (tests, embedding).
    """

    def __init__(
        self,
        repository: Repository | None = None,
        db_path: str | os.PathLike[str] | None = None,
        options: Options | None = None,
    ) -> None:
        self.repository = repository or MemRepository(partitions=4)
        self._db_path = db_path
        self._options = options
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self.kapbit: Kapbit | None = None
        self.model: StatusModel | None = None
        self.projector: Projector | None = None
        self._follower: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls) -> OrderService:
        """Kafka when ``KAPBIT_BOOTSTRAP`` and ``KAPBIT_TOPIC`` are set, memory otherwise."""
        bootstrap, topic = os.environ.get("KAPBIT_BOOTSTRAP"), os.environ.get("KAPBIT_TOPIC")
        repository: Repository | None = None
        if bootstrap and topic:
            from kapbit.repository.kafka import KafkaRepository

            partitions = os.environ.get("KAPBIT_PARTITIONS")
            repository = KafkaRepository(
                bootstrap, topic, partitions=int(partitions) if partitions else None
            )
        return cls(repository, os.environ.get("KAPBIT_STATUS_DB"))

    async def __aenter__(self) -> OrderService:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the instance, open the status model and follow the log."""
        path = self._db_path
        if path is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="orders-")
            path = os.path.join(self._tempdir.name, "status.db")
        self.kapbit = Kapbit([ORDER], self.repository, options=self._options)
        await self.kapbit.start()
        self.model = StatusModel(path)
        await self.model.start()
        self.projector = Projector(self.repository, self.model, definitions=[ORDER])
        await self.projector.start()
        self._follower = asyncio.create_task(self.projector.run(), name="orders-projector")

    async def stop(self) -> None:
        """Stop following, close the model, then the instance."""
        if self.projector is not None:
            await self.projector.close()
        if self._follower is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self.model is not None:
            await self.model.close()
        if self.kapbit is not None:
            await self.kapbit.close()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    # --- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"].rstrip("/")
        if path == "/orders" and method == "POST":
            status, body = await self._create(await _body(receive))
        elif path == "/orders" and method == "GET":
            status, body = await self._list(parse_qs(scope.get("query_string", b"").decode()))
        elif path.startswith("/orders/") and method == "GET":
            status, body = await self._show(path.removeprefix("/orders/"))
        elif path == "/orders" or path.startswith("/orders/"):
            status, body = 405, {"error": f"{method} is not allowed here"}
        else:
            status, body = 404, {"error": f"no route {path}"}
        await _respond(send, status, body)

    async def _create(self, raw: bytes) -> tuple[int, Any]:
        assert self.kapbit is not None
        try:
            request = msgspec.json.decode(raw, type=OrderRequest)
        except msgspec.DecodeError as exc:  # not JSON, or not a valid order
            return 422, {"error": str(exc)}
        order = Order(request.id or uuid.uuid4().hex, request.sku, request.qty, request.card)
        try:
            result = await self.kapbit.exec_workflow(ORDER, order.id, order)
        except WillRetryLater:
            return 202, {
                "id": order.id,
                "status": await self._status_after(order.id),
                "status_url": f"/orders/{order.id}",
            }
        except DuplicateWorkflow:
            return 409, {"error": f"order {order.id!r} was already placed"}
        except (GateClosed, TooManyWorkflows, InstanceClosed, Fenced) as exc:
            return 503, {"error": str(exc)}
        except WorkflowRejected as exc:
            return 422, {"error": str(exc)}
        status = await self._status_after(order.id)
        return 201, {"id": order.id, "status": status, "result": result}

    async def _status_after(self, order_id: str) -> str:
        """The order's status once the projector has seen what this request did.

        So that the answer and the client's next GET agree.
        """
        assert self.projector is not None and self.model is not None
        with contextlib.suppress(TimeoutError):
            await self.projector.wait_caught_up(timeout=5.0)
        row = await self.model.get(order_id)
        # Not projected within the timeout: it was created and has not terminated.
        return row.status.value if row is not None else WorkflowStatus.RUNNING.value

    async def _show(self, order_id: str) -> tuple[int, Any]:
        assert self.model is not None
        row = await self.model.get(order_id)
        if row is None:
            return 404, {"error": f"no order {order_id!r}"}
        return 200, _row(row)

    async def _list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        assert self.model is not None
        status = query.get("status", [None])[0]
        if status is not None and status not in {s.value for s in WorkflowStatus}:
            return 422, {"error": f"unknown status {status!r}"}
        rows = await self.model.find(status=status, type="order")
        return 200, [_row(row) for row in rows]


def _row(row: WorkflowRow) -> dict[str, Any]:
    document = msgspec.structs.asdict(row)
    document["result"] = row.result_value()
    return document


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: Any) -> None:
    payload = msgspec.json.encode(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


app = OrderService.from_env()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
