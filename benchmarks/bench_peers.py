"""kapbit against its peers on one workload: a 3-step order saga with a small payload.

Systems:

- ``kapbit-mem``    kapbit on the in-memory repository (nothing durable: the engine alone);
- ``kapbit-kafka``  kapbit on Kafka (a local test broker started here, or ``--bootstrap``);
- ``dbos-sqlite``   DBOS Transact on SQLite (a fresh file in a temporary directory);
- ``dbos-postgres`` DBOS Transact on PostgreSQL, when ``--postgres URL`` (or
  ``KAPBIT_BENCH_POSTGRES``) names a scratch database it may create tables in;
- ``aiokafka-raw``  the ceiling for kapbit-kafka: a raw aiokafka producer writing the same
  events per workflow (5, or 7 when compensating), each awaited before the next, as a
  workflow has to. It uses plain ``send()`` per event, while kapbit hands concurrent
  appends to aiokafka's batch API per partition, so with many in flight kapbit can come
  close to or pass this naive ceiling.

Each runs two scenarios (``ok``; ``compensate``: step 3 fails, 2 compensations) in two
modes (one workflow at a time; ``--in-flight`` concurrent, 1,000 by default). Every
(system, scenario, mode) runs in its own subprocess (this script with ``--system``), so
the peak RSS is that of one system's client process; broker and database servers are
not included. The results go to a table on stdout, ``peers.csv`` (with the version and
durability of each system per row), ``peers.meta.json`` (machine, sizes, broker) and
``peers.png`` in ``--out``. The peer packages come with kapbit's ``bench`` extra
(``pip install -e '.[bench]'``); a peer that cannot run is reported, not fatal.

Usage::

    python benchmarks/bench_peers.py                  # full sizes: ~15 min on 2 cores
    python benchmarks/bench_peers.py --quick          # small sizes, a smoke run
    python benchmarks/bench_peers.py --systems kapbit-mem,dbos-sqlite --workflows 2000
    python benchmarks/bench_peers.py --postgres postgresql://user@host:5432/scratch
    python benchmarks/bench_peers.py --replot         # redraw peers.png from peers.csv

On PostgreSQL, ``?options=-csynchronous_commit%3Doff`` in the URL gives DBOS commits that
do not wait for the disk, closer to what the memory-only test broker offers kapbit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import importlib.metadata
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    EVENTS_PER_WORKFLOW,
    EXPECTED_RESULT,
    SAGA,
    SCENARIOS,
    RunStats,
    drive,
    machine,
    machine_line,
    order,
    peak_rss_mib,
    process_peak_rss_mib,
)

SYSTEMS = ("kapbit-mem", "kapbit-kafka", "dbos-sqlite", "dbos-postgres", "aiokafka-raw")
KAFKA_SYSTEMS = ("kapbit-kafka", "aiokafka-raw")
POSTGRES_ENV = "KAPBIT_BENCH_POSTGRES"
RESULT_MARK = "BENCH-RESULT "
RESULTS = Path(__file__).resolve().parent / "results"
#: Sequential runs are preceded by this many unmeasured workflows (imports, connections).
WARMUP = 50


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class Unavailable(Exception):
    """The system cannot run here (package missing, server unreachable)."""


@dataclass
class Measured:
    """What a child reports besides the run itself."""

    version: str
    durability: str


# --- the systems (child side) ----------------------------------------------------------------


async def _measure(
    run_one: Callable[[int], Awaitable[str]], scenario: str, count: int, in_flight: int
) -> RunStats:
    """Warm up, then measure; a workflow with the wrong result counts as an error."""
    expected = EXPECTED_RESULT[scenario]

    async def checked(index: int) -> None:
        result = await run_one(index)
        if result != expected:
            raise AssertionError(f"expected {expected!r}, got {result!r}")

    async def warm(index: int) -> None:
        await checked(count + index)

    await drive(warm, min(WARMUP, count), 1)
    return await drive(checked, count, in_flight)


async def _kapbit_run(args: argparse.Namespace, scenario: str, repository: Any) -> RunStats:
    """The saga's runs on an instance of ``repository``, as every kapbit row measures them."""
    from kapbit import Kapbit, Options

    options = Options(max_workflows=args.in_flight + 10)
    async with Kapbit([SAGA], repository, options=options) as kbit:
        return await _measure(
            lambda i: kbit.exec_workflow(f"w-{i}", "order", order(i, scenario)),
            scenario,
            args.count,
            args.in_flight_run,
        )


