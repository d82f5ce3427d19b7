"""Quantizer maths as pure functions on MindSpore tensors.

Every function here is written with plain `mindspore.ops` so it runs unchanged in PyNative mode, inside a
GRAPH_MODE `Cell.construct` and inside `@ms.jit`. Arguments that change the graph structure (`num_bits`,
`per_row`, `clip_value`, iteration counts) must be Python constants; tensors carry the data.

Conventions shared by all quantizers:

- Granularity. `per_row=False` uses one scale for the whole tensor ("layer-wise" in TernaryBERT, used for the
  Transformer matrices). `per_row=True` uses one scale per slice along the LAST axis ("row-wise", used for the word
  embedding where rows differ in scale). Per-tensor scales have shape (); per-row scales keep the reduced axis, shape
  (..., 1), so `codes * scale` broadcasts without reshapes.
- Clipping. `clip_value=c` clamps the input to [-c, c] before any statistic is computed (TernaryBERT clamps weights
  at 2.5 so one outlier cannot stretch the scale). The STE Cells in `ste.py` zero the gradient outside that range.
- Degenerate inputs never divide by zero: an all-zero tensor (or row) gets scale 0 and quantizes to 0.
- Finite input is ASSUMED. Raising from inside a compiled graph is impossible, so NaN/inf checks happen host-side
  with `validate_finite(name, array)` before data enters a graph (checkpoint load, export, tests). A NaN that slips
  through propagates into the output instead of raising.
- Overflow. Statistics avoid squaring the raw input (the std in the gradient quantizer is computed on the input
  divided by its max), so huge magnitudes (1e30 is tested) quantize correctly as long as a group's sum of magnitudes
  stays below the float32 maximum (3.4e38).
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

# TWN (Li et al. 2016): for Gaussian-like weights the error-minimising threshold is about 0.6*sigma, i.e. about
# 0.75*mean|w|; the paper rounds it to 0.7*mean|w|, and TernaryBERT keeps 0.7. It is a fixed rule, not a fit.
TWN_THRESHOLD_FACTOR = 0.7

_LOG_OF_TWO = math.log(2.0)
# Floor applied before taking a logarithm, so log(0) never produces -inf inside a graph.
_TINY = 1e-38


# --------------------------------------------------------------------------------------------------------------
# Host-side validation
# --------------------------------------------------------------------------------------------------------------
def validate_finite(name: str, array) -> None:
    """Raise ValueError naming `name` if `array` (numpy array, MindSpore Tensor or scalar) holds NaN or inf.

    Why host-side: a compiled graph cannot raise on data-dependent conditions, so the in-graph primitives assume
    finite input; call this where data enters (checkpoint load, before export, in data pipelines, in tests).
    """
    values = array.asnumpy() if isinstance(array, Tensor) else np.asarray(array)
    if values.dtype.kind not in "fc":
        return  # integer and boolean arrays cannot hold NaN or inf
    finite = np.isfinite(values)
    if finite.all():
        return
    nan_count = int(np.isnan(values).sum())
    inf_count = int(values.size - finite.sum() - nan_count)
    first_bad = tuple(int(i) for i in np.argwhere(~finite)[0]) if values.ndim else ()
    raise ValueError(
        f"{name} contains {nan_count} NaN and {inf_count} infinite value(s) (first at index {first_bad}, "
        f"shape {tuple(values.shape)}); quantizers and losses need finite input"
    )


def _check_num_bits(num_bits, minimum: int, maximum: int, what: str) -> None:
    # Evaluated at graph-compile time: num_bits is a Python constant, so raising here is legal in graph mode.
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not minimum <= num_bits <= maximum:
        raise ValueError(f"{what}: num_bits must be an integer in [{minimum}, {maximum}], got {num_bits!r}")


def _check_clip_value(clip_value) -> None:
    if clip_value is not None and not clip_value > 0:
        raise ValueError(f"clip_value must be None or > 0, got {clip_value!r}")


def _check_per_row(tensor, per_row: bool, what: str) -> None:
    if per_row and len(tensor.shape) == 0:
        raise ValueError(f"{what}: per_row=True needs a tensor with at least one axis, got a scalar")


# --------------------------------------------------------------------------------------------------------------
# Small reductions that respect the granularity (all graph-safe)
# --------------------------------------------------------------------------------------------------------------
def _group_sum(tensor, per_row: bool):
    """Sum over the last axis keeping it (per row), or over everything to shape () (per tensor)."""
    if per_row:
        return tensor.sum(axis=-1, keepdims=True)
    return tensor.sum()


def _group_max(tensor, per_row: bool):
    if per_row:
        return ops.amax(tensor, -1, True)
    return ops.amax(tensor)


def _group_min(tensor, per_row: bool):
    if per_row:
        return ops.amin(tensor, -1, True)
    return ops.amin(tensor)


def _group_size(tensor, per_row: bool) -> int:
    """Number of elements that share one scale (a Python int: shapes are static in graph mode)."""
    if per_row:
        return tensor.shape[-1]
    count = 1
    for extent in tensor.shape:
        count *= extent
    return count


def _safe_divide(numerator, denominator):
    """numerator / denominator where denominator > 0, else 0: all-zero groups get scale 0, not NaN."""
    positive = denominator > 0.0
    safe_denominator = ops.where(positive, denominator, ops.ones_like(denominator))
    return ops.where(positive, numerator / safe_denominator, ops.zeros_like(numerator / safe_denominator))


def clip_symmetric(tensor, clip_value):
    """Clamp to [-clip_value, clip_value]; identity when clip_value is None."""
    _check_clip_value(clip_value)
    if clip_value is None:
        return tensor
    return ops.clamp(tensor, -float(clip_value), float(clip_value))


# --------------------------------------------------------------------------------------------------------------
# Ternary quantizers
# --------------------------------------------------------------------------------------------------------------
def twn_ternarize(weight, per_row: bool = False, clip_value=None):
    """Ternary Weight Networks: returns (signs, alpha) with signs in {-1, 0, +1} and weight ~= alpha * signs.

    threshold = 0.7 * mean|w|; signs = sign(w) where |w| > threshold else 0; alpha = mean of |w| over the kept
    entries (the least-squares scale for those signs). An all-zero group keeps nothing and gets alpha 0.
    """
    _check_per_row(weight, per_row, "twn_ternarize")
    weight = clip_symmetric(weight, clip_value)
    magnitude = ops.abs(weight)
    threshold = TWN_THRESHOLD_FACTOR * _group_sum(magnitude, per_row) / float(_group_size(weight, per_row))
    keep = (magnitude > threshold).astype(weight.dtype)
    alpha = _safe_divide(_group_sum(magnitude * keep, per_row), _group_sum(keep, per_row))
    return ops.sign(weight) * keep, alpha


def twn_quantize(weight, per_row: bool = False, clip_value=None):
    """TWN fake-quantized weight alpha * signs, same shape as `weight`."""
    signs, alpha = twn_ternarize(weight, per_row, clip_value)
    return signs * alpha


def adam_preconditioner(second_moment, eps: float = 1e-8):
    """Diagonal preconditioner D = sqrt(v) + eps from an Adam-style second-moment estimate v (same shape as w).

    LAT approximates the loss curvature around the latent weights by D, so entries the optimizer sees as "steep"
    get represented more accurately. Pass the bias-corrected v if your optimizer keeps it uncorrected.
    """
    return ops.sqrt(second_moment) + eps


def lat_ternarize(weight, preconditioner=None, per_row: bool = False, num_iterations: int = 10, clip_value=None,
                  init: str = "sign"):
    """Loss-aware ternarization: minimise (w_hat - w)^T D (w_hat - w) over w_hat = alpha * b, b in {-1, 0, 1}^n.

    Returns (signs, alpha). Alternating closed form (LAT, Hou & Kwok 2018; BinaryBERT's `LaqQuantizer`):
        b <- sign(w)                                   (initialisation, as in the reference solver)
        repeat num_iterations times:
            alpha <- sum_i d_i |b_i w_i| / sum_i d_i |b_i|       (best scale for fixed codes)
            b_i   <- sign(w_i) if |w_i| > alpha / 2 else 0       (best codes for fixed scale; independent of d_i)
        alpha <- best scale for the final codes
    Each step cannot increase the D-weighted error, so the result is a fixed point of the alternation once the codes
    stop changing (a handful of iterations on Gaussian-like weights). The final alpha refresh deviates from the
    reference, which returns the alpha computed from the previous codes; at convergence both agree.
    With D = identity this is the exact alternating minimiser of ||w_hat - w||^2, i.e. TWN with a fitted rather
    than a fixed 0.7 threshold. `preconditioner=None` means identity. D must be positive (see adam_preconditioner).

    init="twn" starts the alternation from TWN's codes (threshold 0.7*mean|w|) instead of sign(w). Since every
    step cannot increase the D-weighted error and, with D = identity, the first alpha step reproduces TWN's own
    scale, the result is then never worse than TWN. The reference's sign start can stop at a fixed point slightly
    worse than TWN: measured on uniform weights (8 x 52): squared error 1.544071 against TWN's 1.544038.
    """
    _check_per_row(weight, per_row, "lat_ternarize")
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"lat_ternarize: num_iterations must be an integer >= 1, got {num_iterations!r}")
    if init not in ("sign", "twn"):
        raise ValueError(f"lat_ternarize: init must be 'sign' or 'twn', got {init!r}")
    weight = clip_symmetric(weight, clip_value)
    if preconditioner is None:
        preconditioner = ops.ones_like(weight)
    magnitude = ops.abs(weight)
    weighted_magnitude = preconditioner * magnitude
    if init == "twn":
        threshold = TWN_THRESHOLD_FACTOR * _group_sum(magnitude, per_row) / float(_group_size(weight, per_row))
        keep = (magnitude > threshold).astype(weight.dtype)
    else:
        # b = sign(w): every nonzero entry is kept.
        keep = (magnitude > 0.0).astype(weight.dtype)
    alpha = _safe_divide(_group_sum(weighted_magnitude * keep, per_row), _group_sum(preconditioner * keep, per_row))
    for _ in range(num_iterations):
        keep = (magnitude > alpha * 0.5).astype(weight.dtype)
        alpha = _safe_divide(_group_sum(weighted_magnitude * keep, per_row),
                             _group_sum(preconditioner * keep, per_row))
    return ops.sign(weight) * keep, alpha


def lat_quantize(weight, preconditioner=None, per_row: bool = False, num_iterations: int = 10, clip_value=None,
                 init: str = "sign"):
    """LAT fake-quantized weight alpha * signs."""
    signs, alpha = lat_ternarize(weight, preconditioner, per_row, num_iterations, clip_value, init)
    return signs * alpha


# --------------------------------------------------------------------------------------------------------------
# m-bit linear and logarithmic quantizers
# --------------------------------------------------------------------------------------------------------------
def symmetric_quantize_codes(tensor, num_bits: int, per_row: bool = False, clip_value=None):
    """Symmetric linear m-bit: returns (codes, step), codes integers in [-(2^(m-1)-1), 2^(m-1)-1] stored as floats.

    step = max|x| / (2^(m-1) - 1), so the largest magnitude maps exactly to the top level. The level -2^(m-1) is
    unused (as in TernaryBERT's SymQuantizer) to keep the grid symmetric around an exact zero. For m = 8 the codes
    fit int8; for m = 4, a two's-complement nibble.
    """
    _check_num_bits(num_bits, 2, 16, "symmetric_quantize")
    _check_per_row(tensor, per_row, "symmetric_quantize")
    tensor = clip_symmetric(tensor, clip_value)
    top_level = float(2 ** (num_bits - 1) - 1)
    step = _group_max(ops.abs(tensor), per_row) / top_level
    codes = ops.clamp(ops.round(_safe_divide(tensor, step)), -top_level, top_level)
    return codes, step


def symmetric_quantize(tensor, num_bits: int, per_row: bool = False, clip_value=None):
    """Symmetric linear m-bit fake quantization: codes * step."""
    codes, step = symmetric_quantize_codes(tensor, num_bits, per_row, clip_value)
    return codes * step


def minmax_quantize_codes(tensor, num_bits: int, per_row: bool = False, clip_value=None):
    """Asymmetric (min-max) linear m-bit: returns (codes, step, minimum), codes integers in [0, 2^m - 1].

    x_hat = minimum + codes * step with step = (max - min) / (2^m - 1). Uses all 2^m levels, which suits one-sided
    activations (GELU outputs, attention probabilities); zero is not exactly representable in general. A constant
    group has step 0 and is reproduced exactly by `minimum`.
    """
    _check_num_bits(num_bits, 1, 16, "minmax_quantize")
    _check_per_row(tensor, per_row, "minmax_quantize")
    tensor = clip_symmetric(tensor, clip_value)
    top_code = float(2 ** num_bits - 1)
    minimum = _group_min(tensor, per_row)
    step = (_group_max(tensor, per_row) - minimum) / top_code
    codes = ops.clamp(ops.round(_safe_divide(tensor - minimum, step)), 0.0, top_code)
    return codes, step, minimum


def minmax_quantize(tensor, num_bits: int, per_row: bool = False, clip_value=None):
    """Asymmetric min-max m-bit fake quantization: minimum + codes * step."""
    codes, step, minimum = minmax_quantize_codes(tensor, num_bits, per_row, clip_value)
    return codes * step + minimum


def log_quantize_codes(tensor, num_bits: int, per_row: bool = False, clip_value=None):
    """Logarithmic m-bit: returns (codes, scale) with x_hat = sign(codes) * 2^(|codes| - K - 1) * scale (0 if code 0).

    Levels are 0 and +-2^-k * scale for k = 0..K, K = 2^(m-1) - 2, scale = max|x|: one sign bit plus 2^(m-1) - 1
    magnitudes. codes are signed integers in [-(K+1), K+1] (they fit a signed m-bit field): |code| = K + 1 - k.
    Rounding is to the nearest level in log2 space (round(log2|x|/scale)), the usual log-quantization rule; entries
    below half the smallest level (|x|/scale < 2^-(K+1)) become 0. m = 2 degenerates to {-scale, 0, +scale}.
    Powers of two make dequantization a shift on integer hardware, which is the point of this grid.
    """
    _check_num_bits(num_bits, 2, 8, "log_quantize")
    _check_per_row(tensor, per_row, "log_quantize")
    tensor = clip_symmetric(tensor, clip_value)
    deepest_exponent = float(2 ** (num_bits - 1) - 2)  # K
    magnitude = ops.abs(tensor)
    scale = _group_max(magnitude, per_row)
    normalised = _safe_divide(magnitude, scale)  # in [0, 1]
    log2_normalised = ops.log(ops.maximum(normalised, _TINY)) * (1.0 / _LOG_OF_TWO)
    exponent = ops.clamp(ops.round(log2_normalised), -deepest_exponent, 0.0)  # -k, in [-K, 0]
    is_zero = normalised < 2.0 ** (-(deepest_exponent + 1.0))
    code_magnitude = ops.where(is_zero, ops.zeros_like(exponent), exponent + (deepest_exponent + 1.0))
    return ops.sign(tensor) * code_magnitude, scale


def log_dequantize(codes, scale, num_bits: int):
    """Map log codes back to values: exact powers of two from a lookup table (exp() would not be exact)."""
    _check_num_bits(num_bits, 2, 8, "log_dequantize")
    deepest_exponent = 2 ** (num_bits - 1) - 2
    # table[j] = magnitude of |code| = j: table[0] = 0, table[j] = 2^(j - K - 1)
    table = Tensor([0.0] + [2.0 ** (j - deepest_exponent - 1) for j in range(1, deepest_exponent + 2)], ms.float32)
    magnitude = ops.gather(table, ops.abs(codes).astype(ms.int32), 0)
    return ops.sign(codes) * magnitude.astype(scale.dtype) * scale


def log_quantize(tensor, num_bits: int, per_row: bool = False, clip_value=None):
    """Logarithmic m-bit fake quantization (see log_quantize_codes)."""
    codes, scale = log_quantize_codes(tensor, num_bits, per_row, clip_value)
    return log_dequantize(codes, scale, num_bits)


# --------------------------------------------------------------------------------------------------------------
# Stochastic gradient quantizer (distributed low-bit training)
# --------------------------------------------------------------------------------------------------------------
def _standard_deviation(tensor):
    """Population std of all entries, computed on tensor / max|tensor| so squares cannot overflow float32."""
    largest = ops.amax(ops.abs(tensor))
    normalised = _safe_divide(tensor, largest)
    centred = normalised - normalised.mean()
    return largest * ops.sqrt((centred * centred).mean())


def stochastic_quantize_codes(gradient, uniform_noise, num_bits: int, clip_factor=3.0):
    """Unbiased stochastic rounding to b-bit signed levels: returns (codes, step), codes in [-(2^(b-1)-1), ...].

    range = clip_factor * std(gradient) (Hou, Zhang & Kwok 2019 clip each entry to +-c*sigma, c = 3 by default;
    this bounds the quantization variance independently of the dimension) or max|gradient| if clip_factor is None.
    With k = 2^(b-1) - 1 levels per side, position = |clip(g)| / range * k lies between floor(position) and the
    next level; it rounds up with probability equal to its fractional part, so E[codes * step] = clip(g) exactly.
    `uniform_noise` holds U[0, 1) samples broadcastable against `gradient` (e.g. ops.rand_like(gradient), or shape
    (samples, *gradient.shape) to draw many quantizations at once). step = range / k. A constant or single-entry
    gradient has std 0 and quantizes to 0 under clipping: use clip_factor=None for such tensors.
    """
    _check_num_bits(num_bits, 2, 16, "stochastic_quantize")
    if clip_factor is not None and not clip_factor > 0:
        raise ValueError(f"stochastic_quantize: clip_factor must be None or > 0, got {clip_factor!r}")
    top_level = float(2 ** (num_bits - 1) - 1)
    if clip_factor is None:
        quantization_range = ops.amax(ops.abs(gradient))
    else:
        quantization_range = float(clip_factor) * _standard_deviation(gradient)
    clipped = ops.minimum(ops.maximum(gradient, -quantization_range), quantization_range)
    position = _safe_divide(ops.abs(clipped), quantization_range) * top_level  # in [0, top_level]
    lower_level = ops.floor(position)
    round_up = (uniform_noise < position - lower_level).astype(gradient.dtype)
    level = ops.minimum(lower_level + round_up, top_level)
    return ops.sign(clipped) * level, quantization_range / top_level


def stochastic_quantize(gradient, uniform_noise, num_bits: int, clip_factor=3.0):
    """Stochastically rounded gradient codes * step (see stochastic_quantize_codes)."""
    codes, step = stochastic_quantize_codes(gradient, uniform_noise, num_bits, clip_factor)
    return codes * step


def stochastic_quantize_gradient(gradient, num_bits: int, clip_factor=3.0):
    """stochastic_quantize with noise drawn in-graph by ops.rand_like (seed it with ms.set_seed for repeatability)."""
    return stochastic_quantize(gradient, ops.rand_like(gradient), num_bits, clip_factor)
