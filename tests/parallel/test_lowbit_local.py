"""Low-bit reducer in one process (world size 1: the rank's own codes come back): exact numpy twin, packing layout,
unbiasedness, the max|clip(g)| scale's variance against c*std, warm-up, error feedback, overflow and byte counts."""
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

import lowbit_twin as twin
from ms_nlp_compress.compress.quant.packing import pack_codes_to_int32
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.parallel.comm_config import CommConfig
from ms_nlp_compress.parallel.lowbit import (GRADIENT_NOISE_SITE, LowBitAllGatherReducer, make_comm_reducer,
                                             pack_words_graph, stochastic_levels, unpack_words_graph)

SEED = 11
SHAPES = [(7, 5), (13,), (3, 4, 6), (1,)]


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    set_dropout_seed(SEED, 0)
    yield
    set_dropout_seed(0, 0)


def parameters(shapes=SHAPES):
    return [Parameter(Tensor(np.zeros(shape, np.float32)), name=f"p{i}") for i, shape in enumerate(shapes)]


def gradients(seed, shapes=SHAPES, scale=1.0):
    rng = np.random.default_rng(seed)
    # heavy tails (student-t) so clipping at 3 std bites on the larger tensors
    return [(rng.standard_t(3, size=shape) * scale).astype(np.float32) for shape in shapes]


class Scales(nn.Cell):
    """The reducer's per-group scales of a gradient tuple (a pure function: no noise is drawn)."""

    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer

    def construct(self, grads):
        return self.reducer.scales(self.reducer.fuse(grads))


def run(reducer, grads):
    return [out.asnumpy() for out in reducer(ms.mutable(tuple(Tensor(g) for g in grads)))]


def twin_groups(layout):
    return [layout.bucket_size] * layout.groups if layout.bucket_size else layout.sizes


def padded_flat(grads, layout):
    flat = np.concatenate([g.reshape(-1) for g in grads]).astype(np.float32)
    return np.concatenate([flat, np.zeros(layout.padded - flat.size, np.float32)])


def unflatten(flat, shapes):
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


# ---------------------------------------------------------------------------------------------------------------
def test_comm_config_errors_name_the_key():
    CommConfig(scheme="allgather", gradient_bits=3).validate()
    cases = {"gradient_bits": dict(gradient_bits=9), "clip_factor": dict(clip_factor=0.0),
             "scheme": dict(scheme="ring"), "warmup_steps": dict(warmup_steps=-1),
             "bucket_size": dict(bucket_size=10), "weight_bits": dict(scheme="allgather", weight_bits=2),
             "error_feedback": dict(error_feedback="yes")}
    for key, values in cases.items():
        with pytest.raises(ConfigError, match=rf"comm\.{key}"):
            CommConfig(**values).validate()
    with pytest.raises(ConfigError, match=r"comm\.bits: unknown key"):
        CommConfig.from_dict({"bits": 2})
    assert make_comm_reducer(CommConfig(), parameters(), 2) is None  # fp32: the trainer's all-reduce


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_word_packing_layout_and_round_trip(bits):
    rng = np.random.default_rng(bits)
    per_word = 32 // bits
    codes = rng.integers(0, 2 ** bits - 1, 5 * per_word).astype(np.int32)
    words = pack_words_graph(Tensor(codes), bits).asnumpy()
    np.testing.assert_array_equal(words, twin.pack_words(codes, bits))
    if bits in (2, 4, 8):  # the same layout as the export/collective packing module
        np.testing.assert_array_equal(words, pack_codes_to_int32(codes, bits))
    back = unpack_words_graph(Tensor(words.reshape(1, -1)), bits).asnumpy()
    np.testing.assert_array_equal(back.reshape(-1), codes)


