"""The ``kapbit`` command line: see what happened, from the log or a status database.

``kapbit project`` keeps a status database (:class:`~kapbit.projection.StatusModel`) up to
date from a Kafka topic: it catches up, then follows the log until interrupted (``--once``:
catch up and exit). ``kapbit status ID``, ``kapbit list`` and ``kapbit stats`` query a
status database (``--db``); given the topic instead (``--bootstrap``, ``--topic``), they
first project the whole log into a temporary database, which takes a while on a long log.
``kapbit tail`` prints decoded events, in time order across partitions.

Where the log is: ``--bootstrap`` and ``--topic``, else ``$KAPBIT_BOOTSTRAP`` and
``$KAPBIT_TOPIC``; a query given ``--db`` alone reads the database and ignores the
variables. Exit codes: 0 success, 1 error (broker unreachable, topic or database missing,
corrupt log), 2 usage error, 3 unknown workflow id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

import kapbit
from kapbit.codecs import Codec, JsonCodec, MsgpackCodec
from kapbit.errors import KapbitError
from kapbit.events import ActiveWriter
from kapbit.projection import (
    Position,
    ProjectedEvent,
    Projector,
    StatusModel,
    WorkflowRow,
    WorkflowStatus,
    positions_at_end,
    step_label,
)
from kapbit.repository import Repository
from kapbit.workflow import Definition

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_FOUND = 3

_CODECS: dict[str, type[JsonCodec] | type[MsgpackCodec]] = {
    "json": JsonCodec,
    "msgpack": MsgpackCodec,
}
_QUERIES = frozenset({"status", "list", "stats"})
_PROGRESS = ("auto", "bar", "plain", "off")


class CliError(Exception):
    """A failure reported as one line on stderr, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kapbit`` command."""
    source = argparse.ArgumentParser(add_help=False)
    group = source.add_argument_group("source")
    group.add_argument(
        "--bootstrap",
        help="Kafka bootstrap servers (default: $KAPBIT_BOOTSTRAP, "
        "except for a query given --db alone)",
    )
    group.add_argument(
        "--topic",
        help="log topic (default: $KAPBIT_TOPIC, except for a query given --db alone)",
    )
    group.add_argument(
        "--codec", choices=sorted(_CODECS), default="json", help="the instances' codec"
    )
    group.add_argument(
        "--definitions",
        metavar="MODULE:NAME",
        help="your workflow definitions (a Definition or a list of them), importable from "
        "the current directory: values are decoded with their types and steps named",
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", help="log what the clients do on stderr"
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        help="seconds to wait for the broker when connecting (default 30)",
    )

    database = argparse.ArgumentParser(add_help=False)
    group = database.add_argument_group("status database")
    group.add_argument(
        "--db",
        help="the status database: 'project' keeps it; queries read it alone, or first "
        "bring it up to date when --bootstrap/--topic are given too (without --db, "
        "queries project the whole topic into a temporary database)",
    )
    group.add_argument(
        "--progress",
        choices=_PROGRESS,
        default="auto",
        help="progress while catching up, on stderr: 'auto' (a bar on a terminal; else "
        "plain lines for 'project', nothing for queries), 'bar', 'plain' or 'off'",
    )

    parser = argparse.ArgumentParser(
        prog="kapbit",
        description="See what kapbit workflows did: from the event log or a status database.",
        epilog="The log is --bootstrap and --topic, else $KAPBIT_BOOTSTRAP and $KAPBIT_TOPIC; "
        "a query given --db alone reads only the database. "
        "Exit codes: 0 ok, 1 error, 2 usage, 3 unknown workflow id.",
    )
    parser.add_argument("--version", action="version", version=f"kapbit {kapbit.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    project = commands.add_parser(
        "project",
        parents=[source, database],
        help="keep a status database up to date from the log",
        description="Catch the status database (--db) up with the log, then follow the log "
        "until interrupted (Ctrl-C or SIGTERM). Queries with --db then read it at once.",
    )
    project.add_argument("--once", action="store_true", help="catch up, then exit")

    status = commands.add_parser("status", parents=[source, database], help="one workflow's status")
    status.add_argument("id", help="workflow id")
    status.add_argument("--json", action="store_true", help="print it as a JSON object")

    listing = commands.add_parser(
        "list", parents=[source, database], help="workflows, oldest first"
    )
    listing.add_argument(
        "--status", choices=[s.value for s in WorkflowStatus], help="only in this status"
    )
    listing.add_argument("--type", help="only of this workflow type")
    listing.add_argument("--limit", type=_positive, help="at most this many")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    stats = commands.add_parser(
        "stats", parents=[source, database], help="counts by status and type"
    )
    stats.add_argument("--json", action="store_true", help="print them as a JSON object")

    tail = commands.add_parser(
        "tail",
        parents=[source],
        help="print events as they arrive",
        description="Print decoded events. With --from-beginning the events already in the "
        "log come first, merged across partitions in the order they were written (by their "
        "time stamps); then new events as they arrive.",
    )
    tail.add_argument(
        "--from-beginning", action="store_true", help="start at the beginning of the log"
    )
    tail.add_argument("--max-events", type=_positive, help="stop after this many events")
    tail.add_argument(
        "--until-end", action="store_true", help="stop at the end of the log as it is now"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kapbit`` command; return its exit code."""
    args = build_parser().parse_args(argv)
    # Client libraries log connection failures; the command reports them in one line.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.CRITICAL + 1,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_execute(args, None, sys.stdout, sys.stderr, stop_on_signals=True))
    except KeyboardInterrupt:
        return 130


