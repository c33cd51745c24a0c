"""Membership in a Kafka consumer group: which partitions of the log this instance owns.

Several instances configured with the same group share the log topic's partitions through
Kafka's group coordinator (aiokafka's consumer group protocol). :class:`GroupMembership`
only says who owns what; claiming a partition (``ActiveWriter``) and recovering it is the
engine's job, and the log's fencing stays the authority on who may write.

Why a custom assignor (:class:`StickyAssignor`): aiokafka rebalances eagerly (every member
is told that all its partitions are revoked, then gets its new set), its assignors move
partitions needlessly (round robin) or keep their state on the class (its sticky one, so
two members in one process would share it), and none carries an endpoint. Ours runs in the
group leader on what each member advertises in its join (its endpoint, the partitions it
owns and the assignment epoch it owns them in) and sends every member its partitions, the
new epoch, its member id and the endpoint of every partition's owner.

Each completed rebalance becomes one :class:`OwnershipChange`. A partition is reported
revoked only when it moved to another member, and retained when it stays: the revoke
aiokafka announces at the start of a rebalance is held until the new assignment is known.
A member that missed a generation (its member id changed, or the epoch jumped) cannot know
who owned its partitions meanwhile, so it reports everything revoked and assigned afresh.

The group consumer subscribes to the log topic itself (no coordination topic to create and
keep at the same partition count; a partition added to the log rebalances the group), keeps
every assigned partition paused and one ``getmany`` pending so that aiokafka never leaves
the group for being idle (``max_poll_interval_ms``), and commits no offsets. See
docs/ARCHITECTURE.md, "Group mode".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import ConsumerStoppedError, KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

from kapbit._lifecycle import CANCEL_GRACE, AsyncResource, TaskHost
from kapbit.errors import InstanceClosed, StartupError
from kapbit.repository.kafka.clients import with_defaults
from kapbit.repository.kafka.errors import BROKER_ERRORS

logger = logging.getLogger("kapbit.kafka.group")

__all__ = [
    "ASSIGNOR_NAME",
    "GroupMembership",
    "MemberClaim",
    "OwnershipChange",
    "StickyAssignor",
    "ownership_change",
    "plan_assignment",
]

#: The assignment protocol's name: every member of a kapbit group must speak it (a member
#: offering only other protocols is refused by the broker: InconsistentGroupProtocol).
ASSIGNOR_NAME = "kapbit-sticky"
_ASSIGNOR_VERSION = 1
#: Longest advertised endpoint, in characters: it travels in every join and assignment.
MAX_ENDPOINT = 1024
#: aiokafka applies one request timeout to every request, and the broker holds a JoinGroup
#: up to the rebalance timeout: the group consumer's requests may take this much longer.
_JOIN_MARGIN_MS = 5_000
#: How long ``close()`` tries its own LeaveGroup (best effort: the session expires anyway).
_LEAVE_TIMEOUT = 5.0
#: The options of ``client_options`` a bare aiokafka client takes (for the LeaveGroup).
_CLIENT_OPTIONS = frozenset(
    inspect.signature(AIOKafkaClient.__init__).parameters.keys() - {"self", "loop"}
)
#: Consumer options the membership sets itself; ``client_options`` may not set them.
_RESERVED_OPTIONS = frozenset(
    {
        "group_id",
        "group_instance_id",
        "enable_auto_commit",
        "partition_assignment_strategy",
        "session_timeout_ms",
        "heartbeat_interval_ms",
        "rebalance_timeout_ms",
        "auto_offset_reset",
    }
)


# --- the wire format in the group protocol's user data ----------------------------------------


class _Join(msgspec.Struct, frozen=True):
    """What a member advertises in its JoinGroup: its endpoint and what it owns."""

    endpoint: str | None
    epoch: int  # the epoch of the assignment ``owned`` came from; 0 if none yet
    owned: list[int]


class _Assignment(msgspec.Struct, frozen=True):
    """What the leader sends each member besides its partitions."""

    epoch: int
    member_id: str
    owners: dict[int, str | None]  # every partition of the topic -> its owner's endpoint


_JOIN_DECODER = msgspec.msgpack.Decoder(_Join)
_ASSIGNMENT_DECODER = msgspec.msgpack.Decoder(_Assignment)
_ENCODER = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class MemberClaim:
    """One member as the assignor sees it: the partitions it owns at ``epoch``."""

    endpoint: str | None = None
    epoch: int = 0
    owned: frozenset[int] = frozenset()


def plan_assignment(
    partitions: Iterable[int], members: Mapping[str, MemberClaim]
) -> dict[str, list[int]]:
    """Share ``partitions`` among ``members``: balanced (counts differ by at most one),
    disjoint, covering every partition, and sticky.

    Only claims made at the newest epoch among the members count: a member that missed a
    rebalance claims partitions another member has owned since. Members holding more keep
    the larger shares; each keeps as many of its partitions as its share allows, and the
    rest go to the members below their share, in member id order.
    """
    ordered = sorted(set(partitions))
    if not members:
        return {}
    newest = max(claim.epoch for claim in members.values())
    existing = set(ordered)
    claims = {
        member: sorted(claim.owned & existing) if claim.epoch == newest and newest > 0 else []
        for member, claim in members.items()
    }
    by_holding = sorted(members, key=lambda member: (-len(claims[member]), member))
    base, extra = divmod(len(ordered), len(members))
    share = {member: base + (1 if rank < extra else 0) for rank, member in enumerate(by_holding)}
    plan: dict[str, list[int]] = {member: [] for member in sorted(members)}
    taken: set[int] = set()
    for member in by_holding:
        for partition in claims[member]:
            if len(plan[member]) < share[member] and partition not in taken:
                plan[member].append(partition)
                taken.add(partition)
    free = iter(partition for partition in ordered if partition not in taken)
    for member in sorted(members):
        while len(plan[member]) < share[member]:
            plan[member].append(next(free))
    return {member: sorted(owned) for member, owned in plan.items()}


class StickyAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """aiokafka assignor of one member: advertises the member's endpoint and its last
    assignment, assigns with :func:`plan_assignment` when the member leads the group, and
    keeps what the leader sent it (:attr:`received`).

    An instance, not the class, holds the state, so members in one process stay apart.
    """

    name = ASSIGNOR_NAME
    version = _ASSIGNOR_VERSION

    def __init__(self, endpoint: str | None) -> None:
        self.endpoint = endpoint
        self.received: tuple[_Assignment, frozenset[int]] | None = None

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        epoch, owned = 0, frozenset[int]()
        if self.received is not None:
            epoch, owned = self.received[0].epoch, self.received[1]
        data = _Join(self.endpoint, epoch, sorted(owned))
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), _ENCODER.encode(data))

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        claims = {member: _claim(member, meta.user_data) for member, meta in members.items()}
        epoch = max((claim.epoch for claim in claims.values()), default=0) + 1
        topics = sorted({topic for meta in members.values() for topic in meta.subscription})
        per_member: dict[str, list[tuple[str, list[int]]]] = {member: [] for member in members}
        owners: dict[int, str | None] = {}
        for topic in topics:
            partitions = cluster.partitions_for_topic(topic)
            if not partitions:
                logger.warning("no partition metadata for topic %r: nothing to assign", topic)
                continue
            subscribers = {
                member: claims[member]
                for member, meta in members.items()
                if topic in meta.subscription
            }
            for member, owned in plan_assignment(partitions, subscribers).items():
                per_member[member].append((topic, owned))
                owners.update((partition, claims[member].endpoint) for partition in owned)
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version,
                assignment,
                _ENCODER.encode(_Assignment(epoch, member, owners)),
            )
            for member, assignment in per_member.items()
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        partitions = frozenset(tp.partition for tp in assignment.partitions())
        try:
            data = _ASSIGNMENT_DECODER.decode(assignment.user_data)
        except (msgspec.DecodeError, TypeError) as exc:
            logger.error("an assignment without kapbit's data (%s): treated as new", exc)
            previous = self.received[0].epoch if self.received is not None else 0
            data = _Assignment(previous + 1, "", {})
        self.received = (data, partitions)


def _claim(member: str, user_data: bytes) -> MemberClaim:
    try:
        data = _JOIN_DECODER.decode(user_data)
    except (msgspec.DecodeError, TypeError) as exc:
        logger.warning("member %s advertised no kapbit data (%s): it owns nothing", member, exc)
        return MemberClaim()
    return MemberClaim(data.endpoint, data.epoch, frozenset(data.owned))


# --- what the engine sees ----------------------------------------------------------------------


@dataclass(frozen=True)
class OwnershipChange:
    """The outcome of one rebalance for this member.

    ``assigned``: partitions to claim and recover. ``revoked``: partitions to stop writing
    to. ``retained``: owned before and after, without anybody else in between: nothing to
    do. When ``continuous`` is False (the first assignment, or this member missed a
    rebalance) nothing is retained, and a partition may be both revoked and assigned:
    handle ``revoked`` first. ``generation`` is the group's assignment epoch, increasing
    with every rebalance this member takes part in. ``owners`` maps every partition of the
    topic to the endpoint its owner advertises (None: none advertised) in this generation.
    """

    generation: int
    member_id: str
    assigned: frozenset[int]
    revoked: frozenset[int]
    retained: frozenset[int]
    continuous: bool
    owners: Mapping[int, str | None] = field(default_factory=dict, hash=False)

    @property
    def owned(self) -> frozenset[int]:
        """Every partition this member owns from this generation on."""
        return self.assigned | self.retained


def ownership_change(
    last: OwnershipChange | None,
    generation: int,
    member_id: str,
    owned: frozenset[int],
    owners: Mapping[int, str | None],
) -> OwnershipChange:
    """The change from ``last`` to owning ``owned`` in ``generation`` as ``member_id``.

    A partition is retained only if this member owned it in the generation just before
    with the same member id: a new member id means the broker dropped the member, and a
    skipped generation means a rebalance went on without it; either way someone else may
    have owned the partition meanwhile, so it must be claimed and recovered again.
    """
    before = last.owned if last is not None else frozenset[int]()
    continuous = (
        last is not None and last.member_id == member_id and generation == last.generation + 1
    )
    retained = before & owned if continuous else frozenset[int]()
    return OwnershipChange(
        generation=generation,
        member_id=member_id,
        assigned=owned - retained,
        revoked=before - retained,
        retained=retained,
        continuous=continuous,
        owners=dict(owners),
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks on; plain functions, not coroutines, so the
    new partitions are paused before anything else runs."""

    def __init__(
        self,
        started: Callable[[], None],
        completed: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._started = started
        self._completed = completed

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._started()

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._completed(assigned)


class GroupMembership(AsyncResource):
    """This instance's membership in the consumer group ``group`` on the log ``topic``.

    ``endpoint`` (e.g. ``"10.0.0.7:8080"``) is advertised to the other members, who see it
    in :attr:`OwnershipChange.owners`. A member the broker hears no heartbeat from for
    ``session_timeout`` seconds is dropped and its partitions go to the others; heartbeats
    go every ``heartbeat_interval`` seconds (default: a fifth of the session timeout), which
    also bounds how soon the others notice a rebalance. ``rebalance_timeout`` (default: the
    session timeout) is how long the broker waits for every member to rejoin. Kafka accepts
    session timeouts between its ``group.min.session.timeout.ms`` (6 s by default) and
    ``group.max.session.timeout.ms``. :meth:`close` leaves the group, so the others take
    over at once, not after the session timeout. ``client_options`` go to the consumer (TLS,
    SASL, timeouts; :data:`~kapbit.repository.kafka.CLIENT_DEFAULTS` apply).

    Await :meth:`next_change` (or iterate) for each rebalance's :class:`OwnershipChange`;
    nothing needs to be polled to stay in the group.
    """

    def __init__(
        self,
        bootstrap_servers: str | list[str],
        topic: str,
        group: str,
        *,
        endpoint: str | None = None,
        session_timeout: float = 10.0,
        heartbeat_interval: float | None = None,
        rebalance_timeout: float | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        for name, value in (("topic", topic), ("group", group)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if endpoint is not None and (
            not isinstance(endpoint, str) or not endpoint.strip() or len(endpoint) > MAX_ENDPOINT
        ):
            raise ValueError(
                f"endpoint must be None or a non-empty string of at most {MAX_ENDPOINT} "
                f"characters, got {endpoint!r}"
            )
        if not session_timeout > 0:
            raise ValueError(f"session_timeout must be positive, got {session_timeout!r}")
        heartbeat = session_timeout / 5 if heartbeat_interval is None else heartbeat_interval
        if not 0 < heartbeat < session_timeout:
            raise ValueError(
                f"heartbeat_interval must be positive and below session_timeout "
                f"({session_timeout}), got {heartbeat_interval!r}"
            )
        rebalance = session_timeout if rebalance_timeout is None else rebalance_timeout
        if not rebalance > 0:
            raise ValueError(f"rebalance_timeout must be positive, got {rebalance_timeout!r}")
        reserved = sorted(_RESERVED_OPTIONS & set(client_options or {}))
        if reserved:
            raise ValueError(
                f"client_options may not set {', '.join(reserved)}: GroupMembership sets them"
            )
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group = group
        self.endpoint = endpoint
        self.session_timeout = session_timeout
        self.heartbeat_interval = heartbeat
        self.rebalance_timeout = rebalance
        options = with_defaults(client_options)
        options["request_timeout_ms"] = max(
            int(options["request_timeout_ms"]), int(rebalance * 1000) + _JOIN_MARGIN_MS
        )
        self._client_options = options
        self._assignor = StickyAssignor(endpoint)
        self._consumer: AIOKafkaConsumer | None = None
        self._host: TaskHost | None = None
        self._pending: collections.deque[OwnershipChange] = collections.deque()
        self._arrived = asyncio.Event()  # a change, a failure or the close
        self._failure: Exception | None = None
        self._stopped = False
        self._last: OwnershipChange | None = None
        self._rebalancing = False

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check the topic and join the group (in the background). Idempotent.

        Raises StartupError if the broker is unreachable or the topic does not exist.
        """
        if self._consumer is not None:
            return
        if self._stopped:
            raise InstanceClosed(f"the membership in group {self.group!r} is closed")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            partition_assignment_strategy=(self._assignor,),
            session_timeout_ms=int(self.session_timeout * 1000),
            heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
            rebalance_timeout_ms=int(self.rebalance_timeout * 1000),
            **self._client_options,
        )
        try:
            await consumer.start()
            topics = await consumer.topics()
        except BROKER_ERRORS as exc:
            await _stop_quietly(consumer)
            raise StartupError(
                f"cannot join group {self.group!r} at {self.bootstrap_servers}: {exc!r}"
            ) from exc
        if self.topic not in topics:
            await _stop_quietly(consumer)
            raise StartupError(f"topic {self.topic!r} does not exist: create the log first")
        consumer.subscribe(
            [self.topic], listener=_Listener(self._rebalance_started, self._rebalance_completed)
        )
        self._consumer = consumer
        self._host = TaskHost(f"kapbit-group-{self.group}")
        await self._host.start()
        self._host.spawn(self._keep_membership(consumer), name="kapbit-group-heartbeat")

    async def close(self) -> None:
        """Leave the group (the others take over at once) and stop. Idempotent."""
        self._stopped = True
        self._arrived.set()
        host, self._host = self._host, None
        consumer, self._consumer = self._consumer, None
        if host is not None:
            await host.close(CANCEL_GRACE)
        if consumer is not None:
            await _stop_quietly(consumer)
            if self._last is not None:
                await self._leave(self._last.member_id)

    async def _leave(self, member_id: str) -> None:
        """Send LeaveGroup for ``member_id`` once more, after the consumer stopped.

        aiokafka sends it only for a generation above 0, and tansu numbers a group's first
        generation 0: a member leaving it would keep its partitions a session timeout
        long. After aiokafka's own LeaveGroup the broker answers "unknown member": no harm.
        """
        options = {k: v for k, v in self._client_options.items() if k in _CLIENT_OPTIONS}
        client = AIOKafkaClient(bootstrap_servers=self.bootstrap_servers, **options)
        try:
            async with asyncio.timeout(_LEAVE_TIMEOUT):
                await client.bootstrap()
                node = await client.coordinator_lookup(CoordinationType.GROUP, self.group)
                await client.send(node, LeaveGroupRequest(self.group, member_id))
        except BROKER_ERRORS as exc:
            logger.warning("group %r: LeaveGroup failed: %r", self.group, exc)
        finally:
            await client.close()

    # --- what it tells ----------------------------------------------------------------------

    @property
    def owned(self) -> frozenset[int]:
        """The partitions this member owns as of the last :class:`OwnershipChange`."""
        return self._last.owned if self._last is not None else frozenset()

    @property
    def generation(self) -> int:
        """The generation of the last :class:`OwnershipChange` (0 before the first)."""
        return self._last.generation if self._last is not None else 0

    @property
    def rebalancing(self) -> bool:
        """True between the start of a rebalance and its new assignment."""
        return self._rebalancing

    def owner_endpoint(self, partition: int) -> str | None:
        """The endpoint the owner of ``partition`` advertised, as of the last generation
        this member saw (it may have moved since: the owner's log claim decides)."""
        return self._last.owners.get(partition) if self._last is not None else None

    async def next_change(self) -> OwnershipChange:
        """The next rebalance's outcome for this member, in order; safe to cancel.

        Raises StartupError if the group cannot be used (the broker refuses the session
        timeout, the group or the topic), InstanceClosed once closed and drained.
        """
        while not self._pending:
            if self._failure is not None:
                raise self._failure
            if self._stopped:
                raise InstanceClosed(f"the membership in group {self.group!r} is closed")
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.popleft()

    def __aiter__(self) -> GroupMembership:
        return self

    async def __anext__(self) -> OwnershipChange:
        try:
            return await self.next_change()
        except InstanceClosed:
            raise StopAsyncIteration from None

    # --- inside -----------------------------------------------------------------------------

    async def _keep_membership(self, consumer: AIOKafkaConsumer) -> None:
        """Keep one ``getmany`` pending (aiokafka leaves the group of an idle consumer) and
        surface the group errors it raises; every partition is paused, so none is read."""
        try:
            while True:
                try:
                    await consumer.getmany(timeout_ms=1000)
                except KafkaError as exc:
                    if not exc.retriable:
                        raise
                    logger.warning("group %r: %r; aiokafka retries", self.group, exc)
        except ConsumerStoppedError:
            return
        except Exception as exc:  # anything else stops the membership; next_change says why
            failure = StartupError(
                f"group {self.group!r} on topic {self.topic!r} cannot be used: {exc!r}"
            )
            failure.__cause__ = exc
            logger.error("%s", failure)
            self._failure = failure
            self._arrived.set()

    def _rebalance_started(self) -> None:
        self._rebalancing = True

    def _rebalance_completed(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is not None and assigned:
            consumer.pause(*assigned)
        received = self._assignor.received
        if received is None:  # aiokafka calls on_assignment first; never without it
            logger.error("group %r: an assignment without its data; ignored", self.group)
            return
        data = received[0]
        owned = frozenset(tp.partition for tp in assigned if tp.topic == self.topic)
        change = ownership_change(self._last, data.epoch, data.member_id, owned, data.owners)
        self._last = change
        self._rebalancing = False
        self._pending.append(change)
        self._arrived.set()
        logger.info(
            "group %r generation %d: assigned %s, revoked %s, retained %s",
            self.group,
            change.generation,
            sorted(change.assigned),
            sorted(change.revoked),
            sorted(change.retained),
        )


async def _stop_quietly(consumer: AIOKafkaConsumer) -> None:
    with contextlib.suppress(*BROKER_ERRORS):
        await consumer.stop()
