"""The compiled train step: value_and_grad of a pluggable loss Cell, loss scaling with overflow skip, gradient
reduction across data-parallel ranks, gradient accumulation, global-norm clipping, then the optimizer.

Why not `nn.TrainOneStepWithLossScaleCell`: it does not compile on CPU (its overflow check emits the NPU float-status
op) and its state is not ours to checkpoint. This step runs unchanged on CPU and Ascend:

    grads graph  (one jit):  scaled loss -> grads -> [all-reduce mean] -> unscale -> all_finite -> [clip]
    optimizer    (its own jit, called from Python when the gradients are finite)

or, with an update cell (the sharded low-bit scheme, parallel/sharded.py), which replaces reducer and optimizer:

    grads graph  (one jit):  scaled loss -> grads -> unscale                       (this rank's own gradients)
    update cell  (its own jit, called at EVERY update boundary on every rank: it holds the collectives):
                             exchange -> verdict + global norm of the mean -> [clip] -> owner update -> weights

Keeping the optimizer out of the gradient graph is the fastest pattern measured (mindspore.md recipe 1). The
loss-scale state lives on the host (a float and a counter), so it is trivially saved with a checkpoint and the
skip decision is the same on every rank (the flag is computed after the all-reduce).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple


import mindspore as ms
from mindspore import ParameterTuple, Tensor, mutable, nn, ops

from ms_nlp_compress.errors import ConfigError


class LossScaler:
    """Host-side loss scale: `none` (1.0), `static`, or `dynamic` (halve on overflow, grow after a clean window).

    Overflowing steps are skipped in every mode except `none`, where a non-finite gradient is an error: with fp32
    and no scaling it means the run diverged, and silently skipping would hide that.
    """

    def __init__(self, mode: str = "none", value: float = 65536.0, factor: float = 2.0, window: int = 1000):
        if mode not in ("none", "static", "dynamic"):
            raise ConfigError(f"train.loss_scale: unknown mode {mode!r}")
        self.mode = mode
        self.scale = 1.0 if mode == "none" else float(value)
        self.factor = float(factor)
        self.window = int(window)
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, finite: bool) -> None:
        if not finite:
            self.skipped_steps += 1
            self.good_steps = 0
            if self.mode == "dynamic":
                self.scale = max(self.scale / self.factor, 1.0)
            return
        self.good_steps += 1
        if self.mode == "dynamic" and self.good_steps >= self.window:
            self.scale *= self.factor
            self.good_steps = 0

    def state_dict(self) -> Dict:
        return {"mode": self.mode, "scale": self.scale, "good_steps": self.good_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("mode") != self.mode:
            raise ConfigError(f"checkpoint loss-scale mode {state.get('mode')!r} differs from the config's "
                              f"{self.mode!r}")
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def resolve_loss_scale_mode(configured: str, precision: str, amp_dtype: str = "float16") -> str:
    """`auto`: a dynamic scale for float16 mixed precision; none for fp32 and for bfloat16 (float32's exponent range:
    gradients do not underflow, so scaling buys nothing)."""
    if configured == "auto":
        return "none" if precision == "fp32" or amp_dtype == "bfloat16" else "dynamic"
    return configured


def separate_members(loss_cell: nn.Cell) -> Tuple[nn.Cell, ...]:
    """The member loss Cells whose gradients a step sums over the SAME batch, each in its own compiled graph
    (empty for an ordinary loss cell).

    A loss cell that exposes `separate_members` (best as a property over its child cells, so a mixed-precision copy
    of the loss cell yields its own copies) is a sum of independent losses, e.g. DynaBERT's sub-networks. One graph
    holding every member keeps every member's activations alive for the backward pass at once (measured: 5.2 GB for
    one MiniLM-shape sub-network, more than 11.7 GB for twelve); one graph per member holds one member's at a time,
    and the gradient of the sum is the sum of the gradients, so the update is the same.
    """
    members = getattr(loss_cell, "separate_members", None)
    return tuple(members) if members else ()


def component_names(loss_cell: nn.Cell) -> Tuple[str, ...]:
    """The names of the extra scalars a loss cell returns beside its loss (empty for a plain scalar loss).

    A loss cell that sets `component_names = ("hidden", "attention", ...)` returns `(loss, (c1, c2, ...))`: only
    `loss` is differentiated, the components are logged (metrics.jsonl, progress bar).
    """
    names = getattr(loss_cell, "component_names", None) or ()
    return tuple(str(name) for name in names)


class _ScaledLoss(nn.Cell):
    def __init__(self, loss_cell: nn.Cell):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.has_components = bool(component_names(loss_cell))

    def construct(self, scale, *inputs):
        if self.has_components:
            loss, components = self.loss_cell(*inputs)
            return loss.astype(ms.float32) * scale, components
        return self.loss_cell(*inputs).astype(ms.float32) * scale


def _global_norm(grads):
    squares = ()
    for grad in grads:
        squares = squares + (ops.reduce_sum(ops.square(grad.astype(ms.float32))),)
    return ops.sqrt(ops.addn(squares))


def _clip(grads, norm, max_norm: float):
    """Scale all gradients by min(1, max_norm / norm): the global-norm clipping of BERT and LAMB recipes."""
    factor = ops.minimum(max_norm / (norm + 1e-6), 1.0)
    clipped = ()
    for grad in grads:
        clipped = clipped + (grad * factor.astype(grad.dtype),)
    return clipped


class FinishGradients(nn.Cell):
    """Unscale, reduce across ranks (mean), check finiteness (after the reduce: the same verdict on every rank),
    global norm, clip. Returns (gradients, finite flag, norm before clipping).

    The reducer sees unscaled gradients: a compressed exchange (parallel/lowbit.py) quantizes and carries its
    error-feedback residual in the gradients' own units, whatever the loss scale does between steps. A non-finite
    gradient on any rank still reaches every rank through the reduction (NaN / inf poison the mean or the gathered
    scales), so every rank takes the same skip decision.

    With `check=False` it only unscales: an update cell takes the verdict and clips after its own exchange (a
    local verdict here would not be the same on every rank).
    """

    def __init__(self, reducer: Optional[nn.Cell], max_grad_norm: Optional[float], check: bool = True):
        super().__init__(auto_prefix=False)
        self.reducer = reducer
        self.max_grad_norm = max_grad_norm
        self.check = check

    def construct(self, grads, scale):
        inverse = 1.0 / scale
        unscaled = ()
        for grad in grads:
            unscaled = unscaled + (grad * inverse.astype(grad.dtype),)
        if not self.check:
            return unscaled, Tensor(True, ms.bool_), Tensor(0.0, ms.float32)
        if self.reducer is not None:
            unscaled = self.reducer(unscaled)
        finite = ms.amp.all_finite(unscaled)
        norm = _global_norm(unscaled)
        if self.max_grad_norm is not None:
            unscaled = _clip(unscaled, norm, self.max_grad_norm)
        return unscaled, finite, norm


class GradientCell(nn.Cell):
    """Compiled: (loss, components, gradients, finite flag, global norm) for one micro-batch.

    With `finalize=True` the gradients are also reduced across ranks, unscaled, checked and clipped; with
    accumulation the micro-batches skip that and `AccumulationCell` finalizes the sum once per update.
    """

    def __init__(self, loss_cell: nn.Cell, weights: ParameterTuple, reducer: Optional[nn.Cell],
                 max_grad_norm: Optional[float], finalize: bool = True, check: bool = True):
        super().__init__(auto_prefix=False)
        self.scaled_loss = _ScaledLoss(loss_cell)
        self.has_components = self.scaled_loss.has_components
        self.weights = weights
        # has_aux: only the first output (the scaled loss) is differentiated; components ride along.
        self.grad_fn = ms.value_and_grad(self.scaled_loss, None, weights, has_aux=self.has_components)
        self.finish = FinishGradients(reducer, max_grad_norm, check)
        self.finalize = finalize

    def construct(self, scale, *inputs):
        components = ()
        if self.has_components:
            (scaled_loss, components), grads = self.grad_fn(scale, *inputs)
        else:
            scaled_loss, grads = self.grad_fn(scale, *inputs)
        loss = scaled_loss / scale
        if not self.finalize:
            return loss, components, grads, Tensor(True, ms.bool_), Tensor(0.0, ms.float32)
        unscaled, finite, norm = self.finish(grads, scale)
        return loss, components, unscaled, finite, norm


class AccumulationCell(nn.Cell):
    """Sums micro-batch gradients in buffers; `finalize` averages, reduces, unscales, checks and clips them."""

    def __init__(self, weights: ParameterTuple, steps: int, reducer: Optional[nn.Cell],
                 max_grad_norm: Optional[float], check: bool = True):
        super().__init__(auto_prefix=False)
        self.buffers = weights.clone(prefix="grad_accumulation", init="zeros")
        self.steps = steps
        self.finish = FinishGradients(reducer, max_grad_norm, check)
        self.hyper_map = ops.HyperMap()

    @ms.jit
    def add(self, grads):
        return self.hyper_map(ops.assign_add, self.buffers, grads)

    @ms.jit
    def finalize(self, scale):
        grads = ()
        for buffer in self.buffers:
            grads = grads + (buffer / self.steps,)
        return self.finish(grads, scale)

    @ms.jit
    def reset(self):
        done = ()
        for buffer in self.buffers:
            done = done + (ops.assign(buffer, ops.zeros_like(buffer)),)
        return done


class _SumGradients(nn.Cell):
    """Elementwise sum of two gradient tuples (compiled once, reused for every member of a separate-graph step)."""

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.hyper_map = ops.HyperMap()

    def construct(self, total, grads):
        return self.hyper_map(ops.add, total, grads)


class _FinishCell(nn.Cell):
    """FinishGradients as its own compiled graph, for gradients summed outside a GradientCell."""

    def __init__(self, reducer: Optional[nn.Cell], max_grad_norm: Optional[float], check: bool = True):
        super().__init__(auto_prefix=False)
        self.finish = FinishGradients(reducer, max_grad_norm, check)

    def construct(self, grads, scale):
        return self.finish(grads, scale)


@dataclass
class StepResult:
    loss: float
    applied: bool  # an optimizer update happened (last micro-batch of an accumulation cycle, finite grads)
    boundary: bool  # the micro-batch closed an accumulation cycle (applied or skipped)
    grad_norm: Optional[float]
    loss_scale: float
    components: Dict[str, float] = field(default_factory=dict)  # the loss cell's named extra scalars


class TrainStep:
    """Call with one micro-batch (input tensors in the loss cell's order); updates every `accumulation` calls.

    Args:
        loss_cell: Cell mapping the batch tensors to a scalar loss (fine-tuning, MLM, distillation, ...), or to
            `(loss, components)` when it declares `component_names` (see `component_names`).
        optimizer: an `nn.Optimizer` over the weights to train (its `parameters` are differentiated).
        scaler: the LossScaler.
        accumulation: micro-batches per update; the update uses their mean gradient.
        max_grad_norm: global-norm clip, or None.
        reducer: a Cell mapping the gradient tuple to its mean over data-parallel ranks
            (`nn.DistributedGradReducer`, or a compressed exchange), or None.
        update_cell: in place of optimizer AND reducer (pass both as None), a Cell called as
            `update_cell(unscaled local gradients, lr Tensor) -> (applied flag, global norm)` that exchanges,
            takes the verdict, clips (with its own max_grad_norm: the one here is then unused) and updates the
            Parameters itself, e.g. `parallel.sharded.ShardedLowBitUpdate`. It must expose `parameters` (the
            weights to differentiate) and `updates_done()` (applied updates so far).
        learning_rate: with an update cell, the lr of update t (1-based), called with t - 1 (e.g.
            `WarmupSchedule.lr_at`); the value goes in as a Tensor input, so the compiled update follows the
            schedule without recompiling.

    A loss cell with `separate_members` (see `separate_members`) gets one compiled gradient graph per member, all on
    the same micro-batch; their gradients are summed (not averaged), and the sum goes through the same reduce /
    unscale / finiteness check / clip / optimizer (or into the accumulation buffers) as an ordinary loss's
    gradients. The step's loss is the members' sum; its components are the members' losses, named by the loss
    cell's `component_names` when it declares one per member.
    """

    def __init__(self, loss_cell: nn.Cell, optimizer: Optional[nn.Optimizer], scaler: Optional[LossScaler] = None,
                 accumulation: int = 1, max_grad_norm: Optional[float] = 1.0, reducer: Optional[nn.Cell] = None,
                 update_cell: Optional[nn.Cell] = None, learning_rate: Optional[Callable[[int], float]] = None):
        if accumulation < 1:
            raise ConfigError(f"train.gradient_accumulation must be >= 1, got {accumulation}")
        self.loss_cell = loss_cell
        self.optimizer = optimizer
        self.update_cell = update_cell
        self.learning_rate = learning_rate
        self.scaler = scaler or LossScaler("none")
        self.accumulation = accumulation
        self.component_names = component_names(loss_cell)
        check = update_cell is None
        if update_cell is not None:
            if optimizer is not None or reducer is not None:
                raise ConfigError("comm.scheme: an update cell (scheme sharded) replaces both the optimizer and the "
                                  "gradient reducer; pass neither")
            if learning_rate is None:
                raise ConfigError("train.learning_rate: an update cell needs the schedule (learning_rate=lr_at)")
            self.weights = ParameterTuple(update_cell.parameters)
            max_grad_norm = None  # the update cell clips the mean gradient after its exchange
        else:
            self.weights = ParameterTuple(optimizer.parameters)
        members = separate_members(loss_cell)
        if members:
            if self.component_names and len(self.component_names) != len(members):
                raise ConfigError(f"{type(loss_cell).__name__}: {len(self.component_names)} component_names for "
                                  f"{len(members)} separate_members: name each member's loss once")
            self.component_names = self.component_names or tuple(f"member{i}" for i in range(len(members)))
            # Members never finalize: their scaled gradients are summed first, then finished once.
            self.member_cells = [GradientCell(member, self.weights, None, None, finalize=False)
                                 for member in members]
            self.sum_gradients = _SumGradients()
            self.finish_cell = _FinishCell(reducer, max_grad_norm, check) if accumulation == 1 else None
            self.gradient_cell = None
        else:
            self.member_cells = []
            self.gradient_cell = GradientCell(loss_cell, self.weights, reducer, max_grad_norm,
                                              finalize=accumulation == 1, check=check)
        self.accumulator = (AccumulationCell(self.weights, accumulation, reducer, max_grad_norm, check)
                            if accumulation > 1 else None)
        self.micro_step = 0  # position inside the accumulation cycle (saved with checkpoints: see state_dict)

    def set_train(self, mode: bool = True) -> None:
        self.loss_cell.set_train(mode)

    def set_dynamic_inputs(self, input_specs: Sequence[Tensor]) -> None:
        """Declare dynamic input shapes (e.g. Tensor(shape=[None, None], dtype=ms.int32)): one compile for all."""
        for cell in self.member_cells or [self.gradient_cell]:
            cell.set_inputs(Tensor(shape=[], dtype=ms.float32), *input_specs)

    def state_dict(self) -> Dict:
        """Host-side step state a checkpoint must carry besides Parameters (the accumulation buffers are
        Parameters of `accumulator` and are saved with the optimizer state)."""
        return {"micro_step": self.micro_step}

    def load_state_dict(self, state: Dict) -> None:
        micro_step = int(state.get("micro_step", 0))
        if not 0 <= micro_step < self.accumulation:
            raise ConfigError(f"checkpoint is {micro_step} micro-batches into an accumulation cycle, but "
                              f"train.gradient_accumulation is {self.accumulation}: resume with the same value")
        self.micro_step = micro_step

    def _components(self, values) -> Dict[str, float]:
        return {name: float(value.asnumpy()) for name, value in zip(self.component_names, values)}

    def _members_forward(self, scale, inputs):
        """Every member's gradient graph on the same inputs; (summed loss, member losses, summed scaled grads,
        finite, norm) with the last two finalized here when there is no accumulation."""
        total_grads, losses = None, []
        for cell in self.member_cells:
            loss, _, grads, _, _ = cell(scale, *inputs)
            # mutable: a tuple of Tensors passed from Python into a compiled Cell is otherwise a CONSTANT of the
            # graph, recompiled for every new gradient (measured: 0.11-0.16 s a call on 41 small tensors, 5 ms with
            # mutable; MindSpore warns "Constant value tensor are detected in tuple or list")
            total_grads = grads if total_grads is None else self.sum_gradients(mutable(total_grads), mutable(grads))
            losses.append(float(loss.asnumpy()))
        components = dict(zip(self.component_names, losses))
        loss = Tensor(sum(losses), ms.float32)
        if self.finish_cell is None:  # accumulation: the buffers hold scaled sums until finalize
            return loss, components, total_grads, None, None
        grads, finite, norm = self.finish_cell(mutable(total_grads), scale)
        return loss, components, grads, finite, norm

    def __call__(self, *inputs) -> StepResult:
        scale = Tensor(self.scaler.scale, ms.float32)
        if self.member_cells:
            loss, components, grads, finite, norm = self._members_forward(scale, inputs)
        else:
            loss, components, grads, finite, norm = self.gradient_cell(scale, *inputs)
            components = self._components(components)
        if self.accumulator is not None:
            self.accumulator.add(mutable(grads))
            self.micro_step += 1
            if self.micro_step < self.accumulation:
                return StepResult(float(loss.asnumpy()), False, False, None, self.scaler.scale, components)
            grads, finite, norm = self.accumulator.finalize(scale)
        self.micro_step = 0
        if self.update_cell is not None:
            # every rank calls it at every boundary (collectives inside); its verdict is the same on all ranks
            lr = Tensor(self.learning_rate(self.update_cell.updates_done()), ms.float32)
            finite, norm = self.update_cell(mutable(grads), lr)
        is_finite = bool(finite.asnumpy())
        if not is_finite and self.scaler.mode == "none":
            if self.accumulator is not None:
                self.accumulator.reset()
            raise FloatingPointError("non-finite gradients without loss scaling: the run diverged (lower the "
                                     "learning rate, or enable train.loss_scale for mixed precision)")
        if is_finite and self.update_cell is None:
            self.optimizer(grads)
        if self.accumulator is not None:
            self.accumulator.reset()
        self.scaler.update(is_finite)
        return StepResult(float(loss.asnumpy()), is_finite, True, float(norm.asnumpy()), self.scaler.scale,
                          components)


def make_reducer(weights: Sequence, world_size: int, mean: bool = True) -> Optional[nn.Cell]:
    """An explicit DistributedGradReducer (works with or without the deprecated auto-parallel context)."""
    if world_size <= 1:
        return None
    return nn.DistributedGradReducer(ParameterTuple(weights), mean=mean, degree=world_size)
