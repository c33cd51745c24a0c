#!/usr/bin/env bash
# Run the whole test suite (creates .venv on first use). Kafka tests start a local broker
# themselves unless KAPBIT_TEST_BOOTSTRAP names one. Extra arguments go to pytest.
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest "$@"
