"""The sharded scheme's owner-side Adam (one process, world size 1: the owner holds the whole vector): the master
shard follows a numpy AdamW twin driven by the exactly reproduced low-bit mean gradient; its state is per-rank."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

import lowbit_twin as twin
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.parallel.comm_config import CommConfig
from ms_nlp_compress.parallel.lowbit import GRADIENT_NOISE_SITE
from ms_nlp_compress.parallel.sharded import ShardedLowBitUpdate

SHAPES = [(7, 5), (13,), (3, 4, 6), (1,)]  # 121 entries -> 2 buckets of 64, zero padded


class Scales(nn.Cell):
    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer

    def construct(self, grads):
        return self.reducer.scales(self.reducer.fuse(grads))


def numpy_adamw(master, moment1, moment2, gradient, step, lr, beta1, beta2, eps, decay):
    f = np.float32
    moment1 = (f(beta1) * moment1 + f(1 - beta1) * gradient).astype(np.float32)
    moment2 = (f(beta2) * moment2 + f(1 - beta2) * gradient * gradient).astype(np.float32)
    corrected1 = moment1 / f(1 - beta1 ** step)
    corrected2 = moment2 / f(1 - beta2 ** step)
    update = corrected1 / (np.sqrt(corrected2) + f(eps)) + f(decay) * master
    return (master - f(lr) * update).astype(np.float32), moment1, moment2


def test_owner_adam_matches_numpy_twin(graph_mode):
    set_dropout_seed(0, 0)  # the rounding-noise stream of rank 0
    rng = np.random.default_rng(3)
    weights = [Parameter(Tensor(rng.normal(size=shape).astype(np.float32)), name=f"w{i}")
               for i, shape in enumerate(SHAPES)]
    initial = np.concatenate([w.asnumpy().reshape(-1) for w in weights])
    lr, beta1, beta2, eps, decay = 0.01, 0.9, 0.98, 1e-6, 0.01
    update = ShardedLowBitUpdate(weights, CommConfig(scheme="sharded", gradient_bits=4, bucket_size=64), 1, 0,
                                 learning_rate=lr, optimizer="adam", beta1=beta1, beta2=beta2, eps=eps,
                                 weight_decay=decay)
    assert update.per_rank_state
    padded = 128
    master = np.concatenate([initial, np.zeros(padded - initial.size, np.float32)])
    moment1 = np.zeros(padded, np.float32)
    moment2 = np.zeros(padded, np.float32)
    for call in range(3):
        grads = [rng.standard_t(3, size=shape).astype(np.float32) for shape in SHAPES]
        inputs = ms.mutable(tuple(Tensor(g) for g in grads))
        scales = Scales(update.exchange)(inputs).asnumpy()
        flat = np.concatenate([g.reshape(-1) for g in grads] + [np.zeros(padded - initial.size, np.float32)])
        np.testing.assert_allclose(scales, twin.reference_scales(flat, [64, 64], 3.0), rtol=2e-6)
        noise = twin.stream_uniforms(0, 0, GRADIENT_NOISE_SITE, call + 1, padded)
        mean, _ = twin.exchange_mean([flat], [scales], [noise], [64, 64], 4)
        master, moment1, moment2 = numpy_adamw(master, moment1, moment2, mean, call + 1, lr, beta1, beta2, eps,
                                               decay)
        update(inputs)
        # float32 op order (and pow) may differ from numpy in the last bits: a few ulps of the terms (moments ~0.1-0.5)
        np.testing.assert_allclose(update.moment1.asnumpy(), moment1, rtol=3e-6, atol=2e-7, err_msg=f"m {call}")
        np.testing.assert_allclose(update.moment2.asnumpy(), moment2, rtol=3e-6, atol=1e-7, err_msg=f"v {call}")
        np.testing.assert_allclose(update.master.asnumpy(), master, rtol=3e-6, atol=1e-7, err_msg=f"call {call}")
        written = np.concatenate([w.asnumpy().reshape(-1) for w in weights])  # weight_bits null: fp32 gathered
        np.testing.assert_array_equal(written, update.master.asnumpy()[:initial.size])
    # Adam is not SGD: the first step moves every entry by about lr (normalised), whatever its gradient's size
    assert float(update.adam_step.asnumpy()) == 3.0
    assert np.abs(master[:initial.size] - initial).max() < 4 * lr


def test_owner_optimizer_name_is_checked():
    params = [Parameter(Tensor(np.zeros((70,), np.float32)), name="w")]
    with pytest.raises(ConfigError, match="sgd, adam or lamb, got 'adagrad'"):
        ShardedLowBitUpdate(params, CommConfig(scheme="sharded", bucket_size=64), 1, 0, learning_rate=0.1,
                            optimizer="adagrad")