async def execute(
    argv: Sequence[str] | None = None,
    *,
    repository: Repository | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Parse ``argv`` and run the command; ``repository`` replaces ``--bootstrap/--topic``.

    A given repository is started (idempotent) but not closed: the caller owns it.
    """
    args = build_parser().parse_args(argv)
    return await _execute(args, repository, out or sys.stdout, err or sys.stderr)


async def _execute(
    args: argparse.Namespace,
    repository: Repository | None,
    out: TextIO,
    err: TextIO,
    *,
    stop_on_signals: bool = False,
) -> int:
    try:
        definitions = _load_definitions(args.definitions)
        async with _log_source(args, repository) as source:
            if args.command == "tail":
                return await _tail(args, source, definitions, out)
            if args.command == "project":
                return await _project(args, source, definitions, err, stop_on_signals)
            return await _query(args, source, definitions, out, err)
    except CliError as exc:
        _fail(err, str(exc))
        return exc.code
    except (KapbitError, sqlite3.Error, OSError) as exc:
        _fail(err, f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR


# --- sources ----------------------------------------------------------------------------------


def _log_address(args: argparse.Namespace) -> tuple[str, str] | None:
    """The Kafka bootstrap servers and topic to read, or ``None`` to read no log.

    The command line wins over the environment; a query given ``--db`` and neither
    ``--bootstrap`` nor ``--topic`` reads the database alone, whatever the environment says.
    """
    explicit = args.bootstrap is not None or args.topic is not None
    if args.command in _QUERIES and args.db is not None and not explicit:
        return None
    bootstrap = args.bootstrap or os.environ.get("KAPBIT_BOOTSTRAP") or None
    topic = args.topic or os.environ.get("KAPBIT_TOPIC") or None
    if bootstrap is None and topic is None:
        return None
    if bootstrap is None:
        raise CliError(f"reading topic {topic!r} needs --bootstrap (or $KAPBIT_BOOTSTRAP)")
    if topic is None:
        raise CliError(f"reading from {bootstrap} needs --topic (or $KAPBIT_TOPIC)")
    return bootstrap, topic


@contextlib.asynccontextmanager
async def _log_source(
    args: argparse.Namespace, repository: Repository | None
) -> AsyncIterator[Repository | None]:
    """The log to read: the given repository, the Kafka topic, or none (``--db`` only)."""
    if repository is not None:
        await repository.start()
        yield repository
        return
    address = _log_address(args)
    if address is None:
        yield None
        return
    bootstrap, topic = address
    try:
        from kapbit.repository.kafka import KafkaRepository
    except ImportError as exc:  # pragma: no cover - the Kafka repository ships with kapbit
        raise CliError(f"Kafka support is not available: {exc}") from exc
    kafka: Repository = KafkaRepository(bootstrap, topic, create_topic=False)
    where = f"topic {topic!r} at {bootstrap}"
    try:
        await asyncio.wait_for(kafka.start(), args.timeout)
    except TimeoutError:
        await _close_quietly(kafka)
        raise CliError(
            f"cannot reach the Kafka broker at {bootstrap} within {args.timeout:g} s"
        ) from None
    except (KapbitError, OSError) as exc:
        await _close_quietly(kafka)
        raise CliError(str(exc)) from exc
    except Exception as exc:  # the client's own errors: still one line, not a traceback
        await _close_quietly(kafka)
        raise CliError(f"cannot read {where}: {type(exc).__name__}: {exc}") from exc
    try:
        yield kafka
    finally:
        await _close_quietly(kafka)


async def _close_quietly(repository: Repository) -> None:
    with contextlib.suppress(Exception):
        await repository.close()


def _codec(args: argparse.Namespace) -> Codec:
    return _CODECS[args.codec]()


def _load_definitions(spec: str | None) -> list[Definition]:
    """The definitions named by ``MODULE:NAME`` (a Definition or an iterable of them)."""
    if spec is None:
        return []
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CliError(f"--definitions wants MODULE:NAME, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as exc:
        raise CliError(f"cannot load definitions {spec!r}: {type(exc).__name__}: {exc}") from exc
    definitions = [found] if isinstance(found, Definition) else found
    try:
        definitions = list(definitions)
    except TypeError:
        definitions = [definitions]
    wrong = [d for d in definitions if not isinstance(d, Definition)]
    if wrong or not definitions:
        raise CliError(
            f"--definitions {spec!r} is not a Definition or a list of them "
            f"(found {type(found).__name__})"
        )
    return definitions


# --- the status database ----------------------------------------------------------------------


class _Progress:
    """Reports how far a catch-up got, on ``err``: a bar, plain lines, or nothing.

    The bar is redrawn at most ten times a second, plain lines every ``every`` seconds;
    :meth:`finish` always reports the end.
    """

    def __init__(self, err: TextIO, mode: str, every: float = 5.0) -> None:
        self._err = err
        self._mode = mode
        self._every = every if mode == "plain" else 0.1
        self._total = 0
        self._done = 0
        self._began = time.monotonic()
        self._shown = self._began

    def begin(self, total: int) -> None:
        self._total = total
        self._began = self._shown = time.monotonic()
        if self._mode == "plain":
            self._line(f"catching up: {total:,} records to project")
        elif self._mode == "bar":
            self._draw()

    def advance(self, records: int) -> None:
        self._done += records
        now = time.monotonic()
        if self._mode == "off" or now - self._shown < self._every:
            return
        self._shown = now
        if self._mode == "bar":
            self._draw()
        else:
            self._line(f"catching up: {self._done:,}/{self._total:,} records ({self._percent()}%)")

    def finish(self, what: str) -> None:
        seconds = time.monotonic() - self._began
        done = min(self._done, self._total) if self._total else self._done
        summary = f"{what}: {done:,} records in {seconds:.1f} s"
        if self._mode == "bar":
            self._draw()
            self._err.write("\n")
            self._line(summary)
        elif self._mode == "plain":
            self._line(summary)

    def _percent(self) -> int:
        return 100 if self._total == 0 else min(100, self._done * 100 // self._total)

    def _draw(self) -> None:
        width = 30
        filled = self._percent() * width // 100
        seconds = max(time.monotonic() - self._began, 1e-9)
        rate = self._done / seconds
        left = max(self._total - self._done, 0)
        eta = f"{left / rate:.0f} s left" if rate > 0 and left else ""
        self._err.write(
            f"\rprojecting [{'#' * filled}{'.' * (width - filled)}] {self._percent():3d}% "
            f"{min(self._done, self._total):,}/{self._total:,} records  {rate:,.0f}/s  {eta}"
            "\x1b[K"
        )
        self._err.flush()

    def _line(self, text: str) -> None:
        self._err.write(f"kapbit: {text}\n")
        self._err.flush()


def _progress_mode(args: argparse.Namespace, err: TextIO) -> str:
    mode: str = args.progress
    if mode != "auto":
        return mode
    if err.isatty():
        return "bar"
    return "plain" if args.command == "project" else "off"


class _Counting:
    """A read model that passes everything to ``model`` and counts the records it moved past."""

    def __init__(self, model: StatusModel, progress: _Progress) -> None:
        self._model = model
        self._progress = progress
        self._offsets: dict[int, int] = {}

    async def load_positions(self) -> dict[int, Position]:
        positions = await self._model.load_positions()
        self._offsets = {p: position.offset for p, position in positions.items()}
        return positions

    def start_at(self, offsets: dict[int, int]) -> None:
        """Where each partition starts, so the first batch is counted from there."""
        self._offsets = dict(offsets)

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        await self._model.apply(partition, events, position)
        before = self._offsets.get(partition, 0)
        self._offsets[partition] = position.offset
        self._progress.advance(max(position.offset - before, 0))


@dataclass
class _Catching:
    """A projector into a status model, with a progress report while it catches up."""

    projector: Projector
    progress: _Progress


@contextlib.asynccontextmanager
async def _catching_up(
    args: argparse.Namespace,
    source: Repository,
    model: StatusModel,
    definitions: list[Definition],
    err: TextIO,
) -> AsyncIterator[_Catching]:
    """A started projector from ``source`` into ``model``, counting towards the log's end."""
    progress = _Progress(err, _progress_mode(args, err))
    counting = _Counting(model, progress)
    projector = Projector(source, counting, codec=_codec(args), definitions=definitions)
    async with projector:
        starts = {p: position.offset for p, position in projector.positions.items()}
        counting.start_at(starts)
        ends = {p: await source.end_offset(p) for p in starts}
        progress.begin(sum(max(ends[p] - starts[p], 0) for p in starts))
        yield _Catching(projector, progress)


@contextlib.asynccontextmanager
async def _status_model(
    args: argparse.Namespace,
    source: Repository | None,
    definitions: list[Definition],
    err: TextIO,
) -> AsyncIterator[StatusModel]:
    """The status database to query, brought up to date from ``source`` when there is one."""
    if source is None:
        if args.db is None:
            raise CliError(
                "give --db (a status database kept by 'kapbit project'), or --bootstrap and "
                "--topic (the log)"
            )
        model = StatusModel(args.db, create=False)
        try:
            await model.start()
        except FileNotFoundError:
            raise CliError(
                f"no status database at {args.db} (make one with: kapbit project --once "
                f"--db {args.db} --bootstrap ... --topic ...)"
            ) from None
        try:
            yield model
        finally:
            await model.close()
        return
    with contextlib.ExitStack() as stack:
        path = args.db
        if path is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="kapbit-"))
            path = os.path.join(directory, "status.db")
        async with (
            StatusModel(path) as model,
            _catching_up(args, source, model, definitions, err) as catching,
        ):
            await catching.projector.catch_up()
            catching.progress.finish("projected")
            yield model