async def kapbit_mem(args: argparse.Namespace, scenario: str) -> tuple[RunStats, Measured]:
    from kapbit import __version__
    from kapbit.repository import MemRepository

    stats = await _kapbit_run(args, scenario, MemRepository(partitions=args.partitions))
    return stats, Measured(
        f"kapbit {__version__}", "in-memory log: nothing durable (process memory only)"
    )


async def kapbit_kafka(args: argparse.Namespace, scenario: str) -> tuple[RunStats, Measured]:
    from kapbit import __version__
    from kapbit.repository.kafka import KafkaRepository

    topic = f"bench-peers-{uuid.uuid4().hex[:10]}"
    repository = KafkaRepository(args.bootstrap, topic, partitions=args.partitions)
    stats = await _kapbit_run(args, scenario, repository)
    return stats, Measured(
        f"kapbit {__version__}, aiokafka {_version('aiokafka')}",
        f"every event acked by the broker (acks=all) before the workflow goes on; {args.broker}",
    )


async def aiokafka_raw(args: argparse.Namespace, scenario: str) -> tuple[RunStats, Measured]:
    """A workflow's worth of events, each sent and awaited in turn: no engine at all."""
    from aiokafka import AIOKafkaProducer

    from kapbit.repository.kafka import KafkaRepository

    topic = f"bench-raw-{uuid.uuid4().hex[:10]}"
    creator = KafkaRepository(args.bootstrap, topic, partitions=args.partitions)
    await creator.start()  # creates the topic like kapbit's
    await creator.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=False, linger_ms=0
    )
    await producer.start()
    events = EVENTS_PER_WORKFLOW[scenario]
    value = b"x" * 150  # about the size of a kapbit event in JSON
    headers = [("kapbit-kind", b"step_outcome"), ("kapbit-node", b"bench")]
    result = EXPECTED_RESULT[scenario]

    async def workflow(index: int) -> str:
        key = f"w-{index}".encode()
        for _ in range(events):
            await (await producer.send(topic, value, key=key, headers=headers))
        return result

    try:
        stats = await _measure(workflow, scenario, args.count, args.in_flight_run)
    finally:
        await producer.stop()
    return stats, Measured(
        f"aiokafka {_version('aiokafka')}",
        f"acks=all, 5 events per workflow (7 compensating), each awaited before the next; "
        f"{args.broker}",
    )


async def dbos(args: argparse.Namespace, scenario: str) -> tuple[RunStats, Measured]:
    try:
        from dbos import DBOS, SetWorkflowID
    except ImportError as exc:
        raise Unavailable(f"dbos is not installed ({exc}); pip install -e '.[bench]'") from exc
    workdir: str | None = None
    if args.system == "dbos-sqlite":
        workdir = tempfile.mkdtemp(prefix="kapbit-bench-dbos-")
        url = f"sqlite:///{workdir}/dbos.sqlite3"
    else:
        url = args.postgres
    import _dbos_saga

    DBOS(config={"name": "kapbit-bench", "system_database_url": url, "log_level": "WARNING"})
    try:
        try:
            DBOS.launch()  # creates the system database and its tables when missing
        except Exception as exc:
            raise Unavailable(f"DBOS cannot start on {args.system}: {exc}") from exc
        if workdir is None:
            database, durability = _postgres_durability(url)
        run = uuid.uuid4().hex[:8]

        async def one(index: int) -> str:
            with SetWorkflowID(f"{run}-{index}"):
                return await _dbos_saga.order_saga(order(index, scenario))

        stats = await _measure(one, scenario, args.count, args.in_flight_run)
    finally:
        DBOS.destroy(destroy_registry=True)
        if workdir is not None:
            with contextlib.suppress(sqlite3.Error):
                database, durability = _sqlite_durability(f"{workdir}/dbos.sqlite3")
            shutil.rmtree(workdir, ignore_errors=True)
    return stats, Measured(f"dbos {_version('dbos')}, {database}", durability)


