"""Numpy twins of the low-bit exchange, written from the maths (not by calling the MindSpore code).

- `stream_uniforms`: the k-th draw of a `RandomStream(site)` of rank r, recomputed on the host from the documented
  hash (murmur3 fmix32 of counter/site/index, 24 random bits), so the tests know each rank's rounding noise.
- `reference_scales`: min(max|g|, c * std(g)) per group in float64 (for an approximate check of the graph's
  scales).
- `exchange_mean`: the mean over ranks of the dequantized codes, in float32 with the same elementwise operations
  (each IEEE-rounded), given each rank's scales, so it must match the graph bit for bit.
"""
import numpy as np

from ms_nlp_compress.models.dropout import stream_seed

_GOLDEN = 0x9E3779B1
_SITE = 0x27D4EB2F
_COUNTER = 0x165667B1
_MASK = 0xFFFFFFFF


def _mix32(x):
    mask = np.uint64(_MASK)
    x = np.asarray(x, np.uint64) & mask
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x85EBCA6B)) & mask
    x = x ^ (x >> np.uint64(13))
    x = (x * np.uint64(0xC2B2AE35)) & mask
    return x ^ (x >> np.uint64(16))


def stream_uniforms(seed: int, rank: int, site: int, draw: int, count: int) -> np.ndarray:
    """Uniform [0, 1) float32 of draw number `draw` (1 = the first call) of the stream (seed, rank, site)."""
    base = stream_seed(seed, rank)
    site_key = (base * _COUNTER + site * _SITE) & 0x7FFFFFFF
    key = int(_mix32((draw * _COUNTER + site_key) & _MASK))
    index = np.arange(count, dtype=np.uint64)
    bits = _mix32((index * np.uint64(_GOLDEN) + np.uint64(key)) & np.uint64(_MASK))
    return ((bits & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(1.0 / 16777216.0)).astype(np.float32)


def reference_scales(flat: np.ndarray, sizes, clip_factor) -> np.ndarray:
    """float64 min(max|g|, c*std(g)) for consecutive groups of the given sizes."""
    scales, start = [], 0
    for size in sizes:
        group = flat[start:start + size].astype(np.float64)
        start += size
        largest = np.abs(group).max()
        scales.append(largest if clip_factor is None else min(largest, clip_factor * group.std()))
    return np.array(scales)


def levels(flat: np.ndarray, entry_scale: np.ndarray, noise: np.ndarray, bits: int) -> np.ndarray:
    """Signed stochastic levels in float32: clip to +-scale, position = |.|/scale*k, round up iff u < frac."""
    k = np.float32(2 ** (bits - 1) - 1)
    clipped = np.minimum(np.maximum(flat, -entry_scale), entry_scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        position = np.where(entry_scale > 0, np.abs(clipped) / np.where(entry_scale > 0, entry_scale, 1),
                            0).astype(np.float32) * k
    lower = np.floor(position)
    up = (noise < position - lower).astype(np.float32)
    return (np.sign(clipped) * np.minimum(lower + up, k)).astype(np.float32)


def entry_scales(scales: np.ndarray, sizes) -> np.ndarray:
    return np.concatenate([np.full(size, scale, np.float32) for scale, size in zip(scales, sizes)])


def exchange_mean(rank_flats, rank_scales, rank_noises, sizes, bits: int):
    """(mean over ranks of dequantized codes, each rank's own dequantized values); all float32."""
    k = np.float32(2 ** (bits - 1) - 1)
    dequantized = []
    for flat, scales, noise in zip(rank_flats, rank_scales, rank_noises):
        scale = entry_scales(np.asarray(scales, np.float32), sizes)
        dequantized.append(levels(flat, scale, noise, bits) * (scale / k))
    total = dequantized[0]
    for values in dequantized[1:]:
        total = total + values
    return (total / np.float32(len(dequantized))).astype(np.float32), dequantized


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Host packing for any width: code i at bits*(i % (32//bits)) of word i // (32//bits); tail padded with 0."""
    per_word = 32 // bits
    codes = np.asarray(codes, np.uint64)
    codes = np.concatenate([codes, np.zeros((-codes.size) % per_word, np.uint64)]).reshape(-1, per_word)
    shifts = (bits * np.arange(per_word)).astype(np.uint64)
    return np.bitwise_or.reduce(codes << shifts, axis=1).astype(np.uint32).view(np.int32)


def twn_buckets(weights: np.ndarray, bucket: int) -> np.ndarray:
    """TWN per bucket in float64: keep |w| > 0.7 mean|w|, alpha = mean of the kept |w|; returns alpha*sign*keep."""
    rows = weights.astype(np.float64).reshape(-1, bucket)
    magnitude = np.abs(rows)
    keep = magnitude > 0.7 * magnitude.mean(1, keepdims=True)
    alpha = (magnitude * keep).sum(1, keepdims=True) / np.maximum(keep.sum(1, keepdims=True), 1)
    return (alpha * np.sign(rows) * keep).reshape(-1)
