"""scripts/bench_lowbit_network.sh refuses to run without root (it needs ip netns and tc) and exits non-zero."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_lowbit_network.sh"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to drop root")
def test_without_root_the_benchmark_says_so_and_fails(tmp_path):
    # as root, drop to nobody; as a normal user the script sees a non-root id the same way
    command = ["bash", str(SCRIPT), str(tmp_path / "out")]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert "needs root" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was created before the check
