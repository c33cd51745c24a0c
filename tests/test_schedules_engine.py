"""Schedules in the engine, on a ManualClock: catch-up policies across a restart, a crash,
a takeover, a window too small for the last firing, bad declarations and DST."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kapbit import Definition, Kapbit, Options, Progress, Step, Success
from kapbit.errors import Fenced, InvalidSchedule
from kapbit.repository import MemRepository
from kapbit.scheduler import RETRY_DELAY
from kapbit.schedules import CatchUp, Schedule
from kapbit.testing import FaultyRepository, KapbitFactory, ManualClock, fast_options
from tests.helpers import incarnations, load_example, wait_until

T0 = datetime(2026, 11, 21, tzinfo=UTC)
HOUR = timedelta(hours=1)


def report(input: dict[str, str], _progress: Progress) -> Success[str]:
    return Success(f"report {input['kind']}")


REPORT = Definition("report", steps=[Step(report)], input_type=dict[str, str], outcome_type=str)


def hourly(catch_up: CatchUp = CatchUp.SKIP) -> Schedule:
    return Schedule("hourly", "report", every=HOUR, catch_up=catch_up, input={"kind": "hourly"})


def fid(at: datetime, name: str = "hourly") -> str:
    return f"{name}@{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def options(clock: ManualClock, **kwargs: Any) -> Options:
    return fast_options(clock=clock, **kwargs)


def created(repo: MemRepository) -> Counter[str]:
    """How many workflows each id has in the log as a reader sees them: second copies of a
    ``WorkflowCreated`` (a retried append) and zombie writes do not count; a firing started
    twice counts 2."""
    by_id, problems = incarnations(repo)
    assert problems == []
    return Counter({workflow_id: len(found) for workflow_id, found in by_id.items()})


async def started(
    repo: MemRepository, clock: ManualClock, schedules: Sequence[Schedule], **kwargs: object
) -> Kapbit:
    kbit = Kapbit([REPORT], repo, options=options(clock, **kwargs), schedules=schedules)
    await kbit.start()
    return kbit


async def until_sleeping(clock: ManualClock, when: datetime) -> None:
    """Wait until the scheduler sleeps until ``when``: every firing due before is started."""
    await clock.wait_for_deadline(when.timestamp())


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        (CatchUp.SKIP, []),
        (CatchUp.LATEST, [5]),
        (CatchUp.ALL(max=3), [3, 4, 5]),
    ],
    ids=["skip", "latest", "all-3"],
)
async def test_catch_up_across_a_restart(catch_up: CatchUp, expected: list[int]) -> None:
    repo = MemRepository(partitions=2)
    clock = ManualClock(T0 + timedelta(seconds=30))
    first = await started(repo, clock, [hourly(catch_up)])
    await until_sleeping(clock, T0 + HOUR)
    await first.close()
    assert created(repo) == {fid(T0): 1}  # on time: every policy starts it

    clock.advance_to(T0 + 5 * HOUR + timedelta(minutes=10))  # down for 01:00 .. 05:00
    second = await started(repo, clock, [hourly(catch_up)])
    await until_sleeping(clock, T0 + 6 * HOUR)
    assert sorted(created(repo)) == sorted([fid(T0)] + [fid(T0 + k * HOUR) for k in expected])

    clock.advance_to(T0 + 6 * HOUR)
    await until_sleeping(clock, T0 + 7 * HOUR)
    await second.close()
    counts = created(repo)
    assert counts[fid(T0 + 6 * HOUR)] == 1
    assert set(counts.values()) == {1}


async def test_a_crash_and_restart_fire_no_firing_twice() -> None:
    repo = MemRepository(partitions=2)
    clock = ManualClock(T0)
    async with KapbitFactory(repo, options=options(clock)) as factory:
        first = await factory.start([REPORT], schedules=[hourly(CatchUp.ALL(max=5))])
        await until_sleeping(clock, T0 + HOUR)
        clock.advance_to(T0 + HOUR)
        await until_sleeping(clock, T0 + 2 * HOUR)
        # back within the grace of 01:00, which the log already holds
        clock.advance(20)
        await factory.crash_and_restart(first)  # a SIGKILL: no close, no final checkpoint
        await until_sleeping(clock, T0 + 2 * HOUR)
        clock.advance_to(T0 + 2 * HOUR)
        await until_sleeping(clock, T0 + 3 * HOUR)
    assert created(repo) == {fid(T0 + k * HOUR): 1 for k in range(3)}


async def test_a_takeover_fires_each_firing_once() -> None:
    repo = MemRepository(partitions=3)
    clock = ManualClock(T0 + timedelta(seconds=5))
    first = await started(repo, clock, [hourly()])
    await until_sleeping(clock, T0 + HOUR)
    second = await started(repo, clock, [hourly()])  # fences the first
    await until_sleeping(clock, T0 + HOUR)
    with pytest.raises(Fenced):
        await first.start_workflow("manual", "report", {"kind": "manual"})
    assert created(repo) == {fid(T0): 1}

    clock.advance_to(T0 + HOUR)
    await until_sleeping(clock, T0 + 2 * HOUR)
    await second.close()
    assert created(repo) == {fid(T0): 1, fid(T0 + HOUR): 1}


async def test_a_window_too_small_for_the_last_firing_forgets_it() -> None:
    """Documented: once the idempotency window no longer holds any firing of a schedule, no
    firing is known and nothing counts as missed; only an on-time firing starts."""
    repo = MemRepository(partitions=1)
    clock = ManualClock(T0)
    first = await started(repo, clock, [hourly(CatchUp.ALL(max=5))], idempotency_window=2)
    await until_sleeping(clock, T0 + HOUR)
    for n in range(2):  # two other workflows push the firing out of the window
        await first.exec_workflow(f"other-{n}", "report", {"kind": "other"})
    await first.close()

    clock.advance_to(T0 + 3 * HOUR + timedelta(minutes=10))
    second = await started(repo, clock, [hourly(CatchUp.ALL(max=5))], idempotency_window=2)
    await until_sleeping(clock, T0 + 4 * HOUR)
    assert fid(T0 + HOUR) not in created(repo)  # missed and not caught up: none known
    clock.advance_to(T0 + 4 * HOUR)
    await until_sleeping(clock, T0 + 5 * HOUR)
    await second.close()
    assert sorted(created(repo)) == sorted([fid(T0), "other-0", "other-1", fid(T0 + 4 * HOUR)])


@pytest.mark.parametrize(
    ("schedules", "match"),
    [
        ([Schedule("s", "nope", every=HOUR)], r"schedule 's': 'nope'.*unknown workflow type"),
        ([Schedule("s", "report", every=HOUR, input=42)], r"schedule 's': 'report'.*input"),
        ([hourly(), hourly()], r"schedule 'hourly'.*declared twice"),
        (["hourly"], r"expected a Schedule"),
    ],
    ids=["unknown-type", "bad-input", "twice", "not-a-schedule"],
)
async def test_bad_declarations_fail_before_anything_is_written(
    schedules: list[Schedule], match: str
) -> None:
    repo = MemRepository()
    with pytest.raises(InvalidSchedule, match=match):
        Kapbit([REPORT], repo, options=options(ManualClock(T0)), schedules=schedules)
    assert list(repo.records()) == []


async def test_cron_across_daylight_saving_time() -> None:
    berlin = Schedule(
        "nightly", "report", cron="30 2 * * *", tz="Europe/Berlin", input={"kind": "nightly"}
    )
    repo = MemRepository(partitions=2)
    # 02:30 does not exist in Berlin on 2026-03-29: it fires right after the jump, 03:00 CEST
    clock = ManualClock(datetime(2026, 3, 28, 12, tzinfo=UTC))
    kbit = await started(repo, clock, [berlin])
    jump = datetime(2026, 3, 29, 1, tzinfo=UTC)
    await until_sleeping(clock, jump)
    clock.advance_to(jump)
    await until_sleeping(clock, datetime(2026, 3, 30, 0, 30, tzinfo=UTC))
    await kbit.close()
    # 02:30 happens twice on 2026-10-25: it fires once, at the first (00:30 UTC)
    clock.advance_to(datetime(2026, 10, 24, 12, tzinfo=UTC))
    kbit = await started(repo, clock, [berlin])
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    await until_sleeping(clock, first)
    clock.advance_to(first)
    await until_sleeping(clock, datetime(2026, 10, 26, 1, 30, tzinfo=UTC))
    await kbit.close()
    assert created(repo) == {fid(jump, "nightly"): 1, fid(first, "nightly"): 1}


async def test_the_nightly_example_runs_and_fires_at_two_in_berlin() -> None:
    example = load_example("nightly_schedule")
    assert await example.main(MemRepository(partitions=2)) == "hourly sync done"

    repo = MemRepository(partitions=2)
    clock = ManualClock(datetime(2026, 11, 21, 12, 30, tzinfo=UTC))
    kbit = Kapbit(
        [example.REPORT],
        repo,
        options=options(clock),
        schedules=[example.NIGHTLY, example.HOURLY],
    )
    await kbit.start()
    await until_sleeping(clock, datetime(2026, 11, 21, 13, tzinfo=UTC))
    # 02:00 in Berlin is 01:00 UTC in winter; the hourly sync catches up its 3 newest
    night = datetime(2026, 11, 22, 1, tzinfo=UTC)
    clock.advance_to(night)
    await until_sleeping(clock, night + HOUR)
    assert await kbit.get_workflow(fid(night, "nightly-report")).result() == "nightly report done"
    await kbit.close()
    hours = [datetime(2026, 11, 21, 12, tzinfo=UTC)] + [night - k * HOUR for k in (2, 1, 0)]
    assert created(repo) == {fid(night, "nightly-report"): 1} | {
        fid(at, "hourly-sync"): 1 for at in hours
    }


# --- random restarts, crashes, takeovers and lost acknowledgements --------------------------

Op = tuple[str, int]

OPS = st.one_of(
    st.tuples(st.just("advance"), st.integers(1, 300)),  # minutes, an instance running
    st.tuples(st.just("down"), st.integers(1, 600)),  # closed for that many minutes
    st.tuples(st.just("crash"), st.integers(0, 30)),  # abort, restart that many minutes on
    st.tuples(st.just("takeover"), st.just(0)),  # a second instance claims the log
    st.tuples(st.just("lost_ack"), st.just(0)),  # the next firing's ack is lost
    # the instance crashes while appending the next firing's WorkflowCreated; 1: after it
    # landed (its acknowledgement lost), 0: before (it never lands)
    st.tuples(st.just("crash_in_append"), st.integers(0, 1)),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(OPS, min_size=1, max_size=10))
def test_random_restarts_crashes_and_takeovers_start_every_firing_once(ops: list[Op]) -> None:
    """Hourly, catching up everything: whatever happens, each firing up to the end is in
    the log exactly once (no firing lost, none twice)."""
    asyncio.run(asyncio.wait_for(_run_ops(ops), 60))


def landed(repo: MemRepository, workflow_id: str) -> bool:
    return any(r.key == workflow_id for r in repo.records())


async def _run_ops(ops: list[Op]) -> None:
    inner = MemRepository(partitions=2)
    repo = FaultyRepository(inner)
    clock = ManualClock(T0)
    schedule = [hourly(CatchUp.ALL(max=10_000))]
    stopped: list[Kapbit] = []

    async def start() -> Kapbit:
        kbit = Kapbit([REPORT], repo, options=options(clock), schedules=schedule)
        await kbit.start()
        await settled()
        return kbit

    async def settled() -> None:
        await until_sleeping(clock, schedule[0].next_after(clock.now_datetime()))

    kbit = await start()
    try:
        for op, n in ops:
            if op == "advance":
                clock.advance(n * 60)
                await settled()
            elif op == "down":
                await kbit.close()
                clock.advance(n * 60)
                kbit = await start()
            elif op == "crash":
                kbit.abort()
                clock.advance(n * 60)
                kbit = await start()
            elif op == "takeover":
                stopped.append(kbit)
                kbit = await start()
            elif op == "lost_ack":
                repo.fail(times=1, kinds="workflow_created", lost_ack=True)
            else:
                at = schedule[0].next_after(clock.now_datetime())
                if n:  # the record lands, its acknowledgement is lost, then the crash
                    fault = repo.fail(times=1, kinds="workflow_created", lost_ack=True)
                else:  # the append hangs in the storage and dies with the process
                    fault = repo.slow(times=1, kinds="workflow_created")
                clock.advance_to(at)
                await fault.wait_hits()
                if n:
                    await wait_until(functools.partial(landed, inner, fid(at)))
                kbit.abort()
                fault.release()
                kbit = await start()
        clock.advance_to(schedule[0].next_after(clock.now_datetime()))
        await settled()
    finally:
        await kbit.close()
        for old in stopped:
            await old.close()
        repo.clear()
    end = clock.now_datetime()
    expected = {fid(T0 + k * HOUR): 1 for k in range(int((end - T0) / HOUR) + 1)}
    assert created(inner) == expected


async def test_a_firing_refused_for_lack_of_a_slot_starts_once_one_is_free() -> None:
    release = asyncio.Event()

    async def hold(_input: dict[str, str], _progress: Progress) -> Success[str]:
        await release.wait()
        return Success("held")

    busy = Definition("busy", steps=[Step(hold)], input_type=dict[str, str], outcome_type=str)
    repo = MemRepository(partitions=2)
    clock = ManualClock(T0 - timedelta(minutes=5))
    kbit = Kapbit(
        [REPORT, busy], repo, options=options(clock, max_workflows=1), schedules=[hourly()]
    )
    await kbit.start()
    try:
        await until_sleeping(clock, T0)
        held = await kbit.start_workflow("busy-1", "busy", {"kind": "busy"})  # the only slot
        clock.advance_to(T0)  # TooManyWorkflows: tried again in a second
        await until_sleeping(clock, T0 + RETRY_DELAY)
        assert fid(T0) not in created(repo)
        release.set()
        assert await held.result() == ["held"]
        await wait_until(lambda: kbit.in_flight() == [])  # its slot is free
        clock.advance(RETRY_DELAY.total_seconds())
        await until_sleeping(clock, T0 + HOUR)
        assert await kbit.get_workflow(fid(T0)).result() == ["report hourly"]
    finally:
        await kbit.close()
    assert created(repo) == {"busy-1": 1, fid(T0): 1}
