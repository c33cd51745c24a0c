"""Recovery: rebuilding a partition's state from its log at instance start.

Per partition, up to this node's ``ActiveWriter`` at ``claim_offset`` (most of it before
that claim is written, see :class:`PartitionRestorer`):

1. read ``[checkpoint.window_offset, checkpoint.offset)`` for workflow ids only, to refill
   the idempotency window: only the record's kind, key and writer are looked at, no payload
   is decoded there (every workflow created below the checkpoint has terminated);
2. read ``[checkpoint.offset, claim_offset)`` in full: every record is decoded (a record that
   cannot be is a :class:`~kapbit.errors.CorruptRecord` and stops the start), and every
   workflow created there that has no terminal event is in flight, with the outcomes it has
   persisted.

The work done depends on the checkpoint lag and the window size, not the log's length.
Both stretches are read by the log reader (:class:`~kapbit.log_reader.PartitionReader`),
which holds the rules every reader of the log shares: zombie writes (records of a node
written after another node's ``ActiveWriter``) are skipped, and second copies of an event
(a producer retry) are ignored; a ``WorkflowCreated`` is a second copy exactly when the
engine would have refused the id at that point (the id is in the idempotency window of
the node that wrote it, or its workflow is open).

A checkpoint covers the window of the instance that saved it. When this start keeps more
ids (``idempotency_window`` grew), the missing ones are read further back, from the
checkpoint's window start towards the log's beginning, in growing chunks; there a
``WorkflowCreated`` counts only if its writer is the node of the nearest ``ActiveWriter``
below it (the exact zombie rule, applied backwards).

A checkpoint with a snapshot (:mod:`kapbit.snapshots`) at or past its offset replaces step 1
and the part of step 2 below the snapshot's offset: the reader starts from the snapshot's
state there (an older snapshot is not loaded: the offsets read less in full).

Before a checkpoint is used it is checked against the log (:func:`trusted_checkpoint`),
and the log's last record against this instance's codec (:func:`check_codec`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kapbit._log import fields
from kapbit.codecs import Codec
from kapbit.errors import CodecMismatch, CorruptRecord
from kapbit.events import ActiveWriter, EventKind
from kapbit.fencing import OwnerTracker, is_claim
from kapbit.log_reader import OpenWorkflow, PartitionReader, ReaderState, Verdict, decode_event
from kapbit.repository import Checkpoint, Record, Repository

__all__ = [
    "PartitionRestorer",
    "RestoredPartition",
    "RestoredWorkflow",
    "check_codec",
    "decode_event",
    "older_ids",
    "restore_partition",
    "trusted_checkpoint",
]

logger = logging.getLogger("kapbit.restore")

_CREATED = EventKind.WORKFLOW_CREATED
#: Records read per step when reading back for older ids (the step doubles each time).
_BACK_CHUNK = 1024
#: How many of a partition's last records the codec check looks at.
_CODEC_PROBE = 64


#: A workflow found in flight: created, not terminated.
RestoredWorkflow = OpenWorkflow


@dataclass(slots=True)
class RestoredPartition:
    """What recovery learnt about one partition.

    ``window`` lists ``(workflow id, created offset)`` of the idempotency window, oldest
    first; ``records_read`` counts the records read, ``records_decoded`` those of them whose
    payload was decoded (only records at or after the checkpoint).
    """

    partition: int
    claim_offset: int
    window: list[tuple[str, int]]
    in_flight: list[RestoredWorkflow]
    owners: OwnerTracker
    records_read: int
    records_decoded: int = 0


async def _record_at(repository: Repository, partition: int, offset: int) -> Record | None:
    async for batch in repository.read(partition, offset, offset + 1):
        for record in batch:
            if record.offset == offset:
                return record
    return None


async def check_codec(repository: Repository, codec: Codec, partition: int, end: int) -> None:
    """Refuse (:class:`~kapbit.errors.CodecMismatch`) a log written with another codec:
    read before this node writes anything.

    The newest record that decodes with ``codec`` must not be a claim naming another
    codec, and no newer claim may fail to decode (the newest owner wrote another codec);
    if none of the last ``_CODEC_PROBE`` decodes, the log is another codec's. (An
    undecodable record alone may be a zombie write, which recovery never decodes; the
    last record is read first, the others only if it does not decode.)
    """
    if end <= 0:
        return  # an empty partition: this start's claim will be its first record
    first_error: CorruptRecord | None = None
    checked = 0
    for begin in (end - 1, max(0, end - _CODEC_PROBE)):
        tail = [
            r async for batch in repository.read(partition, begin, end - checked) for r in batch
        ]
        for record in reversed(tail):
            checked += 1
            try:
                event = decode_event(codec, record)
            except CorruptRecord as exc:
                if is_claim(record):
                    raise CodecMismatch(
                        partition,
                        record.offset,
                        f"node {record.node!r} claimed the log last, and its claim does not "
                        f"decode with this instance's {codec.name} codec ({exc.cause})",
                    ) from exc
                first_error = first_error or exc
                continue
            if isinstance(event, ActiveWriter) and event.codec and event.codec != codec.name:
                raise CodecMismatch(
                    partition,
                    record.offset,
                    f"node {event.node!r} claimed the log with the {event.codec} codec, "
                    f"this instance uses {codec.name}",
                )
            return
    if first_error is not None:
        raise CodecMismatch(
            first_error.partition,
            first_error.offset,
            f"none of the last {checked} records decodes with this instance's {codec.name} "
            f"codec; was the log written with another codec? ({first_error.cause})",
        ) from first_error


async def trusted_checkpoint(
    repository: Repository, partition: int, checkpoint: Checkpoint | None, end: int
) -> Checkpoint:
    """``checkpoint`` if it belongs to this log, else an empty one (recovery then reads the
    partition from its start: slow, but nothing is lost or accepted twice).

    A checkpoint names a record of its log (``anchor_offset``, ``anchor_writer``: the
    latest record the saving instance had written). It is trusted only if it lies within
    the log (below ``end``) and the log holds a record of that writer at that offset: a
    checkpoint of another log sharing the store, or of a log that was deleted and
    recreated, fails this, as writer ids are unique per start. A record no longer there at
    all (below ``end``: removed by retention) cannot be checked; the checkpoint is then
    trusted, as reading a log whose start was removed could not do better.
    """
    if checkpoint is None:
        return Checkpoint()
    anchor, writer = checkpoint.anchor_offset, checkpoint.anchor_writer
    problem = ""
    if max(checkpoint.offset, checkpoint.window_offset, checkpoint.snapshot_offset) > end:
        problem = f"it points past the log's end ({end})"
    elif anchor < 0 or not writer:
        problem = "it names no record of its log (saved by an older kapbit version)"
    elif anchor >= end:
        problem = f"the record it names, at offset {anchor}, is past the log's end ({end})"
    else:
        record = await _record_at(repository, partition, anchor)
        if record is None:
            logger.warning(
                "partition %d: the record the checkpoint names (offset %d) is gone, "
                "removed by retention?; the checkpoint is used unchecked",
                partition,
                anchor,
                extra=fields(partition=partition),
            )
        elif record.node != writer:
            problem = (
                f"the log holds no record of {writer!r} at offset {anchor} (but one of "
                f"{record.node!r}): the checkpoint is another log's (a shared checkpoint "
                "store, or the log was recreated)"
            )
    if not problem:
        return checkpoint
    logger.warning(
        "ignoring the checkpoint of partition %d: %s; recovery reads the partition from its start",
        partition,
        problem,
        extra=fields(partition=partition),
    )
    return Checkpoint()


async def older_ids(
    repository: Repository,
    partition: int,
    stop: int,
    owner: str,
    wanted: int,
    chunk: int = _BACK_CHUNK,
) -> list[tuple[str, int]]:
    """The newest ``wanted`` ids created below ``stop`` by their partition's owner, oldest
    first, read backwards in growing chunks. ``owner`` is the owner in force at ``stop``;
    further back, a record's owner is the node of the nearest claim below it, so records
    wait in ``pending`` until that claim is read."""
    found: list[tuple[str, int]] = []  # newest first
    seen: set[str] = set()
    pending: list[Record] = []
    known: str | None = owner
    end, step = stop, chunk

    def take(record: Record) -> None:
        if record.key not in seen:
            seen.add(record.key)
            found.append((record.key, record.offset))

    while end > 0 and len(found) < wanted:
        begin = max(0, end - step)
        records = [r async for batch in repository.read(partition, begin, end) for r in batch]
        for record in reversed(records):
            if record.kind is _CREATED:
                if known is None:
                    pending.append(record)
                elif record.node == known:
                    take(record)
            elif is_claim(record):
                for waiting in pending:
                    if waiting.node == record.node:
                        take(waiting)
                pending.clear()
                known = None  # below a claim: the previous owner, not known yet
        end, step = begin, step * 2
    return list(reversed(found[:wanted]))


class PartitionRestorer:
    """Rebuilds one partition's state in steps, so most of the reading can happen before
    this node claims the partition: :meth:`prepare` (ids below the checkpoint), then
    :meth:`read_to` any number of times (in full, up to a growing stop: first the log's
    end before claiming, then the claim), then :meth:`result`. A step that fails (a
    transient storage error) can be called again: ``prepare`` starts over, ``read_to``
    goes on after the last record it took in. The rules are the log reader's
    (:class:`~kapbit.log_reader.PartitionReader`)."""

    def __init__(
        self,
        repository: Repository,
        codec: Codec,
        partition: int,
        checkpoint: Checkpoint,
        window_size: int,
        snapshot: ReaderState | None = None,
    ) -> None:
        self._repository = repository
        self._codec = codec
        self.partition = partition
        self.checkpoint = checkpoint
        self._window_size = window_size
        self._snapshot = snapshot
        self._start = min(checkpoint.window_offset, checkpoint.offset)
        self._start_owner = (
            checkpoint.window_owner if self._start < checkpoint.offset else checkpoint.owner
        )
        self._saver_size = checkpoint.window_size or window_size
        self._reader = self._new_reader()
        self.position = checkpoint.offset if snapshot is None else snapshot.offset
        self.records_read = self.records_decoded = 0

    def _new_reader(self) -> PartitionReader:
        if self._snapshot is not None:
            return PartitionReader.resume(
                self._codec, self.partition, self._snapshot, self._window_size
            )
        return PartitionReader(
            self._codec,
            self.partition,
            self._start_owner,
            self._window_size,
            writer_window=self._saver_size,
        )

    @property
    def owners(self) -> OwnerTracker:
        """The partition's owners as read so far."""
        return self._reader.owners

    @property
    def open(self) -> dict[str, RestoredWorkflow]:
        """The workflows open as read so far, by id."""
        return self._reader.open

    async def prepare(self) -> None:
        """Refill the idempotency window from the ids below the checkpoint (from its
        snapshot, when recovering from one: nothing is read)."""
        checkpoint, window_size = self.checkpoint, self._window_size
        self._reader = reader = self._new_reader()
        self.records_read = 0
        if self._snapshot is not None:
            return

        # 0. The checkpoint covers fewer ids than this start keeps: read further back.
        if self._start > 0 and checkpoint.window_size < window_size:
            for workflow_id, offset in await older_ids(
                self._repository, self.partition, self._start, self._start_owner, window_size
            ):
                reader.windows.add(workflow_id, offset)

        # 1. Ids only: every workflow created here has terminated; nothing is decoded.
        async for batch in self._repository.read(self.partition, self._start, checkpoint.offset):
            self.records_read += len(batch)
            reader.take_ids(batch)

    async def read_to(self, stop: int) -> None:
        """2. Read in full from where the last call stopped up to ``stop``."""
        reader = self._reader
        async for batch in self._repository.read(self.partition, self.position, stop):
            for record in batch:
                if record.offset < self.position:
                    continue
                if reader.take(record)[0] is not Verdict.ZOMBIE:
                    self.records_decoded += 1
                self.records_read += 1
                self.position = record.offset + 1

    def state(self) -> ReaderState:
        """The partition's state as read so far (up to :attr:`position`)."""
        return self._reader.state(self.position)

    def result(self, claim_offset: int) -> RestoredPartition:
        """What was rebuilt, once read up to this node's claim at ``claim_offset``."""
        reader = self._reader
        return RestoredPartition(
            partition=self.partition,
            claim_offset=claim_offset,
            window=list(reader.windows.of(self._window_size).entries()),
            in_flight=list(reader.open.values()),
            owners=reader.owners,
            records_read=self.records_read,
            records_decoded=self.records_decoded,
        )


async def restore_partition(
    repository: Repository,
    codec: Codec,
    partition: int,
    claim_offset: int,
    checkpoint: Checkpoint,
    window_size: int,
) -> RestoredPartition:
    """Read what recovery needs of ``partition`` up to this node's claim, in one go."""
    restorer = PartitionRestorer(repository, codec, partition, checkpoint, window_size)
    await restorer.prepare()
    await restorer.read_to(claim_offset)
    return restorer.result(claim_offset)
