"""The fencing rule, both sides, in one place: one writer per partition, told by the log.

The rule: a record counts (is durable-and-valid for its writer, and acted on by readers)
only if the latest ``ActiveWriter`` (claim) below it is its writer's. Equivalently, a
record of node N is void once another node's claim lies between N's latest claim and the
record.

- Repository side (every backend): an append of N returns only if no claim of another
  node lies between N's latest claim and the record (:func:`displaces` judges each record
  in between); otherwise it raises :class:`~kapbit.errors.Fenced` (:func:`fenced_by`).
  A claim itself is never fenced, and goes through ``Repository.claim`` only
  (:func:`ordinary` refuses it in ``append``).
- Reader side (:class:`OwnerTracker`): the owner of a partition is the writer of the
  latest claim read; any other record whose writer is not the current owner was written
  by an instance that had already lost the partition (a zombie write), and no reader
  (recovery, projections, handles) acts on it.
- Writer side (:class:`Fence`): an instance the log fenced writes nothing more.

See docs/ARCHITECTURE.md, "Fencing".
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from kapbit.errors import Fenced, InvalidAppend, LogLost
from kapbit.events import EventKind

if TYPE_CHECKING:  # the repository package uses this module: no import cycle at run time
    from kapbit.repository.base import Record

_CLAIM = EventKind.ACTIVE_WRITER


def is_claim(record: Record) -> bool:
    """Whether ``record`` is an ``ActiveWriter``: a claim of its partition by its writer."""
    return record.kind is _CLAIM


def displaces(record: Record, node: str | None) -> bool:
    """Whether ``record``, lying after ``node``'s latest claim, voids ``node``'s later
    records: it is a claim by another writer (anything else is harmless to ``node``)."""
    return record.kind is _CLAIM and record.node != node


def fenced_by(partition: int, claimer: str, node: str | None, offset: int | None = None) -> Fenced:
    """The :class:`~kapbit.errors.Fenced` a write of ``node`` to ``partition`` gets once
    ``claimer`` claimed it (at ``offset``, when known)."""
    at = "" if offset is None else f" at offset {offset}"
    return Fenced(f"node {claimer!r} claimed partition {partition}{at}; node {node!r} is fenced")


def ordinary(kind: EventKind) -> EventKind:
    """``kind`` if an ordinary append may carry it; raise
    :class:`~kapbit.errors.InvalidAppend` for a claim, which goes through ``claim()``, and
    for what is not an event kind. A plain string naming a kind (an untyped caller) is
    taken as that kind, so ``"active_writer"`` is refused like the claim kind."""
    if type(kind) is not EventKind:
        try:
            kind = EventKind(kind)
        except ValueError:
            raise InvalidAppend(f"{kind!r} is not an event kind") from None
    if kind is _CLAIM:
        raise InvalidAppend(
            "an ActiveWriter is appended with Repository.claim(partition, node, value), "
            "not append(): a claim is never fenced, an append always is"
        )
    return kind


class OwnerTracker:
    """Follows the claims of one partition read in order: the reader side of the rule.

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
        if record.kind is _CLAIM:
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
