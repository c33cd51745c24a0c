"""The ``kapbit`` command line: see what happened, from the log or a status database.

``kapbit status ID``, ``kapbit list``, ``kapbit stats`` query the workflow status read model
(:class:`~kapbit.projection.StatusModel`); ``kapbit tail`` prints decoded events as they
arrive. The source is a Kafka topic (``--bootstrap``, ``--topic``: the log is first
projected into ``--db`` or a temporary database), or a status database kept by a running
projector (``--db`` alone).

Exit codes: 0 success, 1 error (broker unreachable, topic or database missing, corrupt
log), 2 usage error, 3 unknown workflow id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

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
)
from kapbit.repository import Repository

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_FOUND = 3

_CODECS: dict[str, type[JsonCodec] | type[MsgpackCodec]] = {
    "json": JsonCodec,
    "msgpack": MsgpackCodec,
}


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
        default=os.environ.get("KAPBIT_BOOTSTRAP"),
        help="Kafka bootstrap servers (default: $KAPBIT_BOOTSTRAP)",
    )
    group.add_argument(
        "--topic", default=os.environ.get("KAPBIT_TOPIC"), help="log topic (default: $KAPBIT_TOPIC)"
    )
    group.add_argument(
        "--db",
        help="status database: queried alone, or kept up to date from the topic "
        "(default with a topic: a temporary one)",
    )
    group.add_argument(
        "--codec", choices=sorted(_CODECS), default="json", help="the instances' codec"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", help="log what the clients do on stderr"
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the broker when connecting (default 30)",
    )

    parser = argparse.ArgumentParser(
        prog="kapbit",
        description="See what kapbit workflows did: from the event log or a status database.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 unknown workflow id",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", parents=[source], help="one workflow's status")
    status.add_argument("id", help="workflow id")
    status.add_argument("--json", action="store_true", help="print it as a JSON object")

    listing = commands.add_parser("list", parents=[source], help="workflows, oldest first")
    listing.add_argument(
        "--status", choices=[s.value for s in WorkflowStatus], help="only in this status"
    )
    listing.add_argument("--type", help="only of this workflow type")
    listing.add_argument("--limit", type=_positive, help="at most this many")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    stats = commands.add_parser("stats", parents=[source], help="counts by status and type")
    stats.add_argument("--json", action="store_true", help="print them as a JSON object")

    tail = commands.add_parser("tail", parents=[source], help="print events as they arrive")
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
        return asyncio.run(_execute(args, None, sys.stdout, sys.stderr))
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
    args: argparse.Namespace, repository: Repository | None, out: TextIO, err: TextIO
) -> int:
    try:
        async with _log_source(args, repository) as source:
            if args.command == "tail":
                return await _tail(args, source, out)
            return await _query(args, source, out)
    except CliError as exc:
        _fail(err, str(exc))
        return exc.code
    except (KapbitError, sqlite3.Error, OSError) as exc:
        _fail(err, f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR


# --- sources ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _log_source(
    args: argparse.Namespace, repository: Repository | None
) -> AsyncIterator[Repository | None]:
    """The log to read: the given repository, the Kafka topic, or none (``--db`` only)."""
    if repository is not None:
        await repository.start()
        yield repository
        return
    if args.bootstrap is None and args.topic is None:
        yield None
        return
    if not args.bootstrap or not args.topic:
        raise CliError("reading a topic needs both --bootstrap and --topic")
    try:
        from kapbit.repository.kafka import KafkaRepository
    except ImportError as exc:  # pragma: no cover - the Kafka repository ships with kapbit
        raise CliError(f"Kafka support is not available: {exc}") from exc
    kafka: Repository = KafkaRepository(args.bootstrap, args.topic, create_topic=False)
    where = f"topic {args.topic!r} at {args.bootstrap}"
    try:
        await asyncio.wait_for(kafka.start(), args.timeout)
    except TimeoutError:
        await _close_quietly(kafka)
        raise CliError(
            f"cannot reach the Kafka broker at {args.bootstrap} within {args.timeout:g} s"
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


@contextlib.asynccontextmanager
async def _status_model(
    args: argparse.Namespace, source: Repository | None
) -> AsyncIterator[StatusModel]:
    """The status database, brought up to date from ``source`` when there is one."""
    if source is None:
        if args.db is None:
            raise CliError("give --bootstrap and --topic (the log), or --db (a status database)")
        model = StatusModel(args.db, create=False)
        try:
            await model.open()
        except FileNotFoundError:
            raise CliError(f"no status database at {args.db}") from None
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
        async with StatusModel(path) as model:
            async with Projector(source, model, codec=_codec(args)) as projector:
                await projector.catch_up()
            yield model


# --- queries ----------------------------------------------------------------------------------


async def _query(args: argparse.Namespace, source: Repository | None, out: TextIO) -> int:
    async with _status_model(args, source) as model:
        if args.command == "status":
            row = await model.get(args.id)
            if row is None:
                raise CliError(f"no workflow {args.id!r}", EXIT_NOT_FOUND)
            _print_status(out, row, args.json)
        elif args.command == "list":
            rows = await model.find(status=args.status, type=args.type, limit=args.limit)
            _print_list(out, rows, args.json)
        else:
            _print_stats(out, await model.counts(), args.json)
    return EXIT_OK


def _print_status(out: TextIO, row: WorkflowRow, as_json: bool) -> None:
    if as_json:
        out.write(_row_json(row) + "\n")
        return
    fields = [
        ("id", row.id),
        ("type", row.type),
        ("partition", str(row.partition)),
        ("status", row.status.value),
        ("steps done", str(row.steps_done)),
        ("failed step", _or_dash(row.failed_step)),
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
    """A read model that prints each event as one line; nothing is stored."""

    def __init__(self, out: TextIO, as_json: bool, limit: int | None) -> None:
        self._out = out
        self._as_json = as_json
        self._limit = limit
        self.printed = 0
        self.done = asyncio.Event()

    async def load_positions(self) -> dict[int, Position]:
        return {}

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        for event in events:
            if self.done.is_set():
                break
            self._out.write((_event_json(event) if self._as_json else _event_line(event)) + "\n")
            self.printed += 1
            if self._limit is not None and self.printed >= self._limit:
                self.done.set()
        self._out.flush()


async def _tail(args: argparse.Namespace, source: Repository | None, out: TextIO) -> int:
    if source is None:
        raise CliError("tail reads the log: give --bootstrap and --topic")
    printer = _Printer(out, args.json, args.max_events)
    start = None if args.from_beginning else await positions_at_end(source)
    projector = Projector(source, printer, codec=_codec(args), start_positions=start)
    async with projector:
        work = asyncio.ensure_future(projector.catch_up() if args.until_end else projector.run())
        limit = asyncio.ensure_future(printer.done.wait())
        try:
            await asyncio.wait({work, limit}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await projector.stop()
            limit.cancel()
            if not work.done():
                work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
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
    if _has_value(projected.event):
        document[_value_name(projected.event)] = projected.value
    return msgspec.json.encode(document, enc_hook=str).decode()


def _plain_fields(event: Any) -> dict[str, Any]:
    """The event's fields except the encoded user value (shown decoded instead)."""
    return {
        name: value
        for name, value in msgspec.structs.asdict(event).items()
        if not isinstance(value, msgspec.Raw)
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


def _row_json(row: WorkflowRow) -> str:
    document = msgspec.structs.asdict(row)
    document["result"] = row.result_value()
    return msgspec.json.encode(document).decode()


def _time(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
