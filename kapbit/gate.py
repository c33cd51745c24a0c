"""The entry gate: closed while a circuit breaker is open, so new work fails fast."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger("kapbit.gate")


class EntryGate:
    """Open by default; closes when a breaker opens, reopens after a workflow completes.

    ``exec_workflow`` refuses new workflows while it is closed; the retry worker probes
    with already-failed workflows and reopens it by completing one.
    """

    def __init__(self) -> None:
        self._open = True
        self.reason = ""
        self._opened = asyncio.Event()
        self._opened.set()

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self, reason: str) -> None:
        """Close the gate (idempotent); ``reason`` says which breaker opened."""
        if self._open:
            logger.warning("entry gate closed: %s", reason)
        self._open = False
        self.reason = reason
        self._opened.clear()

    def open(self) -> None:
        """Open the gate (idempotent)."""
        if not self._open:
            logger.info("entry gate reopened")
        self._open = True
        self.reason = ""
        self._opened.set()

    async def wait_open(self) -> None:
        """Return once the gate is open."""
        await self._opened.wait()
