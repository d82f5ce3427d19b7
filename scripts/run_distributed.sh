#!/usr/bin/env bash
# Data-parallel launch with msrun: N ranks on this node (HCCL on Ascend, MindSpore's CPU collectives on CPU).
#
#   bash scripts/run_distributed.sh N COMMAND --config X.yaml [--set k=v ...]
#   e.g. bash scripts/run_distributed.sh 8 finetune --config ascend_configs/ascend910_8p.yaml
#
# The config's parallel section sets msrun's master_port, rank_table_file (for clusters that need an HCCL rank
# table) and cluster_timeout; MASTER_PORT, RANK_TABLE_FILE and CLUSTER_TIMEOUT in the environment override them for
# one launch. Environment only: MASTER_ADDR (default 127.0.0.1), NODE_RANK / WORKER_NUM for several nodes
# (WORKER_NUM = total ranks), LOG_DIR (default ./msrun_logs), MSNC_PYTHON (default: this repo's venv).
# A rank that dies fails the whole job: msrun's exit status is returned and each rank's log tail is printed.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
RANKS="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${MSNC_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
# msrun starts each worker with the `python` found on PATH: put the venv first.
export PATH="$(dirname "$PYTHON"):$PATH"
LOG_DIR="${LOG_DIR:-$PWD/msrun_logs}"
mkdir -p "$LOG_DIR"
# MSNC_MASTER_PORT, MSNC_CLUSTER_TIMEOUT, MSNC_RANK_TABLE_FILE from the config (a bad config fails here, once).
SETTINGS="$("$PYTHON" -m ms_nlp_compress.parallel.launch "$@")"
eval "$SETTINGS"
ARGS=(--worker_num="${WORKER_NUM:-$RANKS}" --local_worker_num="$RANKS"
      --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="$MSNC_MASTER_PORT"
      --log_dir="$LOG_DIR" --join=True --cluster_time_out="$MSNC_CLUSTER_TIMEOUT")
[ -n "${NODE_RANK:-}" ] && ARGS+=(--node_rank="$NODE_RANK")
[ -n "$MSNC_RANK_TABLE_FILE" ] && ARGS+=(--rank_table_file="$MSNC_RANK_TABLE_FILE")
echo "run_distributed: msrun ${ARGS[*]} msnc $*" >&2
status=0
"$(dirname "$PYTHON")/msrun" "${ARGS[@]}" "$ROOT/scripts/msnc_entry.py" "$@" \
  --set "parallel.world_size=${WORKER_NUM:-$RANKS}" || status=$?
if [ "$status" -ne 0 ]; then
  echo "run_distributed: msrun failed with status $status; last lines of each rank's log:" >&2
  for log in "$LOG_DIR"/worker_*.log; do
    [ -f "$log" ] || continue
    echo "==> $log <==" >&2
    grep -v -E "^\[WARNING\]|^$" "$log" | tail -n 15 >&2 || true
  done
fi
exit "$status"
