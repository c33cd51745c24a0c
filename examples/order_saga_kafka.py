"""An order saga on Kafka: reserve stock, charge the card, ship; declined cards are undone.

Shows kapbit on a Kafka topic: each order is a workflow whose every step outcome is an
event in the topic before the next step runs. When the payment service declines a card
(a business ``Failure``), kapbit compensates what already succeeded, here the stock
reservation, and the workflow still ends with a result.

Needs a Kafka broker, e.g. the one ``docker compose up -d --wait`` starts from this
repository's ``docker-compose.yml`` on localhost:9092::

    python examples/order_saga_kafka.py --bootstrap localhost:9092

Each run uses a fresh topic (``--topic`` to choose one).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import msgspec

from kapbit import Definition, DuplicateWorkflow, Failure, Kapbit, Progress, Step, Success
from kapbit.repository.kafka import KafkaRepository


class Order(msgspec.Struct):
    order_id: str
    sku: str
    quantity: int
    card: str
    amount_cents: int


class OrderResult(msgspec.Struct):
    status: str  # "shipped" or "cancelled"
    detail: str


# --- fake services (in memory). Real ones must be idempotent per order: after a crash, ---
# --- kapbit runs the step that was in progress again.                                  ---

STOCK: dict[str, int] = {"KB-BOARD": 10, "KB-CABLE": 10}
RESERVED: dict[str, tuple[str, int]] = {}  # order id -> (sku, quantity)
DECLINED_CARDS = {"4000-0000-0000-0002"}


def reserve_stock(order: Order, _progress: Progress) -> Success[str] | Failure[str]:
    if order.order_id not in RESERVED:  # idempotent: a second call changes nothing
        if STOCK[order.sku] < order.quantity:
            return Failure(f"only {STOCK[order.sku]} {order.sku} left")
        STOCK[order.sku] -= order.quantity
        RESERVED[order.order_id] = (order.sku, order.quantity)
    return Success(f"reserved {order.quantity} x {order.sku}")


def release_stock(order: Order, _progress: Progress) -> Success[str]:
    if reservation := RESERVED.pop(order.order_id, None):
        sku, quantity = reservation
        STOCK[sku] += quantity
    return Success("stock released")


async def charge_card(order: Order, _progress: Progress) -> Success[str] | Failure[str]:
    await asyncio.sleep(0.01)  # a call to the payment provider
    if order.card in DECLINED_CARDS:
        return Failure("card declined")
    return Success(f"charged {order.amount_cents / 100:.2f} EUR")


async def refund_card(order: Order, _progress: Progress) -> Success[str]:
    return Success("refunded")


def ship(order: Order, _progress: Progress) -> Success[str]:
    return Success(f"tracking TRK-{order.order_id.upper()}")


def order_result(order: Order, progress: Progress) -> OrderResult:
    if progress.failed:
        failure = progress.execution(progress.failed_step or 0)
        undone = ", ".join(outcome.value for _, outcome in progress.compensations)
        return OrderResult("cancelled", f"{failure.value if failure else ''}; undone: {undone}")
    return OrderResult("shipped", progress.value("ship"))


ORDER = Definition(
    "order",
    steps=[
        Step(reserve_stock, release_stock, name="reserve"),
        Step(charge_card, refund_card, name="charge"),
        Step(ship, name="ship"),
    ],
    result=order_result,
    input_type=Order,
    outcome_type=str,
    result_type=OrderResult,
)

ORDERS = [
    Order("order-1", "KB-BOARD", 1, "4242-4242-4242-4242", 12_900),
    Order("order-2", "KB-CABLE", 3, "4000-0000-0000-0002", 2_700),
    Order("order-3", "KB-BOARD", 2, "5555-5555-5555-4444", 25_800),
    Order("order-4", "KB-BOARD", 1, "4000-0000-0000-0002", 12_900),
    Order("order-5", "KB-CABLE", 1, "4242-4242-4242-4242", 900),
]


async def main(bootstrap: str, topic: str) -> None:
    repository = KafkaRepository(bootstrap, topic, partitions=3)
    async with Kapbit([ORDER], repository) as kbit:
        print(f"kapbit node {kbit.node_id} on topic {topic!r} at {bootstrap}")
        results = await asyncio.gather(
            *(kbit.exec_workflow(ORDER, order.order_id, order) for order in ORDERS),
            return_exceptions=True,
        )
        for order, result in zip(ORDERS, results, strict=True):
            if isinstance(result, DuplicateWorkflow):
                print(f"{order.order_id}: already in the log of {topic!r}, not run again")
            elif isinstance(result, BaseException):
                raise result
            else:
                print(f"{order.order_id}: {result.status:9} {result.detail}")
        stats = kbit.stats
    print(f"stock left: {STOCK}")
    print(f"workflows: {stats.succeeded} shipped, {stats.compensated} compensated")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="localhost:9092", help="Kafka bootstrap servers")
    parser.add_argument("--topic", default=f"orders-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()
    asyncio.run(main(args.bootstrap, args.topic))
