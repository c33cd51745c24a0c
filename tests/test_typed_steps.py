"""Issue 11: declared types checked on the first run, what a step knows, how it fails.

Values are checked against the declared types when they are written; sync actions run in
a thread pool; actions read ``kapbit.context()``; ``StepRetry``, ``NonRetryable`` and step
timeouts decide between retrying and failing the step.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from typing import Any

import msgspec
import pybreaker
import pytest

from kapbit import (
    Backoff,
    Definition,
    EncodeError,
    Failure,
    InvalidDefinition,
    InvalidInput,
    InvalidReturnValue,
    Kapbit,
    NonRetryable,
    NoStepContext,
    Options,
    Progress,
    Step,
    StepContext,
    StepRetry,
    Success,
    WillRetryLater,
    WorkflowRefused,
    context,
)
from kapbit.events import InvalidReturn, StepOutcome, WorkflowCreated, WorkflowRetry
from kapbit.repository import MemRepository
from kapbit.testing import KapbitFactory
from tests.helpers import fast_options, log_events

TINY = Backoff(initial=0.001, maximum=0.002, jitter=0.001)


@dataclass(frozen=True)
class Order:
    order_id: str
    amount_cents: int


class Receipt(msgspec.Struct, frozen=True):
    status: str


def events_of(repo: MemRepository, kind: type[Any]) -> list[Any]:
    return [event for _, _, event in log_events(repo) if isinstance(event, kind)]


# --- declared types are checked when values are written ------------------------------------


async def test_a_step_returning_the_wrong_type_fails_on_the_first_run_and_never_again() -> None:
    """Issue 11: a definition whose step returns another type than declared ran fine, and
    the next instance refused to start (CorruptRecord). Now the first run ends the workflow
    with InvalidReturn naming the step and both types; the side effect ran once, and the
    next instance starts and does not run it again."""
    charged: list[str] = []

    def reserve(order: Order, _progress: Progress) -> Success[str]:
        return Success("reserved")

    def charge(order: Order, _progress: Progress) -> Success[Any]:
        charged.append(order.order_id)
        return Success({"payment": 42})  # declared: str

    def undo(order: Order, _progress: Progress) -> Success[str]:
        raise AssertionError("a programming error is not compensated")

    order = Definition(
        "order",
        [Step(reserve, undo, name="reserve"), Step(charge, name="charge")],
        input_type=Order,
        outcome_type=str,
    )
    repo = MemRepository()
    async with Kapbit([order], repo, options=fast_options()) as kbit:
        with pytest.raises(InvalidReturnValue) as raised:
            await kbit.exec_workflow(order, "o-1", Order("o-1", 100))
    error = raised.value
    assert (error.step, error.phase, error.declared, error.actual) == (
        1,
        "execute",
        "str | None",
        "dict",
    )
    assert "'charge'" in error.reason and "dict" in error.reason and "str" in error.reason
    terminal = events_of(repo, InvalidReturn)
    assert [(e.step, e.phase) for e in terminal] == [(1, "execute")]
    assert "'charge'" in terminal[0].reason
    assert [e.step for e in events_of(repo, StepOutcome)] == [0]  # the bad value is not logged

    async with Kapbit([order], repo, options=fast_options()) as kbit:
        assert kbit.stats.recovered == 0
    assert charged == ["o-1"]


async def test_a_result_of_the_wrong_type_ends_the_workflow_naming_the_result_builder() -> None:
    definition = Definition(
        "w",
        [Step(lambda i, p: Success("x"))],
        result=lambda i, p: 42,  # type: ignore[arg-type, return-value]
        outcome_type=str,
        result_type=Receipt,
    )
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options()) as kbit:
        with pytest.raises(InvalidReturnValue) as raised:
            await kbit.exec_workflow("w-1", "w", None)
    assert raised.value.step == -1 and raised.value.declared == "Receipt"
    assert "result builder" in raised.value.reason
    assert [e.step for e in events_of(repo, InvalidReturn)] == [-1]


async def test_values_are_kept_as_read_back_so_a_restart_sees_the_same() -> None:
    """The input and outcome values the actions see are the decoded ones, as after a
    restart; None (a bare return) is allowed whatever the outcome type."""
    seen: list[Any] = []

    def first(order: Order, _progress: Progress) -> None:
        seen.append(order)

    def second(order: Order, progress: Progress) -> Success[str]:
        seen.append(progress.value(0))
        return Success("ok")

    definition = Definition("w", [Step(first), Step(second)], input_type=Order, outcome_type=str)
    async with Kapbit([definition], MemRepository(), options=fast_options()) as kbit:
        given = {"order_id": "o-1", "amount_cents": 5}  # reads back as an Order
        assert await kbit.exec_workflow("w-1", "w", given) == [None, "ok"]
    assert seen == [Order("o-1", 5), None]


@pytest.mark.parametrize("given", [42, "o-1", {"order_id": "o-1"}, object()])
async def test_an_input_of_the_wrong_type_is_refused_and_nothing_is_written(given: Any) -> None:
    definition = Definition(
        "order", [Step(lambda o, p: Success("x"))], input_type=Order, outcome_type=str
    )
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options()) as kbit:
        with pytest.raises(InvalidInput) as raised:
            await kbit.exec_workflow(definition, "o-1", given)
        assert raised.value.declared == "Order"
        assert raised.value.actual == type(given).__qualname__
        assert isinstance(raised.value, WorkflowRefused) and isinstance(raised.value, EncodeError)
        assert await kbit.exec_workflow(definition, "o-1", Order("o-1", 1)) == ["x"]
    assert len(events_of(repo, WorkflowCreated)) == 1


def test_a_declared_type_the_codecs_cannot_decode_is_refused_at_definition() -> None:
    @dataclass
    class Holder:
        conn: socket.socket

    with pytest.raises(InvalidDefinition, match=r"input_type .*Holder.* cannot be decoded"):
        Definition("w", [Step(lambda i, p: None)], input_type=Holder)
    with pytest.raises(InvalidDefinition, match=r"outcome_type .*socket"):
        Step(lambda i, p: None, outcome_type=socket.socket)
    with pytest.raises(InvalidDefinition, match="result_type"):
        Definition("w", [Step(lambda i, p: None)], result_type=list[socket.socket])


async def test_a_definition_not_registered_under_its_name_is_refused() -> None:
    registered = Definition("w", [Step(lambda i, p: Success(1))])
    other = Definition("w", [Step(lambda i, p: Success(2))])
    repo = MemRepository()
    async with Kapbit([registered], repo, options=fast_options()) as kbit:
        with pytest.raises(WorkflowRefused, match="not the one registered"):
            await kbit.exec_workflow(other, "w-1", None)
        assert await kbit.exec_workflow(registered, "w-1", None) == [1]


# --- sync actions run in a thread pool; context -----------------------------------------------


async def test_blocking_sync_actions_of_four_workflows_run_at_the_same_time() -> None:
    """Four workflows whose sync step blocks until all four are inside it: on the event
    loop the first would block alone until the barrier times out."""
    barrier = threading.Barrier(4, timeout=10)
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def blocking(_input: Any, _progress: Progress) -> Success[int]:
        threads.append(threading.get_ident())
        return Success(barrier.wait())

    async def on_loop(_input: Any, _progress: Progress) -> Success[bool]:
        return Success(threading.get_ident() == loop_thread)

    definition = Definition("w", [Step(blocking), Step(on_loop)])
    async with Kapbit([definition], MemRepository(), options=fast_options()) as kbit:
        results = await asyncio.gather(
            *(kbit.exec_workflow(definition, f"w-{i}", None) for i in range(4))
        )
    assert sorted(r[0] for r in results) == [0, 1, 2, 3]  # each passed the barrier
    assert all(r[1] is True for r in results)  # async actions stay on the loop
    assert loop_thread not in threads


async def test_a_given_executor_runs_the_sync_actions() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="mine") as executor:

        def where(_input: Any, _progress: Progress) -> Success[str]:
            return Success(threading.current_thread().name)

        definition = Definition("w", [Step(where)])
        options = fast_options(action_executor=executor)
        async with Kapbit([definition], MemRepository(), options=options) as kbit:
            [name] = await kbit.exec_workflow(definition, "w-1", None)
        assert name.startswith("mine")
        assert executor.submit(lambda: 1).result() == 1  # not shut down by kapbit


async def test_actions_read_their_context_in_threads_and_on_the_loop() -> None:
    seen: list[StepContext] = []

    def sync_step(_input: Any, _progress: Progress) -> None:
        seen.append(context())

    async def async_step(_input: Any, _progress: Progress) -> Failure[str]:
        seen.append(context())
        return Failure("no")

    async def undo(_input: Any, _progress: Progress) -> None:
        seen.append(context())

    definition = Definition("ctx", [Step(sync_step, undo, name="first"), Step(async_step)])
    kbit = Kapbit([definition], MemRepository(), options=fast_options(node_id="node-a"))
    async with kbit:
        await kbit.exec_workflow(definition, "w-1", None)
    assert [(c.step_name, c.step_index, c.phase) for c in seen] == [
        ("first", 0, "execute"),
        ("async_step", 1, "execute"),
        ("first", 0, "compensate"),
    ]
    assert {(c.workflow_id, c.workflow_type, c.attempt, c.node_id) for c in seen} == {
        ("w-1", "ctx", 1, "node-a")
    }
    with pytest.raises(NoStepContext):
        context()


# --- NonRetryable, StepRetry, timeouts ---------------------------------------------------------


def _saga(execute: Any, **step: Any) -> tuple[Definition[Any, Any, Any], list[str]]:
    undone: list[str] = []

    def reserve(_input: Any, _progress: Progress) -> Success[str]:
        return Success("reserved")

    def release(_input: Any, _progress: Progress) -> Success[str]:
        undone.append("released")
        return Success("released")

    definition = Definition(
        "saga",
        [Step(reserve, release, name="reserve"), Step(execute, name="pay", **step)],
        result=lambda _input, progress: [o.value for _, o in progress.executions],
        outcome_type=str,
    )
    return definition, undone


async def test_non_retryable_fails_the_step_and_the_saga_compensates_without_a_policy() -> None:
    calls: list[int] = []

    def pay(_input: Any, _progress: Progress) -> Success[str]:
        calls.append(1)
        raise NonRetryable("card expired")

    definition, undone = _saga(pay)
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options()) as kbit:
        assert await kbit.exec_workflow(definition, "w-1", None) == ["reserved", "card expired"]
        assert kbit.stats.compensated == 1 and kbit.stats.retried == 0
    assert calls == [1] and undone == ["released"]
    assert events_of(repo, WorkflowRetry) == []


async def test_step_retry_retries_in_place_recording_each_attempt() -> None:
    attempts: list[int] = []

    async def pay(_input: Any, _progress: Progress) -> Success[str]:
        attempts.append(context().attempt)
        if len(attempts) < 3:
            raise ConnectionError("payment service unavailable")
        return Success("paid")

    definition, undone = _saga(pay, retry=StepRetry(max_attempts=3, backoff=TINY))
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options()) as kbit:
        assert await kbit.exec_workflow(definition, "w-1", None) == ["reserved", "paid"]
    assert attempts == [1, 2, 3] and undone == []
    retries = events_of(repo, WorkflowRetry)
    assert [r.attempt for r in retries] == [1, 2]
    assert all("payment service unavailable" in r.error for r in retries)


async def test_step_retry_gives_up_with_a_failure_and_the_saga_compensates() -> None:
    def pay(_input: Any, _progress: Progress) -> Success[str]:
        raise ConnectionError("down")

    definition, undone = _saga(pay, retry=StepRetry(max_attempts=2, backoff=TINY))
    async with Kapbit([definition], MemRepository(), options=fast_options()) as kbit:
        result = await kbit.exec_workflow(definition, "w-1", None)
    assert result[0] == "reserved"
    assert result[1] == "gave up after 2 attempts: ConnectionError: down"
    assert undone == ["released"]


async def test_a_listed_error_fails_the_step_at_once_and_a_breaker_error_goes_to_the_worker() -> (
    None
):
    class Declined(Exception):
        pass

    calls: list[str] = []

    def pay(input: str, _progress: Progress) -> Success[str]:
        calls.append(input)
        if input == "declined":
            raise Declined("card declined")
        raise pybreaker.CircuitBreakerError("payments breaker open")

    policy = StepRetry(max_attempts=5, backoff=TINY, non_retryable=(Declined,))
    definition, undone = _saga(pay, retry=policy)
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options(max_attempts=1)) as kbit:
        result = await kbit.exec_workflow(definition, "w-1", "declined")
        assert result == ["reserved", "Declined: card declined"]
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow(definition, "w-2", "breaker")
    assert calls.count("declined") == 1 and undone == ["released"]


async def test_an_overrunning_async_action_is_cancelled_and_the_log_names_the_timeout() -> None:
    cancelled = asyncio.Event()

    async def pay(_input: Any, _progress: Progress) -> Success[str]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Success("never")

    definition, _ = _saga(pay, timeout=0.01)
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options(max_attempts=2)) as kbit:
        with pytest.raises(WillRetryLater, match=r"timed out after 0\.01 s"):
            await kbit.exec_workflow(definition, "w-1", None)
        assert cancelled.is_set()
        with pytest.raises(Exception, match="dead-lettered"):
            await kbit.wait_result("w-1", timeout=5)
    retries = events_of(repo, WorkflowRetry)
    assert retries and all("'pay' (execute) timed out after 0.01 s" in r.error for r in retries)


async def test_a_sync_action_that_overruns_has_its_late_result_discarded() -> None:
    release = threading.Event()
    first_started = threading.Event()
    runs: list[int] = []

    def pay(_input: Any, _progress: Progress) -> Success[str]:
        runs.append(1)
        if len(runs) == 1:
            first_started.set()
            release.wait(10)
            return Success("late")
        return Success("in time")

    definition, _ = _saga(pay, timeout=0.05, retry=StepRetry(max_attempts=2, backoff=TINY))
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options()) as kbit:
        result = await kbit.exec_workflow(definition, "w-1", None)
        release.set()
    assert first_started.is_set() and result == ["reserved", "in time"]
    outcomes = [e for e in events_of(repo, StepOutcome) if e.step == 1]
    assert len(outcomes) == 1 and bytes(outcomes[0].value) == b'"in time"'


async def test_step_attempts_keep_counting_across_a_restart() -> None:
    """Retries are WorkflowRetry events: after a crash the step goes on from the recorded
    count, and it never runs more than max_attempts times."""
    attempts: list[int] = []
    holding = asyncio.Event()

    async def pay(_input: Any, _progress: Progress) -> Success[str]:
        attempts.append(context().attempt)
        if len(attempts) == 2:
            holding.set()
            await asyncio.Event().wait()  # the process dies here
        raise ConnectionError("down")

    definition, undone = _saga(pay, retry=StepRetry(max_attempts=3, backoff=TINY))
    factory = KapbitFactory(MemRepository(), options=fast_options())
    try:
        kbit = await factory.start([definition])
        call = asyncio.create_task(kbit.exec_workflow(definition, "w-1", None))
        await asyncio.wait_for(holding.wait(), 5)
        kbit = await factory.crash_and_restart(kbit)
        await asyncio.gather(call, return_exceptions=True)
        result = await kbit.wait_result("w-1", timeout=5)
    finally:
        await factory.close()
    assert attempts == [1, 2, 3]
    assert result == ["reserved", "gave up after 3 attempts: ConnectionError: down"]
    assert undone == ["released"]


def test_step_options_are_validated() -> None:
    with pytest.raises(InvalidDefinition, match="timeout must be a positive number"):
        Step(lambda i, p: None, timeout=0)
    with pytest.raises(InvalidDefinition, match="retry must be a StepRetry"):
        Step(lambda i, p: None, retry=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts"):
        StepRetry(max_attempts=0)
    with pytest.raises(ValueError, match="exception types"):
        StepRetry(non_retryable=("x",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="action_threads"):
        Options(action_threads=0)


async def test_the_log_reads_back_with_the_public_event_types() -> None:
    """kapbit.events documents how to read a record: decode its value as its kind's type."""
    from kapbit import JsonCodec
    from kapbit.events import EVENT_TYPES, EventKind, StepOutcome, WorkflowResult

    definition = Definition("w", [Step(lambda i, p: Success(i * 2))], input_type=int)
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options()) as kbit:
        assert await kbit.exec_workflow(definition, "w-1", 21) == [42]
    codec = JsonCodec()
    events = [
        codec.decode(record.value, EVENT_TYPES[EventKind(record.kind)]) for record in repo.records()
    ]
    assert [type(e).__name__ for e in events][1:] == [
        "WorkflowCreated",
        "StepOutcome",
        "WorkflowResult",
    ]
    outcome, result = events[2], events[3]
    assert isinstance(outcome, StepOutcome) and codec.decode(outcome.value, int) == 42
    assert isinstance(result, WorkflowResult) and codec.decode(result.result, list[int]) == [42]
    assert codec.decode(events[1].input, int) == 21


