"""A real instance on a fault-injecting repository: storage outages during every event kind,
the entry gate closing and reopening, step circuit breakers, and storage rejections."""

from __future__ import annotations

import asyncio
from typing import Any

import pybreaker
import pytest

from kapbit import (
    CircuitBreakerOpen,
    DeadLettered,
    Definition,
    DuplicateWorkflow,
    GateClosed,
    Kapbit,
    PayloadTooLarge,
    Progress,
    Step,
    Success,
    WillRetryLater,
    WorkflowRejected,
)
from kapbit.events import Rejected
from kapbit.repository import MemRepository
from kapbit.testing.faults import Call, FaultyRepository
from tests.helpers import Script, fast_options, kinds, log_events, saga, wait_until

HAPPY = ["workflow_created", "step_outcome", "step_outcome", "step_outcome", "workflow_result"]


def faulty(partitions: int = 1, max_payload: int = 1024 * 1024) -> FaultyRepository:
    return FaultyRepository(MemRepository(partitions=partitions, max_payload=max_payload))


def mem(repo: FaultyRepository) -> MemRepository:
    assert isinstance(repo.inner, MemRepository)
    return repo.inner


def written(repo: FaultyRepository) -> int:
    """Appends attempted so far, failed or not."""
    return sum(repo.calls.values())


class Dependency:
    """A remote service behind a step: raises ``error`` while ``down``, counts overlap."""

    def __init__(self, error: type[Exception] = ConnectionError) -> None:
        self.error = error
        self.down = True
        self.calls = 0
        self.running = 0
        self.most_running = 0

    async def __call__(self, input: Any, progress: Progress) -> Success[str]:
        self.calls += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(0.001)  # the remote call takes a moment (overlap shows)
            if self.down:
                raise self.error("dependency unavailable")
            return Success("dep-ok")
        finally:
            self.running -= 1


def with_dependency(dependency: Dependency, script: Script) -> Definition:
    return Definition(
        "dep",
        [Step(script.action(0, "execute")), Step(dependency)],
        result=lambda input, progress: progress.values(),
        input_type=dict[str, Any],
        outcome_type=str,
    )


# --- storage outages ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["workflow_created", "step_outcome", "workflow_result"])
async def test_storage_outage_during_an_event_waits_and_resumes_exactly(kind: str) -> None:
    script = Script()
    repo = faulty()
    async with Kapbit([saga(script)], repo, options=fast_options()) as kbit:
        outage = repo.fail(kinds=kind)
        running = asyncio.create_task(kbit.exec_workflow("w", "saga", {"id": "w"}))
        await outage.wait_hits(3)  # the breaker (fail_max=3) opens ...
        await wait_until(lambda: not kbit.gate.is_open)  # ... and closes the gate
        await outage.wait_hits(4)  # the emitter keeps probing
        assert not running.done() and kbit.stats.in_flight == 1
        # Nothing runs past an event that is not durable yet.
        expected_steps = {"workflow_created": 0, "step_outcome": 1, "workflow_result": 3}[kind]
        assert len(script.calls) == expected_steps
        outage.release()
        assert (await running)["values"] == ["exec-0", "exec-1", "exec-2"]
        assert kbit.gate.is_open  # the completed workflow reopened it
        assert kbit.stats.succeeded == 1 and kbit.stats.in_flight == 0
    assert kinds(mem(repo), "w") == HAPPY  # each event exactly once
    assert len(script.calls) == 3


async def test_storage_outage_during_a_retry_record_waits_and_resumes() -> None:
    script, dependency = Script(), Dependency()
    repo = faulty()
    async with Kapbit(
        [with_dependency(dependency, script)], repo, options=fast_options(fail_max=100)
    ) as kbit:
        outage = repo.fail(kinds="workflow_retry")
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "dep", {"id": "w"})
        await outage.wait_hits(3)
        assert dependency.calls == 1  # no attempt runs before its WorkflowRetry is durable
        dependency.down = False
        outage.release()
        assert await kbit.wait_result("w", timeout=5) == ["exec-0", "dep-ok"]
    assert kinds(mem(repo), "w").count("workflow_retry") == 1
    assert dependency.calls == 2


