"""A placement driven by hand, for unit tests of group mode on :class:`MemRepository`.

``Kapbit(definitions, repository, group=placement)`` with a :class:`ManualPlacement`
runs the instance in group mode without a broker: the test says which partitions the
instance gains and loses (:meth:`ManualPlacement.change`), in order, and waits until the
instance has applied them (:meth:`ManualPlacement.applied`). Deterministic, so the
engine's dynamic-partition logic is tested fast, and the model checker can drive it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable, Mapping

from kapbit.errors import InstanceClosed
from kapbit.placement import Change, PlacementChange


class ManualPlacement:
    """Yields the changes given to :meth:`change`, in order.

    ``endpoint`` is this instance's advertised endpoint; ``owners`` passed with a change
    say who owns the other partitions (by endpoint), as a group's assignment would.
    """

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint
        self._pending: collections.deque[Change] = collections.deque()
        self._arrived = asyncio.Event()
        self._owners: dict[int, str | None] = {}
        self._owned: frozenset[int] = frozenset()
        self._idle = asyncio.Event()  # the instance waits for a change: all applied
        self.started = False
        self.closed = False

    @property
    def owned(self) -> frozenset[int]:
        """The partitions this placement has given the instance, as of the last change."""
        return self._owned

    def change(
        self,
        assign: Iterable[int] = (),
        revoke: Iterable[int] = (),
        owners: Mapping[int, str | None] | None = None,
    ) -> Change:
        """Queue one rebalance: ``revoke`` is taken away, ``assign`` given; what the
        instance owned before and keeps is retained (not re-read, not re-claimed)."""
        revoked = frozenset(revoke)
        assigned = frozenset(assign)
        unknown = revoked - self._owned
        if unknown:
            raise ValueError(f"cannot revoke partitions {sorted(unknown)}: not owned")
        retained = self._owned - revoked
        assigned -= retained
        self._owned = retained | assigned
        self._owners.update(owners or {})
        for partition in self._owned:
            self._owners[partition] = self.endpoint
        change = Change(assigned, revoked, retained, dict(self._owners))
        self._pending.append(change)
        self._idle.clear()
        self._arrived.set()
        return change

    async def applied(self, timeout: float = 5.0) -> None:
        """Wait until the instance has taken every queued change and asked for the next
        (so the last one is applied)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True
        self._arrived.set()
        self._idle.set()

    async def next_change(self) -> PlacementChange:
        while not self._pending:
            if self.closed:
                raise InstanceClosed("the manual placement is closed")
            self._idle.set()  # asking for the next change: every earlier one is applied
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.popleft()

    def owner_endpoint(self, partition: int) -> str | None:
        return self._owners.get(partition)