def _sqlite_durability(path: str) -> tuple[str, str]:
    """``(database version, durability)``. DBOS sets only busy_timeout and foreign_keys on
    its SQLite connections, so a fresh connection to its file shows what its connections use.
    """
    with contextlib.closing(sqlite3.connect(path)) as connection:
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = connection.execute("PRAGMA synchronous").fetchone()[0]
    sync_name = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(synchronous, str(synchronous))
    waits = "is fsynced" if synchronous >= 1 else "is not fsynced"
    return (
        f"SQLite {sqlite3.sqlite_version}",
        f"SQLite journal_mode={journal}, synchronous={sync_name} (SQLite defaults, DBOS sets "
        f"neither): every commit (workflow status, each step's output) {waits}; "
        f"file on {_filesystem(path)}",
    )


def _postgres_durability(url: str) -> tuple[str, str]:
    """``(server version, durability)``; DBOS leaves these settings to the server."""
    try:
        import sqlalchemy as sa
    except ImportError as exc:
        raise Unavailable(f"sqlalchemy is not installed ({exc})") from exc
    try:
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg"))
        names = ("server_version", "synchronous_commit", "fsync", "wal_sync_method")
        try:
            with engine.connect() as connection:
                shown = {n: str(connection.execute(sa.text(f"SHOW {n}")).scalar()) for n in names}
        finally:
            engine.dispose()
    except Exception as exc:
        raise Unavailable(f"PostgreSQL not reachable: {type(exc).__name__}: {exc}") from exc
    durable = shown["synchronous_commit"] != "off" and shown["fsync"] == "on"
    waits = "every step waits for its WAL flush" if durable else "commits do not wait for disk"
    return (
        f"PostgreSQL {shown['server_version'].split()[0]}",
        f"PostgreSQL synchronous_commit={shown['synchronous_commit']}, fsync={shown['fsync']}, "
        f"wal_sync_method={shown['wal_sync_method']} (as DBOS's connections see them; DBOS "
        f"sets none): {waits}",
    )


