"""The msrun settings of a launch, read from the command's own config (its `parallel:` section), and the msrun
command line itself (`msrun_command`, `run_msrun`: how `msnc compress` runs a data-parallel stage).

`scripts/run_distributed.sh N COMMAND --config X.yaml [--set k=v ...]` asks this module for the msrun flags, so the
port, the rank table and the cluster time-out written in the config are the ones msrun uses. An environment
variable (MASTER_PORT, RANK_TABLE_FILE, CLUSTER_TIMEOUT) overrides the config for one launch, e.g. to move a job to
a free port without editing the file. Prints shell assignments for `eval`.

    python -m ms_nlp_compress.parallel.launch finetune --config X.yaml --set parallel.master_port=9000
    -> MSNC_MASTER_PORT=9000 MSNC_CLUSTER_TIMEOUT=600 MSNC_RANK_TABLE_FILE=''
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ms_nlp_compress.errors import ConfigError, MsncError


def launch_settings(argv: Sequence[str], environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """msrun settings for the msnc command line `argv` (COMMAND [--config X] [--set k=v ...])."""
    from ms_nlp_compress.config import ParallelConfig, load_config

    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = parser.parse_known_args(list(argv))
    parallel = load_config(known.config, known.overrides).parallel if known.config else ParallelConfig()
    return parallel_settings(parallel, environ, known.config)


def parallel_settings(parallel, environ: Optional[Dict[str, str]] = None, source: Optional[str] = None,
                      master_port: Optional[int] = None) -> Dict[str, str]:
    """msrun settings from a resolved `parallel:` section; `master_port` (e.g. a pipeline's `launch.master_port`)
    replaces the section's port, and the environment overrides both."""
    environ = os.environ if environ is None else environ
    rank_table = environ.get("RANK_TABLE_FILE") or parallel.rank_table_file or ""
    if rank_table and not Path(rank_table).is_file():
        where = "RANK_TABLE_FILE" if environ.get("RANK_TABLE_FILE") else f"{source}: parallel.rank_table_file"
        raise ConfigError(f"{where}: rank table {rank_table} not found")
    return {
        "MSNC_MASTER_PORT": environ.get("MASTER_PORT") or str(master_port or parallel.master_port),
        "MSNC_CLUSTER_TIMEOUT": environ.get("CLUSTER_TIMEOUT") or str(parallel.cluster_timeout),
        "MSNC_RANK_TABLE_FILE": rank_table,
    }


def msnc_entry() -> Path:
    """scripts/msnc_entry.py: msrun starts a script file, not a console entry point."""
    entry = Path(__file__).resolve().parents[2] / "scripts" / "msnc_entry.py"
    if not entry.is_file():
        raise MsncError(f"{entry} not found: msrun launches need the repository's scripts/ folder")
    return entry


def msrun_command(workers: int, command: Sequence[str], settings: Dict[str, str], log_dir: Path,
                  environ: Optional[Dict[str, str]] = None) -> List[str]:
    """The argv of `msrun` running `msnc COMMAND...` on `workers` ranks of this node, with the same flags as
    scripts/run_distributed.sh (MASTER_ADDR from the environment, default 127.0.0.1)."""
    environ = os.environ if environ is None else environ
    msrun = Path(sys.executable).parent / "msrun"
    if not msrun.is_file():
        found = shutil.which("msrun")
        if found is None:
            raise MsncError(f"msrun not found next to {sys.executable} nor on PATH (is MindSpore installed?)")
        msrun = Path(found)
    argv = [str(msrun), f"--worker_num={workers}", f"--local_worker_num={workers}",
            f"--master_addr={environ.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master_port={settings['MSNC_MASTER_PORT']}", f"--log_dir={log_dir}", "--join=True",
            f"--cluster_time_out={settings['MSNC_CLUSTER_TIMEOUT']}"]
    if settings["MSNC_RANK_TABLE_FILE"]:
        argv.append(f"--rank_table_file={settings['MSNC_RANK_TABLE_FILE']}")
    return argv + [str(msnc_entry())] + list(command)


def worker_log_tails(log_dir: Path, lines: int = 8) -> str:
    """Each rank's last log lines (MindSpore's [WARNING] / [INFO] lines left out): the usual cause of a failure."""
    parts = []
    for path in sorted(Path(log_dir).glob("worker_*.log")):
        kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if line.strip() and not line.startswith(("[WARNING]", "[INFO]"))]
        parts.append(f"==> {path} <==\n" + "\n".join(kept[-lines:]))
    return "\n".join(parts)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies (Linux prctl
    PR_SET_PDEATHSIG), so a pipeline killed with -9 leaves no stage running on behind it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux / no glibc: the child may outlive a killed parent
        pass


