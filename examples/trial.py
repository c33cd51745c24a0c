"""A free trial with durable timers, and a nightly schedule that reports on the trials.

A sign-up starts a ``trial`` workflow: it welcomes the user, sleeps 12 days, sends a
reminder, sleeps until 14 days after the sign-up and then ends the trial. A sleeping
workflow is one small entry in the instance's timer queue (no task, no thread) and its
timer is an event in the log: a restart, a takeover, or an instance that was down when the
timer expired all resume it at its next step, never running the steps before again.
Every night at 02:00 UTC the ``nightly`` schedule starts a report.

Run it with ``python examples/trial.py``: it drives the instance with a
:class:`~kapbit.testing.ManualClock`, so 15 days pass in an instant (a service passes no
clock and sleeps for real).
"""

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kapbit import (
    Definition,
    Kapbit,
    Options,
    Progress,
    Sleep,
    SleepUntil,
    Step,
    Success,
)
from kapbit.repository import MemRepository, Repository
from kapbit.schedules import CatchUp, Schedule
from kapbit.testing import ManualClock


@dataclass
class SignUp:
    email: str
    at: datetime


sent: list[str] = []  # what the mailer sent, for the demo


async def welcome(signup: SignUp, _progress: Progress) -> Sleep[str]:
    sent.append(f"welcome to {signup.email}")
    return Sleep(timedelta(days=12), value="welcomed")  # remind on day 12


async def remind(signup: SignUp, _progress: Progress) -> SleepUntil[str]:
    sent.append(f"2 days left to {signup.email}")
    return SleepUntil(signup.at + timedelta(days=14), value="reminded")  # end on day 14


async def end_trial(signup: SignUp, _progress: Progress) -> Success[str]:
    sent.append(f"trial over to {signup.email}")
    return Success("ended")


TRIAL = Definition(
    "trial",
    steps=[Step(welcome, name="welcome"), Step(remind, name="remind"), Step(end_trial, name="end")],
    result=lambda _signup, progress: progress.value("end"),
    input_type=SignUp,
    outcome_type=str,
    result_type=str,
)


def report(_job: dict[str, str], _progress: Progress) -> Success[str]:
    sent.append("nightly report")
    return Success("reported")


REPORT = Definition("report", steps=[Step(report)], input_type=dict[str, str], outcome_type=str)

# Every night at 02:00 UTC (cron needs the `schedules` extra); after an outage only the
# newest missed report runs.
NIGHTLY = Schedule("nightly", "report", cron="0 2 * * *", input={}, catch_up=CatchUp.LATEST)


async def main(log: Repository) -> str:
    clock = ManualClock(datetime(2026, 11, 21, 9, 0, tzinfo=UTC))
    options = Options(clock=clock)
    async with Kapbit([TRIAL, REPORT], log, options=options, schedules=[NIGHTLY]) as kbit:
        signup = SignUp("ada@example.com", datetime.fromtimestamp(clock.now(), UTC))
        trial = await kbit.start_workflow(TRIAL, "trial-ada", signup)
        night = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
        for _ in range(15):  # let 15 nights pass, one at a time
            clock.advance_to(night)
            night += timedelta(days=1)
            await clock.wait_for_deadline(night.timestamp())  # the scheduler waits again
        result = await trial.result()
        print(f"trial-ada: {result} after 14 days")
        print([mail for mail in sent if mail != "nightly report"])
        print(f"{sent.count('nightly report')} nightly reports")
    return result


if __name__ == "__main__":
    asyncio.run(main(MemRepository(partitions=2)))