def _filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (tmpfs would make fsync free)."""
    best, kind = "", "unknown filesystem"
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        real = os.path.realpath(path)
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and real.startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def _one_line(text: str) -> str:
    return " ".join(text.strip().splitlines()[:1])[:300]


RUNNERS: dict[
    str, Callable[[argparse.Namespace, str], Coroutine[Any, Any, tuple[RunStats, Measured]]]
] = {
    "kapbit-mem": kapbit_mem,
    "kapbit-kafka": kapbit_kafka,
    "dbos-sqlite": dbos,
    "dbos-postgres": dbos,
    "aiokafka-raw": aiokafka_raw,
}


def child(args: argparse.Namespace) -> None:
    """Run one (system, scenario, mode) and print its result as one JSON line."""
    report: dict[str, Any] = {
        "system": args.system,
        "scenario": args.scenario,
        "in_flight": args.in_flight_run,
        "workflows": args.count,
    }
    try:
        stats, measured = asyncio.run(RUNNERS[args.system](args, args.scenario))
    except Unavailable as exc:
        report.update(status="unavailable", reason=_one_line(str(exc)))
    except Exception as exc:
        report.update(status="failed", reason=_one_line(f"{type(exc).__name__}: {exc}"))
    else:
        report.update(
            status="ok" if not stats.errors else f"{stats.errors} errors",
            version=measured.version,
            durability=measured.durability,
            rate=stats.rate,
            p50_ms=stats.percentile(0.5) * 1e3,
            p99_ms=stats.percentile(0.99) * 1e3,
            errors=stats.errors,
        )
        report["peak_rss_mib"] = peak_rss_mib()
    print(RESULT_MARK + json.dumps(report), flush=True)


# --- the parent: run every system, print, write CSV / JSON / PNG -----------------------------


def _run_child(
    args: argparse.Namespace, system: str, scenario: str, count: int, in_flight: int
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--system",
        system,
        "--scenario",
        scenario,
        "--count",
        str(count),
        "--in-flight-run",
        str(in_flight),
        "--in-flight",
        str(args.in_flight),
        "--partitions",
        str(args.partitions),
        "--broker",
        args.broker,
    ]
    if args.bootstrap:
        command += ["--bootstrap", args.bootstrap]
    if args.postgres:
        command += ["--postgres", args.postgres]
    row: dict[str, Any] = {
        "system": system,
        "scenario": scenario,
        "in_flight": in_flight,
        "workflows": count,
    }
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "reason": f"timed out after {args.timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            reported: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return reported
    tail = " / ".join(done.stderr.strip().splitlines()[-3:])
    return {**row, "status": "failed", "reason": f"exit code {done.returncode}: {tail}"}


def _mode(in_flight: int) -> str:
    return "sequential" if in_flight == 1 else f"{in_flight:,} in flight"


def _number(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else ""


def _print_table(rows: list[dict[str, Any]], header: list[str]) -> None:
    for line in header:
        print(line)
    print(
        f"{'system':14} {'scenario':10} {'mode':16} {'workflows':>9} {'wf/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'peak RSS MiB':>12}  status"
    )
    for row in rows:
        print(
            f"{row['system']:14} {row['scenario']:10} {_mode(row['in_flight']):16} "
            f"{row['workflows']:9,} {_number(row.get('rate'), 0):>9} "
            f"{_number(row.get('p50_ms'), 2):>8} {_number(row.get('p99_ms'), 2):>8} "
            f"{_number(row.get('peak_rss_mib'), 1):>12}  {row['status']}"
            + (f": {row['reason']}" if row.get("reason") else "")
        )
    print("versions and durability (what a workflow waits for before it goes on):")
    seen: set[str] = set()
    for row in rows:
        if row["system"] not in seen and row.get("durability"):
            seen.add(row["system"])
            print(f"  {row['system']:14} {row['version']}: {row['durability']}")


CSV_FIELDS = (
    "system",
    "version",
    "scenario",
    "mode",
    "in_flight",
    "workflows",
    "workflows_per_s",
    "p50_ms",
    "p99_ms",
    "peak_rss_mib",
    "status",
    "durability",
)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
            writer.writerow(
                {
                    "system": row["system"],
                    "version": row.get("version", ""),
                    "scenario": row["scenario"],
                    "mode": _mode(row["in_flight"]),
                    "in_flight": row["in_flight"],
                    "workflows": row["workflows"],
                    "workflows_per_s": _round(row.get("rate"), 1),
                    "p50_ms": _round(row.get("p50_ms"), 3),
                    "p99_ms": _round(row.get("p99_ms"), 3),
                    "peak_rss_mib": _round(row.get("peak_rss_mib"), 1),
                    "status": status,
                    "durability": row.get("durability", ""),
                }
            )


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, int | float) else ""


def _plot(path: Path, rows: list[dict[str, Any]], caption: list[str]) -> str:
    """Draw workflows/s and p99 latency per system; returns what happened, for the log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    measured = [r for r in rows if isinstance(r.get("rate"), int | float) and r["rate"] > 0]
    if not measured:
        return "no plot: nothing was measured"
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in measured)]
    series = sorted(
        {(r["scenario"], r["in_flight"]) for r in measured},
        key=lambda k: (SCENARIOS.index(k[0]), k[1]),
    )
    lines = [wrapped for line in caption for wrapped in textwrap.wrap(line, 200)]
    chart_height = 0.75 * len(systems) + 1.6
    caption_height = 0.13 * len(lines) + 0.2
    figure, (rates, p99s) = plt.subplots(
        1, 2, figsize=(12, chart_height + caption_height), sharey=True
    )
    height = 0.8 / len(series)
    for n, (scenario, in_flight) in enumerate(series):
        found = {
            r["system"]: r
            for r in measured
            if (r["scenario"], r["in_flight"]) == (scenario, in_flight)
        }
        positions = [
            i + (n - (len(series) - 1) / 2) * height
            for i, system in enumerate(systems)
            if system in found
        ]
        shown = [found[system] for system in systems if system in found]
        label = f"{scenario}, {_mode(in_flight)}"
        bars = rates.barh(positions, [r["rate"] for r in shown], height, label=label)
        rates.bar_label(bars, [f"{r['rate']:,.0f}" for r in shown], padding=2, fontsize=6)
        bars = p99s.barh(positions, [r["p99_ms"] for r in shown], height, label=label)
        p99s.bar_label(bars, [f"{r['p99_ms']:,.1f}" for r in shown], padding=2, fontsize=6)
    for axes, title in (
        (rates, "workflows/s (log scale; more is better)"),
        (p99s, "p99 latency in ms (log scale; less is better)"),
    ):
        axes.set_xscale("log")
        axes.margins(x=0.15)
        axes.set_title(title, fontsize=10)
        axes.grid(axis="x", which="major", alpha=0.3)
    rates.set_yticks(range(len(systems)), systems)
    rates.invert_yaxis()
    handles, labels = rates.get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(series),
        fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.38 / (chart_height + caption_height)),
    )
    figure.suptitle("3-step order saga; compensate: step 3 fails, 2 compensations", y=0.995)
    figure.text(0.01, 0.01, "\n".join(lines), fontsize=6.5, va="bottom", family="monospace")
    total = chart_height + caption_height
    figure.subplots_adjust(
        left=0.1,
        right=0.98,
        wspace=0.08,
        top=1 - 1.05 / total,
        bottom=(caption_height + 0.35) / total,
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot written to {path}"


def _tansu_version(find: Callable[[], str]) -> str:
    try:
        done = subprocess.run([find(), "--version"], capture_output=True, text=True, timeout=10)
    except Exception:  # no binary, or it would not say: the name will do
        return "tansu"
    return done.stdout.strip() or "tansu"


async def _start_broker(args: argparse.Namespace) -> Any:
    """Start the local test broker unless ``--bootstrap`` names one; describe it."""
    if args.bootstrap:
        args.broker = (
            f"broker at {args.bootstrap} (given): its own replication and flush settings apply"
        )
        return None
    from kapbit.testing import LocalBroker
    from kapbit.testing.broker import find_tansu_binary

    broker = LocalBroker()
    await broker.start()
    args.bootstrap = broker.bootstrap_servers
    if broker.kind == "tansu":
        version = await asyncio.to_thread(_tansu_version, find_tansu_binary)
        args.broker = (
            f"local {version} test broker, single node, memory-only storage: "
            "an ack means in broker memory, nothing reaches a disk"
        )
    elif broker.kind == "docker":
        args.broker = (
            "Kafka in a local container, single broker, replication 1: an ack means in the "
            "leader's page cache (Kafka does not fsync per message by default)"
        )
    else:
        args.broker = f"broker at {args.bootstrap} (from the environment): its own settings apply"
    return broker


def parent(args: argparse.Namespace) -> None:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    facts = machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # another tenant skews every figure
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    broker: Any = None
    broker_peak: float | None = None
    loop = asyncio.new_event_loop()
    rows: list[dict[str, Any]] = []
    started = time.time()
    try:
        if any(s in KAFKA_SYSTEMS for s in systems):
            try:
                broker = loop.run_until_complete(_start_broker(args))
            except Exception as exc:
                args.broker = f"no broker: {type(exc).__name__}: {exc}"
        runs = [(args.sequential, 1), (args.workflows, min(args.in_flight, args.workflows))]
        for system in systems:
            for scenario in SCENARIOS:
                for count, in_flight in runs:
                    row = _skip_reason(args, system, scenario, count, in_flight)
                    if row is None:
                        print(
                            f"running {system} {scenario} {_mode(in_flight)} ...",
                            file=sys.stderr,
                            flush=True,
                        )
                        row = _run_child(args, system, scenario, count, in_flight)
                    rows.append(row)
        if broker is not None and broker.pid is not None:
            broker_peak = process_peak_rss_mib(broker.pid)
    finally:
        if broker is not None:
            loop.run_until_complete(broker.close())
        loop.close()
    header = [
        "kapbit peer benchmark: 3-step order saga, small payload; "
        "compensate = step 3 fails, steps 2 and 1 compensated",
        f"machine: {machine_line(facts)}",
        f"sizes: sequential {args.sequential:,} workflows; {args.in_flight:,} in flight "
        f"{args.workflows:,} workflows; {WARMUP} warm-up workflows first; "
        f"{args.partitions} partitions on Kafka",
        f"load average at the start (1, 5, 15 min): {load}",
        "peak RSS: the client process of each run (brokers and database servers not included)"
        + (f"; test broker peak RSS {broker_peak:.0f} MiB" if broker_peak else ""),
    ]
    _print_table(rows, header)
    _write_csv(out / "peers.csv", rows)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "machine": facts,
        "load_average_at_start": load,
        "sizes": {
            "sequential": args.sequential,
            "workflows": args.workflows,
            "in_flight": args.in_flight,
            "warmup": WARMUP,
            "partitions": args.partitions,
        },
        "broker": args.broker,
        "broker_peak_rss_mib": broker_peak,
        "systems": {
            r["system"]: {"version": r.get("version"), "durability": r.get("durability")}
            for r in rows
            if r.get("durability")
        },
    }
    (out / "peers.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"results written to {out / 'peers.csv'} and {out / 'peers.meta.json'}")
    if not args.no_plot:
        print(_plot(out / "peers.png", rows, _caption(meta)))


def _caption(meta: dict[str, Any]) -> list[str]:
    sizes = meta["sizes"]
    return [
        f"machine: {machine_line(meta['machine'])}; {meta['date']}; "
        f"load average at start {meta.get('load_average_at_start', '?')}",
        f"sizes: sequential {sizes['sequential']:,}, {sizes['in_flight']:,} in flight "
        f"{sizes['workflows']:,} workflows",
    ] + [f"{system}: {info['durability']}" for system, info in meta["systems"].items()]


def replot(out: Path) -> None:
    """Draw the plot again from ``peers.csv`` and ``peers.meta.json``."""
    rows: list[dict[str, Any]] = []
    with (out / "peers.csv").open(newline="") as results:
        for row in csv.DictReader(results):
            parsed: dict[str, Any] = dict(row)
            parsed["in_flight"] = int(row["in_flight"])
            for source, target in (("workflows_per_s", "rate"), ("p99_ms", "p99_ms")):
                parsed[target] = float(row[source]) if row[source] else None
            rows.append(parsed)
    meta = json.loads((out / "peers.meta.json").read_text())
    print(_plot(out / "peers.png", rows, _caption(meta)))


def _skip_reason(
    args: argparse.Namespace, system: str, scenario: str, count: int, in_flight: int
) -> dict[str, Any] | None:
    row = {"system": system, "scenario": scenario, "in_flight": in_flight, "workflows": count}
    if system == "dbos-postgres" and not args.postgres:
        reason = f"no PostgreSQL given (--postgres URL or ${POSTGRES_ENV})"
        return {**row, "status": "skipped", "reason": reason}
    if system in KAFKA_SYSTEMS and not args.bootstrap:
        return {**row, "status": "unavailable", "reason": args.broker}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--workflows", type=int, default=10_000, help="per concurrent run")
    parser.add_argument("--sequential", type=int, default=1_000, help="per sequential run")
    parser.add_argument("--in-flight", type=int, default=1_000, help="concurrent workflows")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--bootstrap", default=None, help="a Kafka broker to use")
    parser.add_argument("--postgres", default=os.environ.get(POSTGRES_ENV))
    parser.add_argument("--out", default=str(RESULTS), help="where the results go")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the CSV")
    parser.add_argument("--timeout", type=float, default=1_800, help="seconds per run")
    # Internal: set by the parent when it runs one system in a subprocess.
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-flight-run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--broker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        child(args)
        return
    if args.replot:
        replot(Path(args.out))
        return
    if args.quick:
        args.workflows, args.sequential = min(args.workflows, 1_000), min(args.sequential, 100)
    parent(args)


if __name__ == "__main__":
    main()
