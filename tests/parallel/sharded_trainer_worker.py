"""`msnc finetune` under msrun with `comm.scheme: sharded`; test_sharded_trainer.py launches it.

    msrun ... sharded_trainer_worker.py RECORD_DIR finetune --config X.yaml [--set k=v ...] [:: finetune ...]

runs the msnc CLI (what scripts/run_distributed.sh starts through scripts/msnc_entry.py), once per `::`-separated
command, and, as test instrumentation only, records on every rank for command i:
    RECORD_DIR/<i>/batches_<rank>.npz   the input arrays of every micro-batch the engine trained on (for the twin)
    RECORD_DIR/<i>/final_<rank>.npz     the model's Parameters after training
    RECORD_DIR/<i>/trainer_<rank>.json  the update cell's comm_stats and what `trainer.optimizer` answers
With SHARDED_WORKER_PAUSE=s in the environment each micro-batch waits s seconds first (a window for kill -9).
A resumed run records only what this launch trained on.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ms_nlp_compress.cli import main as msnc
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.train import step as step_module
from ms_nlp_compress.train import trainer as trainer_module

record_root = Path(sys.argv[1])
record_dir = record_root
batches = []
original_call = step_module.TrainStep.__call__
original_fit = trainer_module.Trainer.fit


def recording_call(self, *inputs):
    pause = float(os.environ.get("SHARDED_WORKER_PAUSE", "0"))  # the kill -9 test's window; changes no result
    if pause:
        time.sleep(pause)
    batches.append([tensor.asnumpy().copy() for tensor in inputs])
    return original_call(self, *inputs)


def recording_fit(self, *args, **kwargs):
    result = original_fit(self, *args, **kwargs)
    weights = {name: param.asnumpy().copy() for name, param in self.model.parameters_and_names()}
    np.savez(record_dir / f"final_{self.rank}.npz", **weights)
    arrays = {f"b{index}_c{column}": value for index, batch in enumerate(batches)
              for column, value in enumerate(batch)}
    np.savez(record_dir / f"batches_{self.rank}.npz", count=len(batches), **arrays)
    try:
        answer = type(self.optimizer).__name__
    except ConfigError as err:
        answer = str(err)
    stats = self.update_cell.comm_stats() if self.update_cell is not None else None
    (record_dir / f"trainer_{self.rank}.json").write_text(json.dumps({"optimizer": answer, "comm": stats}))
    return result


step_module.TrainStep.__call__ = recording_call
trainer_module.Trainer.fit = recording_fit

if __name__ == "__main__":
    commands, current = [], []
    for argument in sys.argv[2:] + ["::"]:
        if argument == "::":
            commands.append(current)
            current = []
        else:
            current.append(argument)
    for index, command in enumerate(commands):
        record_dir = record_root / str(index)
        record_dir.mkdir(parents=True, exist_ok=True)
        batches.clear()
        status = msnc(command)
        if status:
            sys.exit(status)