@pytest.mark.parametrize("bits,bucket_size,clip", [(2, 0, 3.0), (3, 64, 3.0), (8, 0, None), (4, 64, 2.0)])
def test_exchange_equals_numpy_twin_exactly(bits, bucket_size, clip):
    comm = CommConfig(scheme="allgather", gradient_bits=bits, clip_factor=clip, bucket_size=bucket_size)
    reducer = LowBitAllGatherReducer(parameters(), comm, world_size=1)
    layout = reducer.layout
    for draw in (1, 2):
        grads = gradients(draw)
        scales = Scales(reducer)(ms.mutable(tuple(Tensor(g) for g in grads))).asnumpy()
        flat = padded_flat(grads, layout)
        np.testing.assert_allclose(scales, twin.reference_scales(flat, twin_groups(layout), clip), rtol=2e-6)
        noise = twin.stream_uniforms(SEED, 0, GRADIENT_NOISE_SITE, draw, layout.padded)
        expected, _ = twin.exchange_mean([flat], [scales], [noise], twin_groups(layout), bits)
        out = run(reducer, grads)
        for got, want in zip(out, unflatten(expected, SHAPES)):
            np.testing.assert_array_equal(got, want)
        if clip is not None:  # clipping really bit on some group (a wrong clip would otherwise go unseen)
            group_max = twin.reference_scales(flat, twin_groups(layout), None)
            assert (scales < group_max * (1 - 1e-6)).any(), (scales, group_max)


def test_unbiased_over_many_draws():
    """E[Q(g)] = clip(g): the mean of T draws is within 6 standard errors (step/2/sqrt(T) bounds each entry's)."""
    bits, draws = 2, 600
    comm = CommConfig(scheme="allgather", gradient_bits=bits, clip_factor=2.5)
    shapes = [(40, 10)]
    reducer = LowBitAllGatherReducer(parameters(shapes), comm, world_size=1)
    grads = gradients(3, shapes)
    inputs = tuple(Tensor(g) for g in grads)
    total = np.zeros(shapes[0], np.float64)
    for _ in range(draws):
        total += reducer(inputs)[0].asnumpy()
    mean = total / draws
    g = grads[0].astype(np.float64)
    scale = min(np.abs(g).max(), 2.5 * g.std())
    clipped = np.clip(g, -scale, scale)
    step = scale / (2 ** (bits - 1) - 1)
    bound = 6 * step / 2 / math.sqrt(draws)
    assert np.abs(mean - clipped).max() < bound, (np.abs(mean - clipped).max(), bound)
    # the tolerance is tight enough to catch a biased rounding (always down, as a plain integer cast would do)
    floor = np.floor(np.abs(clipped) / step) * step * np.sign(clipped)
    assert np.abs(floor - clipped).max() > 5 * bound


def test_max_clip_scale_has_lower_rounding_variance_than_c_sigma():
    """Light-tailed gradient (uniform: max = sqrt(3) std < 3 std): the c*std grid leaves levels unused; measured
    E||Q(g) - g||^2 with scale max|clip(g)| is about (sqrt(3)/3)^2 = 1/3 of the c*std grid's."""
    rng = np.random.default_rng(0)
    g = rng.uniform(-1, 1, 4000).astype(np.float32)
    noise = Tensor(rng.random((64, g.size)).astype(np.float32))
    c_sigma = np.float32(3.0 * g.std())
    tight = np.float32(np.abs(g).max())
    assert tight < c_sigma
    errors = {}
    for name, scale in (("tight", tight), ("c_sigma", c_sigma)):
        level = stochastic_levels(Tensor(g), Tensor(scale), noise, 3).asnumpy()
        errors[name] = float(((level * scale / 3 - g) ** 2).sum(1).mean())
    ratio = errors["tight"] / errors["c_sigma"]
    assert 0.2 < ratio < 0.5, errors


