"""Defects the model-based checker (tests/test_model_checker.py) found beyond the ones
issue 10 lists, each as a plain reproduction. They fail until the defect is fixed."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

from kapbit import (
    Definition,
    Kapbit,
    KapbitError,
    Options,
    Progress,
    RecordRejected,
    Sleep,
    Step,
    Success,
    WorkflowRejected,
)
from kapbit.events import TERMINAL_KINDS
from kapbit.projection import Projector, StatusModel, WorkflowStatus
from kapbit.repository import MemRepository
from kapbit.testing import FaultyRepository, ManualClock
from tests.helpers import fast_options, kinds, wait_until


async def test_projector_shows_the_new_workflow_of_an_id_used_again(tmp_path: Path) -> None:
    """The engine accepts an id again once ``idempotency_window`` newer workflows were
    created in its partition; the projector, with ``dedup_window`` below that window as
    its docstring asks, must then show the new workflow, not keep the old row."""
    release = asyncio.Event()

    async def step(input: dict[str, Any], progress: Progress) -> Success[str]:
        if input["block"]:
            await release.wait()
        return Success(input["tag"])

    saga = Definition("saga", [Step(step)], input_type=dict[str, Any])
    repo = MemRepository(partitions=1)
    async with Kapbit([saga], repo, options=Options(idempotency_window=2)) as kbit:
        assert await kbit.exec_workflow("a", "saga", {"tag": "first", "block": False}) == ["first"]
        # Two newer workflows push "a" out of the window; they stay open.
        others = [
            asyncio.create_task(kbit.exec_workflow(i, "saga", {"tag": i, "block": True}))
            for i in ("b", "c")
        ]
        await wait_until(lambda: kbit.stats.in_flight == 2)
        assert await kbit.exec_workflow("a", "saga", {"tag": "second", "block": False}) == [
            "second"
        ]
        release.set()
        await asyncio.gather(*others)

    async with (
        StatusModel(tmp_path / "status.sqlite3") as model,
        Projector(repo, model, definitions=[saga], idempotency_window=2) as projector,
    ):
        await projector.catch_up()
        row = await model.get("a")
    assert row is not None
    assert row.status == WorkflowStatus.SUCCEEDED
    assert row.result_value() == ["second"], row


async def test_created_landed_then_its_retry_refused_the_workflow_still_finishes() -> None:
    """The ack of a ``WorkflowCreated`` is lost (the record landed) and the emitter's retry
    is refused: the workflow is in the log, so it must finish and the instance must know
    it, not tell the caller "nothing was written" and drop it."""
    calls: list[str] = []

    def step(input: str, progress: Progress) -> Success[str]:
        calls.append(input)
        return Success(input)

    saga = Definition("saga", [Step(step)], input_type=str)
    repo = MemRepository(partitions=1)
    faulty = FaultyRepository(repo)
    faulty.fail(times=1, kinds="workflow_created", lost_ack=True)
    faulty.reject(times=1, kinds="workflow_created")
    async with Kapbit([saga], faulty, options=fast_options()) as kbit:
        try:
            answer: Any = await kbit.exec_workflow("a", "saga", "x")
        except KapbitError as error:
            answer = error
        assert kinds(repo, "a")[0] == "workflow_created"  # it was written
        assert not isinstance(answer, RecordRejected), f"told nothing was written: {answer!r}"
        assert await kbit.wait_result("a", timeout=2) == ["x"]
    assert calls == ["x"]


async def test_result_landed_then_its_retry_refused_one_terminal_event() -> None:
    """The ack of a ``WorkflowResult`` is lost (the record landed) and the emitter's retry
    is refused: the workflow has ended with that result, so no ``Rejected`` may follow it
    and the caller gets the result the log holds."""

    def step(input: str, progress: Progress) -> Success[str]:
        return Success(input)

    saga = Definition("saga", [Step(step)], input_type=str)
    repo = MemRepository(partitions=1)
    faulty = FaultyRepository(repo)
    faulty.fail(times=1, kinds="workflow_result", lost_ack=True)
    faulty.reject(times=1, kinds="workflow_result")
    async with Kapbit([saga], faulty, options=fast_options()) as kbit:
        try:
            answer: Any = await kbit.exec_workflow("a", "saga", "x")
        except KapbitError as error:
            answer = error
    terminals = [k for k in kinds(repo, "a") if k in ("workflow_result", "rejected")]
    assert terminals == ["workflow_result"], kinds(repo, "a")
    assert answer == ["x"]


async def test_rejected_refused_twice_caller_and_log_agree() -> None:
    """A step's outcome is too large and the storage refuses the ``Rejected`` records that
    follow too: the workflow must still end with a terminal event in the log, as the
    caller is told (else the next instance resumes it and runs the step again)."""

    def step(input: str, progress: Progress) -> Success[str]:
        return Success("x" * 1500)

    saga = Definition("saga", [Step(step)], input_type=str)
    repo = MemRepository(partitions=1, max_payload=1024)
    faulty = FaultyRepository(repo)
    faulty.reject(times=2, kinds="rejected")
    async with Kapbit([saga], faulty, options=fast_options()) as kbit:
        try:
            answer: Any = await asyncio.wait_for(kbit.exec_workflow("a", "saga", "x"), 5)
        except KapbitError as error:
            answer = error
    assert isinstance(answer, WorkflowRejected), answer
    assert set(kinds(repo, "a")) & TERMINAL_KINDS, kinds(repo, "a")


async def test_a_sleeping_workflow_out_of_the_window_is_still_sleeping_to_its_handle() -> None:
    """T1: with an idempotency window of 1, a newer workflow pushes a sleeping one's id out
    of the window; its handle must still read it from the log (sleeping, its step done),
    before and after a restart, not answer "running" with nothing done."""
    clock = ManualClock()

    async def nap(input: str, progress: Progress) -> Sleep[str]:
        return Sleep(timedelta(hours=1), f"{input} napped")

    async def wake(input: str, progress: Progress) -> Success[str]:
        return Success(f"{input} woke")

    saga = Definition("saga", [Step(nap), Step(wake)], input_type=str, outcome_type=str)
    repo = MemRepository(partitions=1)
    options = fast_options(clock=clock, idempotency_window=1, node_id="a")
    async with Kapbit([saga], repo, options=options) as kbit:
        first = await kbit.start_workflow(saga, "first", "first")
        await kbit.start_workflow(saga, "second", "second")  # "first" leaves the window
        await wait_until(lambda: kbit.stats.sleeping == 2)
        state = await first.describe()
        assert (state.status, state.steps_done) == (WorkflowStatus.SLEEPING, 1), state
        assert state.created_offset >= 0
    options = fast_options(clock=clock, idempotency_window=1, node_id="b")
    async with Kapbit([saga], repo, options=options) as kbit:
        assert kbit.stats.sleeping == 2
        handle = kbit.get_workflow("first")
        assert await handle.status() == WorkflowStatus.SLEEPING
        clock.advance(3600)
        assert await handle.result(timeout=5) == ["first napped", "first woke"]
