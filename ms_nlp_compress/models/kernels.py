"""CPU-friendly formulations of the backbone's GELU and LayerNorm, and the switch that picks them.

Why (measured with `msnc bench`, numbers in bench/README.md): on the MindSpore CPU backend
- `ops.erf` runs a scalar, value-dependent kernel: exact GELU costs 30-110 ms at 32x128x1536 (PyTorch: ~2 ms);
  the erf-free rational form below costs ~16 ms forward and ~16 ms backward once graph kernel fusion compiles it
  into one loop (unfused it is ~25 elementwise passes, about as slow as ops.erf);
- `nn.LayerNorm`'s forward is fine (~6 ms at 4096x384) but its backward (LayerNormGrad) takes 25-40 ms; the closed
  form with every row reduction done as a GEMM by a (H, 1) column of 1/H takes 11-18 ms.
On Ascend both are fused kernels and must stay so: `NezhaConfig.kernels` = "auto" (the default) picks the
formulations here only when the MindSpore device target is CPU at model construction; "fused" always uses
MindSpore's kernels, "cpu" always the formulations here (tests, ablations).

Numerics (checked in tests/models/test_kernels.py):
- `erf_rational` is the odd/even rational minimax fit used by Eigen and XLA for float32 erf, clamped to [-4, 4]
  (where float32 erf is +-1 to within 2e-8). Max |error| vs float64 `math.erf` over [-10, 10]: 6.5e-8 in exact
  arithmetic, 4.2e-7 evaluated in float32. `gelu_exact_cpu` is within 1.3e-6 (absolute) of float64 exact GELU on
  [-10, 10] (0.5 |x| times the erf error); the tanh approximation is off by up to ~1e-3.
- `LayerNorm` has the same forward as nn.LayerNorm (the same primitive, bit-identical) and a backward that matches
  LayerNormGrad to float32 rounding.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ms_nlp_compress.errors import ConfigError

KERNEL_CHOICES = ("auto", "fused", "cpu")
# The components that have a CPU formulation; `only_cpu_kernels` restricts the set (ablation benchmarks).
CPU_COMPONENTS = ("gelu", "layer_norm")
_enabled_components = set(CPU_COMPONENTS)

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# erf(x) ~= x * P(x^2) / Q(x^2) on [-4, 4]: numerator (odd, degree 13) and denominator (even, degree 8)
# coefficients, lowest order first (Eigen's generic_fast_erf_float / XLA's ErfImpl32).
_ERF_NUMERATOR = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
                  -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
_ERF_DENOMINATOR = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
                    -1.45660718464996e-05)
_ERF_CLAMP = 4.0


def cpu_kernels_enabled(kind: str) -> bool:
    """True when `NezhaConfig.kernels == kind` selects the CPU formulations for a model built now.

    "auto" reads MindSpore's device target, so call this at model construction, after the runtime is set up.
    """
    if kind == "cpu":
        return True
    if kind == "fused":
        return False
    if kind == "auto":
        return str(ms.get_context("device_target")).upper() == "CPU"
    raise ConfigError(f"model.kernels: must be one of {KERNEL_CHOICES}, got {kind!r}")


def use_cpu_kernel(kind: str, component: str) -> bool:
    """`cpu_kernels_enabled(kind)` for one component ("gelu" or "layer_norm"), honouring `only_cpu_kernels`."""
    if component not in CPU_COMPONENTS:
        raise ValueError(f"unknown kernel component {component!r}; one of {CPU_COMPONENTS}")
    return cpu_kernels_enabled(kind) and component in _enabled_components


@contextlib.contextmanager
def only_cpu_kernels(*components: str) -> Iterator[None]:
    """Models built inside use the CPU formulation only for `components` (for ablation benchmarks)."""
    global _enabled_components
    unknown = set(components) - set(CPU_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown kernel components {sorted(unknown)}; one of {CPU_COMPONENTS}")
    previous = _enabled_components
    _enabled_components = set(components)
    try:
        yield
    finally:
        _enabled_components = previous


# ----------------------------------------------------------------------------------------------------------------
# GELU
# ----------------------------------------------------------------------------------------------------------------


def erf_rational(x):
    """erf(x) as a rational function: only multiply, add, one divide and a clamp (no exp, no erf kernel)."""
    # minimum/maximum primitives, not ops.clamp: the clamp function graph breaks when reused inside a bprop.
    x = ops.minimum(ops.maximum(x, -_ERF_CLAMP), _ERF_CLAMP)
    x2 = x * x
    numerator = x2 * _ERF_NUMERATOR[6] + _ERF_NUMERATOR[5]
    numerator = numerator * x2 + _ERF_NUMERATOR[4]
    numerator = numerator * x2 + _ERF_NUMERATOR[3]
    numerator = numerator * x2 + _ERF_NUMERATOR[2]
    numerator = numerator * x2 + _ERF_NUMERATOR[1]
    numerator = numerator * x2 + _ERF_NUMERATOR[0]
    denominator = x2 * _ERF_DENOMINATOR[4] + _ERF_DENOMINATOR[3]
    denominator = denominator * x2 + _ERF_DENOMINATOR[2]
    denominator = denominator * x2 + _ERF_DENOMINATOR[1]
    denominator = denominator * x2 + _ERF_DENOMINATOR[0]
    return x * numerator / denominator


def normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 + 0.5 * erf_rational(x * _SQRT_HALF)


def gelu_exact_cpu(x):
    """x * Phi(x), exact GELU (not the tanh approximation) through `erf_rational`."""
    return x * normal_cdf(x)


def gelu_exact_cpu_grad(x):
    """d/dx [x Phi(x)] = Phi(x) + x phi(x), with phi the standard normal density."""
    return normal_cdf(x) + x * ops.exp(-0.5 * x * x) * _INV_SQRT_2PI


class ExactGelu(nn.Cell):
    """`gelu_exact_cpu` with a hand-written backward.

    Autodiff through the clamp and the rational function costs ~10 extra elementwise passes (measured 180-210 ms
    at 32x128x1536 against 50-80 ms for this bprop); the closed-form derivative recomputes Phi and adds one exp.
    No Parameters here (a bprop Cell cannot use them).
    """

    def construct(self, x):
        return gelu_exact_cpu(x)

    def bprop(self, x, out, dout):
        return (dout * gelu_exact_cpu_grad(x),)


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------------------


class _LayerNormFunction(nn.Cell):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last axis, with a GEMM-based backward.

    Forward: MindSpore's LayerNorm primitive (on CPU as fast as the alternatives, ~7 ms at 4096x384).
    Backward: the closed form below with every row statistic (the mean, the variance and the two projections of
    the incoming gradient) computed as a GEMM by a (H, 1) column of 1/H and the gamma / beta gradients as a GEMM by a
    row of ones, instead of MindSpore's LayerNormGrad (28-41 ms at 4096x384):
        xhat = (x - mean) * rstd,  g = dy * gamma
        dx = rstd * (g - mean_H(g) - xhat * mean_H(g * xhat)),  dgamma = sum_N(dy * xhat),  dbeta = sum_N(dy).
    No Parameters (a bprop Cell cannot use them): gamma and beta come in as inputs.
    """

    def __init__(self, width: int, epsilon: float):
        super().__init__()
        self.width = width
        self.epsilon = float(epsilon)
        self.forward = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.epsilon)
        self.average = Tensor(np.full((width, 1), 1.0 / width, np.float32))  # (H, 1)

    def construct(self, x, gamma, beta):
        return self.forward(x, gamma, beta)[0]

    def bprop(self, x, gamma, beta, out, dout):
        rows = x.reshape(-1, self.width).astype(ms.float32)  # (N, H)
        grad = dout.reshape(-1, self.width).astype(ms.float32)  # (N, H)
        average = self.average.astype(ms.float32)  # amp may have cast the constant
        centred = rows - ops.matmul(rows, average)  # (N, H)
        rstd = ops.rsqrt(ops.matmul(centred * centred, average) + self.epsilon)  # (N, 1)
        xhat = centred * rstd
        ones = ops.ones((1, rows.shape[0]), ms.float32)  # (1, N)
        dgamma = ops.matmul(ones, grad * xhat).reshape(gamma.shape)  # (H,)
        dbeta = ops.matmul(ones, grad).reshape(beta.shape)  # (H,)
        scaled = grad * gamma.astype(ms.float32)  # (N, H)
        projection = ops.matmul(scaled * xhat, average)  # (N, 1)
        dx = rstd * (scaled - ops.matmul(scaled, average) - xhat * projection)
        return dx.reshape(x.shape).astype(x.dtype), dgamma.astype(gamma.dtype), dbeta.astype(beta.dtype)


