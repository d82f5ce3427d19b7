"""AdamW and LAMB written with pure MindSpore ops, plus the weight-decay rule they share.

Why our own optimizers instead of `nn.AdamWeightDecay` / `nn.Lamb`:
- `nn.Lamb` has only the fused `Lamb` kernel, which does not exist on CPU ("Unsupported op [Lamb] on CPU").
- TernaryBERT's loss-aware quantizer (LAT) needs the Adam second-moment estimate v as a diagonal preconditioner,
  so the moments must be reachable by name and aligned with the parameters (`second_moments()`).
- One implementation on CPU and Ascend keeps the numerics identical between the CI and production.

Both optimizers plug into the functional step:

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    loss, grads = grad_fn(*batch)
    optimizer(grads)            # compiled on its own (see `construct`), never inside the grad jit

Step convention (same as `nn.AdamWeightDecay` and HuggingFace): update t = 1, 2, ... uses the learning rate
`schedule(t - 1)` and the bias corrections 1 - beta^t. The stored `global_step` equals the number of updates done.
"""
from typing import Callable, Iterable, List, Optional, Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_nlp_compress.errors import ConfigError

_NO_DECAY_SUFFIXES = ("bias", "beta", "gamma")
_NO_DECAY_FRAGMENTS = ("layernorm", "layer_norm")


def applies_weight_decay(name: str) -> bool:
    """True when the parameter called `name` receives weight decay.

    The rule (BERT, TinyBERT's BertAdam, NEZHA's LAMB): decay only the weight matrices and embeddings. Biases and
    LayerNorm parameters are excluded because pulling them towards 0 fights their role (LayerNorm's gamma = 1 is the
    identity, a bias is a shift) and gains nothing in regularisation. Concretely a name is excluded when its last
    dotted component is `bias`, `beta` or `gamma` (MindSpore's LayerNorm calls its parameters gamma/beta), or when it
    contains `layernorm` / `layer_norm` in any letter case (LayerNorm ported from PyTorch as `...LayerNorm.weight`).
    """
    last = name.rsplit(".", 1)[-1]
    lowered = name.lower()
    if last in _NO_DECAY_SUFFIXES:
        return False
    return not any(fragment in lowered for fragment in _NO_DECAY_FRAGMENTS)


def _default_decay_filter(param: Parameter) -> bool:
    return applies_weight_decay(param.name)


def decay_mask(params: Iterable[Parameter],
               decay_filter: Callable[[Parameter], bool] = _default_decay_filter) -> List[bool]:
    """Booleans in parameter order: True where weight decay applies (rule in `applies_weight_decay`)."""
    return [bool(decay_filter(p)) for p in params]


# ---------------------------------------------------------------------------------------------------------------
# Per-parameter update rules. Registered on a MultitypeFuncGraph so that one HyperMap call updates every
# parameter; in graph mode this builds one small sub-graph per parameter (measured against an unrolled Python loop
# in scripts/bench_optim.py). The register() calls list one type string per argument: a missing one makes graph
# mode silently skip the update (docs/mindspore.md), and the numpy-twin tests would catch it.
# ---------------------------------------------------------------------------------------------------------------
_adamw_update = ops.MultitypeFuncGraph("msnc_adamw_update")
_lamb_update = ops.MultitypeFuncGraph("msnc_lamb_update")


def _adam_direction(beta1, beta2, eps, bias_correction1, bias_correction2, m, v, grad):
    """New moments and the bias-corrected Adam direction m_hat / (sqrt(v_hat) + eps), all float32."""
    grad = grad.astype(ms.float32)
    next_m = beta1 * m.astype(ms.float32) + (1.0 - beta1) * grad
    next_v = beta2 * v.astype(ms.float32) + (1.0 - beta2) * ops.square(grad)
    m_hat = next_m / bias_correction1
    v_hat = next_v / bias_correction2
    return next_m, next_v, m_hat / (ops.sqrt(v_hat) + eps)


def _write_back(param, m, v, next_param, next_m, next_v):
    """Assign the new values; the depend chain keeps the assigns in the graph (nothing else consumes them)."""
    next_param = ops.depend(next_param, ops.assign(param, next_param.astype(param.dtype)))
    next_param = ops.depend(next_param, ops.assign(m, next_m.astype(m.dtype)))
    next_param = ops.depend(next_param, ops.assign(v, next_v.astype(v.dtype)))
    return next_param


# 12 arguments -> 12 type strings.
@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _adamw_param_update(beta1, beta2, eps, lr, weight_decay, bias_correction1, bias_correction2,
                        param, m, v, grad, decay):
    """w <- w - lr * (m_hat / (sqrt(v_hat) + eps) + wd * w): decoupled decay (Loshchilov & Hutter), not L2 in g."""
    next_m, next_v, update = _adam_direction(beta1, beta2, eps, bias_correction1, bias_correction2, m, v, grad)
    param_fp32 = param.astype(ms.float32)
    if decay:
        update = update + weight_decay * param_fp32
    next_param = param_fp32 - lr * update
    return _write_back(param, m, v, next_param, next_m, next_v)


