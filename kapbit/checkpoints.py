"""Checkpoints: per partition, the offset below which every workflow has terminated.

A checkpoint that lags is safe (recovery reads a little more); one that leads loses
workflows. So the checkpoint of a partition is the created offset of its oldest open
workflow, and while a ``WorkflowCreated`` is still being written its offset is bounded from
below by the highest offset already acknowledged in that partition. That bound is kept
after the append returns: a lost acknowledgement may have left a first copy below the
acknowledged one. Other events of a workflow are written after its ``WorkflowCreated``,
so every copy of them lies above the hold. See docs/ARCHITECTURE.md, "Checkpoints".

With snapshots (:mod:`kapbit.snapshots`) a checkpoint of a pinned partition (its oldest
open workflow ``CheckpointPolicy.snapshot_after`` records or more behind) also names a
snapshot of the partition at the offset this node had acknowledged, so recovery need not
read from the oldest open workflow; the offsets above are kept as the fallback. A save
that finds a partition pinned wakes its snapshot reader; one that finds it no longer
pinned lets it rest, and the checkpoint keeps naming the last snapshot only while that
lies at or past its offset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kapbit._log import fields
from kapbit.clock import SYSTEM_CLOCK, Clock
from kapbit.codecs import Codec
from kapbit.errors import Fenced, StorageError
from kapbit.fencing import OwnerTracker
from kapbit.idempotency import IdempotencyWindow
from kapbit.log_reader import ReaderState
from kapbit.options import CheckpointPolicy
from kapbit.repository import Checkpoint, Repository
from kapbit.snapshots import (
    Journal,
    Snapshotter,
    ahead,
    snapshot_store,
    with_snapshot,
    with_snapshot_of,
)

logger = logging.getLogger("kapbit.checkpoints")

#: Terminations between two reads of what the journal holds for the snapshots.
_ADVANCE_EVERY = 256


class Checkpointer:
    """Tracks open workflows per partition and saves checkpoints by count and by time.

    ``acked(p)`` is the highest offset this node has had acknowledged in partition ``p``
    (the emitter's); a checkpoint never moves past it. With ``codec`` and ``states``
    (where recovery left each partition), ``policy.snapshots`` on and a repository that
    keeps snapshots, checkpoints carry snapshots; ``journal`` is the emitter's repository
    when it keeps the acknowledged appends for them (:class:`~kapbit.snapshots.Journal`).
    """

    def __init__(
        self,
        repository: Repository,
        policy: CheckpointPolicy,
        acked: Callable[[int], int],
        windows: list[IdempotencyWindow],
        owners: list[OwnerTracker],
        saved: list[Checkpoint],
        writer: str = "",
        window_size: int = 0,
        codec: Codec | None = None,
        states: list[ReaderState] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        journal: Journal | None = None,
    ) -> None:
        # Each checkpoint names the latest record ``writer`` (this node) had acknowledged
        # in its partition, so a start can tell it belongs to this log.
        self._writer = writer
        self._window_size = window_size
        self._repository = repository
        self._policy = policy
        self._acked = acked
        self._windows = windows
        self._owners = owners
        self._saved = saved
        self._open: list[dict[str, int]] = [{} for _ in windows]
        #: The partitions to save (all of them, but in group mode only those owned).
        self.owned: set[int] = set(range(len(windows)))
        self._terminated_since_save = 0
        # Bumped when a partition is adopted or dropped: a save begun before does not
        # store anything for it after (group mode: another owner may have it by then).
        self._epochs = [0] * len(windows)
        self._clock = clock
        self._due = asyncio.Event()
        store = snapshot_store(repository)
        self.snapshots: Snapshotter | None = None
        if policy.snapshots and store is not None and codec is not None:
            self.snapshots = Snapshotter(
                repository, store, codec, policy, len(windows), window_size, writer, journal
            )
            for partition, state in enumerate(states or ()):
                self.snapshots.follow(partition, state)

    def opening(self, partition: int, workflow_id: str) -> None:
        """A ``WorkflowCreated`` is about to be appended: hold the checkpoint below it."""
        self._open[partition][workflow_id] = self._acked(partition) + 1

    def opened(self, partition: int, workflow_id: str, offset: int) -> None:
        """The workflow's ``WorkflowCreated`` was acknowledged at ``offset`` (also for
        restored ones).

        The hold never moves up: an append whose acknowledgement was lost leaves an
        earlier copy below ``offset``, and a checkpoint between the copies would make
        recovery read the first as a finished id and drop the second as its duplicate.
        The bound set by :meth:`opening` lies below every copy.
        """
        held = self._open[partition]
        held[workflow_id] = min(offset, held.get(workflow_id, offset))

    def abandoned(self, partition: int, workflow_id: str) -> None:
        """The ``WorkflowCreated`` was certainly not written (refused or never sent)."""
        self._open[partition].pop(workflow_id, None)

    def terminated(self, partition: int, workflow_id: str) -> None:
        """The workflow's terminal event is durable."""
        self._open[partition].pop(workflow_id, None)
        self._terminated_since_save += 1
        if self._terminated_since_save >= self._policy.every:
            # Counted from here, not from when the save starts: terminations before it
            # starts must not be lost from the count of the next one.
            self._terminated_since_save = 0
            self._due.set()
        elif self._terminated_since_save % _ADVANCE_EVERY == 0 and self.snapshots is not None:
            self.snapshots.advance()

    def adopt(
        self,
        partition: int,
        owners: OwnerTracker,
        saved: Checkpoint,
        state: ReaderState | None = None,
    ) -> None:
        """Group mode: ``partition`` was claimed and recovered (its window is in place);
        ``state`` is where recovery left it, from which its snapshots follow the log."""
        self._epochs[partition] += 1
        self._owners[partition] = owners
        self._saved[partition] = saved
        self._open[partition] = {}
        self.owned.add(partition)
        if self.snapshots is not None:
            if state is None:
                self.snapshots.unfollow(partition)
            else:
                self.snapshots.follow(partition, state)

    def drop(self, partition: int) -> None:
        """Group mode: ``partition`` was given up; nothing more is saved for it, not even
        by a save under way, and its snapshots stop following it."""
        self._epochs[partition] += 1
        self.owned.discard(partition)
        self._open[partition] = {}
        if self.snapshots is not None:
            self.snapshots.unfollow(partition)

    def checkpoint(self, partition: int) -> Checkpoint:
        """The checkpoint that is true for ``partition`` right now."""
        open_offsets = self._open[partition]
        offset = min(open_offsets.values()) if open_offsets else self._acked(partition) + 1
        oldest_id = self._windows[partition].oldest_offset()
        window_offset = offset if oldest_id is None else min(oldest_id, offset)
        owners = self._owners[partition]
        return Checkpoint(
            offset=offset,
            owner=owners.owner_at(offset),
            window_offset=window_offset,
            window_owner=owners.owner_at(window_offset),
            window_size=self._window_size,
            anchor_offset=self._acked(partition) if self._writer else -1,
            anchor_writer=self._writer,
        )

    async def save(self) -> None:
        """Save every partition's checkpoint that moved forward since the last save."""
        self._due.clear()
        snapshots = self.snapshots
        epochs = self._epochs
        for partition in range(len(self._saved)):
            if partition not in self.owned:
                continue
            epoch, saved = epochs[partition], self._saved[partition]
            stop = self._acked(partition) + 1  # before the anchor: the snapshot ends below it
            checkpoint = self.checkpoint(partition)
            if snapshots is not None:
                checkpoint = await self._snapshot(snapshots, partition, stop, checkpoint, saved)
                if epochs[partition] != epoch:
                    continue  # given up meanwhile: its chunks are left to the next owner
            if (
                checkpoint.offset <= saved.offset
                and checkpoint.window_offset <= saved.window_offset
                and checkpoint.snapshot_offset <= saved.snapshot_offset
            ):
                continue
            await self._repository.save_checkpoint(partition, checkpoint)
            if epochs[partition] != epoch:
                continue
            self._saved[partition] = checkpoint
            if snapshots is not None:
                await snapshots.replaced(partition, checkpoint)

    async def _snapshot(
        self,
        snapshots: Snapshotter,
        partition: int,
        stop: int,
        checkpoint: Checkpoint,
        saved: Checkpoint,
    ) -> Checkpoint:
        """``checkpoint`` naming a new snapshot of the log below ``stop`` when the partition
        is pinned (its reader woken first if it rested), else the saved one while that is
        :func:`~kapbit.snapshots.ahead` of the checkpoint's offset (a snapshot stays true
        for its offset, whatever the checkpoint's offsets say), else none."""
        if snapshots.pinned(stop, checkpoint.offset):
            following = snapshots.following(partition)
            if not following and stop > saved.snapshot_offset:
                following = await snapshots.wake(partition, saved, stop)
            if following and stop > saved.snapshot_offset:
                since = min(checkpoint.offset, checkpoint.window_offset)
                state = await snapshots.take(partition, stop, since)
                data = snapshots.encode(partition, state)
                if data is not None and state.offset > saved.snapshot_offset:
                    written = await snapshots.write(partition, data, state.offset, saved)
                    return with_snapshot(checkpoint, written)
        elif snapshots.following(partition):
            snapshots.rest(partition)  # no longer pinned: until a save finds it pinned again
        if saved.snapshot_offset < 0:
            return checkpoint
        named = with_snapshot_of(checkpoint, saved)
        return named if ahead(named) else checkpoint

    async def _due_or_interval(self) -> None:
        """Return once a save is due by count or ``interval`` seconds of the clock passed."""
        due = asyncio.ensure_future(self._due.wait())
        interval = asyncio.ensure_future(self._clock.sleep(self._policy.interval))
        try:
            await asyncio.wait((due, interval), return_when=asyncio.FIRST_COMPLETED)
        finally:
            due.cancel()
            interval.cancel()

    async def run(self) -> None:
        """Save periodically until cancelled; a failed save is retried on the next round.

        Raises :class:`~kapbit.errors.Fenced` when the log says another writer owns a
        partition."""
        while True:
            await self._due_or_interval()
            try:
                await self.save()
            except Fenced:
                raise
            except StorageError as exc:
                logger.warning("saving checkpoints failed, will retry: %s", exc, extra=fields())
