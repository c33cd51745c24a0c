"""Schedules: fire times (cron and interval), firing ids, catch-up policies, DST, errors."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kapbit.errors import InvalidSchedule, KapbitError
from kapbit.schedules import CatchUp, Schedule, due_firings, firing_time, last_firing
from kapbit.testing import ManualClock

BERLIN = ZoneInfo("Europe/Berlin")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def nightly(catch_up: CatchUp = CatchUp.SKIP, tz: str = "UTC") -> Schedule:
    return Schedule("nightly-report", "report", cron="0 2 * * *", catch_up=catch_up, tz=tz)


# --- fire times and ids ------------------------------------------------------------------


def test_cron_fire_times_and_ids() -> None:
    schedule = nightly()
    assert schedule.next_after(utc(2026, 11, 20, 23)) == utc(2026, 11, 21, 2)
    assert schedule.next_after(utc(2026, 11, 21, 2)) == utc(2026, 11, 22, 2)  # strictly after
    assert schedule.fire_times(utc(2026, 11, 21, 2), utc(2026, 11, 24, 2)) == [
        utc(2026, 11, 22, 2),
        utc(2026, 11, 23, 2),
        utc(2026, 11, 24, 2),
    ]
    assert schedule.workflow_id(utc(2026, 11, 21, 2)) == "nightly-report@2026-11-21T02:00:00Z"
    firing = schedule.firing(datetime(2026, 11, 21, 3, tzinfo=BERLIN))
    assert firing.workflow_id == "nightly-report@2026-11-21T02:00:00Z"
    assert firing.at == utc(2026, 11, 21, 2) and firing.schedule == "nightly-report"


def test_cron_in_a_time_zone_fires_at_local_time() -> None:
    schedule = nightly(tz="Europe/Berlin")  # 02:00 in Berlin is 01:00 UTC in winter
    assert schedule.next_after(utc(2026, 11, 20, 12)) == utc(2026, 11, 21, 1)
    assert schedule.next_after(utc(2026, 7, 1, 12)) == utc(2026, 7, 2, 0)  # summer: UTC+2


def test_cron_with_seconds_field() -> None:
    schedule = Schedule("tick", "t", cron="*/15 * * * * *")
    assert schedule.fire_times(utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 45)) == [
        utc(2026, 1, 1, 0, 0, 15),
        utc(2026, 1, 1, 0, 0, 30),
        utc(2026, 1, 1, 0, 0, 45),
    ]


def test_interval_fire_times_count_from_the_anchor_not_from_the_start() -> None:
    every = Schedule("sync", "sync", every=timedelta(minutes=15))
    assert every.next_after(utc(2026, 11, 21, 10, 7, 3)) == utc(2026, 11, 21, 10, 15)
    assert every.next_after(utc(2026, 11, 21, 10, 15)) == utc(2026, 11, 21, 10, 30)
    anchored = Schedule("sync", "sync", every=timedelta(hours=1), anchor=utc(2026, 1, 1, 0, 20))
    assert anchored.fire_times(utc(2026, 11, 21, 10), utc(2026, 11, 21, 12)) == [
        utc(2026, 11, 21, 10, 20),
        utc(2026, 11, 21, 11, 20),
    ]
    assert anchored.newest_fire_times(None, utc(2026, 1, 1, 1, 30), 5) == [
        utc(2026, 1, 1, 0, 20),
        utc(2026, 1, 1, 1, 20),
    ]


def test_firing_ids_parse_back_and_the_last_firing_is_the_newest_of_this_schedule() -> None:
    assert firing_time("nightly-report", "nightly-report@2026-11-21T02:00:00Z") == utc(
        2026, 11, 21, 2
    )
    for other in (
        "nightly-report-2@2026-11-21T02:00:00Z",  # another schedule sharing the prefix
        "nightly-report@2026-13-21T02:00:00Z",  # not a date
        "nightly-report@yesterday",
        "order-17",
    ):
        assert firing_time("nightly-report", other) is None
    window_ids = [  # every partition's idempotency window, in any order
        "order-1",
        "nightly-report@2026-11-19T02:00:00Z",
        "nightly-report@2026-11-21T02:00:00Z",
        "nightly-report-2@2026-11-25T02:00:00Z",
        "nightly-report@2026-11-20T02:00:00Z",
    ]
    assert last_firing("nightly-report", window_ids) == utc(2026, 11, 21, 2)
    assert last_firing("nightly-report", ["order-1"]) is None


# --- catch-up after downtime ---------------------------------------------------------------

LAST = utc(2026, 11, 17, 2)  # fired on the 17th; down until the 21st, 02:30
BACK = utc(2026, 11, 21, 2, 30)


def test_skip_starts_nothing_that_was_missed() -> None:
    assert nightly(CatchUp.SKIP).due_firings(LAST, BACK) == []


def test_skip_starts_the_on_time_firing() -> None:
    firings = nightly(CatchUp.SKIP).due_firings(LAST, utc(2026, 11, 21, 2, 0, 30))
    assert [f.workflow_id for f in firings] == ["nightly-report@2026-11-21T02:00:00Z"]


def test_latest_starts_only_the_newest_missed_firing() -> None:
    firings = nightly(CatchUp.LATEST).due_firings(LAST, BACK)
    assert [f.at for f in firings] == [utc(2026, 11, 21, 2)]


def test_all_starts_every_missed_firing_oldest_first() -> None:
    firings = due_firings(nightly(CatchUp.ALL(max=10)), LAST, BACK)
    assert [f.at for f in firings] == [utc(2026, 11, d, 2) for d in (18, 19, 20, 21)]


def test_all_is_bounded_to_the_newest_max() -> None:
    firings = nightly(CatchUp.ALL(max=2)).due_firings(LAST, BACK)
    assert [f.at for f in firings] == [utc(2026, 11, 20, 2), utc(2026, 11, 21, 2)]


def test_all_after_a_year_down_with_a_minutely_cron_does_bounded_work() -> None:
    schedule = Schedule("minutely", "m", cron="* * * * *", catch_up=CatchUp.ALL(max=3))
    firings = schedule.due_firings(utc(2025, 11, 21), utc(2026, 11, 21, 12, 0, 30))
    expected = [utc(2026, 11, 21, 11, 58), utc(2026, 11, 21, 11, 59), utc(2026, 11, 21, 12)]
    assert [f.at for f in firings] == expected


@pytest.mark.parametrize("policy", [CatchUp.SKIP, CatchUp.LATEST, CatchUp.ALL(max=5)])
def test_nothing_is_due_twice_and_nothing_before_the_first_known(policy: CatchUp) -> None:
    schedule = nightly(policy)
    assert schedule.due_firings(utc(2026, 11, 21, 2), BACK) == []  # already fired
    # No firing known (new schedule, or evicted from the window): nothing counts as missed.
    assert schedule.due_firings(None, BACK) == []
    on_time = schedule.due_firings(None, utc(2026, 11, 21, 2, 0, 59))
    assert [f.at for f in on_time] == [utc(2026, 11, 21, 2)]


@pytest.mark.parametrize("policy", [CatchUp.SKIP, CatchUp.LATEST, CatchUp.ALL(max=3)])
def test_a_running_scheduler_fires_each_time_exactly_once(policy: CatchUp) -> None:
    """The loop the engine will run: sleep to the next fire time, start what is due, and
    learn the last firing back from the ids it started (as from the idempotency window)."""
    clock = ManualClock(utc(2026, 11, 20, 23))
    schedule = Schedule("sync", "sync", every=timedelta(hours=1), catch_up=policy)
    started: list[str] = []
    for _ in range(30):
        clock.advance_to(schedule.next_after(clock.now_datetime()))
        last = last_firing("sync", started)
        started += [f.workflow_id for f in schedule.due_firings(last, clock.now_datetime())]
    assert len(started) == 30 == len(set(started))
    assert started[0] == "sync@2026-11-21T00:00:00Z"
    assert started[-1] == "sync@2026-11-22T05:00:00Z"


# --- daylight saving time (Europe/Berlin: 2026-03-29 02:00 -> 03:00, 2026-10-25 03:00 -> 02:00)


def test_a_firing_in_the_skipped_hour_runs_right_after_the_jump() -> None:
    schedule = Schedule("dst", "d", cron="30 2 * * *", tz="Europe/Berlin")
    times = schedule.fire_times(utc(2026, 3, 27), utc(2026, 3, 31))
    local = [t.astimezone(BERLIN).strftime("%m-%d %H:%M") for t in times]
    assert local == ["03-27 02:30", "03-28 02:30", "03-29 03:00", "03-30 02:30"]


def test_a_firing_in_the_repeated_hour_runs_once_at_its_first_occurrence() -> None:
    schedule = Schedule("dst", "d", cron="30 2 * * *", tz="Europe/Berlin")
    times = schedule.fire_times(utc(2026, 10, 24), utc(2026, 10, 27))
    assert times == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    assert len({schedule.workflow_id(t) for t in times}) == 3


def test_an_hourly_cron_fires_on_real_time_through_the_repeated_hour() -> None:
    schedule = Schedule("hourly", "h", cron="0 * * * *", tz="Europe/Berlin")
    times = schedule.fire_times(utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2))
    local = [t.astimezone(BERLIN).strftime("%H:%M%z") for t in times]
    assert local == ["02:00+0200", "02:00+0100", "03:00+0100"]
    assert len({schedule.workflow_id(t) for t in times}) == 3


def test_catch_up_across_the_dst_gap_counts_the_moved_firing() -> None:
    schedule = Schedule("dst", "d", cron="30 2 * * *", tz="Europe/Berlin", catch_up=CatchUp.ALL(9))
    firings = schedule.due_firings(utc(2026, 3, 28, 1, 30), utc(2026, 3, 30, 12))
    ids = [f.workflow_id for f in firings]
    assert ids == ["dst@2026-03-29T01:00:00Z", "dst@2026-03-30T00:30:00Z"]


@settings(max_examples=60, deadline=None)
@given(
    start=st.datetimes(min_value=datetime(2026, 3, 20), max_value=datetime(2026, 11, 5)),
    span_hours=st.integers(min_value=0, max_value=24 * 9),
    n=st.integers(min_value=1, max_value=6),
    cron=st.sampled_from(["30 2 * * *", "0 */5 * * *", "15 1-3 * * 0,3", "*/20 2 * * *"]),
)
def test_the_newest_n_are_the_tail_of_the_forward_sequence(
    start: datetime, span_hours: int, n: int, cron: str
) -> None:
    schedule = Schedule("p", "p", cron=cron, tz="Europe/Berlin")
    after = start.replace(tzinfo=UTC)
    until = after + timedelta(hours=span_hours)
    assert schedule.newest_fire_times(after, until, n) == schedule.fire_times(after, until)[-n:]


# --- bad schedules -------------------------------------------------------------------------


@pytest.mark.parametrize("expression", ["61 * * * *", "0 2 * *", "0 2 31 2 *", "every day"])
def test_a_bad_cron_expression_is_a_typed_error_naming_it(expression: str) -> None:
    with pytest.raises(InvalidSchedule) as raised:
        Schedule("nightly", "report", cron=expression)
    assert raised.value.expression == expression
    assert raised.value.schedule == "nightly"
    assert repr(expression) in str(raised.value)
    assert isinstance(raised.value, KapbitError)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"name": "a@b", "cron": "* * * * *"}, "a@b"),
        ({"name": "", "cron": "* * * * *"}, ""),
        ({"workflow": "", "cron": "* * * * *"}, ""),
        ({}, "cron=None, every=None"),
        ({"cron": "* * * * *", "every": timedelta(minutes=1)}, "cron='* * * * *'"),
        ({"every": timedelta(milliseconds=1500)}, "0:00:01.500000"),
        ({"every": timedelta(0)}, "0:00:00"),
        ({"every": 60}, "60"),
        ({"every": timedelta(hours=1), "anchor": datetime(2026, 1, 1)}, "2026"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus"}, "Mars/Olympus"),
        ({"cron": "* * * * *", "catch_up": "all"}, "'all'"),
        ({"cron": "* * * * *", "grace": timedelta(seconds=-1)}, "-1 day"),
    ],
)
def test_bad_fields_are_typed_errors_naming_the_value(
    fields: dict[str, object], named: str
) -> None:
    arguments: dict[str, object] = {"name": "s", "workflow": "w", **fields}
    with pytest.raises(InvalidSchedule) as raised:
        Schedule(**arguments)  # type: ignore[arg-type]
    assert named in raised.value.expression


def test_catch_up_all_needs_a_positive_bound() -> None:
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="at least 1"):
            CatchUp.ALL(max=bad)  # type: ignore[arg-type]
    assert CatchUp.ALL(max=3) == CatchUp("all", 3)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        nightly().next_after(datetime(2026, 11, 21))


def test_without_the_extra_cron_schedules_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cronsim", None)  # import cronsim now raises ImportError
    with pytest.raises(ImportError, match=r"kapbit\[schedules\]"):
        nightly()
    assert Schedule("sync", "s", every=timedelta(hours=1)).next_after(utc(2026, 1, 1)) == utc(
        2026, 1, 1, 1
    )
