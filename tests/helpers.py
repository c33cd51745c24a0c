"""Shared test helpers: a recording 3-step saga and readers of the in-memory log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kapbit import Definition, Failure, JsonCodec, MemRepository, Progress, Step, Success
from kapbit.codecs import Codec
from kapbit.events import Event
from kapbit.restore import decode_event


@dataclass
class Script:
    """What each step does, by (step, phase): "ok", "fail" (business Failure) or "raise"."""

    behaviour: dict[tuple[int, str], str] = field(default_factory=dict)
    calls: list[tuple[str, int, str]] = field(default_factory=list)
    seen: list[tuple[int, str, list[tuple[int, Any]]]] = field(default_factory=list)

    def action(self, step: int, phase: str) -> Callable[[Any, Progress], Any]:
        async def act(input: Any, progress: Progress) -> Any:
            wid = input["id"] if isinstance(input, dict) else str(input)
            self.calls.append((wid, step, phase))
            self.seen.append((step, phase, [(i, o.value) for i, o in progress.executions]))
            what = self.behaviour.get((step, phase), "ok")
            if what == "raise":
                raise ConnectionError(f"step {step} {phase} unavailable")
            if what == "fail":
                return Failure(f"no-{step}")
            return Success(f"{phase[:4]}-{step}")

        return act


def saga(
    script: Script, steps: int = 3, compensate: tuple[int, ...] | None = None, name: str = "saga"
) -> Definition:
    """A ``steps``-step saga; steps listed in ``compensate`` (all by default) compensate."""
    with_comp = range(steps) if compensate is None else compensate
    return Definition(
        name,
        steps=[
            Step(
                script.action(i, "execute"),
                script.action(i, "compensate") if i in with_comp else None,
                name=f"s{i}",
            )
            for i in range(steps)
        ],
        result=lambda input, progress: {
            "values": progress.values(),
            "compensated": [i for i, _ in progress.compensations],
        },
        input_type=dict[str, Any],
        outcome_type=str,
    )


def log_events(repo: MemRepository, codec: Codec | None = None) -> list[tuple[int, int, Event]]:
    """Every record of the log decoded, as ``(partition, offset, event)``."""
    codec = codec or JsonCodec()
    return [(r.partition, r.offset, decode_event(codec, r)) for r in repo.records()]


def kinds(repo: MemRepository, workflow_id: str | None = None) -> list[str]:
    """The kinds of the records of the log (of one workflow when an id is given)."""
    return [r.kind for r in repo.records() if workflow_id is None or r.key == workflow_id]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` on every loop turn until it holds; fail after ``timeout``."""

    async def _poll() -> None:
        while not predicate():  # noqa: ASYNC110 - engine state has no event to wait on
            await asyncio.sleep(0.001)

    await asyncio.wait_for(_poll(), timeout)


# --- resilience helpers (emitter, breaker, retry worker, faults) ------------------------------

import logging  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402

import pybreaker  # noqa: E402

from kapbit import Backoff, BreakerPolicy, Options, RetryPolicy  # noqa: E402


class Clock:
    """An injectable ``sleep`` that records every delay and returns on the next loop turn.

    Delays of at least ``hold_from`` seconds (the retry worker's slow interval) instead wait
    for a :meth:`tick` each, so a test decides when a slow interval has passed.
    """

    def __init__(self, hold_from: float | None = None) -> None:
        self.delays: list[float] = []
        self.hold_from = hold_from
        self.held = 0
        self._ticks = asyncio.Semaphore(0)

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.hold_from is not None and delay >= self.hold_from:
            self.held += 1
            try:
                await self._ticks.acquire()
            finally:
                self.held -= 1
        else:
            await asyncio.sleep(0)

    def tick(self) -> None:
        """Let one held (slow) sleep finish."""
        self._ticks.release()


class BreakerStates(pybreaker.CircuitBreakerListener):
    """Records a breaker's state changes, e.g. ``["open", "half-open", "closed"]``."""

    def __init__(self) -> None:
        self.changes: list[str] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes.append(new_state.name)


def expire_reset_timeout(storage: pybreaker.CircuitMemoryStorage, seconds: float) -> None:
    """Move an open breaker's clock past ``seconds``, as if its reset timeout had passed."""
    storage.opened_at = datetime.now(UTC) - timedelta(seconds=seconds + 1)


class LogCapture(logging.Handler):
    """Collects the records of the ``kapbit`` loggers (use as a context manager)."""

    def __init__(self, logger: str = "kapbit") -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger(logger)
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> LogCapture:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def of(self, name: str) -> list[logging.LogRecord]:
        """The records of logger ``name`` (exactly)."""
        return [r for r in self.records if r.name == name]


def fast_options(
    *,
    max_attempts: int = 5,
    slow_interval: float = 0.01,
    fail_max: int = 3,
    reset_timeout: float = 0.05,
    **kwargs: Any,
) -> Options:
    """Options with millisecond backoffs, so resilience tests run without waiting."""
    tiny = Backoff(initial=0.001, maximum=0.004, jitter=0.001)
    return Options(
        emit_backoff=tiny,
        retry=RetryPolicy(fast=tiny, slow_interval=slow_interval, max_attempts=max_attempts),
        storage_breaker=BreakerPolicy(fail_max=fail_max, reset_timeout=reset_timeout),
        **kwargs,
    )
