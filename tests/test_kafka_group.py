"""GroupMembership: partitions of one log shared by a Kafka consumer group.

The assignor's plan and the ownership diff are checked as pure functions (with
hypothesis); membership itself against the real broker: members join and split the
partitions, a graceful close hands over without waiting for the session, a SIGKILLed
member's partitions are taken over after it, a SIGSTOPped member that missed rebalances
claims nothing as retained, and partitions kept across eager rebalances are reported
retained. Session timeouts are short (2 s) so the suite stays quick.

Run as ``python -m tests.test_kafka_group BOOTSTRAP TOPIC GROUP SESSION`` it is a member
process: it prints each :class:`OwnershipChange` as a JSON line until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import ClusterMetadata
from hypothesis import given
from hypothesis import strategies as st

from kapbit.errors import InstanceClosed, StartupError
from kapbit.repository.kafka import GroupMembership, OwnershipChange
from kapbit.repository.kafka.group import (
    MemberClaim,
    StickyAssignor,
    ownership_change,
    plan_assignment,
)
from kapbit.testing.broker import free_port

_ROOT = Path(__file__).resolve().parent.parent
SESSION = 2.0  # tansu completes a rebalance about half a session timeout after it starts
HEARTBEAT = 0.1
#: Generous bound for a rebalance that needs no session to expire (several joins in a row).
SETTLE = 20.0


# --- the assignor's plan (pure) -----------------------------------------------------------


def _check_plan(partitions: list[int], plan: dict[str, list[int]], members: Iterable[str]) -> None:
    owned = [p for shares in plan.values() for p in shares]
    assert sorted(owned) == sorted(set(partitions)), "every partition exactly once"
    assert set(plan) == set(members)
    sizes = [len(shares) for shares in plan.values()]
    assert max(sizes) - min(sizes) <= 1, f"unbalanced: {plan}"


@st.composite
def _groups(draw: st.DrawFn) -> tuple[list[int], dict[str, MemberClaim]]:
    """Partitions and members whose newest-epoch claims are disjoint (as a real group's
    last assignment is), plus stale members claiming anything at older epochs."""
    count = draw(st.integers(1, 24))
    partitions = list(range(count))
    names = draw(st.lists(st.text("abcdef", min_size=1, max_size=4), min_size=1, unique=True))
    newest = draw(st.integers(1, 5))
    owner_of = {p: draw(st.sampled_from([None, *names])) for p in partitions}
    members: dict[str, MemberClaim] = {}
    for index, name in enumerate(names):
        if index == 0 or draw(st.booleans()):  # a member of the newest generation
            owned = frozenset(p for p, owner in owner_of.items() if owner == name)
            members[name] = MemberClaim(f"{name}:1", newest, owned)
        else:  # new (epoch 0) or stale: may claim partitions others own now
            stale = draw(st.frozensets(st.integers(0, count + 3)))
            members[name] = MemberClaim(None, draw(st.integers(0, newest - 1)), stale)
    return partitions, members


@given(_groups())
def test_plan_is_balanced_disjoint_complete_and_keeps_newest_claims(
    group: tuple[list[int], dict[str, MemberClaim]],
) -> None:
    partitions, members = group
    plan = plan_assignment(partitions, members)
    _check_plan(partitions, plan, members)
    newest = max(claim.epoch for claim in members.values())
    base = len(partitions) // len(members)
    for name, claim in members.items():
        if claim.epoch != newest:
            continue
        kept = len(set(plan[name]) & claim.owned)
        # A current owner keeps all it can within the larger share it is given first.
        assert kept >= min(len(claim.owned), base), (name, claim, plan)
        assert kept == len(plan[name]) or kept == len(claim.owned), (name, claim, plan)


@given(
    st.integers(0, 20),
    st.dictionaries(
        st.text("abc", min_size=1, max_size=3),
        st.builds(MemberClaim, st.none(), st.integers(0, 3), st.frozensets(st.integers(-2, 25))),
        min_size=1,
    ),
)
def test_plan_is_valid_for_any_claims_even_contradictory_ones(
    count: int, members: dict[str, MemberClaim]
) -> None:
    """Claims at one epoch are disjoint in a real group, except when a member that slept
    through a whole group's life wakes up; the plan must stay valid anyway."""
    _check_plan(list(range(count)), plan_assignment(range(count), members), members)


