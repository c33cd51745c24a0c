"""The time seam: every reading of the clock and every timed wait goes through a :class:`Clock`.

Wall time (:meth:`Clock.now`) stamps events (their ``at``) and decides when durable
timers and schedules are due, because those times are written to the log and must mean
the same on every instance. Monotonic time (:meth:`Clock.monotonic`) measures intervals
inside one process (backoffs, timeouts). Tests inject
:class:`kapbit.testing.ManualClock`, so no test sleeps for real.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

#: The longest a :class:`SystemClock` naps in :meth:`~SystemClock.sleep_until` before it
#: reads the wall clock again: a wall clock stepped forward (NTP, a resumed VM) makes a
#: wall-time wait end at most this late.
MAX_NAP = 60.0


@runtime_checkable
class Clock(Protocol):
    """Where an instance reads the time and waits for it."""

    def now(self) -> float:
        """Wall time in seconds since the epoch (UTC): event stamps, timer fire times."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: intervals within this process."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of monotonic time (``<= 0``: yield to the loop once)."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Wait until :meth:`now` is at least ``when`` (wall time, seconds since epoch)."""
        ...


class SystemClock:
    """The real clock: :func:`time.time`, :func:`time.monotonic` and :func:`asyncio.sleep`."""

    __slots__ = ()

    # The C functions themselves, not methods calling them: no Python frame per reading
    # (every event is stamped).
    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    async def sleep_until(self, when: float) -> None:
        # asyncio sleeps on the monotonic clock; re-reading the wall clock after each nap
        # bounds how late a wall clock step can make this wait end (MAX_NAP).
        while True:
            remaining = when - time.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, MAX_NAP))


#: The clock of an instance that is given none.
SYSTEM_CLOCK = SystemClock()


def utc_now(clock: Clock) -> datetime:
    """:meth:`Clock.now` as an aware ``datetime`` in UTC."""
    return datetime.fromtimestamp(clock.now(), UTC)
