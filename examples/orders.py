"""The order saga both order services run (``status_service.py``, ``fastapi_orders.py``).

Reserve stock, charge the card, ship; a declined card (a business ``Failure``) releases the
stock again. ``card`` picks how the payment goes: "ok", "declined", or "flaky" (the payment
service is down once: the order is retried later and then succeeds).
"""

from __future__ import annotations

import msgspec

from kapbit import Definition, Failure, Progress, Step, Success


class Order(msgspec.Struct, frozen=True):
    """The workflow input; ``id`` is the workflow id (the idempotency key)."""

    id: str
    sku: str
    qty: int
    card: str = "ok"


class Receipt(msgspec.Struct, frozen=True):
    """The workflow result."""

    order: str
    status: str  # "shipped" or "cancelled"
    tracking: str | None = None


PAYMENT_OUTAGES: set[str] = set()  # "flaky" orders whose payment already failed once


def reserve_stock(order: Order, _progress: Progress) -> Success[str]:
    return Success(f"reserved {order.qty} x {order.sku}")


def release_stock(order: Order, _progress: Progress) -> Success[str]:
    return Success(f"released {order.qty} x {order.sku}")


async def charge_card(order: Order, _progress: Progress) -> Success[str] | Failure[str]:
    if order.card == "declined":
        return Failure("card declined")
    if order.card == "flaky" and order.id not in PAYMENT_OUTAGES:
        PAYMENT_OUTAGES.add(order.id)
        raise ConnectionError("payment service unavailable")
    return Success(f"charged {order.qty * 10} EUR")


async def refund_card(order: Order, _progress: Progress) -> Success[str]:
    return Success("refunded")


def ship(order: Order, _progress: Progress) -> Success[str]:
    return Success(f"TRK-{order.id}")


def receipt(order: Order, progress: Progress) -> Receipt:
    if progress.failed:
        return Receipt(order.id, "cancelled")
    return Receipt(order.id, "shipped", progress.value("ship"))


ORDER = Definition(
    "order",
    steps=[
        Step(reserve_stock, release_stock, name="reserve"),
        Step(charge_card, refund_card, name="charge"),
        Step(ship, name="ship"),
    ],
    result=receipt,
    input_type=Order,
    outcome_type=str,
    result_type=Receipt,
)
