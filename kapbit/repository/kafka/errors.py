"""Error mapping: every error leaving the Kafka repository is a :mod:`kapbit.errors` type."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from kapbit._log import fields
from kapbit.errors import RecordRejected, TransientStorageError

logger = logging.getLogger("kapbit.kafka")

_REJECTIONS = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
#: What a failing call to the broker raises: aiokafka's errors, timeouts, socket errors.
BROKER_ERRORS = (KafkaError, OSError, TimeoutError)


@contextlib.contextmanager
def transient(what: str) -> Iterator[None]:
    """Map aiokafka's errors and timeouts (and socket errors) to TransientStorageError."""
    try:
        yield
    except BROKER_ERRORS as exc:
        raise TransientStorageError(f"{what}: {exc!r}") from exc


def append_error(exc: BaseException) -> Exception:
    """Map the error of a failed produce to the engine's kinds: rejection or transient."""
    if isinstance(exc, _REJECTIONS):
        return RecordRejected(f"Kafka refused the record: {exc}")
    if isinstance(exc, KafkaError) and not getattr(exc, "retriable", False):
        logger.error("Kafka error on append: %r", exc, extra=fields())
    return TransientStorageError(f"Kafka append failed: {exc!r}")


def fail(waiters: list[asyncio.Future[int]], error: Exception) -> None:
    """Fail every waiter not yet resolved with ``error``."""
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)
            waiter.exception()  # whoever awaited it has it; nobody else must warn
