"""Telling zombie writes apart while reading a partition.

The owner of a partition is the node of the latest ``ActiveWriter`` read. Any other
record whose writer is not the current owner was written by an instance that had already
lost the partition: no reader (recovery, projections) may act on it.
"""

from __future__ import annotations

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
