"""Testing your own saga with kapbit's pytest plugin: the order saga of order_saga_kafka.py.

The plugin comes with kapbit (``pip install 'kapbit[testing]'`` adds pytest-asyncio, which
its async fixture needs). Run with ``pytest examples/test_order_saga.py``. The fixtures used:
``kapbit_factory`` starts instances on an in-memory log with millisecond retries,
``faulty_repository`` injects storage faults into that log, and
``kapbit_factory.crash_and_restart`` kills an instance and starts its successor.
"""

from __future__ import annotations

import asyncio

import order_saga_kafka as shop
import pytest
from order_saga_kafka import ORDER, Order

from kapbit import DuplicateWorkflow
from kapbit.testing import FaultyRepository, KapbitFactory

pytestmark = pytest.mark.asyncio  # not needed with asyncio_mode = "auto"

GOOD_CARD = "4242-4242-4242-4242"
DECLINED_CARD = "4000-0000-0000-0002"


@pytest.fixture(autouse=True)
def fresh_shop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's fake stock service keeps state in module globals: fresh per test."""
    monkeypatch.setattr(shop, "STOCK", {"KB-BOARD": 10, "KB-CABLE": 10})
    monkeypatch.setattr(shop, "RESERVED", {})


async def test_an_order_ships(kapbit_factory: KapbitFactory) -> None:
    kbit = await kapbit_factory.start([ORDER])
    result = await kbit.exec_workflow(ORDER, "o-1", Order("o-1", "KB-BOARD", 2, GOOD_CARD, 100))
    assert result.status == "shipped"
    assert shop.STOCK["KB-BOARD"] == 8


async def test_a_declined_card_releases_the_stock(kapbit_factory: KapbitFactory) -> None:
    kbit = await kapbit_factory.start([ORDER])
    order = Order("o-2", "KB-CABLE", 3, DECLINED_CARD, 100)
    result = await kbit.exec_workflow(ORDER, "o-2", order)
    assert result.status == "cancelled"
    assert result.detail == "card declined; undone: stock released"
    assert shop.STOCK["KB-CABLE"] == 10


async def test_a_storage_outage_is_retried(
    kapbit_factory: KapbitFactory, faulty_repository: FaultyRepository
) -> None:
    kbit = await kapbit_factory.start([ORDER])
    outage = faulty_repository.fail(times=2, kinds="step_outcome")  # the log is unreachable
    order = Order("o-3", "KB-BOARD", 1, GOOD_CARD, 100)
    result = await kbit.exec_workflow(ORDER, "o-3", order)
    assert result.status == "shipped"
    assert outage.hits == 2  # both failed writes were retried
    assert shop.STOCK["KB-BOARD"] == 9  # and the stock was reserved once


async def test_a_crash_before_the_payment_is_logged_resumes_on_restart(
    kapbit_factory: KapbitFactory, faulty_repository: FaultyRepository
) -> None:
    kbit = await kapbit_factory.start([ORDER])
    # hold the second StepOutcome (the payment's) so the process can die before it lands
    held = faulty_repository.slow(
        kinds="step_outcome",
        when=lambda _: faulty_repository.appended["step_outcome"] == 1,
        times=1,
    )
    order = Order("o-4", "KB-BOARD", 1, GOOD_CARD, 100)
    call = asyncio.create_task(kbit.exec_workflow(ORDER, "o-4", order))
    await held.wait_hits(1)

    kbit = await kapbit_factory.crash_and_restart(kbit)  # the caller dies with the process
    await asyncio.gather(call, return_exceptions=True)

    with pytest.raises(DuplicateWorkflow):  # a client retrying the request is refused ...
        await kbit.exec_workflow(ORDER, "o-4", order)
    result = await kbit.wait_result("o-4", timeout=5)  # ... and can wait for the result
    assert result.status == "shipped"
    # the payment ran again after the restart; the reservation (idempotent) happened once
    assert shop.STOCK["KB-BOARD"] == 9
    assert shop.RESERVED == {"o-4": ("KB-BOARD", 1)}
