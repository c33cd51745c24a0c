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
from collections import Counter, defaultdict
from pathlib import Path

from tests.kafka_worker import (
    WorkerProcess,
    expected_path,
    expected_result,
    pid_of,
    read_lines,
    read_log,
)

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
    created = log.created()
    terminals = log.terminals()
    results = log.results()
    outcomes = log.outcomes()
    ids = {f"w{n}" for n in range(WORKFLOWS)}
    # Every workflow created exactly once, terminated exactly once, with the right result.
    assert set(created) == ids, context
    assert all(len(entries) == 1 for entries in created.values()), context
    assert set(terminals) == ids, context
    assert {wid: len(t) for wid, t in terminals.items() if len(t) != 1} == {}, context
    assert results == {f"w{n}": [expected_result(n)] for n in range(WORKFLOWS)}, context
    # Every outcome persisted exactly once, in the saga's order.
    persisted = {
        wid: [(e.event.step, e.event.phase) for e in entries] for wid, entries in outcomes.items()
    }
    assert persisted == {f"w{n}": expected_path(n) for n in range(WORKFLOWS)}, context

    # The journal: which process executed which step, in order.
    executors: dict[tuple[str, int, str], list[int]] = defaultdict(list)
    for line in read_lines(journal):
        wid, step, phase, pid = line.split()
        executors[(wid, int(step), phase)].append(int(pid))
    writer = {
        (wid, e.event.step, e.event.phase): pid_of(e.node)
        for wid, entries in outcomes.items()
        for e in entries
    }
    # Nothing was persisted that did not run, nothing ran that is not on the saga's path.
    assert set(executors) == set(writer), context
    repeated = 0
    for key, pids in executors.items():
        # One process runs a step at most once; the outcome in the log is the last run's.
        assert len(set(pids)) == len(pids), (key, pids, context)
        assert writer[key] == pids[-1], (key, pids, writer[key], context)
        # Every earlier run was in a process killed before it persisted the outcome.
        assert set(pids[:-1]) <= killed, (key, pids, context)
        repeated += len(pids) - 1
    # The workers ran the stream between them: every process executed steps, and the
    # kills really interrupted workflows (later runs resumed some).
    runs = Counter(pid for pids in executors.values() for pid in pids)
    assert set(runs) == killed | {last.pid}, (runs, context)
    assert sum(recovered[1:]) + last_recovered > 0, (recovered, last_recovered, context)
    print(f"kills at {kill_points}: {repeated} executions repeated {context}")
