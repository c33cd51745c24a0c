"""The emitter on its own: retries forever, stops only on Fenced / rejection / encode error,
and drives the storage breaker through pybreaker's state machine with one probe at a time."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pybreaker
import pytest

from kapbit import Backoff, EncodeError, Fenced, JsonCodec, RecordRejected
from kapbit.emitter import Emitter, new_storage_breaker
from kapbit.events import StepOutcome
from kapbit.fencing import Fence
from kapbit.repository import MemRepository
from kapbit.testing.faults import FaultyRepository
from tests.helpers import BreakerStates, Clock, LogCapture, expire_reset_timeout, wait_until

NODE = "node-a"
RESET = 60.0  # never passes by itself: tests move the breaker's clock


@dataclass
class Rig:
    mem: MemRepository
    faults: FaultyRepository
    emitter: Emitter
    breaker: pybreaker.CircuitBreaker
    storage: pybreaker.CircuitMemoryStorage
    states: BreakerStates
    clock: Clock
    fence: Fence = field(default_factory=Fence)


async def rig(
    *,
    fail_max: int = 100,
    backoff: Backoff | None = None,
    codec: Any = None,
    partitions: int = 1,
) -> Rig:
    mem = MemRepository(partitions=partitions)
    for p in range(partitions):
        await mem.claim(p, NODE, b"{}")
    faults = FaultyRepository(mem)
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    states = BreakerStates()
    breaker = new_storage_breaker(fail_max, RESET, states, state_storage=storage)
    clock = Clock()
    fence = Fence()
    emitter = Emitter(
        faults,
        codec or JsonCodec(),
        NODE,
        breaker,
        backoff or Backoff(initial=0.01, maximum=0.04, jitter=0.0),
        fence,
        sleep=clock.sleep,
    )
    return Rig(mem, faults, emitter, breaker, storage, states, clock, fence)


def outcome(workflow_id: str = "w1", step: int = 0) -> StepOutcome:
    return StepOutcome(workflow_id, step, "execute", True, msgspec.Raw(b'"v"'))


def landed(r: Rig, workflow_id: str = "w1") -> list[str]:
    return [rec.kind for rec in r.mem.records() if rec.key == workflow_id]


# --- retrying ---------------------------------------------------------------------------------


async def test_transient_errors_are_retried_with_capped_exponential_backoff() -> None:
    r = await rig()
    failing = r.faults.fail(times=5)
    offset = await r.emitter.emit(0, "w1", outcome())
    assert failing.hits == 5
    assert r.faults.calls["step_outcome"] == 6  # 5 failures, then the one that landed
    assert landed(r) == ["step_outcome"]  # exactly once
    assert offset == 1 and r.emitter.acked(0) == 1
    # initial, doubling, capped at the maximum; no jitter configured.
    assert r.clock.delays == [0.01, 0.02, 0.04, 0.04, 0.04]


async def test_backoff_jitter_stays_within_its_bound() -> None:
    r = await rig(backoff=Backoff(initial=0.01, maximum=0.01, jitter=0.005))
    r.faults.fail(times=30)
    await r.emitter.emit(0, "w1", outcome())
    assert len(r.clock.delays) == 30
    assert all(0.01 <= d <= 0.015 for d in r.clock.delays)
    assert len(set(r.clock.delays)) > 1, "no jitter"


async def test_retry_log_level_rises_and_records_name_the_workflow() -> None:
    r = await rig()
    r.faults.fail(times=17)
    with LogCapture("kapbit.emitter") as logs:
        await r.emitter.emit(0, "w1", outcome(), workflow_type="saga")
    failures = [rec for rec in logs.records if "failed" in rec.getMessage()]
    # Attempts 1-10 are all logged, later ones only at powers of two (16).
    assert [int(rec.args[3]) for rec in failures] == [*range(1, 11), 16]  # type: ignore[index,arg-type]
    assert [rec.levelno for rec in failures] == [logging.INFO] * 2 + [logging.WARNING] * 7 + [
        logging.ERROR
    ] * 2
    assert "succeeded after 18 attempts" in logs.records[-1].getMessage()
    for rec in logs.records:
        assert (rec.workflow_id, rec.workflow_type, rec.partition) == ("w1", "saga", 0)  # type: ignore[attr-defined]


async def test_retrying_continues_across_partitions_independently() -> None:
    r = await rig(partitions=2)
    r.faults.fail(partitions=[1], times=3)
    first = asyncio.create_task(r.emitter.emit(1, "w1", outcome("w1")))
    assert await r.emitter.emit(0, "w2", outcome("w2")) == 1
    assert await first == 1
    assert [r.emitter.acked(0), r.emitter.acked(1)] == [1, 1]


# --- stopping -------------------------------------------------------------------------------


async def test_rejection_is_not_retried_and_does_not_count_against_the_breaker() -> None:
    r = await rig(fail_max=1)
    r.faults.reject(kinds="step_outcome")
    with pytest.raises(RecordRejected):
        await r.emitter.emit(0, "w1", outcome())
    assert r.faults.calls["step_outcome"] == 1
    assert r.clock.delays == []
    assert r.breaker.current_state == "closed" and r.breaker.fail_counter == 0


async def test_encode_error_is_not_retried_and_nothing_is_appended() -> None:
    class Broken(JsonCodec):
        def encode(self, value: Any) -> bytes:
            raise EncodeError("cannot encode")

    r = await rig(codec=Broken())
    with pytest.raises(EncodeError):
        await r.emitter.emit(0, "w1", outcome())
    assert sum(r.faults.calls.values()) == 0


async def test_fenced_stops_the_emitter_for_good() -> None:
    r = await rig()
    await r.mem.claim(0, "node-b", b"{}")  # another node claims
    with pytest.raises(Fenced):
        await r.emitter.emit(0, "w1", outcome())
    first = r.fence.error
    assert first is not None
    calls = sum(r.faults.calls.values())
    with pytest.raises(Fenced):
        await r.emitter.emit(0, "w2", outcome("w2"))
    assert sum(r.faults.calls.values()) == calls, "a fenced emitter still wrote"
    assert r.fence.error is first  # the first refusal is the one recorded
    assert r.clock.delays == []


async def test_fenced_while_retrying_stops_the_retries() -> None:
    r = await rig()
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await outage.wait_hits(3)
    await r.mem.claim(0, "node-b", b"{}")
    outage.release()
    with pytest.raises(Fenced):
        await task
    assert r.fence.error is not None
    assert (await r.fence.wait()) is r.fence.error


async def test_a_killed_emitter_stops_retrying_without_writing() -> None:
    r = await rig()
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await outage.wait_hits(2)
    r.fence.stop("killed")  # what Kapbit.abort does
    outage.release()
    with pytest.raises(Fenced, match="killed"):
        await task
    assert landed(r) == []


async def test_cancelling_a_retrying_append_stops_it() -> None:
    r = await rig()
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await outage.wait_hits(2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hits = outage.hits
    outage.release()
    await asyncio.sleep(0)
    assert outage.hits == hits and landed(r) == []


async def test_unexpected_repository_errors_propagate_and_count_as_failures() -> None:
    r = await rig(fail_max=2)
    r.faults.fail(times=1, error=lambda call: OSError("socket closed"))
    with pytest.raises(OSError):
        await r.emitter.emit(0, "w1", outcome())
    assert r.breaker.fail_counter == 1  # counted on the fast path too
    assert r.clock.delays == []  # not retried: only TransientStorageError is


# --- the storage breaker ------------------------------------------------------------------


async def test_breaker_opens_after_fail_max_consecutive_failures_then_fails_fast() -> None:
    r = await rig(fail_max=3)
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await wait_until(lambda: r.states.changes == ["open"])
    assert outage.hits == 3
    # While open (reset timeout not passed) retries fail fast: the storage is not called.
    spins = len(r.clock.delays)
    await wait_until(lambda: len(r.clock.delays) >= spins + 20)
    assert outage.hits == 3
    assert r.breaker.current_state == "open"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_only_consecutive_failures_count() -> None:
    r = await rig(fail_max=3)
    r.faults.fail(times=2)
    await r.emitter.emit(0, "w1", outcome("w1"))
    # The first failure went through the fast path, the second and the success through the
    # breaker: the success reset the count.
    assert r.breaker.current_state == "closed" and r.breaker.fail_counter == 0
    r.faults.fail(times=2)
    await r.emitter.emit(0, "w2", outcome("w2"))
    assert r.states.changes == []
    r.faults.fail(times=3)
    task = asyncio.create_task(r.emitter.emit(0, "w3", outcome("w3")))
    await wait_until(lambda: r.states.changes == ["open"])
    expire_reset_timeout(r.storage, RESET)
    await task


async def test_fail_max_one_opens_on_the_first_failure_of_the_fast_path() -> None:
    r = await rig(fail_max=1)
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await wait_until(lambda: r.states.changes == ["open"])
    assert outage.hits == 1
    outage.release()
    expire_reset_timeout(r.storage, RESET)
    await task
    assert r.states.changes == ["open", "half-open", "closed"]


async def test_after_reset_timeout_one_probe_goes_through_and_success_closes() -> None:
    r = await rig(fail_max=2)
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await wait_until(lambda: r.breaker.current_state == "open")
    outage.release()
    spins = len(r.clock.delays)
    await wait_until(lambda: len(r.clock.delays) >= spins + 5)
    assert not task.done(), "went through an open breaker before its reset timeout"
    expire_reset_timeout(r.storage, RESET)
    assert await task == 1
    assert r.states.changes == ["open", "half-open", "closed"]
    assert r.breaker.fail_counter == 0
    assert landed(r) == ["step_outcome"]


async def test_a_failed_probe_opens_the_breaker_again() -> None:
    r = await rig(fail_max=2)
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await wait_until(lambda: r.breaker.current_state == "open")
    expire_reset_timeout(r.storage, RESET)
    await wait_until(lambda: r.states.changes == ["open", "half-open", "open"])
    assert outage.hits == 3  # two to trip it, one probe
    outage.release()
    expire_reset_timeout(r.storage, RESET)
    await task
    assert r.states.changes[-2:] == ["half-open", "closed"]


async def test_half_open_admits_a_single_probe_at_a_time() -> None:
    r = await rig(fail_max=1)
    outage = r.faults.fail()
    tasks = [asyncio.create_task(r.emitter.emit(0, f"w{i}", outcome(f"w{i}"))) for i in range(5)]
    await wait_until(lambda: r.breaker.current_state == "open")
    outage.release()
    hold = r.faults.slow()  # the probe hangs in the storage
    expire_reset_timeout(r.storage, RESET)
    await hold.wait_hits(1)
    assert r.breaker.current_state == "half-open"
    # The other appends keep retrying while the probe hangs: none reaches the storage.
    spins = len(r.clock.delays)
    await wait_until(lambda: len(r.clock.delays) >= spins + 40)
    assert hold.hits == 1
    hold.release()
    offsets = await asyncio.gather(*tasks)
    assert sorted(offsets) == [1, 2, 3, 4, 5]
    assert r.breaker.current_state == "closed"
    assert len(r.mem.records()) == 6


async def test_a_rejected_probe_closes_the_breaker() -> None:
    # A rejection is an answer from a working storage.
    r = await rig(fail_max=1)
    outage = r.faults.fail()
    task = asyncio.create_task(r.emitter.emit(0, "w1", outcome()))
    await wait_until(lambda: r.breaker.current_state == "open")
    outage.release()
    r.faults.reject()
    expire_reset_timeout(r.storage, RESET)
    with pytest.raises(RecordRejected):
        await task
    assert r.states.changes == ["open", "half-open", "closed"]
