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
