"""Partition ownership: claiming every partition of the log, and settling a start race.

A start claims each partition by appending its ``ActiveWriter``; the log then refuses
(fences) every older writer. Two starts racing each other both claim; the one whose
writer id is greater keeps the whole log and the other gives up before it accepts any
work. What a fenced instance does is the front's; the rule that it writes nothing more
lives in :class:`kapbit.fencing.Fence`. See docs/ARCHITECTURE.md, "Fencing".
"""

from __future__ import annotations

import asyncio
import functools
import logging

from kapbit._log import fields
from kapbit._start_retries import StartRetries
from kapbit.clock import SYSTEM_CLOCK, Clock
from kapbit.emitter import Emitter
from kapbit.errors import Fenced, StartupError
from kapbit.events import ActiveWriter
from kapbit.repository import Repository

logger = logging.getLogger("kapbit")

_MAX_CLAIM_ROUNDS = 10


class Ownership:
    """Claims the log's partitions for ``writer_id``, writing through ``emitter``.

    The claim names the codec and idempotency window this writer uses, so the next
    start can check both.
    """

    def __init__(
        self,
        repository: Repository,
        emitter: Emitter,
        writer_id: str,
        codec_name: str,
        window: int,
        retries: StartRetries,
        endpoint: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock
        self._repository = repository
        self._emitter = emitter
        self.writer_id = writer_id
        self._codec_name = codec_name
        self._window = window
        self._retries = retries
        self._endpoint = endpoint

    async def claim_all(self, partitions: int) -> list[int]:
        """Claim every partition; return each claim's offset once no rival holds one.

        Raises :class:`~kapbit.errors.Fenced` when a rival that started at the same time
        keeps the log, :class:`~kapbit.errors.StartupError` when the race does not settle.
        """
        claims = list(await asyncio.gather(*(self._claim(p) for p in range(partitions))))
        await self._settle(claims)
        return claims

    async def claim(self, partition: int) -> int:
        """Group mode: claim one partition the group assigned to this instance. No race
        to settle: the group's assignment decides, and a later foreign claim fences only
        that partition."""
        return await self._claim(partition)

    async def _claim(self, partition: int) -> int:
        """Append this writer's ActiveWriter to ``partition``; return its offset."""
        claim = ActiveWriter(
            self.writer_id,
            self._clock.now(),
            codec=self._codec_name,
            window=self._window,
            endpoint=self._endpoint,
        )
        return await self._emitter.claim(partition, claim)

    async def _settle(self, claims: list[int]) -> None:
        """Resolve a start racing another one: if another node claimed a partition after
        this node did, the greater writer id keeps the whole log, re-claiming what it lost,
        and the other gives up with Fenced before it accepts any work."""
        writer_id = self.writer_id
        for _ in range(_MAX_CLAIM_ROUNDS):
            owners = await asyncio.gather(
                *(
                    self._retries.run(
                        f"reading the owner of partition {p}",
                        functools.partial(self._repository.current_owner, p),
                    )
                    for p in range(len(claims))
                )
            )
            lost = [p for p, owner in enumerate(owners) if owner != writer_id]
            if not lost:
                return
            rival = max(owners[p] for p in lost)
            if rival > writer_id:
                raise Fenced(
                    f"node {rival!r} started at the same time as {writer_id!r} and "
                    f"keeps the log (partitions {lost} were claimed by it after this node)"
                )
            logger.warning(
                "partitions %s were claimed by %r during start; claiming them again",
                lost,
                rival,
                extra=fields(),
            )
            for partition in lost:
                claims[partition] = await self._claim(partition)
        raise StartupError(f"node {writer_id!r} could not settle its claims")