def test_plan_ignores_stale_claims_and_moves_only_what_balance_needs() -> None:
    members = {
        "a": MemberClaim("a:1", 7, frozenset({0, 1, 2})),
        "b": MemberClaim("b:1", 7, frozenset({3, 4, 5})),
        "c": MemberClaim("c:1", 4, frozenset({0, 1, 2, 3})),  # missed epochs 5 to 7
    }
    plan = plan_assignment(range(6), members)
    assert plan == {"a": [0, 1], "b": [3, 4], "c": [2, 5]}
    # Without the newcomer nothing moves at all.
    assert plan_assignment(range(6), {k: members[k] for k in "ab"}) == {
        "a": [0, 1, 2],
        "b": [3, 4, 5],
    }


def test_plan_with_more_members_than_partitions_leaves_some_empty() -> None:
    members = {name: MemberClaim() for name in "abcd"}
    plan = plan_assignment([0, 1], members)
    _check_plan([0, 1], plan, members)
    assert sorted(len(shares) for shares in plan.values()) == [0, 0, 1, 1]


# --- the assignor on aiokafka's protocol structures (pure) ---------------------------------


class _Cluster(ClusterMetadata):  # type: ignore[misc]
    def __init__(self, partitions: dict[str, set[int]]) -> None:
        super().__init__()
        self._known = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self._known.get(topic)


def test_assignor_round_trip_carries_epoch_member_id_and_endpoints() -> None:
    a, b = StickyAssignor("a:80"), StickyAssignor(None)
    joins = {"m-a": a.metadata({"log"}), "m-b": b.metadata({"log"})}
    assignments = a.assign(_Cluster({"log": set(range(4))}), joins)
    for member_id, assignor in (("m-a", a), ("m-b", b)):
        assignor.on_assignment(assignments[member_id])
        assert assignor.received is not None
        data, partitions = assignor.received
        assert (data.epoch, data.member_id) == (1, member_id)
        assert len(partitions) == 2
    assert a.received is not None and b.received is not None
    owners = a.received[0].owners
    assert owners == b.received[0].owners
    assert {owners[p] for p in a.received[1]} == {"a:80"}
    assert {owners[p] for p in b.received[1]} == {None}
    # The next join advertises what each member owns now; the next epoch is 2 and sticky.
    rejoin = {"m-a": a.metadata({"log"}), "m-b": b.metadata({"log"})}
    again = b.assign(_Cluster({"log": set(range(4))}), rejoin)
    a_before = a.received[1]
    a.on_assignment(again["m-a"])
    assert a.received[0].epoch == 2
    assert a.received[1] == a_before


def test_assignor_treats_undecodable_member_data_as_owning_nothing() -> None:
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

    a = StickyAssignor("a:80")
    a.on_assignment(
        a.assign(_Cluster({"log": {0, 1}}), {"m-a": a.metadata({"log"})})["m-a"],
    )
    foreign = ConsumerProtocolMemberMetadata(0, ["log"], b"\xc1 not msgpack")
    plan = a.assign(_Cluster({"log": {0, 1}}), {"m-a": a.metadata({"log"}), "m-x": foreign})
    assert [tp.partition for tp in plan["m-x"].partitions()] != []  # it still gets a share
    a.on_assignment(plan["m-a"])
    assert a.received is not None and a.received[0].epoch == 2


# --- the ownership diff (pure) -------------------------------------------------------------


def _fs(*partitions: int) -> frozenset[int]:
    return frozenset(partitions)


def _change(generation: int, member: str, owned: set[int]) -> OwnershipChange:
    return ownership_change(None, generation, member, frozenset(owned), {})


