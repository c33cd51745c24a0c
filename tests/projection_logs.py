"""Logs for the read-side tests, written by real kapbit instances or by hand.

:func:`build_mixed_log` runs instances on a :class:`MemRepository` until its log holds every
way a workflow can go: successes, a compensation, a retry that succeeds, a dead letter, a
rejection, a zombie write of a fenced instance, and workflows left running, retrying and
compensating. ``EXPECTED`` is what the status read model must show for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from kapbit import (
    Backoff,
    DeadLettered,
    Definition,
    Failure,
    Fenced,
    JsonCodec,
    Kapbit,
    Options,
    Progress,
    RetryPolicy,
    Step,
    Success,
    WillRetryLater,
    WorkflowRejected,
)
from kapbit.cli import execute
from kapbit.events import (
    KIND_OF,
    ActiveWriter,
    DeadLetter,
    Event,
    Rejected,
    StepOutcome,
    WorkflowCreated,
    WorkflowResult,
    WorkflowRetry,
)
from kapbit.repository import MemRepository, Repository

TYPE = "order"
STEPS = 3
MAX_PAYLOAD = 4096


@dataclass
class Behaviour:
    """Steps scripted by the workflow input: ``plan["step:phase"]`` lists what each call
    does ("ok", "fail", "raise", "block", "big"); the last entry repeats. ``tag`` marks the
    values this instance's steps return, so a test can tell who wrote what."""

    tag: str
    calls: dict[tuple[str, int, str], int] = field(default_factory=lambda: defaultdict(int))
    entered: dict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    release: dict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))

    def action(self, step: int, phase: str) -> Any:
        async def act(input: dict[str, Any], progress: Progress) -> Any:
            wid = input["id"]
            key = (wid, step, phase)
            script = input.get("plan", {}).get(f"{step}:{phase}", ["ok"])
            what = script[min(self.calls[key], len(script) - 1)]
            self.calls[key] += 1
            if what == "raise":
                raise ConnectionError(f"{phase} {step} of {wid} unavailable")
            if what == "fail":
                return Failure(f"no-{step}")
            if what == "big":
                return Success("x" * (2 * MAX_PAYLOAD))
            if what == "block":
                self.entered[wid].set()
                await self.release[wid].wait()
            undo = "" if phase == "execute" else "undo-"
            return Success(f"{self.tag}-{undo}{step}")

        return act


def order_definition(behaviour: Behaviour) -> Definition:
    """A three-step order saga whose steps 0 and 1 compensate."""
    return Definition(
        TYPE,
        steps=[
            Step(
                behaviour.action(i, "execute"),
                behaviour.action(i, "compensate") if i < 2 else None,
                name=f"s{i}",
            )
            for i in range(STEPS)
        ],
        result=lambda input, progress: {
            "values": progress.values(),
            "compensated": [i for i, _ in progress.compensations],
        },
        input_type=dict[str, Any],
        outcome_type=str,
        result_type=dict[str, Any],
    )


def options(node: str) -> Options:
    """Tiny retry intervals and two attempts, so retries and dead letters are fast."""
    return Options(
        node_id=node,
        retry=RetryPolicy(fast=Backoff(initial=0.001, maximum=0.002, jitter=0.001), max_attempts=2),
        close_timeout=0.0,
    )


def order(wid: str, **plan: list[str]) -> dict[str, Any]:
    """An order input; ``plan`` keys are ``s<step>_<phase>``, e.g. ``s1_execute``."""
    return {
        "id": wid,
        "plan": {f"{k[1:].split('_')[0]}:{k.split('_')[1]}": v for k, v in plan.items()},
    }


#: What the status read model shows for the log of :func:`build_mixed_log`, by id:
#: (status, steps_done, failed_step, compensated_steps, attempts, result or None).
EXPECTED: dict[str, tuple[str, int, int | None, int, int, Any]] = {
    "ok-1": ("succeeded", 3, None, 0, 0, {"values": ["a-0", "a-1", "a-2"], "compensated": []}),
    "ok-2": ("succeeded", 3, None, 0, 0, {"values": ["a-0", "a-1", "a-2"], "compensated": []}),
    "comp-1": ("compensated", 2, 2, 2, 0, {"values": ["a-0", "a-1"], "compensated": [1, 0]}),
    "retry-1": ("succeeded", 3, None, 0, 1, {"values": ["a-0", "a-1", "a-2"], "compensated": []}),
    "dead-1": ("dead-lettered", 1, None, 0, 2, None),
    "rej-1": ("rejected", 0, None, 0, 0, None),
    "zomb-1": ("succeeded", 3, None, 0, 0, {"values": ["a-0", "b-1", "b-2"], "compensated": []}),
    "run-1": ("running", 1, None, 0, 0, None),
    "retrying-1": ("retrying", 0, None, 0, 1, None),
    "compensating-1": ("compensating", 1, 1, 0, 0, None),
}


@dataclass
class MixedLog:
    """The repository and what a test needs to know about its log."""

    repo: MemRepository
    zombie_offsets: list[tuple[int, int]]
    #: The writer ids of the two instances (``node-a/...``, ``node-b/...``).
    writer_a: str = ""
    writer_b: str = ""


