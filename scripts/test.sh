#!/usr/bin/env bash
# Quick start 2: set up, fetch the real MiniLM teacher the real-weight tests need, and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup_env.sh" test)"
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
msnc data fetch
python -m pytest tests -q -p no:cacheprovider --durations=30 "$@"
