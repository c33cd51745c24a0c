"""The scheduler: one task per instance that starts every schedule's firings on time.

It learns each schedule's last firing from the ids the log vouches for (the idempotency
windows after recovery, :func:`kapbit.schedules.last_firing`), then loops: sleep on the
clock until the earliest next fire time, start what :func:`kapbit.schedules.due_firings`
returns, repeat. A firing starts under its deterministic id, so a start refused as
:class:`~kapbit.errors.DuplicateWorkflow` means another start (before a restart, or by the
instance this one took over from) already created it: at most one workflow per firing.
See docs/ARCHITECTURE.md, "Schedules".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from kapbit._log import fields
from kapbit.clock import Clock, utc_now
from kapbit.errors import DuplicateWorkflow, Fenced, InstanceClosed, InvalidSchedule
from kapbit.schedules import Firing, Schedule, last_firing

logger = logging.getLogger("kapbit")

#: How long the scheduler waits before it tries again to start a firing that was refused
#: for a passing reason (the entry gate closed, no free slot, a storage error).
RETRY_DELAY = timedelta(seconds=1)


class StartFiring(Protocol):
    """Starts a firing's workflow: returns once its ``WorkflowCreated`` is durable, raises
    the refusal otherwise (``Kapbit.start_workflow`` by type name)."""

    async def __call__(self, workflow_id: str, workflow_type: str, input: Any) -> object: ...


@dataclass(frozen=True, slots=True)
class Started:
    """What the scheduler did with one due firing."""

    firing: Firing
    #: ``"started"``: this instance created it; ``"duplicate"``: it was already created;
    #: ``"not-owner"``: another instance owns its partition and starts it.
    how: Literal["started", "duplicate", "not-owner"]


def check_schedules(
    schedules: Iterable[object], check_input: Callable[[Schedule], str | None]
) -> tuple[Schedule, ...]:
    """The schedules of an instance, checked before anything is written.

    Each must be a :class:`Schedule` with a name of its own; ``check_input`` returns why a
    schedule's workflow type or input cannot be started (``None``: it can). Raises
    :class:`~kapbit.errors.InvalidSchedule` naming the first bad schedule.
    """
    checked: list[Schedule] = []
    names: set[str] = set()
    for schedule in schedules:
        if not isinstance(schedule, Schedule):
            raise InvalidSchedule(repr(schedule), type(schedule).__name__, "expected a Schedule")
        if schedule.name in names:
            raise InvalidSchedule(schedule.name, schedule.name, "the name is declared twice")
        problem = check_input(schedule)
        if problem is not None:
            raise InvalidSchedule(schedule.name, schedule.workflow, problem)
        names.add(schedule.name)
        checked.append(schedule)
    return tuple(checked)


class Scheduler:
    """Starts the firings of ``schedules`` on ``clock``; one per instance.

    ``known_ids`` are the workflow ids the log still vouches for (every partition's
    idempotency window after recovery): each schedule's last firing is the newest of its
    firing ids among them. ``owns`` says whether this instance starts a given firing id
    (the owner of the partition the id hashes to); the others are left to their owner.
    """

    def __init__(
        self,
        schedules: Sequence[Schedule],
        clock: Clock,
        known_ids: Iterable[str],
        owns: Callable[[str], bool],
    ) -> None:
        ids = list(known_ids)
        self._schedules = tuple(schedules)
        self._clock = clock
        self._owns = owns
        self._last: dict[str, datetime | None] = {
            schedule.name: last_firing(schedule.name, ids) for schedule in self._schedules
        }

    @property
    def last(self) -> Mapping[str, datetime | None]:
        """Each schedule's newest firing known to be started (``None``: none known)."""
        return dict(self._last)

    def next_wake(self, now: datetime) -> datetime | None:
        """The earliest fire time of any schedule after ``now`` (``None``: no schedules)."""
        times = [schedule.next_after(now) for schedule in self._schedules]
        return min(times) if times else None

    async def fire_due(self, start: StartFiring) -> tuple[list[Started], bool]:
        """Start every firing due now, oldest first per schedule; return what was done and
        whether one was refused for a passing reason (try again soon).

        Raises :class:`~kapbit.errors.Fenced` / :class:`~kapbit.errors.InstanceClosed`
        when the instance stops.
        """
        now = utc_now(self._clock)
        done: list[Started] = []
        retry = False
        for schedule in self._schedules:
            for firing in schedule.due_firings(self._last[schedule.name], now):
                how: Literal["started", "duplicate", "not-owner"] = "not-owner"
                if self._owns(firing.workflow_id):
                    try:
                        await start(firing.workflow_id, schedule.workflow, schedule.input)
                        how = "started"
                    except DuplicateWorkflow:
                        how = "duplicate"
                    except (Fenced, InstanceClosed):
                        raise
                    except Exception as error:  # a refusal or storage error: try again soon
                        logger.warning(
                            "schedule %s: firing %s not started, trying again: %s",
                            schedule.name,
                            firing.workflow_id,
                            error,
                            extra=fields(),
                        )
                        retry = True
                        break  # keep the order: later firings wait for this one
                self._last[schedule.name] = firing.at
                done.append(Started(firing, how))
        return done, retry

    async def run(self, start: StartFiring) -> None:
        """Fire what is due, sleep until the next fire time, forever; returns when the
        instance stops (fenced or closed)."""
        if not self._schedules:
            return
        while True:
            try:
                _, retry = await self.fire_due(start)
                now = utc_now(self._clock)
                wake = self.next_wake(now)
            except (Fenced, InstanceClosed):
                return
            except Exception:  # a schedule that cannot compute its times: stop, loudly
                # (a task of the instance's TaskHost must not raise: it would stop them all)
                logger.exception("the scheduler stops: a schedule failed", extra=fields())
                return
            assert wake is not None
            if retry:
                wake = min(wake, now + RETRY_DELAY)
            await self._clock.sleep_until(wake.timestamp())
