"""kill -9 mid-run with error feedback, resume from the Trainer's checkpoint: identical weights, residual, rounding
noise position and warm-up counter to an uninterrupted run (one process: the reducer state goes to the per-rank
file step-*.rank0.safetensors; the 2-rank resume is test_lowbit_rank_resume.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__).resolve().parent / "lowbit_resume_worker.py"
STEPS = "6"


def test_kill_minus_nine_with_error_feedback_resumes_exactly(tmp_path):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    reference = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "reference"), STEPS], env=environment,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    victim = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "victim"), STEPS], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "victim" / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while not pointer.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # right after its first checkpoint (update 1 or 2 of 6)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    assert not (tmp_path / "victim" / "final.npz").exists()
    resumed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "victim"), STEPS], env=environment,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = dict(np.load(tmp_path / "reference" / "final.npz"))
    actual = dict(np.load(tmp_path / "victim" / "final.npz"))
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(expected[name], actual[name], err_msg=name)
    assert int(expected["exchanges"]) == 6 and int(expected["stream"]) == 5  # 1 fp32 warm-up + 5 low-bit draws
    assert np.abs(expected["residual"]).max() > 0  # the carried error was really non-trivial state
