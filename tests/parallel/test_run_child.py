"""`run_child` (a pipeline stage in its own process): a failing child is an error naming the stage, and a child
past its time-out is stopped together with the processes it started."""
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ms_nlp_compress.errors import MsncError  # noqa: E402
from ms_nlp_compress.parallel import launch  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_child_failure_and_timeout_stop_the_whole_tree(tmp_path, monkeypatch):
    script = tmp_path / "entry.py"
    pid_file = tmp_path / "grandchild.pid"
    script.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys, time
        if sys.argv[1] == "fail":
            sys.exit(3)
        # ignore SIGINT, as a child busy in native code may: the stop must still end it with SIGKILL
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        time.sleep(120)
    """))
    monkeypatch.setattr(launch, "msnc_entry", lambda: script)
    with pytest.raises(MsncError, match=r"stage x: the child process exited with status 3"):
        launch.run_child(["fail"], "stage x")
    started = time.monotonic()
    with pytest.raises(MsncError, match=r"stage y: did not finish within 3 s"):
        launch.run_child(["sleep"], "stage y", timeout_seconds=3)
    assert time.monotonic() - started < 3 + 10 + 5   # time-out + SIGINT grace + slack
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the child's own child outlived the stop"
