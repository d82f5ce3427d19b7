#!/usr/bin/env bash
# Quick start 1: set up, fetch the real demo assets (MiniLM weights, VADER sentences), then run the one-command
# compression pipeline on them (ascend_configs/compress_vader_cpu.yaml):
#   fine-tune the MiniLM teacher -> TinyBERT task distillation -> DynaBERT on the student, width 0.5 extracted
#   -> 8-8-8 quantization-aware training of that sub-network -> every model measured (dev/test accuracy, size,
#   MindIR exported and reloaded, latency at batch 1 and 32) -> report.md, report.json and two Pareto plots.
# Results land in runs/compress_vader_cpu/ (RUN_DIR= to change it); a rerun skips the finished stages, and a killed
# run resumes where it stopped. The report table ends the run.
# The backbone tour of earlier versions (probe, regression, NEZHA pre-training, export): scripts/demo_backbone.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup_env.sh" test)"
export PATH="$VENV/bin:$PATH"   # msrun workers start `python` from PATH
export GLOG_v="${GLOG_v:-3}"    # MindSpore: errors only (its graph-compiler warnings are noise here; GLOG_v=2 shows them)
cd "$ROOT"
RUN_DIR="${RUN_DIR:-runs/compress_vader_cpu}"
msnc data fetch
msnc compress --config ascend_configs/compress_vader_cpu.yaml --set "run_dir=$RUN_DIR"
echo "plots: $RUN_DIR/pareto_size.png $RUN_DIR/pareto_latency.png"
