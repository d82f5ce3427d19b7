"""Runs `msnc quantize` on a config in its own process (resuming from the checkpoints in its output_dir).

Run by test_quant_command.py, which kills it with SIGKILL during QAT and runs it again.
    python quant_worker.py CONFIG.yaml
"""
import sys

import mindspore as ms

from ms_nlp_compress.compress.quant.run import run_quantize
from ms_nlp_compress.config import load_config

ms.device_context.cpu.op_tuning.threads_num(1)
run_quantize(load_config(sys.argv[1]), log=lambda message: None)
