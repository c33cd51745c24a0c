"""The retry worker: fast mode, slow mode (one probe at a time), dead letters, and the
retry path of a real instance (resume from the failed step, counts that survive restarts)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from kapbit import (
    Backoff,
    BreakerPolicy,
    DeadLettered,
    Definition,
    DuplicateWorkflow,
    Fenced,
    Kapbit,
    Progress,
    RecordRejected,
    RetryPolicy,
    Step,
    Success,
    TooManyWorkflows,
    WillRetryLater,
    WorkflowNotFound,
)
from kapbit.events import DeadLetter, WorkflowRetry
from kapbit.execution import StepRaised, WorkflowExecution
from kapbit.gate import EntryGate
from kapbit.repository import MemRepository
from kapbit.retry_worker import RetryWorker
from tests.helpers import (
    Clock,
    LogCapture,
    Script,
    fast_options,
    kinds,
    log_events,
    saga,
    wait_until,
)

SLOW = 30.0
FAST = Backoff(initial=0.01, maximum=0.04, jitter=0.0)


@dataclass
class Fake:
    """Stands in for the instance: counts attempts, fails while ``down``, tracks overlap."""

    gate: EntryGate
    down: bool = True
    hold: asyncio.Event | None = None
    running: int = 0
    most_running: int = 0
    attempts: list[tuple[str, int]] = field(default_factory=list)
    given_up: list[tuple[str, int]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    error: BaseException | None = None

    async def attempt(self, execution: WorkflowExecution) -> None:
        execution.attempts += 1
        self.attempts.append((execution.id, execution.attempts))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.error is not None:
                raise self.error
            if self.down:
                raise StepRaised(execution.id, 0, "execute", ConnectionError("down"))
        finally:
            self.running -= 1
        self.finished.append(execution.id)
        self.gate.open()  # what Kapbit._finish does after a success

    async def give_up(self, execution: WorkflowExecution) -> None:
        self.given_up.append((execution.id, execution.attempts))


def worker(
    *, max_attempts: int = 5, clock: Clock | None = None, gate: EntryGate | None = None
) -> tuple[RetryWorker, Fake, Clock]:
    gate = gate or EntryGate()
    fake = Fake(gate)
    clock = clock or Clock(hold_from=SLOW)
    policy = RetryPolicy(fast=FAST, slow_interval=SLOW, max_attempts=max_attempts)
    return RetryWorker(policy, gate, fake, sleep=clock.sleep), fake, clock


def execution(workflow_id: str, attempts: int = 0) -> WorkflowExecution:
    return WorkflowExecution(workflow_id, saga(Script()), 0, {"id": workflow_id}, attempts=attempts)


# --- fast mode --------------------------------------------------------------------------------


async def test_fast_mode_backs_off_exponentially_then_gives_up_after_the_limit() -> None:
    retry, fake, clock = worker(max_attempts=5)
    await retry.start()
    retry.schedule(execution("a"))
    await wait_until(lambda: fake.given_up != [])
    assert fake.attempts == [("a", n) for n in range(1, 6)]
    assert fake.given_up == [("a", 5)]
    # A wait before each attempt: initial, doubling, capped.
    assert clock.delays == [0.01, 0.02, 0.04, 0.04, 0.04]
    await wait_until(lambda: len(retry) == 0)


async def test_a_successful_attempt_ends_the_retries() -> None:
    retry, fake, clock = worker(max_attempts=1000)
    await retry.start()
    retry.schedule(execution("a"))
    await wait_until(lambda: len(fake.attempts) >= 2)
    fake.down = False
    await wait_until(lambda: fake.finished == ["a"])
    await wait_until(lambda: len(retry) == 0)
    assert fake.given_up == []
    assert len(clock.delays) == len(fake.attempts)  # no attempt after the success


async def test_a_workflow_restored_with_its_attempts_used_up_is_given_up_at_once() -> None:
    retry, fake, clock = worker(max_attempts=3)
    await retry.start()
    retry.schedule(execution("a", attempts=3))
    await wait_until(lambda: fake.given_up != [])
    assert fake.given_up == [("a", 3)] and fake.attempts == [] and clock.delays == []


async def test_a_restored_workflow_continues_its_attempt_count() -> None:
    retry, fake, _ = worker(max_attempts=4)
    await retry.start()
    retry.schedule(execution("a", attempts=2))
    await wait_until(lambda: fake.given_up != [])
    assert fake.attempts == [("a", 3), ("a", 4)] and fake.given_up == [("a", 4)]


async def test_fast_mode_retries_workflows_concurrently() -> None:
    retry, fake, _ = worker()
    await retry.start()
    fake.hold = asyncio.Event()
    for name in "abc":
        retry.schedule(execution(name))
    await wait_until(lambda: fake.running == 3)
    fake.hold.set()
    fake.down = False
    await wait_until(lambda: sorted(fake.finished) == ["a", "b", "c"])


async def test_scheduling_a_workflow_twice_is_refused() -> None:
    retry, _, _ = worker()
    await retry.start()
    retry.schedule(execution("a"))
    with pytest.raises(RuntimeError, match="already scheduled"):
        retry.schedule(execution("a"))
    await retry.close()


async def test_stop_cancels_pending_retries_without_giving_up() -> None:
    retry, fake, _ = worker()
    await retry.start()
    fake.hold = asyncio.Event()
    retry.schedule(execution("a"))
    retry.schedule(execution("b"))
    await wait_until(lambda: fake.running == 2)
    await retry.close()
    assert len(retry) == 0 and fake.given_up == [] and fake.finished == []


# --- slow mode ------------------------------------------------------------------------------


async def test_slow_mode_probes_one_workflow_at_a_time_after_the_slow_interval() -> None:
    retry, fake, clock = worker(max_attempts=100)
    await retry.start()
    fake.gate.close("test breaker")
    for name in "abcd":
        retry.schedule(execution(name))
    await wait_until(lambda: clock.held == 1)
    # One workflow is the probe and waits out the slow interval; nobody attempted yet.
    assert retry.probing is not None and fake.attempts == []
    probes: list[str] = []
    for n in range(1, 9):
        clock.tick()
        await wait_until(lambda n=n: len(fake.attempts) == n and clock.held == 1)  # type: ignore[misc]
        probes.append(fake.attempts[-1][0])
    assert fake.most_running == 1
    assert SLOW in clock.delays
    # Every waiting workflow gets its turn as the probe.
    assert set(probes) == set("abcd")
    # The dependency is back: the next probe succeeds, reopens the gate, and the others
    # follow at once, without waiting for another slow interval.
    fake.down = False
    clock.tick()
    await wait_until(lambda: sorted(fake.finished) == list("abcd"))
    assert fake.gate.is_open and clock.held == 0


async def test_gate_reopening_during_the_slow_wait_sends_everyone_back_to_fast_mode() -> None:
    retry, fake, clock = worker()
    await retry.start()
    fake.gate.close("test breaker")
    fake.down = False
    for name in "abc":
        retry.schedule(execution(name))
    await wait_until(lambda: clock.held == 1)
    fake.gate.open()  # e.g. a new workflow completed
    await wait_until(lambda: sorted(fake.finished) == list("abc"))
    assert clock.held == 0
    assert [delay for delay in clock.delays if delay == SLOW] == [SLOW]  # never completed


async def test_waiters_do_not_wait_for_a_slow_probe_once_the_gate_reopens() -> None:
    retry, fake, clock = worker()
    await retry.start()
    fake.gate.close("test breaker")
    fake.hold = asyncio.Event()
    fake.down = False
    for name in "abc":
        retry.schedule(execution(name))
    await wait_until(lambda: clock.held == 1)
    clock.tick()
    await wait_until(lambda: fake.running == 1)  # the probe hangs in its step
    fake.gate.open()
    await wait_until(lambda: fake.running == 3)  # the others run beside it
    fake.hold.set()
    await wait_until(lambda: len(fake.finished) == 3)


async def test_a_gate_closing_mid_retry_moves_the_next_attempts_to_slow_mode() -> None:
    retry, fake, clock = worker(max_attempts=100)
    await retry.start()
    for name in "ab":
        retry.schedule(execution(name))
    await wait_until(lambda: len(fake.attempts) >= 4)  # fast mode, both retrying
    fake.gate.close("test breaker")
    await wait_until(lambda: clock.held == 1)
    attempts = len(fake.attempts)
    for _ in range(3):  # let the slow-mode loop turn; nobody may attempt without a tick
        await asyncio.sleep(0)
    assert len(fake.attempts) == attempts
    await retry.close()


# --- errors ---------------------------------------------------------------------------------


async def test_an_unexpected_error_is_logged_with_the_workflow_and_not_retried() -> None:
    retry, fake, _ = worker()
    await retry.start()
    fake.error = RecordRejected("refused")
    with LogCapture("kapbit.retry") as logs:
        retry.schedule(execution("a"))
        await wait_until(lambda: len(retry) == 0)
    assert fake.attempts == [("a", 1)] and fake.given_up == []
    errors = [r for r in logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert (errors[0].workflow_id, errors[0].workflow_type, errors[0].partition) == (  # type: ignore[attr-defined]
        "a",
        "saga",
        0,
    )


async def test_fenced_ends_the_retries_quietly() -> None:
    retry, fake, _ = worker()
    await retry.start()
    fake.error = Fenced("another node")
    with LogCapture("kapbit.retry") as logs:
        retry.schedule(execution("a"))
        await wait_until(lambda: len(retry) == 0)
    assert [r.levelno for r in logs.records] == [logging.DEBUG]


# --- through a real instance ------------------------------------------------------------------


class Flaky:
    """A step that raises on its first ``failures`` calls (``None``: always) and blocks on
    call number ``block_at`` until ``release`` is set."""

    def __init__(self, failures: int | None = None, block_at: int | None = None) -> None:
        self.failures = failures
        self.block_at = block_at
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, input: Any, progress: Progress) -> Success[str]:
        self.calls += 1
        if self.calls == self.block_at:
            await self.release.wait()
        if self.failures is None or self.calls <= self.failures:
            raise ConnectionError(f"call {self.calls}: service unavailable")
        return Success("flaky-ok")


def flaky_definition(flaky: Flaky, script: Script) -> Definition:
    """Step 0 from the script, step 1 flaky, step 2 from the script."""
    return Definition(
        "flaky",
        [Step(script.action(0, "execute")), Step(flaky), Step(script.action(2, "execute"))],
        result=lambda input, progress: progress.values(),
        input_type=dict[str, Any],
        outcome_type=str,
    )


def retries(repo: MemRepository, workflow_id: str) -> list[int]:
    return [e.attempt for _, _, e in log_events(repo) if isinstance(e, WorkflowRetry)]


async def test_retry_resumes_from_the_failed_step_and_records_each_attempt() -> None:
    script, flaky = Script(), Flaky(failures=3)
    repo = MemRepository()
    async with Kapbit([flaky_definition(flaky, script)], repo, options=fast_options()) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "flaky", {"id": "w"})
        assert await kbit.wait_result("w", timeout=5) == ["exec-0", "flaky-ok", "exec-2"]
        stats = kbit.stats
    # Step 0 ran once: a retry resumes at the step that raised.
    assert [c for c in script.calls if c[1] == 0] == [("w", 0, "execute")]
    assert flaky.calls == 4
    assert retries(repo, "w") == [1, 2, 3]
    assert kinds(repo, "w") == [
        "workflow_created",
        "step_outcome",
        "workflow_retry",
        "workflow_retry",
        "workflow_retry",
        "step_outcome",
        "step_outcome",
        "workflow_result",
    ]
    assert (stats.retried, stats.succeeded, stats.in_flight, stats.retrying) == (3, 1, 0, 0)


async def test_retries_then_dead_letter_frees_the_slot_and_keeps_the_id() -> None:
    script, flaky = Script(), Flaky(failures=4)  # the call and 3 attempts
    repo = MemRepository()
    options = fast_options(max_attempts=3, max_workflows=1)
    async with Kapbit([flaky_definition(flaky, script)], repo, options=options) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "flaky", {"id": "w"})
        with pytest.raises(TooManyWorkflows):  # the retrying workflow holds its slot
            await kbit.exec_workflow("x", "flaky", {"id": "x"})
        with pytest.raises(DeadLettered) as caught:
            await kbit.wait_result("w", timeout=5)
        assert caught.value.attempts == 3 and "call 4: service unavailable" in caught.value.error
        # The slot is free again; the id stays taken.
        with pytest.raises(DuplicateWorkflow):
            await kbit.exec_workflow("w", "flaky", {"id": "w"})
        assert (await kbit.exec_workflow("x", "flaky", {"id": "x"}))[1] == "flaky-ok"
        with pytest.raises(DeadLettered):  # asked again after the fact: same answer
            await kbit.wait_result("w")
        assert kbit.stats.dead_lettered == 1
    assert flaky.calls == 1 + 3 + 1
    assert retries(repo, "w") == [1, 2, 3]
    dead = [e for _, _, e in log_events(repo) if isinstance(e, DeadLetter)]
    assert len(dead) == 1 and dead[0].attempts == 3 and "call 4" in dead[0].error
    assert kinds(repo, "w")[-1] == "dead_letter"


async def test_restart_while_retrying_continues_the_attempt_count_from_the_log() -> None:
    script = Script()
    flaky = Flaky(block_at=4)  # the call, attempts 1 and 2 raise; attempt 3 hangs ...
    repo = MemRepository()
    definition = flaky_definition(flaky, script)
    old = Kapbit([definition], repo, options=fast_options(max_attempts=5))
    await old.start()
    with pytest.raises(WillRetryLater):
        await old.exec_workflow("w", "flaky", {"id": "w"})
    await wait_until(lambda: flaky.calls == 4)
    old.abort()  # ... when the process dies
    assert retries(repo, "w") == [1, 2, 3]

    flaky.release.set()
    async with Kapbit([definition], repo, options=fast_options(max_attempts=5)) as new:
        assert new.stats.recovered == 1
        with pytest.raises(DeadLettered) as caught:
            await new.wait_result("w", timeout=5)
    # The new instance made attempts 4 and 5 only, then gave up.
    assert caught.value.attempts == 5
    assert retries(repo, "w") == [1, 2, 3, 4, 5]
    assert flaky.calls == 4 + 2
    assert [c for c in script.calls if c[1] == 0] == [("w", 0, "execute")]
    assert kinds(repo, "w").count("dead_letter") == 1


async def test_restart_while_retrying_then_success_does_not_rerun_done_steps() -> None:
    script = Script()
    flaky = Flaky(failures=4, block_at=3)  # attempt 2 hangs when the process dies
    repo = MemRepository()
    definition = flaky_definition(flaky, script)
    old = Kapbit([definition], repo, options=fast_options(max_attempts=50))
    await old.start()
    with pytest.raises(WillRetryLater):
        await old.exec_workflow("w", "flaky", {"id": "w"})
    await wait_until(lambda: flaky.calls == 3)
    old.abort()
    flaky.release.set()
    async with Kapbit([definition], repo, options=fast_options(max_attempts=50)) as new:
        # Call 4 (attempt 3, the first of the new instance) still fails, call 5 succeeds.
        assert await new.wait_result("w", timeout=5) == ["exec-0", "flaky-ok", "exec-2"]
    assert retries(repo, "w") == [1, 2, 3, 4]
    assert flaky.calls == 5
    assert [c for c in script.calls if c[1] == 0] == [("w", 0, "execute")]
    assert [c for c in script.calls if c[1] == 2] == [("w", 2, "execute")]
    assert kinds(repo, "w")[-1] == "workflow_result"
    with pytest.raises(WorkflowNotFound):
        await new.wait_result("unknown")


async def test_wait_result_times_out_without_harming_the_workflow() -> None:
    script, flaky = Script(), Flaky(failures=1, block_at=2)
    async with Kapbit(
        [flaky_definition(flaky, script)], MemRepository(), options=fast_options()
    ) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("w", "flaky", {"id": "w"})
        with pytest.raises(TimeoutError):
            await kbit.wait_result("w", timeout=0.01)  # attempt 1 hangs in the step
        flaky.release.set()
        assert await kbit.wait_result("w", timeout=5) == ["exec-0", "flaky-ok", "exec-2"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: RetryPolicy(max_attempts=0),
        lambda: RetryPolicy(slow_interval=0),
        lambda: Backoff(initial=0),
        lambda: BreakerPolicy(fail_max=0),
        lambda: BreakerPolicy(reset_timeout=0),
    ],
)
def test_invalid_resilience_options_are_refused(make: Any) -> None:
    with pytest.raises(ValueError):
        make()
