"""The benchmark's order saga written for DBOS Transact, as its documentation suggests.

A ``@DBOS.workflow`` calls three ``@DBOS.step``s; a step that fails for a business reason
raises, and the workflow catches it and runs compensation steps for what already
succeeded, in reverse order. Imported only by ``bench_peers.py --system dbos-*``, so
kapbit's own benchmarks do not need the ``dbos`` package.
"""

from __future__ import annotations

from typing import Any

from dbos import DBOS

Order = dict[str, Any]


class ShippingFailed(Exception):
    """No carrier could take the parcel: a business failure, compensated."""


@DBOS.step()
async def reserve_stock(order: Order) -> str:
    return f"rsv-{order['order_id']}"


@DBOS.step()
async def release_stock(order: Order) -> str:
    return "released"


@DBOS.step()
async def charge_card(order: Order) -> str:
    return f"pay-{order['order_id']}"


@DBOS.step()
async def refund_card(order: Order) -> str:
    return "refunded"


@DBOS.step()
async def ship(order: Order) -> str:
    if order["fail_shipping"]:
        raise ShippingFailed("no carrier available")
    return f"trk-{order['order_id']}"


@DBOS.workflow()
async def order_saga(order: Order) -> str:
    await reserve_stock(order)
    await charge_card(order)
    try:
        await ship(order)
    except ShippingFailed:
        await refund_card(order)
        await release_stock(order)
        return "compensated"
    return "shipped"
