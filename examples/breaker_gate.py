"""A circuit breaker around a flaky payment service closes kapbit's entry gate, then reopens it.

Shows what happens while a dependency is down:

1. the payment service goes down; a pybreaker breaker around it counts the failures and
   opens; a step that meets the open breaker closes kapbit's entry gate;
2. new workflows are refused at once with ``GateClosed`` (nothing is written for them);
3. the retry worker, in slow mode, probes with one failed workflow at a time;
4. once the service is back, a probe completes, the gate reopens and the waiting
   workflows finish.

In memory, with short intervals, so it runs in a few seconds::

    python examples/breaker_gate.py
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import pybreaker

from kapbit import (
    Backoff,
    Definition,
    GateClosed,
    Kapbit,
    Options,
    Progress,
    RetryPolicy,
    Step,
    Success,
    WillRetryLater,
)
from kapbit.repository import MemRepository

START = time.time()


def say(message: str) -> None:
    print(f"[{time.time() - START:5.2f}s] {message}", flush=True)


class PaymentService:
    """A fake payment provider that is unreachable while ``up`` is False."""

    def __init__(self) -> None:
        self.up = True

    def charge(self, order_id: str, amount_cents: int) -> str:
        if not self.up:
            say(f"payments: charge {order_id} -> connection refused")
            raise ConnectionError("payment service unreachable")
        say(f"payments: charge {order_id} -> ok")
        return f"paid {amount_cents / 100:.2f} EUR"


class LogBreakerChanges(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        say(f"breaker: {old_state.name} -> {new_state.name}")


payments = PaymentService()
# Opens after 2 consecutive failures; after 1 s lets one trial call through (half-open).
breaker = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=1.0, listeners=[LogBreakerChanges()])


def charge(order: dict[str, Any], _progress: Progress) -> Success[str]:
    # An open breaker raises pybreaker.CircuitBreakerError without calling the service:
    # kapbit then closes its entry gate and retries the workflow in slow mode.
    return Success(breaker.call(payments.charge, order["id"], order["amount_cents"]))


def confirm(order: dict[str, Any], _progress: Progress) -> Success[str]:
    return Success(f"confirmation sent for {order['id']}")


def receipt(_order: dict[str, Any], progress: Progress) -> list[str]:
    return progress.values()


PAYMENT = Definition(
    "payment",
    steps=[Step(charge), Step(confirm)],
    result=receipt,
    input_type=dict[str, Any],
    outcome_type=str,
    result_type=list[str],
)

OPTIONS = Options(
    retry=RetryPolicy(
        fast=Backoff(initial=0.3, maximum=0.3, jitter=0.01),  # blips: retry soon
        slow_interval=0.4,  # gate closed: one probe every 0.4 s
        max_attempts=30,
    )
)


class Elapsed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.created - START:5.2f}s] {record.name}: {record.getMessage()}"


async def submit(kbit: Kapbit, order_id: str) -> None:
    try:
        result = await kbit.exec_workflow(PAYMENT, order_id, {"id": order_id, "amount_cents": 4200})
        say(f"{order_id}: done: {result}")
    except WillRetryLater as exc:
        say(f"{order_id}: WillRetryLater ({exc.__cause__!r}); the retry worker has it")
    except GateClosed:
        say(f"{order_id}: GateClosed, refused at once; nothing was written")


async def main() -> None:
    # The entry gate and the retry worker say what they do through logging.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(Elapsed())
    for name in ("kapbit.gate", "kapbit.retry"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("kapbit").setLevel(logging.ERROR)  # our own lines tell the rest

    async with Kapbit([PAYMENT], MemRepository(), options=OPTIONS) as kbit:
        await submit(kbit, "order-1")

        say("--- the payment service goes down")
        payments.up = False
        await submit(kbit, "order-2")  # fails: breaker 1 of 2
        await submit(kbit, "order-3")  # fails: breaker opens, gate closes
        await asyncio.sleep(0.05)
        await submit(kbit, "order-4")  # refused while the gate is closed

        await asyncio.sleep(2.0)  # the retry worker probes, one workflow at a time
        say("--- the payment service is back")
        payments.up = True
        for order_id in ("order-2", "order-3"):
            say(f"{order_id}: final result: {await kbit.wait_result(order_id, timeout=10)}")
        await submit(kbit, "order-4")  # accepted again
        stats = kbit.stats
        say(f"gate open: {stats.gate_open}; closed {kbit.gate.closures} time(s)")
    say(f"done: {stats.succeeded} workflows succeeded after {stats.retried} retry attempts")


if __name__ == "__main__":
    asyncio.run(main())
