"""Restart time with 1,000 in-flight workflows behind 10k / 100k / 1M finished ones.

For each size, on a MemRepository:

1. the finished workflows (3-step saga: WorkflowCreated, 3 StepOutcomes, WorkflowResult)
   are appended directly, as encoded events written by an earlier node, and that node's
   checkpoint is saved by the engine's own Checkpointer (as the engine would have);
2. a real instance starts, runs 1,000 workflows that stop inside step 1, and crashes
   (``Kapbit.abort``: nothing more is written);
3. a second instance starts on the log: **restart** is the time of ``start()`` (claim,
   recovery, resuming the 1,000 in the background); **resumed** the time until all 1,000
   have finished after it. ``read`` counts the records recovery read.

Recovery reads from the checkpoint, plus the idempotency window's ids before it, so the
restart time stays flat as the log grows. Then the memory of one idempotency-window entry
is measured with tracemalloc.

Usage: ``python benchmarks/bench_recovery.py [--quick] [--sizes N ...] [--partitions P]``
(the 1M case builds 5M records: about 2 GB of memory and a couple of minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence

from _common import RESTART_STEPS, crash_with_open, finished_records, held_saga

from kapbit import CheckpointPolicy, JsonCodec, Kapbit, Options, partition_for
from kapbit.checkpoints import Checkpointer
from kapbit.events import ActiveWriter
from kapbit.fencing import OwnerTracker
from kapbit.idempotency import IdempotencyWindow
from kapbit.repository import Checkpoint, MemRepository, Record

IN_FLIGHT = 1_000


class CountingRepository(MemRepository):
    """Counts the records handed out by ``read``."""

    records_read = 0

    async def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        async for batch in super().read(partition, start, stop):
            self.records_read += len(batch)
            yield batch


async def _append_finished(repo: MemRepository, count: int, window: int) -> None:
    """``count`` finished workflows of node ``writer``, and its engine's checkpoint."""
    codec = JsonCodec()
    node, now = "writer", time.time()
    partitions = repo.partitions
    windows = [IdempotencyWindow(window) for _ in range(partitions)]
    for p in range(partitions):
        claim = ActiveWriter(node, now, codec=codec.name, window=window)
        await repo.claim(p, node, codec.encode(claim))
    append = repo.append
    for kind, wid, value in finished_records(count, now):
        p = partition_for(wid, partitions)
        offset = await append(p, kind, wid, node, value)
        if kind == "workflow_created":
            windows[p].add(wid, offset)
    # What the writer's checkpointer saves with nothing open: everything up to its last
    # acknowledged offset has terminated; the window's ids start further back.
    acked = [await repo.end_offset(p) - 1 for p in range(partitions)]
    checkpointer = Checkpointer(
        repo,
        CheckpointPolicy(),
        acked.__getitem__,
        windows,
        [OwnerTracker(node) for _ in range(partitions)],
        [Checkpoint() for _ in range(partitions)],
        writer=node,
        window_size=window,
    )
    await checkpointer.save()


async def _measure(finished: int, partitions: int, window: int) -> dict[str, float]:
    repo = CountingRepository(partitions=partitions)
    options = Options(idempotency_window=window, max_workflows=10_000)
    started = time.perf_counter()
    await _append_finished(repo, finished, window)
    built = time.perf_counter() - started

    await crash_with_open(lambda saga: Kapbit([saga], repo, options=options), IN_FLIGHT)
    records = sum([await repo.end_offset(p) for p in range(partitions)])
    gc.collect()
    gc.freeze()  # the big log is not garbage: keep collections out of the timing
    repo.records_read = 0
    second = Kapbit([held_saga(None)], repo, options=options)
    t0 = time.perf_counter()
    await second.start()
    restart = time.perf_counter() - t0
    read = repo.records_read
    assert second.stats.recovered == IN_FLIGHT, second.stats
    results = await asyncio.gather(
        *(second.wait_result(f"open-{i:04d}", timeout=60) for i in range(IN_FLIGHT))
    )
    resumed = time.perf_counter() - t0
    assert results == [sum(range(RESTART_STEPS))] * IN_FLIGHT
    await second.close()
    gc.unfreeze()
    return {
        "records": records,
        "read": read,
        "build": built,
        "restart": restart,
        "resumed": resumed,
    }


def _window_entry_bytes(count: int = 100_000) -> tuple[float, float]:
    """Bytes per idempotency-window entry: the window's own share, and with its id."""
    ids = [f"order-{i:012d}" for i in range(count)]  # a typical id, made before measuring

    def given_ids(window: IdempotencyWindow) -> None:
        for offset, workflow_id in enumerate(ids):
            window.add(workflow_id, offset * 5 + 1_000_000)  # realistic (non-cached) offsets

    def fresh_ids(window: IdempotencyWindow) -> None:
        for i in range(count):  # ids decoded from the log are new strings, as with Kafka
            window.add(f"order-{i:012d}", i * 5 + 1_000_000)

    own = _traced_window(count, given_ids)
    total = _traced_window(count, fresh_ids)
    return own / count, total / count


def _traced_window(size: int, fill: Callable[[IdempotencyWindow], None]) -> int:
    """The bytes allocated by a window of ``size`` ids that ``fill`` fills."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    window = IdempotencyWindow(size)
    fill(window)
    allocated = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del window
    return allocated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k / 30k / 100k finished")
    parser.add_argument("--sizes", type=int, nargs="+", help="finished workflows per run")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument(
        "--window", type=int, default=10_000, help="idempotency window per partition"
    )
    args = parser.parse_args()
    sizes = args.sizes or (
        [10_000, 30_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    )
    print(
        f"kapbit recovery on MemRepository: {IN_FLIGHT:,} in-flight workflows behind N "
        f"finished ones ({RESTART_STEPS}-step saga), {args.partitions} partition(s), window "
        f"{args.window:,} ids per partition, Python {sys.version.split()[0]}"
    )
    print(
        f"{'finished':>10} {'log records':>12} {'build s':>8} {'records read':>13} "
        f"{'restart ms':>11} {'resumed ms':>11}"
    )
    for size in sizes:
        row = asyncio.run(_measure(size, args.partitions, args.window))
        print(
            f"{size:>10,} {row['records']:>12,.0f} {row['build']:>8.1f} {row['read']:>13,.0f} "
            f"{row['restart'] * 1e3:>11.1f} {row['resumed'] * 1e3:>11.1f}"
        )
        gc.collect()
    own, total = _window_entry_bytes()
    print(
        f"idempotency window: {own:.0f} bytes per entry (dict slot + offset), "
        f"{total:.0f} bytes with a fresh 18-character id string"
    )


if __name__ == "__main__":
    main()