async def test_storage_outage_during_the_dead_letter_waits_then_dead_letters_once() -> None:
    script, dependency = Script(), Dependency()
    repo = faulty()
    async with Kapbit(
        [with_dependency(dependency, script)],
        repo,
        options=fast_options(max_attempts=2, fail_max=100),
    ) as kbit:
        outage = repo.fail(kinds="dead_letter")
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "dep", {"id": "w"})
        waiting = asyncio.create_task(kbit.wait_result("w", timeout=5))
        await outage.wait_hits(3)
        assert not waiting.done() and kbit.stats.in_flight == 1
        outage.release()
        with pytest.raises(DeadLettered):
            await waiting
        assert kbit.stats.in_flight == 0 and kbit.stats.dead_lettered == 1
    assert kinds(mem(repo), "w").count("dead_letter") == 1


async def test_storage_outage_during_the_rejected_event_waits_then_rejects_once() -> None:
    repo = faulty()
    async with Kapbit([saga(Script())], repo, options=fast_options(fail_max=100)) as kbit:
        repo.reject(kinds="step_outcome", when=lambda call: call.key == "w")
        outage = repo.fail(kinds="rejected")
        running = asyncio.create_task(kbit.exec_workflow("w", "saga", {"id": "w"}))
        await outage.wait_hits(3)
        assert not running.done()
        outage.release()
        with pytest.raises(WorkflowRejected):
            await running
    assert kinds(mem(repo), "w") == ["workflow_created", "rejected"]


async def test_lost_acknowledgements_leave_duplicates_that_nobody_acts_on() -> None:
    script = Script()
    repo = faulty()
    repo.fail(kinds="step_outcome", times=1, lost_ack=True)
    repo.fail(kinds="workflow_result", times=1, lost_ack=True)
    async with Kapbit([saga(script)], repo, options=fast_options()) as kbit:
        assert (await kbit.exec_workflow("w", "saga", {"id": "w"}))["values"][0] == "exec-0"
    log = kinds(mem(repo), "w")
    assert log.count("step_outcome") == 4 and log.count("workflow_result") == 2
    # A restart sees a terminated workflow: nothing is resumed, no step runs again.
    async with Kapbit([saga(script)], repo, options=fast_options()) as again:
        assert again.stats.recovered == 0
        with pytest.raises(DuplicateWorkflow):
            await again.exec_workflow("w", "saga", {"id": "w"})
    assert len(script.calls) == 3


async def test_slow_storage_for_one_workflow_does_not_hold_up_the_others() -> None:
    repo = faulty(partitions=1)
    async with Kapbit([saga(Script())], repo, options=fast_options()) as kbit:
        hold = repo.slow(when=lambda call: call.key == "slow")
        slow = asyncio.create_task(kbit.exec_workflow("slow", "saga", {"id": "slow"}))
        await hold.wait_hits(1)
        results = await asyncio.gather(
            *(kbit.exec_workflow(f"w{i}", "saga", {"id": f"w{i}"}) for i in range(10))
        )
        assert len(results) == 10 and not slow.done()
        hold.release()
        assert (await slow)["values"] == ["exec-0", "exec-1", "exec-2"]


# --- the entry gate and the storage breaker --------------------------------------------------


async def test_open_storage_breaker_closes_the_gate_and_new_work_fails_fast() -> None:
    repo = faulty()
    async with Kapbit([saga(Script())], repo, options=fast_options(max_workflows=10)) as kbit:
        outage = repo.fail()
        in_flight = [
            asyncio.create_task(kbit.exec_workflow(f"w{i}", "saga", {"id": f"w{i}"}))
            for i in range(3)
        ]
        await wait_until(lambda: not kbit.gate.is_open)
        assert kbit.stats.gate_open is False
        assert "storage circuit breaker" in kbit.gate.reason
        before = written(repo)
        with pytest.raises(GateClosed, match="storage circuit breaker"):
            await kbit.exec_workflow("new", "saga", {"id": "new"})
        assert written(repo) == before  # nothing written, nothing even attempted
        # The workflows already in flight keep retrying through the outage.
        await outage.wait_hits(outage.hits + 2)
        assert not any(task.done() for task in in_flight)
        outage.release()
        await asyncio.gather(*in_flight)
        assert kbit.gate.is_open and kbit.stats.gate_open
        assert (await kbit.exec_workflow("new", "saga", {"id": "new"}))["values"]
    assert kinds(mem(repo), "new") == HAPPY


