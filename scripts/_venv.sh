# Sourced by the scripts: make sure .venv exists with kapbit and its dev extra installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# Reinstall when pyproject.toml changed or the version did (the editable install's
# metadata, which importlib.metadata reports, is written at install time).
stamp=.venv/.kapbit-installed
version="$(grep -m1 '^__version__ = ' kapbit/__init__.py)"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$version" ]; then
  echo "installing kapbit and its dev dependencies into .venv ..." >&2
  if ! .venv/bin/python -m pip install -e ".[dev]" >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    exit 1
  fi
  printf '%s\n' "$version" >"$stamp"
fi
