"""The ``kapbit`` command line against the in-memory log and a status database."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

import kapbit
from kapbit import Definition, Kapbit, MsgpackCodec, Step, Success
from kapbit.cli import build_parser
from kapbit.repository import MemRepository
from tests.helpers import TailWatched
from tests.projection_logs import (
    EXPECTED,
    MixedLog,
    append,
    build_mixed_log,
    cli,
    created,
    outcome,
    writer,
)


@pytest.fixture
async def mixed() -> MixedLog:
    return await build_mixed_log()


def _one_error_line(err: str) -> str:
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert err.startswith("kapbit: ")
    return err


# --- status ---------------------------------------------------------------------------------


async def test_status_of_a_workflow(mixed: MixedLog) -> None:
    code, out, err = await cli("status", "comp-1", repo=mixed.repo)
    assert (code, err) == (0, "")
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["id"] == "comp-1"
    assert fields["type"] == "order"
    assert fields["status"] == "compensated"
    assert fields["steps done"] == "2"
    assert fields["failed step"] == "step index 2 (name unknown: see --definitions)"
    assert fields["compensated"] == "2 steps"
    assert fields["last error"] == "-"
    assert fields["finished"].endswith("Z")
    assert json.loads(fields["result"]) == {"values": ["a-0", "a-1"], "compensated": [1, 0]}


async def test_status_as_json(mixed: MixedLog) -> None:
    code, out, _ = await cli("status", "dead-1", "--json", repo=mixed.repo)
    assert code == 0
    document = json.loads(out)
    assert document["status"] == "dead-lettered"
    assert document["attempts"] == 2
    assert document["last_error"] == "ConnectionError('execute 1 of dead-1 unavailable')"
    assert document["result"] is None


async def test_status_of_an_unknown_id_fails_with_one_line(mixed: MixedLog) -> None:
    code, out, err = await cli("status", "nope", repo=mixed.repo)
    assert code == 3
    assert out == ""
    assert _one_error_line(err) == "kapbit: no workflow 'nope'\n"


# --- list -----------------------------------------------------------------------------------


def _table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


async def test_list_shows_every_workflow(mixed: MixedLog) -> None:
    code, out, _ = await cli("list", repo=mixed.repo)
    assert code == 0
    header, *rows = _table(out)
    assert header == ["ID", "TYPE", "STATUS", "STEPS", "ATTEMPTS", "CREATED", "FINISHED"]
    assert {row[0]: row[2] for row in rows} == {k: v[0] for k, v in EXPECTED.items()}
    by_id = {row[0]: row for row in rows}
    assert by_id["retry-1"][3:5] == ["3", "1"]
    assert by_id["run-1"][6] == "-"


async def test_list_filters_and_limit(mixed: MixedLog) -> None:
    _, out, _ = await cli("list", "--status", "succeeded", repo=mixed.repo)
    assert [row[0] for row in _table(out)[1:]] == ["ok-1", "ok-2", "retry-1", "zomb-1"]
    _, out, _ = await cli("list", "--status", "dead-lettered", "--type", "order", repo=mixed.repo)
    assert [row[0] for row in _table(out)[1:]] == ["dead-1"]
    _, out, _ = await cli("list", "--type", "other", repo=mixed.repo)
    assert len(_table(out)) == 1  # the header only
    _, out, _ = await cli("list", "--limit", "2", repo=mixed.repo)
    assert len(_table(out)) == 3


async def test_list_as_json_lines(mixed: MixedLog) -> None:
    code, out, _ = await cli("list", "--json", "--status", "compensating", repo=mixed.repo)
    assert code == 0
    documents = [json.loads(line) for line in out.splitlines()]
    assert [(d["id"], d["steps_done"], d["failed_step"]) for d in documents] == [
        ("compensating-1", 1, 1)
    ]


# --- stats ----------------------------------------------------------------------------------


async def test_stats_counts_by_status_and_type(mixed: MixedLog) -> None:
    code, out, _ = await cli("stats", repo=mixed.repo)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "by status:"
    section = lines[1 : lines.index("by type:")]
    counts = {line.split()[0]: int(line.split()[1]) for line in section}
    assert counts == {
        "running": 1,
        "compensating": 1,
        "retrying": 1,
        "succeeded": 4,
        "compensated": 1,
        "dead-lettered": 1,
        "rejected": 1,
    }
    assert lines[lines.index("by type:") + 1].split() == ["order", "10"]
    assert lines[-1].split() == ["total:", "10"]


async def test_stats_as_json(mixed: MixedLog) -> None:
    _, out, _ = await cli("stats", "--json", repo=mixed.repo)
    document = json.loads(out)
    assert document["total"] == 10
    assert document["by_type"] == {"order": 10}
    assert document["by_status"]["succeeded"] == 4
    assert document["by_type_and_status"]["order"]["retrying"] == 1


# --- tail -----------------------------------------------------------------------------------


async def test_tail_from_the_beginning_until_the_end(mixed: MixedLog) -> None:
    code, out, _ = await cli("tail", "--from-beginning", "--until-end", repo=mixed.repo)
    assert code == 0
    lines = out.splitlines()
    records = mixed.repo.records()
    assert len(lines) == len(records) - len(mixed.zombie_offsets)
    where = [tuple(int(x) for x in line.split()[0].split(":")) for line in lines]
    for zombie in mixed.zombie_offsets:
        assert zombie not in where
    for p in range(2):  # log order within a partition
        offsets = [o for q, o in where if q == p]
        assert offsets == sorted(offsets)
    claim = f"0:0 active_writer node={mixed.writer_a} at="
    assert lines[where.index((0, 0))].startswith(claim)
    by_where = dict(zip(where, lines, strict=True))
    first_step = next(
        r for r in records if r.key == "ok-1" and r.kind == "step_outcome" and r.partition == 0
    )
    line = by_where[(0, first_step.offset)]
    assert line.startswith(f"0:{first_step.offset} step_outcome ok-1 step=0 ")
    assert 'phase="execute" success=true value="a-0"' in line
    dead = next(line for line in lines if " dead_letter dead-1 " in line)
    assert "attempts=2" in dead
    assert "error=\"ConnectionError('execute 1 of dead-1 unavailable')\"" in dead


async def test_tail_as_json(mixed: MixedLog) -> None:
    _, out, _ = await cli("tail", "--from-beginning", "--until-end", "--json", repo=mixed.repo)
    documents = [json.loads(line) for line in out.splitlines()]
    results = {d["id"]: d for d in documents if d["kind"] == "workflow_result"}
    assert results["zomb-1"]["result"] == {"values": ["a-0", "b-1", "b-2"], "compensated": []}
    assert results["zomb-1"]["node"] == mixed.writer_b
    assert results["zomb-1"]["workflow_type"] == "order"
    created_docs = [d for d in documents if d["kind"] == "workflow_created"]
    assert {d["id"] for d in created_docs} == set(EXPECTED)
    assert all(d["input"]["id"] == d["id"] for d in created_docs)


async def test_tail_stops_after_max_events(mixed: MixedLog) -> None:
    code, out, _ = await cli("tail", "--from-beginning", "--max-events", "3", repo=mixed.repo)
    assert code == 0
    assert len(out.splitlines()) == 3


async def test_tail_follows_only_new_events() -> None:
    repo = TailWatched(partitions=2)
    for p in range(2):
        await append(repo, p, "n", writer("n"))
    await append(repo, 0, "n", created("old"))
    tail = asyncio.create_task(cli("tail", "--max-events", "2", repo=repo))
    for event in repo.tailing:
        await asyncio.wait_for(event.wait(), 5)
    await append(repo, 1, "zombie", created("ghost"))
    await append(repo, 1, "n", created("new"))
    await append(repo, 1, "n", outcome("new", 0))
    code, out, _ = await asyncio.wait_for(tail, 5)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["1:2", "workflow_created", "new"],
        ["1:3", "step_outcome", "new"],
    ]


async def test_tail_with_the_msgpack_codec() -> None:
    definition = Definition("one", steps=[Step(lambda i, p: Success(i + 1))])
    repo = MemRepository()
    async with Kapbit([definition], repo, MsgpackCodec()) as kbit:
        assert await kbit.exec_workflow("m1", "one", 41) == [42]
    code, out, _ = await cli(
        "tail", "--from-beginning", "--until-end", "--codec", "msgpack", repo=repo
    )
    assert code == 0
    assert "step_outcome m1 step=0" in out
    assert "value=42" in out
    code, _, err = await cli("tail", "--from-beginning", "--until-end", repo=repo)
    assert code == 1
    assert "CorruptRecord" in _one_error_line(err)


# --- sources and errors ---------------------------------------------------------------------


async def test_db_is_kept_up_to_date_and_queried_alone(mixed: MixedLog, tmp_path: Path) -> None:
    db = str(tmp_path / "status.db")
    code, _, _ = await cli("stats", "--db", db, repo=mixed.repo)
    assert code == 0
    code, out, _ = await cli("status", "ok-2", "--db", db)  # no log: the database alone
    assert code == 0
    assert "succeeded" in out
    await append(mixed.repo, 0, mixed.writer_b, created("later"))
    code, out, _ = await cli("status", "later", "--db", db)
    assert code == 3  # not projected yet
    code, out, _ = await cli("list", "--status", "running", "--db", db, repo=mixed.repo)
    assert sorted(row[0] for row in _table(out)[1:]) == ["later", "run-1"]


async def test_missing_database(tmp_path: Path) -> None:
    code, out, err = await cli("list", "--db", str(tmp_path / "absent.db"))
    assert (code, out) == (1, "")
    assert "no status database at" in _one_error_line(err)
    assert not (tmp_path / "absent.db").exists()


async def test_no_source_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAPBIT_BOOTSTRAP", raising=False)
    monkeypatch.delenv("KAPBIT_TOPIC", raising=False)
    code, _, err = await cli("stats")
    assert code == 1
    assert "--bootstrap and --topic" in _one_error_line(err)
    code, _, err = await cli("status", "x", "--bootstrap", "localhost:9092")
    assert code == 1
    assert "needs --topic (or $KAPBIT_TOPIC)" in _one_error_line(err)
    code, _, err = await cli("status", "x", "--topic", "orders")
    assert code == 1
    assert "needs --bootstrap (or $KAPBIT_BOOTSTRAP)" in _one_error_line(err)


async def test_tail_needs_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAPBIT_BOOTSTRAP", raising=False)
    monkeypatch.delenv("KAPBIT_TOPIC", raising=False)
    code, _, err = await cli("tail")
    assert code == 1
    assert "tail reads the log" in _one_error_line(err)


def test_usage_errors_exit_with_2() -> None:
    parser = build_parser()
    for argv in (["list", "--status", "bogus"], ["tail", "--max-events", "0"], []):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2


async def _run_module(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kapbit.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_main_as_a_process(mixed: MixedLog, tmp_path: Path) -> None:
    db = str(tmp_path / "status.db")
    assert (await cli("stats", "--db", db, repo=mixed.repo))[0] == 0
    code, out, err = await _run_module("list", "--status", "rejected", "--db", db)
    assert (code, err) == (0, "")
    assert [row[0] for row in _table(out)[1:]] == ["rej-1"]
    code, out, err = await _run_module("status", "missing", "--db", db)
    assert (code, out) == (3, "")
    assert _one_error_line(err) == "kapbit: no workflow 'missing'\n"


# --- usage --------------------------------------------------------------------------------------


def test_a_bad_number_is_named_in_plain_words(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv, expected in (
        (["list", "--limit", "abc"], "argument --limit: expected a whole number, got 'abc'"),
        (["list", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["tail", "--max-events", "x"], "argument --max-events: expected a whole number"),
        (["stats", "--timeout", "soon"], "argument --timeout: expected a number of seconds"),
        (["stats", "--timeout", "-1"], "argument --timeout: must be more than 0 seconds"),
    ):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert expected in err, err
        assert "_positive" not in err and "_seconds" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"kapbit {kapbit.__version__}\n"


async def test_version_of_the_installed_command() -> None:
    code, out, err = await _run_module("--version")
    assert (code, err) == (0, "")
    assert out.strip() == f"kapbit {kapbit.__version__}"
