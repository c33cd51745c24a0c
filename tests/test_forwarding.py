"""Forwarded calls (kapbit.forwarding) on the in-memory log: a caller that does not own an
id's partition gets the owner's answers, with local semantics; answers given by a session
that lost the partition never count; a request served twice is answered the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from kapbit import (
    Definition,
    DuplicateWorkflow,
    InvalidReturnValue,
    Kapbit,
    Progress,
    RequestTimedOut,
    Step,
    Success,
    TooManyWorkflows,
    TransientStorageError,
    UnknownWorkflowType,
    WillRetryLater,
    WorkflowNotFound,
    WorkflowRejected,
    forwarding,
    instance,
)
from kapbit.events import WorkflowCreated
from kapbit.forwarding import (
    Answer,
    AnswerRule,
    Forwarder,
    RemoteWorkflows,
    Request,
    answer_error,
    error_answer,
)
from kapbit.log_reader import decode_event
from kapbit.projection import WorkflowStatus
from kapbit.repository import MemRepository
from kapbit.request_log import ANSWER, REQUEST, REQUEST_CLAIM, MemRequestLog, RequestRecord
from kapbit.testing import ManualClock
from tests.forwarding_workflows import BROKEN, CODEC, ENTERED, GREET, HELD, greet
from tests.helpers import fast_options, napper, wait_until


def down(_name: str, _progress: Progress) -> None:
    raise ConnectionError("provider down")


FLAKY = Definition("flaky", steps=[Step(down)], input_type=str)


def huge(name: str, _progress: Progress) -> Success[str]:
    return Success("x" * 5_000)


HUGE = Definition("huge", steps=[Step(huge)], input_type=str, outcome_type=str)

OWNED: list[Definition[Any, Any, Any]] = [GREET, BROKEN, FLAKY, HUGE]


class Caller:
    """A caller that owns nothing: every call goes through the request log."""

    def __init__(self, forwarder: Forwarder, partitions: int) -> None:
        self.forwarder = forwarder
        self.remote = RemoteWorkflows(forwarder, partitions)

    async def exec(self, workflow_type: str, workflow_id: str, input: Any, **kw: Any) -> Any:
        data = CODEC.encode(input)
        return await self.remote.exec(workflow_id, workflow_type, data, kw.get("dup", "raise"))

    async def start(self, workflow_type: str, workflow_id: str, input: Any, **kw: Any) -> Any:
        data = CODEC.encode(input)
        return await self.remote.start(workflow_id, workflow_type, data, kw.get("dup", "raise"))


@pytest.fixture
def log() -> MemRepository:
    return MemRepository(partitions=2, max_payload=2_000)


@pytest.fixture
def requests() -> MemRequestLog:
    return MemRequestLog(partitions=2)


async def _caller(requests: MemRequestLog, log: MemRepository, timeout: float = 5.0) -> Caller:
    definitions = {d.type: d for d in [*OWNED, Definition("other", steps=[Step(greet)])]}
    forwarder = Forwarder(requests, log, CODEC, definitions, "caller/1", timeout)
    await forwarder.start()
    return Caller(forwarder, 2)


@pytest.fixture
async def caller(requests: MemRequestLog, log: MemRepository) -> AsyncIterator[Caller]:
    caller = await _caller(requests, log)
    yield caller
    await caller.forwarder.close()


def _owner(
    log: MemRepository, requests: MemRequestLog, definitions: list[Definition[Any, Any, Any]]
) -> Kapbit:
    return Kapbit(
        definitions, log, options=fast_options(max_attempts=2, max_workflows=50), requests=requests
    )


async def test_a_forwarded_exec_returns_the_owners_result(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    async with _owner(log, requests, OWNED):
        assert await caller.exec("greet", "g-1", "ada") == "hello ada"
    created = [decode_event(CODEC, r) for r in log.records() if r.kind == "workflow_created"]
    assert len(created) == 1 and isinstance(created[0], WorkflowCreated)
    assert created[0].request is not None  # the request that created it is named


async def test_start_then_the_handle_reads_status_and_result(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    async with _owner(log, requests, OWNED):
        handle = await caller.start("greet", "g-2", "bob")
        assert await handle.result(timeout=5) == "hello bob"
        assert await handle.status() is WorkflowStatus.SUCCEEDED
        missing = caller.remote.handle("nobody")
        with pytest.raises(WorkflowNotFound):
            await missing.status()
        with pytest.raises(WorkflowNotFound):
            await missing.result(timeout=5)


async def test_duplicates_attach_and_refusals_keep_local_semantics(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    async with _owner(log, requests, OWNED) as owner:
        assert await caller.exec("greet", "g-3", "cy") == "hello cy"
        with pytest.raises(DuplicateWorkflow) as dup:
            await caller.exec("greet", "g-3", "cy")
        assert dup.value.workflow_id == "g-3"
        assert await caller.exec("greet", "g-3", "cy", dup="attach") == "hello cy"
        handle = await caller.start("greet", "g-3", "cy", dup="attach")
        assert await handle.result(timeout=5) == "hello cy"
        with pytest.raises(UnknownWorkflowType) as unknown:  # the owner does not know it
            await caller.exec("other", "o-1", "x")
        assert unknown.value.workflow_type == "other"
        with pytest.raises(InvalidReturnValue):
            await caller.exec("broken", "b-1", "x")
        with pytest.raises(WorkflowRejected):
            await caller.exec("huge", "h-1", "x")
        with pytest.raises(WillRetryLater):
            await caller.exec("flaky", "f-1", "x")
        assert owner.stats.rejected == 1


async def test_a_forwarded_exec_of_a_workflow_that_sleeps_answers_as_a_local_one(
    log: MemRepository, requests: MemRequestLog
) -> None:
    """Through a timer: a step raising after the wake answers WillRetryLater (with the
    cause's text), a forwarded attach waits for the end through the retries, and a
    workflow that wakes and succeeds answers its result."""
    clock = ManualClock()
    definition, runs = napper(1, raises=1)
    forwarder = Forwarder(requests, log, CODEC, {definition.type: definition}, "caller/1", 5.0)
    await forwarder.start()
    caller = Caller(forwarder, 2)
    owner = Kapbit(
        [definition], log, options=fast_options(max_attempts=5, clock=clock), requests=requests
    )
    try:
        async with owner:
            call = asyncio.create_task(caller.exec("napper", "n-1", "x"))
            await wait_until(lambda: owner.stats.sleeping == 1)
            attached = asyncio.create_task(caller.exec("napper", "n-1", "x", dup="attach"))
            clock.advance(3600)
            with pytest.raises(WillRetryLater, match="provider down"):
                await asyncio.wait_for(call, 5)
            assert await asyncio.wait_for(attached, 5) == ["napped", "done"]
            assert runs == [2]

            again = asyncio.create_task(caller.exec("napper", "n-2", "x"))
            await wait_until(lambda: owner.stats.sleeping == 1)
            clock.advance(3600)
            assert await asyncio.wait_for(again, 5) == ["napped", "done"]
    finally:
        await forwarder.close()


async def test_a_refusal_writes_nothing_to_the_log(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    async with Kapbit(
        OWNED, log, options=fast_options(max_workflows=1), requests=requests
    ) as owner:
        HELD["slow"], ENTERED["slow"] = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(caller.exec("greet", "t-1", "slow"))
        await asyncio.wait_for(ENTERED["slow"].wait(), 5)
        with pytest.raises(TooManyWorkflows) as refused:
            await caller.exec("greet", "t-2", "x")
        assert refused.value.limit == 1
        HELD.pop("slow").set()
        assert await first == "hello slow"
        assert "t-2" not in [r.key for r in log.records()]
        assert owner.stats.started == 1


async def test_no_owner_times_out_with_a_typed_error(
    log: MemRepository, requests: MemRequestLog
) -> None:
    caller = await _caller(requests, log, timeout=0.2)
    try:
        with pytest.raises(RequestTimedOut) as timed_out:
            await caller.exec("greet", "g-4", "x")
        assert timed_out.value.workflow_id == "g-4" and timed_out.value.op == "exec"
    finally:
        await caller.forwarder.close()


async def test_requests_waiting_for_an_owner_are_served_once_one_starts(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    calls = [asyncio.create_task(caller.exec("greet", f"w-{i}", str(i))) for i in range(6)]
    await wait_until(
        lambda: sum(r.kind == REQUEST for p in (0, 1) for r in requests.records(p)) == 6
    )
    async with _owner(log, requests, OWNED):
        assert await asyncio.gather(*calls) == [f"hello {i}" for i in range(6)]


async def test_a_request_served_again_after_a_takeover_is_answered_the_same_way(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    first = _owner(log, requests, OWNED)
    await first.start()
    HELD["t"], ENTERED["t"] = asyncio.Event(), asyncio.Event()
    call = asyncio.create_task(caller.exec("greet", "g-5", "t"))
    await asyncio.wait_for(ENTERED["t"].wait(), 5)
    first.abort()  # created, answered "created", not finished: the next owner serves it
    HELD.pop("t").set()
    async with _owner(log, requests, OWNED):
        assert await asyncio.wait_for(call, 5) == "hello t"
    created = [r for r in log.records() if r.kind == "workflow_created" and r.key == "g-5"]
    assert len(created) == 1  # served twice, created once


class _AheadClock:
    """Stands in for the ``time`` module of :mod:`kapbit.forwarding`: the wall clock moved
    ``ahead`` seconds, so deadlines pass without waiting for them."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def time(self) -> float:
        return time.time() + self.ahead


async def test_an_exec_created_before_its_owner_died_is_finished_past_its_deadline(
    log: MemRepository,
    requests: MemRequestLog,
    caller: Caller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``created`` answer lifted the caller's timeout: it waits for the end, so the next
    owner must serve the request even once its deadline has passed (it used to skip it as
    expired, and the caller waited forever)."""
    clock = _AheadClock()
    monkeypatch.setattr(forwarding, "time", clock)
    first = _owner(log, requests, OWNED)
    await first.start()
    HELD["late"], ENTERED["late"] = asyncio.Event(), asyncio.Event()
    call = asyncio.create_task(caller.exec("greet", "g-10", "late"))
    await asyncio.wait_for(ENTERED["late"].wait(), 5)
    await _wait_for_records(requests, _partition("g-10"), ANSWER)  # "created"
    first.abort()
    HELD.pop("late").set()
    clock.ahead = 3_600.0  # the request's deadline passes before the next owner reads it
    async with _owner(log, requests, OWNED) as second:
        assert await asyncio.wait_for(call, 5) == "hello late"
        assert second.stats.recovered == 1 and second.stats.started == 0


async def test_an_answer_given_after_a_newer_claim_never_counts() -> None:
    rule = AnswerRule()
    rule.claim(0)  # session 0 serves
    rule.request("r1", 1)
    rule.claim(2)  # another owner claims before session 0's answer lands
    late = Answer("r1", 0, "error", error="TooManyWorkflows", message="...")
    assert not rule.counts(late, 3)
    assert rule.counts(Answer("r1", 2, "created", created_offset=7), 4)
    rule.request("r2", 5)
    assert rule.counts(Answer("r2", 2, "ended", created_offset=9), 6)
    assert not rule.counts(Answer("r2", 0, "ended", created_offset=9), 6)  # stale session
    assert not rule.counts(Answer("r3", 2, "ended"), 7)  # a request it never read


async def test_an_answer_of_a_session_that_lost_the_partition_is_ignored_by_callers(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    """A forged late answer (a zombie session's refusal) lands after the new owner's
    claim: the caller takes the new owner's answer instead."""
    call = asyncio.create_task(caller.exec("greet", "g-6", "z"))
    await _wait_for_records(requests, 0 if _partition("g-6") == 0 else 1, REQUEST)
    partition = _partition("g-6")
    request = CODEC.decode(
        next(r for r in requests.records(partition) if r.kind == REQUEST).value, Request
    )
    stale = error_answer(request.id, -1, TooManyWorkflows(1))  # a session before any claim
    async with _owner(log, requests, OWNED):
        await _wait_for_records(requests, partition, REQUEST_CLAIM)
        await requests.append(partition, ANSWER, "", "zombie", CODEC.encode(stale))
        assert await asyncio.wait_for(call, 5) == "hello z"


async def test_errors_cross_the_request_log_with_their_type_and_fields() -> None:
    error = answer_error(error_answer("r", 0, TooManyWorkflows(7)))
    assert isinstance(error, TooManyWorkflows) and error.limit == 7
    assert str(error) == str(TooManyWorkflows(7))
    unknown = answer_error(error_answer("r", 0, UnknownWorkflowType("x", ["a"])))
    assert isinstance(unknown, UnknownWorkflowType) and unknown.workflow_type == "x"


async def test_expired_requests_are_skipped_and_progress_moves_past_answered_ones(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    stale = Request("old", "exec", "g-7", "greet", deadline=1.0)  # long expired
    partition = _partition("g-7")
    await requests.append(partition, REQUEST, "g-7", "gone", CODEC.encode(stale))
    async with _owner(log, requests, OWNED):
        for i in range(3):
            assert await caller.exec("greet", f"p-{i}", "x") == "hello x"
    assert "g-7" not in [r.key for r in log.records()]
    progress = await requests.load_progress()
    assert all(offset > 0 for offset in progress.values())


def _partition(workflow_id: str) -> int:
    from kapbit import partition_for

    return partition_for(workflow_id, 2)


async def _wait_for_records(requests: MemRequestLog, partition: int, kind: str) -> None:
    async def seen() -> None:
        async for batch in requests.tail(partition, 0):
            if any(r.kind == kind for r in batch):
                return

    await asyncio.wait_for(seen(), 5)


async def test_a_graceful_close_answers_the_forwarded_calls_it_drains(
    log: MemRepository, requests: MemRequestLog, caller: Caller
) -> None:
    owner = _owner(log, requests, OWNED)
    await owner.start()
    HELD["drain"], ENTERED["drain"] = asyncio.Event(), asyncio.Event()
    call = asyncio.create_task(caller.exec("greet", "g-8", "drain"))
    await asyncio.wait_for(ENTERED["drain"].wait(), 5)
    closing = asyncio.create_task(owner.close(timeout=5))
    await wait_until(lambda: not owner.is_running)
    HELD.pop("drain").set()
    assert await asyncio.wait_for(call, 5) == "hello drain"  # no next owner needed
    await closing


async def test_a_graceful_close_leaves_the_forwarded_calls_it_cut_to_the_next_owner_at_once(
    log: MemRepository,
    requests: MemRequestLog,
    caller: Caller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forwarded ``result()`` of a workflow the close cut (close timeout 0) can only be
    answered by the next owner: the close hands over without waiting for it (it used to
    wait out a grace period, set to an hour here, before leaving)."""
    monkeypatch.setattr(instance, "CANCEL_GRACE", 3_600.0)
    owner = _owner(log, requests, OWNED)
    await owner.start()
    HELD["cut"], ENTERED["cut"] = asyncio.Event(), asyncio.Event()
    await owner.start_workflow("g-11", "greet", "cut")
    await asyncio.wait_for(ENTERED["cut"].wait(), 5)
    waiting = asyncio.create_task(caller.remote.handle("g-11").result(timeout=30))
    # Served in order: once a later describe is answered, the result() is being served.
    assert await caller.remote.handle("g-11").status() is WorkflowStatus.RUNNING
    await asyncio.wait_for(owner.close(timeout=0), 10)
    assert not waiting.done()
    HELD.pop("cut").set()
    async with _owner(log, requests, OWNED) as second:
        assert await asyncio.wait_for(waiting, 5) == "hello cut"
        assert second.stats.recovered == 1


class _FlakyRequestLog(MemRequestLog):
    """A request log whose first ``failures`` tails fail, as an unreachable broker would."""

    def __init__(self, partitions: int, failures: int) -> None:
        super().__init__(partitions)
        self.failures = failures

    async def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[RequestRecord]]:
        if self.failures > 0:
            self.failures -= 1
            raise TransientStorageError("broker unreachable")
        async for batch in super().tail(partition, start):
            yield batch


async def test_a_session_whose_storage_failed_is_started_again(log: MemRepository) -> None:
    requests = _FlakyRequestLog(2, failures=0)
    caller = await _caller(requests, log)
    try:
        call = asyncio.create_task(caller.exec("greet", "g-9", "again"))
        await wait_until(
            lambda: any(r.kind == REQUEST for p in (0, 1) for r in requests.records(p))
        )
        requests.failures = 2  # the caller follows already; the owner's first sessions fail
        async with _owner(log, requests, OWNED):
            assert await asyncio.wait_for(call, 5) == "hello again"
        claims = sum(r.kind == REQUEST_CLAIM for p in (0, 1) for r in requests.records(p))
        assert claims == 4  # two failed sessions, then one per partition
    finally:
        await caller.forwarder.close()


def _has(requests: MemRequestLog, kind: str) -> bool:
    return any(r.kind == kind for p in range(requests.partitions) for r in requests.records(p))
