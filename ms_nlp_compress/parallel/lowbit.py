"""Low-bit gradient exchange for data parallel training (Hou, Zhang & Kwok, ICLR 2019), scheme 1: all-gather.

Each rank, inside the compiled gradient graph:

    g (+ error-feedback residual)                           fp32, all gradients fused into one flat vector
    -> per group (one gradient tensor, or one bucket of `bucket_size` elements):
         scale = min(max|g|, c * std(g))                      = max|clip(g, +-c*std)|; c = None: scale = max|g|
         position = |clip(g, +-scale)| / scale * k,  k = 2^(b-1) - 1
         level = floor(position) + [u < frac(position)]       u ~ U[0,1) from this rank's RandomStream
         E[sign * level * scale / k] = clip(g)                (unbiased stochastic rounding of the clipped value)
    -> code = sign * level + k in [0, 2k]  (fits b bits), packed 32 // b codes per int32 word
    -> AllGather(int32 words), AllGather(float32 scales)      the only collectives: never float gradients
    -> unpack every rank's codes, dequantize with its scales, average over ranks (the same ops on every rank,
       so every rank gets the bit-identical mean)

Why the scale is max|clip(g)| and not the primitive's c*std: when a group's largest entry is below c*std (common
for small or light-tailed tensors) the c*std grid wastes the top levels; max|clip(g)| is the smallest range that
still covers every clipped entry, so the rounding step, and with it the rounding variance (<= step^2 / 4 per
entry), can only shrink. tests/parallel/test_lowbit_local.py measures that on a light-tailed gradient.

Overflow: a non-finite entry makes its group's scale non-finite (max or std), that scale travels in the gathered
scales, and the dequantized mean of that group is NaN on EVERY rank, so the trainer's finiteness check gives the
same verdict everywhere and skips the step; error-feedback residuals are only updated when every gathered scale is
finite. Loss scaling: a power-of-two loss scale passes through every op of the quantizer exactly, so quantizing
scaled gradients gives exactly the scaled result; only the error-feedback residual is kept in the units of the
gradients it received (see README: unscale before the reducer when the scale is dynamic).

CPU note (MindSpore 2.10): AllGather takes int32 but not int8/uint8 and AllReduce takes only floats, hence the
int32 words. On Ascend the same graph runs over HCCL.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.dropout import RandomStream
from ms_nlp_compress.parallel.comm_config import CommConfig

# Random-stream site of the rounding noise; far from the model's dropout sites (10 + 8 * layer).
GRADIENT_NOISE_SITE = 0x5A17


def top_level(bits: int) -> int:
    """k: signed levels -k..k, so codes 0..2k fit in `bits` bits (2k = 2^bits - 2)."""
    return 2 ** (bits - 1) - 1


def codes_per_word(bits: int) -> int:
    return 32 // bits


def packed_words(count: int, bits: int) -> int:
    return math.ceil(count / codes_per_word(bits))


# --------------------------------------------------------------------------------------------------------------
# In-graph pieces (pure functions of tensors; shapes and bit widths are Python constants)
# --------------------------------------------------------------------------------------------------------------
def _safe_divide(numerator, denominator):
    """numerator / denominator where denominator > 0, else 0 (an all-zero group has scale 0 and codes 0)."""
    positive = denominator > 0.0
    safe = ops.where(positive, denominator, ops.ones_like(denominator))
    quotient = numerator / safe
    return ops.where(positive, quotient, ops.zeros_like(quotient))


def group_scales(groups, clip_factor: Optional[float]):
    """Row-wise scale of a (groups, size) matrix: min(max|g|, c*std(g)), shape (groups, 1).

    The std is computed on g / max|g| so squares cannot overflow float32 for huge gradients.
    """
    largest = ops.amax(ops.abs(groups), -1, True)  # (groups, 1)
    if clip_factor is None:
        return largest
    normalised = _safe_divide(groups, largest)
    centred = normalised - normalised.mean(-1, True)
    std = largest * ops.sqrt((centred * centred).mean(-1, True))
    return ops.minimum(largest, float(clip_factor) * std)


def stochastic_levels(values, scale, noise, bits: int):
    """Signed integer levels (as float) in [-k, k]: unbiased stochastic rounding of clip(values, +-scale)/scale*k.

    values, noise: same shape; scale broadcasts against them.
    """
    k = float(top_level(bits))
    clipped = ops.minimum(ops.maximum(values, -scale), scale)
    position = _safe_divide(ops.abs(clipped), scale) * k  # in [0, k]
    lower = ops.floor(position)
    round_up = (noise < position - lower).astype(values.dtype)
    return ops.sign(clipped) * ops.minimum(lower + round_up, k)


def pack_words_graph(codes, bits: int):
    """1-D int32 codes in [0, 2^bits) whose length is a multiple of 32 // bits -> 1-D int32 words.

    Code i sits at bits * (i % per_word) of word i // per_word (for 2, 4, 8 bits the layout of
    compress/quant/packing.pack_codes_to_int32). The top field may wrap into the sign bit, by design.
    """
    per_word = codes_per_word(bits)
    grouped = codes.reshape(-1, per_word)  # (words, per_word)
    shifts = Tensor([bits * i for i in range(per_word)], ms.int32)
    shifted = ops.bitwise_left_shift(grouped, shifts)
    columns = ops.split(shifted, 1, axis=1)  # per_word tensors (words, 1): OR-ing columns beats a reduction
    words = columns[0]
    for position in range(1, per_word):
        words = ops.bitwise_or(words, columns[position])
    return words.reshape(-1)


def unpack_words_graph(words, bits: int):
    """(rows, words) int32 -> (rows, words * per_word) int32 codes (inverse of pack_words_graph per row)."""
    per_word = codes_per_word(bits)
    rows = words.shape[0]
    shifts = Tensor([bits * i for i in range(per_word)], ms.int32)
    mask = Tensor(2 ** bits - 1, ms.int32)
    # The arithmetic right shift copies the sign bit down; the mask removes the copies.
    codes = ops.bitwise_and(ops.bitwise_right_shift(words.expand_dims(-1), shifts), mask)  # (rows, W, per_word)
    return codes.reshape(rows, -1)


# --------------------------------------------------------------------------------------------------------------
# Layout: where each gradient tensor lives in the fused vector, and how it is grouped
# --------------------------------------------------------------------------------------------------------------
class FusedLayout:
    """Static layout of the fused gradient vector: offsets, groups (per tensor or per bucket), packed sizes."""

    def __init__(self, shapes: Sequence[Sequence[int]], bits: int, bucket_size: int = 0, shards: int = 1):
        if not shapes:
            raise ConfigError("comm: the low-bit reducer got no parameters to exchange")
        self.shapes = [tuple(int(extent) for extent in shape) for shape in shapes]
        self.sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]
        self.offsets = [int(offset) for offset in np.concatenate([[0], np.cumsum(self.sizes)[:-1]])]
        self.total = int(sum(self.sizes))
        self.bits = bits
        self.bucket_size = bucket_size
        if bucket_size:
            # whole buckets per shard (the sharded scheme): the bucket count is a multiple of `shards`
            self.groups = math.ceil(self.total / (bucket_size * shards)) * shards
            self.padded = self.groups * bucket_size  # the last bucket(s) are zero padded
        else:
            self.groups = len(self.sizes)
            self.padded = self.total
        self.words = packed_words(self.padded, bits)
        self.code_padding = self.words * codes_per_word(bits) - self.padded

    def lowbit_bytes(self) -> int:
        """Bytes one rank hands to the collectives per low-bit exchange: int32 words + float32 scales."""
        return 4 * self.words + 4 * self.groups

    def fp32_bytes(self) -> int:
        """Bytes one rank hands to the fp32 all-reduce of a warm-up step (the fused vector, bucket padding
        included)."""
        return 4 * self.padded


# --------------------------------------------------------------------------------------------------------------
# The reducer Cell
# --------------------------------------------------------------------------------------------------------------
class LowBitAllGatherReducer(nn.Cell):
    """Maps the gradient tuple to its mean over ranks, exchanging only packed b-bit codes and float32 scales.

    Build it after `set_dropout_seed(seed, rank)` (the trainer's `start_run` does that): the rounding noise comes
    from a `RandomStream` keyed by hash(seed, rank), so ranks draw independent noise and a resumed run draws the
    same noise as an uninterrupted one (the stream counter is a Parameter of this Cell, like the residuals).

    Args:
        parameters: the Parameters whose gradients arrive, in the gradient tuple's order.
        comm: the `comm:` section (gradient_bits, clip_factor, error_feedback, warmup_steps, bucket_size).
        world_size: number of data-parallel ranks (1: no collective, the quantized gradient itself comes back,
            which single-process tests use).
    State (Parameters, checkpointed with the optimizer): `exchanges` (int32 call counter: warm-up and byte
    accounting), the noise stream's counter, and with error feedback `residual` (this rank's carried error).
    """

    def __init__(self, parameters: Sequence[Parameter], comm: CommConfig, world_size: int, shards: int = 1):
        super().__init__()
        comm.validate("comm")
        if world_size < 1:
            raise ConfigError(f"parallel.world_size must be >= 1, got {world_size}")
        self.layout = FusedLayout([p.shape for p in parameters], comm.gradient_bits, comm.bucket_size, shards)
        self.bits = comm.gradient_bits
        self.top = float(top_level(self.bits))
        self.clip_factor = None if comm.clip_factor is None else float(comm.clip_factor)
        self.world_size = world_size
        self.warmup_steps = int(comm.warmup_steps)
        self.error_feedback = bool(comm.error_feedback)
        # The residual differs per rank: a multi-rank resume must restore each rank's own copy (parallel/README.md)
        self.per_rank_state = self.error_feedback
        self.noise = RandomStream(GRADIENT_NOISE_SITE)
        self.exchanges = Parameter(Tensor(0, ms.int32), name="exchanges", requires_grad=False)
        if self.error_feedback:
            self.residual = Parameter(Tensor(np.zeros(self.layout.padded, np.float32)), name="residual",
                                      requires_grad=False)
        if world_size > 1:
            self.all_gather = ops.AllGather()
            self.all_reduce = ops.AllReduce()
        # Python constants baked into the graph
        self.shapes = self.layout.shapes
        self.sizes = self.layout.sizes
        self.offsets = self.layout.offsets
        self.padded = self.layout.padded
        self.tail = self.layout.padded - self.layout.total
        self.bucket_size = self.layout.bucket_size
        self.groups = self.layout.groups

    # ---- host side ----------------------------------------------------------------------------------------
    def bytes_per_step(self) -> Dict[str, int]:
        """Bytes this rank hands to collectives per update, by kind (static: every shape is known)."""
        return {"lowbit": self.layout.lowbit_bytes(), "fp32": self.layout.fp32_bytes()}

    def comm_stats(self) -> Dict[str, int]:
        """Counters for logging: exchanges so far and the bytes this rank handed to the collectives."""
        exchanges = int(self.exchanges.asnumpy())
        fp32_steps = min(exchanges, self.warmup_steps)
        lowbit_steps = exchanges - fp32_steps
        sizes = self.bytes_per_step()
        return {"comm_exchanges": exchanges, "comm_fp32_exchanges": fp32_steps,
                "comm_lowbit_exchanges": lowbit_steps,
                "comm_bytes_sent": fp32_steps * sizes["fp32"] + lowbit_steps * sizes["lowbit"],
                "comm_bytes_per_lowbit_step": sizes["lowbit"], "comm_bytes_per_fp32_step": sizes["fp32"]}

    # ---- graph pieces -------------------------------------------------------------------------------------
    def fuse(self, grads):
        """The gradient tuple as one flat float32 vector of `padded` entries (bucket padding is zeros)."""
        pieces = ()
        for grad in grads:
            pieces = pieces + (grad.astype(ms.float32).reshape(-1),)
        if self.tail:
            pieces = pieces + (ops.zeros(self.tail, ms.float32),)
        return ops.concat(pieces)

    def split(self, flat):
        """Inverse of fuse: the fused vector back to the tuple of gradient shapes."""
        grads = ()
        for index in range(len(self.shapes)):
            start = self.offsets[index]
            grads = grads + (flat[start:start + self.sizes[index]].reshape(self.shapes[index]),)
        return grads

    def scales(self, flat):
        """One scale per group, shape (groups,)."""
        if self.bucket_size:
            return group_scales(flat.reshape(self.groups, self.bucket_size), self.clip_factor).reshape(-1)
        scales = ()
        for index in range(len(self.sizes)):
            start = self.offsets[index]
            piece = flat[start:start + self.sizes[index]].reshape(1, -1)
            scales = scales + (group_scales(piece, self.clip_factor).reshape(-1),)
        return ops.concat(scales)

    def expand(self, scales):
        """(rows, groups) scales -> (rows, padded) per-entry scales."""
        rows = scales.shape[0]
        if self.bucket_size:
            per_bucket = ops.broadcast_to(scales.reshape(rows, self.groups, 1), (rows, self.groups, self.bucket_size))
            return per_bucket.reshape(rows, self.padded)
        pieces = ()
        for index in range(len(self.sizes)):
            pieces = pieces + (ops.broadcast_to(scales[:, index:index + 1], (rows, self.sizes[index])),)
        return ops.concat(pieces, 1)

    def quantize(self, flat, noise):
        """(signed levels (padded,), scales (groups,)) of this rank's fused gradient."""
        scales = self.scales(flat)
        entry_scale = self.expand(scales.reshape(1, -1)).reshape(-1)
        return stochastic_levels(flat, entry_scale, noise, self.bits), scales

    def encode(self, levels):
        """Signed levels -> packed int32 words (codes = level + k, padded with the code of 0)."""
        codes = (levels + self.top).astype(ms.int32)
        if self.layout.code_padding:
            codes = ops.concat((codes, ops.full((self.layout.code_padding,), int(self.top), dtype=ms.int32)))
        return pack_words_graph(codes, self.bits)

    def decode(self, words, scales):
        """Gathered (ranks * words,) int32 and (ranks * groups,) scales -> (ranks, padded) dequantized values."""
        ranks = self.world_size
        codes = unpack_words_graph(words.reshape(ranks, -1), self.bits)[:, :self.padded]  # (ranks, padded)
        steps = self.expand(scales.reshape(ranks, self.groups)) / self.top
        return (codes.astype(ms.float32) - self.top) * steps

    def lowbit_mean(self, flat):
        """Fused gradient -> fused mean over ranks of the dequantized codes (updates the residual)."""
        if self.error_feedback:
            flat = flat + self.residual
        levels, scales = self.quantize(flat, self.noise((self.padded,)))
        words = self.encode(levels)
        if self.world_size > 1:
            words = self.all_gather(words)
            gathered_scales = self.all_gather(scales)
        else:
            gathered_scales = scales
        mean = self.decode(words, gathered_scales).sum(0) / float(self.world_size)
        if self.error_feedback:
            own = levels * (self.expand(scales.reshape(1, -1)).reshape(-1) / self.top)
            # Only a step every rank will apply moves the residual: the verdict comes from the gathered scales.
            applied = ops.isfinite(gathered_scales).all()
            ops.assign(self.residual, ops.select(applied, flat - own, self.residual))
        return mean

    def fp32_mean(self, flat):
        """Fused gradient -> fused mean over ranks, uncompressed (warm-up steps)."""
        if self.world_size == 1:
            return flat
        return self.all_reduce(flat) / float(self.world_size)

    def construct(self, grads):
        count = self.exchanges + 0
        ops.assign_add(self.exchanges, Tensor(1, ms.int32))
        flat = self.fuse(grads)
        if self.warmup_steps > 0:
            if count < self.warmup_steps:
                mean = self.fp32_mean(flat)
            else:
                mean = self.lowbit_mean(flat)
        else:
            mean = self.lowbit_mean(flat)
        return self.split(mean)


def make_comm_reducer(comm: CommConfig, parameters: Sequence[Parameter], world_size: int) -> Optional[nn.Cell]:
    """The reducer for `Trainer(..., reducer=...)` from the `comm:` section.

    scheme fp32 returns None (the trainer's default all-reduce); allgather returns LowBitAllGatherReducer.
    """
    comm.validate("comm")
    if comm.scheme == "fp32":
        return None
    if comm.scheme == "allgather":
        return LowBitAllGatherReducer(list(parameters), comm, world_size)
    raise ConfigError("comm.scheme: sharded updates the weights on their owner rank: use "
                      "ms_nlp_compress.parallel.sharded.ShardedLowBitUpdate in place of reducer + optimizer")
