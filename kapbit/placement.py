"""Group mode's seam: who *should* own which partition of the log (placement).

A :class:`Placement` yields one :class:`PlacementChange` per rebalance: the partitions to
give up (``revoked``), to claim and recover (``assigned``) and to keep untouched
(``retained``). The instance applies them in order (see :mod:`kapbit.group`); the log's
``ActiveWriter`` records stay the authority on who *may* write. In production the placement
is Kafka's consumer group (:class:`kapbit.repository.kafka.GroupMembership`, built by the
repository from :class:`GroupOptions`); unit tests and the model checker drive
:class:`kapbit.testing.ManualPlacement`. See docs/ARCHITECTURE.md, "Group mode".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class GroupOptions:
    """Share the log's partitions with every instance configured with the same ``name``.

    ``endpoint`` (e.g. ``"10.0.0.7:8080"``) is what this instance advertises to the others
    and writes into its claims, so a caller can route a workflow id to its owner
    (:meth:`kapbit.Kapbit.owner_of`). A member the coordinator hears nothing from for
    ``session_timeout`` seconds is dropped and its partitions go to the others (on Kafka:
    between the broker's ``group.min.session.timeout.ms``, 6 s by default, and
    ``group.max.session.timeout.ms``); ``heartbeat_interval`` (default a fifth of the
    session timeout) bounds how soon the others notice a rebalance. A graceful close hands
    partitions over at once, without waiting for the session timeout.
    """

    name: str
    endpoint: str | None = None
    session_timeout: float = 10.0
    heartbeat_interval: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"group name must be a non-empty string, got {self.name!r}")
        if not self.session_timeout > 0:
            raise ValueError(f"session_timeout must be positive, got {self.session_timeout!r}")
        heartbeat = self.heartbeat_interval
        if heartbeat is not None and not 0 < heartbeat < self.session_timeout:
            raise ValueError(
                f"heartbeat_interval must be positive and below session_timeout "
                f"({self.session_timeout}), got {heartbeat!r}"
            )


class PlacementChange(Protocol):
    """One rebalance's outcome for this instance (``revoked`` is handled first)."""

    @property
    def assigned(self) -> frozenset[int]: ...

    @property
    def revoked(self) -> frozenset[int]: ...

    @property
    def retained(self) -> frozenset[int]: ...

    @property
    def owners(self) -> Mapping[int, str | None]: ...


@runtime_checkable
class Placement(Protocol):
    """Tells an instance which partitions it should own, one change at a time.

    ``endpoint`` is what this instance advertises to the others (written in its claims)."""

    endpoint: str | None

    async def start(self) -> None:
        """Join (changes follow through :meth:`next_change`)."""
        ...

    async def close(self) -> None:
        """Leave: the others take this instance's partitions over at once."""
        ...

    async def next_change(self) -> PlacementChange:
        """The next change, in order. Raises :class:`~kapbit.errors.InstanceClosed` once
        closed, :class:`~kapbit.errors.StartupError` when the placement cannot go on."""
        ...

    def owner_endpoint(self, partition: int) -> str | None:
        """The endpoint the owner of ``partition`` advertised, as last known (may be stale
        during a rebalance; the owner refuses what it does not own)."""
        ...


@runtime_checkable
class SupportsGroups(Protocol):
    """A repository whose instances can share its log through a group."""

    def group_placement(self, options: GroupOptions) -> Placement:
        """The placement of one instance in the group ``options`` names."""
        ...


@dataclass(frozen=True, slots=True)
class Owner:
    """Who owns a workflow id: its ``partition``, whether this instance owns it
    (``local``) and the owner's advertised ``endpoint`` (``None`` if unknown or none)."""

    partition: int
    local: bool
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A :class:`PlacementChange` as a plain value (what :class:`ManualPlacement` yields)."""

    assigned: frozenset[int] = frozenset()
    revoked: frozenset[int] = frozenset()
    retained: frozenset[int] = frozenset()
    owners: Mapping[int, str | None] = field(default_factory=dict)
