"""Typed use of kapbit, checked by mypy (``tests/test_typing.py``), never run.

Each correct use holds an ``assert_type`` of what the checker infers; each mistake carries
``# type: ignore[code]``, and ``warn_unused_ignores`` makes the check fail if the checker
stops reporting it. The eight planted mistakes of the typed-API issue are marked
``MISTAKE n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, assert_type

import msgspec

from kapbit import (
    Definition,
    Failure,
    Kapbit,
    NonRetryable,
    Progress,
    Step,
    StepContext,
    StepRetry,
    Success,
    WorkflowHandle,
    context,
)


@dataclass(frozen=True)
class Order:
    order_id: str
    amount_cents: int


class Receipt(msgspec.Struct, frozen=True):
    status: str
    detail: str


def reserve(order: Order, _progress: Progress) -> Success[str] | Failure[str]:
    ctx = context()
    assert_type(ctx, StepContext)
    return Success(f"{ctx.workflow_id}/{ctx.step_name}")


def release(_order: Order, _progress: Progress) -> Success[str]:
    return Success("released")


async def charge(order: Order, _progress: Progress) -> Success[str]:
    if order.amount_cents <= 0:
        raise NonRetryable("nothing to charge")
    return Success("charged")


def count(_order: Order, _progress: Progress) -> Success[int]:
    return Success(1)


def receipt(_order: Order, progress: Progress) -> Receipt:
    return Receipt("shipped", str(progress.value("reserve")))


# --- correct definitions: the type parameters are inferred ---------------------------------

ORDER = Definition(
    "order",
    steps=[
        Step(reserve, release, name="reserve"),
        Step(charge, name="charge", retry=StepRetry(max_attempts=3), timeout=5.0),
    ],
    result=receipt,
    input_type=Order,
    outcome_type=str,
    result_type=Receipt,
)
assert_type(ORDER, Definition[Order, str, Receipt])

# Steps with outcome types of their own: the definition has none.
MIXED = Definition(
    "mixed",
    steps=[Step(reserve, outcome_type=str), Step(count, outcome_type=int)],
    result=receipt,
    input_type=Order,
    result_type=Receipt,
)
assert_type(MIXED, Definition[Order, Any, Receipt])

# Forms a checker cannot bind (unions, Literal) are accepted as declared types.
OPTIONAL = Definition("optional", [Step(count)], outcome_type=int | None, input_type=Order)

# Without a result builder the result is the list of step values.
PLAIN = Definition("plain", [Step(count)], input_type=Order, outcome_type=int)
assert_type(PLAIN, Definition[Order, int, list[Any]])

step = Step(reserve, release)
assert_type(step, Step[Order, str])

# What a checker cannot infer (unannotated lambdas) is Any, not an error.
QUICK = Definition("quick", [Step(lambda _input, _progress: None)])
assert_type(QUICK, Definition[Any, Any, list[Any]])


async def correct_calls(kbit: Kapbit) -> None:
    result = await kbit.exec_workflow(ORDER, "order-42", Order("order-42", 100))
    assert_type(result, Receipt)
    assert_type(result.status, str)
    by_keyword = await kbit.exec_workflow(ORDER, workflow_id="o-48", input=Order("o-48", 1))
    assert_type(by_keyword, Receipt)
    # The string form, for callers that only know the type name: the result is Any.
    untyped = await kbit.exec_workflow("order-43", "order", Order("order-43", 100))
    assert_type(untyped, Any)
    # Handles carry the result type; attaching to an id in use returns that type too.
    handle = await kbit.start_workflow(ORDER, "order-49", Order("order-49", 1))
    assert_type(handle, WorkflowHandle[Receipt])
    assert_type(await handle.result(), Receipt)
    order = Order("order-42", 1)
    attached = await kbit.exec_workflow(ORDER, "order-42", order, on_duplicate="attach")
    assert_type(attached, Receipt)
    assert_type(kbit.get_workflow("order-43"), WorkflowHandle[Any])


# --- the eight planted mistakes --------------------------------------------------------------

# MISTAKE 1: input_type does not match the actions' input.
BAD_INPUT = Definition(  # type: ignore[misc]
    "order",
    steps=[Step(reserve, release)],
    result=receipt,
    input_type=str,
    outcome_type=str,
    result_type=Receipt,
)

# MISTAKE 2: outcome_type does not match what the steps return.
BAD_OUTCOME = Definition(  # type: ignore[misc]
    "order",
    steps=[Step(reserve, release)],
    result=receipt,
    input_type=Order,
    outcome_type=int,
    result_type=Receipt,
)

# MISTAKE 3: result_type does not match the result builder.
BAD_RESULT = Definition(
    "order",
    steps=[Step(reserve, release)],
    result=receipt,  # type: ignore[arg-type]
    input_type=Order,
    outcome_type=str,
    result_type=str,
)

# MISTAKE 7: an action that returns a bare value instead of Success / Failure.


def bare(_order: Order, _progress: Progress) -> str:
    return "reserved"


BARE = Step(bare)  # type: ignore[arg-type]

# MISTAKE 8: a step whose own outcome_type contradicts its action.
BAD_STEP_OUTCOME = Step(count, outcome_type=str)  # type: ignore[arg-type]


async def mistaken_calls(kbit: Kapbit) -> None:
    # MISTAKE 4: a typo in the type name. The typed form names no type, so it cannot be
    # made; in the string form the name is any str, and only the call fails
    # (UnknownWorkflowType, nothing written): no checker can catch it.
    await kbit.exec_workflow("order-44", "ordr", Order("order-44", 100))

    # MISTAKE 5: an input of the wrong type.
    await kbit.exec_workflow(ORDER, "order-45", 42)  # type: ignore[misc]

    # MISTAKE 6: an attribute the result does not have.
    result = await kbit.exec_workflow(ORDER, "order-46", Order("order-46", 100))
    print(result.tracking)  # type: ignore[attr-defined]

    # Arguments in the string form's order with a definition: reported too.
    await kbit.exec_workflow("order-47", ORDER, Order("order-47", 100))  # type: ignore[call-overload]

    # start_workflow checks its input as exec_workflow does, and on_duplicate its value.
    await kbit.start_workflow(ORDER, "order-50", 42)  # type: ignore[misc]
    await kbit.start_workflow(ORDER, "order-51", Order("o", 1), on_duplicate="skip")  # type: ignore[call-overload]
