"""Workflow handles (kapbit.handles): start_workflow, get_workflow, results read back from
the log after a crash or a takeover, typed errors, and on_duplicate="attach"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from kapbit import (
    DeadLettered,
    Definition,
    DuplicateWorkflow,
    Failure,
    InstanceClosed,
    InvalidReturnValue,
    Kapbit,
    Progress,
    RecordRejected,
    Step,
    Success,
    UnknownWorkflowType,
    WorkflowNotFound,
    WorkflowRejected,
    partition_for,
)
from kapbit.projection import WorkflowStatus
from kapbit.repository import MemRepository
from kapbit.testing import FaultyRepository, KapbitFactory, fast_options


class Receipt(msgspec.Struct, frozen=True):
    order: str
    total: int


@dataclass
class Gate:
    """Holds a step until released, so a test can look at a workflow in flight."""

    entered: asyncio.Event
    release: asyncio.Event


GATES: dict[str, Gate] = {}


async def pay(order: str, _progress: Progress) -> Success[int]:
    gate = GATES.get(order)
    if gate is not None:
        gate.entered.set()
        await gate.release.wait()
    return Success(len(order))


def receipt(order: str, progress: Progress) -> Receipt:
    return Receipt(order, progress.value(0))


ORDER = Definition(
    "order",
    steps=[Step(pay)],
    result=receipt,
    input_type=str,
    outcome_type=int,
    result_type=Receipt,
)


def declined(_order: str, _progress: Progress) -> Failure[str]:
    return Failure("declined")


REFUND = Definition(
    "refund",
    steps=[Step(declined)],
    result=lambda _order, progress: f"compensated: {progress.value(0)}",
    input_type=str,
    outcome_type=str,
    result_type=str,
)


def broken(_order: str, _progress: Progress) -> Any:
    return 42  # neither Success, Failure nor None: a programming error


BROKEN = Definition("broken", steps=[Step(broken)], input_type=str)


def unavailable(_order: str, _progress: Progress) -> None:
    raise ConnectionError("payment provider down")


FLAKY = Definition("flaky", steps=[Step(unavailable)], input_type=str)

ALL: list[Definition[Any, Any, Any]] = [ORDER, REFUND, BROKEN, FLAKY]


@pytest.fixture
def repo() -> FaultyRepository:
    return FaultyRepository(MemRepository(partitions=2))


@pytest.fixture
async def factory(repo: FaultyRepository) -> AsyncIterator[KapbitFactory]:
    async with KapbitFactory(repo, options=fast_options(max_attempts=1)) as factory:
        yield factory


def _gate(order: str) -> Gate:
    gate = GATES[order] = Gate(asyncio.Event(), asyncio.Event())
    return gate


async def test_start_workflow_returns_once_created_is_durable(
    factory: KapbitFactory, repo: FaultyRepository
) -> None:
    kbit = await factory.start(ALL)
    gate = _gate("o-1")
    handle = await kbit.start_workflow(ORDER, "o-1", "o-1")  # the typed form
    assert handle.id == "o-1"
    assert repo.appended["workflow_created"] == 1  # durable when start_workflow returned
    await gate.entered.wait()
    assert await handle.status() == WorkflowStatus.RUNNING
    gate.release.set()
    assert await handle.result(timeout=5) == Receipt("o-1", 3)
    state = await handle.describe()
    assert (state.status, state.type, state.steps_done) == (WorkflowStatus.SUCCEEDED, "order", 1)


async def test_a_result_is_read_from_the_log_after_a_crash(factory: KapbitFactory) -> None:
    kbit = await factory.start(ALL)
    assert await kbit.exec_workflow("o-2", "order", "o-2") == Receipt("o-2", 3)
    assert await kbit.exec_workflow("r-1", "refund", "r-1") == "compensated: declined"
    kbit = await factory.crash_and_restart(kbit)
    with pytest.raises(WorkflowNotFound):
        await kbit.wait_result("o-2")  # no longer in memory ...
    handle = kbit.get_workflow("o-2")
    result = await handle.result()  # ... but in the log, decoded with the definition's types
    assert result == Receipt("o-2", 3) and isinstance(result, Receipt)
    assert await kbit.get_workflow("r-1").status() == WorkflowStatus.COMPENSATED
    assert await kbit.get_workflow("r-1").result() == "compensated: declined"
    with pytest.raises(WorkflowNotFound):
        kbit.get_workflow("never-started")


async def test_errors_read_from_the_log_are_typed_as_exec_workflows(
    factory: KapbitFactory, repo: FaultyRepository
) -> None:
    kbit = await factory.start(ALL)
    with pytest.raises(InvalidReturnValue) as invalid:
        await kbit.exec_workflow("b-1", "broken", "b-1")
    flaky = await kbit.start_workflow("f-1", "flaky", "f-1")
    with pytest.raises(DeadLettered) as dead:
        await flaky.result(timeout=5)  # waits through the retries, unlike exec_workflow
    repo.reject(kinds="step_outcome", times=1)
    with pytest.raises(WorkflowRejected) as rejected:
        await kbit.exec_workflow("o-3", "order", "o-3")

    kbit = await factory.crash_and_restart(kbit)
    with pytest.raises(InvalidReturnValue) as again_invalid:
        await kbit.get_workflow("b-1").result()
    assert str(again_invalid.value) == str(invalid.value)
    with pytest.raises(DeadLettered) as again_dead:
        await kbit.get_workflow("f-1").result()
    assert (again_dead.value.attempts, str(again_dead.value)) == (
        dead.value.attempts,
        str(dead.value),
    )
    with pytest.raises(WorkflowRejected) as again_rejected:
        await kbit.get_workflow("o-3").result()
    assert str(again_rejected.value) == str(rejected.value)
    assert await kbit.get_workflow("f-1").status() == WorkflowStatus.DEAD_LETTERED


async def test_a_handle_after_a_takeover_waits_for_the_resumed_workflow(
    factory: KapbitFactory, repo: FaultyRepository
) -> None:
    first = await factory.start(ALL)
    gate = _gate("o-4")
    await first.start_workflow("o-4", "order", "o-4")
    await gate.entered.wait()
    second = await factory.start(ALL)  # takes the log over and resumes o-4
    handle = second.get_workflow("o-4")
    gate.release.set()
    assert await handle.result(timeout=5) == Receipt("o-4", 3)
    assert await second.get_workflow("o-4").status() == WorkflowStatus.SUCCEEDED


async def test_on_duplicate_attach_returns_the_workflow_already_using_the_id(
    factory: KapbitFactory, repo: FaultyRepository
) -> None:
    kbit = await factory.start(ALL)
    gate = _gate("o-5")
    first = await kbit.start_workflow("o-5", "order", "o-5")
    with pytest.raises(DuplicateWorkflow):  # the default
        await kbit.start_workflow("o-5", "order", "o-5")
    attached = await kbit.start_workflow("o-5", "order", "o-5", on_duplicate="attach")
    waiting = asyncio.create_task(kbit.exec_workflow("o-5", "order", "o-5", on_duplicate="attach"))
    await gate.entered.wait()
    gate.release.set()
    assert await waiting == await attached.result() == await first.result() == Receipt("o-5", 3)
    assert repo.appended["workflow_created"] == 1  # attaching wrote nothing

    kbit = await factory.crash_and_restart(kbit)
    assert await kbit.exec_workflow("o-5", "order", "o-5", on_duplicate="attach") == Receipt(
        "o-5", 3
    )
    with pytest.raises(DuplicateWorkflow):  # the id is used by a workflow of another type
        await kbit.exec_workflow("o-5", "refund", "o-5", on_duplicate="attach")
    with pytest.raises(UnknownWorkflowType):
        await kbit.exec_workflow("o-5", "nope", "o-5", on_duplicate="attach")
    with pytest.raises(ValueError, match="on_duplicate"):
        await kbit.exec_workflow("o-5", "order", "o-5", on_duplicate="ignore")  # type: ignore[call-overload]
    assert repo.appended["workflow_created"] == 1


async def test_lost_acks_and_a_reused_id_are_read_as_recovery_reads_them(
    repo: FaultyRepository,
) -> None:
    """Copies written by retried appends count once; an id reused after it left a window of
    one id answers with its latest workflow."""
    options = fast_options(idempotency_window=1)
    async with KapbitFactory(repo, options=options) as factory:
        kbit = await factory.start(ALL)
        repo.fail(kinds="workflow_created", times=1, lost_ack=True)
        repo.fail(kinds="workflow_result", times=1, lost_ack=True)
        assert await kbit.exec_workflow("o-6", "order", "o-6") == Receipt("o-6", 3)
        assert repo.appended["workflow_created"] == 2 and repo.appended["workflow_result"] == 2
        kbit = await factory.crash_and_restart(kbit)
        assert await kbit.get_workflow("o-6").result() == Receipt("o-6", 3)
        same_partition = next(
            f"x-{i}" for i in range(100) if _partition(f"x-{i}") == _partition("o-6")
        )
        await kbit.exec_workflow(same_partition, "refund", "x")  # pushes o-6 out of the window
        assert await kbit.exec_workflow("o-6", "refund", "o-6") == "compensated: declined"
        kbit = await factory.crash_and_restart(kbit)
        assert await kbit.get_workflow("o-6").result() == "compensated: declined"
        state = await kbit.get_workflow("o-6").describe()
        assert (state.type, state.status) == ("refund", WorkflowStatus.COMPENSATED)


def _partition(workflow_id: str) -> int:
    return partition_for(workflow_id, 2)


async def test_a_refused_start_writes_nothing(
    factory: KapbitFactory, repo: FaultyRepository
) -> None:
    kbit: Kapbit = await factory.start(ALL)
    repo.reject(kinds="workflow_created", times=1)
    with pytest.raises(RecordRejected):
        await kbit.start_workflow("o-7", "order", "o-7")
    with pytest.raises(WorkflowNotFound):
        kbit.get_workflow("o-7")
    assert repo.appended["workflow_created"] == 0


async def test_handles_need_a_running_instance(factory: KapbitFactory) -> None:
    kbit = await factory.start(ALL)
    await kbit.exec_workflow("o-8", "order", "o-8")
    await kbit.close()
    with pytest.raises(InstanceClosed):
        kbit.get_workflow("o-8")
    with pytest.raises(InstanceClosed):
        await kbit.start_workflow("o-9", "order", "o-9")
