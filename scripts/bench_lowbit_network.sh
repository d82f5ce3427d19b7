#!/usr/bin/env bash
# Step time and real loopback traffic of 2 data-parallel ranks, fp32 all-reduce vs low-bit all-gather, on a
# throttled network: the ranks run inside a private network namespace whose loopback is shaped with tc (tbf).
#
#   sudo bash scripts/bench_lowbit_network.sh [OUT_DIR]
#   env: BITS="32 8 4 2" (32 = fp32 all-reduce)  RATES="none,1gbit,100mbit"  STEPS=3  BATCH=4  SEQ=128
#        SHAPE=minilm (MiniLM-L6-H384, 22.7M parameters) | minilm-2l (2 layers, 8k vocabulary, 6.7M) | small (0.74M)
#        SCHEME=allgather | sharded (scheme 2; WEIGHT_BITS=same|fp32|2..8, BUCKET=1024)
#        RANKS=2  MASTER_PORT=8291  MSNC_PYTHON=.venv/bin/python
#
# Needs root (ip netns, tc); without it the script says so and exits 1. All traffic stays on the namespace's
# loopback; the namespace is deleted on exit (also on failure or Ctrl-C). One msrun launch per bit width runs every
# rate as a phase (rank 0 changes the qdisc between phases), so the model compiles once per bit width. Per phase the
# worker records the median step time and the loopback tx bytes per step; the script also prints the
# namespace's `ip -s link show lo` counters around each launch. Results: OUT_DIR/results.jsonl and a table.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "bench_lowbit_network: needs root (it creates a network namespace and shapes its loopback with tc)" >&2
  exit 1
fi
for tool in ip tc; do
  command -v "$tool" >/dev/null || { echo "bench_lowbit_network: '$tool' not found (iproute2)" >&2; exit 1; }
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${MSNC_PYTHON:-$ROOT/.venv/bin/python}"
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
OUT="${1:-$PWD/bench_lowbit_network}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BITS="${BITS:-32 8 4 2}"
RATES="${RATES:-none,1gbit,100mbit}"
RANKS="${RANKS:-2}"
PORT="${MASTER_PORT:-8291}"
NS="msnc_bench_$$"

cleanup() { ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
ip netns add "$NS"
ip -n "$NS" link set lo up
: > "$OUT/results.jsonl"
export PATH="$(dirname "$PYTHON"):$PATH"  # msrun starts workers with the `python` on PATH
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for bits in $BITS; do
  echo "== bits $bits: $RANKS ranks, phases $RATES" >&2
  echo "   lo before: $(ip -n "$NS" -s link show lo | awk '/TX:/{getline; print $1" bytes "$2" packets"}')" >&2
  ip netns exec "$NS" "$(dirname "$PYTHON")/msrun" --worker_num="$RANKS" --local_worker_num="$RANKS" \
    --master_addr=127.0.0.1 --master_port="$PORT" --log_dir="$OUT/logs_$bits" --join=True --cluster_time_out=300 \
    "$ROOT/scripts/bench_lowbit_worker.py" --bits "$bits" --rates "$RATES" --steps "${STEPS:-3}" \
    --batch "${BATCH:-4}" --seq "${SEQ:-128}" --shape "${SHAPE:-minilm}" --scheme "${SCHEME:-allgather}" \
    --weight-bits "${WEIGHT_BITS:-same}" --bucket "${BUCKET:-1024}" --out "$OUT/results.jsonl" >/dev/null
  echo "   lo after:  $(ip -n "$NS" -s link show lo | awk '/TX:/{getline; print $1" bytes "$2" packets"}')" >&2
done

"$PYTHON" - "$OUT/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
fp32 = {r["rate"]: r for r in rows if r["bits"] == 32}
print("| gradients | link | median step (s) | speed-up vs fp32 | loopback MB/step | fp32/this bytes | handed MB/rank/step |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    base = fp32.get(r["rate"])
    name = "fp32 all-reduce" if r["bits"] == 32 else f"{r['bits']}-bit all-gather"
    if r.get("scheme") == "sharded":
        weights = "fp32" if r["weight_bits"] is None else f"{r['weight_bits']}-bit"
        name = f"{r['bits']}-bit sharded, {weights} weights"
    speed = f"{base['median_step_seconds'] / r['median_step_seconds']:.2f}x" if base else "-"
    ratio = f"{base['loopback_tx_bytes_per_step'] / r['loopback_tx_bytes_per_step']:.1f}" if base else "-"
    print(f"| {name} | {r['rate'] if r['rate'] != 'none' else 'unthrottled'} | {r['median_step_seconds']:.2f} | "
          f"{speed} | {r['loopback_tx_bytes_per_step'] / 1e6:.2f} | {ratio} | "
          f"{r['bytes_handed_per_rank_per_step'] / 1e6:.2f} |")
EOF