def test_diff_first_assignment_assigns_everything() -> None:
    change = _change(3, "m", {1, 2})
    assert (change.assigned, change.revoked, change.retained) == (_fs(1, 2), _fs(), _fs())
    assert not change.continuous


def test_diff_next_generation_same_member_retains_what_stays() -> None:
    change = ownership_change(_change(3, "m", {1, 2}), 4, "m", frozenset({2, 5}), {})
    assert change.continuous
    assert (change.assigned, change.revoked, change.retained) == (_fs(5), _fs(1), _fs(2))
    assert change.owned == {2, 5}


@pytest.mark.parametrize(
    ("generation", "member"), [(5, "m"), (4, "m2")], ids=["skipped-generation", "new-member-id"]
)
def test_diff_after_a_gap_retains_nothing(generation: int, member: str) -> None:
    change = ownership_change(_change(3, "m", {1, 2}), generation, member, frozenset({2, 5}), {})
    assert not change.continuous
    assert (change.assigned, change.revoked, change.retained) == (_fs(2, 5), _fs(1, 2), _fs())


# --- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"group": ""}, "group"),
        ({"topic": "  "}, "topic"),
        ({"endpoint": ""}, "endpoint"),
        ({"endpoint": "x" * 1025}, "endpoint"),
        ({"session_timeout": 0}, "session_timeout"),
        ({"session_timeout": 2, "heartbeat_interval": 2}, "heartbeat_interval"),
        ({"rebalance_timeout": -1}, "rebalance_timeout"),
        ({"client_options": {"group_id": "other"}}, "group_id"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict[str, Any], names: str) -> None:
    arguments: dict[str, Any] = {"topic": "log", "group": "g", **kwargs}
    topic, group = arguments.pop("topic"), arguments.pop("group")
    with pytest.raises(ValueError, match=names):
        GroupMembership("127.0.0.1:9", topic, group, **arguments)


# --- against the broker --------------------------------------------------------------------


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


def _member(
    bootstrap: str, topic: str, group: str, name: str, session: float = SESSION
) -> GroupMembership:
    return GroupMembership(
        bootstrap,
        topic,
        group,
        endpoint=f"{name}:8080",
        session_timeout=session,
        heartbeat_interval=HEARTBEAT,
    )


class _Member(Protocol):
    """What :class:`_Watch` needs of a member, in this process or another."""

    @property
    def rebalancing(self) -> bool: ...

    async def next_change(self) -> OwnershipChange: ...


@dataclass
class _Watch:
    """Every change each member reported, gathered until the group is stable."""

    members: dict[str, _Member]
    seen: dict[str, list[OwnershipChange]] = field(default_factory=dict)

    def last(self, name: str) -> OwnershipChange:
        return self.seen[name][-1]

    def mark(self) -> dict[str, int]:
        return {name: len(changes) for name, changes in self.seen.items()}

    def since(self, mark: dict[str, int], name: str) -> list[OwnershipChange]:
        return self.seen.get(name, [])[mark.get(name, 0) :]

    def stable(self, partitions: int) -> bool:
        if not set(self.members) <= set(self.seen):
            return False
        lasts = [self.last(name) for name in self.members]
        owned = [p for change in lasts for p in change.owned]
        return (
            len({change.generation for change in lasts}) == 1
            and sorted(owned) == list(range(partitions))
            and not any(member.rebalancing for member in self.members.values())
        )

    async def settle(self, partitions: int, timeout: float = SETTLE) -> float:
        """Wait until every member reported the same generation and together they own
        every partition once; the seconds it took."""
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            while not self.stable(partitions):
                waits = {
                    asyncio.ensure_future(member.next_change()): name
                    for name, member in self.members.items()
                }
                try:
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                    await asyncio.gather(*waits, return_exceptions=True)
                for task in done:
                    self.seen.setdefault(waits[task], []).append(task.result())
        return time.monotonic() - started