def run_child(command: Sequence[str], what: str, timeout_seconds: Optional[float] = None) -> None:
    """Run `msnc COMMAND...` in a child process of this interpreter, its output on this process's stdout / stderr
    (progress stays visible). A non-zero exit is an MsncError naming `what`; past `timeout_seconds`, or on Ctrl-C /
    an exception here, the child is stopped. The child dies with this process (see `_die_with_parent`)."""
    argv = [sys.executable, str(msnc_entry())] + list(command)
    sys.stdout.flush()
    sys.stderr.flush()
    process = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        status = process.wait(timeout=timeout_seconds)
    except BaseException as err:
        _stop(process, grace_seconds=10)
        if isinstance(err, subprocess.TimeoutExpired):
            raise MsncError(f"{what}: did not finish within {timeout_seconds:g} s (launch.timeout_seconds); "
                            "stopped it") from None
        raise
    if status != 0:
        raise MsncError(f"{what}: the child process exited with status {status} (its output is above)")


def run_msrun(argv: Sequence[str], log_dir: Path, what: str, timeout_seconds: Optional[float] = None) -> None:
    """Run an msrun command line to the end. msrun's own output goes to `log_dir/msrun.log`, each rank's to
    `log_dir/worker_<r>.log`. A rank that dies makes msrun (--join) kill the others and exit non-zero: raised as
    an MsncError naming `what` and `log_dir`, with each rank's last lines. Past `timeout_seconds` msrun gets
    SIGINT (it kills its workers on SIGINT; they run in their own sessions), then SIGKILL."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    environment = dict(os.environ)
    # msrun starts each worker with the `python` found on PATH: this interpreter's first.
    environment["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environment.get("PATH", "")
    with open(log_dir / "msrun.log", "w", encoding="utf-8") as output:
        process = subprocess.Popen(list(argv), stdout=output, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout_seconds)
        except BaseException as err:  # the time-out, or Ctrl-C / an exception in the driver: stop the ranks too
            _stop(process)
            if isinstance(err, subprocess.TimeoutExpired):
                raise MsncError(f"{what}: msrun did not finish within {timeout_seconds:g} s (launch."
                                f"timeout_seconds); stopped it and its ranks. Logs: {log_dir}") from None
            raise
    if status != 0:
        raise MsncError(f"{what}: msrun failed with status {status} (a rank died or failed); logs: {log_dir}\n"
                        f"{worker_log_tails(log_dir)}")


def _descendants(pid: int) -> List[int]:
    """Every process below `pid` (Linux /proc; empty elsewhere): msrun's scheduler and workers."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(process: subprocess.Popen, grace_seconds: float = 30.0) -> None:
    """Stop a child (msrun and its ranks, or a pipeline stage's `msnc`): SIGINT (msrun's handler kills every worker's
    session; Python raises KeyboardInterrupt), then SIGKILL the child and whichever of its processes outlived it (a
    signal that lands before a handler is installed)."""
    if process.poll() is not None:
        return
    spawned = _descendants(process.pid)
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pid in spawned:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        settings = launch_settings(sys.argv[1:] if argv is None else argv)
    except MsncError as err:
        print(f"msnc: error: {err}", file=sys.stderr)
        return 2
    print(" ".join(f"{key}={shlex.quote(value)}" for key, value in settings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
