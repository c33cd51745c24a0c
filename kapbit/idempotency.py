"""The idempotency window: ids of the most recent workflows of a partition."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class IdempotencyWindow:
    """The last ``size`` workflow ids created in one partition, with their offsets.

    An id in the window is refused by ``exec_workflow`` whether its workflow finished,
    failed or is still running. Ids are kept in offset order, so the oldest is evicted
    first and its offset is where recovery starts reading ids. Adding an id already in the
    window (a second copy of its ``WorkflowCreated``) changes nothing.

    One entry is one slot of a plain ``dict`` (id -> offset): about 100 bytes on CPython
    plus the id string itself (``benchmarks/bench_recovery.py`` measures it).
    """

    __slots__ = ("_ids", "size")

    def __init__(self, size: int, entries: Iterable[tuple[str, int]] = ()) -> None:
        if size < 1:
            raise ValueError(f"the idempotency window holds at least 1 id, got {size}")
        self.size = size
        self._ids: dict[str, int] = {}
        for workflow_id, offset in entries:
            self.add(workflow_id, offset)

    def add(self, workflow_id: str, offset: int) -> None:
        """Remember ``workflow_id`` created at ``offset``, evicting the oldest if full.

        Ids are ordered by offset, not by when they were added: an acknowledgement may
        arrive after those of records written later (a late ack), and recovery, which reads
        the log in order, must keep the same ids as the engine.
        """
        ids = self._ids
        if workflow_id in ids:
            return
        if ids and offset < next(reversed(ids.values())):
            ordered = sorted([*ids.items(), (workflow_id, offset)], key=_offset)
            ids.clear()
            ids.update(ordered)
        else:
            ids[workflow_id] = offset
        while len(ids) > self.size:
            del ids[next(iter(ids))]

    def renew(self, workflow_id: str, offset: int) -> None:
        """A later copy of ``workflow_id``'s ``WorkflowCreated`` at ``offset``: the id
        moves to that copy's place, the newest.

        The engine learns an id at the copy whose append was acknowledged, the last one
        written, so ids created between two copies are older than it in the engine's
        window; recovery must keep the same order or it evicts a different id.
        """
        ids = self._ids
        ids.pop(workflow_id, None)
        self.add(workflow_id, offset)

    def __contains__(self, workflow_id: object) -> bool:
        return workflow_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def offset_of(self, workflow_id: str) -> int | None:
        """The offset of ``workflow_id``'s ``WorkflowCreated`` (its last copy), if kept."""
        return self._ids.get(workflow_id)

    def entries(self) -> Iterator[tuple[str, int]]:
        """``(workflow id, created offset)`` of every id kept, oldest first."""
        return iter(self._ids.items())

    def oldest_offset(self) -> int | None:
        """The offset of the oldest id kept, or ``None`` when empty."""
        for offset in self._ids.values():
            return offset
        return None


def _offset(entry: tuple[str, int]) -> int:
    return entry[1]
