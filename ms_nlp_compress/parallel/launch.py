"""The msrun settings of a launch, read from the command's own config (its `parallel:` section).

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
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

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
    rank_table = environ.get("RANK_TABLE_FILE") or parallel.rank_table_file or ""
    if rank_table and not Path(rank_table).is_file():
        source = "RANK_TABLE_FILE" if environ.get("RANK_TABLE_FILE") else f"{known.config}: parallel.rank_table_file"
        raise ConfigError(f"{source}: rank table {rank_table} not found")
    return {
        "MSNC_MASTER_PORT": environ.get("MASTER_PORT") or str(parallel.master_port),
        "MSNC_CLUSTER_TIMEOUT": environ.get("CLUSTER_TIMEOUT") or str(parallel.cluster_timeout),
        "MSNC_RANK_TABLE_FILE": rank_table,
    }


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