async def test_storage_breaker_probes_while_half_open_and_recovers() -> None:
    repo = faulty()
    async with Kapbit([saga(Script())], repo, options=fast_options(reset_timeout=0.02)) as kbit:
        outage = repo.fail()
        running = asyncio.create_task(kbit.exec_workflow("w", "saga", {"id": "w"}))
        await outage.wait_hits(3)
        assert kbit._breaker.current_state == "open"
        # After the reset timeout one probe reaches the storage and fails: open again.
        await outage.wait_hits(5)
        assert kbit._breaker.current_state == "open"
        outage.release()
        await running
        assert kbit._breaker.current_state == "closed"
        assert kbit.gate.is_open


# --- step circuit breakers -------------------------------------------------------------------


@pytest.mark.parametrize("error", [pybreaker.CircuitBreakerError, CircuitBreakerOpen])
async def test_a_step_breaker_closes_the_gate_until_a_probe_succeeds(
    error: type[Exception],
) -> None:
    script, dependency = Script(), Dependency(error)
    repo = faulty()
    async with Kapbit(
        [with_dependency(dependency, script)], repo, options=fast_options(max_attempts=100)
    ) as kbit:
        with pytest.raises(WillRetryLater) as caught:
            await kbit.exec_workflow("a", "dep", {"id": "a"})
        assert isinstance(caught.value.__cause__, error)
        assert not kbit.gate.is_open and "dependency unavailable" in kbit.gate.reason
        before = written(repo)
        with pytest.raises(GateClosed):
            await kbit.exec_workflow("b", "dep", {"id": "b"})
        assert written(repo) == before
        await wait_until(lambda: dependency.calls >= 3)  # slow-mode probes
        dependency.down = False
        assert await kbit.wait_result("a", timeout=5) == ["exec-0", "dep-ok"]
        assert kbit.gate.is_open
        assert await kbit.exec_workflow("b", "dep", {"id": "b"}) == ["exec-0", "dep-ok"]
    assert kinds(mem(repo), "a").count("workflow_retry") >= 2


