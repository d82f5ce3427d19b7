#!/usr/bin/env bash
# Quick start 1: set up, fetch the real demo assets (teacher weights and data) and run the demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup_env.sh" test)"
export PATH="$VENV/bin:$PATH"   # msrun workers start `python` from PATH
cd "$ROOT"
msnc data fetch
msnc demo --config ascend_configs/cpu_demo.yaml "$@"
