"""The Repository protocol: the partitioned, append-only log kapbit keeps all state in."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import msgspec

from kapbit.events import EventKind


class Record(msgspec.Struct, frozen=True, gc=False):
    """One record of the log, with what readers need to know before decoding the value.

    ``kind`` is the event's :class:`~kapbit.events.EventKind`, ``key`` the workflow id
    (the writer's node id for ``ActiveWriter``), ``node`` the node that wrote the record.
    Not tracked by the garbage collector (``gc=False``: it can be in no reference cycle),
    or every record would be once ``kind`` is an enum member: logs hold millions.
    """

    partition: int
    offset: int
    kind: EventKind
    key: str
    node: str
    value: bytes


class Checkpoint(msgspec.Struct, frozen=True):
    """Where recovery of a partition starts.

    Every workflow created below ``offset`` has terminated. ``window_offset`` is where the
    ids of the idempotency window start (read ids-only up to ``offset``), for a window of
    ``window_size`` ids. Each offset comes with the partition's owner at that point, so
    readers starting there can tell zombie writes apart. ``anchor_offset`` and
    ``anchor_writer`` name a record of the log the checkpoint was saved for: the latest
    one the saving instance had written (writer ids are unique per start). A start trusts
    the checkpoint only if its log holds a record of that writer there, which tells
    another log's checkpoint (or a recreated log's) apart.

    A *snapshot checkpoint* also names a snapshot (:mod:`kapbit.snapshots`): the state of
    the partition after reading every record below ``snapshot_offset`` (its open workflows
    and idempotency window), stored as ``snapshot_chunks`` chunks in ``snapshot_slot`` of
    the :class:`SnapshotStore`, ``snapshot_size`` bytes with CRC-32 ``snapshot_crc``.
    Recovery then reads the log only from ``snapshot_offset``; when the snapshot cannot be
    used it falls back to ``offset`` and ``window_offset``, which every checkpoint keeps.
    ``snapshot_offset`` is ``-1`` without a snapshot (also in checkpoints of older
    versions, which load unchanged).
    """

    offset: int = 0
    owner: str = ""
    window_offset: int = 0
    window_owner: str = ""
    window_size: int = 0
    anchor_offset: int = -1
    anchor_writer: str = ""
    snapshot_offset: int = -1
    snapshot_slot: str = ""
    snapshot_chunks: int = 0
    snapshot_size: int = 0
    snapshot_crc: int = 0


@runtime_checkable
class Repository(Protocol):
    """A partitioned append-only log with per-partition checkpoints.

    Two writes: :meth:`claim` appends a node's ``ActiveWriter`` (its claim of the
    partition) and is never fenced; :meth:`append` appends any other record and must
    fence by the rule of :mod:`kapbit.fencing`: it returns only once the record is durable
    *and* no claim of another node sits between ``node``'s latest claim and the record;
    otherwise it raises :class:`~kapbit.errors.Fenced`. Transient failures raise
    :class:`~kapbit.errors.TransientStorageError`, permanent refusals
    :class:`~kapbit.errors.RecordRejected`. See docs/ARCHITECTURE.md, "Fencing".
    """

    @property
    def partitions(self) -> int:
        """The number of partitions."""
        ...

    async def start(self) -> None:
        """Connect and make sure the log exists. Whoever starts a repository closes it:
        each start is paired with one :meth:`close`, and a repository started by several
        owners (an instance and a projector) stays connected until the last close."""
        ...

    async def close(self) -> None:
        """Close one start; the last releases the connections (later closes change
        nothing). The log itself is kept."""
        ...

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        """Append one record and return its offset (see the class docstring on fencing).
        ``kind`` ``ACTIVE_WRITER`` raises :class:`~kapbit.errors.InvalidAppend`: claims go
        through :meth:`claim`."""
        ...

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        """Append ``node``'s ``ActiveWriter`` (encoded in ``value``, keyed by ``node``) and
        return its offset once durable; from then on ``node``'s appends to ``partition``
        are confirmed, and every other node's fenced."""
        ...

    def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        """Yield the records with ``start <= offset < stop`` in order, in batches."""
        ...

    def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        """Yield records from ``start`` on, waiting for new ones; runs until cancelled."""
        ...

    async def end_offset(self, partition: int) -> int:
        """The offset the next record appended to ``partition`` will get."""
        ...

    async def current_owner(self, partition: int) -> str:
        """The node of the latest ``ActiveWriter`` in ``partition`` as the log shows it now
        (``""`` when there is none)."""
        ...

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        """Store the checkpoint of ``partition``, replacing the previous one."""
        ...

    async def load_checkpoints(self) -> dict[int, Checkpoint]:
        """The stored checkpoints by partition; partitions without one are absent."""
        ...


@runtime_checkable
class SnapshotStore(Protocol):
    """Where a repository keeps the chunks of snapshot checkpoints, next to its checkpoints.

    Chunks are numbered within a *slot* of a partition (a name without ``/``). Each start
    writes its snapshots into two slots of its own, alternately, and saves the checkpoint
    naming one only once its chunks are stored; so a crash in between, or another
    instance writing at the same time, leaves the snapshot the stored checkpoint names
    whole. ``snapshots`` says whether this store keeps them (a wrapper may sit on a
    repository that does not).
    """

    @property
    def snapshots(self) -> bool:
        """Whether snapshot chunks can be saved here."""
        ...

    async def save_snapshot_chunk(
        self, partition: int, slot: str, index: int, data: bytes | None
    ) -> None:
        """Store chunk ``index`` of ``slot``, replacing what was there; ``None`` deletes it
        (a tombstone on Kafka)."""
        ...

    async def load_snapshot_chunks(self, partition: int, slot: str, count: int) -> list[bytes]:
        """Chunks ``0 .. count - 1`` of ``slot``, stopping at the first one missing."""
        ...

    async def snapshot_slots(self, partition: int) -> dict[str, list[int]]:
        """The chunk indexes stored per slot of ``partition`` (to delete dead ones)."""
        ...


def leading_chunks(
    chunks: Mapping[tuple[int, str, int], bytes], partition: int, slot: str, count: int
) -> list[bytes]:
    """Chunks ``0 .. count - 1`` of ``slot`` of ``partition`` in ``chunks`` (keyed by
    partition, slot and index), up to the first missing: what
    :meth:`SnapshotStore.load_snapshot_chunks` returns for a store keeping them so."""
    found: list[bytes] = []
    for index in range(count):
        chunk = chunks.get((partition, slot, index))
        if chunk is None:
            break
        found.append(chunk)
    return found


def chunk_slots(chunks: Iterable[tuple[int, str, int]], partition: int) -> dict[str, list[int]]:
    """The chunk indexes per slot of ``partition`` among ``chunks``' keys: what
    :meth:`SnapshotStore.snapshot_slots` returns for a store keeping them so."""
    slots: dict[str, list[int]] = {}
    for p, slot, index in chunks:
        if p == partition:
            slots.setdefault(slot, []).append(index)
    return slots
