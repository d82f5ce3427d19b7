"""2 msrun ranks with error feedback: a run stopped mid-way and resumed in fresh processes ends with weights and
per-rank reducer state identical to an uninterrupted run; a checkpoint lacking a rank's file is refused by both
ranks, naming the file; a 1-rank run refuses a 2-rank checkpoint's per-rank state."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms

from ms_nlp_compress.errors import CheckpointError
from ms_nlp_compress.train.checkpoints import LATEST, load_rank_state, rank_state_path

WORKER = Path(__file__).resolve().parent / "lowbit_rank_resume_worker.py"


def launch(tmp_path, mode, port, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    command = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", f"--log_dir={tmp_path / f'logs_{mode}'}",
               "--join=True", "--cluster_time_out=90", str(WORKER), str(tmp_path / "out"), mode]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / f"logs_{mode}").glob("worker_*.log"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs


def test_two_rank_error_feedback_resume_matches_uninterrupted_run(tmp_path):
    out = tmp_path / "out"
    launch(tmp_path, "first", port=8251)
    checkpoints = out / "victim" / "checkpoints"
    assert (checkpoints / LATEST).read_text().strip() == "step-0000002"  # stopped at 3, saved at 2
    for rank in (0, 1):
        assert rank_state_path(checkpoints, "step-0000002", rank).is_file()
    # the residual lives only in the per-rank files, not in rank 0's optimizer state
    optimizer_names = json.loads((checkpoints / "step-0000002" / "state.json").read_text())
    assert optimizer_names["per_rank_state"] is True and optimizer_names["world_size"] == 2
    from ms_nlp_compress.models.checkpoint import read_safetensors

    assert not any("residual" in name for name in read_safetensors(checkpoints / "step-0000002" /
                                                                     "optimizer.safetensors"))
    # a copy of the victim's checkpoint that lost rank 1's file
    shutil.copytree(checkpoints, out / "missing" / "checkpoints")
    missing = rank_state_path(out / "missing" / "checkpoints", "step-0000002", 1)
    missing.unlink()

    launch(tmp_path, "resume", port=8252)
    for rank in (0, 1):  # both ranks refuse, naming the absent file
        message = json.loads((out / f"refusal_{rank}.json").read_text())["message"]
        assert message is not None and str(missing) in message, message

    finals = {run: [dict(np.load(out / run / f"final_{rank}.npz")) for rank in (0, 1)]
              for run in ("reference", "victim")}
    for rank in (0, 1):
        expected, actual = finals["reference"][rank], finals["victim"][rank]
        assert expected.keys() == actual.keys()
        for name in expected:
            np.testing.assert_array_equal(expected[name], actual[name], err_msg=f"rank {rank}: {name}")
        assert int(actual["exchanges"]) == 5 and int(actual["stream"]) == 4  # 1 fp32 warm-up + 4 low-bit draws
    # keep_checkpoints 1: the pruned checkpoints' rank files went with them
    victim_files = sorted(p.name for p in (out / "victim" / "checkpoints").iterdir())
    assert victim_files == [LATEST, "step-0000005", "step-0000005.rank0.safetensors",
                            "step-0000005.rank1.safetensors"], victim_files
    reference = finals["reference"]
    # the residuals really are per-rank state (loading rank 0's into rank 1 would change the run) ...
    assert np.abs(reference[0]["residual"]).max() > 0
    assert not np.array_equal(reference[0]["residual"], reference[1]["residual"])
    # ... while the weights stay bit-identical across ranks
    for name in reference[0]:
        if name not in ("residual", "exchanges", "stream"):
            np.testing.assert_array_equal(reference[0][name], reference[1][name], err_msg=name)

    # a 1-rank run cannot take over a 2-rank checkpoint's per-rank state
    from ms_nlp_compress.parallel.comm_config import CommConfig
    from ms_nlp_compress.parallel.lowbit import LowBitAllGatherReducer

    params = [ms.Parameter(ms.Tensor(np.zeros((8,), np.float32)), name="w")]
    reducer = LowBitAllGatherReducer(params, CommConfig(scheme="allgather", gradient_bits=2, error_feedback=True),
                                     world_size=1)
    with pytest.raises(CheckpointError) as caught:
        load_rank_state(out / "victim" / "checkpoints" / "step-0000005", 0, 1, [reducer])
    assert str(rank_state_path(out / "victim" / "checkpoints", "step-0000005", 0)) in str(caught.value)
    assert "of 2" in str(caught.value) and "of 1" in str(caught.value)
