"""A ready read model: the status of every workflow, in SQLite.

One row per workflow (id, type, partition, status, steps done, last error, attempts, created
and finished times, result as JSON text), the names of the steps seen (when the projector has
the definitions), and the projector's position per partition, written in the same
transaction as the rows it produced. SQLite runs in WAL mode, so other
processes (the ``kapbit`` command line, a status endpoint) read while the projector writes.
Every call to SQLite runs on one dedicated worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any, TypeVar

import msgspec
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random

from kapbit._lifecycle import AsyncResource
from kapbit.events import (
    DeadLetter,
    Event,
    InvalidReturn,
    Rejected,
    StepOutcome,
    WorkflowCreated,
    WorkflowResult,
    WorkflowRetry,
)
from kapbit.projection.projector import Position, ProjectedEvent

T = TypeVar("T")

_SCHEMA_VERSION = "2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kapbit_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    partition INTEGER NOT NULL,
    status TEXT NOT NULL,
    steps_done INTEGER NOT NULL DEFAULT 0,
    failed_step INTEGER,
    compensated_steps INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    result TEXT,
    created_offset INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS workflows_by_status ON workflows (status, type);
CREATE INDEX IF NOT EXISTS workflows_by_type ON workflows (type, status);
CREATE TABLE IF NOT EXISTS step_names (
    type TEXT NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (type, step)
);
CREATE TABLE IF NOT EXISTS projection_positions (
    partition INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL,
    owner TEXT NOT NULL,
    horizon INTEGER,
    horizon_owner TEXT,
    horizon_window INTEGER
);
"""

_COLUMNS = (
    "id, type, partition, status, steps_done, failed_step, compensated_steps, attempts, "
    "last_error, created_at, finished_at, result"
)


class WorkflowStatus(StrEnum):
    """Where a workflow stands, as far as the log tells."""

    RUNNING = "running"
    #: Waiting on a durable timer (its step returned ``Sleep`` / ``SleepUntil``).
    SLEEPING = "sleeping"
    COMPENSATING = "compensating"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    COMPENSATED = "compensated"
    DEAD_LETTERED = "dead-lettered"
    REJECTED = "rejected"
    INVALID_RETURN = "invalid-return"

    @property
    def terminal(self) -> bool:
        """Whether the workflow has terminated."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {
        WorkflowStatus.SUCCEEDED,
        WorkflowStatus.COMPENSATED,
        WorkflowStatus.DEAD_LETTERED,
        WorkflowStatus.REJECTED,
        WorkflowStatus.INVALID_RETURN,
    }
)
_STATUS_OF: dict[type[Event], WorkflowStatus] = {
    WorkflowCreated: WorkflowStatus.RUNNING,
    WorkflowRetry: WorkflowStatus.RETRYING,
    DeadLetter: WorkflowStatus.DEAD_LETTERED,
    Rejected: WorkflowStatus.REJECTED,
    InvalidReturn: WorkflowStatus.INVALID_RETURN,
}


def status_after(event: Event, failed: bool) -> WorkflowStatus | None:
    """The status of a workflow after ``event``, given whether one of its steps had failed
    before (its saga compensates); ``None`` for an event of no workflow (a claim).

    The one status rule: the status model's SQL and workflow handles both apply it."""
    if isinstance(event, StepOutcome):
        if failed or not event.success or event.phase == "compensate":
            return WorkflowStatus.COMPENSATING
        return WorkflowStatus.RUNNING if event.fire_at is None else WorkflowStatus.SLEEPING
    if isinstance(event, WorkflowResult):
        return WorkflowStatus.COMPENSATED if event.compensated else WorkflowStatus.SUCCEEDED
    return _STATUS_OF.get(type(event))


