"""A real takeover: process B starts on the topic while process A is running sagas.

A (``tests/kafka_worker.py``) runs a stream of sagas and journals every result
``exec_workflow`` returned to it; some of its workflows are held in a step, so they are
surely in flight when B claims the partitions. A must stop with ``Fenced`` (its exit
status and output say so), B must finish what A left in flight, and nothing A returned
may be missing from the log or contradicted by it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.kafka_worker import (
    EXIT_FENCED,
    WorkerProcess,
    expected_path,
    expected_result,
    pid_of,
    read_lines,
    read_log,
)

HOLD_EVERY = 10  # A holds w9, w19, ... in step 1


async def test_second_process_fences_the_first_and_finishes_its_workflows(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    a_results, b_results = tmp_path / "a-results.log", tmp_path / "b-results.log"
    a = await WorkerProcess.start(
        kafka_bootstrap,
        topic,
        "--partitions",
        "3",
        "--count",
        "1000000",
        "--concurrency",
        "16",
        "--hold-every",
        str(HOLD_EVERY),
        "--results",
        str(a_results),
    )
    b: WorkerProcess | None = None
    try:
        await a.line("started")

        async def a_has_returned(count: int) -> None:
            while len(read_lines(a_results)) < count:
                assert a.process.returncode is None, a.output
                await asyncio.sleep(0.005)  # polling a file: nothing to wait on

        await asyncio.wait_for(a_has_returned(200), 30)
        b = await WorkerProcess.start(kafka_bootstrap, topic, "--results", str(b_results))
        recovered = int((await b.line("started")).split()[2])

        assert await a.wait(timeout=30) == EXIT_FENCED, a.output
        assert any(line.startswith("fenced ") for line in a.lines), a.output
        assert await b.wait(timeout=60) == 0, b.output
        assert "finished" in b.lines, b.output
    finally:
        a.kill()
        if b is not None:
            b.kill()

    log = await read_log(kafka_bootstrap, topic)
    created, terminals, results = log.created(), log.terminals(), log.results()
    b_node = next(e.node for e in reversed(log.claims()) if pid_of(e.node) == b.pid)
    context = f"(A pid {a.pid}, B pid {b.pid})"

    # Nothing A returned is missing from the log or contradicted by it.
    returned_by_a = dict(_parse(line) for line in read_lines(a_results))
    assert len(returned_by_a) >= 200
    assert {wid: results.get(wid) for wid in returned_by_a} == {
        wid: [value] for wid, value in returned_by_a.items()
    }, context
    # Every workflow that really exists (not a zombie write) terminated exactly once, with
    # the right result and every outcome persisted once.
    assert set(terminals) == set(created), context
    assert all(len(entries) == 1 for entries in (*created.values(), *terminals.values()))
    workflows = log.by_workflow()
    for wid in created:
        n = int(wid[1:])
        assert results[wid] == [expected_result(n)], (wid, context)
        outcomes = [(e.event.step, e.event.phase) for e in workflows[wid][1:-1]]
        assert outcomes == expected_path(n), (wid, context)
    # B finished what A left in flight: at least the held workflows A had created.
    held = {wid for wid in created if int(wid[1:]) % HOLD_EVERY == HOLD_EVERY - 1}
    assert held, context
    assert recovered >= len(held), context
    finished_by_b = {wid for wid, entries in terminals.items() if entries[0].node == b_node}
    assert held <= finished_by_b, context
    assert dict(_parse(line) for line in read_lines(b_results)) == {
        wid: results[wid][0] for wid in finished_by_b
    }, context
    # A learnt it was fenced from one of its own records after B's claim: such zombie
    # writes exist, are A's, and no reader acted on them.
    zombies = log.zombies()
    assert zombies, context
    assert {pid_of(e.node) for e in zombies} == {a.pid}, context
    b_claims = {e.partition: e.offset for e in log.claims() if e.node == b_node}
    assert all(e.offset > b_claims[e.partition] for e in zombies), context


def _parse(line: str) -> tuple[str, object]:
    wid, _, value = line.partition(" ")
    return wid, json.loads(value)