# --- project ----------------------------------------------------------------------------------


async def _project(
    args: argparse.Namespace,
    source: Repository | None,
    definitions: list[Definition],
    err: TextIO,
    stop_on_signals: bool,
) -> int:
    if args.db is None:
        raise CliError("project needs --db: the status database to keep")
    if source is None:
        raise CliError("project reads the log: give --bootstrap and --topic")
    async with (
        StatusModel(args.db) as model,
        _catching_up(args, source, model, definitions, err) as catching,
    ):
        projector = catching.projector
        await projector.catch_up()
        if args.once:
            catching.progress.finish("caught up")
            return EXIT_OK
        catching.progress.finish("caught up, following the log (Ctrl-C to stop)")
        await _follow(projector, stop_on_signals)
    return EXIT_OK


async def _follow(projector: Projector, stop_on_signals: bool) -> None:
    """Run ``projector`` until it fails, is cancelled, or (with signals) SIGINT/SIGTERM."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if stop_on_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stopped.set)
                handled.append(sig)
    running = asyncio.ensure_future(projector.run())
    waiting = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        waiting.cancel()
        await projector.close()
        if not running.done():
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running  # raises what stopped the run


# --- queries ----------------------------------------------------------------------------------


async def _query(
    args: argparse.Namespace,
    source: Repository | None,
    definitions: list[Definition],
    out: TextIO,
    err: TextIO,
) -> int:
    async with _status_model(args, source, definitions, err) as model:
        if args.command == "status":
            row = await model.get(args.id)
            if row is None:
                raise CliError(f"no workflow {args.id!r}", EXIT_NOT_FOUND)
            names = await model.step_names()
            for definition in definitions:
                names.setdefault(definition.type, {}).update(_names_of(definition))
            _print_status(out, row, names.get(row.type, {}), args.json)
        elif args.command == "list":
            rows = await model.find(status=args.status, type=args.type, limit=args.limit)
            _print_list(out, rows, args.json)
        else:
            _print_stats(out, await model.counts(), args.json)
    return EXIT_OK


def _names_of(definition: Definition) -> dict[int, str]:
    names = {i: step_label(definition, i) for i in range(len(definition.steps))}
    return {i: name for i, name in names.items() if name is not None}


def _print_status(out: TextIO, row: WorkflowRow, names: dict[int, str], as_json: bool) -> None:
    """One workflow's status; steps are named when their names are known."""
    failed_name = None if row.failed_step is None else names.get(row.failed_step)
    if as_json:
        document = _row_document(row)
        document["failed_step_name"] = failed_name
        document["steps_done_names"] = [names.get(i) for i in range(row.steps_done)]
        out.write(msgspec.json.encode(document).decode() + "\n")
        return
    done = [names.get(i) for i in range(row.steps_done)]
    steps_done = str(row.steps_done)
    if done and all(name is not None for name in done):
        steps_done += f" ({', '.join(name for name in done if name is not None)})"
    if row.failed_step is None:
        failed = "-"
    elif failed_name is None:
        failed = f"step index {row.failed_step} (name unknown: see --definitions)"
    else:
        failed = f"{failed_name} (step index {row.failed_step})"
    fields = [
        ("id", row.id),
        ("type", row.type),
        ("partition", str(row.partition)),
        ("status", row.status.value),
        ("steps done", steps_done),
        ("failed step", failed),
        ("compensated", f"{row.compensated_steps} steps"),
        ("attempts", str(row.attempts)),
        ("last error", _or_dash(row.last_error)),
        ("created", _time(row.created_at)),
        ("finished", _time(row.finished_at)),
        ("result", _or_dash(row.result)),
    ]
    for name, value in fields:
        out.write(f"{name + ':':<13}{value}\n")