class WorkflowRow(msgspec.Struct, frozen=True):
    """One workflow's status.

    ``steps_done`` counts the steps executed successfully; ``failed_step`` is the step that
    returned ``Failure`` (the workflow then compensates), ``compensated_steps`` the
    compensations run. ``attempts`` counts retry attempts and ``last_error`` is the error of
    the latest retry, dead letter or rejection. Times are unix timestamps from the events.
    ``result`` is the result as JSON text (``None`` until it succeeded or compensated).
    """

    id: str
    type: str
    partition: int
    status: WorkflowStatus
    steps_done: int = 0
    failed_step: int | None = None
    compensated_steps: int = 0
    attempts: int = 0
    last_error: str | None = None
    created_at: float = 0.0
    finished_at: float | None = None
    result: str | None = None

    def result_value(self) -> Any:
        """The result decoded from its JSON text (``None`` if there is none yet)."""
        return None if self.result is None else msgspec.json.decode(self.result)


class StatusModel(AsyncResource):
    """The workflow status read model in the SQLite database at ``path``.

    The database is created unless ``create`` is false (then a missing one raises
    :class:`FileNotFoundError`); ``timeout`` is how long to wait for another writer's lock.

    It is a :class:`~kapbit.projection.ReadModel`: give it to a
    :class:`~kapbit.projection.Projector`. Open it with ``await start()`` / ``await
    close()`` or ``async with``; queries can run while the projector applies.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, create: bool = True, timeout: float = 30.0
    ) -> None:
        self.path = os.fspath(path)
        self._create = create
        self._timeout = timeout
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._named: dict[tuple[str, int], str] = {}  # step names already stored

    async def start(self) -> None:
        """Open (and create if needed) the database; idempotent."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kapbit-status")
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        """Close the database; idempotent."""
        executor = self._executor
        if executor is None:
            return
        try:
            await self._run(self._close)
        finally:
            self._executor = None
            executor.shutdown(wait=True)

    # --- ReadModel ------------------------------------------------------------------------

    async def load_positions(self) -> dict[int, Position]:
        """The projector's committed positions, by partition."""
        return await self._run(self._load_positions)

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        """Apply ``events`` and store ``position`` in one transaction."""
        rows = [_change(event) for event in events]
        rows += self._new_step_names(events)
        await self._run(self._apply, partition, rows, position)
        for _, (workflow_type, step, name) in rows[len(events) :]:
            self._named[(workflow_type, step)] = name

    def _new_step_names(self, events: Sequence[ProjectedEvent]) -> list[_Change]:
        """Statements storing the step names in ``events`` not stored yet."""
        names: dict[tuple[str, int], str] = {}
        for projected in events:
            event = projected.event
            if projected.step_name is None or projected.workflow_type is None:
                continue
            assert isinstance(event, StepOutcome)
            key = (projected.workflow_type, event.step)
            if self._named.get(key) != projected.step_name:
                names[key] = projected.step_name
        return [
            ("INSERT OR REPLACE INTO step_names (type, step, name) VALUES (?, ?, ?)", (t, i, n))
            for (t, i), n in names.items()
        ]

    # --- queries --------------------------------------------------------------------------

    async def get(self, workflow_id: str) -> WorkflowRow | None:
        """The status of workflow ``workflow_id``, or ``None`` if it is not known."""
        rows = await self._run(
            self._select, f"SELECT {_COLUMNS} FROM workflows WHERE id = ?", (workflow_id,)
        )
        return rows[0] if rows else None

    async def find(
        self,
        *,
        status: WorkflowStatus | str | None = None,
        type: str | None = None,
        limit: int | None = None,
    ) -> list[WorkflowRow]:
        """Workflows with ``status`` and/or of ``type``, oldest first."""
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            where.append("status = ?")
            args.append(WorkflowStatus(status).value)
        if type is not None:
            where.append("type = ?")
            args.append(type)
        sql = f"SELECT {_COLUMNS} FROM workflows"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return await self._run(self._select, sql, tuple(args))

    async def counts(self) -> dict[tuple[str, WorkflowStatus], int]:
        """The number of workflows by ``(type, status)``."""
        rows = await self._run(
            self._fetch, "SELECT type, status, COUNT(*) FROM workflows GROUP BY type, status", ()
        )
        return {(t, WorkflowStatus(s)): n for t, s, n in rows}

    async def counts_by_status(self) -> dict[WorkflowStatus, int]:
        """The number of workflows in each status."""
        rows = await self._run(
            self._fetch, "SELECT status, COUNT(*) FROM workflows GROUP BY status", ()
        )
        return {WorkflowStatus(s): n for s, n in rows}

    async def counts_by_type(self) -> dict[str, int]:
        """The number of workflows of each type."""
        rows = await self._run(
            self._fetch, "SELECT type, COUNT(*) FROM workflows GROUP BY type ORDER BY type", ()
        )
        return dict(rows)

    async def step_names(self) -> dict[str, dict[int, str]]:
        """The names of the steps seen so far, by workflow type and step index."""
        rows = await self._run(self._fetch, "SELECT type, step, name FROM step_names", ())
        names: dict[str, dict[int, str]] = {}
        for workflow_type, step, name in rows:
            names.setdefault(workflow_type, {})[step] = name
        return names

    # --- worker thread --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the status model is not open (use open() or async with)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _db(self) -> sqlite3.Connection:
        assert self._connection is not None
        return self._connection

    def _open(self) -> None:
        if not self._create and not os.path.exists(self.path):
            raise FileNotFoundError(f"no status database at {self.path}")
        # Switching a fresh file to WAL does not wait for the busy timeout: another
        # connection opening the same file at that moment makes it fail with "locked".
        retrying = Retrying(
            retry=retry_if_exception(_locked),
            stop=stop_after_delay(self._timeout),
            wait=wait_random(0.005, 0.05),
            reraise=True,
        )
        self._connection = retrying(self._connect)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            found = connection.execute(
                "SELECT value FROM kapbit_meta WHERE key = 'schema'"
            ).fetchone()
            if found is None:
                connection.execute(
                    "INSERT INTO kapbit_meta (key, value) VALUES ('schema', ?)", (_SCHEMA_VERSION,)
                )
            elif found[0] == "1":  # positions gained the window of the owner at the horizon
                connection.execute(
                    "ALTER TABLE projection_positions ADD COLUMN horizon_window INTEGER"
                )
                connection.execute(
                    "UPDATE kapbit_meta SET value = ? WHERE key = 'schema'", (_SCHEMA_VERSION,)
                )
            elif found[0] != _SCHEMA_VERSION:
                raise RuntimeError(
                    f"status database {self.path!r} has schema {found[0]}, "
                    f"this kapbit uses {_SCHEMA_VERSION}"
                )
            connection.execute("COMMIT")
        except BaseException:
            connection.close()
            raise
        return connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _load_positions(self) -> dict[int, Position]:
        rows = self._db().execute(
            "SELECT partition, next_offset, owner, horizon, horizon_owner, horizon_window "
            "FROM projection_positions"
        )
        return {row[0]: Position(*row[1:]) for row in rows}

    def _apply(self, partition: int, changes: list[_Change], position: Position) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in changes:
                if sql:
                    db.execute(sql, args)
            self._store_position(db, partition, position)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _store_position(self, db: sqlite3.Connection, partition: int, position: Position) -> None:
        db.execute(
            "INSERT INTO projection_positions "
            "(partition, next_offset, owner, horizon, horizon_owner, horizon_window) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (partition) DO UPDATE SET next_offset = excluded.next_offset, "
            "owner = excluded.owner, horizon = excluded.horizon, "
            "horizon_owner = excluded.horizon_owner, horizon_window = excluded.horizon_window",
            (
                partition,
                position.offset,
                position.owner,
                position.horizon,
                position.horizon_owner,
                position.horizon_window,
            ),
        )

    def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._db().execute(sql, args).fetchall()

    def _select(self, sql: str, args: tuple[Any, ...]) -> list[WorkflowRow]:
        return [_row(values) for values in self._db().execute(sql, args)]


