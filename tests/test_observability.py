"""What an operator sees: the counters of ``kbit.stats`` and log records that name the
workflow (id, type, partition) they are about."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import pytest

from kapbit import (
    Backoff,
    CircuitBreakerOpen,
    DeadLettered,
    Definition,
    Kapbit,
    Progress,
    Step,
    Success,
    WillRetryLater,
    WorkflowRejected,
    partition_for,
)
from kapbit.repository import MemRepository
from kapbit.testing.faults import FaultyRepository
from tests.helpers import LogCapture, Script, fast_options, saga, wait_until

FIELDS = ("workflow_id", "workflow_type", "partition")


def remote(error: type[Exception], down: dict[str, bool]) -> Definition:
    """A one-step workflow whose step raises ``error`` while ``down["now"]``."""

    async def call(input: Any, progress: Progress) -> Success[str]:
        if down["now"]:
            raise error("service unavailable")
        return Success("up")

    return Definition(
        f"remote-{error.__name__}",
        [Step(call)],
        result=lambda input, progress: progress.value(0),
    )


async def test_stats_count_every_outcome() -> None:
    down = {"now": True}
    repo = FaultyRepository(MemRepository(partitions=3))
    definitions = [
        saga(Script(), name="saga"),
        saga(Script({(1, "execute"): "fail"}), name="comp"),
        remote(ConnectionError, down),
    ]
    options = fast_options(max_attempts=2, max_workflows=10)
    async with Kapbit(definitions, repo, options=options) as kbit:
        assert kbit.stats.started == 0 and kbit.stats.gate_open
        await kbit.exec_workflow("ok", "saga", {"id": "ok"})
        await kbit.exec_workflow("comp", "comp", {"id": "comp"})
        repo.reject(kinds="step_outcome", when=lambda call: call.key == "big")
        with pytest.raises(WorkflowRejected):
            await kbit.exec_workflow("big", "saga", {"id": "big"})
        repo.fail(kinds="dead_letter")  # hold the dead letter so the retrying state shows
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("dead", "remote-ConnectionError")
        await wait_until(lambda: kbit.stats.retried == 2)
        snapshot = kbit.stats
        assert (snapshot.in_flight, snapshot.retrying) == (1, 1)
        repo.clear()
        with pytest.raises(DeadLettered):
            await kbit.wait_result("dead", timeout=5)
        stats = kbit.stats
    assert stats.started == 4
    assert stats.succeeded == 1
    assert stats.compensated == 1
    assert stats.rejected == 1
    assert stats.retried == 2
    assert stats.dead_lettered == 1
    assert (stats.in_flight, stats.retrying, stats.recovered) == (0, 0, 0)
    assert stats.gate_open is True
    # A snapshot does not move with the instance.
    assert snapshot.dead_lettered == 0 and snapshot.in_flight == 1


async def test_stats_show_the_gate_and_recovered_workflows() -> None:
    down = {"now": True}
    repo = MemRepository()
    definition = remote(CircuitBreakerOpen, down)
    old = Kapbit([definition], repo, options=fast_options(max_attempts=1000))
    await old.start()
    with pytest.raises(WillRetryLater):
        await old.exec_workflow("w", definition.type)
    assert old.stats.gate_open is False and old.stats.in_flight == 1
    old.abort()
    async with Kapbit([definition], repo, options=fast_options(max_attempts=1000)) as new:
        assert new.stats.recovered == 1 and new.stats.in_flight == 1
        down["now"] = False
        assert await new.wait_result("w", timeout=5) == "up"
        assert new.stats.succeeded == 1 and new.stats.gate_open


async def test_engine_log_records_name_the_workflow_they_are_about() -> None:
    down = {"now": True}
    repo = FaultyRepository(MemRepository(partitions=4))
    definitions = [saga(Script()), remote(CircuitBreakerOpen, down)]
    options = fast_options(max_attempts=3, max_workflows=10)
    with LogCapture() as logs:
        async with Kapbit(definitions, repo, options=options) as kbit:
            outage = repo.fail(kinds="step_outcome", times=4)  # emitter retries, breaker opens
            assert (await kbit.exec_workflow("s1", "saga", {"id": "s1"}))["values"]
            assert outage.hits == 4
            with pytest.raises(WillRetryLater):  # gate closes, retry worker probes
                await kbit.exec_workflow("r1", "remote-CircuitBreakerOpen")
            with pytest.raises(DeadLettered):
                await kbit.wait_result("r1", timeout=5)
            repo.reject(kinds="workflow_result")
            with pytest.raises(WorkflowRejected):
                await kbit.exec_workflow("x1", "saga", {"id": "x1"})
    types = {"s1": "saga", "r1": "remote-CircuitBreakerOpen", "x1": "saga"}
    engine = ("kapbit.emitter", "kapbit.retry", "kapbit.gate")
    by_module = {name: logs.of(name) for name in engine}
    assert all(by_module.values()), f"no records from {[n for n, r in by_module.items() if not r]}"
    about_workflows = 0
    for record in logs.records:
        if record.name in engine or "workflow '" in record.getMessage():
            for name in FIELDS:
                assert hasattr(record, name), f"{record.name}: {record.getMessage()!r} lacks {name}"
        workflow_id = getattr(record, "workflow_id", None)
        if workflow_id is not None:
            about_workflows += 1
            assert record.workflow_type == types[workflow_id]  # type: ignore[attr-defined]
            assert record.partition == partition_for(workflow_id, 4)  # type: ignore[attr-defined]
    assert about_workflows >= 8
    # The records a user would alert on are there, with the level rising with the trouble.
    messages = [(r.name, r.levelno, r.getMessage()) for r in logs.records]
    assert any(n == "kapbit.gate" and lvl == logging.WARNING for n, lvl, _ in messages)
    assert any(
        n == "kapbit" and lvl == logging.ERROR and "dead-lettered" in m for n, lvl, m in messages
    )
    # A formatter may rely on the fields for every record of these loggers.
    formatter = logging.Formatter("%(workflow_id)s %(workflow_type)s %(partition)s %(message)s")
    for records in by_module.values():
        for record in records:
            formatter.format(record)


async def test_a_long_outage_logs_a_bounded_number_of_lines() -> None:
    repo = FaultyRepository(MemRepository())
    with LogCapture("kapbit.emitter") as logs:
        options = replace(fast_options(fail_max=1000), emit_backoff=Backoff(0.0001, 0.0001, 0))
        async with Kapbit([saga(Script())], repo, options=options) as kbit:
            outage = repo.fail(kinds="workflow_created")
            running = asyncio.create_task(kbit.exec_workflow("w", "saga", {"id": "w"}))
            await outage.wait_hits(300)
            outage.release()
            await running
    failures = [r for r in logs.records if "failed" in r.getMessage()]
    # 300+ failed attempts: every one of the first ten, then powers of two only.
    assert [r.args[3] for r in failures] == [*range(1, 11), 16, 32, 64, 128, 256]  # type: ignore[index]
    assert failures[-1].levelno == logging.ERROR
