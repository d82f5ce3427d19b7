"""Runs `msnc dynabert train` on a config in its own process (resuming from the checkpoints in its output_dir).

Run by test_dynabert_commands.py, which kills it with SIGKILL during a stage and runs it again.
    python dynabert_train_worker.py CONFIG.yaml
"""
import sys

import mindspore as ms

from ms_nlp_compress.compress.dynabert.run import run_train
from ms_nlp_compress.config import load_config

ms.device_context.cpu.op_tuning.threads_num(1)
run_train(load_config(sys.argv[1]), log=lambda message: None)
