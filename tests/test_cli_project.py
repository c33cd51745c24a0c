"""The ``kapbit`` command line: the status database it keeps, where it reads from, step names
and the time order of ``tail``."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kapbit import Kapbit
from kapbit.events import EventKind
from kapbit.projection import StatusModel
from kapbit.repository import MemRepository
from tests.helpers import TailWatched
from tests.projection_logs import (
    EXPECTED,
    TYPE,
    Behaviour,
    MixedLog,
    append,
    build_mixed_log,
    cli,
    created,
    options,
    order,
    order_definition,
    result,
    writer,
)


@pytest.fixture
async def mixed() -> MixedLog:
    return await build_mixed_log()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds (another task or process makes it true), or fail."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state is in SQLite: nothing to await
            await asyncio.sleep(0.01)


# --- where a query reads from -----------------------------------------------------------


async def test_a_db_query_ignores_the_environment(
    mixed: MixedLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $KAPBIT_BOOTSTRAP exported (as the help suggests), ``--db`` alone still works,
    and never touches the broker the variables name."""
    db = str(tmp_path / "status.db")
    assert (await cli("stats", "--db", db, repo=mixed.repo))[0] == 0
    monkeypatch.setenv("KAPBIT_BOOTSTRAP", f"127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("KAPBIT_TOPIC", raising=False)
    code, out, err = await cli("status", "ok-2", "--db", db)
    assert (code, err) == (0, "")
    assert "succeeded" in out
    monkeypatch.setenv("KAPBIT_TOPIC", "orders")
    for argv in (["list", "--db", db], ["stats", "--json", "--db", db]):
        code, out, err = await cli(*argv)
        assert (code, err) == (0, "")
    assert json.loads(out)["total"] == len(EXPECTED)


async def test_the_environment_completes_an_explicit_log_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--topic`` on the command line with $KAPBIT_BOOTSTRAP: the log is read (and here
    the broker is unreachable, so the command says so)."""
    unreachable = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("KAPBIT_BOOTSTRAP", unreachable)
    monkeypatch.delenv("KAPBIT_TOPIC", raising=False)
    code, _, err = await cli(
        "stats", "--db", str(tmp_path / "s.db"), "--topic", "orders", "--timeout", "2"
    )
    assert code == 1
    assert unreachable in err


# --- kapbit project -----------------------------------------------------------------------


async def test_project_once_then_only_new_records(mixed: MixedLog, tmp_path: Path) -> None:
    db = str(tmp_path / "status.db")
    total = len(mixed.repo.records())
    code, out, err = await cli(
        "project", "--once", "--db", db, "--progress", "plain", repo=mixed.repo
    )
    assert (code, out) == (0, "")
    lines = err.splitlines()
    assert lines[0] == f"kapbit: catching up: {total:,} records to project"
    assert lines[-1].startswith(f"kapbit: caught up: {total:,} records in ")
    async with StatusModel(db, create=False) as model:
        assert {row.id: row.status.value for row in await model.find()} == {
            k: v[0] for k, v in EXPECTED.items()
        }

    await append(mixed.repo, 0, mixed.writer_b, created("later"))
    await append(mixed.repo, 1, mixed.writer_b, created("later-too"))
    code, _, err = await cli(
        "project", "--once", "--db", db, "--progress", "plain", repo=mixed.repo
    )
    assert code == 0
    assert err.splitlines()[0] == "kapbit: catching up: 2 records to project"
    code, out, _ = await cli("list", "--status", "running", "--db", db)
    assert sorted(line.split()[0] for line in out.splitlines()[1:]) == [
        "later",
        "later-too",
        "run-1",
    ]


async def test_project_shows_a_bar_when_asked(mixed: MixedLog, tmp_path: Path) -> None:
    code, _, err = await cli(
        "project", "--once", "--db", str(tmp_path / "s.db"), "--progress", "bar", repo=mixed.repo
    )
    assert code == 0
    total = len(mixed.repo.records())
    assert err.startswith("\rprojecting [")
    bar, summary = err.rsplit("\n", 2)[-3:-1]
    assert f"100% {total:,}/{total:,} records" in bar
    assert summary.startswith(f"kapbit: caught up: {total:,} records in ")


async def test_queries_are_quiet_on_stderr_unless_asked(mixed: MixedLog) -> None:
    code, _, err = await cli("stats", repo=mixed.repo)  # stderr is not a terminal here
    assert (code, err) == (0, "")
    code, _, err = await cli("stats", "--progress", "plain", repo=mixed.repo)
    assert code == 0
    assert err.splitlines()[-1].startswith("kapbit: projected: ")


async def test_project_follows_the_log_until_cancelled(tmp_path: Path) -> None:
    db = str(tmp_path / "status.db")
    repo = MemRepository(partitions=2)
    definition = order_definition(Behaviour("f"))
    async with Kapbit([definition], repo, options=options("node-f")) as kbit:
        await kbit.exec_workflow("f-1", TYPE, order("f-1"))
        following = asyncio.create_task(cli("project", "--db", db, repo=repo))
        async with StatusModel(db) as model:

            async def shows(wid: str) -> bool:
                row = await model.get(wid)
                return row is not None and row.status.value == "succeeded"

            await _eventually(lambda: shows("f-1"))
            await kbit.exec_workflow("f-2", TYPE, order("f-2"))
            await _eventually(lambda: shows("f-2"))
        assert not following.done()
        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following


async def test_project_needs_a_db_and_a_log(
    mixed: MixedLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KAPBIT_BOOTSTRAP", raising=False)
    monkeypatch.delenv("KAPBIT_TOPIC", raising=False)
    code, _, err = await cli("project", "--once", repo=mixed.repo)
    assert code == 1
    assert "project needs --db" in err
    code, _, err = await cli("project", "--once", "--db", str(tmp_path / "s.db"))
    assert code == 1
    assert "project reads the log" in err


async def test_a_missing_db_says_how_to_make_one(tmp_path: Path) -> None:
    db = str(tmp_path / "absent.db")
    code, _, err = await cli("stats", "--db", db)
    assert code == 1
    assert f"kapbit project --once --db {db}" in err


# --- step names ---------------------------------------------------------------------------


@pytest.fixture
def definitions_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of the user's, importable from the current directory."""
    (tmp_path / "my_sagas.py").write_text(
        textwrap.dedent(
            """
            from tests.projection_logs import Behaviour, order_definition

            DEFINITIONS = [order_definition(Behaviour("cli"))]
            NOT_ONE = 42
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    monkeypatch.delitem(sys.modules, "my_sagas", raising=False)
    return "my_sagas:DEFINITIONS"


async def test_status_names_steps_with_the_definitions(
    mixed: MixedLog, definitions_module: str
) -> None:
    code, out, err = await cli(
        "status", "comp-1", "--definitions", definitions_module, repo=mixed.repo
    )
    assert (code, err) == (0, "")
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}
    assert fields["failed step"] == "s2 (step index 2)"
    assert fields["steps done"] == "2 (s0, s1)"
    code, out, _ = await cli(
        "status", "comp-1", "--json", "--definitions", definitions_module, repo=mixed.repo
    )
    document = json.loads(out)
    assert (document["failed_step"], document["failed_step_name"]) == (2, "s2")
    assert document["steps_done_names"] == ["s0", "s1"]


async def test_the_db_keeps_step_names_for_later_queries(
    mixed: MixedLog, tmp_path: Path, definitions_module: str
) -> None:
    db = str(tmp_path / "status.db")
    code, _, _ = await cli(
        "project", "--once", "--db", db, "--definitions", definitions_module, repo=mixed.repo
    )
    assert code == 0
    code, out, _ = await cli("status", "compensating-1", "--db", db)  # no definitions now
    assert code == 0
    assert "failed step: s1 (step index 1)" in out


async def test_bad_definitions_are_one_error_line(mixed: MixedLog, definitions_module: str) -> None:
    for spec, expected in (
        ("my_sagas", "--definitions wants MODULE:NAME"),
        ("no_such_module:X", "cannot load definitions 'no_such_module:X': ModuleNotFound"),
        ("my_sagas:MISSING", "AttributeError"),
        ("my_sagas:NOT_ONE", "is not a Definition or a list of them (found int)"),
    ):
        code, out, err = await cli("stats", "--definitions", spec, repo=mixed.repo)
        assert (code, out) == (1, ""), spec
        assert err.count("\n") == 1 and expected in err, err


async def test_tail_names_steps(mixed: MixedLog, definitions_module: str) -> None:
    _, out, _ = await cli(
        "tail",
        "--from-beginning",
        "--until-end",
        "--json",
        "--definitions",
        definitions_module,
        repo=mixed.repo,
    )
    documents = [json.loads(line) for line in out.splitlines()]
    steps = [d for d in documents if d["kind"] == "step_outcome"]
    assert steps and all(d["step_name"] == f"s{d['step']}" for d in steps)
    argv = ["tail", "--from-beginning", "--until-end", "--definitions", definitions_module]
    _, out, _ = await cli(*argv, repo=mixed.repo)
    line = next(line for line in out.splitlines() if " step_outcome ok-1 step=1 " in line)
    assert ' step_name="s1" ' in line


# --- tail in time order -----------------------------------------------------------------


async def test_tail_from_the_beginning_merges_partitions_by_time() -> None:
    repo = MemRepository(partitions=3)
    for p in range(3):
        await append(repo, p, "n", writer("n"))  # at 1.0 on every partition
    # Workflows created alternately on the three partitions: w0 on 0, w1 on 1, ...
    for i in range(9):
        await append(repo, i % 3, "n", created(f"w{i}", at=100.0 + i))
    for i in range(9):
        await append(repo, i % 3, "n", result(f"w{i}"))  # all at 2000.0: log order breaks ties
    code, out, _ = await cli("tail", "--from-beginning", "--until-end", "--json", repo=repo)
    assert code == 0
    documents = [json.loads(line) for line in out.splitlines()]
    assert [(d["kind"], d.get("id")) for d in documents] == [
        *[("active_writer", None)] * 3,
        *[("workflow_created", f"w{i}") for i in range(9)],
        *[("workflow_result", f"w{p + 3 * k}") for p in range(3) for k in range(3)],
    ]
    assert [d["partition"] for d in documents[:3]] == [0, 1, 2]


async def test_tail_of_a_real_log_interleaves_partitions(mixed: MixedLog) -> None:
    """Not partition by partition: each partition in log order, the two interleaved."""
    _, out, _ = await cli("tail", "--from-beginning", "--until-end", "--json", repo=mixed.repo)
    where = [(d["partition"], d["offset"]) for d in map(json.loads, out.splitlines())]
    assert len(where) == len(mixed.repo.records()) - len(mixed.zombie_offsets)
    for p in range(2):
        offsets = [o for q, o in where if q == p]
        assert offsets == sorted(offsets)
    partitions = [p for p, _ in where]
    assert partitions.index(1) < len(partitions) - 1 - partitions[::-1].index(0)
    assert partitions.index(0) < len(partitions) - 1 - partitions[::-1].index(1)


async def test_tail_prints_new_events_after_the_history() -> None:
    repo = TailWatched(partitions=2)
    await append(repo, 0, "n", writer("n"))
    await append(repo, 1, "n", writer("n"))
    await append(repo, 1, "n", created("old", at=50.0))
    tail = asyncio.create_task(cli("tail", "--from-beginning", "--max-events", "4", repo=repo))
    for started in repo.tailing:
        await asyncio.wait_for(started.wait(), 5)
    await append(repo, 0, "n", created("new", at=10.0))  # an earlier clock, but new
    code, out, _ = await asyncio.wait_for(tail, 10)
    assert code == 0
    assert [line.split()[1:3] for line in out.splitlines()][2:] == [
        ["workflow_created", "old"],
        ["workflow_created", "new"],
    ]


async def test_a_corrupt_partition_ends_a_merging_tail(tmp_path: Path) -> None:
    """One partition failing must not leave the others waiting for it forever."""
    repo = MemRepository(partitions=2)
    for p in range(2):
        await append(repo, p, "n", writer("n"))
    for i in range(50):
        await append(repo, 0, "n", created(f"a{i}", at=100.0 + i))
    await repo.append(1, EventKind.STEP_OUTCOME, "bad", "n", b"not an event")
    code, _, err = await asyncio.wait_for(
        cli("tail", "--from-beginning", "--until-end", repo=repo), 10
    )
    assert code == 1
    assert "CorruptRecord" in err
