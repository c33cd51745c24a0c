"""Schedules: start a workflow at cron-expression or interval times, once per firing.

A :class:`Schedule` is declared in code. Each firing starts its workflow under a
deterministic id, the schedule's name and the fire time in UTC
(``"nightly-report@2026-11-21T02:00:00Z"``), so the idempotency window refuses a second
start of the same firing on any instance. The last firing is read back from the log (the
newest such id, :func:`last_firing`), never from local state, and :func:`due_firings`
decides, purely from that and the time now, which firings to start under the schedule's
:class:`CatchUp` policy.

Cron expressions are evaluated by ``cronsim`` (the ``schedules`` extra:
``pip install 'kapbit[schedules]'``), which follows Debian cron, also across daylight
saving time in the schedule's ``tz``: a firing in a skipped hour runs right after the
clocks jump, one in a repeated hour runs once, at its first occurrence (for 5-field
expressions whose minute and hour fields do not start with ``*``; others fire on real
time, so the repeated hour fires twice, under distinct UTC ids). Intervals count from
``anchor`` (default: the Unix epoch) in UTC and know no daylight saving time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import import_module
from types import ModuleType
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kapbit.errors import InvalidSchedule

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ID_TIME = "%Y-%m-%dT%H:%M:%SZ"
_ID_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# DST changes move local time by less than three hours (cronsim/Debian handle those
# specially); a forward scan started this far before a backward estimate sees them all.
_DST_MARGIN = timedelta(hours=3)


def _cronsim() -> ModuleType:
    try:
        return import_module("cronsim")
    except ImportError as exc:
        raise ImportError(
            "cron schedules need the 'schedules' extra: pip install 'kapbit[schedules]'"
        ) from exc


@dataclass(frozen=True, slots=True)
class CatchUp:
    """What a schedule does about firings missed while no instance ran.

    ``CatchUp.SKIP`` starts only a firing that is on time (at most the schedule's
    ``grace`` late); ``CatchUp.LATEST`` starts the newest due firing however late;
    ``CatchUp.ALL(max=N)`` starts every missed firing, oldest first, but at most the ``N``
    newest (older ones are skipped).
    """

    mode: Literal["skip", "latest", "all"]
    max: int = 1

    SKIP: ClassVar[CatchUp]
    LATEST: ClassVar[CatchUp]

    @staticmethod
    def ALL(max: int) -> CatchUp:
        """Start every missed firing, at most the ``max`` newest."""
        if isinstance(max, bool) or not isinstance(max, int) or max < 1:
            raise ValueError(f"CatchUp.ALL needs max of at least 1, got {max!r}")
        return CatchUp("all", max)


CatchUp.SKIP = CatchUp("skip")
CatchUp.LATEST = CatchUp("latest")


@dataclass(frozen=True, slots=True)
class Firing:
    """One firing of a schedule: when it is due and the workflow id it starts."""

    schedule: str
    at: datetime
    workflow_id: str


@dataclass(frozen=True, slots=True)
class Schedule:
    """Start ``workflow`` (a registered type) with ``input`` at each firing.

    Exactly one of ``cron`` (a 5-field, or 6-field with seconds, cron expression,
    evaluated in ``tz``) and ``every`` (a whole number of seconds, counted from
    ``anchor``). ``name`` prefixes the firing ids and may not contain ``@``. ``grace`` is
    how late a firing may start and still count as on time (``CatchUp.SKIP``, and the
    first firing when no earlier one is known).
    """

    name: str
    workflow: str
    cron: str | None = None
    every: timedelta | None = None
    input: Any = None
    catch_up: CatchUp = CatchUp.SKIP
    tz: str = "UTC"
    anchor: datetime = _EPOCH
    grace: timedelta = timedelta(minutes=1)
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name or "@" in name:
            raise InvalidSchedule(str(name), str(name), "a name is a non-empty text without '@'")
        if not isinstance(self.workflow, str) or not self.workflow:
            raise InvalidSchedule(name, str(self.workflow), "workflow must name a workflow type")
        if (self.cron is None) == (self.every is None):
            given = f"cron={self.cron!r}, every={self.every!r}"
            raise InvalidSchedule(name, given, "give exactly one of cron and every")
        if not isinstance(self.catch_up, CatchUp):
            raise InvalidSchedule(name, repr(self.catch_up), "catch_up must be a CatchUp")
        if not isinstance(self.grace, timedelta) or self.grace < timedelta(0):
            raise InvalidSchedule(name, str(self.grace), "grace must be a timedelta >= 0")
        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
            raise InvalidSchedule(name, str(self.tz), f"unknown time zone ({exc})") from None
        object.__setattr__(self, "_zone", zone)
        if self.cron is not None:
            self._check_cron(self.cron)
        else:
            self._check_every(self.every)

    def _check_cron(self, expression: object) -> None:
        if not isinstance(expression, str):
            raise InvalidSchedule(self.name, repr(expression), "cron must be a text")
        cronsim = _cronsim()
        try:
            cronsim.CronSim(expression, datetime(2000, 1, 1, tzinfo=self._zone))
        except cronsim.CronSimError as exc:
            raise InvalidSchedule(self.name, expression, str(exc) or "bad expression") from None

    def _check_every(self, every: object) -> None:
        if not isinstance(every, timedelta):
            raise InvalidSchedule(self.name, repr(every), "every must be a timedelta")
        if every < timedelta(seconds=1) or every % timedelta(seconds=1):
            raise InvalidSchedule(self.name, str(every), "every must be whole seconds, >= 1 s")
        anchor = self.anchor
        if not isinstance(anchor, datetime) or anchor.tzinfo is None or anchor.microsecond:
            raise InvalidSchedule(
                self.name, repr(anchor), "anchor must be an aware datetime in whole seconds"
            )

    def workflow_id(self, at: datetime) -> str:
        """The id of the firing at ``at``: ``"<name>@<UTC ISO-8601 second>Z"``."""
        return f"{self.name}@{_utc(at).strftime(_ID_TIME)}"

    def firing(self, at: datetime) -> Firing:
        """The :class:`Firing` at ``at``."""
        return Firing(self.name, _utc(at), self.workflow_id(at))

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after``, in UTC."""
        after = _utc(after)
        if self.every is not None:
            period = self.every
            elapsed = after - _utc(self.anchor)
            return _utc(self.anchor) + (elapsed // period + 1) * period
        assert self.cron is not None
        cron = _cronsim().CronSim(self.cron, after.astimezone(self._zone))
        try:
            fire: datetime = next(cron)
        except StopIteration:  # cronsim gives up after 50 years without a match
            raise InvalidSchedule(self.name, self.cron, "no fire time within 50 years") from None
        return _utc(fire)

    def fire_times(self, after: datetime, until: datetime) -> list[datetime]:
        """Every fire time in ``(after, until]``, oldest first (unbounded: see
        :meth:`newest_fire_times`)."""
        times: list[datetime] = []
        fire = self.next_after(after)
        while fire <= until:
            times.append(fire)
            fire = self.next_after(fire)
        return times

    def newest_fire_times(self, after: datetime | None, until: datetime, n: int) -> list[datetime]:
        """The newest ``n`` fire times in ``(after, until]`` (``after=None``: no lower
        bound), oldest first; the work is bounded by ``n``, not by the length of the span."""
        until = _utc(until)
        low = _EPOCH if after is None else _utc(after)
        if self.every is not None:
            period = self.every
            last = _utc(self.anchor) + ((until - _utc(self.anchor)) // period) * period
            times = [last - k * period for k in range(n)]
            return [t for t in reversed(times) if t > low and t >= _utc(self.anchor)]
        # cronsim's backward iteration steps around DST gaps differently from its forward
        # one, so it only estimates where to start; the answer is the forward sequence.
        start = max(low, self._back(until, n) - _DST_MARGIN)
        while True:
            times = self.fire_times(start, until)
            if len(times) >= n or start <= low:
                return times[-n:] if times else []
            start = max(low, start - 2 * (until - start))

    def _back(self, until: datetime, n: int) -> datetime:
        if self.cron is None:
            raise AssertionError("only cron schedules step backwards")
        start = until.astimezone(self._zone) + timedelta(seconds=1)
        cron = _cronsim().CronSim(self.cron, start, reverse=True)
        earliest = until
        for _ in range(n):
            try:
                earliest = _utc(next(cron))
            except StopIteration:
                break
        return earliest

    def due_firings(self, last: datetime | None, now: datetime) -> list[Firing]:
        """The firings to start at ``now``, oldest first, given the newest firing known
        to have started (``last``, from :func:`last_firing`; ``None`` if none is known).

        Only firings after ``last`` count. With no known firing, nothing was missed: only
        an on-time firing (at most ``grace`` late) starts, whatever the policy.
        """
        now = _utc(now)
        policy = self.catch_up
        if last is None or policy.mode == "skip":
            newest = self.newest_fire_times(last, now, 1)
            on_time = [t for t in newest if now - t <= self.grace]
            return [self.firing(t) for t in on_time]
        count = policy.max if policy.mode == "all" else 1
        return [self.firing(t) for t in self.newest_fire_times(last, now, count)]


def due_firings(schedule: Schedule, last: datetime | None, now: datetime) -> list[Firing]:
    """:meth:`Schedule.due_firings` as a function."""
    return schedule.due_firings(last, now)


def firing_time(schedule: str, workflow_id: str) -> datetime | None:
    """The fire time encoded in ``workflow_id`` if it is a firing id of ``schedule``."""
    prefix = f"{schedule}@"
    if not workflow_id.startswith(prefix):
        return None
    stamp = workflow_id[len(prefix) :]
    if not _ID_PATTERN.fullmatch(stamp):
        return None
    try:
        return datetime.strptime(stamp, _ID_TIME).replace(tzinfo=UTC)
    except ValueError:  # e.g. a 13th month: not an id this module wrote
        return None


def last_firing(schedule: str, workflow_ids: Iterable[str]) -> datetime | None:
    """The newest fire time among ``workflow_ids`` that are firings of ``schedule``.

    Give it the ids the log still vouches for: every partition's idempotency window after
    recovery (a firing's id lands in the partition its id hashes to, so all of them).
    """
    newest: datetime | None = None
    for workflow_id in workflow_ids:
        at = firing_time(schedule, workflow_id)
        if at is not None and (newest is None or at > newest):
            newest = at
    return newest


def _utc(at: datetime) -> datetime:
    if not isinstance(at, datetime) or at.tzinfo is None:
        raise ValueError(f"schedules need aware datetimes, got {at!r}")
    return at.astimezone(UTC)
