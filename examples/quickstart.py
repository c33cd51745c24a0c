"""Quickstart: a two-step workflow on the in-memory repository.

Run it with ``python examples/quickstart.py``; it prints ``Result: Hello Incredible World!``.
"""

import asyncio

from kapbit import Definition, Kapbit, Progress, Step, Success
from kapbit.repository import MemRepository


def incredible(_input: str, _progress: Progress) -> Success[str]:
    return Success("Incredible")


async def world(_input: str, _progress: Progress) -> Success[str]:
    return Success("World!")  # actions may be plain or async functions


def greeting(input: str, progress: Progress) -> str:
    # Combine the input with the values of every executed step.
    return " ".join([input, *progress.values()])


# A Definition[str, str, str]: the input, outcome and result types, checked by mypy against
# the actions' annotations and by kapbit against the values when they are written.
SIMPLE = Definition(
    "simple",
    steps=[Step(incredible), Step(world)],
    result=greeting,
    input_type=str,
    outcome_type=str,
    result_type=str,
)


async def main() -> str:
    async with Kapbit([SIMPLE], MemRepository(partitions=1)) as kbit:
        result = await kbit.exec_workflow(SIMPLE, "wfl-1", "Hello")  # a str
    print(f"Result: {result}")
    return result


if __name__ == "__main__":
    asyncio.run(main())
