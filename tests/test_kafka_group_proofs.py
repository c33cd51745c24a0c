"""Proofs of issue 13 against the real broker: worker processes share one topic.

Worker processes (:mod:`tests.group_worker`) keep calls of a 3-step saga in flight, each
step journaling what it acted on. The tests SIGKILL, restart and stop them under that load;
afterwards the log (read back with a zombie-filtering reader), the calls the workers made
and the execution journal must agree (:func:`tests.group_worker.audit_run`): every workflow
created ended exactly once with the saga's result and path, every call was answered with
the log's result or refused with a typed error and nothing written, and no step ran after
its outcome was persisted or on other outcomes than the persisted ones. The failover and
hand-over times are measured from the log and printed (``pytest -s`` shows them).

The CI run is short; ``KAPBIT_GROUP_PROOF_ROUNDS=5`` (or more) repeats the kill, restart and
stop cycles that many times under load, ``KAPBIT_GROUP_PROOF_LOAD`` scales the calls made
between two faults.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from kapbit.codecs import JsonCodec
from kapbit.events import ActiveWriter, StepOutcome, WorkflowCreated, WorkflowResult
from tests.group_worker import (
    Call,
    Cluster,
    Execution,
    ScenarioReport,
    audit_run,
    handover,
    kill_restart_stop,
    read_executions,
    rolling_restart,
    settled_log,
    workflow_number,
)
from tests.kafka_worker import WORKFLOW, Entry, Log, expected_path, expected_result

ROUNDS_ENV = "KAPBIT_GROUP_PROOF_ROUNDS"
LOAD_ENV = "KAPBIT_GROUP_PROOF_LOAD"
ROUNDS = int(os.environ.get(ROUNDS_ENV, "1"))
#: Results each live worker gets between two faults.
LOAD = int(os.environ.get(LOAD_ENV, "30"))
PARTITIONS = 6
#: Group session timeout: a SIGKILLed member's partitions move after about 1.5 x this.
SESSION = 2.0
#: Seconds the live workers get to own every partition after a start, kill or stop.
SETTLE = 30.0
#: The errors a call may end with besides its result: refusals and the instance's end.
TYPED = {"NotOwner", "Fenced", "InstanceClosed"}


@pytest.fixture
async def single(kafka_bootstrap: str, topic: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(kafka_bootstrap, topic, tmp_path / "executions.log", partitions=3)
    try:
        yield cluster
    finally:
        cluster.abort()


async def test_the_harness_on_one_instance_sigkilled_and_restarted(single: Cluster) -> None:
    """The harness and the audit against the single-instance mode: the restarted instance
    resumes what the killed one had in flight, and the audit finds nothing wrong."""
    await single.start("A")
    await single.progress(LOAD)
    killed = await single.kill("A")
    await single.start("A")
    await single.progress(LOAD)
    await single.drain()
    log = await settled_log(single.bootstrap, single.topic)
    await single.close()
    executions = read_executions(single.journal)
    report = audit_run(log, single.calls(), executions)
    took = handover(log, executions, killed.pid, single.killed[killed.pid])
    print(f"single instance: {report.summary()}; {took}")
    report.assert_clean()
    assert report.results >= 2 * LOAD and report.created >= report.results, report.summary()
    # The kill fell on workflows in flight, and the next instance resumed them.
    assert took.workflows > 0 and took.partitions == 3, took


async def test_the_harness_with_a_second_instance_taking_over(single: Cluster) -> None:
    """Two workers on one topic in the single-instance mode: the second fences the first and
    finishes what it had in flight; the first one's calls end with typed errors or results
    the log agrees with."""
    first = await single.start("A")
    await single.owned_by_live(30)
    await single.progress(LOAD)
    since = time.time()
    second = await single.start("B")
    await first.until(lambda: not first.owned, "the first instance fenced", 60)
    await second.results(LOAD)
    await single.stop("A")
    await single.drain()
    log = await settled_log(single.bootstrap, single.topic)
    await single.close()
    executions = read_executions(single.journal)
    report = audit_run(log, single.calls(), executions)
    took = handover(log, executions, first.pid, since)
    print(f"takeover: {report.summary()}; {took}")
    report.assert_clean()
    assert set(report.errors) <= {"Fenced", "InstanceClosed"}, report.summary()
    assert took.workflows > 0 and took.partitions == 3, took


@pytest.fixture
async def group(kafka_bootstrap: str, topic: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(
        kafka_bootstrap,
        topic,
        tmp_path / "executions.log",
        partitions=PARTITIONS,
        group=f"{topic}-group",
        session=SESSION,
    )
    try:
        yield cluster
    finally:
        cluster.abort()


def _check_group_run(report: ScenarioReport, kills: int, stops: int) -> None:
    report.audit.assert_clean()
    audit = report.audit
    assert set(audit.errors) | set(audit.refusals) <= TYPED, audit.summary()
    assert audit.results > 0 and audit.created >= audit.results, audit.summary()
    assert len(report.failovers) == kills and len(report.handovers) == stops, report.summary()
    # Each kill and stop fell on partitions the worker owned, and the others claimed them.
    for took in [*report.failovers, *report.handovers]:
        assert took.partitions > 0 and took.claimed > 0, took
    # A SIGKILLed member's calls were in flight: someone else resumed them.
    assert all(took.workflows > 0 for took in report.failovers), report.failovers


async def test_group_sigkill_restart_and_graceful_stop_under_load(group: Cluster) -> None:
    """Three members under load: B is SIGKILLed and started again, C is stopped gracefully
    and started again (``KAPBIT_GROUP_PROOF_ROUNDS`` times). Every workflow created ends
    once, no outcome is acted on twice, every call is answered right or refused typed."""
    report = await kill_restart_stop(group, ROUNDS, LOAD, SETTLE)
    print(f"group kill/restart/stop: {report.summary()}")
    _check_group_run(report, kills=ROUNDS, stops=ROUNDS)


async def test_group_rolling_restart_under_load(group: Cluster) -> None:
    """Three members under load, each stopped gracefully and started again in turn."""
    report = await rolling_restart(group, LOAD, SETTLE)
    print(f"group rolling restart: {report.summary()}")
    _check_group_run(report, kills=0, stops=3)


# --- the audit finds what it must find ---------------------------------------------------


NODE = "gw-A0-100/s1"
OTHER = "gw-B0-200/s2"


def _clean_run(wid: str = "A0-1") -> tuple[Log, list[Call], list[Execution]]:
    """Workflow ``wid`` (n = 1: three steps succeed) run by one worker, as the audit wants."""
    codec = JsonCodec()
    n = workflow_number(wid)
    entries = [Entry(0, 0, "active_writer", NODE, NODE, False, ActiveWriter(NODE, 1.0))]
    entries.append(
        Entry(0, 1, "workflow_created", wid, NODE, False, WorkflowCreated(wid, WORKFLOW, RAW, 2.0))
    )
    executions = []
    for step, _ in expected_path(n):  # n = 1 succeeds: execute phase only
        value = msgspec.Raw(codec.encode(f"e{step}-{n}"))
        outcome = StepOutcome(wid, step, "execute", True, value, 3.0 + step)
        entries.append(Entry(0, len(entries), "step_outcome", wid, NODE, False, outcome))
        executions.append(Execution(2.5 + step, wid, step, "execute", 100, step))
    result = msgspec.Raw(codec.encode(expected_result(n)))
    entries.append(
        Entry(
            0,
            len(entries),
            "workflow_result",
            wid,
            NODE,
            False,
            WorkflowResult(wid, result, False, 9.0),
        )
    )
    answer = json.dumps(expected_result(n), separators=(",", ":"))
    calls = [Call("A0", 100, 1.5, 9.5, wid, "result", answer)]
    return Log(entries), calls, executions


RAW = msgspec.Raw(b'{"n":1}')


def test_the_audit_passes_a_clean_run() -> None:
    log, calls, executions = _clean_run()
    report = audit_run(log, calls, executions)
    report.assert_clean()
    assert (report.created, report.results, report.repeated) == (1, 1, 0), report.summary()


def test_the_audit_finds_a_step_run_after_its_outcome_was_persisted() -> None:
    log, calls, executions = _clean_run()
    executions.append(Execution(20.0, "A0-1", 1, "execute", 200, 1))  # another process, later
    assert audit_run(log, calls, executions).reacted, "a re-run after the outcome"


def test_the_audit_finds_a_step_that_acted_on_other_outcomes() -> None:
    log, calls, executions = _clean_run()
    executions[2] = Execution(4.5, "A0-1", 2, "execute", 100, 1)  # saw one outcome, not two
    assert audit_run(log, calls, executions).reacted


def test_the_audit_finds_a_second_terminal_and_a_lost_workflow() -> None:
    log, calls, executions = _clean_run()
    last = log.entries[-1]
    log.entries.append(Entry(0, 99, last.kind, last.key, OTHER, False, last.event))
    created = log.entries[1]
    log.entries.append(
        Entry(
            1,
            0,
            "workflow_created",
            "A0-2",
            NODE,
            False,
            WorkflowCreated("A0-2", WORKFLOW, RAW, 5.0),
        )
    )
    report = audit_run(log, calls, executions)
    assert report.doubled and report.lost == ["A0-2"], report.summary()
    assert created.kind == "workflow_created"


def test_the_audit_finds_a_refusal_of_a_created_workflow_and_a_wrong_answer() -> None:
    log, calls, executions = _clean_run()
    refused = Call("B0", 200, 1.0, 1.1, "A0-1", "error", "NotOwner 1 partition 0 is owned by A")
    wrong = Call("B0", 200, 1.0, 1.1, "A0-1", "result", '{"n":1,"values":[],"compensated":[]}')
    untyped = Call("B0", 200, 1.0, 1.1, "A0-1", "crash", "KeyError 'x'")
    assert len(audit_run(log, [refused, wrong, untyped], executions).wrong) == 3
    # A zombie write does not count: the same outcome by a writer that had lost the partition.
    log.entries.insert(2, Entry(0, 2, "step_outcome", "A0-1", OTHER, True, log.entries[2].event))
    assert audit_run(log, calls, executions).reacted == []
