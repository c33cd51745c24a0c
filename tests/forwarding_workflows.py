"""The workflows the forwarding tests run, on memory and on the broker: ``greet`` answers
at once or, for a name in :data:`HELD`, once its event is set (``ENTERED`` says it runs)."""

from __future__ import annotations

import asyncio
from typing import Any

from kapbit import Definition, Progress, Step, Success
from kapbit.codecs import JsonCodec

CODEC = JsonCodec()
HELD: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}


async def greet(name: str, _progress: Progress) -> Success[str]:
    if name in HELD:
        ENTERED[name].set()
        await HELD[name].wait()
    return Success(f"hello {name}")


GREET = Definition(
    "greet",
    steps=[Step(greet)],
    result=lambda _name, progress: progress.value(0),
    input_type=str,
    outcome_type=str,
    result_type=str,
)


def broken(_name: str, _progress: Progress) -> Any:
    return 42


#: Its step returns an int where a ``Success`` is due: the workflow ends InvalidReturnValue.
BROKEN = Definition("broken", steps=[Step(broken)], input_type=str)
