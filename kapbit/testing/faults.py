"""A fault-injecting repository: wraps any :class:`~kapbit.repository.Repository`.

Faults are programmed on the wrapper and apply to the calls that match them, in the order
they were added::

    faults = FaultyRepository(MemRepository())
    outage = faults.fail()                          # every append fails ...
    ...
    outage.release()                                # ... until released
    faults.fail(times=3, kinds="step_outcome")      # the next 3 StepOutcome appends fail
    faults.reject(kinds="workflow_result")          # storage refuses results for good
    faults.reject(when=lambda call: len(call.value) > 100)
    hold = faults.slow()                            # appends hang until hold.release()
    faults.fail(duration=0.05)                      # for 50 ms of loop time

A failing call raises :class:`~kapbit.errors.TransientStorageError` (what a repository
raises when the storage is unreachable); a rejection raises
:class:`~kapbit.errors.RecordRejected` (or whatever ``error`` builds, e.g.
:class:`~kapbit.errors.PayloadTooLarge`). By default a failure happens *before* the inner
repository is called, so nothing lands; ``lost_ack=True`` appends first and then fails, like
a producer whose acknowledgement was lost (the engine's retry leaves a second copy).

Every :class:`Fault` counts its hits and can be awaited (:meth:`Fault.wait_hits`), so tests
synchronise on what the storage saw instead of sleeping.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from kapbit.errors import RecordRejected, TransientStorageError
from kapbit.events import EventKind
from kapbit.fencing import ordinary
from kapbit.repository.base import Checkpoint, Record, Repository, SnapshotStore

__all__ = ["Call", "Fault", "FaultyRepository", "Operation"]

#: The repository operations a fault can apply to.
Operation = Literal[
    "append",
    "read",
    "end_offset",
    "current_owner",
    "save_checkpoint",
    "load_checkpoints",
    "save_snapshot_chunk",
    "load_snapshot_chunks",
]
_OPERATIONS: frozenset[str] = frozenset(get_args(Operation))
_Action = Literal["fail", "reject", "delay"]


@dataclass(frozen=True, slots=True)
class Call:
    """One call to the repository, as faults see it. ``kind``/``key``/``node``/``value``
    are set for appends only; a claim is an append of kind ``active_writer`` here, so
    ``kinds="active_writer"`` programs faults of claims."""

    operation: str
    partition: int | None = None
    kind: str = ""
    key: str = ""
    node: str = ""
    value: bytes = b""


class Fault:
    """One programmed fault. Active until released, used up (``times``) or expired."""

    def __init__(
        self,
        action: _Action,
        *,
        operations: frozenset[str],
        kinds: frozenset[str] | None,
        partitions: frozenset[int] | None,
        when: Callable[[Call], bool] | None,
        times: int | None,
        duration: float | None,
        delay: float | None,
        error: Callable[[Call], BaseException] | None,
        lost_ack: bool,
    ) -> None:
        if times is not None and times < 0:
            raise ValueError(f"times must be >= 0, got {times}")
        self.action = action
        self.operations = operations
        self.kinds = kinds
        self.partitions = partitions
        self.when = when
        self.remaining = times
        self.lost_ack = lost_ack
        self._error = error
        self._delay = delay
        self._deadline = None if duration is None else time.monotonic() + duration
        self._released = asyncio.Event()
        self._changed = asyncio.Event()
        #: The calls this fault applied to, in order.
        self.calls: list[Call] = []

    @property
    def hits(self) -> int:
        """How many calls this fault has applied to."""
        return len(self.calls)

    @property
    def active(self) -> bool:
        """Whether the fault still applies to matching calls."""
        if self._released.is_set():
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        return self._deadline is None or time.monotonic() < self._deadline

    def release(self) -> None:
        """End the fault: failures stop, held (slow) calls proceed."""
        self._released.set()

    def matches(self, call: Call) -> bool:
        """Whether this fault applies to ``call`` (does not consume it)."""
        if not self.active or call.operation not in self.operations:
            return False
        if self.kinds is not None and call.kind not in self.kinds:
            return False
        if self.partitions is not None and call.partition not in self.partitions:
            return False
        return self.when is None or self.when(call)

    async def wait_hits(self, count: int = 1, timeout: float = 5.0) -> None:
        """Return once this fault has applied to ``count`` calls; TimeoutError otherwise."""

        async def _wait() -> None:
            while self.hits < count:
                await self._changed.wait()
                self._changed.clear()

        await asyncio.wait_for(_wait(), timeout)

    def _hit(self, call: Call) -> None:
        if self.remaining is not None:
            self.remaining -= 1
        self.calls.append(call)
        self._changed.set()

    def _exception(self, call: Call) -> BaseException:
        if self._error is not None:
            return self._error(call)
        what = f"{call.operation} of {call.kind or '-'} for {call.key or '-'}"
        if self.action == "reject":
            return RecordRejected(f"injected rejection: {what}")
        return TransientStorageError(f"injected storage failure: {what}")

    async def _hold(self) -> None:
        if self._delay is not None:
            await asyncio.sleep(self._delay)
        else:
            await self._released.wait()

    def __repr__(self) -> str:
        return f"<Fault {self.action} hits={self.hits} active={self.active}>"


def _as_set(values: str | Iterable[str] | None) -> frozenset[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        return frozenset({values})
    return frozenset(str(v) for v in values)


class FaultyRepository:
    """A :class:`~kapbit.repository.Repository` that delegates to ``inner`` except where a
    programmed :class:`Fault` says otherwise.

    ``calls`` counts every append attempted through the wrapper by kind (whether it
    failed or not); ``appended`` counts the ones that reached the inner repository.
    """

    def __init__(self, inner: Repository) -> None:
        self.inner = inner
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.appended: Counter[str] = Counter()

    # --- programming ---------------------------------------------------------------------

    def fail(
        self,
        *,
        times: int | None = None,
        duration: float | None = None,
        kinds: str | Iterable[str] | None = None,
        partitions: Iterable[int] | None = None,
        when: Callable[[Call], bool] | None = None,
        operations: Iterable[Operation] = ("append",),
        lost_ack: bool = False,
        error: Callable[[Call], BaseException] | None = None,
    ) -> Fault:
        """Matching calls raise :class:`~kapbit.errors.TransientStorageError`.

        Without ``times`` or ``duration`` the fault lasts until :meth:`Fault.release`.
        ``lost_ack`` (appends only): the record lands, then the call fails.
        """
        return self._add(
            "fail", times, duration, kinds, partitions, when, operations, None, error, lost_ack
        )

    def reject(
        self,
        *,
        times: int | None = None,
        kinds: str | Iterable[str] | None = None,
        partitions: Iterable[int] | None = None,
        when: Callable[[Call], bool] | None = None,
        error: Callable[[Call], BaseException] | None = None,
    ) -> Fault:
        """Matching appends are refused for good (:class:`~kapbit.errors.RecordRejected`
        unless ``error`` builds another, e.g. ``PayloadTooLarge``)."""
        return self._add(
            "reject", times, None, kinds, partitions, when, ("append",), None, error, False
        )

    def slow(
        self,
        *,
        delay: float | None = None,
        times: int | None = None,
        kinds: str | Iterable[str] | None = None,
        partitions: Iterable[int] | None = None,
        when: Callable[[Call], bool] | None = None,
        operations: Iterable[Operation] = ("append",),
    ) -> Fault:
        """Matching calls wait ``delay`` seconds, or until :meth:`Fault.release` when no
        delay is given, then proceed."""
        return self._add(
            "delay", times, None, kinds, partitions, when, operations, delay, None, False
        )

    def clear(self) -> None:
        """Release and forget every fault."""
        for fault in self.faults:
            fault.release()
        self.faults.clear()

    def _add(
        self,
        action: _Action,
        times: int | None,
        duration: float | None,
        kinds: str | Iterable[str] | None,
        partitions: Iterable[int] | None,
        when: Callable[[Call], bool] | None,
        operations: Iterable[Operation],
        delay: float | None,
        error: Callable[[Call], BaseException] | None,
        lost_ack: bool,
    ) -> Fault:
        ops = frozenset(operations)
        unknown = ops - _OPERATIONS
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}")
        fault = Fault(
            action,
            operations=ops,
            kinds=_as_set(kinds),
            partitions=None if partitions is None else frozenset(partitions),
            when=when,
            times=times,
            duration=duration,
            delay=delay,
            error=error,
            lost_ack=lost_ack,
        )
        self.faults.append(fault)
        return fault

    async def _apply(self, call: Call) -> Fault | None:
        """Apply the faults matching ``call``; return a lost-ack fault to raise afterwards."""
        for fault in list(self.faults):
            if not fault.matches(call):
                continue
            fault._hit(call)
            if fault.action == "delay":
                await fault._hold()
                continue
            if fault.lost_ack and call.operation == "append":
                return fault
            raise fault._exception(call)
        return None

    # --- the Repository protocol -----------------------------------------------------------

    @property
    def partitions(self) -> int:
        return self.inner.partitions

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        call = Call("append", partition, ordinary(kind), key, node, value)
        return await self._write(
            call, functools.partial(self.inner.append, partition, kind, key, node, value)
        )

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        call = Call("append", partition, EventKind.ACTIVE_WRITER, node, node, value)
        return await self._write(call, functools.partial(self.inner.claim, partition, node, value))

    async def _write(self, call: Call, write: Callable[[], Awaitable[int]]) -> int:
        """Apply the faults matching ``call``, then ``write`` the record."""
        self.calls[call.kind] += 1
        lost = await self._apply(call)
        offset = await write()
        self.appended[call.kind] += 1
        if lost is not None:
            raise lost._exception(call)
        return offset

    async def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        await self._apply(Call("read", partition))
        async for batch in self.inner.read(partition, start, stop):
            yield batch

    def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        return self.inner.tail(partition, start)

    async def current_owner(self, partition: int) -> str:
        await self._apply(Call("current_owner", partition))
        return await self.inner.current_owner(partition)

    async def end_offset(self, partition: int) -> int:
        await self._apply(Call("end_offset", partition))
        return await self.inner.end_offset(partition)

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        await self._apply(Call("save_checkpoint", partition))
        await self.inner.save_checkpoint(partition, checkpoint)

    async def load_checkpoints(self) -> dict[int, Checkpoint]:
        await self._apply(Call("load_checkpoints"))
        return await self.inner.load_checkpoints()

    @property
    def snapshots(self) -> bool:
        """Whether the inner repository keeps snapshots."""
        return isinstance(self.inner, SnapshotStore) and self.inner.snapshots

    def _store(self) -> SnapshotStore:
        inner = self.inner
        if not isinstance(inner, SnapshotStore):
            raise TypeError(f"{type(inner).__name__} keeps no snapshots")
        return inner

    async def save_snapshot_chunk(
        self, partition: int, slot: str, index: int, data: bytes | None
    ) -> None:
        await self._apply(Call("save_snapshot_chunk", partition))
        await self._store().save_snapshot_chunk(partition, slot, index, data)

    async def load_snapshot_chunks(self, partition: int, slot: str, count: int) -> list[bytes]:
        await self._apply(Call("load_snapshot_chunks", partition))
        return await self._store().load_snapshot_chunks(partition, slot, count)

    async def snapshot_slots(self, partition: int) -> dict[str, list[int]]:
        return await self._store().snapshot_slots(partition)
