"""A real storage outage: every connection to the broker is cut for a while, under load.

The broker advertises a TCP proxy (:meth:`LocalBroker.behind_proxy`), so all client
traffic, including connections opened after metadata discovery, goes through it. While
it is cut, appends fail, the storage breaker opens and the entry gate closes
(``exec_workflow`` raises ``GateClosed``); once it is restored the breaker's probe
succeeds, workflows complete and the gate reopens. No workflow may be lost or run twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from kapbit import (
    Backoff,
    BreakerPolicy,
    Definition,
    DuplicateWorkflow,
    Failure,
    GateClosed,
    Kapbit,
    Options,
    Progress,
    RetryPolicy,
    Step,
    Success,
)
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing.broker import LocalBroker
from tests.helpers import BreakerStates, wait_until
from tests.kafka_worker import read_log

PATHS = {
    "ok": [(0, "execute"), (1, "execute"), (2, "execute")],
    "fail": [(0, "execute"), (1, "execute"), (2, "execute"), (1, "compensate"), (0, "compensate")],
}
RESULTS = {
    "ok": {"values": ["exec-0", "exec-1", "exec-2"], "compensated": []},
    "fail": {"values": ["exec-0", "exec-1"], "compensated": [1, 0]},
}


def _kind(workflow_id: str) -> str:
    return "fail" if int(workflow_id[1:]) % 4 == 0 else "ok"


@dataclass
class Hold:
    """While ``on``, step 1 of a workflow waits for ``release``; ``held`` counts them."""

    on: bool = False
    held: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


def _definition(calls: list[tuple[str, int, str]], hold: Hold | None = None) -> Definition:
    """A 3-step saga; step 2 of every 4th workflow fails and the saga compensates."""

    def action(step: int, phase: str) -> Any:
        async def act(input: dict[str, str], progress: Progress) -> Any:
            workflow_id = input["id"]
            calls.append((workflow_id, step, phase))
            if hold is not None and hold.on and (step, phase) == (1, "execute"):
                hold.held += 1
                await hold.release.wait()
            if (step, phase) == (2, "execute") and _kind(workflow_id) == "fail":
                return Failure(f"no-{step}")
            return Success(f"{phase[:4]}-{step}")

        return act

    return Definition(
        "saga",
        steps=[Step(action(i, "execute"), action(i, "compensate")) for i in range(3)],
        result=lambda input, progress: {
            "values": progress.values(),
            "compensated": [i for i, _ in progress.compensations],
        },
        input_type=dict[str, str],
        outcome_type=str,
    )


@pytest.mark.parametrize("blackhole", [False, True], ids=["reset", "blackhole"])
async def test_outage_opens_the_breaker_closes_the_gate_and_loses_nothing(
    topic: str, blackhole: bool
) -> None:
    async with LocalBroker.behind_proxy() as broker:
        proxy = broker.proxy
        repository = KafkaRepository(
            broker.bootstrap_servers,
            topic,
            partitions=2,
            # Failures surface within a second instead of aiokafka's 40 s default.
            client_options={"request_timeout_ms": 1000, "retry_backoff_ms": 50},
        )
        options = Options(
            storage_breaker=BreakerPolicy(fail_max=3, reset_timeout=0.3),
            emit_backoff=Backoff(initial=0.02, maximum=0.2, jitter=0.02),
            retry=RetryPolicy(fast=Backoff(initial=0.02, maximum=0.2, jitter=0.02)),
        )
        calls: list[tuple[str, int, str]] = []
        kbit = Kapbit([_definition(calls)], repository, options=options)
        returned: dict[str, Any] = {}
        refused: list[str] = []
        counter = iter(range(1_000_000))
        stop = asyncio.Event()

        async def submit() -> None:
            while not stop.is_set():
                workflow_id = f"o{next(counter)}"
                try:
                    returned[workflow_id] = await kbit.exec_workflow(
                        workflow_id, "saga", {"id": workflow_id}
                    )
                except GateClosed:
                    refused.append(workflow_id)
                    await kbit.gate.wait_open()

        async with kbit:
            states = BreakerStates()
            kbit._breaker.add_listener(states)
            submitters = [asyncio.create_task(submit()) for _ in range(8)]
            try:
                await wait_until(lambda: len(returned) >= 100, timeout=30)
                await proxy.cut(blackhole=blackhole)
                # Appends time out, the breaker opens, the gate closes: new work is refused.
                await wait_until(lambda: not kbit.gate.is_open, timeout=20)
                assert "storage" in kbit.gate.reason
                with pytest.raises(GateClosed):
                    await kbit.exec_workflow("refused", "saga", {"id": "refused"})
                # While the broker stays unreachable, the breaker's probe fails: open again.
                await wait_until(
                    lambda: states.changes[:3] == ["open", "half-open", "open"], timeout=20
                )
                assert not kbit.gate.is_open
                during = len(returned)
                await proxy.restore()
                # The next probe succeeds, workflows complete, the gate reopens and the
                # stream goes on.
                await wait_until(lambda: kbit.gate.is_open, timeout=30)
                assert states.changes[-1] == "closed"
                await wait_until(lambda: len(returned) >= during + 100, timeout=30)
                stop.set()
                done = await asyncio.wait_for(
                    asyncio.gather(*submitters, return_exceptions=True), 30
                )
            finally:
                for submitter in submitters:
                    submitter.cancel()
            assert [d for d in done if d is not None] == []
            assert kbit.stats.in_flight == 0

        # A restart finds nothing left to do, second copies of records included, and
        # still knows every id.
        again = Kapbit([_definition(calls)], KafkaRepository(broker.bootstrap_servers, topic))
        async with again:
            assert again.stats.recovered == 0
            for workflow_id in returned:
                with pytest.raises(DuplicateWorkflow):
                    await again.exec_workflow(workflow_id, "saga", {"id": workflow_id})
        log = await read_log(broker.bootstrap_servers, topic)

    # Every accepted workflow has exactly one outcome per step and phase and one result;
    # nothing refused left a trace. A producer retry may leave a second copy of a record:
    # readers ignore it (the same event, by the same node), so count distinct events.
    workflows = log.by_workflow()
    assert set(workflows) == set(returned)
    assert log.zombies() == []
    copies: Counter[str] = Counter()
    for workflow_id, entries in workflows.items():
        kind = _kind(workflow_id)
        seen: list[Any] = []
        for entry in entries:
            key = (
                (entry.event.step, entry.event.phase)
                if entry.kind == "step_outcome"
                else entry.kind
            )
            if key in seen:
                copies[entry.kind] += 1
            else:
                seen.append(key)
        assert seen == ["workflow_created", *PATHS[kind], "workflow_result"], workflow_id
        assert returned[workflow_id] == RESULTS[kind]
        assert set(map(repr, log.results()[workflow_id])) == {repr(RESULTS[kind])}
    # No step ran twice: the emitter retried appends, never actions.
    executions = Counter(calls)
    assert {k: n for k, n in executions.items() if n != 1} == {}
    assert set(executions) == {
        (wid, step, phase) for wid in returned for step, phase in PATHS[_kind(wid)]
    }
    assert "refused" not in workflows and not set(refused) & set(workflows)
    print(
        f"{len(returned)} workflows, {len(refused)} refused while the gate was closed, "
        f"duplicate records: {dict(copies)}"
    )


#: What the README promises with the default client settings: with a handful of workflows
#: in flight a cut closes the gate within one or two request timeouts (5 s each; a produce
#: request carries one batch per partition, so the failures may come in two rounds), plus
#: slack for a loaded machine. A third round (or aiokafka's own 40 s timeout) is over it.
GATE_CLOSES_WITHIN = 15.0


@pytest.mark.parametrize("blackhole", [False, True], ids=["reset", "blackhole"])
async def test_with_default_client_settings_a_cut_closes_the_gate_within_the_documented_bound(
    topic: str, blackhole: bool
) -> None:
    async with LocalBroker.behind_proxy() as broker:
        # Default client settings and default options: only what a user gets out of the box.
        repository = KafkaRepository(broker.bootstrap_servers, topic, partitions=2)
        calls: list[tuple[str, int, str]] = []
        hold = Hold()
        kbit = Kapbit([_definition(calls, hold)], repository)
        returned: dict[str, Any] = {}
        counter = iter(range(1_000_000))
        stop = asyncio.Event()

        async def submit() -> None:
            # Submitting until the gate closes: 8 workflows are in flight at the cut.
            while not stop.is_set():
                workflow_id = f"d{next(counter)}"
                try:
                    returned[workflow_id] = await kbit.exec_workflow(
                        workflow_id, "saga", {"id": workflow_id}
                    )
                except GateClosed:
                    return

        async with kbit:
            submitters = [asyncio.create_task(submit()) for _ in range(8)]
            try:
                await wait_until(lambda: len(returned) >= 50, timeout=30)
                # 8 workflows in flight at the cut, each with an append to make right after
                # it: how many appends a cut catches no longer depends on how fast a loaded
                # machine happened to submit (fewer than fail_max take more rounds).
                hold.on = True
                await wait_until(lambda: hold.held == 8, timeout=30)
                hold.on = False
                await broker.proxy.cut(blackhole=blackhole)
                loop = asyncio.get_running_loop()
                started = loop.time()
                hold.release.set()
                await wait_until(lambda: not kbit.gate.is_open, timeout=GATE_CLOSES_WITHIN)
                print(f"gate closed {loop.time() - started:.1f} s after the cut")
                with pytest.raises(GateClosed):
                    await kbit.exec_workflow("refused", "saga", {"id": "refused"})
                stop.set()
                await broker.proxy.restore()
                # The callers in flight at the cut finish once the broker is back.
                done = await asyncio.wait_for(
                    asyncio.gather(*submitters, return_exceptions=True), 60
                )
            finally:
                for submitter in submitters:
                    submitter.cancel()
        assert [d for d in done if d is not None] == []
        assert {k: n for k, n in Counter(calls).items() if n != 1} == {}
