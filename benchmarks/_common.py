"""What the benchmarks share: the saga workload, the load driver, the set-up of the
restart benchmarks, and machine facts.

The workload is an order saga of three steps with a small payload: reserve stock, charge
the card, ship. In the ``compensate`` scenario the third step fails for a business reason
and the two steps before it are compensated (refund, then release), so the same saga
writes 7 events instead of 5. The restart benchmarks (``bench_recovery``,
``bench_snapshots``) share a 3-step saga that can be held inside step 1, the records of
finished workflows written straight into a log, and the crash that leaves workflows open.
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from kapbit import Definition, Failure, JsonCodec, Kapbit, Progress, Step, Success
from kapbit.events import StepOutcome, WorkflowCreated, WorkflowResult

#: Scenarios: every step succeeds, or step 3 fails and steps 2 and 1 are compensated.
SCENARIOS = ("ok", "compensate")
#: Events kapbit writes per workflow: created + step outcomes (+ compensations) + result.
EVENTS_PER_WORKFLOW = {"ok": 5, "compensate": 7}

Order = dict[str, Any]


def order(index: int, scenario: str, prefix: str = "o") -> Order:
    """The small payload of one workflow (about 100 bytes as JSON)."""
    return {
        "order_id": f"{prefix}-{index}",
        "customer": f"c-{index % 997}",
        "sku": "SKU-1234",
        "quantity": 2,
        "amount_cents": 4_200,
        "fail_shipping": scenario == "compensate",
    }


# --- the saga as a kapbit definition ---------------------------------------------------------


def _reserve(order: Order, _progress: Progress) -> Success[str]:
    return Success(f"rsv-{order['order_id']}")


def _release(order: Order, _progress: Progress) -> Success[str]:
    return Success("released")


def _charge(order: Order, _progress: Progress) -> Success[str]:
    return Success(f"pay-{order['order_id']}")


def _refund(order: Order, _progress: Progress) -> Success[str]:
    return Success("refunded")


def _ship(order: Order, _progress: Progress) -> Success[str] | Failure[str]:
    if order["fail_shipping"]:
        return Failure("no carrier available")
    return Success(f"trk-{order['order_id']}")


def _result(_order: Order, progress: Progress) -> str:
    return "compensated" if progress.failed else "shipped"


def _async(action: Callable[[Order, Progress], Any]) -> Callable[[Order, Progress], Any]:
    async def run(order: Order, progress: Progress) -> Any:
        return action(order, progress)

    run.__name__ = action.__name__
    return run


def saga(sync: bool = False) -> Definition[Order, str, str]:
    """The saga with async steps (the way to write steps that do not block), or with plain
    ``def`` steps, which kapbit runs in its thread pool."""
    wrap: Callable[[Callable[[Order, Progress], Any]], Any] = (lambda a: a) if sync else _async
    return Definition(
        "order",
        steps=[
            Step(wrap(_reserve), wrap(_release), name="reserve"),
            Step(wrap(_charge), wrap(_refund), name="charge"),
            Step(wrap(_ship), name="ship"),
        ],
        result=_result,
        input_type=Order,
        outcome_type=str,
        result_type=str,
    )


SAGA = saga()

EXPECTED_RESULT = {"ok": "shipped", "compensate": "compensated"}


# --- the load driver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStats:
    """One measured run: how many workflows, how long, and the latency of each."""

    workflows: int
    in_flight: int
    elapsed: float
    latencies: list[float]
    errors: int
    cpu: float = 0.0  # CPU seconds this process used meanwhile (user + system)

    @property
    def rate(self) -> float:
        return self.workflows / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_per_workflow_us(self) -> float:
        """This process's CPU microseconds per workflow: what the load of a shared machine
        moves far less than the rate."""
        return self.cpu / self.workflows * 1e6 if self.workflows else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def drive(
    run_one: Callable[[int], Awaitable[object]], count: int, in_flight: int
) -> RunStats:
    """Run ``run_one(0..count-1)`` with at most ``in_flight`` running at once (1: in turn).

    Each latency is the time from the call to its result; an exception counts as an error.
    """
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    indexes = iter(range(count))

    async def worker() -> None:
        nonlocal errors
        for index in indexes:
            started = clock()
            try:
                await run_one(index)
            except Exception as exc:
                errors += 1
                if errors <= 3:
                    print(f"workflow {index} failed: {exc!r}", file=sys.stderr)
                continue
            latencies.append(clock() - started)

    started, cpu = clock(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(max(1, min(in_flight, count)))))
    elapsed, cpu = clock() - started, time.process_time() - cpu
    return RunStats(count, in_flight, elapsed, latencies, errors, cpu)


# --- the set-up of the restart benchmarks ----------------------------------------------------

#: Steps of the restart benchmarks' saga (the records of a finished one: created, one outcome
#: per step, result).
RESTART_STEPS = 3


def held_saga(
    hold: asyncio.Event | None,
    held: int = 0,
    all_inside: asyncio.Event | None = None,
    name: str = "saga",
) -> Definition[dict[str, int], int, int]:
    """The restart benchmarks' 3-step saga (type ``name``); with ``hold``, step 1 waits for
    it, and ``all_inside`` is set once ``held`` workflows wait there."""
    inside = 0

    async def step(input: Any, progress: Progress) -> Success[int]:
        nonlocal inside
        if len(progress) == 1 and hold is not None:
            inside += 1
            if inside == held and all_inside is not None:
                all_inside.set()
            await hold.wait()
        return Success(len(progress))

    return Definition(
        name,
        [Step(step, step) for _ in range(RESTART_STEPS)],
        result=lambda input, progress: sum(progress.values()),
        input_type=dict[str, int],
        outcome_type=int,
        result_type=int,
    )


def finished_records(count: int, now: float) -> Iterator[tuple[str, str, bytes]]:
    """The records of ``count`` finished workflows of :func:`held_saga` (ids
    ``done-0000000`` on), JSON-encoded as the engine writes them: ``(kind, key, value)``."""
    encode = JsonCodec().encode
    outcomes = [msgspec.Raw(encode(step)) for step in range(RESTART_STEPS)]
    result = msgspec.Raw(encode(sum(range(RESTART_STEPS))))
    for i in range(count):
        wid = f"done-{i:07d}"
        created = WorkflowCreated(wid, "saga", msgspec.Raw(encode({"n": i})), now)
        yield "workflow_created", wid, encode(created)
        for step in range(RESTART_STEPS):
            outcome = StepOutcome(wid, step, "execute", True, outcomes[step])
            yield "step_outcome", wid, encode(outcome)
        yield "workflow_result", wid, encode(WorkflowResult(wid, result, False, now))


async def crash_with_open(new: Callable[[Definition], Kapbit], count: int) -> Kapbit:
    """Start the instance ``new`` makes for a :func:`held_saga`, run ``count`` workflows of
    it (ids ``open-0000`` on) until each waits inside step 1, then crash it
    (``Kapbit.abort``: nothing more is written; they stay open in the log). Returns the
    crashed instance, whose repository its ``close()`` closes."""
    hold, all_inside = asyncio.Event(), asyncio.Event()
    kbit = new(held_saga(hold, count, all_inside))
    await kbit.start()
    calls = [
        asyncio.create_task(kbit.exec_workflow(f"open-{i:04d}", "saga", {"n": i}))
        for i in range(count)
    ]
    await all_inside.wait()
    kbit.abort()
    await asyncio.gather(*calls, return_exceptions=True)
    return kbit


# --- facts about the machine -----------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_peak_rss_mib(pid: int) -> float | None:
    """The peak RSS of another process (``VmHWM``), if it can be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, str]:
    """Cores, memory, CPU model, OS and Python version, for the header of every result."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                    break
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count() or "?"),
        "memory": memory,
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def machine_line(facts: dict[str, str]) -> str:
    return (
        f"{facts['cores']} cores, {facts['memory']} RAM, {facts['cpu']}, {facts['os']}, "
        f"Python {facts['python']}"
    )
