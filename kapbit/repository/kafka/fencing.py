"""Fencing confirmation: an append is acknowledged to the engine only once every offset
between this node's ``ActiveWriter`` and the record is known to be harmless, by the rule
of :mod:`kapbit.fencing` (see docs/ARCHITECTURE.md, "Fencing").

This node's own acknowledgements usually arrive contiguous, so a confirmed frontier just
moves forward; only a gap (another writer's record, a duplicate from a producer retry) is
read back, in one fetch that returns at once because the data exists. A foreign
``ActiveWriter`` in a gap fences this node.

A log that loses records under a running instance (a broker restarted without its data, a
topic deleted and created again) shows itself by offsets: an acknowledgement at or below
one this node already had, a log end below it, a read the broker moved back to the start.
Each raises :class:`~kapbit.errors.LogLost`, and the partition accepts nothing more.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import TopicPartition

from kapbit._log import fields
from kapbit.errors import Fenced, LogLost, TransientStorageError
from kapbit.fencing import displaces, fenced_by
from kapbit.repository.kafka.errors import BROKER_ERRORS, fail
from kapbit.repository.kafka.reads import Lane, fetch
from kapbit.repository.kafka.records import parse

logger = logging.getLogger("kapbit.kafka")


class PartitionFence:
    """This node's claim on one partition and the frontier of confirmed offsets."""

    __slots__ = (
        "acked",
        "claim_offset",
        "fenced",
        "frontier",
        "gap_reader",
        "highest",
        "node",
        "waiters",
    )

    def __init__(self) -> None:
        self.node: str | None = None
        self.claim_offset = -1
        self.frontier = -1
        #: The highest offset Kafka acknowledged to this node: the log holds at least that.
        self.highest = -1
        self.acked: set[int] = set()
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.fenced: Fenced | None = None
        self.gap_reader: asyncio.Task[None] | None = None

    def claim(self, node: str, offset: int) -> None:
        self.node = node
        self.claim_offset = offset
        self.frontier = offset
        self.acked = {o for o in self.acked if o > offset}
        self.fenced = None
        self.advance()

    def confirmed(self, offset: int) -> bool:
        """Take in this node's acknowledged ``offset``: whether every offset from the claim
        up to it is judged harmless now (else :meth:`Confirmer.confirm` waits for that)."""
        frontier = self.frontier
        if offset <= frontier:
            return True
        if offset == frontier + 1 and not self.acked and not self.waiters:
            # The usual case, own acks in order: nothing is held back, so nothing to release.
            self.frontier = offset
            return True
        self.acked.add(offset)
        self.advance()
        return offset <= self.frontier

    def advance(self) -> None:
        """Move the frontier over contiguous known offsets and release their waiters."""
        acked = self.acked
        frontier = self.frontier
        while frontier + 1 in acked:
            frontier += 1
            acked.discard(frontier)
        self.frontier = frontier
        if self.waiters:
            for offset in [o for o in self.waiters if o <= frontier]:
                waiter = self.waiters.pop(offset)
                if not waiter.done():
                    waiter.set_result(offset)

    def fence(self, error: Fenced, at: int) -> None:
        """A foreign ActiveWriter sits at ``at``: everything of ours after it is void."""
        self.fenced = error
        self.frontier = max(self.frontier, at - 1)
        self.advance()
        for offset, waiter in list(self.waiters.items()):
            if offset > at and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()
        self.waiters.clear()

    def lose(self, error: LogLost) -> None:
        """The log lost records: every pending and future append of this node fails."""
        if self.fenced is None or not isinstance(self.fenced, LogLost):
            logger.critical("%s", error, extra=fields())
            self.fenced = error
        fail(list(self.waiters.values()), self.fenced)
        self.waiters.clear()

    def check_end(self, partition: int, end: int, acknowledged: int) -> None:
        """Raise LogLost if the log ends at or below ``acknowledged``, an offset Kafka had
        acknowledged to this node before the end was asked for."""
        if end <= acknowledged:
            error = LogLost(
                f"the log of partition {partition} ends at offset {end}, but offset "
                f"{acknowledged} was acknowledged to node {self.node!r}: the log lost records "
                "(broker data lost, or the topic deleted and created again); stopping"
            )
            self.lose(error)
            raise error

    def delivered(self, partition: int, base: int, count: int) -> LogLost | None:
        """Record the acknowledged offsets ``base .. base+count-1`` of one batch; a batch
        at or below an earlier acknowledgement means the log lost records.

        aiokafka has one batch per partition in flight at a time, so a healthy log
        acknowledges this node's batches at rising offsets."""
        if base <= self.highest:
            self.lose(
                LogLost(
                    f"Kafka acknowledged a write to partition {partition} at offset {base}, "
                    f"at or below offset {self.highest} it had acknowledged to node "
                    f"{self.node!r} before: the log lost records (broker data lost, or the "
                    "topic deleted and created again); stopping"
                )
            )
            assert isinstance(self.fenced, LogLost)
            return self.fenced
        self.highest = base + count - 1
        return None

    def close(self) -> None:
        """Stop confirming: pending confirmations fail as transient."""
        if self.gap_reader is not None:
            self.gap_reader.cancel()
        fail(list(self.waiters.values()), TransientStorageError("repository closed"))
        self.waiters.clear()