async def test_a_definition_given_in_the_string_form_order_is_refused_clearly() -> None:
    definition = Definition("w", [Step(lambda i, p: Success(1))])
    repo = MemRepository()
    async with Kapbit([definition], repo, options=fast_options()) as kbit:
        with pytest.raises(WorkflowRefused, match="the definition goes first"):
            await kbit.exec_workflow("w-1", definition, None)  # type: ignore[call-overload]
    assert events_of(repo, WorkflowCreated) == []


async def test_both_forms_take_keywords_as_the_old_signature_did() -> None:
    definition = Definition("w", [Step(lambda i, p: Success(i))], input_type=int)
    async with Kapbit([definition], MemRepository(), options=fast_options()) as kbit:
        assert await kbit.exec_workflow(workflow_id="a", workflow_type="w", input=1) == [1]
        assert await kbit.exec_workflow("b", "w", input=2) == [2]
        assert await kbit.exec_workflow(definition, workflow_id="c", input=3) == [3]
        assert await kbit.exec_workflow(workflow=definition, workflow_id="d", input=4) == [4]
        with pytest.raises(InvalidInput, match="got NoneType"):
            await kbit.exec_workflow("e", "w")  # the string form's default input: None
        with pytest.raises(TypeError):
            await kbit.exec_workflow("f", "w", 1, 2)  # type: ignore[call-overload]
