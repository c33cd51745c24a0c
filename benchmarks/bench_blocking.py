"""Blocking sync steps do not stall each other: N workflows whose step sleeps 0.5 s.

A plain ``def`` step runs in kapbit's thread pool, so N workflows whose step blocks for
0.5 s (``time.sleep``, as a blocking driver call would) take about 0.5 s together, not
N x 0.5 s; meanwhile an async workflow keeps running on the loop. Prints a table.
Usage: ``python benchmarks/bench_blocking.py [--workflows 4] [--seconds 0.5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from _common import machine, machine_line

from kapbit import Definition, Kapbit, Progress, Step, Success
from kapbit.repository import MemRepository


def _definitions(seconds: float) -> list[Definition[Any, Any, Any]]:
    def blocking(_input: Any, _progress: Progress) -> Success[str]:
        time.sleep(seconds)
        return Success("slept")

    async def quick(_input: Any, _progress: Progress) -> Success[str]:
        return Success("quick")

    return [Definition("blocking", [Step(blocking)]), Definition("quick", [Step(quick)])]


async def run(workflows: int, seconds: float) -> tuple[float, float]:
    """Seconds for ``workflows`` blocking workflows together, and for an async workflow
    started while they block."""
    async with Kapbit(_definitions(seconds), MemRepository(partitions=4)) as kbit:
        started = time.perf_counter()
        blocked = [
            asyncio.create_task(kbit.exec_workflow(f"b-{i}", "blocking", None))
            for i in range(workflows)
        ]
        await asyncio.sleep(0)
        quick_started = time.perf_counter()
        await kbit.exec_workflow("q-0", "quick", None)
        quick = time.perf_counter() - quick_started
        await asyncio.gather(*blocked)
        return time.perf_counter() - started, quick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflows", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    print(machine_line(machine()))
    together, quick = asyncio.run(run(args.workflows, args.seconds))
    print(f"{'workflows':>9} {'step blocks s':>13} {'all done s':>11} {'serial would be s':>18}")
    serial = args.workflows * args.seconds
    print(f"{args.workflows:>9} {args.seconds:>13.2f} {together:>11.3f} {serial:>18.2f}")
    print(f"an async workflow started meanwhile finished in {quick * 1000:.1f} ms")


if __name__ == "__main__":
    main()