def test_warmup_exchanges_fp32_then_lowbit():
    comm = CommConfig(scheme="allgather", gradient_bits=2, warmup_steps=1)
    reducer = LowBitAllGatherReducer(parameters(), comm, world_size=1)
    grads = gradients(5)
    first = run(reducer, grads)
    for got, want in zip(first, grads):
        np.testing.assert_array_equal(got, want)
    second = run(reducer, grads)
    layout = reducer.layout
    flat = padded_flat(grads, layout)
    scales = Scales(reducer)(ms.mutable(tuple(Tensor(g) for g in grads))).asnumpy()
    noise = twin.stream_uniforms(SEED, 0, GRADIENT_NOISE_SITE, 1, layout.padded)  # the stream's first draw
    expected, _ = twin.exchange_mean([flat], [scales], [noise], twin_groups(layout), 2)
    for got, want in zip(second, unflatten(expected, SHAPES)):
        np.testing.assert_array_equal(got, want)
    stats = reducer.comm_stats()
    assert stats["comm_fp32_exchanges"] == 1 and stats["comm_lowbit_exchanges"] == 1


def test_error_feedback_carries_the_residual():
    comm = CommConfig(scheme="allgather", gradient_bits=2, error_feedback=True, clip_factor=2.0)
    reducer = LowBitAllGatherReducer(parameters(), comm, world_size=1)
    layout = reducer.layout
    residual = np.zeros(layout.padded, np.float32)
    for draw in (1, 2, 3):
        grads = gradients(10 + draw)
        corrected = padded_flat(grads, layout) + residual
        scales = Scales(reducer)(tuple(Tensor(g) for g in unflatten(corrected, SHAPES))).asnumpy()
        noise = twin.stream_uniforms(SEED, 0, GRADIENT_NOISE_SITE, draw, layout.padded)
        expected, (own,) = twin.exchange_mean([corrected], [scales], [noise], twin_groups(layout), 2)
        out = run(reducer, grads)
        np.testing.assert_array_equal(np.concatenate([o.reshape(-1) for o in out]), expected)
        residual = corrected - own
        np.testing.assert_array_equal(reducer.residual.asnumpy(), residual)
    assert np.abs(residual).max() > 0.1  # clipping at 2 std leaves a real error to carry


def test_non_finite_gradient_poisons_its_group_and_keeps_the_residual():
    comm = CommConfig(scheme="allgather", gradient_bits=4, error_feedback=True)
    reducer = LowBitAllGatherReducer(parameters(), comm, world_size=1)
    run(reducer, gradients(1))
    before = reducer.residual.asnumpy().copy()
    grads = gradients(2)
    grads[2][1, 2, 3] = np.inf
    out = run(reducer, grads)
    assert not np.isfinite(out[2]).any()  # the trainer's all_finite then skips the step on every rank
    np.testing.assert_array_equal(reducer.residual.asnumpy(), before)


@pytest.mark.parametrize("bits,bucket_size", [(2, 0), (3, 0), (8, 64), (5, 128)])
def test_byte_counts_are_the_packed_sizes(bits, bucket_size):
    comm = CommConfig(scheme="allgather", gradient_bits=bits, bucket_size=bucket_size)
    reducer = LowBitAllGatherReducer(parameters(), comm, world_size=1)
    total = sum(int(np.prod(s)) for s in SHAPES)  # 35 + 13 + 72 + 1 = 121
    padded = math.ceil(total / bucket_size) * bucket_size if bucket_size else total
    groups = padded // bucket_size if bucket_size else len(SHAPES)
    expected = 4 * math.ceil(padded / (32 // bits)) + 4 * groups
    words = reducer.encode(Tensor(np.zeros(padded, np.float32))).asnumpy()
    assert 4 * words.size + 4 * groups == expected  # the words really handed to AllGather
    assert reducer.bytes_per_step() == {"lowbit": expected, "fp32": 4 * padded}
    run(reducer, gradients(1))
    run(reducer, gradients(2))
    assert reducer.comm_stats()["comm_bytes_sent"] == 2 * expected
