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

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.group_worker import (
    Cluster,
    audit_run,
    handover,
    read_executions,
    settled_log,
)

ROUNDS_ENV = "KAPBIT_GROUP_PROOF_ROUNDS"
LOAD_ENV = "KAPBIT_GROUP_PROOF_LOAD"
ROUNDS = int(os.environ.get(ROUNDS_ENV, "1"))
#: Results each live worker gets between two faults.
LOAD = int(os.environ.get(LOAD_ENV, "30"))
PARTITIONS = 6


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
