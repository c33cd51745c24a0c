"""The typed API as a type checker sees it: ``tests/typing/usage.py`` checked by mypy.

The file's correct uses must check clean (their ``assert_type`` calls hold), and every
planted mistake must be reported: each carries a ``# type: ignore[code]`` that
``warn_unused_ignores`` turns into an error if the checker stops reporting it, and with
the ignores removed, mypy reports an error on each of those lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

USAGE = Path(__file__).parent / "typing" / "usage.py"
_IGNORE = re.compile(r"  # type: ignore\[[^\]]+\]$", re.M)


def _mypy(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--warn-unused-ignores",
            "--no-error-summary",
            "--cache-dir",
            str(cache),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_correct_uses_check_clean_and_every_mistake_is_reported(tmp_path: Path) -> None:
    checked = _mypy(USAGE, tmp_path / "cache")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    source = USAGE.read_text()
    assert all(f"MISTAKE {n}:" in source for n in range(1, 9))
    planted = {
        number for number, line in enumerate(source.splitlines(), start=1) if _IGNORE.search(line)
    }
    assert len(planted) >= 7  # mistake 4 (a typo in a type name) no checker can catch
    bare = tmp_path / "usage_without_ignores.py"
    bare.write_text(_IGNORE.sub("", source))
    unchecked = _mypy(bare, tmp_path / "cache")
    reported = {
        int(match.group(1))
        for match in re.finditer(rf"^{re.escape(str(bare))}:(\d+): error:", unchecked.stdout, re.M)
    }
    assert planted <= reported, f"not reported: {sorted(planted - reported)}\n{unchecked.stdout}"
