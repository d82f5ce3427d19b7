"""Dropout whose randomness is a pure function of (seed, site, call counter, element index).

Why: MindSpore's dropout kernels keep their random state inside the kernel, where no API can save or restore it
(`get_rng_state`/`set_rng_state` do not cover them; verified on 2.10). A training run resumed from a checkpoint
would then draw different masks from the uninterrupted run. Here each dropout site keeps an int32 call counter as a
non-trainable Parameter, so it is saved with the checkpoint, and the mask is a counter-based hash (a murmur3-style
finaliser in int32 arithmetic, which wraps like uint32), so a resumed run draws exactly the same masks.

`impl="native"` uses MindSpore's fused kernel instead: faster on Ascend, but resume is then exact except for the
dropout masks. The choice is `NezhaConfig.dropout_impl`.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

# Multiplicative constants of the murmur3 32-bit finaliser and the golden-ratio increment, as signed int32.
_GOLDEN = -1640531535  # 0x9E3779B1
_MIX_1 = -2048144789  # 0x85EBCA6B
_MIX_2 = -1028477387  # 0xC2B2AE35
_SITE = 0x27D4EB2F
_COUNTER = 0x165667B1

_seed = 0
_RANK = 0x61C88647  # another odd constant: (seed, rank) pairs map to distinct stream seeds


def _mix32_host(x: int) -> int:
    """murmur3's fmix32 on a Python int (the host twin of `mix32`)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def stream_seed(seed: int, rank: int = 0) -> int:
    """The 31-bit base of every random stream of one process: a hash of (run seed, data-parallel rank).

    Hashing (rather than seed + rank) keeps (seed 42, rank 1) and (seed 43, rank 0) apart: ranks must draw
    independent dropout masks and stochastic-rounding noise, or their errors correlate and do not average out.
    """
    return _mix32_host(_mix32_host(int(seed) & 0xFFFFFFFF) ^ ((int(rank) * _RANK) & 0xFFFFFFFF)) & 0x7FFFFFFF


def set_dropout_seed(seed: int, rank: int = 0) -> None:
    """The stream base baked into random cells (dropout, `RandomStream`) built after this call; the trainer passes
    the run seed and this process's rank."""
    global _seed
    _seed = stream_seed(seed, rank)


def current_stream_seed() -> int:
    return _seed


def _logical_shift(x, bits: int):
    """x >> bits on the 32-bit pattern (a signed shift sign-extends, so mask the high bits away)."""
    return ops.bitwise_and(ops.bitwise_right_shift(x, bits), (1 << (32 - bits)) - 1)


def mix32(x):
    """murmur3's fmix32 on int32 tensors (bit-identical to the uint32 version)."""
    x = ops.bitwise_xor(x, _logical_shift(x, 16))
    x = x * _MIX_1
    x = ops.bitwise_xor(x, _logical_shift(x, 13))
    x = x * _MIX_2
    return ops.bitwise_xor(x, _logical_shift(x, 16))


def uniform_from_counter(shape, key):
    """Uniform [0, 1) floats of `shape`, a pure function of the int32 scalar `key`."""
    count = 1
    for size in shape:
        count = count * size
    index = ops.arange(count, dtype=ms.int32).reshape(shape)
    bits = mix32(index * _GOLDEN + key)
    return ops.bitwise_and(bits, 0xFFFFFF).astype(ms.float32) * (1.0 / 16777216.0)  # 24 random bits


class RandomStream(nn.Cell):
    """A resumable stream of uniform [0, 1) tensors for one random site (stochastic rounding, sampling, ...).

    Draw k is a pure function of (stream seed = hash(run seed, rank), site, k): the counter is a non-trainable
    Parameter, so it is checkpointed with the model and a resumed run continues the same stream; ranks differ
    because the stream seed hashes the rank. `construct(shape)` returns a fresh draw of that shape each call.
    """

    def __init__(self, site: int):
        super().__init__()
        self.site_key = (_seed * _COUNTER + int(site) * _SITE) & 0x7FFFFFFF
        self.rng_counter = Parameter(Tensor(0, ms.int32), name="rng_counter", requires_grad=False)

    def construct(self, shape):
        counter = ops.assign_add(self.rng_counter, Tensor(1, ms.int32))
        return uniform_from_counter(shape, mix32(counter * _COUNTER + self.site_key))


class StatelessDropout(nn.Cell):
    """Inverted dropout with checkpointable randomness. `site` distinguishes the model's dropout places."""

    def __init__(self, p: float, site: int, impl: str = "stateless"):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.keep = 1.0 - self.p
        self.native = impl == "native"
        if self.native:
            self.kernel = nn.Dropout(p=self.p)
        self.site_key = (_seed * _COUNTER + site * _SITE) & 0x7FFFFFFF
        self.rng_counter = Parameter(Tensor(0, ms.int32), name="rng_counter", requires_grad=False)

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        if self.native:
            return self.kernel(x)
        counter = ops.assign_add(self.rng_counter, Tensor(1, ms.int32))
        key = mix32(counter * _COUNTER + self.site_key)
        uniform = uniform_from_counter(x.shape, key)
        return ops.select(uniform >= self.p, x * (1.0 / self.keep), ops.zeros_like(x))
