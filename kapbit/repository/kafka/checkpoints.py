"""The checkpoint store: a compacted topic (``<topic>-checkpoints`` by default) with one
partition, keyed by log (``<topic>/<partition>``), so several logs may share one.

Snapshot chunks (:mod:`kapbit.snapshots`) sit in the same topic, keyed
``<topic>/<partition>/snapshot/<slot>/<index>``: a chunk written again replaces the one
before it under compaction, and a deleted one is a tombstone (a record with no value), so
the topic keeps the live snapshot of each partition (and whatever a crashed save left in
the other slot, which the next save overwrites or deletes). Readers of older versions skip
these keys, as they are no log's checkpoint key.

**A start reads the topic back from its end**, not from its beginning: until the broker
compacts it, the topic holds every snapshot ever written (one per save, every few seconds),
and all a start needs is the latest record of each partition's checkpoint key and of the
chunk keys that checkpoint names. :meth:`CheckpointStore.load` reads stretches of growing
length backwards from the end, each forward, and stops once it has met all of these; a
key's first record met going back is its latest, so what it finds is exactly what reading
the whole topic would find (a partition with no checkpoint yet makes it read to the
beginning). The chunks left in other slots by earlier starts, which a start's first save
deletes, are looked for only then (:meth:`CheckpointStore.slots`), in the background of a
running instance, reading keys only."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer, TopicPartition

from kapbit._log import fields
from kapbit.repository.base import Checkpoint, chunk_slots, leading_chunks
from kapbit.repository.kafka.errors import transient
from kapbit.repository.kafka.reads import Lane, beginning_offsets, end_offset, fetch

logger = logging.getLogger("kapbit.kafka")


#: Records a load reads first, back from the topic's end; each further step back reads
#: twice as many (a save writes its chunks and checkpoint, a few records per partition).
_FIRST_STEP = 64

_ChunkKey = tuple[int, str, int]


class _Scan:
    """What one load read of the topic, from its end back to ``read_from``: the latest
    readable checkpoint of each partition, the chunk keys whose latest record it met
    (``decided``), those whose latest record holds a chunk (``live``), and the chunks a
    start may ask for (``chunks``: those the checkpoints name, and any of a partition with
    no checkpoint). This store's own writes since are applied to it."""

    def __init__(self, begin: int, end: int) -> None:
        self.begin = begin
        self.read_from = end
        self.checkpoints: dict[int, Checkpoint] = {}
        self.chunks: dict[_ChunkKey, bytes] = {}
        self.live: set[_ChunkKey] = set()
        self.decided: set[_ChunkKey] = set()
        self.lock = asyncio.Lock()  # one reader back at a time

    def wanted(self, key: _ChunkKey) -> bool:
        """Whether a start may ask for chunk ``key``: its partition's checkpoint names it,
        or the partition has no checkpoint (yet, or at all)."""
        partition, slot, index = key
        checkpoint = self.checkpoints.get(partition)
        return checkpoint is None or (
            checkpoint.snapshot_offset >= 0
            and checkpoint.snapshot_slot == slot
            and index < checkpoint.snapshot_chunks
        )

    def found_all(self, partitions: int) -> bool:
        """Whether every partition's checkpoint and the chunks it names were met."""
        for partition in range(partitions):
            checkpoint = self.checkpoints.get(partition)
            if checkpoint is None:
                return False
            if checkpoint.snapshot_offset >= 0:
                slot = checkpoint.snapshot_slot
                for index in range(checkpoint.snapshot_chunks):
                    if (partition, slot, index) not in self.decided:
                        return False
        return True

    def merge(
        self,
        checkpoints: dict[int, Checkpoint],
        chunks: dict[_ChunkKey, bytes | None],
        keep: bool,
    ) -> None:
        """Take in the latest records of a stretch older than everything read so far: a
        key already met keeps what was met (it is newer). ``chunks`` maps a key to its
        chunk (``b""`` when only its liveness was kept) or ``None`` for a tombstone."""
        for partition, checkpoint in checkpoints.items():
            self.checkpoints.setdefault(partition, checkpoint)
        for key, chunk in chunks.items():
            if key in self.decided:
                continue
            self.decided.add(key)
            if chunk is None:
                continue
            self.live.add(key)
            if keep and self.wanted(key):
                self.chunks[key] = chunk

    def written(self, key: _ChunkKey, data: bytes | None) -> None:
        """This store wrote ``key`` (``None``: deleted it), after everything read."""
        self.decided.add(key)
        if data is None:
            self.chunks.pop(key, None)
            self.live.discard(key)
        else:
            self.chunks[key] = data
            self.live.add(key)


