"""The Kafka repository's confirmation rules as units (no broker): what
:class:`PartitionFence` confirms at once, and what :class:`Confirmer` does with an ack
that lands after the partition was fenced. Reading a gap is covered against a real
broker in test_kafka_repository.py and test_kafka_lost_acks.py."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from kapbit import Fenced
from kapbit.errors import LogLost
from kapbit.repository.kafka.fencing import Confirmer, PartitionFence
from kapbit.repository.kafka.reads import Lane


def _confirmer(fence: PartitionFence) -> Confirmer:
    # No read may happen in these tests: a lane that is used fails loudly.
    return Confirmer("log", [fence], cast(Lane, None), read_timeout=1.0)


def test_own_acks_in_order_are_confirmed_at_once_and_a_gap_is_not() -> None:
    fence = PartitionFence()
    fence.claim("a", 3)
    assert fence.confirmed(4)
    assert fence.confirmed(5)
    assert fence.confirmed(5)  # asked again: still below the frontier
    assert not fence.confirmed(7)  # offset 6 is not known to be harmless
    assert fence.frontier == 5
    assert fence.confirmed(6)  # 6 arrives: the frontier moves over 6 and 7
    assert fence.frontier == 7
    assert fence.confirmed(8)


async def test_an_ack_arriving_after_the_fence_fails_instead_of_waiting_forever() -> None:
    """A record of ours acknowledged after a gap reader found another node's claim below it
    is void: its append fails with Fenced at once (it used to wait until close)."""
    fence = PartitionFence()
    fence.claim("a", 0)
    confirmer = _confirmer(fence)
    error = Fenced("node 'b' claimed partition 0 at offset 5")
    fence.fence(error, 5)
    with pytest.raises(Fenced) as raised:
        await asyncio.wait_for(confirmer.confirm(0, 7), timeout=2.0)
    assert raised.value is error
    assert not fence.waiters
    assert await confirmer.confirm(0, 3) == 3  # below the foreign claim: still ours


async def test_an_ack_arriving_after_the_log_was_lost_fails_with_log_lost() -> None:
    fence = PartitionFence()
    fence.claim("a", 0)
    confirmer = _confirmer(fence)
    with pytest.raises(LogLost):
        fence.check_end(0, 0, 4)  # the log ends at 0, but offset 4 was acknowledged
    with pytest.raises(LogLost):
        await asyncio.wait_for(confirmer.confirm(0, 9), timeout=2.0)
    assert not fence.waiters
