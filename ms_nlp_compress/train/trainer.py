"""The trainer: epochs or steps over resumable batches, periodic evaluation, best-model selection, atomic
checkpoints, a progress bar and a JSONL metrics log.

Any loss plugs in: the trainer differentiates `loss_cell(*batch)` for the weights of `trainable`. Fine-tuning passes
a classification loss; distillation will pass a Cell holding teacher and student (only the student trainable).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.config import ExperimentConfig, TrainConfig
from ms_nlp_compress.errors import CheckpointError, ConfigError
from ms_nlp_compress.train.batches import BatchSource
from ms_nlp_compress.train.checkpoints import (latest_checkpoint, load_checkpoint, load_rank_state, rank_state_path,
                                              save_checkpoint, save_rank_state)
from ms_nlp_compress.train.optim import build_optimizer
from ms_nlp_compress.train.schedules import WarmupSchedule
from ms_nlp_compress.train.step import LossScaler, TrainStep, make_reducer, resolve_loss_scale_mode


@dataclass
class TrainResult:
    updates: int
    epochs_seen: int
    best_metric: Optional[float]
    best_step: Optional[int]
    last_eval: Dict[str, float]
    seconds: float
    skipped_updates: int
    resumed_from: Optional[str]


def start_run(config: ExperimentConfig):
    """The common start of a training command: runtime, data-parallel group, dropout seed, output folder and the
    resolved config written next to the results (rank 0). Returns (rank, world size, output dir)."""
    from ms_nlp_compress.config import dump_config
    from ms_nlp_compress.models.dropout import set_dropout_seed
    from ms_nlp_compress.parallel.setup import init_data_parallel
    from ms_nlp_compress.runtime import setup_runtime

    setup_runtime(config.runtime)
    rank, world_size = init_data_parallel(config.parallel, config.runtime)
    set_dropout_seed(config.runtime.seed, rank)  # per-rank, resumable streams: dropout masks, rounding noise
    output_dir = Path(config.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, output_dir / "config.yaml")
    return rank, world_size, output_dir


def _dynamic_spec(dtype: np.dtype, row_shape) -> Tensor:
    """A shape-free input declaration for one batch column (batch axis and the first row axis dynamic)."""
    ms_dtype = {np.dtype(np.int32): ms.int32, np.dtype(np.float32): ms.float32}.get(np.dtype(dtype))
    if ms_dtype is None:
        raise TypeError(f"batch column dtype {dtype} is not int32 or float32")
    shape = (None,) + tuple(row_shape)
    return Tensor(shape=[None] * min(len(shape), 2) + list(shape[2:]), dtype=ms_dtype)


def _check_sharded(config: ExperimentConfig, optimizer, reducer) -> None:
    """What `comm.scheme: sharded` cannot do yet, refused with the key to change."""
    if optimizer is not None or reducer is not None:
        raise ConfigError("comm.scheme: sharded replaces the optimizer and the gradient reducer, but this command "
                          "injects its own " + ("optimizer" if optimizer is not None else "reducer")
                          + "; use comm.scheme allgather or fp32")


def _sharded_update(config: ExperimentConfig, weights: List, rank: int, world_size: int):
    """The scheme 2 update cell: the owner's AdamW or LAMB (`train.optimizer`) with the config's eps and weight
    decay (the betas are `build_optimizer`'s, the config has none) and the same no-decay rule (biases, LayerNorms)."""
    from ms_nlp_compress.parallel.sharded import ShardedLowBitUpdate
    from ms_nlp_compress.train.optim import decay_mask

    owner = "lamb" if config.train.optimizer == "lamb" else "adam"
    return ShardedLowBitUpdate(weights, config.comm, world_size, rank, optimizer=owner, beta1=0.9, beta2=0.999,
                               eps=config.train.adam_epsilon, weight_decay=config.train.weight_decay,
                               decay_flags=decay_mask(weights), max_grad_norm=config.train.max_grad_norm)


def total_updates(train: TrainConfig, batches_per_epoch: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * batches_per_epoch / train.gradient_accumulation))