# 12 arguments -> 12 type strings.
@_lamb_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                       "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _lamb_param_update(beta1, beta2, eps, lr, weight_decay, bias_correction1, bias_correction2,
                       param, m, v, grad, decay):
    """LAMB (You et al. 2020): the AdamW direction r, rescaled per tensor by the trust ratio ||w|| / ||r||.

    The trust ratio makes the step size relative to the tensor's own scale, which is what lets large-batch
    pre-training use one learning rate for embeddings and LayerNorms alike. When ||w|| = 0 (a zero-initialised bias)
    or ||r|| = 0 (no signal) the ratio is 1, i.e. a plain AdamW step, instead of freezing the tensor or dividing by 0.
    """
    next_m, next_v, update = _adam_direction(beta1, beta2, eps, bias_correction1, bias_correction2, m, v, grad)
    param_fp32 = param.astype(ms.float32)
    if decay:
        update = update + weight_decay * param_fp32
    w_norm = ops.sqrt(ops.reduce_sum(ops.square(param_fp32)))
    r_norm = ops.sqrt(ops.reduce_sum(ops.square(update)))
    both_positive = ops.logical_and(w_norm > 0.0, r_norm > 0.0)
    safe_r_norm = ops.select(r_norm > 0.0, r_norm, ops.ones_like(r_norm))  # keep the unused branch finite
    trust = ops.select(both_positive, w_norm / safe_r_norm, ops.ones_like(w_norm))
    next_param = param_fp32 - lr * trust * update
    return _write_back(param, m, v, next_param, next_m, next_v)


_adamw_fused_update = ops.MultitypeFuncGraph("msnc_adamw_fused_update")


# 13 arguments -> 13 type strings.
@_adamw_fused_update.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                              "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _adamw_fused_param_update(adam, beta1, beta2, beta1_power, beta2_power, lr, scaled_eps, decay_factor,
                              param, m, v, grad, decay):
    """Same maths as `_adamw_param_update` via the fused `ops.Adam` kernel (CPU: 4-5x faster, compiles 8x faster).

    ops.Adam computes w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps'), i.e. the original Adam
    with eps inside the bias correction. Passing eps' = eps * sqrt(1 - beta2^t) turns it into exactly
    m_hat / (sqrt(v_hat) + eps). Decoupled decay w *= (1 - lr * wd) is applied first; the Adam direction does not
    depend on w, so the order does not change the result.
    """
    if decay:
        # Auto-monad orders this write before the in-place Adam kernel on the same Parameter.
        ops.assign(param, param * decay_factor)
    updated = adam(param, m, v, beta1_power, beta2_power, lr, beta1, beta2, scaled_eps, grad)
    return updated[0]


