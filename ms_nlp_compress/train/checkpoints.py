"""Training checkpoints: weights (with run state such as dropout counters), optimizer state, and trainer state.

Each checkpoint is a directory written under a temporary name and renamed into place, and `LATEST` is replaced
atomically afterwards, so a run killed at any instant (kill -9 included) leaves either the previous complete
checkpoint or the new one, never a torn mixture.

    checkpoints/step-000120/model.safetensors      every model Parameter, including run state
    checkpoints/step-000120/optimizer.safetensors  moments, step counter, accumulation buffers
    checkpoints/step-000120/state.json             epoch, batch position, update count, loss scale, best metric
    checkpoints/LATEST                             the name of the newest complete checkpoint
    checkpoints/step-000120.rank1.safetensors      per-rank state (e.g. rank 1's error-feedback residual), one
                                                   file per rank, written by that rank next to rank 0's directory

Per-rank state: some state differs between data-parallel ranks (each rank's error-feedback residual), so rank 0's
files cannot hold it. Every rank writes its own `<name>.rank<r>.safetensors` atomically (metadata: rank, world
size, checkpoint name), the trainer joins a barrier, and only then does rank 0 write the directory and `LATEST`:
a checkpoint named by `LATEST` therefore has every rank's file. `load_rank_state` refuses, naming the file, when
one is missing or was written by a run with another world size.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from mindspore import Tensor, nn

from ms_nlp_compress.atomic import fsync_dir as _fsync_dir, write_text_atomic
from ms_nlp_compress.errors import CheckpointError
from ms_nlp_compress.models.checkpoint import read_safetensors, write_safetensors

LATEST = "LATEST"
RANK_STATE_SUFFIX = ".safetensors"


def named_state(cells: Sequence[nn.Cell], exclude: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    excluded = set(exclude)
    state = {}
    for cell in cells:
        for name, param in cell.parameters_and_names():
            if name not in excluded and name not in state:
                state[name] = param.asnumpy().copy()
    return state


def restore_state(cells: Sequence[nn.Cell], values: Dict[str, np.ndarray], source: str,
                  exclude: Sequence[str] = ()) -> None:
    """Set every Parameter of `cells` from `values`; any absent or mis-shaped tensor is an error naming it."""
    excluded = set(exclude)
    params = {}
    for cell in cells:
        for name, param in cell.parameters_and_names():
            if name not in excluded:
                params.setdefault(name, param)
    # One-element state (counters) may come back as () or (1,): MindSpore reports either for a scalar Parameter.
    values = {name: (value.reshape(tuple(params[name].shape)) if name in params and value.size == 1
                     and int(np.prod(params[name].shape)) == 1 else value) for name, value in values.items()}
    problems = [f"missing: {name}" for name in params if name not in values]
    problems += [f"shape mismatch: {name}: checkpoint {values[name].shape} vs run {tuple(param.shape)}"
                 for name, param in params.items() if name in values and values[name].shape != tuple(param.shape)]
    problems += [f"unexpected: {name}" for name in values if name not in params]
    if problems:
        raise CheckpointError(f"{source}: does not match this run (did the config change?):\n  "
                              + "\n  ".join(problems))
    for name, param in params.items():
        param.set_data(Tensor(values[name], dtype=param.dtype))


def save_checkpoint(root: Path, name: str, model: nn.Cell, optimizer_cells: Sequence[nn.Cell], state: Dict,
                    keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    staging = root / f".partial-{name}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    model_names = [n for n, _ in model.parameters_and_names()]
    write_safetensors(named_state([model]), staging / "model.safetensors")
    write_safetensors(named_state(optimizer_cells, exclude=model_names), staging / "optimizer.safetensors")
    (staging / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    _fsync_dir(staging)
    if final.exists():
        # Never delete the only complete copy first: move the old one aside, put the new one in place, and only
        # then drop the old one. LATEST may name `final` throughout; a kill in between leaves `.retired-*`, which
        # `latest_checkpoint` falls back to.
        retired = root / f".retired-{name}"
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(final, retired)
        os.replace(staging, final)
        _fsync_dir(root)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    write_text_atomic(root / LATEST, name)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    latest = (root / LATEST).read_text(encoding="utf-8").strip()
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in complete[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for partial in list(root.glob(".partial-*")) + list(root.glob(".retired-*")):
        shutil.rmtree(partial, ignore_errors=True)
    # Per-rank files of checkpoints that are gone. Only names ordered before LATEST: another rank may already be
    # writing its file for the next checkpoint (names are zero-padded update counts, so they sort by update).
    kept = {p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")}
    for rank_file in root.glob(f"step-*{RANK_STATE_SUFFIX}"):
        name = rank_file.name.split(".rank", 1)[0]
        if name not in kept and name < latest:
            rank_file.unlink(missing_ok=True)


def latest_checkpoint(root: Path) -> Optional[Path]:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    if not (path / "state.json").is_file():
        retired = root / f".retired-{name}"
        if (retired / "state.json").is_file():  # killed while replacing a checkpoint of the same name
            os.replace(retired, path)
            return path
        raise CheckpointError(f"{pointer}: names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path, model: nn.Cell, optimizer_cells: Sequence[nn.Cell]) -> Dict:
    restore_state([model], read_safetensors(path / "model.safetensors"), str(path / "model.safetensors"))
    model_names = [n for n, _ in model.parameters_and_names()]
    restore_state(optimizer_cells, read_safetensors(path / "optimizer.safetensors"),
                  str(path / "optimizer.safetensors"), exclude=model_names)
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / 'state.json'}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# Per-rank state
# ----------------------------------------------------------------------------------------------------------------
def rank_state_path(root: Path, name: str, rank: int) -> Path:
    """Where rank `rank` keeps its own state of checkpoint `name` (a sibling of the checkpoint directory)."""
    return Path(root) / f"{name}.rank{rank}{RANK_STATE_SUFFIX}"


def save_rank_state(root: Path, name: str, rank: int, world_size: int, cells: Sequence[nn.Cell]) -> Path:
    """This rank's Parameters of `cells` (atomic write). The checkpoint is not complete until rank 0 publishes it
    in LATEST, which the trainer does only after every rank has returned from here (a barrier)."""
    path = rank_state_path(root, name, rank)
    write_safetensors(named_state(cells), path,
                      metadata={"rank": str(rank), "world_size": str(world_size), "checkpoint": name})
    return path


def load_rank_state(checkpoint: Path, rank: int, world_size: int, cells: Sequence[nn.Cell]) -> Path:
    """Restore this rank's Parameters of `cells` from the file it wrote next to `checkpoint`.

    Every rank checks every rank's file, so all ranks reach the same verdict (no rank is left waiting in a
    collective for a peer that refused). Errors name the file: missing, written by another world size or rank,
    or not matching the cells (via restore_state).
    """
    checkpoint = Path(checkpoint)
    root, name = checkpoint.parent, checkpoint.name
    own = rank_state_path(root, name, rank)
    if not own.is_file():
        raise CheckpointError(f"{own}: rank {rank}'s state for checkpoint {checkpoint} is missing (each rank keeps "
                              "its own, e.g. its error-feedback residual); was the checkpoint written without it "
                              "(another comm.error_feedback)? Restart with --no-resume or restore the file")
    from safetensors import safe_open

    with safe_open(str(own), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    saved_world = metadata.get("world_size")
    if saved_world != str(world_size) or metadata.get("rank") != str(rank) or metadata.get("checkpoint") != name:
        raise CheckpointError(f"{own}: written by rank {metadata.get('rank')} of {saved_world} for checkpoint "
                              f"{metadata.get('checkpoint')}, but this is rank {rank} of {world_size} resuming "
                              f"{name}: per-rank state (error-feedback residuals) cannot be redistributed over "
                              f"another world size; resume with {saved_world} ranks or restart with --no-resume")
    for other in range(world_size):
        path = rank_state_path(root, name, other)
        if not path.is_file():
            raise CheckpointError(f"{path}: rank {other}'s state for checkpoint {checkpoint} is missing, so the "
                                  "checkpoint is incomplete; restore the file or restart with --no-resume")
    restore_state(cells, read_safetensors(own), str(own))
    return own