async def test_while_the_gate_is_closed_only_one_workflow_probes_at_a_time() -> None:
    script, dependency = Script(), Dependency(CircuitBreakerOpen)
    repo = faulty()
    options = fast_options(max_attempts=1000, max_workflows=10)
    async with Kapbit([with_dependency(dependency, script)], repo, options=options) as kbit:
        started = await asyncio.gather(
            *(kbit.exec_workflow(f"w{i}", "dep", {"id": f"w{i}"}) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(s, WillRetryLater) for s in started)
        assert not kbit.gate.is_open and kbit.stats.retrying == 5
        dependency.most_running = dependency.running
        probes = dependency.calls
        await wait_until(lambda: dependency.calls >= probes + 10)
        assert dependency.most_running == 1
        dependency.down = False
        for i in range(5):
            assert await kbit.wait_result(f"w{i}", timeout=5) == ["exec-0", "dep-ok"]
        assert kbit.gate.is_open and kbit.stats.retrying == 0


# --- rejections ---------------------------------------------------------------------------------


def big_saga(script: Script) -> Definition:
    """Step 1 returns a value too large for the log when the input asks for it."""

    def step1(input: dict[str, Any], progress: Progress) -> Success[str]:
        script.calls.append((input["id"], 1, "execute"))
        return Success("x" * 5000 if input.get("big") else "small")

    base = saga(script)
    return Definition(
        "saga",
        [base.steps[0], Step(step1, base.steps[1].compensate), base.steps[2]],
        result=base.result,
        input_type=dict[str, Any],
        outcome_type=str,
    )


async def test_an_oversized_outcome_rejects_the_workflow_and_the_instance_goes_on() -> None:
    script = Script()
    repo = faulty(max_payload=1000)
    options = fast_options(max_workflows=1)
    async with Kapbit([big_saga(script)], repo, options=options) as kbit:
        with pytest.raises(WorkflowRejected) as caught:
            await kbit.exec_workflow("big", "saga", {"id": "big", "big": True})
        assert caught.value.workflow_id == "big"
        assert "step_outcome" in caught.value.reason and "over the limit" in caught.value.reason
        with pytest.raises(WorkflowRejected):
            await kbit.wait_result("big", timeout=1)
        with pytest.raises(DuplicateWorkflow):  # the id stays in the idempotency window
            await kbit.exec_workflow("big", "saga", {"id": "big"})
        # The slot is free (max_workflows=1) and others are served.
        assert (await kbit.exec_workflow("ok", "saga", {"id": "ok"}))["values"][1] == "small"
        assert kbit.gate.is_open
        stats = kbit.stats
        assert (stats.rejected, stats.succeeded, stats.in_flight) == (1, 1, 0)
    assert kinds(mem(repo), "big") == ["workflow_created", "step_outcome", "rejected"]
    rejected = [e for _, _, e in log_events(mem(repo)) if isinstance(e, Rejected)]
    assert len(rejected) == 1 and rejected[0].event == "step_outcome"
    # Step 2 never ran for the rejected workflow; nothing was compensated.
    assert ("big", 2, "execute") not in script.calls
    assert not [c for c in script.calls if c[0] == "big" and c[2] == "compensate"]
    # A restart does not resume it.
    async with Kapbit([big_saga(script)], repo, options=options) as again:
        assert again.stats.recovered == 0


@pytest.mark.parametrize("kind", ["step_outcome", "workflow_result"])
async def test_a_storage_rejection_by_kind_terminates_the_workflow(kind: str) -> None:
    repo = faulty()
    async with Kapbit([saga(Script())], repo, options=fast_options()) as kbit:
        repo.reject(kinds=kind, when=lambda call: call.key == "w")
        with pytest.raises(WorkflowRejected, match=kind):
            await kbit.exec_workflow("w", "saga", {"id": "w"})
        assert (await kbit.exec_workflow("v", "saga", {"id": "v"}))["values"]
    assert kinds(mem(repo), "w")[-1] == "rejected"
    assert kinds(mem(repo), "w").count("rejected") == 1


async def test_a_rejected_compensation_outcome_terminates_the_workflow() -> None:
    script = Script({(2, "execute"): "fail"})
    repo = faulty()
    async with Kapbit([saga(script)], repo, options=fast_options()) as kbit:

        def compensation(call: Call) -> bool:
            return call.kind == "step_outcome" and b'"compensate"' in call.value

        repo.reject(when=compensation, error=lambda call: PayloadTooLarge(len(call.value), 1))
        with pytest.raises(WorkflowRejected):
            await kbit.exec_workflow("w", "saga", {"id": "w"})
    assert kinds(mem(repo), "w")[-1] == "rejected"
    assert [c for c in script.calls if c[2] == "compensate"] == [("w", 1, "compensate")]


async def test_a_rejection_during_a_retry_attempt_reaches_the_waiting_caller() -> None:
    script, dependency = Script(), Dependency()
    repo = faulty()
    async with Kapbit(
        [with_dependency(dependency, script)], repo, options=fast_options(max_attempts=100)
    ) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "dep", {"id": "w"})
        repo.reject(kinds="step_outcome", when=lambda call: call.key == "w")
        dependency.down = False
        with pytest.raises(WorkflowRejected):
            await kbit.wait_result("w", timeout=5)
        assert kbit.stats.rejected == 1 and kbit.stats.in_flight == 0


@pytest.mark.parametrize("kind", ["workflow_retry", "dead_letter"])
async def test_a_rejected_retry_worker_event_terminates_the_workflow(kind: str) -> None:
    script, dependency = Script(), Dependency()
    repo = faulty()
    options = fast_options(max_attempts=2, max_workflows=1)
    async with Kapbit([with_dependency(dependency, script)], repo, options=options) as kbit:
        repo.reject(kinds=kind)
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "dep", {"id": "w"})
        with pytest.raises(WorkflowRejected, match=kind):
            await kbit.wait_result("w", timeout=5)
        assert kbit.stats.rejected == 1 and kbit.stats.in_flight == 0
        dependency.down = False  # the slot is free for the next workflow
        assert await kbit.exec_workflow("v", "dep", {"id": "v"}) == ["exec-0", "dep-ok"]
    assert kinds(mem(repo), "w")[-1] == "rejected"


