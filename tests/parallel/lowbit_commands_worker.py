"""`msnc distill task` / `msnc quantize` under msrun with a `comm:` section; test_lowbit_commands_msrun.py launches it.

    msrun ... lowbit_commands_worker.py RECORD_DIR distill task --config X.yaml [--set k=v ...] [:: quantize ...]

runs the msnc CLI (what scripts/run_distributed.sh starts through scripts/msnc_entry.py), once per `::`-separated
command, on to the next command even when one fails, and, as test instrumentation only, records on every rank:
    RECORD_DIR/<i>/status_<rank>.json          command i's exit status and what it printed to stderr
    RECORD_DIR/<i>/fit<j>_initial_<rank>.npz   the model's Parameters when the j-th Trainer.fit of command i starts
    RECORD_DIR/<i>/fit<j>_final_<rank>.npz     ... and when it returns
    RECORD_DIR/<i>/fit<j>_teacher_<rank>.npz   the loss cell's teacher Parameters after that fit (distillers only)
    RECORD_DIR/<i>/fit<j>_trainer_<rank>.json  the update cell's / reducer's comm_stats after that fit
"""
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mindspore.communication import get_rank

from ms_nlp_compress.cli import main as msnc
from ms_nlp_compress.train import trainer as trainer_module

record_dir = Path(sys.argv[1])
fits = [0]
original_fit = trainer_module.Trainer.fit


def weights_of(cell):
    return {param.name: param.asnumpy().copy() for param in cell.get_parameters()}


def recording_fit(self, *args, **kwargs):
    index = fits[0]
    fits[0] += 1
    np.savez(record_dir / f"fit{index}_initial_{self.rank}.npz", **weights_of(self.model))
    result = original_fit(self, *args, **kwargs)
    np.savez(record_dir / f"fit{index}_final_{self.rank}.npz", **weights_of(self.model))
    teacher = getattr(self.loss_cell, "teacher", None)
    if teacher is not None:
        np.savez(record_dir / f"fit{index}_teacher_{self.rank}.npz", **weights_of(teacher))
    exchange = self.update_cell if self.update_cell is not None else self.reducer
    stats = exchange.comm_stats() if hasattr(exchange, "comm_stats") else None
    (record_dir / f"fit{index}_trainer_{self.rank}.json").write_text(json.dumps({"comm": stats}))
    return result


def rank_id() -> int:
    try:
        return get_rank()
    except RuntimeError:  # the command failed before joining the group: msrun's own variable
        return int(os.environ["MS_NODE_ID"])


trainer_module.Trainer.fit = recording_fit

if __name__ == "__main__":
    commands, current = [], []
    for argument in sys.argv[2:] + ["::"]:
        if argument == "::":
            commands.append(current)
            current = []
        else:
            current.append(argument)
    root = record_dir
    for index, command in enumerate(commands):
        record_dir = root / str(index)
        record_dir.mkdir(parents=True, exist_ok=True)
        fits[0] = 0
        captured = io.StringIO()
        with contextlib.redirect_stderr(captured):
            status = msnc(command)
        sys.stderr.write(captured.getvalue())
        (record_dir / f"status_{rank_id()}.json").write_text(json.dumps({"status": status,
                                                                          "stderr": captured.getvalue()}))
        # wait for every rank to finish command i before command i + 1 starts: rank 0 alone exports and reloads
        # the MindIR after `msnc quantize`, and a rank already in the next command's first collective would time
        # out waiting for it (about 30 s on the CPU backend; one launch per command has no such gap)
        world = int(os.environ.get("MS_WORKER_NUM", "1"))
        deadline = time.time() + 600
        while len(list(record_dir.glob("status_*.json"))) < world and time.time() < deadline:
            time.sleep(0.5)