async def build_mixed_log(partitions: int = 2) -> MixedLog:
    """Run two instances (the second fences the first) until the log holds ``EXPECTED``."""
    repo = MemRepository(partitions=partitions, max_payload=MAX_PAYLOAD)
    a = Behaviour("a")
    kbit_a = Kapbit([order_definition(a)], repo, options=options("node-a"))
    await kbit_a.start()
    await kbit_a.exec_workflow("ok-1", TYPE, order("ok-1"))
    await kbit_a.exec_workflow("ok-2", TYPE, order("ok-2"))
    await kbit_a.exec_workflow("comp-1", TYPE, order("comp-1", s2_execute=["fail"]))
    with pytest.raises(WillRetryLater):
        await kbit_a.exec_workflow("retry-1", TYPE, order("retry-1", s1_execute=["raise", "ok"]))
    await asyncio.wait_for(kbit_a.wait_result("retry-1"), 5)
    with pytest.raises(WillRetryLater):
        await kbit_a.exec_workflow("dead-1", TYPE, order("dead-1", s1_execute=["raise"]))
    with pytest.raises(DeadLettered):
        await asyncio.wait_for(kbit_a.wait_result("dead-1"), 5)
    with pytest.raises(WorkflowRejected):
        await kbit_a.exec_workflow("rej-1", TYPE, order("rej-1", s0_execute=["big"]))

    # zomb-1 blocks in step 1 on A; B takes over and resumes it (also blocking in step 1).
    zombie = asyncio.create_task(
        kbit_a.exec_workflow("zomb-1", TYPE, order("zomb-1", s1_execute=["block"]))
    )
    await asyncio.wait_for(a.entered["zomb-1"].wait(), 5)
    b = Behaviour("b")
    kbit_b = Kapbit([order_definition(b)], repo, options=options("node-b"))
    await kbit_b.start()
    await asyncio.wait_for(b.entered["zomb-1"].wait(), 5)
    before = {p: len(repo.records(p)) for p in range(partitions)}
    a.release["zomb-1"].set()  # A writes step 1's outcome: a zombie write, then Fenced
    with pytest.raises(Fenced):
        await asyncio.wait_for(zombie, 5)
    zombies = [
        (p, r.offset)
        for p in range(partitions)
        for r in repo.records(p)[before[p] :]
        if r.node == kbit_a.writer_id
    ]
    assert zombies, "the fenced instance left no zombie record"
    b.release["zomb-1"].set()
    await asyncio.wait_for(kbit_b.wait_result("zomb-1"), 5)

    # Workflows left in flight on B: running, retrying, compensating.
    running = asyncio.create_task(
        kbit_b.exec_workflow("run-1", TYPE, order("run-1", s1_execute=["block"]))
    )
    compensating = asyncio.create_task(
        kbit_b.exec_workflow(
            "compensating-1",
            TYPE,
            order("compensating-1", s1_execute=["fail"], s0_compensate=["block"]),
        )
    )
    with pytest.raises(WillRetryLater):
        await kbit_b.exec_workflow(
            "retrying-1", TYPE, order("retrying-1", s0_execute=["raise", "block"])
        )
    for wid in ("run-1", "compensating-1", "retrying-1"):
        await asyncio.wait_for(b.entered[wid].wait(), 5)
    await kbit_b.close(timeout=0)
    for task in (running, compensating):
        with contextlib.suppress(Exception):
            await task
    await kbit_a.close()
    return MixedLog(repo, zombies, kbit_a.writer_id, kbit_b.writer_id)


# --- hand-made records -------------------------------------------------------------------------

CODEC = JsonCodec()


def raw(value: Any) -> msgspec.Raw:
    return msgspec.Raw(CODEC.encode(value))


async def append(repo: MemRepository, partition: int, node: str, event: Event) -> int:
    """Append ``event`` as written by ``node``; a zombie write lands and its Fenced is eaten."""
    value = CODEC.encode(event)
    try:
        if isinstance(event, ActiveWriter):
            return await repo.claim(partition, node, value)
        return await repo.append(partition, KIND_OF[type(event)], event.id, node, value)
    except Fenced:
        return len(repo.records(partition)) - 1


def created(wid: str, at: float = 1000.0, type: str = TYPE, input: Any = None) -> Event:
    return WorkflowCreated(wid, type, raw(input if input is not None else {"id": wid}), at)


def outcome(wid: str, step: int, phase: str = "execute", success: bool = True) -> Event:
    return StepOutcome(wid, step, phase, success, raw(f"v-{step}-{phase}"))  # type: ignore[arg-type]


def result(wid: str, value: Any = "done", compensated: bool = False) -> Event:
    return WorkflowResult(wid, raw(value), compensated, 2000.0)


def retry(wid: str, attempt: int) -> Event:
    return WorkflowRetry(wid, attempt, f"error {attempt}", 1500.0)


def dead(wid: str, attempts: int) -> Event:
    return DeadLetter(wid, attempts, "gave up", 3000.0)


def rejected(wid: str) -> Event:
    return Rejected(wid, "step_outcome", "too large", 3000.0)


def writer(node: str) -> Event:
    return ActiveWriter(node, 1.0)


async def cli(*argv: str, repo: Repository | None = None) -> tuple[int, str, str]:
    """Run the ``kapbit`` command line on ``repo``: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = await execute(list(argv), repository=repo, out=out, err=err)
    return code, out.getvalue(), err.getvalue()
