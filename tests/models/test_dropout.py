"""Stateless dropout: masks are a pure function of (seed, site, counter, index), checked against a uint32 twin."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_nlp_compress.models import dropout as dropout_module
from ms_nlp_compress.models.dropout import StatelessDropout, set_dropout_seed


def fmix32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x = (x.astype(np.uint64) * 0x85EBCA6B & 0xFFFFFFFF).astype(np.uint32)
    x ^= x >> np.uint32(13)
    x = (x.astype(np.uint64) * 0xC2B2AE35 & 0xFFFFFFFF).astype(np.uint32)
    x ^= x >> np.uint32(16)
    return x


def reference_stream_seed(seed, rank=0):
    """The stream base of (run seed, rank): fmix32(fmix32(seed) xor rank * 0x61C88647), 31 bits."""
    mixed = fmix32(np.array([seed & 0xFFFFFFFF], np.uint64))[0]
    rank_term = np.uint32((rank * 0x61C88647) & 0xFFFFFFFF)
    return int(fmix32(np.array([mixed ^ rank_term], np.uint64))[0]) & 0x7FFFFFFF


def reference_keep_mask(shape, seed, site, counter, p, rank=0):
    site_key = (reference_stream_seed(seed, rank) * 0x165667B1 + site * 0x27D4EB2F) & 0x7FFFFFFF
    key = fmix32(np.array([(counter * 0x165667B1 + site_key) & 0xFFFFFFFF], np.uint64))[0]
    index = np.arange(int(np.prod(shape)), dtype=np.uint64)
    bits = fmix32((index * 0x9E3779B1 + int(key)) & 0xFFFFFFFF)
    return ((bits & 0xFFFFFF) / 16777216.0 >= p).reshape(shape)


@pytest.fixture
def seed_7():
    set_dropout_seed(7)
    yield 7
    set_dropout_seed(0)


def test_masks_match_the_uint32_reference(seed_7, execution_mode):
    cell = StatelessDropout(0.25, site=5)
    cell.set_train(True)
    x = Tensor(np.ones((3, 4, 50), np.float32))
    for counter in (1, 2, 3):
        out = cell(x).asnumpy()
        keep = reference_keep_mask((3, 4, 50), 7, 5, counter, 0.25)
        np.testing.assert_allclose(out, np.where(keep, 1 / 0.75, 0.0), rtol=1e-6)
    assert int(cell.rng_counter.asnumpy()) == 3
    set_dropout_seed(7, rank=3)  # another rank of the same run: its own stream, still the reference's
    other = StatelessDropout(0.25, site=5)
    other.set_train(True)
    np.testing.assert_allclose(other(x).asnumpy(),
                               np.where(reference_keep_mask((3, 4, 50), 7, 5, 1, 0.25, rank=3), 1 / 0.75, 0.0),
                               rtol=1e-6)


def test_rate_sites_and_resume(seed_7, graph_mode):
    first, second = StatelessDropout(0.1, site=1), StatelessDropout(0.1, site=2)
    for cell in (first, second):
        cell.set_train(True)
    x = Tensor(np.ones((200, 500), np.float32))
    a = first(x).asnumpy()
    assert abs((a == 0).mean() - 0.1) < 0.005  # 100k draws: 5 standard errors is ~0.005
    assert abs(a.mean() - 1.0) < 0.01  # inverted dropout keeps the expectation
    assert (a != second(x).asnumpy()).mean() > 0.1  # sites draw different masks
    following = first(x).asnumpy()
    assert not np.array_equal(a, following)
    first.rng_counter.set_data(Tensor(1, ms.int32))  # "resume" after the first call
    np.testing.assert_array_equal(first(x).asnumpy(), following)


def test_eval_mode_and_gradient(graph_mode):
    cell = StatelessDropout(0.5, site=3)
    x = Tensor(np.arange(12, dtype=np.float32).reshape(3, 4))
    cell.set_train(False)
    np.testing.assert_array_equal(cell(x).asnumpy(), x.asnumpy())
    cell.set_train(True)
    cell.rng_counter.set_data(Tensor(40, ms.int32))
    grad = ms.grad(cell)(x).asnumpy()  # the gradient is the mask scaled by 1/keep
    mask = reference_keep_mask((3, 4), dropout_module._seed, 3, 41, 0.5)
    np.testing.assert_allclose(grad, np.where(mask, 2.0, 0.0))


def test_invalid_probability():
    with pytest.raises(ValueError, match="dropout probability"):
        StatelessDropout(1.0, site=0)
