#!/usr/bin/env bash
# Quick start 2: set up, fetch the real MiniLM teacher the real-weight tests need, and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup_env.sh" test)"
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
msnc data fetch
# Each test process pins MindSpore to one CPU thread (tests/conftest.py), so two processes use both cores of a
# laptop; --dist loadfile keeps a module's tests (and its module-scoped fixtures) in one process.
python -m pytest tests -q -p no:cacheprovider -n "${MSNC_TEST_WORKERS:-2}" --dist loadfile --durations=30 "$@"
