"""Runs `msnc distill task` on a config in its own process (resuming from the checkpoints in its output_dir).

Run by test_distill_commands.py, which kills it with SIGKILL during stage 1 and runs it again.
    python distill_worker.py CONFIG.yaml
"""
import sys

import mindspore as ms

from ms_nlp_compress.compress.distill.run import run_task
from ms_nlp_compress.config import load_config

ms.device_context.cpu.op_tuning.threads_num(1)
run_task(load_config(sys.argv[1]), log=lambda message: None)
