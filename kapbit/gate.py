"""The entry gate: closed while a circuit breaker is open, so new work fails fast (see
docs/ARCHITECTURE.md, "Failure handling")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from kapbit._log import fields

logger = logging.getLogger("kapbit.gate")


class EntryGate:
    """Open by default; closes when a breaker opens, reopens after a workflow completes.

    ``exec_workflow`` refuses new workflows while it is closed; the retry worker probes
    with already-failed workflows and reopens it by completing one. ``reason`` says why it
    is closed (empty while open); ``closures`` counts how often it closed; ``is_open``
    says whether it is open (read it, do not set it: :meth:`open` and :meth:`close` do).
    """

    def __init__(self) -> None:
        self.is_open = True
        self.reason = ""
        self.closures = 0
        self._opened = asyncio.Event()
        self._opened.set()

    def close(self, reason: str, *, extra: Mapping[str, object] | None = None) -> None:
        """Close the gate (idempotent); ``reason`` says which breaker opened.

        ``extra`` names the workflow that saw the breaker open, for the log record.
        """
        if self.is_open:
            self.closures += 1
            logger.warning("entry gate closed: %s", reason, extra={**fields(), **(extra or {})})
        self.is_open = False
        self.reason = reason
        self._opened.clear()

    def open(self, reason: str = "a workflow completed") -> None:
        """Open the gate (idempotent); ``reason`` is logged when it was closed."""
        if not self.is_open:
            logger.info("entry gate reopened: %s", reason, extra=fields())
        self.is_open = True
        self.reason = ""
        self._opened.set()

    async def wait_open(self) -> None:
        """Return once the gate is open."""
        await self._opened.wait()
