"""The emitter: the one path by which every event reaches the log.

It retries transient storage errors forever (capped exponential backoff with jitter, via
tenacity), behind the storage circuit breaker (pybreaker). Giving up is never safe: if the
storage is down, a DeadLetter could not be written either. It stops only on
:class:`~kapbit.errors.Fenced`, a :class:`~kapbit.errors.RecordRejected`, or an
:class:`~kapbit.errors.EncodeError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pybreaker
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
)

from kapbit.codecs import Codec
from kapbit.errors import Fenced, RecordRejected, TransientStorageError
from kapbit.events import KIND_OF, Event
from kapbit.options import Backoff
from kapbit.repository import Repository

logger = logging.getLogger("kapbit.emitter")

_RETRYABLE = (TransientStorageError, pybreaker.CircuitBreakerError)


def _retry_log_level(attempt: int) -> int:
    if attempt < 3:
        return logging.INFO
    if attempt < 10:
        return logging.WARNING
    return logging.ERROR


class Emitter:
    """Encodes events and appends them through the breaker, retrying until they land.

    ``acked[p]`` is the highest offset this emitter has had acknowledged in partition
    ``p`` (the checkpointer never moves past it). ``on_fenced`` is called once, on the
    first :class:`~kapbit.errors.Fenced`.
    """

    def __init__(
        self,
        repository: Repository,
        codec: Codec,
        node: str,
        breaker: pybreaker.CircuitBreaker,
        backoff: Backoff,
        on_fenced: Callable[[Fenced], None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._repository = repository
        self._codec = codec
        self._node = node
        self._breaker = breaker
        self._backoff = backoff
        self._on_fenced = on_fenced
        self._sleep = sleep
        self.fenced: Fenced | None = None
        self.acked: list[int] = [-1] * repository.partitions

    async def emit(self, partition: int, key: str, event: Event) -> int:
        """Encode and append ``event``; return its offset once it is durable and fenced."""
        value = self._codec.encode(event)
        return await self.append(partition, KIND_OF[type(event)].value, key, value)

    async def append(self, partition: int, kind: str, key: str, value: bytes) -> int:
        """Append an encoded event, retrying transient failures forever."""
        if self.fenced is not None:
            raise self.fenced
        try:
            offset = await self._append_once(partition, kind, key, value)
        except _RETRYABLE as error:
            offset = await self._append_retrying(partition, kind, key, value, error)
        except Fenced as error:
            self._fence(error)
            raise
        if offset > self.acked[partition]:
            self.acked[partition] = offset
        return offset

    async def _append_once(self, partition: int, kind: str, key: str, value: bytes) -> int:
        breaker = self._breaker
        if breaker.current_state == pybreaker.STATE_CLOSED and breaker.fail_counter == 0:
            # The common case skips the breaker's bookkeeping: a success while closed with
            # no failures counted changes nothing. A failure is handed to the breaker.
            try:
                return await self._repository.append(partition, kind, key, self._node, value)
            except TransientStorageError as error:
                _record_failure(breaker, error)
                raise
        with breaker.calling():
            return await self._repository.append(partition, kind, key, self._node, value)

    async def _append_retrying(
        self, partition: int, kind: str, key: str, value: bytes, first: BaseException
    ) -> int:
        def log_failure(attempt: int, error: BaseException | None) -> None:
            logger.log(
                _retry_log_level(attempt),
                "append of %s for %r to partition %d failed (attempt %d), retrying: %s",
                kind,
                key,
                partition,
                attempt,
                error,
                extra={"workflow_id": key, "partition": partition},
            )

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log_failure(state.attempt_number + 1, error)

        log_failure(1, first)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_RETRYABLE),
            wait=self._backoff.wait(),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            # The first try already failed: wait before the first retry.
            await self._sleep(self._backoff.initial)
            async for attempt in retrying:
                with attempt:
                    offset = await self._append_once(partition, kind, key, value)
        except Fenced as error:
            self._fence(error)
            raise
        logger.info("append of %s for %r to partition %d succeeded again", kind, key, partition)
        return offset

    def _fence(self, error: Fenced) -> None:
        if self.fenced is None:
            self.fenced = error
            self._on_fenced(error)


def _record_failure(breaker: pybreaker.CircuitBreaker, error: BaseException) -> None:
    """Count ``error`` against ``breaker`` the way a guarded call would have."""

    def _fail() -> Any:
        raise error

    # The breaker re-raises (or raises CircuitBreakerError on tripping); the caller
    # re-raises the original error itself.
    with contextlib.suppress(BaseException):
        breaker.call(_fail)


def new_storage_breaker(
    fail_max: int, reset_timeout: float, listener: pybreaker.CircuitBreakerListener
) -> pybreaker.CircuitBreaker:
    """The storage breaker: fencing, rejections and cancellation are not storage faults."""
    return pybreaker.CircuitBreaker(
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        exclude=[Fenced, RecordRejected, asyncio.CancelledError],
        listeners=[listener],
        name="kapbit-storage",
    )
