"""The SQLite workflow status read model, fed by the projector."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kapbit import partition_for
from kapbit.projection import (
    Position,
    ProjectedEvent,
    Projector,
    ReadModel,
    StatusModel,
    WorkflowStatus,
)
from kapbit.repository import MemRepository
from tests.projection_logs import (
    EXPECTED,
    TYPE,
    MixedLog,
    append,
    build_mixed_log,
    created,
    dead,
    outcome,
    rejected,
    result,
    retry,
    writer,
)


@pytest.fixture
async def mixed() -> MixedLog:
    return await build_mixed_log()


def _table(path: Path) -> list[tuple[Any, ...]]:
    """Every workflow row and position, straight from SQLite (for exact comparisons)."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT * FROM workflows ORDER BY id").fetchall()
        positions = db.execute("SELECT * FROM projection_positions ORDER BY partition").fetchall()
    return rows + positions


async def _project(repo: MemRepository, path: Path, **options: Any) -> int:
    async with StatusModel(path) as model, Projector(repo, model, **options) as projector:
        return await projector.catch_up()


async def test_model_is_a_read_model(tmp_path: Path) -> None:
    async with StatusModel(tmp_path / "s.db") as model:
        assert isinstance(model, ReadModel)
        assert await model.load_positions() == {}


async def test_mixed_log_gives_the_right_rows(mixed: MixedLog, tmp_path: Path) -> None:
    path = tmp_path / "status.db"
    await _project(mixed.repo, path)
    async with StatusModel(path) as model:
        rows = {row.id: row for row in await model.find()}
        assert set(rows) == set(EXPECTED)
        for wid, (status, steps, failed, compensated, attempts, value) in EXPECTED.items():
            row = rows[wid]
            assert (
                row.status,
                row.steps_done,
                row.failed_step,
                row.compensated_steps,
                row.attempts,
                row.result_value(),
            ) == (status, steps, failed, compensated, attempts, value), wid
            assert row.type == TYPE
            assert row.partition == partition_for(wid, 2)
            assert row.created_at > 0
            assert (row.finished_at is not None) == WorkflowStatus(status).terminal, wid
            if row.finished_at is not None:
                assert row.finished_at >= row.created_at
        assert rows["retry-1"].last_error == "ConnectionError('execute 1 of retry-1 unavailable')"
        assert rows["dead-1"].last_error == "ConnectionError('execute 1 of dead-1 unavailable')"
        assert rows["retrying-1"].last_error is not None
        assert rows["rej-1"].last_error is not None
        assert rows["rej-1"].last_error.startswith("step_outcome: payload of")
        assert rows["ok-1"].last_error is None
        # The zombie write of the fenced node carried "a-1"; only node-b's outcome counts.
        assert rows["zomb-1"].result_value()["values"] == ["a-0", "b-1", "b-2"]


async def test_queries_by_id_status_type_and_counts(mixed: MixedLog, tmp_path: Path) -> None:
    path = tmp_path / "status.db"
    await _project(mixed.repo, path)
    async with StatusModel(path) as model:
        one = await model.get("comp-1")
        assert one is not None
        assert one.status is WorkflowStatus.COMPENSATED
        assert await model.get("nope") is None
        succeeded = await model.find(status="succeeded")
        assert [r.id for r in succeeded] == ["ok-1", "ok-2", "retry-1", "zomb-1"]
        assert [r.id for r in await model.find(status=WorkflowStatus.RETRYING)] == ["retrying-1"]
        assert len(await model.find(type=TYPE)) == len(EXPECTED)
        assert await model.find(type="other") == []
        assert len(await model.find(status="succeeded", type=TYPE, limit=2)) == 2
        with pytest.raises(ValueError):
            await model.find(status="bogus")
        by_status = await model.counts_by_status()
        assert by_status == {
            WorkflowStatus.SUCCEEDED: 4,
            WorkflowStatus.COMPENSATED: 1,
            WorkflowStatus.DEAD_LETTERED: 1,
            WorkflowStatus.REJECTED: 1,
            WorkflowStatus.RUNNING: 1,
            WorkflowStatus.RETRYING: 1,
            WorkflowStatus.COMPENSATING: 1,
        }
        assert await model.counts_by_type() == {TYPE: len(EXPECTED)}
        counts = await model.counts()
        assert counts[(TYPE, WorkflowStatus.SUCCEEDED)] == 4
        assert sum(counts.values()) == len(EXPECTED)


class _CrashingModel(StatusModel):
    """Fails inside the ``crash_at``-th transaction, after the rows were written."""

    def __init__(self, path: Path, crash_at: int) -> None:
        super().__init__(path)
        self.crash_at = crash_at
        self.commits = 0

    def _store_position(self, db: sqlite3.Connection, partition: int, position: Position) -> None:
        self.commits += 1
        if self.commits == self.crash_at:
            raise RuntimeError("crash before the position was stored")
        super()._store_position(db, partition, position)