class _AdamFamily(nn.Optimizer):
    """Shared state of AdamW and LAMB: moments named `adam_m.<param>` / `adam_v.<param>`, betas, decay flags.

    The moments are Parameters of the optimizer Cell, so `ms.save_checkpoint(optimizer, path)` stores them together
    with `global_step` and `ms.load_param_into_net(optimizer, ...)` restores them; resuming a run therefore resumes
    the bias correction and the schedule at the right step.
    """

    _update_rule = None  # a MultitypeFuncGraph, set by subclasses

    def __init__(self, params, learning_rate, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                 weight_decay: float = 0.01,
                 decay_filter: Optional[Callable[[Parameter], bool]] = None):
        params = list(params)
        if not params:
            raise ConfigError(f"{type(self).__name__}: 'params' is empty; pass net.trainable_params()")
        if not all(isinstance(p, Parameter) for p in params):
            raise ConfigError(f"{type(self).__name__}: 'params' must be a list of Parameters "
                              "(parameter groups as dicts are not supported; use decay_filter)")
        for field, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{type(self).__name__}: '{field}' must be in [0, 1), got {value}")
        if eps <= 0.0:
            raise ConfigError(f"{type(self).__name__}: 'eps' must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise ConfigError(f"{type(self).__name__}: 'weight_decay' must be >= 0, got {weight_decay}")
        if isinstance(learning_rate, (int, float)) and learning_rate < 0:
            raise ConfigError(f"{type(self).__name__}: 'learning_rate' must be >= 0, got {learning_rate}")
        # weight_decay=0.0 for the base class: it would otherwise apply its own (coupled) decay rule.
        super().__init__(learning_rate, params, 0.0)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.decoupled_weight_decay = Tensor(weight_decay, ms.float32)
        self._beta2_value = float(beta2)
        self._eps_value = float(eps)
        self.decay_flags = tuple(decay_mask(self._parameters, decay_filter or _default_decay_filter))
        self.moments1 = self._parameters.clone(prefix="adam_m", init="zeros")
        self.moments2 = self._parameters.clone(prefix="adam_v", init="zeros")

    @ms.jit
    def construct(self, gradients):
        """One update of every parameter from `gradients` (same order as `self.parameters`).

        Decorated with `ms.jit` so PyNative callers also get one compiled update instead of ~15 dispatched ops per
        parameter (GRAPH_MODE is still faster; numbers in train/README.md).
        """
        lr = self.get_lr()  # schedule(t - 1), read before the step counter moves
        step = self.global_step.astype(ms.float32).reshape(()) + 1.0  # t, shape () so 0-d params keep their shape
        lr = ops.depend(lr, self.assignadd(self.global_step, self.global_step_increase_tensor))
        return self._apply_updates(lr, step, gradients)

    def _apply_updates(self, lr, step, gradients):
        """Elementwise update rule `_update_rule` mapped over (param, m, v, grad, decay flag)."""
        bias_correction1 = 1.0 - ops.pow(self.beta1, step)
        bias_correction2 = 1.0 - ops.pow(self.beta2, step)
        return self.hyper_map(
            ops.partial(self._update_rule, self.beta1, self.beta2, self.eps, lr, self.decoupled_weight_decay,
                        bias_correction1, bias_correction2),
            self._parameters, self.moments1, self.moments2, gradients, self.decay_flags)

    def first_moments(self) -> List[Parameter]:
        """Raw (not bias-corrected) first-moment Parameters, aligned with `self.parameters`."""
        return list(self.moments1)

    def second_moments(self) -> List[Parameter]:
        """Raw (not bias-corrected) second-moment Parameters v, aligned with `self.parameters`.

        LAT quantization uses sqrt(v) + eps as its diagonal preconditioner; divide v by
        `second_moment_bias_correction()` first if the bias-corrected estimate is wanted.
        """
        return list(self.moments2)

    def second_moment_bias_correction(self) -> float:
        """1 - beta2^t for the t updates done so far (1.0 before the first update, where v is still 0)."""
        steps = int(self.global_step.asnumpy().reshape(-1)[0])
        return 1.0 - self._beta2_value ** steps if steps > 0 else 1.0

    @property
    def epsilon(self) -> float:
        """The eps of the Adam denominator, as a Python float (the LAT preconditioner reuses it)."""
        return self._eps_value


class AdamW(_AdamFamily):
    """Adam with bias correction and decoupled weight decay, in pure ops (runs on CPU, GPU and Ascend).

    Differs from TinyBERT's BertAdam, which omits the bias correction; with the default eps=1e-6 and warmup the
    difference only matters in the first few hundred steps.

    Args:
        params: list of Parameters, usually `net.trainable_params()`.
        learning_rate: float, or a `LearningRateSchedule` Cell (e.g. `WarmupSchedule`) called with the step.
        beta1, beta2, eps: Adam constants; eps is added to sqrt(v_hat).
        weight_decay: decoupled decay coefficient, applied where `decay_filter(param)` is True.
        decay_filter: Parameter -> bool; default excludes biases and LayerNorm (`applies_weight_decay`).
        fused: True runs the fused `ops.Adam` kernel (same maths, see `_adamw_fused_param_update`); False the
            elementwise rule. Both are tested against the same numpy twin.
    """

    _update_rule = _adamw_update

    def __init__(self, params, learning_rate, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                 weight_decay: float = 0.01, decay_filter: Optional[Callable[[Parameter], bool]] = None,
                 fused: bool = True):
        super().__init__(params, learning_rate, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         decay_filter=decay_filter)
        self.fused = bool(fused)
        self.fused_adam = ops.Adam()

    def _apply_updates(self, lr, step, gradients):
        if not self.fused:
            return super()._apply_updates(lr, step, gradients)
        beta1_power = ops.pow(self.beta1, step)
        beta2_power = ops.pow(self.beta2, step)
        scaled_eps = self.eps * ops.sqrt(1.0 - beta2_power)
        decay_factor = 1.0 - lr * self.decoupled_weight_decay
        return self.hyper_map(
            ops.partial(_adamw_fused_update, self.fused_adam, self.beta1, self.beta2, beta1_power, beta2_power, lr,
                        scaled_eps, decay_factor),
            self._parameters, self.moments1, self.moments2, gradients, self.decay_flags)


class Lamb(_AdamFamily):
    """LAMB: the AdamW direction (bias-corrected, decoupled decay) scaled per tensor by ||w|| / ||r||.

    The trust ratio is applied to every tensor, including the ones excluded from weight decay; it falls back to 1
    when ||w|| or ||r|| is 0. Arguments as in `AdamW`.
    """

    _update_rule = _lamb_update


_OPTIMIZERS = {"adamw": AdamW, "lamb": Lamb}


def build_optimizer(name: str, params: Sequence[Parameter], lr_schedule, weight_decay: float = 0.01,
                    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                    decay_filter: Optional[Callable[[Parameter], bool]] = None) -> _AdamFamily:
    """Build the optimizer named in a config (`adamw` or `lamb`, any letter case).

    `lr_schedule` is a float or a LearningRateSchedule Cell (see `schedules.WarmupSchedule`).
    """
    key = str(name).lower()
    if key not in _OPTIMIZERS:
        raise ConfigError(f"optimizer name: unknown value {name!r}; expected one of {sorted(_OPTIMIZERS)}")
    return _OPTIMIZERS[key](params, lr_schedule, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, decay_filter=decay_filter)