class LayerNorm(nn.Cell):
    """Drop-in for `nn.LayerNorm((H,), epsilon=eps)` with the GEMM-based backward of `_LayerNormFunction`.

    Same Parameters as nn.LayerNorm: `gamma` (H,) and `beta` (H,), same names, shapes and initial values, so
    checkpoints load either way; the forward is the same primitive, so outputs are identical.
    """

    def __init__(self, normalized_shape, epsilon: float = 1e-7, gamma_init="ones", beta_init="zeros"):
        super().__init__()
        normalized_shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) \
            else (int(normalized_shape),)
        if len(normalized_shape) != 1:
            raise ValueError(f"LayerNorm normalises the last axis only; got normalized_shape {normalized_shape}")
        self.normalized_shape = normalized_shape
        self.epsilon = float(epsilon)
        self.gamma = Parameter(initializer(gamma_init, normalized_shape), name="gamma")
        self.beta = Parameter(initializer(beta_init, normalized_shape), name="beta")
        self.function = _LayerNormFunction(normalized_shape[0], self.epsilon)

    def construct(self, x):
        # Statistics in float32 whatever the compute type (the mixed-precision policy for LayerNorm).
        out = self.function(x.astype(ms.float32), self.gamma.astype(ms.float32), self.beta.astype(ms.float32))
        return out.astype(x.dtype)

    def extend_repr(self):
        return f"normalized_shape={self.normalized_shape}, epsilon={self.epsilon}, backward=gemm"
