"""2 CPU ranks under msrun: identical weights on both ranks, equal to one process on the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "dp_worker.py"


def environment(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MSNC_PYTHON=sys.executable,
               LOG_DIR=str(tmp_path / "logs"), CLUSTER_TIMEOUT="120")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def launch(tmp_path, *worker_args, port):
    """run_distributed.sh runs msnc commands; the test launches its worker through msrun with the same flags."""
    env = environment(tmp_path)
    command = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", f"--log_dir={tmp_path / 'logs'}", "--join=True",
               "--cluster_time_out=120", str(WORKER), *worker_args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


def test_two_ranks_match_each_other_and_one_process(tmp_path):
    result = launch(tmp_path, str(tmp_path / "dp"), "2", port=8231)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "logs").glob("worker_*.log"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single"), "1"], env=environment(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1 = (dict(np.load(tmp_path / "dp" / f"rank_{r}.npz")) for r in (0, 1))
    reference = dict(np.load(tmp_path / "single" / "rank_0.npz"))
    initial = dict(np.load(tmp_path / "dp" / "initial_0.npz"))
    np.testing.assert_array_equal(initial["classifier.weight"],
                                  np.load(tmp_path / "dp" / "initial_1.npz")["classifier.weight"])  # same start
    for name in reference:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=f"ranks differ on {name}")
        np.testing.assert_allclose(rank0[name], reference[name], atol=2e-5, err_msg=f"DP vs single on {name}")
    # training really happened: every trainable matrix moved from its initial value, by far more than the DP
    # tolerance (so the equalities above are not those of two untrained copies)
    trained = [name for name in reference if name.endswith(("weight", "embedding_table", "gamma"))]
    assert trained
    for name in trained:
        assert np.abs(rank0[name] - initial[name]).max() > 1e-3, f"{name} did not move"
    assert (tmp_path / "dp" / "run" / "checkpoints" / "LATEST").is_file()  # rank 0 wrote the checkpoint


def test_a_dying_rank_fails_the_launch(tmp_path):
    result = launch(tmp_path, str(tmp_path / "dp"), "2", "die", port=8232)
    assert result.returncode != 0
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("worker_*.log"))
    assert "rank 1 fails on purpose" in logs


def test_launcher_script_passes_world_size_and_reports_failures(tmp_path):
    """scripts/run_distributed.sh: a bad config fails on every rank, and the script shows the logs' tails."""
    env = environment(tmp_path)
    env["MASTER_PORT"] = "8233"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_distributed.sh"), "2", "finetune", "--config",
                             str(tmp_path / "missing.yaml")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "missing.yaml: config file not found" in result.stderr + result.stdout
