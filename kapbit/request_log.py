"""The request log: where calls for ids another instance owns travel (see
:mod:`kapbit.forwarding`). Its seam (:class:`RequestLog`), its records and the in-memory
implementation; the Kafka one is :class:`kapbit.repository.kafka.KafkaRequestLog`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import msgspec

REQUEST = "request"
ANSWER = "answer"
REQUEST_CLAIM = "request_claim"
#: Every kind a request log record may carry.
REQUEST_KINDS = frozenset({REQUEST, ANSWER, REQUEST_CLAIM})


class RequestRecord(msgspec.Struct, frozen=True):
    """One record of the request log: ``kind`` is one of :data:`REQUEST_KINDS`, ``key``
    the workflow id (the writer for a claim), ``node`` the writer."""

    partition: int
    offset: int
    kind: str
    key: str
    node: str
    value: bytes


# --- the request log ------------------------------------------------------------------------


class RequestLog(Protocol):
    """A partitioned log of requests and answers; appends are not fenced (the answer rule
    is applied by readers). Progress is a per-partition offset kept next to it."""

    @property
    def partitions(self) -> int:
        """The number of partitions (the workflow log's)."""
        ...

    async def start(self) -> None:
        """Connect and make sure the log exists (paired with :meth:`close`)."""
        ...

    async def close(self) -> None:
        """Close one start."""
        ...

    async def append(self, partition: int, kind: str, key: str, node: str, value: bytes) -> int:
        """Append one record and return its offset once it is durable."""
        ...

    def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[RequestRecord]]:
        """Yield records from ``start`` on, waiting for new ones; runs until cancelled."""
        ...

    async def end_offset(self, partition: int) -> int:
        """The offset the next record appended to ``partition`` will get."""
        ...

    async def save_progress(self, partition: int, offset: int) -> None:
        """Store where a session of ``partition`` resumes."""
        ...

    async def load_progress(self) -> dict[int, int]:
        """The stored progress by partition."""
        ...


class MemRequestLog:
    """A request log in memory, for tests and single-process use; shared by every instance
    and client given the same object."""

    def __init__(self, partitions: int = 1) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        self._logs: list[list[RequestRecord]] = [[] for _ in range(partitions)]
        self._progress: dict[int, int] = {}
        self._appended = asyncio.Condition()

    @property
    def partitions(self) -> int:
        return len(self._logs)

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release."""

    async def append(self, partition: int, kind: str, key: str, node: str, value: bytes) -> int:
        log = self._logs[partition]
        log.append(RequestRecord(partition, len(log), kind, key, node, value))
        async with self._appended:
            self._appended.notify_all()
        return len(log) - 1

    async def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[RequestRecord]]:
        log = self._logs[partition]
        position = max(start, 0)
        while True:
            if position < len(log):
                batch = log[position:]
                position += len(batch)
                yield batch
                continue
            async with self._appended:
                await self._appended.wait_for(functools.partial(_grown, log, position))

    async def end_offset(self, partition: int) -> int:
        return len(self._logs[partition])

    async def save_progress(self, partition: int, offset: int) -> None:
        self._progress[partition] = max(offset, self._progress.get(partition, 0))

    async def load_progress(self) -> dict[int, int]:
        return dict(self._progress)

    def records(self, partition: int) -> list[RequestRecord]:
        """Every record of ``partition`` (tests)."""
        return list(self._logs[partition])


def _grown(log: list[RequestRecord], length: int) -> bool:
    return len(log) > length
