"""Durable timers: what a step returns to make its workflow wait, and the per-instance queue.

An action returns :class:`Sleep` (a duration) or :class:`SleepUntil` (a moment) instead
of ``Success``: the step succeeded with ``value``, and the workflow's next step runs once
the timer expires. The engine persists the wait as one event holding the step's outcome
and the fire time, so a restart, a takeover or an instance that was down when the timer
expired all resume the workflow from the log (docs/ARCHITECTURE.md, "Time and durable
timers").

While it waits, a workflow is one small :class:`SleepingWorkflow` in the instance's one
:class:`TimerQueue`: no task, no thread and no loaded state of its own.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import msgspec

from kapbit.clock import Clock
from kapbit.errors import InvalidTimer

T = TypeVar("T")

# Cancelled entries stay in the heap until popped; past this many (and more than live
# entries) the heap is rebuilt, so cancelling never makes the queue grow without bound.
_COMPACT_AFTER = 1024


@dataclass(frozen=True, slots=True)
class Sleep(Generic[T]):
    """The step succeeded with ``value``; run the next step after ``delay``.

    A zero ``delay`` resumes at once, through the queue.
    """

    delay: timedelta
    value: T = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        delay = self.delay
        if not isinstance(delay, timedelta):
            raise InvalidTimer(f"Sleep needs a timedelta, got {type(delay).__name__}")
        if delay < timedelta(0):
            raise InvalidTimer(f"Sleep needs a delay of zero or more, got {delay}")

    def fire_at(self, now: float) -> float:
        """The wall time (seconds since the epoch) the timer expires, counted from ``now``."""
        return now + self.delay.total_seconds()


@dataclass(frozen=True, slots=True)
class SleepUntil(Generic[T]):
    """The step succeeded with ``value``; run the next step at ``when`` (an aware
    ``datetime``). A moment already past resumes at once."""

    when: datetime
    value: T = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        when = self.when
        if not isinstance(when, datetime):
            raise InvalidTimer(f"SleepUntil needs a datetime, got {type(when).__name__}")
        if when.tzinfo is None or when.utcoffset() is None:
            raise InvalidTimer(
                f"SleepUntil needs an aware datetime (with a tzinfo), got naive {when.isoformat()}"
            )

    def fire_at(self, now: float) -> float:
        """The wall time (seconds since the epoch) the timer expires; ``now`` is unused."""
        return self.when.timestamp()


#: What an action may return to make its workflow wait.
Timer = Sleep[Any] | SleepUntil[Any]


class SleepingWorkflow(msgspec.Struct, frozen=True, order=True, gc=False, array_like=True):
    """All an instance keeps in memory for a sleeping workflow.

    ``fire_at`` is the wall time the timer expires; ``partition`` and ``created_offset``
    locate the workflow's ``WorkflowCreated`` (where its state is read back on waking,
    and what holds the checkpoint); ``step`` is the index of the step that returned the
    timer (the workflow resumes at ``step + 1``). Entries order by fire time, then by
    position in the log, so ties resolve the same way on every instance and after every
    restart. ``gc=False``: the fields are atoms, so the collector need not track entries.
    """

    fire_at: float
    partition: int
    created_offset: int
    workflow_id: str
    step: int


class TimerQueue:
    """The one timer queue of an instance: sleeping workflows by fire time.

    A heap keyed by fire time plus an index by workflow id (one timer per workflow; adding
    a workflow again replaces its timer). Nothing runs per entry: one consumer task calls
    :meth:`wait_due` in a loop and gets the due entries, oldest fire time first, each
    exactly once. Cancelled or replaced entries are dropped lazily, and the heap is rebuilt
    when they outnumber the live ones.
    """

    __slots__ = ("_changed", "_clock", "_heap", "_index", "_stale", "_waiting")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[SleepingWorkflow] = []
        self._index: dict[str, SleepingWorkflow] = {}
        self._stale = 0
        self._waiting = False
        self._changed: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._index

    def get(self, workflow_id: str) -> SleepingWorkflow | None:
        """The pending timer of ``workflow_id``, or ``None``."""
        return self._index.get(workflow_id)

    def add(self, entry: SleepingWorkflow) -> None:
        """Arm ``entry``'s timer, replacing the workflow's pending one if any."""
        if self._index.pop(entry.workflow_id, None) is not None:
            self._stale += 1
        self._index[entry.workflow_id] = entry
        heapq.heappush(self._heap, entry)
        changed = self._changed
        if changed is not None and not changed.done() and self._heap[0] is entry:
            changed.set_result(None)  # the waiter sleeps until a later time: wake it
        self._compact()

    def cancel(self, workflow_id: str) -> SleepingWorkflow | None:
        """Disarm ``workflow_id``'s timer; return the entry, or ``None`` if it had none."""
        entry = self._index.pop(workflow_id, None)
        if entry is not None:
            self._stale += 1
            self._compact()
        return entry

    def next_fire_at(self) -> float | None:
        """The earliest pending fire time, or ``None`` when nothing sleeps."""
        heap, index = self._heap, self._index
        while heap and index.get(heap[0].workflow_id) is not heap[0]:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0].fire_at if heap else None

    def pop_due(self, now: float | None = None, limit: int | None = None) -> list[SleepingWorkflow]:
        """Remove and return the entries due at ``now`` (default: the clock's), oldest fire
        time first, at most ``limit`` of them (the rest stay due for the next call)."""
        if now is None:
            now = self._clock.now()
        due: list[SleepingWorkflow] = []
        while (limit is None or len(due) < limit) and (head := self.next_fire_at()) is not None:
            if head > now:
                break
            entry = heapq.heappop(self._heap)
            del self._index[entry.workflow_id]
            due.append(entry)
        return due

    async def wait_due(self, limit: int | None = None) -> list[SleepingWorkflow]:
        """Wait until at least one entry is due; remove and return the due ones (at most
        ``limit``), oldest fire time first. One caller at a time: the instance's timer
        task."""
        if limit is not None and limit < 1:
            raise ValueError(f"wait_due needs a limit of at least 1, got {limit}")
        if self._waiting:
            raise RuntimeError("TimerQueue.wait_due is already being awaited by another task")
        self._waiting = True
        try:
            while True:
                due = self.pop_due(limit=limit)
                if due:
                    return due
                self._changed = changed = asyncio.get_running_loop().create_future()
                head = self.next_fire_at()
                if head is None:
                    await changed
                    continue
                sleeper = asyncio.ensure_future(self._clock.sleep_until(head))
                try:
                    await asyncio.wait((sleeper, changed), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
        finally:
            self._waiting = False
            self._changed = None

    def entries(self) -> Iterator[SleepingWorkflow]:
        """Every pending entry, in no particular order (for snapshots and status)."""
        return iter(self._index.values())

    def _compact(self) -> None:
        if self._stale > _COMPACT_AFTER and self._stale > len(self._index):
            self._heap = list(self._index.values())
            heapq.heapify(self._heap)
            self._stale = 0
