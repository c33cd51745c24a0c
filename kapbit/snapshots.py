"""Snapshot checkpoints: a checkpoint that moves past open workflows.

A snapshot of a partition at offset ``O`` is the state of the log reader after reading
every record below ``O`` (:class:`~kapbit.log_reader.ReaderState`: open workflows with
their encoded input and outcomes, attempts, the idempotency window's ids and offsets, the
owners), so recovery loads it and reads the log only from ``O``. It is taken by reading the
log, not from the engine's state: a :class:`Snapshotter` follows each partition with the
same :class:`~kapbit.log_reader.PartitionReader` recovery uses, up to what this node had
acknowledged. So every rule of reading the log (zombie writes, second copies of a
``WorkflowCreated`` on both sides of ``O``, late acknowledgements, appends still in flight,
which lie at or above ``O``) holds by construction: recovery from the snapshot reaches the
state recovery from the log's start would. The records this instance appended it takes
from a :class:`Journal` (an acknowledged append is the log's record at its offset) rather
than reading them back, and reads from the log only the offsets the journal lacks (first
copies whose acknowledgement was lost, other writers' records).

A partition is followed only while a snapshot saves recovery real work: while it is
*pinned*, its oldest open workflow ``CheckpointPolicy.snapshot_after`` records or more
behind its end. Otherwise it rests: the journal passes its appends straight through and
nothing is read, and its checkpoints carry offsets only, which bound recovery as well. A
start whose recovered state is pinned follows from that state; a save that finds a resting
partition pinned wakes its reader, rebuilt as recovery rebuilds a partition
(:func:`restorer_from`) from the latest saved checkpoint, so the read is bounded by
``snapshot_after``, the window and what was written since that save; a save that finds the
pin lifted lets it rest again. A checkpoint names a snapshot only while it lies at or past
the checkpoint's offset (:func:`ahead`; recovery loads no other). In group mode the same
holds per owned partition from its recovery on, and a partition given up is no longer
followed.

Writing is crash-safe: the snapshot is encoded with the log's codec, cut into chunks of
``CheckpointPolicy.snapshot_chunk`` bytes and stored in the one of this start's two slots
that the current checkpoint does not name; only then is the checkpoint naming it (slot,
chunk count, size, CRC-32) saved, and then every chunk it does not name is deleted. A
crash before the checkpoint leaves the previous one and its snapshot whole, and so does
another instance writing snapshots at the same time (a zombie): its slots are its own. A
snapshot over ``CheckpointPolicy.snapshot_limit`` bytes is not written: the checkpoint
keeps naming the last one that fitted (or none: offsets only, as before snapshots), with
a warning. A start that cannot use a stored snapshot (chunks missing or damaged, another
codec, a window larger than the snapshot keeps) recovers from the checkpoint's offsets
instead. See docs/ARCHITECTURE.md, "Checkpoints".
"""

from __future__ import annotations

import functools
import hashlib
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from kapbit._log import fields
from kapbit.codecs import Codec
from kapbit.errors import DecodeError
from kapbit.events import EventKind
from kapbit.log_reader import PartitionReader, ReaderState
from kapbit.options import CheckpointPolicy
from kapbit.repository import Checkpoint, Record, Repository, SnapshotStore
from kapbit.restore import PartitionRestorer

logger = logging.getLogger("kapbit.snapshots")

#: The snapshot format; a start ignores a snapshot of another version.
VERSION = 1


class Snapshot(msgspec.Struct, kw_only=True):
    """What a snapshot's chunks hold, encoded with the log's codec (``writer``: the start
    that took it, for diagnosis)."""

    version: int = VERSION
    codec: str
    partition: int
    writer: str
    state: ReaderState


def snapshot_store(repository: Repository) -> SnapshotStore | None:
    """``repository`` as a snapshot store, or ``None`` when it keeps no snapshots."""
    if isinstance(repository, SnapshotStore) and repository.snapshots:
        return repository
    return None


@dataclass(slots=True)
class Written:
    """A snapshot whose chunks are stored, to be named by a checkpoint."""

    offset: int
    slot: str
    chunks: int
    size: int
    crc: int