def _print_list(out: TextIO, rows: list[WorkflowRow], as_json: bool) -> None:
    if as_json:
        for row in rows:
            out.write(_row_json(row) + "\n")
        return
    table = [("ID", "TYPE", "STATUS", "STEPS", "ATTEMPTS", "CREATED", "FINISHED")]
    table += [
        (
            row.id,
            row.type,
            row.status.value,
            str(row.steps_done),
            str(row.attempts),
            _time(row.created_at),
            _time(row.finished_at),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
        out.write("\n")


def _print_stats(out: TextIO, counts: dict[tuple[str, WorkflowStatus], int], as_json: bool) -> None:
    by_status: dict[str, int] = {}
    by_type: dict[str, int] = {}
    matrix: dict[str, dict[str, int]] = {}
    for (workflow_type, status), count in counts.items():
        by_status[status.value] = by_status.get(status.value, 0) + count
        by_type[workflow_type] = by_type.get(workflow_type, 0) + count
        matrix.setdefault(workflow_type, {})[status.value] = count
    order = [s.value for s in WorkflowStatus]
    by_status = {s: by_status[s] for s in order if s in by_status}
    by_type = dict(sorted(by_type.items()))
    total = sum(by_status.values())
    if as_json:
        document = {
            "total": total,
            "by_status": by_status,
            "by_type": by_type,
            "by_type_and_status": {
                t: {s: matrix[t][s] for s in order if s in matrix[t]} for t in sorted(matrix)
            },
        }
        out.write(msgspec.json.encode(document).decode() + "\n")
        return
    width = max([len(name) for name in [*by_status, *by_type]] + [5]) + 2
    out.write("by status:\n")
    for name, count in by_status.items():
        out.write(f"  {name:<{width}}{count}\n")
    out.write("by type:\n")
    for name, count in by_type.items():
        out.write(f"  {name:<{width}}{count}\n")
    out.write(f"{'total:':<{width + 2}}{total}\n")


# --- tail -------------------------------------------------------------------------------------


class _Printer:
    """A read model that prints each event as one line; nothing is stored.

    Events before ``history`` (the end offset of each partition when the tail began) are
    merged across partitions by their time stamps (ties: partition, then offset): a
    partition's batch waits until every partition still reading its history has an event
    pending, or has finished it. Later events are printed as they arrive, after the
    history (unless ``history_only``). Each partition must be read on its own (a
    repository's ``tail``), as one partition's batch waits for the others.
    """

    def __init__(
        self,
        out: TextIO,
        as_json: bool,
        limit: int | None,
        history: dict[int, int],
        history_only: bool,
    ) -> None:
        self._out = out
        self._as_json = as_json
        self._limit = limit
        self._ends = history
        self._history_only = history_only
        self._pending: dict[int, deque[ProjectedEvent]] = {p: deque() for p in history}
        self._reading = {p for p, end in history.items() if end > 0}
        self._changed = asyncio.Condition()
        self.printed = 0
        self.done = asyncio.Event()
        self.history_printed = asyncio.Event()
        if not self._reading:
            self.history_printed.set()

    async def load_positions(self) -> dict[int, Position]:
        return {}

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        if partition in self._reading:
            end = self._ends[partition]
            old = [e for e in events if e.offset < end]
            events = [e for e in events if e.offset >= end]
            async with self._changed:
                self._pending[partition].extend(old)
                if position.offset >= end:
                    self._reading.discard(partition)
                self._merge()
                await self._changed.wait_for(
                    lambda: not self._pending[partition] or self.done.is_set()
                )
        if events and not self._history_only:
            await self.history_printed.wait()
            self._print(events)

    def _merge(self) -> None:
        """Print the oldest pending events while every partition reading history has one."""
        pending = self._pending
        while not self.done.is_set() and all(pending[p] for p in self._reading):
            heads = [(q[0].event.at, p, q[0].offset) for p, q in pending.items() if q]
            if not heads:
                break
            _, partition, _ = min(heads)
            self._print([pending[partition].popleft()])
        if self.done.is_set() or (not self._reading and not any(pending.values())):
            self.history_printed.set()
        self._changed.notify_all()

    async def release(self) -> None:
        """Stop printing and let every waiting ``apply`` return (the tail is ending)."""
        self.done.set()
        self.history_printed.set()
        async with self._changed:
            self._changed.notify_all()

    def _print(self, events: Iterable[ProjectedEvent]) -> None:
        for event in events:
            if self.done.is_set():
                break
            self._out.write((_event_json(event) if self._as_json else _event_line(event)) + "\n")
            self.printed += 1
            if self._limit is not None and self.printed >= self._limit:
                self.done.set()
                self.history_printed.set()
        self._out.flush()


async def _tail(
    args: argparse.Namespace,
    source: Repository | None,
    definitions: list[Definition],
    out: TextIO,
) -> int:
    if source is None:
        raise CliError("tail reads the log: give --bootstrap and --topic")
    history: dict[int, int] = {}
    start: dict[int, Position] | None = None
    if args.from_beginning:
        history = {p: await source.end_offset(p) for p in range(source.partitions)}
    else:
        start = await positions_at_end(source)
    printer = _Printer(out, args.json, args.max_events, history, args.until_end)
    # A projector per partition, each following its partition with a tail of its own: one
    # failing releases the others' waits instead of leaving them blocked on the merge.
    projectors = [
        Projector(
            source,
            printer,
            codec=_codec(args),
            definitions=definitions,
            partitions=[p],
            start_positions=start,
        )
        for p in range(source.partitions)
    ]
    for projector in projectors:
        await projector.start()
    works = [asyncio.ensure_future(projector.run()) for projector in projectors]
    everything: asyncio.Future[Any] = asyncio.gather(*works)
    end = printer.history_printed if args.until_end else printer.done
    limit: asyncio.Future[Any] = asyncio.ensure_future(end.wait())
    try:
        await asyncio.wait([everything, limit], return_when=asyncio.FIRST_COMPLETED)
    finally:
        await printer.release()
        for projector in projectors:
            await projector.close()
        limit.cancel()
        for work in works:
            work.cancel()
        await asyncio.gather(*works, return_exceptions=True)
    if everything.done() and not everything.cancelled() and everything.exception() is not None:
        raise everything.exception()  # type: ignore[misc]
    return EXIT_OK


def _event_line(projected: ProjectedEvent) -> str:
    """``partition:offset kind id field=value ...`` with values as JSON, on one line."""
    event = projected.event
    head = f"{projected.partition}:{projected.offset} {projected.kind.value}"
    if isinstance(event, ActiveWriter):
        return f"{head} node={event.node} at={_time(event.at)}"
    fields = _plain_fields(event)
    workflow_id = fields.pop("id")
    parts = [head, str(workflow_id)]
    at = fields.pop("at", None)
    parts += [f"{name}={_compact(value)}" for name, value in fields.items()]
    if projected.step_name is not None:
        parts.append(f"step_name={_compact(projected.step_name)}")
    if _has_value(event):
        parts.append(f"{_value_name(event)}={_compact(projected.value)}")
    if at is not None:
        parts.append(f"at={_time(at)}")
    return " ".join(parts)


def _event_json(projected: ProjectedEvent) -> str:
    document: dict[str, Any] = {
        "partition": projected.partition,
        "offset": projected.offset,
        "node": projected.node,
        "kind": projected.kind.value,
    }
    if projected.workflow_type is not None:
        document["workflow_type"] = projected.workflow_type
    document.update(_plain_fields(projected.event))
    if projected.step_name is not None:
        document["step_name"] = projected.step_name
    if _has_value(projected.event):
        document[_value_name(projected.event)] = projected.value
    return msgspec.json.encode(document, enc_hook=str).decode()


def _plain_fields(event: Any) -> dict[str, Any]:
    """The event's fields except the encoded user value (shown decoded instead) and optional
    fields left at their ``None`` default (a step outcome without a timer has no fire_at)."""
    unset = {f.name for f in msgspec.structs.fields(type(event)) if f.default is None}
    return {
        name: value
        for name, value in msgspec.structs.asdict(event).items()
        if not isinstance(value, msgspec.Raw) and not (value is None and name in unset)
    }


def _has_value(event: Any) -> bool:
    return any(isinstance(v, msgspec.Raw) for v in msgspec.structs.asdict(event).values())


def _value_name(event: Any) -> str:
    for name, value in msgspec.structs.asdict(event).items():
        if isinstance(value, msgspec.Raw):
            return name
    return "value"


# --- formatting -------------------------------------------------------------------------------


def _fail(err: TextIO, message: str) -> None:
    err.write("kapbit: " + " ".join(message.split()) + "\n")
    err.flush()


def _compact(value: Any) -> str:
    return msgspec.json.encode(value, enc_hook=str).decode()


def _row_document(row: WorkflowRow) -> dict[str, Any]:
    document = msgspec.structs.asdict(row)
    document["result"] = row.result_value()
    return document


def _row_json(row: WorkflowRow) -> str:
    return msgspec.json.encode(_row_document(row)).decode()


def _time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _positive(text: str) -> int:
    """A whole number of at least 1 (argparse names the option in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