class Confirmer:
    """Confirms this node's appends to ``topic`` partition by partition, reading gaps
    through ``lane``."""

    def __init__(
        self, topic: str, fences: list[PartitionFence], lane: Lane, read_timeout: float
    ) -> None:
        self._topic = topic
        self._fences = fences
        self._lane = lane
        self._read_timeout = read_timeout

    async def confirm(self, partition: int, offset: int) -> int:
        """Return ``offset`` once every offset from the claim up to it is judged harmless;
        raise Fenced (or LogLost) otherwise. Appends call it only when
        :meth:`PartitionFence.confirmed` said no: a gap must be read first."""
        fence = self._fences[partition]
        if fence.confirmed(offset):
            return offset
        if fence.fenced is not None:
            # Above the frontier of a fenced partition means above the foreign claim (the
            # frontier reaches just below it), or after a loss: void. No gap reader runs
            # on a fenced partition, so waiting would last until close.
            raise fence.fenced
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fence.waiters[offset] = waiter
        if fence.gap_reader is None or fence.gap_reader.done():
            fence.gap_reader = asyncio.create_task(self._read_gaps(partition, fence))
        return await waiter

    async def _read_gaps(self, partition: int, fence: PartitionFence) -> None:
        """Read the offsets below pending acks that this node did not write, and judge them."""
        # Our own acks for the gap may still be on their way: give them one loop turn.
        await asyncio.sleep(0)
        while fence.waiters and fence.fenced is None:
            try:
                await self.scan(partition, max(fence.waiters))
            except LogLost as error:
                fence.lose(error)
                return
            except (*BROKER_ERRORS, TransientStorageError) as exc:
                logger.warning(
                    "reading partition %d to confirm writes failed: %r",
                    partition,
                    exc,
                    extra=fields(partition=partition),
                )
                fail(list(fence.waiters.values()), TransientStorageError(f"confirming: {exc!r}"))
                fence.waiters.clear()
                return

    async def scan(self, partition: int, stop: int) -> None:
        """Judge every offset from the frontier up to ``stop``: a foreign ActiveWriter
        fences this node; anything else (own records, duplicates, zombies, records that
        are not kapbit records and so cannot be a claim) is harmless."""
        fence = self._fences[partition]
        start = fence.frontier + 1
        if start >= stop:
            return
        tp = TopicPartition(self._topic, partition)
        async for batch in fetch(self._lane, tp, start, stop, self._read_timeout):
            for message in batch:
                record = parse(partition, message)
                if record is not None and displaces(record, fence.node):
                    fence.fence(
                        fenced_by(partition, record.node, fence.node, record.offset),
                        record.offset,
                    )
                    return
        # Every offset below ``stop`` is judged, including any the fetch skipped (control
        # records): the frontier jumps, and what it passed over is not kept.
        fence.frontier = max(fence.frontier, stop - 1)
        fence.acked = {o for o in fence.acked if o > fence.frontier}
        fence.advance()

    def close(self) -> None:
        for fence in self._fences:
            fence.close()
