"""The emitter: the one path by which every event reaches the log.

It retries transient storage errors forever (capped exponential backoff with jitter, via
tenacity), behind the storage circuit breaker (pybreaker). Giving up is never safe: if the
storage is down, a DeadLetter could not be written either. It stops only on
:class:`~kapbit.errors.Fenced`, a :class:`~kapbit.errors.RecordRejected`, or an
:class:`~kapbit.errors.EncodeError`. A refusal after a failed try is checked against the
log first: if that try landed (its acknowledgement was lost), the append succeeded.

The breaker follows pybreaker's state machine: closed, it opens after ``fail_max``
consecutive failures; open, every append fails fast with ``CircuitBreakerError`` (retried
after backoff, the storage is not touched) until ``reset_timeout`` has passed; then one
append goes through as the probe (half-open): success closes the breaker, failure opens it
again. pybreaker itself lets every caller through while half-open; the emitter admits one
probe at a time, the others fail fast until the probe has settled. See docs/ARCHITECTURE.md,
"Second copies" and "Failure handling".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pybreaker
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from kapbit._log import fields
from kapbit.codecs import Codec
from kapbit.errors import Fenced, RecordRejected, TransientStorageError
from kapbit.events import KIND_OF, ActiveWriter, Event, EventKind
from kapbit.fencing import Fence
from kapbit.options import Backoff
from kapbit.repository import Repository

logger = logging.getLogger("kapbit.emitter")

_RETRYABLE = (TransientStorageError, pybreaker.CircuitBreakerError)
_CLAIM = EventKind.ACTIVE_WRITER

#: Attempts up to this one are all logged; after it only every power of two, so a long
#: outage does not flood the log (one line per in-flight workflow per backoff period).
_LOG_EVERY_UNTIL = 10


def _retry_log_level(attempt: int) -> int:
    """The level a failed attempt is logged at: it rises as the attempts grow."""
    if attempt < 3:
        return logging.INFO
    if attempt < _LOG_EVERY_UNTIL:
        return logging.WARNING
    return logging.ERROR


def _worth_logging(attempt: int) -> bool:
    return attempt <= _LOG_EVERY_UNTIL or attempt & (attempt - 1) == 0


class Emitter:
    """Encodes events and appends them through the breaker, retrying until they land.

    :meth:`acked` is the highest offset this emitter has had acknowledged in a partition
    (the checkpointer never moves past it). ``fence`` says whether writing may go on; a
    :class:`~kapbit.errors.Fenced` answer is recorded in it and raised. ``sleep`` waits
    between retries (tests inject their own).
    """

    def __init__(
        self,
        repository: Repository,
        codec: Codec,
        node: str,
        breaker: pybreaker.CircuitBreaker,
        backoff: Backoff,
        fence: Fence,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._repository = repository
        self._codec = codec
        self._node = node
        self._breaker = breaker
        self._backoff = backoff
        self._fence = fence
        self._sleep = sleep
        self._probing = False
        # The breaker is closed with no failure counted: the emitter is the breaker's only
        # user, so this stays true until one of its own calls fails.
        self._healthy = _untouched(breaker)
        self._acked: list[int] = []  # grows with the partitions written to

    def acked(self, partition: int) -> int:
        """The highest offset acknowledged to this emitter in ``partition``, -1 before the
        first."""
        acked = self._acked
        return acked[partition] if partition < len(acked) else -1

    def emit(
        self, partition: int, key: str, event: Event, *, workflow_type: str | None = None
    ) -> Coroutine[Any, Any, int]:
        """Encode and append ``event``; the awaitable returns its offset once it is durable
        and fenced. An event that does not encode raises here, before anything is written.

        ``workflow_type`` goes into log records about the append (with ``key``). (A plain
        function returning the append: no frame of its own per event.)"""
        value = self._codec.encode(event)
        return self._write(partition, KIND_OF[type(event)], key, value, workflow_type)

    async def claim(self, partition: int, claim: ActiveWriter) -> int:
        """Append this node's claim of ``partition`` (``Repository.claim``, never fenced),
        retrying as :meth:`append` does; return its offset."""
        return await self._write(partition, _CLAIM, self._node, self._codec.encode(claim), None)

    def append(
        self,
        partition: int,
        kind: EventKind,
        key: str,
        value: bytes,
        *,
        workflow_type: str | None = None,
    ) -> Coroutine[Any, Any, int]:
        """Append an encoded event (any kind but a claim), retrying transient failures
        forever; the awaitable returns its offset."""
        return self._write(partition, kind, key, value, workflow_type)

    async def _write(
        self,
        partition: int,
        kind: EventKind,
        key: str,
        value: bytes,
        workflow_type: str | None,
    ) -> int:
        fence = self._fence
        refusal = fence.refusal
        if refusal is not None:
            raise refusal
        if fence.lost:
            fence.check_partition(partition)
        acked = self._acked
        # Every try of this append lands above what was acknowledged before it began.
        floor = acked[partition] + 1 if partition < len(acked) else 0
        try:
            if self._healthy and kind is not _CLAIM:
                # The common case: the breaker is closed with no failure counted, and a
                # success changes nothing in it, so the storage is called directly.
                try:
                    offset = await self._repository.append(partition, kind, key, self._node, value)
                except Exception as error:
                    self._healthy = False
                    if self._breaker.is_system_error(error):
                        _record_failure(self._breaker, error)
                    raise
            else:
                offset = await self._append_once(partition, kind, key, value)
        except _RETRYABLE as error:
            offset = await self._append_retrying(
                partition, kind, key, value, error, floor, workflow_type
            )
        except Fenced as error:
            fence.fenced(error, partition)
            raise
        if partition >= len(acked):
            acked.extend([-1] * (partition + 1 - len(acked)))
        if offset > acked[partition]:
            acked[partition] = offset
        return offset

    def _store(self, partition: int, kind: EventKind, key: str, value: bytes) -> Awaitable[int]:
        """The repository call writing this record: a claim, or an ordinary append."""
        if kind is _CLAIM:
            return self._repository.claim(partition, self._node, value)
        return self._repository.append(partition, kind, key, self._node, value)

    async def _append_once(self, partition: int, kind: EventKind, key: str, value: bytes) -> int:
        """One try through the breaker (the careful path, taken after any failure until the
        breaker is closed again with no failure counted)."""
        breaker = self._breaker
        if breaker.current_state == pybreaker.STATE_CLOSED:
            try:
                with breaker.calling():
                    return await self._store(partition, kind, key, value)
            finally:
                self._healthy = _untouched(breaker)
        # Open or half-open: the storage is suspect. Open and before reset_timeout, the
        # breaker refuses without calling the storage; otherwise this call is the probe,
        # and only one probe may be in flight.
        if self._probing:
            raise pybreaker.CircuitBreakerError("storage probe in flight, circuit breaker open")
        self._probing = True
        try:
            with breaker.calling():
                return await self._store(partition, kind, key, value)
        finally:
            self._probing = False
            self._healthy = _untouched(breaker)

    async def _append_retrying(
        self,
        partition: int,
        kind: EventKind,
        key: str,
        value: bytes,
        first: BaseException,
        floor: int,
        workflow_type: str | None,
    ) -> int:
        extra = (
            fields(partition=partition)  # a claim is keyed by writer id: no workflow
            if kind is _CLAIM
            else fields(key, workflow_type, partition)
        )

        def before_sleep(state: RetryCallState) -> None:
            attempt = state.attempt_number
            if not _worth_logging(attempt):
                return
            error = state.outcome.exception() if state.outcome else None
            logger.log(
                _retry_log_level(attempt),
                "append of %s for %r to partition %d failed (attempt %d), retrying in %.3f s: %s",
                kind,
                key,
                partition,
                attempt,
                state.upcoming_sleep,
                error,
                extra=extra,
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_RETRYABLE),
            wait=self._backoff.wait(),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        # The first try (outside tenacity, to keep the common path cheap) counts as
        # tenacity's attempt 1: its failure is replayed so the backoff starts at `initial`.
        pending: BaseException | None = first
        try:
            async for attempt in retrying:
                with attempt:
                    if pending is not None:
                        error, pending = pending, None
                        raise error
                    self._fence.check_partition(partition)  # fenced or stopped meanwhile
                    offset = await self._append_once(partition, kind, key, value)
        except Fenced as error:
            self._fence.fenced(error, partition)
            raise
        except RecordRejected:
            # A failed try may have landed with its acknowledgement lost: then the append
            # did happen, and the refusal of a later try must not be taken for the truth.
            landed = await self._landed_copy(partition, kind, key, value, floor)
            if landed is None:
                raise
            logger.warning(
                "append of %s for %r to partition %d was refused on a retry, but an "
                "earlier try had landed at offset %d: taken as written",
                kind,
                key,
                partition,
                landed,
                extra=extra,
            )
            return landed
        logger.info(
            "append of %s for %r to partition %d succeeded after %d attempts",
            kind,
            key,
            partition,
            retrying.statistics.get("attempt_number", 0),
            extra=extra,
        )
        return offset

    async def _landed_copy(
        self, partition: int, kind: EventKind, key: str, value: bytes, floor: int
    ) -> int | None:
        """The offset of the last copy of this exact record this node wrote at or above
        ``floor``, or ``None``. Transient read errors are retried like appends."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientStorageError),
            wait=self._backoff.wait(),
            sleep=self._sleep,
            reraise=True,
        )
        repository = self._repository
        async for attempt in retrying:
            with attempt:
                landed: int | None = None
                end = await repository.end_offset(partition)
                async for batch in repository.read(partition, floor, end):
                    for record in batch:
                        if (
                            record.key == key
                            and record.kind == kind
                            and record.node == self._node
                            and record.value == value
                        ):
                            landed = record.offset
        return landed


