#!/usr/bin/env bash
# One device, no collectives: bash scripts/run_standalone.sh COMMAND --config X.yaml [--set k=v ...]
# DEVICE_ID selects the Ascend card (runtime.device_id).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${MSNC_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
exec "$PYTHON" "$ROOT/scripts/msnc_entry.py" "$@" --set "runtime.device_id=${DEVICE_ID:-0}" --set parallel.world_size=1
