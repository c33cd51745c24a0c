"""Proofs of issue 13 against the real broker: calls for ids owned elsewhere, forwarded
through the request log while the group rebalances, and a graceful hand-over with work in
flight.

Three worker processes (:mod:`tests.group_worker`, ``--mix --forward``) share one topic and
keep a mixed load of calls in flight, three in four for ids whose partition another
instance owns: ``exec_workflow`` and ``start_workflow`` (then the handle's ``result()``) of
fresh ids, ``get_workflow(id).result()``, a kept handle's ``result()``, ``status()``,
``exec_workflow`` with ``on_duplicate="attach"`` and ``"raise"`` of ids whose creation was
acknowledged, and ``get_workflow`` of ids never created (:class:`tests.group_worker.Mixer`).
Meanwhile B is SIGKILLed and started again, then C is stopped gracefully while it
runs workflows mid-step (its instance closes under them, with a close timeout shorter than
a workflow). Every answer is checked against the log read back
(:func:`tests.group_worker.audit_answers`): the right result for its id, or a typed kapbit
error, never a wrong result, a result the log does not have, a refusal of something
written; and the log and the step journal against each other
(:func:`tests.group_worker.audit_run`): every workflow ends once, no step outcome is acted
on twice. The failover and hand-over times and the answers by kind are printed
(``pytest -s``).

The CI run makes one round; ``KAPBIT_FORWARD_PROOF_ROUNDS=5`` (or more) repeats the kill,
restart and stop cycle that many times, ``KAPBIT_FORWARD_PROOF_LOAD`` scales the results
each live worker gets between two faults.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.group_worker import Cluster, ScenarioReport, forward_under_rebalance

ROUNDS = int(os.environ.get("KAPBIT_FORWARD_PROOF_ROUNDS", "1"))
LOAD = int(os.environ.get("KAPBIT_FORWARD_PROOF_LOAD", "30"))
PARTITIONS = 6
#: Group session timeout: a SIGKILLed member's partitions move after about 1.5 x this.
SESSION = 2.0
#: Shorter than a SIGKILLed owner's failover, so calls waiting on it time out typed.
FORWARD_TIMEOUT = 2.5
#: Each step's own work: a workflow takes three to five of them.
STEP_DELAY = 0.2
#: Shorter than a workflow: a graceful stop leaves workflows mid-run to the new owners.
CLOSE_TIMEOUT = 0.3
#: Workflows C must run when it is stopped.
BUSY = 8
#: Seconds the live workers get to own every partition after a start, kill or stop.
SETTLE = 30.0


@pytest.fixture
async def cluster(kafka_bootstrap: str, topic: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(
        kafka_bootstrap,
        topic,
        tmp_path / "executions.log",
        partitions=PARTITIONS,
        group=f"{topic}-group",
        concurrency=16,
        step_delay=STEP_DELAY,
        session=SESSION,
        options=(
            "--mix",
            "--forward",
            "--close-now",
            "--forward-timeout",
            str(FORWARD_TIMEOUT),
            "--close-timeout",
            str(CLOSE_TIMEOUT),
        ),
    )
    try:
        yield cluster
    finally:
        cluster.abort()


async def test_forwarded_calls_during_rebalances_and_a_graceful_handover_in_flight(
    cluster: Cluster,
) -> None:
    report = await forward_under_rebalance(cluster, ROUNDS, LOAD, SETTLE, BUSY)
    print(f"forwarded calls under rebalances: {report.summary()}")
    _check(report, cluster)


def _check(report: ScenarioReport, cluster: Cluster) -> None:
    hung = [line for w in cluster.all_workers() for line in w.lines if line.startswith("hung")]
    assert hung == [], hung
    answers = report.answers
    assert answers.wrong == [], f"{answers.wrong[:20]}: {answers.summary()}"
    report.audit.assert_clean()
    # The load was what it claims: forwarded calls of every kind were answered with results.
    for op in ("exec", "started", "get", "handle", "attach", "status"):
        assert answers.count(op=op, route="remote", kind="result") > 0, answers.summary()
    assert answers.count(op="dup", route="remote", kind="DuplicateWorkflow") > 0
    assert answers.count(op="unknown", route="remote", kind="WorkflowNotFound") > 0
    assert answers.count(route="local", kind="result") > 0, answers.summary()
    assert len(report.failovers) == len(report.handovers) == ROUNDS, report.summary()
    # Each SIGKILL fell on B's partitions with workflows in flight; the others resumed them.
    for failover in report.failovers:
        assert failover.partitions > 0 and failover.claimed > 0, failover
        assert failover.workflows > 0, failover
    # C was stopped mid-run: its close timeout cut workflows the new owners resumed (every
    # workflow open on its partitions at the stop ended: the audit found none lost).
    for graceful in report.handovers:
        assert graceful.partitions > 0 and graceful.claimed > 0, graceful
        assert graceful.workflows > 0 and graceful.open >= graceful.workflows, graceful