class Trainer:
    """Args:
        config: the experiment config (train, runtime, parallel sections are read).
        model: the Cell whose Parameters are checkpointed (e.g. the classifier), unless `checkpoint_cells` is given.
        loss_cell: maps one batch (in `batches.order`) to a scalar loss, or to `(loss, components)` when it declares
            `component_names` (the components are logged to metrics.jsonl and the progress bar).
        batches: this rank's training batches (any `BatchSource`).
        trainable: the Parameters to optimise (default: the trainable Parameters of the checkpointed cells).
        evaluate: () -> metrics dict, run every `train.eval_every` updates (or each epoch).
        metric: the key of `evaluate`'s dict that selects the best model (higher is better).
        on_best: called with (metrics, update) when the metric improves (e.g. to save a model directory).
        rank, world_size: data-parallel position; only rank 0 writes files.
        optimizer: an injected optimizer over `trainable` (default: built from `train.optimizer`); its state is
            checkpointed whatever it is (LAT reads Adam's second moment, for example).
        reducer: an injected gradient reducer Cell (grads tuple -> mean over ranks), e.g. a compressed exchange
            (default: MindSpore's all-reduce when world_size > 1); a Cell with Parameters (error feedback) is
            checkpointed too.
            With `comm.scheme: sharded` and world_size > 1 there is neither: the Trainer builds an update cell
            (parallel/sharded.py ShardedLowBitUpdate) that exchanges, and updates the Parameters on their owner
            rank with the config's optimizer (adamw or lamb) and schedule; `trainer.optimizer` then raises.
        checkpoint_cells: the cells whose Parameters make up the model part of a checkpoint (default: [model]);
            a distillation run passes the student and its projections, never the frozen teacher.
        after_update: called after every applied optimizer update (not after a skipped one), e.g. to refresh LAT's
            preconditioners from the optimizer's new second moments.
    """

    def __init__(self, config: ExperimentConfig, model: nn.Cell, loss_cell: nn.Cell, batches: BatchSource,
                 output_dir: Path, trainable: Optional[List] = None,
                 evaluate: Optional[Callable[[], Dict[str, float]]] = None, metric: Optional[str] = None,
                 on_best: Optional[Callable[[Dict[str, float], int], None]] = None, rank: int = 0,
                 world_size: int = 1, log: Callable[[str], None] = print, optimizer: Optional[nn.Optimizer] = None,
                 reducer: Optional[nn.Cell] = None, checkpoint_cells: Optional[Sequence[nn.Cell]] = None,
                 after_update: Optional[Callable[[], None]] = None):
        if not isinstance(batches, BatchSource):
            raise TypeError(f"batches must implement BatchSource (order, dynamic_padding, __len__, epoch, "
                            f"column_layout); got {type(batches).__name__}")
        self.config = config
        self.train = config.train
        self.model = model
        self.checkpoint_cells = list(checkpoint_cells) if checkpoint_cells is not None else None
        self.after_update = after_update
        self.batches = batches
        self.output_dir = Path(output_dir)
        self.evaluate = evaluate
        self.metric = metric
        self.on_best = on_best
        self.rank = rank
        self.world_size = world_size
        self.log = log if rank == 0 else (lambda message: None)
        self.updates_total = total_updates(self.train, len(batches))
        warmup = int(self.train.warmup_ratio * self.updates_total)
        self.schedule = WarmupSchedule(self.train.learning_rate, self.updates_total, warmup,
                                       kind=self.train.schedule)
        if trainable is not None:
            weights = list(trainable)
        else:
            weights, seen = [], set()
            for cell in self.checkpoint_cells or [model]:
                for param in cell.trainable_params():
                    if param.name not in seen:
                        seen.add(param.name)
                        weights.append(param)
        sharded = world_size > 1 and config.comm.scheme == "sharded"
        if sharded:  # refused before anything is built, on every rank alike
            _check_sharded(config, optimizer, reducer)
        elif optimizer is None:
            optimizer = build_optimizer(self.train.optimizer, weights, self.schedule,
                                        weight_decay=self.train.weight_decay, eps=self.train.adam_epsilon)
        self._optimizer = optimizer
        from ms_nlp_compress.runtime import apply_precision

        # Mixed precision returns a copy of the loss cell that computes in float16 / bfloat16 and shares every
        # Parameter (the fp32 masters the optimizer updates and checkpoints save); fp32 returns the cell itself.
        loss_cell = apply_precision(loss_cell, config.runtime.precision, config.runtime.device,
                                    amp_dtype=config.runtime.amp_dtype)
        self.loss_cell = loss_cell
        mode = resolve_loss_scale_mode(self.train.loss_scale, config.runtime.precision, config.runtime.amp_dtype)
        self.scaler = LossScaler(mode, self.train.loss_scale_value, self.train.loss_scale_factor,
                                 self.train.loss_scale_window)
        self.update_cell = _sharded_update(config, weights, rank, world_size) if sharded else None
        if not sharded and reducer is None and world_size > 1 and config.comm.compressed:
            from ms_nlp_compress.parallel.lowbit import make_comm_reducer

            reducer = make_comm_reducer(config.comm, list(optimizer.parameters), world_size)
        if not sharded and reducer is None:
            reducer = make_reducer(list(optimizer.parameters), world_size)
        self.reducer = reducer
        self.step = TrainStep(loss_cell, self._optimizer, self.scaler, self.train.gradient_accumulation,
                              self.train.max_grad_norm, reducer, update_cell=self.update_cell,
                              learning_rate=self.schedule.lr_at)
        if batches.dynamic_padding:
            self.step.set_dynamic_inputs([_dynamic_spec(dtype, shape) for dtype, shape in batches.column_layout()])
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self._barrier = None  # built on the first save that needs it (one small all-reduce)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.state = {"epoch": 0, "next_batch": 0, "updates": 0, "best_metric": None, "best_step": None,
                      "last_eval": {}, "evaluated_update": None}

    @property
    def optimizer(self) -> nn.Optimizer:
        if self._optimizer is None:
            raise ConfigError("comm.scheme: with scheme sharded the owner ranks update the weights (their Adam "
                              "moments are sharded): there is no Trainer optimizer to read (e.g. quant's LAT "
                              "preconditioner); use comm.scheme allgather or fp32")
        return self._optimizer

    # ----------------------------------------------------------------------------------------------------------
    def _checkpoint_model(self) -> nn.Cell:
        if self.checkpoint_cells is None:
            return self.model
        if len(self.checkpoint_cells) == 1:
            return self.checkpoint_cells[0]
        return nn.CellList(self.checkpoint_cells, auto_prefix=False)

    def _optimizer_cells(self):
        """Everything besides the model that a resume needs and that is equal on every rank: optimizer moments and
        counters, accumulation buffers, and the reducer's own state unless it differs per rank (see
        `_per_rank_cells`)."""
        cells = [self._optimizer] if self._optimizer is not None else []
        if self.step.accumulator is not None:
            cells.append(self.step.accumulator)
        if isinstance(self.reducer, nn.Cell) and list(self.reducer.get_parameters()) and not self._per_rank_cells():
            cells.append(self.reducer)
        return cells

    def _per_rank_cells(self) -> List[nn.Cell]:
        """State that differs between ranks (a reducer declaring `per_rank_state`, e.g. error-feedback residuals):
        each rank checkpoints it in its own file next to rank 0's checkpoint (train/checkpoints.py)."""
        if self.update_cell is not None:  # the owner's master shard, its Adam moments, counters, noise counter
            return self.update_cell.rank_state_cells()
        if isinstance(self.reducer, nn.Cell) and getattr(self.reducer, "per_rank_state", False):
            return [self.reducer]
        return []

    def _write_metrics(self, record: Dict) -> None:
        if self.rank != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def _save(self) -> None:
        """Every rank calls this at the same update (the control flow is the same on all ranks)."""
        name = f"step-{self.state['updates']:07d}"
        per_rank = self._per_rank_cells()
        if per_rank:
            # Each rank writes its own file, then all meet: rank 0 publishes (LATEST) only a checkpoint whose every
            # rank file is on disk, and a rank that failed to write fails every rank, none is left in a collective.
            failure = None
            try:
                save_rank_state(self.checkpoint_dir, name, self.rank, self.world_size, per_rank)
            except (OSError, ValueError) as err:
                failure = err
            if self._barrier is None:
                from ms_nlp_compress.parallel.barrier import RankBarrier

                self._barrier = RankBarrier(self.world_size)
            written = self._barrier.agree(failure is None)
            if failure is not None:
                raise CheckpointError(f"{rank_state_path(self.checkpoint_dir, name, self.rank)}: could not write "
                                      f"rank {self.rank}'s state: {failure}") from failure
            if written != self.world_size:
                raise CheckpointError(f"{self.checkpoint_dir / name}: {self.world_size - written} of "
                                      f"{self.world_size} ranks could not write their state file; the checkpoint "
                                      "was not published (see the failing rank's log)")
        if self.rank != 0:
            return
        state = dict(self.state, scaler=self.scaler.state_dict(), step=self.step.state_dict(),
                     seed=self.config.runtime.seed, world_size=self.world_size, updates_total=self.updates_total,
                     per_rank_state=bool(per_rank))
        save_checkpoint(self.checkpoint_dir, name, self._checkpoint_model(), self._optimizer_cells(), state,
                        self.train.keep_checkpoints)

    def resume(self) -> Optional[str]:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        per_rank = self._per_rank_cells()
        if per_rank:  # checked first: every rank refuses a checkpoint that lacks any rank's file, before loading
            load_rank_state(path, self.rank, self.world_size, per_rank)
        state = load_checkpoint(path, self._checkpoint_model(), self._optimizer_cells())
        self.scaler.load_state_dict(state.pop("scaler"))
        self.step.load_state_dict(state.pop("step", {}))
        if state.get("world_size", 1) != self.world_size:
            self.log(f"warning: {path} was written with {state.get('world_size')} ranks, resuming with "
                     f"{self.world_size}: the data order differs from an uninterrupted run")
        self.state.update({key: state[key] for key in self.state if key in state})
        self._truncate_metrics(self.state["updates"])
        self.log(f"resumed from {path} (update {self.state['updates']}, epoch {self.state['epoch']}, "
                 f"batch {self.state['next_batch']})")
        return str(path)

    def _truncate_metrics(self, updates: int) -> None:
        """Drop metrics.jsonl records written after the checkpoint we resume from: the resumed run writes them again,
        so the log reads as one uninterrupted run (no repeated updates). A torn last line (kill -9 mid-write) goes
        too."""
        if self.rank != 0 or not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("update", 0) <= updates:
                kept.append(line)
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def _run_evaluation(self) -> None:
        if self.evaluate is None:
            return
        self.step.set_train(False)
        metrics = self.evaluate()
        self.step.set_train(True)
        self.state["last_eval"] = metrics
        self.state["evaluated_update"] = self.state["updates"]
        record = {"type": "eval", "update": self.state["updates"], "epoch": self.state["epoch"], **metrics}
        self._write_metrics(record)
        value = metrics.get(self.metric) if self.metric else None
        improved = value is not None and (self.state["best_metric"] is None or value > self.state["best_metric"])
        if improved:
            self.state["best_metric"] = float(value)
            self.state["best_step"] = self.state["updates"]
            if self.on_best is not None and self.rank == 0:
                self.on_best(metrics, self.state["updates"])
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.log(f"eval @ update {self.state['updates']}: {shown}{' (best)' if improved else ''}")

    # ----------------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = True, stop_after: Optional[int] = None) -> TrainResult:
        """Train until `updates_total` (or `stop_after` updates in this call, for staged runs and tests)."""
        resumed_from = self.resume() if resume else None
        started = time.perf_counter()
        self.step.set_train(True)
        from tqdm import tqdm

        progress = tqdm(total=self.updates_total, initial=self.state["updates"], disable=self.rank != 0 or None,
                        desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
        done_here = 0
        losses: List[float] = []
        component_sums: Dict[str, List[float]] = {}
        while self.state["updates"] < self.updates_total:
            epoch = self.state["epoch"]
            for index, arrays in self.batches.epoch(epoch, self.state["next_batch"]):
                result = self.step(*[Tensor(a) for a in arrays])
                losses.append(result.loss)
                for name, value in result.components.items():
                    component_sums.setdefault(name, []).append(value)
                if not result.boundary:
                    continue
                if result.applied and self.after_update is not None:
                    self.after_update()
                self.state["updates"] += 1
                self.state["next_batch"] = index + 1
                done_here += 1
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}", scale=f"{result.loss_scale:g}",
                                     **{name: f"{value:.4f}" for name, value in result.components.items()})
                updates = self.state["updates"]
                if updates % self.train.log_every == 0 or updates == self.updates_total:
                    record = {"type": "train", "update": updates, "epoch": epoch,
                              "loss": float(np.mean(losses)), "lr": self.schedule.lr_at(updates - 1),
                              "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                              "skipped": not result.applied, "seconds": round(time.perf_counter() - started, 3)}
                    record.update({f"loss_{name}": float(np.mean(values)) for name, values in component_sums.items()})
                    exchange = self.update_cell if self.update_cell is not None else self.reducer
                    if hasattr(exchange, "comm_stats"):  # bytes handed to the collectives, exchanges so far
                        record.update(exchange.comm_stats())
                    self._write_metrics(record)
                    if progress.disable:  # no terminal (a log file, CI): the bar is off, so a line per log_every
                        self.log(f"train {updates}/{self.updates_total}: loss {record['loss']:.4f}, lr "
                                 f"{record['lr']:.3g}, {record['seconds']:.0f} s")
                    losses = []
                    component_sums = {}
                if self.train.eval_every and updates % self.train.eval_every == 0:
                    self._run_evaluation()
                finished = updates >= self.updates_total
                if self.train.save_every and (updates % self.train.save_every == 0 or finished):
                    self._save()
                if finished or (stop_after is not None and done_here >= stop_after):
                    break
            else:  # the epoch ran out
                self.state["epoch"] = epoch + 1
                self.state["next_batch"] = 0
                if not self.train.eval_every:
                    self._run_evaluation()
                if not self.train.save_every:
                    self._save()
                continue
            # evaluate before saving, so the checkpoint records that the final evaluation happened
            if self.state["updates"] >= self.updates_total and not self.train.eval_every:
                self._run_evaluation()
            if self.state["updates"] >= self.updates_total and not self.train.save_every:
                self._save()
            break
        if self.evaluate is not None and self.state["updates"] >= self.updates_total \
                and self.state["evaluated_update"] != self.state["updates"]:
            # A run killed between its final checkpoint and its final evaluation (or one whose eval_every does not
            # divide the total) evaluates the final weights now, so best-model selection always sees them.
            self._run_evaluation()
            self._save()
        progress.close()
        return TrainResult(self.state["updates"], self.state["epoch"], self.state["best_metric"],
                           self.state["best_step"], self.state["last_eval"], time.perf_counter() - started,
                           self.scaler.skipped_steps, resumed_from)