_Change = tuple[str, tuple[Any, ...]]

_NOT_FINISHED = "finished_at IS NULL"
#: The row's new status by :func:`status_after`: the first parameter for a workflow none of
#: whose steps failed, the second for one that compensates (:func:`_statuses`).
_STATUS = "status = CASE WHEN failed_step IS NULL THEN ? ELSE ? END"


def _statuses(event: Event) -> tuple[str, str]:
    """The parameters of :data:`_STATUS` for ``event``."""
    running, failed = status_after(event, False), status_after(event, True)
    assert running is not None and failed is not None
    return running.value, failed.value


def _change(projected: ProjectedEvent) -> _Change:
    """The SQL statement an event turns into (built on the loop, run on the worker)."""
    event = projected.event
    if isinstance(event, WorkflowCreated):
        # A new workflow, or an id used again after its previous workflow terminated.
        return (
            "INSERT OR REPLACE INTO workflows (id, type, partition, status, created_at, "
            "created_offset) VALUES (?, ?, ?, ?, ?, ?)",
            (
                event.id,
                event.type,
                projected.partition,
                _statuses(event)[0],
                event.at,
                projected.offset,
            ),
        )
    if isinstance(event, StepOutcome):
        if event.phase == "compensate":
            return (
                f"UPDATE workflows SET compensated_steps = compensated_steps + 1, {_STATUS} "
                f"WHERE id = ? AND {_NOT_FINISHED}",
                (*_statuses(event), event.id),
            )
        if event.success:
            return (
                f"UPDATE workflows SET steps_done = MAX(steps_done, ?), {_STATUS} "
                f"WHERE id = ? AND {_NOT_FINISHED}",
                (event.step + 1, *_statuses(event), event.id),
            )
        return (
            f"UPDATE workflows SET {_STATUS}, failed_step = ? WHERE id = ? AND {_NOT_FINISHED}",
            (*_statuses(event), event.step, event.id),
        )
    if isinstance(event, WorkflowRetry):
        return (
            f"UPDATE workflows SET {_STATUS}, attempts = MAX(attempts, ?), last_error = ? "
            f"WHERE id = ? AND {_NOT_FINISHED}",
            (*_statuses(event), event.attempt, event.error, event.id),
        )
    if isinstance(event, WorkflowResult):
        return (
            f"UPDATE workflows SET {_STATUS}, result = ?, finished_at = ? "
            f"WHERE id = ? AND {_NOT_FINISHED}",
            (*_statuses(event), _json(projected.value), event.at, event.id),
        )
    if isinstance(event, DeadLetter):
        return (
            f"UPDATE workflows SET {_STATUS}, attempts = MAX(attempts, ?), last_error = ?, "
            f"finished_at = ? WHERE id = ? AND {_NOT_FINISHED}",
            (*_statuses(event), event.attempts, event.error, event.at, event.id),
        )
    if isinstance(event, Rejected | InvalidReturn):
        error = f"{event.event}: {event.reason}" if isinstance(event, Rejected) else event.reason
        return (
            f"UPDATE workflows SET {_STATUS}, last_error = ?, finished_at = ? "
            f"WHERE id = ? AND {_NOT_FINISHED}",
            (*_statuses(event), error, event.at, event.id),
        )
    return ("", ())  # ActiveWriter: nothing to show


def _json(value: Any) -> str:
    """A decoded value as JSON text; what JSON cannot hold is written as its ``str``."""
    return msgspec.json.encode(value, enc_hook=str).decode()


def _row(values: tuple[Any, ...]) -> WorkflowRow:
    """A ``workflows`` table row (columns in :class:`WorkflowRow`'s field order)."""
    workflow_id, workflow_type, partition, status, *rest = values
    return WorkflowRow(workflow_id, workflow_type, partition, WorkflowStatus(status), *rest)


def _locked(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)
