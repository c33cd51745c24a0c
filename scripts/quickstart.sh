#!/usr/bin/env bash
# Run the quickstart example on the in-memory repository (creates .venv on first use).
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python examples/quickstart.py
