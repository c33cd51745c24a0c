"""Every Python snippet of the README runs as written; shell snippets name what exists.

A ``python`` block runs as a script in an empty directory (holding a ``ca.pem`` for the
TLS snippet), with ``KAPBIT_BOOTSTRAP``/``KAPBIT_TOPIC`` naming the suite's broker and a
fresh topic when it uses Kafka. A ``print(...)  # text`` line promises ``text`` in the
output (``...`` matches anything). A block preceded by ``<!-- include: PATH -->`` is an
excerpt of that file, which runs elsewhere in the suite: it must appear there verbatim.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
_INCLUDE = re.compile(r"<!-- include: (\S+) -->\n$")
_PROMISE = re.compile(r"^\s*print\(.*\)\s+# (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Snippet:
    language: str
    code: str
    line: int
    include: str | None


def snippets(text: str) -> list[Snippet]:
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()]
        include = _INCLUDE.search(before)
        found.append(
            Snippet(
                match.group(1),
                match.group(2),
                before.count("\n") + 1,
                include.group(1) if include else None,
            )
        )
    return found


PYTHON = [s for s in snippets(README.read_text()) if s.language == "python"]


def test_the_readme_has_the_snippets_this_test_expects() -> None:
    """The extraction itself works: the quickstart, the Kafka and TLS snippets, an include."""
    codes = [s.code for s in PYTHON]
    assert any("MemRepository(partitions=1)" in c for c in codes)
    assert any("asyncio.run(main())" in c and "KafkaRepository(" in c for c in codes)
    assert any("import aiokafka.helpers" in c for c in codes)
    assert any(s.include for s in PYTHON)
    assert all(s.language in {"python", "sh", "toml", "text"} for s in snippets(README.read_text()))


def _ca_file(directory: Path) -> None:
    """A CA bundle named ``ca.pem``, as the TLS snippet expects."""
    bundle = ssl.get_default_verify_paths().cafile
    if bundle is None:
        import certifi  # httpx's dependency, in the dev extra

        bundle = certifi.where()
    shutil.copy(bundle, directory / "ca.pem")


@pytest.mark.parametrize("snippet", PYTHON, ids=[f"README.md:{s.line}" for s in PYTHON])
def test_python_snippet_runs_as_written(
    snippet: Snippet, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if snippet.include is not None:
        source = (ROOT / snippet.include).read_text()
        assert snippet.code in source, f"not a verbatim excerpt of {snippet.include}"
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAPBIT_")}
    if "KafkaRepository(" in snippet.code and "asyncio.run(" in snippet.code:
        env["KAPBIT_BOOTSTRAP"] = request.getfixturevalue("kafka_bootstrap")
        env["KAPBIT_TOPIC"] = request.getfixturevalue("topic")
    _ca_file(tmp_path)
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for promise in _PROMISE.findall(snippet.code):
        pattern = ".*".join(re.escape(part) for part in promise.strip().split("..."))
        assert re.search(pattern, done.stdout), (promise, done.stdout)


def test_toml_snippets_parse() -> None:
    blocks = [s for s in snippets(README.read_text()) if s.language == "toml"]
    assert blocks
    for block in blocks:
        assert tomllib.loads(block.code)


def test_extras_named_in_the_readme_exist() -> None:
    """``pip install 'kapbit[x]'`` lines name extras pyproject.toml defines."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = set(re.findall(r"kapbit\[(\w+)\]", README.read_text()))
    assert {"testing", "examples"} <= named
    assert named <= set(extras)


def test_cli_snippets_query_ids_the_order_example_writes() -> None:
    """``kapbit status ID`` in the README names a workflow examples/order_saga_kafka.py runs."""
    ids = re.findall(r"^kapbit status (\S+)", README.read_text(), re.MULTILINE)
    example = (ROOT / "examples" / "order_saga_kafka.py").read_text()
    assert ids
    for workflow_id in ids:
        assert f'Order("{workflow_id}"' in example
