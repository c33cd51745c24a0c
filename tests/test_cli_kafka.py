"""The ``kapbit`` command line and the projector against a Kafka topic."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from kapbit import DeadLettered, Kapbit, WillRetryLater
from kapbit.cli import execute
from kapbit.projection import Projector, StatusModel, WorkflowStatus
from kapbit.repository.kafka import KafkaRepository
from tests.projection_logs import TYPE, Behaviour, options, order, order_definition

ROOT = Path(__file__).resolve().parent.parent


def _environment(**variables: str) -> dict[str, str]:
    """This process's environment without ``KAPBIT_*``, plus ``variables``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KAPBIT_")}
    return {**environment, **variables}


async def _run_cli(
    *argv: str, timeout: float = 120, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``python -m kapbit.cli ARGV`` in a process of its own, as a user runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kapbit.cli",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _one_error_line(err: str) -> str:
    assert err.startswith("kapbit: "), err
    assert err.count("\n") == 1, err
    return err


async def _write_log(bootstrap: str, topic: str) -> None:
    """Three successes, a compensation and a dead letter on a two-partition topic."""
    behaviour = Behaviour("a")
    repo = KafkaRepository(bootstrap, topic, partitions=2)
    async with Kapbit([order_definition(behaviour)], repo, options=options("node-k")) as kbit:
        for wid in ("k-1", "k-2", "k-3"):
            await kbit.exec_workflow(wid, TYPE, order(wid))
        await kbit.exec_workflow("k-comp", TYPE, order("k-comp", s1_execute=["fail"]))
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow("k-dead", TYPE, order("k-dead", s0_execute=["raise"]))
        with pytest.raises(DeadLettered):
            await kbit.wait_result("k-dead", timeout=60)


@pytest.fixture
async def kafka_log(kafka_bootstrap: str, topic: str) -> tuple[str, str]:
    await _write_log(kafka_bootstrap, topic)
    return kafka_bootstrap, topic


async def test_status_list_stats_from_a_topic(kafka_log: tuple[str, str]) -> None:
    bootstrap, topic = kafka_log
    source = ["--bootstrap", bootstrap, "--topic", topic]
    code, out, err = await _run_cli("status", "k-comp", *source)
    assert (code, err) == (0, "")
    assert "compensated" in out
    code, out, _ = await _run_cli("list", "--status", "succeeded", *source)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["k-1", "k-2", "k-3"]
    code, out, _ = await _run_cli("stats", "--json", *source)
    assert code == 0
    document = json.loads(out)
    assert document["by_status"] == {"succeeded": 3, "compensated": 1, "dead-lettered": 1}
    assert document["by_type"] == {TYPE: 5}


async def test_unknown_id_in_a_topic(kafka_log: tuple[str, str]) -> None:
    bootstrap, topic = kafka_log
    code, out, err = await _run_cli("status", "nope", "--bootstrap", bootstrap, "--topic", topic)
    assert (code, out) == (3, "")
    assert _one_error_line(err) == "kapbit: no workflow 'nope'\n"


async def test_tail_a_topic(kafka_log: tuple[str, str]) -> None:
    bootstrap, topic = kafka_log
    code, out, _ = await _run_cli(
        "tail", "--from-beginning", "--until-end", "--bootstrap", bootstrap, "--topic", topic
    )
    assert code == 0
    lines = out.splitlines()
    kinds = [line.split()[1] for line in lines]
    assert kinds.count("active_writer") == 2
    assert kinds.count("workflow_created") == 5
    assert kinds.count("workflow_result") == 4
    assert kinds.count("dead_letter") == 1
    assert all(line.split()[0].split(":")[0] in {"0", "1"} for line in lines)


async def test_tail_follows_a_topic(kafka_log: tuple[str, str]) -> None:
    bootstrap, topic = kafka_log
    out = io.StringIO()
    # Everything so far plus what a new instance writes (its 2 claims, then created,
    # 3 outcomes and the result of one workflow): the tail must wait for them.
    _, existing, _ = await _run_cli(
        "tail", "--from-beginning", "--until-end", "--bootstrap", bootstrap, "--topic", topic
    )
    total = len(existing.splitlines()) + 2 + 1 + 3 + 1
    tail = asyncio.create_task(
        execute(
            [
                "tail",
                "--from-beginning",
                "--max-events",
                str(total),
                "--bootstrap",
                bootstrap,
                "--topic",
                topic,
            ],
            out=out,
        )
    )
    repo = KafkaRepository(bootstrap, topic)
    async with Kapbit([order_definition(Behaviour("b"))], repo, options=options("node-l")) as kbit:
        await kbit.exec_workflow("k-new", TYPE, order("k-new"))
    assert await asyncio.wait_for(tail, 60) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == total
    assert any(" workflow_result k-new " in line for line in lines)


async def test_db_kept_from_a_topic_then_queried_alone(
    kafka_log: tuple[str, str], tmp_path: Path
) -> None:
    bootstrap, topic = kafka_log
    db = str(tmp_path / "status.db")
    code, _, _ = await _run_cli("stats", "--db", db, "--bootstrap", bootstrap, "--topic", topic)
    assert code == 0
    code, out, _ = await _run_cli("status", "k-dead", "--db", db)
    assert code == 0
    assert "dead-lettered" in out


async def test_missing_topic(kafka_bootstrap: str, topic: str) -> None:
    code, out, err = await _run_cli("stats", "--bootstrap", kafka_bootstrap, "--topic", topic)
    assert (code, out) == (1, "")
    assert topic in _one_error_line(err)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_unreachable_broker() -> None:
    bootstrap = f"127.0.0.1:{_closed_port()}"
    code, out, err = await _run_cli(
        "list", "--bootstrap", bootstrap, "--topic", "kapbit-none", "--timeout", "5"
    )
    assert (code, out) == (1, "")
    assert bootstrap in _one_error_line(err)


async def test_projector_follows_a_topic_alongside_an_instance(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    repo = KafkaRepository(kafka_bootstrap, topic, partitions=2)
    async with (
        Kapbit([order_definition(Behaviour("a"))], repo, options=options("node-p")) as kbit,
        StatusModel(tmp_path / "status.db") as model,
    ):
        reader = KafkaRepository(kafka_bootstrap, topic)
        async with Projector(reader, model) as projector:
            running = asyncio.create_task(projector.run())
            await asyncio.gather(
                *(kbit.exec_workflow(f"p-{i}", TYPE, order(f"p-{i}")) for i in range(10))
            )
            await projector.wait_caught_up(timeout=60)
            counts = await model.counts_by_status()
            await projector.close()
            await running
    assert counts == {WorkflowStatus.SUCCEEDED: 10}


async def test_the_readme_sequence_after_the_order_example(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """The README's commands, as written, after ``examples/order_saga_kafka.py``."""
    example = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "order_saga_kafka.py"),
        "--bootstrap",
        kafka_bootstrap,
        "--topic",
        topic,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, example_err = await asyncio.wait_for(example.communicate(), 120)
    assert example.returncode == 0, example_err.decode()
    env = _environment(KAPBIT_BOOTSTRAP=kafka_bootstrap, KAPBIT_TOPIC=topic)
    db = str(tmp_path / "status.sqlite3")
    definitions = "examples.order_saga_kafka:ORDER"
    code, out, err = await _run_cli(
        "project", "--once", "--db", db, "--definitions", definitions, env=env
    )
    assert (code, out) == (0, ""), err
    assert err.splitlines()[-1].startswith("kapbit: caught up: ")
    code, out, err = await _run_cli("status", "order-2", "--db", db, env=env)
    assert (code, err) == (0, "")
    assert "failed step: charge (step index 1)" in out
    assert "status:      compensated" in out
    code, out, _ = await _run_cli("list", "--status", "compensated", "--db", db, env=env)
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["order-2", "order-4"]
    code, out, _ = await _run_cli("stats", "--json", "--db", db, env=env)
    assert json.loads(out)["by_status"] == {"succeeded": 3, "compensated": 2}
    code, out, _ = await _run_cli("tail", "--from-beginning", "--until-end", "--json", env=env)
    assert code == 0
    documents = [json.loads(line) for line in out.splitlines()]
    assert sum(d["kind"] == "workflow_result" for d in documents) == 5
    # Queries with --db read the database only: an unreachable broker in the environment
    # changes nothing.
    unreachable = _environment(KAPBIT_BOOTSTRAP=f"127.0.0.1:{_closed_port()}", KAPBIT_TOPIC=topic)
    code, out, err = await _run_cli("status", "order-2", "--db", db, env=unreachable)
    assert (code, err) == (0, "")
    assert "compensated" in out


async def test_project_follows_a_topic_until_sigterm(
    kafka_log: tuple[str, str], tmp_path: Path
) -> None:
    bootstrap, topic = kafka_log
    db = str(tmp_path / "status.db")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kapbit.cli",
        "project",
        "--db",
        db,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_environment(),
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        while not lines or "following the log" not in lines[-1]:
            line = await asyncio.wait_for(process.stderr.readline(), 120)
            assert line, f"project ended early: {lines}"
            lines.append(line.decode())
        assert lines[-1].startswith("kapbit: caught up, following the log")
        repo = KafkaRepository(bootstrap, topic)
        async with Kapbit(
            [order_definition(Behaviour("s"))], repo, options=options("node-s")
        ) as kbit:
            await kbit.exec_workflow("k-late", TYPE, order("k-late"))
        async with StatusModel(db, create=False) as model, asyncio.timeout(60):
            # Another process writes the database: nothing to await but the file itself.
            while (row := await model.get("k-late")) is None or not row.status.terminal:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert row.status is WorkflowStatus.SUCCEEDED
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
