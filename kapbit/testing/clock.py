"""A clock that moves only when the test says so."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(order=True)
class _Sleeper:
    deadline: float
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class ManualClock:
    """A :class:`kapbit.clock.Clock` for tests: time stands still until :meth:`advance`.

    :meth:`advance` moves wall and monotonic time together and wakes every sleeper whose
    deadline has come, earliest deadline first (ties in the order they went to sleep);
    :meth:`set_wall` steps only the wall clock, as NTP does. Nothing here sleeps for real:
    a woken sleeper runs when the test next yields to the loop, for example while it
    awaits the result it expects with a timeout. :meth:`wait_for_sleepers` lets a test
    advance only once the code under test is waiting.
    """

    def __init__(self, start: datetime | float = datetime(2026, 1, 1, tzinfo=UTC)) -> None:
        if isinstance(start, datetime):
            if start.tzinfo is None:
                raise ValueError(f"ManualClock needs an aware start datetime, got {start!r}")
            start = start.timestamp()
        self._wall = float(start)
        self._mono = 0.0
        self._wall_sleepers: list[_Sleeper] = []
        self._mono_sleepers: list[_Sleeper] = []
        self._seq = itertools.count()
        self._changed: asyncio.Condition | None = None

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def now_datetime(self) -> datetime:
        """The wall time as an aware ``datetime`` in UTC."""
        return datetime.fromtimestamp(self._wall, UTC)

    async def sleep(self, seconds: float) -> None:
        await self._wait(self._mono_sleepers, self._mono + seconds, seconds <= 0)

    async def sleep_until(self, when: float) -> None:
        await self._wait(self._wall_sleepers, when, when <= self._wall)

    async def _wait(self, sleepers: list[_Sleeper], deadline: float, due: bool) -> None:
        if due:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(sleepers, _Sleeper(deadline, next(self._seq), future))
        await self._notify()
        await future  # a cancelled sleeper's future is cancelled with it, and skipped

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting now."""
        return sum(
            not s.future.done() for s in itertools.chain(self._wall_sleepers, self._mono_sleepers)
        )

    def next_deadline(self) -> float | None:
        """The earliest pending wall-time deadline (``sleep_until``), or ``None``."""
        live = [s.deadline for s in self._wall_sleepers if not s.future.done()]
        return min(live) if live else None

    def advance(self, seconds: float) -> int:
        """Move wall and monotonic time forward by ``seconds``; return how many sleepers
        woke."""
        if seconds < 0:
            raise ValueError(f"time cannot go back: advance({seconds})")
        self._wall += seconds
        self._mono += seconds
        return self._wake()

    def advance_to(self, when: datetime | float) -> int:
        """Advance to the wall time ``when`` (not earlier than now)."""
        target = when.timestamp() if isinstance(when, datetime) else when
        return self.advance(target - self._wall)

    def set_wall(self, when: datetime | float) -> int:
        """Step only the wall clock to ``when``, forward or back (monotonic time stays)."""
        self._wall = when.timestamp() if isinstance(when, datetime) else float(when)
        return self._wake()

    def _wake(self) -> int:
        # Both kinds are ordered on the monotonic scale (a wall deadline shifted by the
        # current wall - monotonic offset); resolving in that order runs them in it.
        due: list[tuple[float, int, _Sleeper]] = []
        shift = self._wall - self._mono
        for sleepers, now, offset in (
            (self._wall_sleepers, self._wall, shift),
            (self._mono_sleepers, self._mono, 0.0),
        ):
            while sleepers and sleepers[0].deadline <= now:
                sleeper = heapq.heappop(sleepers)
                due.append((sleeper.deadline - offset, sleeper.seq, sleeper))
        woken = 0
        for _, _, sleeper in sorted(due, key=lambda d: (d[0], d[1])):
            if not sleeper.future.done():
                sleeper.future.set_result(None)
                woken += 1
        return woken

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def wait_for_sleepers(self, count: int = 1, timeout: float = 5.0) -> None:
        """Return once at least ``count`` sleeps are waiting; TimeoutError after ``timeout``
        seconds of real time (a test that never reaches its wait fails, not hangs)."""
        await self._wait_until(lambda: self.sleepers >= count, timeout)

    async def wait_for_deadline(self, when: float, timeout: float = 5.0) -> None:
        """Return once a ``sleep_until(when)`` is waiting (the code under test chose that
        deadline); TimeoutError after ``timeout`` seconds of real time."""
        await self._wait_until(
            lambda: any(s.deadline == when and not s.future.done() for s in self._wall_sleepers),
            timeout,
        )

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with asyncio.timeout(timeout), changed:
            await changed.wait_for(predicate)