def _union(changes: Iterable[OwnershipChange], what: str) -> set[int]:
    return set().union(*(getattr(change, what) for change in changes))


@asynccontextmanager
async def _group(
    bootstrap: str, topic: str, group: str, names: Iterable[str], session: float = SESSION
) -> AsyncIterator[_Watch]:
    async with AsyncExitStack() as stack:
        members: dict[str, _Member] = {}
        for name in names:
            member = _member(bootstrap, topic, group, name, session)
            members[name] = await stack.enter_async_context(member)
        yield _Watch(members)


def _assert_split(watch: _Watch, partitions: int) -> None:
    lasts = {name: watch.last(name) for name in watch.members}
    for name, change in lasts.items():
        for other, theirs in lasts.items():
            if other != name:
                assert not change.owned & theirs.owned, (name, other, lasts)
    assert _union(lasts.values(), "owned") == set(range(partitions))
    sizes = sorted(len(c.owned) for c in lasts.values())
    assert sizes[-1] - sizes[0] <= 1, lasts
    expected = {p: f"{name}:8080" for name, c in lasts.items() for p in c.owned}
    for name, change in lasts.items():
        member = watch.members[name]
        assert isinstance(member, GroupMembership)
        assert dict(change.owners) == expected, name
        assert member.owned == change.owned
        assert member.generation == change.generation
        assert all(member.owner_endpoint(p) == e for p, e in expected.items())


@pytest.mark.parametrize("count", [2, 3])
async def test_members_split_every_partition_without_overlap(
    kafka_bootstrap: str, topic: str, count: int
) -> None:
    await _create_topic(kafka_bootstrap, topic, 6)
    names = [f"m{i}" for i in range(count)]
    async with _group(kafka_bootstrap, topic, f"{topic}-g", names) as watch:
        await watch.settle(6)
        _assert_split(watch, 6)


async def test_partitions_kept_across_eager_rebalances_are_reported_retained(
    kafka_bootstrap: str, topic: str
) -> None:
    """aiokafka revokes everything at the start of each rebalance; partitions a member
    gets back must come out as retained, and only moved ones as revoked."""
    await _create_topic(kafka_bootstrap, topic, 6)
    group = f"{topic}-g"
    async with _group(kafka_bootstrap, topic, group, ["a"]) as watch:
        await watch.settle(6)
        first = watch.last("a")
        assert first.assigned == set(range(6)) and not first.continuous
        mark = watch.mark()
        async with _member(kafka_bootstrap, topic, group, "b") as b:
            watch.members["b"] = b
            await watch.settle(6)
            a_changes = watch.since(mark, "a")
            assert all(change.continuous for change in a_changes), a_changes
            assert not _union(a_changes, "assigned")
            assert _union(a_changes, "revoked") == watch.last("b").owned
            a_kept = watch.last("a").owned
            assert watch.last("a").retained == a_kept and len(a_kept) == 3
        del watch.members["b"]
        mark = watch.mark()
        await watch.settle(6)
        # b left: a keeps what it had and gets b's back as newly assigned, not "retained".
        a_changes = watch.since(mark, "a")
        assert all(change.continuous for change in a_changes), a_changes
        assert _union(a_changes, "assigned") == set(range(6)) - a_kept
        assert not _union(a_changes, "revoked")
        assert watch.last("a").retained >= a_kept


