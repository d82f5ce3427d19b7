"""LAT: identity preconditioner never worse than TWN; with a real AdamW state the refreshed cells match numpy."""
import os
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

sys.path.insert(0, os.path.dirname(__file__))
import quant_twins  # noqa: E402
from test_quant_prepare import batch, classifier, tiny  # noqa: E402

from ms_nlp_compress.compress.quant.config import QuantConfig  # noqa: E402
from ms_nlp_compress.compress.quant.lat import LatRefresh  # noqa: E402
from ms_nlp_compress.compress.quant.prepare import FakeQuantDense, FakeQuantEmbedding, prepare  # noqa: E402
from ms_nlp_compress.compress.quant.primitives import lat_quantize, twn_quantize  # noqa: E402
from ms_nlp_compress.errors import ConfigError  # noqa: E402
from ms_nlp_compress.train.optim import AdamW  # noqa: E402

LAT_ALL = {"encoder": {"method": "lat"}, "pooler": {"method": "lat"}, "embedding": {"method": "lat"}}


@pytest.mark.parametrize("per_row", [False, True])
def test_identity_lat_error_never_above_twn(per_row):
    """With init="twn" (what prepare uses). The reference's sign(w) start fails this sweep: on uniform weights its
    fixed point can be slightly worse than TWN (primitives.lat_ternarize)."""
    rng = np.random.default_rng(0)
    draws = {"normal": lambda s: rng.standard_normal(s), "laplace": lambda s: rng.laplace(size=s),
             "uniform": lambda s: rng.uniform(-1, 1, s), "student-t": lambda s: rng.standard_t(3, s),
             "sparse": lambda s: rng.standard_normal(s) * (rng.uniform(size=s) < 0.3)}
    for kind, draw in draws.items():
        for trial in range(20):
            shape = (int(rng.integers(1, 12)), int(rng.integers(2, 64)))
            weight = (draw(shape) * rng.uniform(0.01, 2.0)).astype(np.float32)
            target = np.clip(weight, -2.5, 2.5)
            lat_error = ((lat_quantize(Tensor(weight), None, per_row, 10, 2.5, "twn").asnumpy() - target) ** 2).sum(-1)
            twn_error = ((twn_quantize(Tensor(weight), per_row, 2.5).asnumpy() - target) ** 2).sum(-1)
            if not per_row:
                lat_error, twn_error = lat_error.sum(), twn_error.sum()
            assert np.all(lat_error <= twn_error * (1 + 1e-5) + 1e-7), (kind, trial, shape)


def test_identity_lat_cells_never_worse_than_twn_cells_on_a_prepared_model():
    lat_model = prepare(classifier(tiny(), seed=4), QuantConfig.from_dict(LAT_ALL))
    twn_model = prepare(classifier(tiny(), seed=4), QuantConfig())
    twn_cells = dict(twn_model.cells_and_names())
    compared = 0
    for name, cell in lat_model.cells_and_names():
        if isinstance(cell, FakeQuantDense):
            target = np.clip(cell.weight.asnumpy(), -2.5, 2.5)
            lat_error = ((cell.quantized_weight().asnumpy() - target) ** 2).sum()
            twn_error = ((twn_cells[name].quantized_weight().asnumpy() - target) ** 2).sum()
            assert lat_error <= twn_error * (1 + 1e-5), name
            compared += 1
    assert compared == 2 * 6 + 1


def test_refresh_from_a_real_adamw_state_matches_the_numpy_twin(graph_mode):
    model = classifier(tiny(), seed=2)
    prepare(model, QuantConfig.from_dict(LAT_ALL))
    model.set_train(True)
    optimizer = AdamW(model.trainable_params(), learning_rate=1e-2, eps=1e-6)
    refresh = LatRefresh(model, optimizer, epsilon=1e-8)
    assert len(refresh.cell_names) == 2 * 6 + 2  # 12 encoder matrices, pooler, word embedding
    ids, mask, types = batch()

    def loss_fn(a, b, c):
        return (model(a, b, c)[0] ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
    for step in range(3):
        _, grads = grad_fn(Tensor(ids), Tensor(mask), Tensor(types))
        optimizer(grads)
        refresh.refresh()
    correction = 1.0 - 0.999 ** 3
    assert optimizer.second_moment_bias_correction() == pytest.approx(correction, rel=1e-6)
    moments = {id(p): v.asnumpy() for p, v in zip(optimizer.parameters, optimizer.second_moments())}
    changed = 0
    for name, cell in model.cells_and_names():
        if isinstance(cell, FakeQuantDense):
            weight, quantized = cell.weight, cell.quantized_weight().asnumpy()
        elif isinstance(cell, FakeQuantEmbedding):
            weight, quantized = cell.embedding_table, cell.quantized_table().asnumpy()
        else:
            continue
        d = np.sqrt(moments[id(weight)].astype(np.float64) / correction) + 1e-8
        np.testing.assert_allclose(cell.lat_preconditioner.asnumpy(), d, rtol=1e-5, err_msg=name)
        per_row = isinstance(cell, FakeQuantEmbedding)  # the embedding stays row-wise by default
        twin = quant_twins.lat(weight.asnumpy(), d, per_row=per_row)
        np.testing.assert_allclose(quantized, twin, atol=1e-5, err_msg=name)
        # The preconditioner matters: identity-LAT gives another answer for at least some tensors.
        changed += not np.allclose(twin, quant_twins.lat(weight.asnumpy(), None, per_row=per_row), atol=1e-6)
    assert changed >= 3


def test_refresh_needs_lat_cells_and_an_adam_optimizer():
    model = prepare(classifier(tiny(layers=1)), QuantConfig())
    with pytest.raises(ConfigError, match="no LAT-quantized cell"):
        LatRefresh(model, AdamW(model.trainable_params(), 1e-3))
    lat_model = prepare(classifier(tiny(layers=1)), QuantConfig.from_dict(LAT_ALL))
    with pytest.raises(ConfigError, match="second_moments"):
        LatRefresh(lat_model, ms.nn.SGD(lat_model.trainable_params(), 1e-3))
    encoder_only = [p for p in lat_model.trainable_params() if "encoder" in p.name]
    with pytest.raises(ConfigError, match="word_embeddings.*not among the optimizer"):
        LatRefresh(lat_model, AdamW(encoder_only, 1e-3))
