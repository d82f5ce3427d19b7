"""Straight-through-estimator (STE) fake-quantization Cells.

Why Cells without Parameters: a quantizer is a function of its input, so the same Cell can wrap any layer's weight
or activation, and MindSpore forbids Parameters in Cells that define custom backward rules. Scales are recomputed
from the input at every call (TernaryBERT does the same: no calibration, no EMA), so nothing needs storing.

The backward rule (TernaryBERT's STE with clipping): the upstream gradient passes through unchanged where the
UNCLIPPED input lies strictly inside (-clip_value, clip_value) and is zeroed elsewhere, because saturated entries do
not change the output. It is written with `stop_gradient`, which compiles in GRAPH_MODE, under `@ms.jit` and in
PyNative, and exports to MindIR:

    p = x * inside
    out = (p - stop_gradient(p)) + stop_gradient(q)       # value exactly q, gradient d out / d x = inside

Why not the textbook `p + stop_gradient(q - p)`: in floating point `p + (q - p)` equals q only up to one rounding of
the larger operand, and that rounding can move the NEXT 8-bit activation point across a rounding boundary; a few
such steps add up. The exported graph computes q itself, so the reload check of a QAT MiniLM (374 updates) failed at
8.9e-3 on logits with the textbook form. `p - p` is exactly 0 for finite p, so this form's value IS q, bit for bit.
"""
from __future__ import annotations

from mindspore import nn, ops

from ms_nlp_compress.compress.quant import primitives

# TernaryBERT clamps weights and activations to +-2.5 before quantizing (`clip_val`).
DEFAULT_CLIP_VALUE = 2.5


def straight_through(tensor, quantized, clip_value=None):
    """Return `quantized` in the forward pass and pass the gradient to `tensor` where |tensor| < clip_value."""
    if clip_value is None:
        passed = tensor
    else:
        inside = ops.stop_gradient((ops.abs(tensor) < float(clip_value)).astype(tensor.dtype))
        passed = tensor * inside
    # (passed - passed) is exactly 0 for finite values, so the forward value is `quantized` bit for bit
    return (passed - ops.stop_gradient(passed)) + ops.stop_gradient(quantized)


class _QuantizerSTE(nn.Cell):
    """Base: subclasses implement `quantize(tensor)` (already clipped inside the primitive)."""

    def __init__(self, clip_value=DEFAULT_CLIP_VALUE):
        super().__init__()
        primitives._check_clip_value(clip_value)
        self.clip_value = clip_value

    def quantize(self, tensor):
        raise NotImplementedError

    def construct(self, tensor):
        return straight_through(tensor, self.quantize(tensor), self.clip_value)


class TernaryWeightSTE(_QuantizerSTE):
    """TWN ternary weight (threshold 0.7*mean|w|), per matrix or per row, clipped at +-clip_value."""

    def __init__(self, per_row: bool = False, clip_value=DEFAULT_CLIP_VALUE):
        super().__init__(clip_value)
        self.per_row = per_row

    def quantize(self, tensor):
        return primitives.twn_quantize(tensor, self.per_row, self.clip_value)


class LossAwareTernaryWeightSTE(nn.Cell):
    """LAT ternary weight. construct(weight, preconditioner): D comes from the optimizer (e.g. adam_preconditioner).

    The preconditioner is an input, not a Parameter, so the Cell stays parameter-free; no gradient flows into it.
    """

    def __init__(self, per_row: bool = False, clip_value=DEFAULT_CLIP_VALUE, num_iterations: int = 10,
                 init: str = "sign"):
        super().__init__()
        primitives._check_clip_value(clip_value)
        self.per_row = per_row
        self.clip_value = clip_value
        self.num_iterations = num_iterations
        self.init = init  # "sign" (reference) or "twn" (never worse than TWN; primitives.lat_ternarize)

    def construct(self, weight, preconditioner):
        quantized = primitives.lat_quantize(weight, ops.stop_gradient(preconditioner), self.per_row,
                                            self.num_iterations, self.clip_value, self.init)
        return straight_through(weight, quantized, self.clip_value)


class SymmetricQuantSTE(_QuantizerSTE):
    """Symmetric linear m-bit (max-abs scaled), per tensor or per row."""

    def __init__(self, num_bits: int = 8, per_row: bool = False, clip_value=DEFAULT_CLIP_VALUE):
        super().__init__(clip_value)
        primitives._check_num_bits(num_bits, 2, 16, "SymmetricQuantSTE")
        self.num_bits = num_bits
        self.per_row = per_row

    def quantize(self, tensor):
        return primitives.symmetric_quantize(tensor, self.num_bits, self.per_row, self.clip_value)


class MinMaxQuantSTE(_QuantizerSTE):
    """Asymmetric min-max linear m-bit, per tensor or per row."""

    def __init__(self, num_bits: int = 8, per_row: bool = False, clip_value=DEFAULT_CLIP_VALUE):
        super().__init__(clip_value)
        primitives._check_num_bits(num_bits, 1, 16, "MinMaxQuantSTE")
        self.num_bits = num_bits
        self.per_row = per_row

    def quantize(self, tensor):
        return primitives.minmax_quantize(tensor, self.num_bits, self.per_row, self.clip_value)


class LogQuantSTE(_QuantizerSTE):
    """Logarithmic m-bit (levels 0 and +-2^-k * max|x|), per tensor or per row."""

    def __init__(self, num_bits: int = 4, per_row: bool = False, clip_value=DEFAULT_CLIP_VALUE):
        super().__init__(clip_value)
        primitives._check_num_bits(num_bits, 2, 8, "LogQuantSTE")
        self.num_bits = num_bits
        self.per_row = per_row

    def quantize(self, tensor):
        return primitives.log_quantize(tensor, self.num_bits, self.per_row, self.clip_value)


class ActivationQuant8(_QuantizerSTE):
    """8-bit dynamic activation quantizer, one scale per tensor of the current batch, clipped at +-2.5.

    symmetric=True reproduces TernaryBERT (max-abs, levels +-127); symmetric=False is the min-max variant, which
    spends all 256 levels on the observed range (better for one-sided inputs such as attention probabilities).
    """

    def __init__(self, symmetric: bool = True, clip_value=DEFAULT_CLIP_VALUE):
        super().__init__(clip_value)
        self.symmetric = symmetric

    def quantize(self, tensor):
        if self.symmetric:
            return primitives.symmetric_quantize(tensor, 8, False, self.clip_value)
        return primitives.minmax_quantize(tensor, 8, False, self.clip_value)
