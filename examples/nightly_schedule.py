"""Schedules: a nightly report at 02:00 Berlin time and an hourly sync, each started once
per firing by whichever instance runs, also across restarts and takeovers.

Run it with ``python examples/nightly_schedule.py``: the hourly sync of the current hour is
on time (its grace is an hour), so the instance starts it at once; the script waits for
that firing's result and prints when the next nightly report fires.
"""

import asyncio
from datetime import UTC, datetime, timedelta

from kapbit import Definition, Kapbit, Progress, Step, Success
from kapbit.repository import MemRepository, Repository
from kapbit.schedules import CatchUp, Schedule


def build(job: dict[str, str], _progress: Progress) -> Success[str]:
    return Success(f"{job['kind']} done")


REPORT = Definition(
    "report",
    steps=[Step(build)],
    result=lambda _job, progress: progress.value(0),
    input_type=dict[str, str],
    outcome_type=str,
    result_type=str,
)

# Every night at 02:00 in Berlin (cron needs the `schedules` extra); after a night without
# any instance running, only the newest missed report runs.
NIGHTLY = Schedule(
    "nightly-report",
    "report",
    cron="0 2 * * *",
    tz="Europe/Berlin",
    input={"kind": "nightly report"},
    catch_up=CatchUp.LATEST,
)
# On the hour, counted in UTC from the epoch; a firing up to an hour late still starts, and
# after an outage the 3 newest missed ones run, oldest first.
HOURLY = Schedule(
    "hourly-sync",
    "report",
    every=timedelta(hours=1),
    grace=timedelta(hours=1),
    input={"kind": "hourly sync"},
    catch_up=CatchUp.ALL(max=3),
)


async def main(log: Repository) -> str:
    async with Kapbit([REPORT], log, schedules=[NIGHTLY, HOURLY]) as kbit:
        now = datetime.now(UTC)
        # this hour's firing: its id is the schedule's name and its UTC fire time
        firing = HOURLY.due_firings(None, now)[0]
        # attach: wait for the firing the scheduler starts (or start it under its id)
        result: str = await kbit.exec_workflow(
            REPORT, firing.workflow_id, HOURLY.input, on_duplicate="attach"
        )
        print(f"{firing.workflow_id}: {result}")
        print(f"next nightly report: {NIGHTLY.workflow_id(NIGHTLY.next_after(now))}")
    return result


if __name__ == "__main__":
    asyncio.run(main(MemRepository(partitions=2)))
