"""The SIGKILL soak with lost acknowledgements, against a real broker (issues 10 and 16).

A worker process (``tests/kafka_worker.py``) runs a stream of 3-step sagas through a
:class:`~kapbit.testing.TcpProxy` that keeps losing acknowledgements (the produce request
reaches the broker, the connection is reset before the response comes back), and is
SIGKILLed at random points, then restarted on the same topic; the last run lets everything
finish. :func:`~tests.kafka_worker.audit` then counts, from the log and the execution
journal, the workflows lost or doubled and the steps re-run after their outcome was
persisted: all must be zero.

The CI run kills a few times; ``KAPBIT_SOAK_KILLS=16`` (or more) runs the long soak.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from pathlib import Path

from kapbit.testing.broker import LocalBroker
from kapbit.testing.proxy import TcpProxy
from tests.kafka_worker import WorkerProcess, audit, read_lines, read_log

SOAK_KILLS_ENV = "KAPBIT_SOAK_KILLS"
CI_KILLS = 3


async def _lose_acks(proxy: TcpProxy, rng: random.Random, stop: asyncio.Event) -> None:
    """Keep one lost acknowledgement armed, re-arming it a random while after each."""
    while not stop.is_set():
        if proxy.acks_pending == 0:
            proxy.lose_acks(1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0.05, 0.3))


async def _journal_grows_to(path: Path, lines: int, worker: WorkerProcess) -> None:
    async def grown() -> None:
        while len(read_lines(path)) < lines:
            assert worker.process.returncode is None, (
                f"worker {worker.pid} exited before the journal reached {lines} lines:\n"
                f"{worker.output}"
            )
            await asyncio.sleep(0.002)  # polling a file: nothing to wait on

    await asyncio.wait_for(grown(), 60)


async def test_sigkill_soak_with_lost_acks_loses_and_doubles_nothing(
    topic: str, tmp_path: Path
) -> None:
    kills = int(os.environ.get(SOAK_KILLS_ENV, CI_KILLS))
    workflows = 100 * kills
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    journal = tmp_path / "executions.log"
    args = ["--count", str(workflows), "--executions", str(journal), "--concurrency", "8"]
    killed: set[int] = set()
    started = time.monotonic()
    async with LocalBroker.behind_proxy() as broker:
        proxy = broker.proxy
        stop = asyncio.Event()
        injector = asyncio.create_task(_lose_acks(proxy, rng, stop))
        try:
            for run in range(kills):
                extra = ["--partitions", "3"] if run == 0 else []
                worker = await WorkerProcess.start(broker.bootstrap_servers, topic, *args, *extra)
                try:
                    await worker.line("started", timeout=60)
                    target = len(read_lines(journal)) + rng.randint(5, 200)
                    await _journal_grows_to(journal, target, worker)
                finally:
                    worker.kill()
                assert await worker.wait() == -signal.SIGKILL, worker.output
                killed.add(worker.pid)
            last = await WorkerProcess.start(broker.bootstrap_servers, topic, *args)
            assert await last.wait(timeout=300) == 0, last.output
            assert "finished" in last.lines, last.output
        finally:
            stop.set()
            await injector
        lost_acks = proxy.acks_lost
        log = await read_log(broker.bootstrap_servers, topic)
    report = audit(log, journal, killed, workflows)
    summary = (
        f"{kills} kills, {lost_acks} acks lost, {report.summary()}, "
        f"{time.monotonic() - started:.0f} s (seed {seed})"
    )
    print(summary)
    assert report.lost == [], summary
    assert report.doubled == [], summary
    assert report.reruns == [], summary
    assert report.accepted == workflows, summary
    # The faults really happened: acks were lost and left second copies in the log.
    assert lost_acks >= kills and report.copies > 0, summary
