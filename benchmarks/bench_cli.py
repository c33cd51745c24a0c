"""How long the ``kapbit`` command takes to answer, with and without a status database.

On a Kafka topic (a local broker unless ``--bootstrap`` names one) a real instance runs
``--workflows`` 3-step sagas (5 events each), then each command below runs as a user runs
it, in a process of its own (Python's start-up included), and is timed:

1. ``kapbit stats --bootstrap B --topic T``: no database, the whole log is projected into
   a temporary one first;
2. ``kapbit project --once --db F``: the database is made, from the whole log;
3. ``--more`` workflows are appended, and ``kapbit project --once --db F`` again: only the
   new records are read;
4. ``kapbit stats --db F`` and ``kapbit status ID --db F``: the database alone.

Usage: ``python benchmarks/bench_cli.py [--workflows 50000] [--more 1000] [--bootstrap B]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

from kapbit import Definition, Kapbit, Progress, Step, Success
from kapbit.repository.kafka import KafkaRepository

PARTITIONS = 4
IN_FLIGHT = 1_000


def _step(_input: int, _progress: Progress) -> Success[int]:
    return Success(1)


SAGA = Definition("order", steps=[Step(_step), Step(_step), Step(_step)])


async def _write(bootstrap: str, topic: str, first: int, count: int) -> None:
    """Run ``count`` workflows, ``IN_FLIGHT`` at a time."""
    repository = KafkaRepository(bootstrap, topic, partitions=PARTITIONS)
    async with Kapbit([SAGA], repository) as kbit:
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            async with limit:
                await kbit.exec_workflow(f"wf-{i}", "order", i)

        await asyncio.gather(*(one(i) for i in range(first, first + count)))


def _timed(*argv: str) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kapbit.cli", *argv],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("KAPBIT_")},
    )
    return time.perf_counter() - began, done.stdout


@contextlib.contextmanager
def _broker(bootstrap: str | None) -> Iterator[str]:
    if bootstrap is not None:
        yield bootstrap
        return
    from kapbit.testing.broker import local_broker

    with local_broker() as broker:
        yield broker.bootstrap_servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=50_000)
    parser.add_argument("--more", type=int, default=1_000)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    topic = f"bench-cli-{uuid.uuid4().hex[:8]}"
    with _broker(args.bootstrap) as bootstrap, tempfile.TemporaryDirectory() as directory:
        db = os.path.join(directory, "status.db")
        log = ["--bootstrap", bootstrap, "--topic", topic]
        began = time.perf_counter()
        asyncio.run(_write(bootstrap, topic, 0, args.workflows))
        written = time.perf_counter() - began
        events = args.workflows * 5 + PARTITIONS
        rows: list[tuple[str, float]] = []
        rows.append(("stats, no --db (whole log projected)", _timed("stats", *log)[0]))
        rows.append(
            ("project --once (new database)", _timed("project", "--once", "--db", db, *log)[0])
        )
        asyncio.run(_write(bootstrap, topic, args.workflows, args.more))
        rows.append(
            (
                f"project --once (+{args.more:,} workflows)",
                _timed("project", "--once", "--db", db, *log)[0],
            )
        )
        seconds, out = _timed("stats", "--db", db)
        assert f"{args.workflows + args.more}" in out, out
        rows.append(("stats --db", seconds))
        rows.append(("status wf-7 --db", _timed("status", "wf-7", "--db", db)[0]))
        rows.append(("--version (Python start-up)", _timed("--version")[0]))
    print(
        f"log: {args.workflows:,} workflows, {events:,} events on {PARTITIONS} partitions "
        f"(written in {written:.1f} s)"
    )
    width = max(len(name) for name, _ in rows)
    print(f"{'command':<{width}}  seconds")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.2f}")


if __name__ == "__main__":
    main()