async def test_restart_mid_stream_gives_the_same_rows(mixed: MixedLog, tmp_path: Path) -> None:
    reference = tmp_path / "reference.db"
    await _project(mixed.repo, reference, batch_size=3)
    expected = _table(reference)
    commits = len(mixed.repo.records()) // 3 + 2
    for crash_at in range(1, commits + 1):
        path = tmp_path / f"crash-{crash_at}.db"
        model = _CrashingModel(path, crash_at)
        async with model:
            projector = Projector(mixed.repo, model, batch_size=3)
            crashed = False
            try:
                await projector.catch_up()
            except RuntimeError:
                crashed = True
            await projector.close()
        # A new process: fresh model and projector on the same database.
        await _project(mixed.repo, path, batch_size=3)
        assert _table(path) == expected, f"crash at commit {crash_at}"
        if crash_at <= commits - 2:
            assert crashed


async def test_a_failed_transaction_leaves_rows_and_position_unchanged(
    mixed: MixedLog, tmp_path: Path
) -> None:
    path = tmp_path / "status.db"
    async with _CrashingModel(path, crash_at=2) as model:
        with pytest.raises(RuntimeError):
            await Projector(mixed.repo, model, batch_size=4, partitions=[0]).catch_up()
        positions = await model.load_positions()
        rows = await model.find()
    # Only the first batch (4 records of partition 0) is committed, with its position.
    assert positions[0].offset == 4
    assert [row.id for row in rows] == ["ok-1"]
    assert rows[0].steps_done == 2


async def test_position_is_stored_and_projection_resumes(mixed: MixedLog, tmp_path: Path) -> None:
    path = tmp_path / "status.db"
    assert await _project(mixed.repo, path) > 0
    async with StatusModel(path) as model:
        positions = await model.load_positions()
    assert {p: pos.offset for p, pos in positions.items()} == {
        p: len(mixed.repo.records(p)) for p in range(2)
    }
    assert positions[0].owner == mixed.writer_b
    assert await _project(mixed.repo, path) == 0  # nothing new, nothing applied twice
    # New records are applied on top.
    await append(mixed.repo, 1, mixed.writer_b, created("late-1"))
    assert await _project(mixed.repo, path) == 1
    async with StatusModel(path) as model:
        late = await model.get("late-1")
        assert late is not None
        assert late.status is WorkflowStatus.RUNNING
        assert (await model.get("ok-1")) is not None


async def test_database_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "status.db"
    async with StatusModel(path):
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_readers_in_other_connections_see_committed_rows(tmp_path: Path) -> None:
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    await append(repo, 0, "n", created("w1"))
    path = tmp_path / "status.db"
    async with StatusModel(path) as writer_model, Projector(repo, writer_model) as projector:
        await projector.catch_up()
        async with StatusModel(path, create=False) as reader:
            row = await reader.get("w1")
            assert row is not None
            assert row.status is WorkflowStatus.RUNNING


async def test_missing_database_is_not_created_when_asked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await StatusModel(tmp_path / "absent.db", create=False).start()
    assert not (tmp_path / "absent.db").exists()


