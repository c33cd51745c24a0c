"""Retries of what a start reads and writes: transient storage errors are retried until the
start's own deadline (``Options.start_timeout``), and the last one is kept for its error."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from kapbit._log import fields
from kapbit.errors import TransientStorageError
from kapbit.options import Backoff

logger = logging.getLogger("kapbit")

_T = TypeVar("_T")


class StartRetries:
    """Runs the calls of one start, retrying transient storage errors with ``backoff``.

    ``last_error`` describes the latest failure (empty before any), for the error a start
    that runs out of time raises.
    """

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff
        self.last_error = ""

    async def run(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, retried on transient storage errors (bounded by the caller)."""

        def note(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self.last_error = f"{what}: {error}"
            logger.warning(
                "%s failed (attempt %d), retrying: %s",
                what,
                state.attempt_number,
                error,
                extra=fields(),
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientStorageError),
            wait=self._backoff.wait(),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                result = await call()
        return result