async def test_graceful_close_hands_partitions_over_without_waiting_for_the_session(
    kafka_bootstrap: str, topic: str
) -> None:
    """Without a LeaveGroup the broker starts the rebalance only once the session expired,
    so the others would own everything after ``session`` plus a rebalance at the
    earliest (6 s and more here); with it, after a heartbeat plus a rebalance (tansu:
    half a session timeout, plus up to 1 s when a follower's SyncGroup arrives before
    the leader's). Settling within one session timeout proves the hand-over."""
    session = 4.0
    await _create_topic(kafka_bootstrap, topic, 6)
    group = f"{topic}-g"
    async with _group(kafka_bootstrap, topic, group, ["a", "b", "c"], session) as watch:
        await watch.settle(6)
        leaving = watch.members.pop("c")
        assert isinstance(leaving, GroupMembership)
        its = watch.last("c").owned
        mark = watch.mark()
        started = time.monotonic()
        await leaving.close()
        await watch.settle(6, timeout=session)
        print(f"graceful hand-over: {time.monotonic() - started:.2f} s (session {session} s)")
        moved = [c for name in ("a", "b") for c in watch.since(mark, name)]
        assert _union(moved, "assigned") == its
        assert not _union(moved, "revoked")
        with pytest.raises(InstanceClosed):
            await leaving.next_change()
        assert [change async for change in leaving] == []


async def test_membership_holds_without_anybody_polling(kafka_bootstrap: str, topic: str) -> None:
    """aiokafka leaves the group when no getmany ran for ``max_poll_interval_ms``; the
    membership keeps one pending itself, so a quiet group sees no rebalance at all."""
    await _create_topic(kafka_bootstrap, topic, 4)
    group = f"{topic}-g"
    async with AsyncExitStack() as stack:
        members: dict[str, GroupMembership] = {}
        for name in ("a", "b"):
            member = GroupMembership(
                kafka_bootstrap,
                topic,
                group,
                session_timeout=SESSION,
                heartbeat_interval=HEARTBEAT,
                client_options={"max_poll_interval_ms": 300},
            )
            members[name] = await stack.enter_async_context(member)
        watch = _Watch(dict(members))
        await watch.settle(4)
        generation = watch.last("a").generation
        quiet = 10 * 0.3  # ten poll intervals: an idle member would have left long before
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(members["a"].next_change(), quiet)
        assert members["a"].generation == members["b"].generation == generation