def chunked(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into chunks of at most ``size`` bytes (one at least)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


class Journal:
    """The repository as this instance's emitter writes through it: every append it has
    acknowledged is kept, by offset, for the snapshotter following that partition.

    An acknowledged append is the log's record at its offset (kind, key, writer and value
    as written), so a follower takes it from here instead of reading it back: reading a
    partition it writes costs the process a second consumer decoding every record.
    Whatever is not here (a first copy whose acknowledgement was lost, another writer's
    records) the follower reads from the log, so it still reads exactly the log. Only
    followed partitions are kept, and each partition's latest claim by this instance (a
    follower starts at its claim, which comes before following). While no partition is
    followed, :attr:`append` is the repository's own method: the journal costs an append
    nothing. While one is, an append to a partition not followed is the repository's own
    call, handed back unawaited (one dict lookup, no coroutine of the journal's).
    """

    __slots__ = ("_claims", "_held", "_inner", "append")

    def __init__(self, inner: Repository) -> None:
        self._inner = inner
        self._held: dict[int, dict[int, Record]] = {}
        self._claims: dict[int, Record] = {}
        #: The repository's ``append`` while nothing is followed, else :meth:`_append`.
        self.append: Callable[[int, EventKind, str, str, bytes], Coroutine[Any, Any, int]] = (
            inner.append
        )

    def follow(self, partition: int) -> dict[int, Record]:
        """Keep ``partition``'s acknowledged appends from now on, in the returned dict (by
        offset; its reader pops them); what an earlier follower was handed is dropped."""
        claim = self._claims.get(partition)
        held = {} if claim is None else {claim.offset: claim}
        self._held[partition] = held
        self.append = self._append
        return held

    def forget(self, partition: int) -> None:
        """Stop keeping ``partition``'s appends (no longer followed)."""
        self._held.pop(partition, None)
        if not self._held:
            self.append = self._inner.append

    @property
    def partitions(self) -> int:
        return self._inner.partitions

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    def _append(
        self, partition: int, kind: EventKind, key: str, node: str, value: bytes
    ) -> Coroutine[Any, Any, int]:
        held = self._held.get(partition)
        if held is None:
            return self._inner.append(partition, kind, key, node, value)
        return self._append_held(held, partition, kind, key, node, value)

    async def _append_held(
        self,
        held: dict[int, Record],
        partition: int,
        kind: EventKind,
        key: str,
        node: str,
        value: bytes,
    ) -> int:
        offset = await self._inner.append(partition, kind, key, node, value)
        held[offset] = Record(partition, offset, kind, key, node, value)
        return offset

    def holding(self, partition: int) -> bool:
        """Whether ``partition``'s acknowledged appends are kept."""
        return partition in self._held

    async def claim(self, partition: int, node: str, value: bytes) -> int:
        offset = await self._inner.claim(partition, node, value)
        record = Record(partition, offset, EventKind.ACTIVE_WRITER, node, node, value)
        self._claims[partition] = record
        held = self._held.get(partition)
        if held is not None:
            held[offset] = record
        return offset

    def read(self, partition: int, start: int, stop: int) -> AsyncIterator[Sequence[Record]]:
        return self._inner.read(partition, start, stop)

    def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        return self._inner.tail(partition, start)

    async def end_offset(self, partition: int) -> int:
        return await self._inner.end_offset(partition)

    async def current_owner(self, partition: int) -> str:
        return await self._inner.current_owner(partition)

    async def save_checkpoint(self, partition: int, checkpoint: Checkpoint) -> None:
        await self._inner.save_checkpoint(partition, checkpoint)

    async def load_checkpoints(self) -> dict[int, Checkpoint]:
        return await self._inner.load_checkpoints()


class _Follower:
    """One followed partition: a reader fed the log in offset order from ``position``
    (built from ``start``, the state where following began, when first needed), and the
    acknowledged appends ``held`` for it by the :class:`Journal`."""

    __slots__ = ("_codec", "_partition", "_reader", "_start", "_window_size", "held", "position")

    def __init__(
        self,
        codec: Codec,
        partition: int,
        state: ReaderState,
        window_size: int,
        held: dict[int, Record],
    ) -> None:
        self._codec = codec
        self._partition = partition
        self._start: ReaderState | None = state
        self._window_size = window_size
        self._reader: PartitionReader | None = None
        self.position = state.offset
        self.held = held

    @property
    def reader(self) -> PartitionReader:
        reader = self._reader
        if reader is None:
            assert self._start is not None
            reader = PartitionReader.resume(
                self._codec, self._partition, self._start, self._window_size
            )
            self._reader, self._start = reader, None
        return reader

    def advance(self) -> None:
        """Read the held appends that continue the log from :attr:`position`."""
        held, position = self.held, self.position
        batch: list[Record] = []
        while (record := held.pop(position, None)) is not None:
            batch.append(record)
            position += 1
        if batch:
            self.reader.skim(batch)
            self.position = position

    def skim(self, records: Sequence[Record]) -> None:
        """Read ``records`` (read from the log), those below :attr:`position` excepted."""
        position = self.position
        fresh = [record for record in records if record.offset >= position]
        if fresh:
            self.reader.skim(fresh)
            self.position = fresh[-1].offset + 1

    def gap(self, stop: int) -> int:
        """Where the stretch from :attr:`position` that is not held ends (``stop`` at
        most): the log is read up to there."""
        held, position = self.held, self.position
        for offset in [offset for offset in held if offset < position]:
            del held[offset]  # acknowledged after the log was read past it
        return min((offset for offset in held if offset < stop), default=stop)


class Snapshotter:
    """Takes and writes the snapshots of a start's partitions.

    A partition is followed only while it is pinned (:meth:`pinned`): its reader goes on
    from where recovery left it (:meth:`follow`: the state at this node's claim) or from
    its latest checkpoint (:meth:`wake`) as the log grows: with a ``journal``, from this
    instance's acknowledged appends, reading the log only where they leave a gap. A
    partition not followed costs nothing per record.
    """

    def __init__(
        self,
        repository: Repository,
        store: SnapshotStore,
        codec: Codec,
        policy: CheckpointPolicy,
        partitions: int,
        window_size: int,
        writer: str,
        journal: Journal | None = None,
    ) -> None:
        self._repository = repository
        self._store = store
        self._codec = codec
        self._policy = policy
        self._window_size = window_size
        self._writer = writer
        self._journal = journal
        self._followers: list[_Follower | None] = [None] * partitions
        # Bumped whenever a partition's follower is replaced or dropped: a wake under way
        # then installs nothing.
        self._generations = [0] * partitions
        #: Times a partition was woken: followed again from its checkpoint.
        self.wakes = 0
        # Two slots of this start's own (writer ids are unique per start): another
        # instance writing at the same time (a zombie) never overwrites these chunks.
        tag = hashlib.blake2b(writer.encode(), digest_size=8).hexdigest()
        self._slots = (f"{tag}-0", f"{tag}-1")
        self._cleaned: set[int] = set()
        self._logged: list[int] = [0] * partitions
        #: Bytes of the latest snapshot per partition (``0``: none written).
        self.sizes: list[int] = [0] * partitions
        #: Snapshots not written because they were over the limit.
        self.too_large = 0

    def pinned(self, stop: int, oldest: int) -> bool:
        """Whether a snapshot at ``stop`` saves recovery real work: the oldest open
        workflow (its checkpoint offset ``oldest``) lies ``snapshot_after`` records or
        more behind."""
        return stop - oldest >= self._policy.snapshot_after

    def follow(self, partition: int, state: ReaderState) -> None:
        """Follow ``partition`` from ``state`` (where recovery left it, at this node's
        claim), replacing any earlier follower of it; only if ``state`` is pinned (else
        the partition rests until a save finds it pinned)."""
        oldest = min((w.created_offset for w in state.open), default=state.offset)
        if not self.pinned(state.offset, oldest):
            self.rest(partition)
            return
        self._generations[partition] += 1
        journal = self._journal
        held: dict[int, Record] = {} if journal is None else journal.follow(partition)
        self._followers[partition] = _Follower(
            self._codec, partition, state, self._window_size, held
        )

    async def wake(self, partition: int, checkpoint: Checkpoint, stop: int) -> bool:
        """Follow ``partition`` again, from its latest saved ``checkpoint``: the log (or the
        snapshot it names) is read as recovery reads it, up to ``stop``; from there on the
        journal feeds the reader. ``False`` when the partition was followed or given up
        meanwhile (nothing is installed then)."""
        self._generations[partition] += 1
        generation = self._generations[partition]
        journal = self._journal
        held: dict[int, Record] = {} if journal is None else journal.follow(partition)
        try:
            restorer = await restorer_from(
                self._repository, self._codec, partition, checkpoint, self._window_size
            )
            await restorer.read_to(stop)
        except BaseException:
            if self._generations[partition] == generation:
                self.rest(partition)
            raise
        if self._generations[partition] != generation:
            return False
        self.wakes += 1
        self._followers[partition] = _Follower(
            self._codec, partition, restorer.state(), self._window_size, held
        )
        logger.info(
            "partition %d: its oldest open workflow lies %d records or more behind its end; "
            "snapshots follow it from offset %d, after reading %d records",
            partition,
            self._policy.snapshot_after,
            stop,
            restorer.records_read,
            extra=fields(partition=partition),
        )
        return True

    def rest(self, partition: int) -> None:
        """Stop following ``partition`` (no longer pinned) and forget its state."""
        self._generations[partition] += 1
        self._followers[partition] = None
        if self._journal is not None:
            self._journal.forget(partition)

    def unfollow(self, partition: int) -> None:
        """Stop following ``partition`` (given up) and forget its state and size."""
        self.rest(partition)
        self.sizes[partition] = 0

    @property
    def followed(self) -> int:
        """How many partitions are followed now."""
        return sum(follower is not None for follower in self._followers)

    def following(self, partition: int) -> bool:
        """Whether ``partition`` is followed."""
        return self._followers[partition] is not None

    def position(self, partition: int) -> int:
        """The offset the partition has been read up to (``-1``: not followed)."""
        follower = self._followers[partition]
        return -1 if follower is None else follower.position

    def advance(self) -> None:
        """Read what the journal holds that continues each followed partition (keeps
        what it holds small between snapshots)."""
        for follower in self._followers:
            if follower is not None:
                follower.advance()

    async def take(self, partition: int, stop: int, since: int) -> ReaderState:
        """The partition's state after reading every record below ``stop`` (all of which
        exist); claims before ``since`` are left out of it."""
        follower = self._followers[partition]
        if follower is None:
            raise ValueError(f"partition {partition} is not followed")
        follower.advance()
        while follower.position < stop:
            start, end = follower.position, follower.gap(stop)
            async for batch in self._repository.read(partition, start, end):
                follower.skim(batch)
            # Every record below ``end`` was read (offsets without a record have none).
            follower.position = max(follower.position, end)
            follower.advance()
        reader = follower.reader
        reader.settle()
        return reader.state(follower.position, since)

    def encode(self, partition: int, state: ReaderState) -> bytes | None:
        """The snapshot's bytes, or ``None`` when they exceed the limit (logged)."""
        snapshot = Snapshot(
            codec=self._codec.name, partition=partition, writer=self._writer, state=state
        )
        data = self._codec.encode(snapshot)
        limit = self._policy.snapshot_limit
        if len(data) > limit:
            self.too_large += 1
            logger.warning(
                "partition %d: the snapshot at offset %d is %d bytes (%d open workflows, "
                "%d ids), over snapshot_limit=%d; the checkpoint is saved without it "
                "(recovery reads from the oldest open workflow)",
                partition,
                state.offset,
                len(data),
                len(state.open),
                len(state.window),
                limit,
                extra=fields(partition=partition),
            )
            return None
        return data

    async def write(self, partition: int, data: bytes, offset: int, saved: Checkpoint) -> Written:
        """Store ``data`` in the slot of this start that ``saved`` does not name; nothing
        refers to it yet."""
        first, second = self._slots
        slot = second if saved.snapshot_slot == first else first
        chunks = chunked(data, self._policy.snapshot_chunk)
        for index, chunk in enumerate(chunks):
            await self._store.save_snapshot_chunk(partition, slot, index, chunk)
        self._log(partition, offset, len(data), len(chunks))
        return Written(offset, slot, len(chunks), len(data), zlib.crc32(data))

    async def replaced(self, partition: int, current: Checkpoint) -> None:
        """``current`` is saved: delete the chunks it does not name in this start's slots
        (the replaced snapshot, what a failed attempt left) and, the first time, in every
        slot (what earlier starts left). Chunks another instance writes later are its own
        to delete."""
        live = current.snapshot_slot if current.snapshot_offset >= 0 else None
        self.sizes[partition] = current.snapshot_size if live is not None else 0
        store = self._store
        first = partition not in self._cleaned
        for slot, indexes in (await store.snapshot_slots(partition)).items():
            if not first and slot not in self._slots:
                continue
            for index in sorted(indexes):
                if slot != live or index >= current.snapshot_chunks:
                    await store.save_snapshot_chunk(partition, slot, index, None)
        self._cleaned.add(partition)

    def _log(self, partition: int, offset: int, size: int, chunks: int) -> None:
        self.sizes[partition] = size
        level = logging.DEBUG
        if size > 2 * self._logged[partition] or not self._logged[partition]:
            self._logged[partition] = size  # logged again when it doubles
            level = logging.INFO
        logger.log(
            level,
            "partition %d: snapshot at offset %d, %d bytes in %d chunks",
            partition,
            offset,
            size,
            chunks,
            extra=fields(partition=partition),
        )


_T = TypeVar("_T")


class Attempt(Protocol):
    """How a step of reading is run: recovery retries it (``StartRetries.run``)."""

    def __call__(self, what: str, call: Callable[[], Awaitable[_T]], /) -> Awaitable[_T]: ...


async def _once(what: str, call: Callable[[], Awaitable[_T]], /) -> _T:
    return await call()


def ahead(checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` names a snapshot that saves reading: one at or past its
    offset. An older one would make recovery read in full from there, which its offsets
    (the full read from the oldest open workflow, ids only below) do better."""
    return checkpoint.snapshot_offset >= checkpoint.offset >= 0


async def restorer_from(
    repository: Repository,
    codec: Codec,
    partition: int,
    checkpoint: Checkpoint,
    window_size: int,
    attempt: Attempt = _once,
) -> PartitionRestorer:
    """A reader of ``partition`` prepared as recovery prepares it from ``checkpoint``: from
    the snapshot it names when that is :func:`ahead` and loads, else from its offsets
    (``restorer.checkpoint`` says which). Each step runs through ``attempt``."""
    snapshot: ReaderState | None = None
    store = snapshot_store(repository)
    if checkpoint.snapshot_offset >= 0:
        if store is not None and ahead(checkpoint):
            snapshot = await attempt(
                f"loading the snapshot of partition {partition}",
                functools.partial(load_snapshot, store, codec, partition, checkpoint, window_size),
            )
        if snapshot is None:
            checkpoint = without_snapshot(checkpoint)
    restorer = PartitionRestorer(repository, codec, partition, checkpoint, window_size, snapshot)
    await attempt(f"recovering partition {partition}", restorer.prepare)
    return restorer


async def load_snapshot(
    store: SnapshotStore, codec: Codec, partition: int, checkpoint: Checkpoint, window_size: int
) -> ReaderState | None:
    """The state ``checkpoint``'s snapshot holds, or ``None`` (with a warning saying why)
    when it cannot be used: recovery then starts from the checkpoint's offsets."""
    problem = ""
    chunks = await store.load_snapshot_chunks(
        partition, checkpoint.snapshot_slot, checkpoint.snapshot_chunks
    )
    data = b"".join(chunks)
    state: ReaderState | None = None
    if len(chunks) < checkpoint.snapshot_chunks:
        problem = f"{checkpoint.snapshot_chunks - len(chunks)} of its chunks are missing"
    elif len(data) != checkpoint.snapshot_size or zlib.crc32(data) != checkpoint.snapshot_crc:
        problem = "its chunks do not match the checkpoint (size or CRC-32)"
    else:
        try:
            snapshot = codec.decode(data, Snapshot)
        except DecodeError as exc:
            problem = f"it does not decode with the {codec.name} codec ({exc})"
        else:
            state = snapshot.state
            if snapshot.version != VERSION:
                problem = f"it has format version {snapshot.version}, not {VERSION}"
            elif snapshot.codec != codec.name:
                problem = f"it was written with the {snapshot.codec} codec"
            elif snapshot.partition != partition or state.offset != checkpoint.snapshot_offset:
                problem = "it is of another partition or offset than its checkpoint names"
            elif state.window_size < window_size:
                problem = (
                    f"it keeps {state.window_size} ids, this instance's window is {window_size}"
                )
    if not problem:
        return state
    logger.warning(
        "partition %d: not using the snapshot at offset %d: %s; recovery reads from the "
        "checkpoint's offset %d",
        partition,
        checkpoint.snapshot_offset,
        problem,
        min(checkpoint.offset, checkpoint.window_offset),
        extra=fields(partition=partition),
    )
    return None


def without_snapshot(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` with its offsets only."""
    return msgspec.structs.replace(
        checkpoint,
        snapshot_offset=-1,
        snapshot_slot="",
        snapshot_chunks=0,
        snapshot_size=0,
        snapshot_crc=0,
    )


#: The fields of a :class:`~kapbit.repository.Checkpoint` that name its snapshot.
_SNAPSHOT_FIELDS = tuple(f for f in Checkpoint.__struct_fields__ if f.startswith("snapshot_"))


def with_snapshot_of(checkpoint: Checkpoint, saved: Checkpoint) -> Checkpoint:
    """``checkpoint`` naming the snapshot ``saved`` names."""
    named = {name: getattr(saved, name) for name in _SNAPSHOT_FIELDS}
    return msgspec.structs.replace(checkpoint, **named)


def with_snapshot(checkpoint: Checkpoint, written: Written) -> Checkpoint:
    """``checkpoint`` naming the snapshot ``written``."""
    return msgspec.structs.replace(
        checkpoint,
        snapshot_offset=written.offset,
        snapshot_slot=written.slot,
        snapshot_chunks=written.chunks,
        snapshot_size=written.size,
        snapshot_crc=written.crc,
    )