async def test_queries_need_an_open_model(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        await StatusModel(tmp_path / "s.db").get("x")


async def test_second_copies_do_not_count_twice(tmp_path: Path) -> None:
    repo = MemRepository()
    records = [
        writer("n"),
        created("w"),
        created("w"),
        outcome("w", 0),
        outcome("w", 1, success=False),
        outcome("w", 1, success=False),
        outcome("w", 0, "compensate"),
        outcome("w", 0, "compensate"),
        retry("w", 1),
        retry("w", 1),
        result("w", ["r"], compensated=True),
        result("w", ["r"], compensated=True),
        rejected("w"),  # after the terminal event: ignored
    ]
    for event in records:
        await append(repo, 0, "n", event)
    path = tmp_path / "status.db"
    await _project(repo, path)
    async with StatusModel(path) as model:
        row = await model.get("w")
    assert row is not None
    assert (row.status, row.steps_done, row.failed_step, row.compensated_steps, row.attempts) == (
        WorkflowStatus.COMPENSATED,
        1,
        1,
        1,
        1,
    )
    assert row.result_value() == ["r"]
    assert row.last_error == "error 1"


async def test_id_used_again_after_termination_is_a_new_workflow(tmp_path: Path) -> None:
    repo = MemRepository()
    for event in [
        writer("n"),
        created("w", at=10.0),
        dead("w", 3),
        created("w", at=15.0),  # a late copy: "w" is still remembered as terminated
        created("v"),
        rejected("v"),  # "w" leaves a window of 1
        created("w", at=20.0, type="other"),
        outcome("w", 0),
    ]:
        await append(repo, 0, "n", event)
    path = tmp_path / "status.db"
    await _project(repo, path, idempotency_window=1)
    async with StatusModel(path) as model:
        row = await model.get("w")
    assert row is not None
    assert (row.type, row.status, row.steps_done, row.attempts, row.created_at) == (
        "other",
        WorkflowStatus.RUNNING,
        1,
        0,
        20.0,
    )
    assert row.finished_at is None


async def test_events_without_a_known_workflow_change_nothing(tmp_path: Path) -> None:
    repo = MemRepository()
    for event in [writer("n"), outcome("ghost", 0), rejected("ghost")]:
        await append(repo, 0, "n", event)
    path = tmp_path / "status.db"
    assert await _project(repo, path) == 3  # delivered, but no row to update
    async with StatusModel(path) as model:
        assert await model.find() == []
        assert (await model.load_positions())[0].offset == 3


class _Recorder:
    """Checks ``apply`` sees events and positions a status model can store."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[ProjectedEvent], Position]] = []

    async def load_positions(self) -> dict[int, Position]:
        return {}

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        self.calls.append((partition, list(events), position))


async def test_positions_round_trip_through_the_database(mixed: MixedLog, tmp_path: Path) -> None:
    recorder = _Recorder()
    await Projector(mixed.repo, recorder).catch_up()
    path = tmp_path / "status.db"
    async with StatusModel(path) as model:
        for partition, events, position in recorder.calls:
            await model.apply(partition, events, position)
        stored = await model.load_positions()
    last = {partition: position for partition, _, position in recorder.calls}
    assert stored == last


async def test_a_schema_1_database_gains_the_horizon_window(tmp_path: Path) -> None:
    """Databases written before positions named the window at their horizon are migrated:
    their positions load without it (the projector then asks the checkpoint)."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE kapbit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO kapbit_meta VALUES ('schema', '1');"
        "CREATE TABLE projection_positions (partition INTEGER PRIMARY KEY, "
        "next_offset INTEGER NOT NULL, owner TEXT NOT NULL, horizon INTEGER, horizon_owner TEXT);"
        "INSERT INTO projection_positions VALUES (0, 7, 'n', 3, 'n');"
    )
    db.close()
    async with StatusModel(path) as model:
        assert await model.load_positions() == {0: Position(7, "n", 3, "n", None)}
        await model.apply(0, [], Position(8, "n", 3, "n", 50))
        assert await model.load_positions() == {0: Position(8, "n", 3, "n", 50)}
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM kapbit_meta WHERE key = 'schema'").fetchone() == ("2",)
    db.close()


async def test_models_opening_a_fresh_database_at_once_all_start(tmp_path: Path) -> None:
    """A projector and a reader opening a new file together: switching it to WAL must not
    fail one of them with "database is locked" (it did, a few times in a hundred)."""

    async def start_and_close(path: str) -> None:
        async with StatusModel(path) as model:
            assert await model.get("none") is None

    for round in range(100):
        path = str(tmp_path / f"fresh-{round}.db")
        await asyncio.gather(*(start_and_close(path) for _ in range(3)))


async def test_a_handle_reads_the_status_the_model_shows(mixed: MixedLog, tmp_path: Path) -> None:
    """One status rule (``status_after``): what a workflow handle reads from the log is
    what the status read model shows, for every way a workflow can go."""
    from kapbit import JsonCodec
    from kapbit.handles import read_workflow
    from tests.projection_logs import Behaviour, order_definition

    await _project(mixed.repo, tmp_path / "s.db")
    definitions = {TYPE: order_definition(Behaviour("a"))}
    async with StatusModel(tmp_path / "s.db") as model:
        rows = {wid: await model.get(wid) for wid in EXPECTED}
    with sqlite3.connect(tmp_path / "s.db") as db:
        created_at = dict(db.execute("SELECT id, created_offset FROM workflows").fetchall())
    for wid, row in rows.items():
        assert row is not None
        state = await read_workflow(
            mixed.repo, JsonCodec(), definitions, wid, row.partition, created_at[wid]
        )
        assert (
            state.status,
            state.steps_done,
            state.failed_step,
            state.compensated_steps,
            state.attempts,
            state.last_error,
        ) == (
            row.status,
            row.steps_done,
            row.failed_step,
            row.compensated_steps,
            row.attempts,
            # a rejection's reason is the handle's typed error, not its last_error
            "" if row.status is WorkflowStatus.REJECTED else row.last_error or "",
        ), wid
        failed_for_good = {WorkflowStatus.DEAD_LETTERED, WorkflowStatus.REJECTED}
        assert (state.error is not None) == (row.status in failed_for_good), wid
