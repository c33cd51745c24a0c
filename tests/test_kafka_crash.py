"""Real crashes on Kafka: a worker process is SIGKILLed at random points, then restarted.

The worker (``tests/kafka_worker.py``) runs a stream of 3-step sagas whose steps journal
every execution (fsynced) before returning. It is killed with SIGKILL several times, each
time after the journal has grown by a random number of lines, and restarted on the same
topic; the last run lets everything finish. The topic, read back with a zombie-filtering
reader, must then tell a consistent story: every workflow created exactly once and
terminated exactly once with the right result, every outcome persisted once, and a step
executed twice only where a kill fell between its execution and its persisted outcome.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from pathlib import Path

from tests.kafka_worker import WorkerProcess, audit, read_lines, read_log

WORKFLOWS = 400
KILLS = 4


async def _journal_grows_to(path: Path, lines: int, worker: WorkerProcess) -> None:
    """Wait until the journal holds ``lines`` lines (the worker must still be running)."""

    async def grown() -> None:
        while len(read_lines(path)) < lines:
            assert worker.process.returncode is None, (
                f"worker {worker.pid} exited before the journal reached {lines} lines:\n"
                f"{worker.output}"
            )
            await asyncio.sleep(0.002)  # polling a file: nothing to wait on

    await asyncio.wait_for(grown(), 30)


async def test_sigkilled_worker_loses_nothing_and_repeats_only_unpersisted_steps(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    journal = tmp_path / "executions.log"
    args = ["--count", str(WORKFLOWS), "--executions", str(journal), "--concurrency", "8"]
    killed: set[int] = set()
    recovered: list[int] = []
    kill_points: list[tuple[int, int]] = []  # (journal lines wanted, lines at the kill)
    for run in range(KILLS):
        extra = ["--partitions", "3"] if run == 0 else []
        worker = await WorkerProcess.start(kafka_bootstrap, topic, *args, *extra)
        try:
            recovered.append(int((await worker.line("started")).split()[2]))
            target = len(read_lines(journal)) + rng.randint(5, 200)
            await _journal_grows_to(journal, target, worker)
        finally:
            worker.kill()
        assert await worker.wait() == -signal.SIGKILL, worker.output
        killed.add(worker.pid)
        kill_points.append((target, len(read_lines(journal))))

    last = await WorkerProcess.start(kafka_bootstrap, topic, *args)
    last_recovered = int((await last.line("started")).split()[2])
    assert await last.wait(timeout=60) == 0, last.output
    assert "finished" in last.lines, last.output
    context = f"(seed {seed}; workers killed: {sorted(killed)}, last {last.pid})"

    log = await read_log(kafka_bootstrap, topic)
    report = audit(log, journal, killed, WORKFLOWS)
    summary = f"{report.summary()} {context}"
    # Every workflow created once and terminated once with the right result, every outcome
    # persisted once in the saga's order; a step ran again only where a kill fell between
    # its execution and its persisted outcome, and the outcome is the last run's.
    assert report.lost == [], summary
    assert report.doubled == [], summary
    assert report.reruns == [], summary
    assert report.accepted == WORKFLOWS, summary
    assert report.copies == 0, summary  # no lost acks here: every record written once
    # The workers ran the stream between them: every process executed steps, and the
    # kills really interrupted workflows (later runs resumed some).
    runs = Counter(int(line.split()[3]) for line in read_lines(journal))
    assert set(runs) == killed | {last.pid}, (runs, context)
    assert sum(recovered[1:]) + last_recovered > 0, (recovered, last_recovered, context)
    print(f"kills at {kill_points}: {summary}")
