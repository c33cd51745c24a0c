"""Throughput of 1, 2 and 4 kapbit processes on the same broker, in the same run.

Each process is a full instance driving the order saga (``_common.SAGA``, 5 events per
workflow) with ``--in-flight`` calls at a time. The processes get ready (joined and owning
their partitions), then start together on a signal from this script; each reports its
workflows, its wall-clock start and end and the CPU seconds it used meanwhile. The table
gives, per process count: workflows/s of all processes together (total workflows over the
time from the first start to the last end), CPU seconds per 1,000 workflows (the kapbit
processes, and the broker's separately when this script started it) and the per-process
efficiency: the rate per process divided by the rate of one process alone. On a machine
with fewer cores than processes + broker the total cannot grow; the efficiency and the CPU
per workflow are what carry to a larger machine.

Modes: ``group`` puts every process in one consumer group on one topic (the engine's group
mode; each process calls ids of the partitions it owns). ``bundles`` gives each process a
topic of its own, the way to scale without group mode: the ceiling group mode is held to.

Each process count runs ``--repeat`` times, interleaved; the table shows the median run
(by rate). Run as ``python benchmarks/bench_group.py [--mode bundles] [--processes 1 2 4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from _common import EVENTS_PER_WORKFLOW, SAGA, machine, machine_line, order

from kapbit import GroupOptions, Kapbit, Options
from kapbit.partitioner import partition_for
from kapbit.repository.kafka import KafkaRepository
from kapbit.testing import LocalBroker

EVENTS = EVENTS_PER_WORKFLOW["ok"]
_HERE = Path(__file__).resolve()
_TICKS = os.sysconf("SC_CLK_TCK")


# --- one process ----------------------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _group_instance(args: argparse.Namespace, repository: KafkaRepository) -> Kapbit:
    """A member of consumer group ``args.group`` on the shared topic."""
    options = Options(max_workflows=args.in_flight + 10)
    group = GroupOptions(name=args.group, endpoint=args.label, session_timeout=args.session)
    return Kapbit([SAGA], repository, options=options, group=group)


def _owned(kbit: Kapbit) -> frozenset[int]:
    """The partitions ``kbit`` owns (every one outside group mode)."""
    return kbit.owned_partitions


async def _worker(args: argparse.Namespace) -> None:
    repository = KafkaRepository(args.bootstrap, args.topic, partitions=args.partitions)
    if args.group:
        kbit = _group_instance(args, repository)
    else:
        options = Options(max_workflows=args.in_flight + 10)
        kbit = Kapbit([SAGA], repository, options=options)
    async with kbit:
        print(f"ready {','.join(map(str, sorted(_owned(kbit))))}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        owned = _owned(kbit)
        ids = (f"{args.label}-{i}" for i in range(sys.maxsize))
        mine = (wid for wid in ids if partition_for(wid, args.partitions) in owned)
        failed = 0
        left = args.workflows

        async def run() -> None:
            nonlocal failed, left
            while left > 0:
                left -= 1
                wid = next(mine)
                try:
                    await kbit.exec_workflow(wid, "order", order(0, "ok", wid))
                except Exception as exc:
                    failed += 1
                    if failed <= 3:
                        print(f"workflow {wid} failed: {exc!r}", file=sys.stderr)

        cpu, started = _cpu_seconds(), time.time()
        await asyncio.gather(*(run() for _ in range(min(args.in_flight, args.workflows))))
        ended, cpu = time.time(), _cpu_seconds() - cpu
        report = {
            "workflows": args.workflows - failed,
            "failed": failed,
            "started": started,
            "ended": ended,
            "cpu": cpu,
        }
        print(f"done {json.dumps(report)}", flush=True)


# --- the coordinator ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    processes: int
    workflows: int
    elapsed: float
    cpu: float
    broker_cpu: float | None

    @property
    def rate(self) -> float:
        return self.workflows / self.elapsed


def _process_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used, from ``/proc``."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def _spawn(
    args: argparse.Namespace, bootstrap: str, topic: str, label: str, group: str
) -> asyncio.subprocess.Process:
    command = [
        sys.executable,
        str(_HERE),
        "--worker",
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--label",
        label,
        "--partitions",
        str(args.partitions),
        "--workflows",
        str(args.workflows),
        "--in-flight",
        str(args.in_flight),
    ]
    if group:
        command += ["--group", group, "--session", str(args.session)]
    return await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )


async def _line(process: asyncio.subprocess.Process, prefix: str, timeout: float) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while raw := await process.stdout.readline():
            line = raw.decode().strip()
            if line.startswith(prefix):
                return line
    raise RuntimeError(f"worker {process.pid} exited without {prefix!r}")


async def measure(
    args: argparse.Namespace, bootstrap: str, broker_pid: int | None, count: int
) -> Row:
    """One run of ``count`` processes; each runs ``args.workflows`` workflows."""
    run = uuid.uuid4().hex[:8]
    group = f"bench-group-{run}" if args.mode == "group" else ""
    topics = [f"bench-group-{run}" if group else f"bench-group-{run}-{i}" for i in range(count)]
    if group:  # create the shared topic once, before the members join
        repository = KafkaRepository(bootstrap, topics[0], partitions=args.partitions)
        await repository.start()
        await repository.close()
    processes = [
        await _spawn(args, bootstrap, topic, f"p{i}", group) for i, topic in enumerate(topics)
    ]
    try:
        readies = [await _line(p, "ready", 120) for p in processes]
        owned = [set(line.split()[1].split(",")) - {""} for line in readies]
        if group and sum(map(len, owned)) != args.partitions:
            raise RuntimeError(f"the group did not settle: {readies}")
        broker_before = _process_cpu(broker_pid)
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        reports = [json.loads((await _line(p, "done", 600)).split(" ", 1)[1]) for p in processes]
        broker_after = _process_cpu(broker_pid)
    finally:
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
        await asyncio.gather(*(p.wait() for p in processes))
    failed = sum(r["failed"] for r in reports)
    if failed:
        raise RuntimeError(f"{failed} workflows failed with {count} processes")
    elapsed = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    broker = (
        broker_after - broker_before
        if broker_before is not None and broker_after is not None
        else None
    )
    return Row(
        count, sum(r["workflows"] for r in reports), elapsed, sum(r["cpu"] for r in reports), broker
    )


def table(rows: list[Row]) -> str:
    one = next((row.rate for row in rows if row.processes == 1), None)
    lines = [
        f"{'processes':>9} {'workflows':>9} {'wf/s':>8} {'kapbit CPU s/1k wf':>18} "
        f"{'broker CPU s/1k wf':>18} {'per-process efficiency':>22}"
    ]
    for row in rows:
        broker = (
            f"{row.broker_cpu / row.workflows * 1000:.3f}" if row.broker_cpu is not None else "n/a"
        )
        efficiency = f"{row.rate / row.processes / one:.0%}" if one else "n/a"
        lines.append(
            f"{row.processes:9d} {row.workflows:9,d} {row.rate:8,.0f} "
            f"{row.cpu / row.workflows * 1000:18.3f} {broker:>18} {efficiency:>22}"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    runs: dict[int, list[Row]] = {count: [] for count in args.processes}

    async def measure_all(bootstrap: str, broker_pid: int | None) -> None:
        for _ in range(args.repeat):  # interleaved, so a busy moment hits every count alike
            for count in args.processes:
                runs[count].append(await measure(args, bootstrap, broker_pid, count))

    if args.bootstrap:
        await measure_all(args.bootstrap, None)
    else:
        async with LocalBroker() as broker:
            await measure_all(broker.bootstrap_servers, broker.pid)
    rows = [sorted(done, key=lambda row: row.rate)[len(done) // 2] for done in runs.values()]
    print(machine_line(machine()))
    where = args.bootstrap or "one local tansu broker for every run"
    print(
        f"broker: {where}; mode {args.mode}; {args.partitions} partitions; order saga, "
        f"{EVENTS} events per workflow; {args.workflows:,} workflows and {args.in_flight:,} "
        f"in flight per process; the median of {args.repeat} runs each"
    )
    for count, done in runs.items():
        print(f"{count} processes, each run (wf/s): {', '.join(f'{r.rate:,.0f}' for r in done)}")
    print(table(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("group", "bundles"), default="group")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3, help="runs per process count")
    parser.add_argument("--bootstrap", default=os.environ.get("KAPBIT_TEST_BOOTSTRAP"))
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--workflows", type=int, default=10_000, help="per process")
    parser.add_argument("--in-flight", type=int, default=1_000, help="per process")
    parser.add_argument("--session", type=float, default=6.0, help="group session timeout, s")
    # Internal: run as one of the measured processes.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    asyncio.run(_worker(parsed) if parsed.worker else main(parsed))