class CheckpointStore:
    """The checkpoints of the log ``topic`` (``partitions`` partitions) in ``checkpoint_topic``."""

    def __init__(
        self,
        topic: str,
        partitions: int,
        checkpoint_topic: str,
        producer: AIOKafkaProducer,
        lane: Lane,
        read_timeout: float,
    ) -> None:
        self._topic = topic
        self._partitions = partitions
        self._tp = TopicPartition(checkpoint_topic, 0)
        self._producer = producer
        self._lane = lane
        self._read_timeout = read_timeout
        #: What the last load read, and this store's writes since (``None``: no load yet).
        self._scan: _Scan | None = None
        #: Records of the topic read so far, by loads and :meth:`slots` (for tests and
        #: benchmarks: a start should not read what it does not need).
        self.records_read = 0

    def _key(self, partition: int) -> str:
        return f"{self._topic}/{partition}"

    def _chunk_key(self, partition: int, slot: str, index: int) -> str:
        return f"{self._topic}/{partition}/snapshot/{slot}/{index}"

    async def save_chunk(self, partition: int, slot: str, index: int, data: bytes | None) -> None:
        """Store (``None``: delete) chunk ``index`` of a snapshot of ``partition``."""
        with transient("saving a snapshot chunk failed"):
            await self._producer.send_and_wait(
                self._tp.topic,
                data,
                key=self._chunk_key(partition, slot, index).encode(),
                partition=0,
            )
        if self._scan is not None:
            self._scan.written((partition, slot, index), data)

    async def load_chunks(self, partition: int, slot: str, count: int) -> list[bytes]:
        """Chunks ``0 .. count - 1`` of ``slot``, up to the first missing, as of the last
        :meth:`load` and this store's writes since (the last load kept the chunks the
        checkpoints it found name, and those of partitions without one)."""
        scan = self._scan or await self._loaded()
        return leading_chunks(scan.chunks, partition, slot, count)

    async def slots(self, partition: int) -> dict[str, list[int]]:
        """The chunk indexes per slot of ``partition``: those the topic held at the last
        :meth:`load` and this store wrote since (another instance's later writes are not
        known). The first call after a load reads the rest of the topic the load did not
        need, keeping keys only."""
        scan = self._scan or await self._loaded()
        if scan.read_from > scan.begin:
            with transient("reading snapshot chunk keys failed"):
                await self._read_back(scan, scan.read_from - scan.begin, keep=False)
        return chunk_slots(sorted(scan.live), partition)

    async def save(self, partition: int, checkpoint: Checkpoint) -> None:
        with transient("saving checkpoint failed"):
            await self._producer.send_and_wait(
                self._tp.topic,
                msgspec.json.encode(checkpoint),
                key=self._key(partition).encode(),
                partition=0,
            )

    async def load(self) -> dict[int, Checkpoint]:
        """The checkpoints of this log; those of other logs sharing the topic are skipped."""
        scan = await self._loaded()
        return {p: c for p, c in scan.checkpoints.items() if p < self._partitions}

    async def _loaded(self) -> _Scan:
        with transient("loading checkpoints failed"):
            return await self._load()

    async def _load(self) -> _Scan:
        """Read back from the topic's end until every partition's latest checkpoint and the
        chunks it names are met (or the beginning is reached)."""
        tp = self._tp
        begin = (await beginning_offsets(self._lane, [tp]))[tp]
        scan = _Scan(begin, await end_offset(self._lane, tp))
        step = _FIRST_STEP
        while scan.read_from > scan.begin and not scan.found_all(self._partitions):
            await self._read_back(scan, step, keep=True)
            step *= 2
        for key in [k for k in scan.chunks if not scan.wanted(k)]:
            del scan.chunks[key]  # kept before the checkpoint naming others was met
        self._scan = scan
        return scan

    async def _read_back(self, scan: _Scan, step: int, keep: bool) -> None:
        """Read the ``step`` records below ``scan.read_from`` (forward: a later record of a
        key replaces an earlier one) and merge them into ``scan``; with ``keep`` the
        chunks a start may ask for are kept, else only which keys are live."""
        async with scan.lock:
            stop = scan.read_from
            start = max(scan.begin, stop - step)
            if start >= stop:
                return
            checkpoints: dict[int, Checkpoint] = {}
            chunks: dict[_ChunkKey, bytes | None] = {}
            async for batch in fetch(self._lane, self._tp, start, stop, self._read_timeout):
                self.records_read += len(batch)
                for record in batch:
                    self._take(record, scan, checkpoints, chunks, keep)
            scan.merge(checkpoints, chunks, keep)
            scan.read_from = start

    def _take(
        self,
        record: Any,
        scan: _Scan,
        checkpoints: dict[int, Checkpoint],
        chunks: dict[_ChunkKey, bytes | None],
        keep: bool,
    ) -> None:
        """Take in one aiokafka record of the topic: a checkpoint or a snapshot chunk of
        this log (a chunk key already met in a later stretch is passed over)."""
        key = record.key.decode(errors="replace") if record.key is not None else ""
        parts = key.split("/")
        if parts[0] != self._topic:
            return
        if len(parts) == 5 and parts[2] == "snapshot" and parts[1].isdigit() and parts[4].isdigit():
            chunk_key = (int(parts[1]), parts[3], int(parts[4]))
            if chunk_key in scan.decided:
                return
            if not record.value:  # a tombstone
                chunks[chunk_key] = None
            else:
                chunks[chunk_key] = record.value if keep else b""
            return
        if len(parts) != 2:
            return
        try:
            checkpoints[int(parts[1])] = msgspec.json.decode(record.value or b"", type=Checkpoint)
        except (ValueError, msgspec.DecodeError) as exc:
            logger.warning(
                "ignoring unreadable checkpoint at offset %d: %s",
                record.offset,
                exc,
                extra=fields(),
            )
