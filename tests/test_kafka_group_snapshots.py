"""Snapshot checkpoints in group mode on the real broker.

A group member runs workflows on a 2-partition topic, leaving one open in each partition,
and leaves gracefully: its last checkpoints carry snapshots of both partitions (past the
open workflows). A new member of the group is assigned both, recovers each from its
snapshot reading no record of the log, and resumes each open workflow once, from the step
after the last one persisted. Then it snapshots the partitions it owns itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from kapbit import (
    CheckpointPolicy,
    Definition,
    GroupOptions,
    Kapbit,
    Options,
    Step,
    Success,
    partition_for,
)
from kapbit.repository.kafka import KafkaRepository

PARTITIONS = 2
SESSION = 2.0
FINISHED = 150
_CLAIMED = re.compile(r"claimed partition (\d+): (\d+) workflows resumed, (\d+) records read")


def _definition(calls: list[tuple[str, int]], hold: asyncio.Event | None) -> Definition:
    """Two steps; the second of an ``open-*`` workflow waits for ``hold`` (if given)."""

    def step(index: int) -> Any:
        async def act(input: str, progress: Any) -> Any:
            calls.append((input, index))
            if index == 1 and hold is not None and input.startswith("open-"):
                await hold.wait()
            return Success(index)

        return act

    return Definition(
        "pair", steps=[Step(step(0), name="a"), Step(step(1), name="b")], input_type=str
    )


def _member(
    bootstrap: str, topic: str, name: str, calls: list[tuple[str, int]], hold: asyncio.Event | None
) -> Kapbit:
    return Kapbit(
        [_definition(calls, hold)],
        KafkaRepository(bootstrap, topic, partitions=PARTITIONS),
        options=Options(
            node_id=name,
            close_timeout=0.2,
            start_timeout=30.0,
            checkpoints=CheckpointPolicy(every=50, interval=3600.0, snapshot_after=0),
        ),
        group=GroupOptions(
            name=f"{topic}-group",
            endpoint=f"{name}:80",
            session_timeout=SESSION,
            heartbeat_interval=0.1,
        ),
    )


def _open_ids() -> list[str]:
    """One ``open-*`` id per partition."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < PARTITIONS:
        found.setdefault(partition_for(f"open-{n}", PARTITIONS), f"open-{n}")
        n += 1
    return [found[p] for p in range(PARTITIONS)]


async def test_a_member_taking_over_recovers_each_partition_from_its_snapshot(
    kafka_bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    a_calls: list[tuple[str, int]] = []
    a = _member(kafka_bootstrap, topic, "a", a_calls, asyncio.Event())
    await a.start()
    open_ids = _open_ids()
    try:
        stuck = [asyncio.create_task(a.exec_workflow(w, "pair", w)) for w in open_ids]
        for i in range(FINISHED):
            await a.exec_workflow(f"done-{i}", "pair", f"done-{i}")
        assert {(w, 1) for w in open_ids} <= set(a_calls)
        assert a.stats.snapshot_bytes > 0  # snapshots were taken while it ran
    finally:
        await a.close(timeout=0)  # the open workflows stay open; the last save snapshots
    await asyncio.gather(*stuck, return_exceptions=True)

    b_calls: list[tuple[str, int]] = []
    b = _member(kafka_bootstrap, topic, "b", b_calls, None)
    with caplog.at_level(logging.INFO, "kapbit"):
        await b.start()
    try:
        claimed = {
            int(m[1]): (int(m[2]), int(m[3]))
            for m in (_CLAIMED.search(r.getMessage()) for r in caplog.records)
            if m
        }
        # each partition: its open workflow resumed, not one record of the log read
        assert claimed == {p: (1, 0) for p in range(PARTITIONS)}
        for workflow_id in open_ids:
            assert await b.wait_result(workflow_id, timeout=10) == [0, 1]
        assert sorted(b_calls) == sorted((w, 1) for w in open_ids)  # step 0 not re-run
        for i in range(FINISHED, FINISHED + 60):
            await b.exec_workflow(f"done-{i}", "pair", f"done-{i}")
    finally:
        await b.close()
    assert b.stats.snapshot_bytes > 0  # and it snapshots what it owns

    repo = KafkaRepository(kafka_bootstrap, topic, partitions=PARTITIONS)
    await repo.start()
    try:
        checkpoints = await repo.load_checkpoints()
        for partition in range(PARTITIONS):
            checkpoint = checkpoints[partition]
            assert checkpoint.anchor_writer == b.writer_id
            assert checkpoint.snapshot_offset == await repo.end_offset(partition)
    finally:
        await repo.close()
