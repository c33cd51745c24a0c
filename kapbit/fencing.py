"""The fencing rule, both sides: one writer per partition, told by the log itself.

Writer side (:class:`Fence`): an instance whose write the log refuses with
:class:`~kapbit.errors.Fenced` (another writer's ``ActiveWriter`` lies below it) writes
nothing more. Reader side (:class:`OwnerTracker`): the owner of a partition is the writer
of the latest ``ActiveWriter`` read; any other record whose writer is not the current
owner was written by an instance that had already lost the partition (a zombie write),
and no reader (recovery, projections) acts on it. See docs/ARCHITECTURE.md, "Fencing".
"""

from __future__ import annotations

import asyncio

from kapbit.errors import Fenced, LogLost
from kapbit.events import EventKind
from kapbit.repository import Record

_ACTIVE_WRITER = EventKind.ACTIVE_WRITER.value


class OwnerTracker:
    """Follows ``ActiveWriter`` records of one partition read in order.

    ``writers`` lists ``(offset, node)`` of every ownership change seen, starting with
    ``(-1, owner)`` for the owner in force where reading started.
    """

    __slots__ = ("owner", "writers")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.writers: list[tuple[int, str]] = [(-1, owner)]

    def admit(self, record: Record) -> bool:
        """Whether ``record`` counts: ``ActiveWriter`` switches the owner and counts;
        anything else counts only if the current owner wrote it."""
        if record.kind == _ACTIVE_WRITER:
            self.owner = record.node
            self.writers.append((record.offset, record.node))
            return True
        return record.node == self.owner

    def claimed(self, offset: int, node: str) -> None:
        """Record this node's own claim at ``offset`` (appended, not read back)."""
        self.owner = node
        self.writers.append((offset, node))

    def owner_at(self, offset: int) -> str:
        """The owner in force for the record at ``offset`` (before reading it)."""
        for start, node in reversed(self.writers):
            if start < offset:
                return node
        return self.writers[0][1]


class Fence:
    """Whether this instance may still write: the writer side of the fencing rule.

    The log fences an instance (a write answered with :class:`~kapbit.errors.Fenced`
    because another writer claimed a partition): :meth:`fenced` records the first such
    error, and :meth:`wait` returns it to the owner watching for it. The instance stops
    writing itself on close or abort: :meth:`stop`. Either way :meth:`check` raises
    before any further write.
    """

    __slots__ = ("_event", "_stopped", "error", "lost", "per_partition", "refusal", "taken")

    def __init__(self, per_partition: bool = False) -> None:
        #: Group mode: the log fencing one partition stops writing to that partition only
        #: (:attr:`lost`), and :attr:`taken` tells the owner which partitions were taken.
        self.per_partition = per_partition
        #: Partitions this instance may not write to (group mode), with the error to raise.
        self.lost: dict[int, Fenced] = {}
        self.taken: asyncio.Queue[int] = asyncio.Queue()
        #: The first Fenced the log answered with, or ``None``.
        self.error: Fenced | None = None
        #: What a write must raise now (``None`` while writing may go on): the log's
        #: refusal, else the instance's own stop. Read on every append, so kept ready.
        self.refusal: Fenced | None = None
        self._stopped: Fenced | None = None
        self._event = asyncio.Event()

    def check(self) -> None:
        """Raise :class:`~kapbit.errors.Fenced` if no more writes may go out."""
        if self.refusal is not None:
            raise self.refusal

    def check_partition(self, partition: int) -> None:
        """Raise :class:`~kapbit.errors.Fenced` if no more writes may go to ``partition``."""
        if self.refusal is not None:
            raise self.refusal
        refusal = self.lost.get(partition)
        if refusal is not None:
            raise refusal

    def lose(self, partition: int, error: Fenced) -> None:
        """Stop writing to ``partition`` (revoked, or taken by another writer)."""
        self.lost.setdefault(partition, error)

    def regain(self, partition: int) -> None:
        """``partition`` is this instance's again (about to be claimed)."""
        self.lost.pop(partition, None)

    def fenced(self, error: Fenced, partition: int | None = None) -> None:
        """The log refused a write of this instance (to ``partition``): record the first
        refusal. In group mode only that partition is lost (a lost log stops all)."""
        if (
            self.per_partition
            and partition is not None
            and not isinstance(error, LogLost)
            and error is not self._stopped
        ):
            if partition not in self.lost:
                self.lost[partition] = error
                self.taken.put_nowait(partition)
            return
        if self.error is None and error is not self._stopped:
            self.error = self.refusal = error
            self._event.set()

    def stop(self, reason: str) -> None:
        """Stop writing (closed with tasks abandoned, or aborted), not fenced by the log."""
        if self._stopped is None:
            self._stopped = Fenced(reason)
            if self.refusal is None:
                self.refusal = self._stopped

    async def wait(self) -> Fenced:
        """Return the error once the log has fenced this instance."""
        await self._event.wait()
        assert self.error is not None
        return self.error