class _MemberProcess:
    """A GroupMembership in another process (this module run as a program)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.rebalancing = False  # what it printed is all it says
        self._changes: asyncio.Queue[OwnershipChange] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, bootstrap: str, topic: str, group: str) -> _MemberProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.test_kafka_group",
            bootstrap,
            topic,
            group,
            str(SESSION),
            cwd=_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            data = json.loads(line)
            self._changes.put_nowait(
                OwnershipChange(
                    generation=data["generation"],
                    member_id=data["member_id"],
                    assigned=frozenset(data["assigned"]),
                    revoked=frozenset(data["revoked"]),
                    retained=frozenset(data["retained"]),
                    continuous=data["continuous"],
                )
            )

    async def next_change(self) -> OwnershipChange:
        return await self._changes.get()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        await self.process.wait()
        await self._reader


async def test_sigkilled_member_partitions_are_taken_over_after_the_session_timeout(
    kafka_bootstrap: str, topic: str
) -> None:
    await _create_topic(kafka_bootstrap, topic, 6)
    group = f"{topic}-g"
    async with _group(kafka_bootstrap, topic, group, ["a"]) as watch:
        other = await _MemberProcess.start(kafka_bootstrap, topic, group)
        try:
            watch.members["other"] = other
            await watch.settle(6)
            its = watch.last("other").owned
            assert its and watch.last("a").owned == set(range(6)) - its
            del watch.members["other"]
            mark = watch.mark()
            started = time.monotonic()
            await other.kill()
            await watch.settle(6, timeout=SESSION + SETTLE)
            took = time.monotonic() - started
            print(f"failover after SIGKILL: {took:.2f} s (session {SESSION} s)")
            a_changes = watch.since(mark, "a")
            assert _union(a_changes, "assigned") == its
            assert all(change.continuous for change in a_changes)
            assert not _union(a_changes, "revoked")
            # A killed process sends no LeaveGroup: only the session's expiry (counted from
            # its last heartbeat) frees its partitions.
            assert took >= SESSION - HEARTBEAT
        finally:
            await other.kill()


async def test_member_that_missed_rebalances_retains_nothing(
    kafka_bootstrap: str, topic: str
) -> None:
    """A member frozen past its session (SIGSTOP) is dropped and its partitions move; when
    it wakes it rejoins and must report everything revoked and assigned afresh."""
    await _create_topic(kafka_bootstrap, topic, 4)
    group = f"{topic}-g"
    async with _group(kafka_bootstrap, topic, group, ["a"]) as watch:
        frozen = await _MemberProcess.start(kafka_bootstrap, topic, group)
        try:
            watch.members["frozen"] = frozen
            await watch.settle(4)
            before = watch.last("frozen")
            assert before.owned
            frozen.process.send_signal(signal.SIGSTOP)
            del watch.members["frozen"]
            mark = watch.mark()
            await watch.settle(4, timeout=SESSION + SETTLE)  # a alone owns everything
            assert _union(watch.since(mark, "a"), "assigned") == before.owned
            frozen.process.send_signal(signal.SIGCONT)
            watch.members["frozen"] = frozen
            mark = watch.mark()
            await watch.settle(4, timeout=SESSION + SETTLE)
            woke = watch.since(mark, "frozen")
            assert not woke[0].continuous and not woke[0].retained
            assert woke[0].revoked == before.owned
            assert woke[0].assigned == woke[0].owned
            a_changes = watch.since(mark, "a")
            assert all(change.continuous for change in a_changes)
            assert _union(a_changes, "revoked") == watch.last("frozen").owned
        finally:
            await frozen.kill()


async def test_missing_topic_and_unreachable_broker_refuse_to_start(
    kafka_bootstrap: str, topic: str
) -> None:
    missing = GroupMembership(kafka_bootstrap, topic, f"{topic}-g", session_timeout=SESSION)
    with pytest.raises(StartupError, match="does not exist"):
        await missing.start()
    nobody = GroupMembership(
        f"127.0.0.1:{free_port()}",
        topic,
        "g",
        client_options={"request_timeout_ms": 1000, "metadata_max_age_ms": 1000},
    )
    with pytest.raises(StartupError, match="cannot join group"):
        await nobody.start()


async def test_a_member_speaking_another_protocol_fails_the_membership_typed(
    kafka_bootstrap: str, topic: str
) -> None:
    """A plain consumer (round robin) already in the group: the broker refuses our
    protocol, and next_change raises a typed error instead of hanging."""
    await _create_topic(kafka_bootstrap, topic, 2)
    group = f"{topic}-g"
    joined = asyncio.Event()

    class Joined(ConsumerRebalanceListener):  # type: ignore[misc]
        def on_partitions_revoked(self, revoked: Any) -> None:
            pass

        def on_partitions_assigned(self, assigned: Any) -> None:
            joined.set()

    plain = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=int(SESSION * 1000),
        heartbeat_interval_ms=int(HEARTBEAT * 1000),
    )
    await plain.start()
    try:
        plain.subscribe([topic], listener=Joined())
        poll = asyncio.ensure_future(plain.getmany(timeout_ms=int(SETTLE * 1000)))
        await asyncio.wait_for(joined.wait(), SETTLE)
        async with _member(kafka_bootstrap, topic, group, "k") as member:
            with pytest.raises(StartupError, match="InconsistentGroupProtocol"):
                await asyncio.wait_for(member.next_change(), SETTLE)
        poll.cancel()
    finally:
        await plain.stop()


# --- a member process ------------------------------------------------------------------------


async def _run_member(bootstrap: str, topic: str, group: str, session: float) -> None:
    member = GroupMembership(
        bootstrap,
        topic,
        group,
        endpoint=f"pid-{os.getpid()}:8080",
        session_timeout=session,
        heartbeat_interval=HEARTBEAT,
    )
    async with member:
        async for change in member:
            record = {
                "generation": change.generation,
                "member_id": change.member_id,
                "continuous": change.continuous,
                "owned": sorted(change.owned),
                "assigned": sorted(change.assigned),
                "revoked": sorted(change.revoked),
                "retained": sorted(change.retained),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    asyncio.run(_run_member(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
