"""Handles on Kafka after a real crash: a worker process finishes some workflows, holds
others in flight, and is SIGKILLed. A new instance then answers for every id from the log
(results decoded as the worker's process returned them), waits for the ones it resumed, and
attaches a retried request to the workflow already using its id."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from kapbit import Kapbit, Options
from kapbit.projection import WorkflowStatus
from kapbit.repository.kafka import KafkaRepository
from tests.kafka_worker import (
    WORKFLOW,
    Journal,
    WorkerProcess,
    crash_saga,
    expected_result,
    fails,
    read_lines,
)

COUNT = 30
HOLD_EVERY = 5  # w4, w9, ... stay in flight in the worker


async def _results_reach(path: Path, lines: int, worker: WorkerProcess) -> None:
    async def reached() -> None:
        while len(read_lines(path)) < lines:
            assert worker.process.returncode is None, worker.output
            await asyncio.sleep(0.005)  # polling a file: nothing to wait on

    await asyncio.wait_for(reached(), 60)


async def test_handles_answer_from_the_log_after_the_worker_is_killed(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    results = tmp_path / "results.log"
    args = ["--count", str(COUNT), "--hold-every", str(HOLD_EVERY), "--results", str(results)]
    worker = await WorkerProcess.start(kafka_bootstrap, topic, "--partitions", "3", *args)
    try:
        await worker.line("started")
        await _results_reach(results, COUNT - COUNT // HOLD_EVERY, worker)
    finally:
        worker.kill()
    assert await worker.wait() == -signal.SIGKILL, worker.output

    repository = KafkaRepository(kafka_bootstrap, topic)
    async with Kapbit([crash_saga(Journal(None))], repository, options=Options()) as kbit:
        for n in range(COUNT):
            handle = kbit.get_workflow(f"w{n}")
            assert await handle.result(timeout=30) == expected_result(n), n
            status = WorkflowStatus.COMPENSATED if fails(n) else WorkflowStatus.SUCCEEDED
            assert await handle.status() == status, n
        retried = await kbit.exec_workflow("w7", WORKFLOW, {"n": 7}, on_duplicate="attach")
        assert retried == expected_result(7)
        assert kbit.stats.started == 0  # nothing was created again
        assert kbit.stats.recovered == COUNT // HOLD_EVERY
