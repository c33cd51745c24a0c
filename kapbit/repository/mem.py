"""An in-memory repository for unit tests, examples and benchmarks.

It behaves like the Kafka repository where it matters to the engine: a fenced write still
lands in the log (as a zombie record every reader must ignore) and then fails with
:class:`~kapbit.errors.Fenced`; a payload over ``max_payload`` is refused. Fencing is
judged by the rule of :mod:`kapbit.fencing` (an :class:`~kapbit.fencing.OwnerTracker`
per partition sees every record as it lands).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from kapbit._checks import at_least_one
from kapbit.errors import PayloadTooLarge
from kapbit.events import EventKind
from kapbit.fencing import OwnerTracker, fenced_by, ordinary
from kapbit.repository.base import Checkpoint, Record, chunk_slots, leading_chunks

_BATCH = 1024


class MemRepository:
    """A partitioned log held in lists; shared by every instance given the same object."""

    def __init__(self, partitions: int = 1, max_payload: int = 1024 * 1024) -> None:
        at_least_one(partitions=partitions, max_payload=max_payload)
        self._partitions = partitions
        self.max_payload = max_payload
        self._logs: list[list[Record]] = [[] for _ in range(partitions)]
        self._owners = [OwnerTracker("") for _ in range(partitions)]
        self._checkpoints: dict[int, Checkpoint] = {}
        self._chunks: dict[tuple[int, str, int], bytes] = {}
        self._appended = asyncio.Event()
        self._tailers = 0

    @property
    def partitions(self) -> int:
        return self._partitions

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release; the log stays for the next instance."""

    async def append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> int:
        # _land, inlined: the hot path of every benchmark on this repository
        if len(value) > self.max_payload:
            raise PayloadTooLarge(len(value), self.max_payload)
        log = self._logs[partition]
        offset = len(log)
        record = Record(partition, offset, ordinary(kind), key, node, value)
        log.append(record)
        if self._tailers:
            self._wake_tails()
        owners = self._owners[partition]
        if not owners.admit(record):
            raise fenced_by(partition, owners.owner, node)
        return offset

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        record = self._land(partition, EventKind.ACTIVE_WRITER, node, node, value)
        self._owners[partition].admit(record)
        return record.offset

    def _land(self, partition: int, kind: EventKind, key: str, node: str, value: bytes) -> Record:
        if len(value) > self.max_payload:
            raise PayloadTooLarge(len(value), self.max_payload)
        log = self._logs[partition]
        record = Record(partition, len(log), kind, key, node, value)
        log.append(record)
        if self._tailers:
            self._wake_tails()
        return record

    async def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        log = self._logs[partition]
        stop = min(stop, len(log))
        for begin in range(max(start, 0), stop, _BATCH):
            yield log[begin : min(begin + _BATCH, stop)]

    async def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        log = self._logs[partition]
        position = max(start, 0)
        self._tailers += 1
        try:
            while True:
                if position < len(log):
                    batch = log[position : position + _BATCH]
                    position += len(batch)
                    yield batch
                else:
                    await self._appended.wait()
        finally:
            self._tailers -= 1

    async def end_offset(self, partition: int) -> int:
        return len(self._logs[partition])

    async def current_owner(self, partition: int) -> str:
        return self._owners[partition].owner

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        self._checkpoints[partition] = checkpoint

    async def load_checkpoints(self) -> dict[int, Checkpoint]:
        return dict(self._checkpoints)

    @property
    def snapshots(self) -> bool:
        return True

    async def save_snapshot_chunk(
        self, partition: int, slot: str, index: int, data: bytes | None
    ) -> None:
        if data is None:
            self._chunks.pop((partition, slot, index), None)
        else:
            self._chunks[partition, slot, index] = bytes(data)

    async def load_snapshot_chunks(self, partition: int, slot: str, count: int) -> list[bytes]:
        return leading_chunks(self._chunks, partition, slot, count)

    async def snapshot_slots(self, partition: int) -> dict[str, list[int]]:
        return chunk_slots(self._chunks, partition)

    def snapshot_chunks(self, partition: int) -> dict[tuple[str, int], int]:
        """``(slot, index) -> size`` of the snapshot chunks kept for ``partition`` (tests:
        replaced chunks are deleted)."""
        return {(s, i): len(c) for (p, s, i), c in self._chunks.items() if p == partition}

    def records(self, partition: int | None = None) -> list[Record]:
        """Every record of one partition, or of all partitions in partition order (tests)."""
        if partition is not None:
            return list(self._logs[partition])
        return [record for log in self._logs for record in log]

    def _wake_tails(self) -> None:
        # Only tails wait (callers check ``_tailers``); a fresh event per wake-up keeps
        # append O(1) when nobody tails.
        self._appended.set()
        self._appended = asyncio.Event()