def _untouched(breaker: pybreaker.CircuitBreaker) -> bool:
    """Whether ``breaker`` is closed with no failure counted: a success changes nothing in
    it, so an append may skip its bookkeeping."""
    return breaker.current_state == pybreaker.STATE_CLOSED and breaker.fail_counter == 0


def _record_failure(breaker: pybreaker.CircuitBreaker, error: BaseException) -> None:
    """Count ``error`` against ``breaker`` the way a guarded call would have."""

    def _fail() -> Any:
        raise error

    # The breaker re-raises (or raises CircuitBreakerError on tripping); the caller
    # re-raises the original error itself.
    with contextlib.suppress(BaseException):
        breaker.call(_fail)


def new_storage_breaker(
    fail_max: int,
    reset_timeout: float,
    listener: pybreaker.CircuitBreakerListener,
    *,
    state_storage: pybreaker.CircuitBreakerStorage | None = None,
) -> pybreaker.CircuitBreaker:
    """The storage breaker: fencing, rejections and cancellation are not storage faults.

    (A rejection or a fencing error is an answer from a working storage; pybreaker counts
    an excluded error as a success.) ``state_storage`` lets tests hold the breaker's clock.
    """
    return pybreaker.CircuitBreaker(
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        exclude=[Fenced, RecordRejected, asyncio.CancelledError],
        listeners=[listener],
        state_storage=state_storage,
        name="kapbit-storage",
    )