# --- the gate never stays closed with nothing left to probe with -----------------------------


async def test_gate_reopens_when_the_last_workflow_is_dead_lettered() -> None:
    script, dependency = Script(), Dependency(CircuitBreakerOpen)
    repo = faulty()
    async with Kapbit(
        [with_dependency(dependency, script)], repo, options=fast_options(max_attempts=2)
    ) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("a", "dep", {"id": "a"})
        assert not kbit.gate.is_open
        with pytest.raises(GateClosed):
            await kbit.exec_workflow("b", "dep", {"id": "b"})
        with pytest.raises(DeadLettered):
            await kbit.wait_result("a", timeout=5)
        # No workflow is left to probe with: the next new one is let in to probe.
        assert kbit.gate.is_open and kbit.stats.in_flight == 0
        dependency.down = False
        assert await kbit.exec_workflow("b", "dep", {"id": "b"}) == ["exec-0", "dep-ok"]


async def test_gate_stays_closed_while_another_workflow_can_still_probe() -> None:
    b_attempt = asyncio.Event()
    b_release = asyncio.Event()
    calls: dict[str, int] = {"a": 0, "b": 0}

    async def remote(input: dict[str, Any], progress: Progress) -> Success[str]:
        wid = input["id"]
        calls[wid] += 1
        if wid == "b" and calls[wid] == 1:  # b's first run hangs in the remote call
            b_attempt.set()
            await b_release.wait()
        raise CircuitBreakerOpen("dependency unavailable")

    definition = Definition("dep", [Step(remote)], input_type=dict[str, Any])
    options = fast_options(max_attempts=2, max_workflows=10)
    async with Kapbit([definition], faulty(), options=options) as kbit:
        b = asyncio.create_task(kbit.exec_workflow("b", "dep", {"id": "b"}))
        await asyncio.wait_for(b_attempt.wait(), 5)
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("a", "dep", {"id": "a"})
        with pytest.raises(DeadLettered):
            await kbit.wait_result("a", timeout=5)
        # b is still in flight and will probe: the gate stays closed.
        assert kbit.stats.in_flight == 1 and not kbit.gate.is_open
        b_release.set()
        with pytest.raises(WillRetryLater):
            await b
        with pytest.raises(DeadLettered):
            await kbit.wait_result("b", timeout=5)
        assert kbit.gate.is_open


async def test_storage_breaker_tripping_during_start_does_not_leave_the_gate_closed() -> None:
    repo = faulty(partitions=2)
    claims = repo.fail(kinds="active_writer", times=3)
    async with Kapbit(
        [saga(Script())], repo, options=fast_options(fail_max=3, reset_timeout=0.01)
    ) as kbit:
        assert claims.hits == 3
        assert kbit.gate.closures == 1  # the breaker opened during the claims ...
        assert kbit.gate.is_open  # ... and nothing was left to reopen the gate
        assert (await kbit.exec_workflow("w", "saga", {"id": "w"}))["values"]


async def test_storage_breaker_thresholds_come_from_the_options() -> None:
    repo = faulty()
    async with Kapbit(
        [saga(Script())], repo, options=fast_options(fail_max=5, reset_timeout=0.01)
    ) as kbit:
        repo.fail(kinds="step_outcome", times=4)  # one short of fail_max
        await kbit.exec_workflow("w1", "saga", {"id": "w1"})
        assert kbit.gate.closures == 0 and kbit._breaker.current_state == "closed"
        repo.fail(kinds="step_outcome", times=5)
        await kbit.exec_workflow("w2", "saga", {"id": "w2"})
        assert kbit.gate.closures == 1  # opened (closing the gate), then recovered
        assert kbit.gate.is_open and kbit._breaker.current_state == "closed"
