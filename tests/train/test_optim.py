"""AdamW / Lamb against an independent numpy twin, in PyNative and GRAPH_MODE."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_nlp_compress.train.optim import AdamW, Lamb, applies_weight_decay, build_optimizer, decay_mask

STEPS = 5
BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.999, 1e-6, 0.1  # wd large enough that the mask visibly matters
TOL = 1e-5


class TinyNet(nn.Cell):
    """Dense 4->3 then LayerNorm: decayed weight, excluded bias, excluded gamma/beta."""

    def __init__(self, seed=0):
        super().__init__()
        self.dense = nn.Dense(4, 3)
        self.norm = nn.LayerNorm((3,))
        rng = np.random.default_rng(seed)
        for p in self.trainable_params():  # non-trivial values everywhere, so decaying gamma/beta would show
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32)))

    def construct(self, x):
        return self.norm(self.dense(x))


class InverseStepLR(nn.learning_rate_schedule.LearningRateSchedule):
    """lr(step) = 0.1 / (1 + step): distinct per step, to pin the step convention (update t uses lr(t - 1))."""

    def construct(self, global_step):
        return 0.1 / (1.0 + global_step.astype(ms.float32))


def numpy_twin(weights, grads_per_step, lrs, mask, lamb):
    """Reference Adam/LAMB with bias correction and decoupled decay, written from the papers' formulas."""
    w = [x.astype(np.float64).copy() for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, g in enumerate(grads):
            m[i] = BETA1 * m[i] + (1 - BETA1) * g
            v[i] = BETA2 * v[i] + (1 - BETA2) * g * g
            r = (m[i] / (1 - BETA1 ** t)) / (np.sqrt(v[i] / (1 - BETA2 ** t)) + EPS)
            if mask[i]:
                r = r + WEIGHT_DECAY * w[i]
            trust = 1.0
            if lamb:
                w_norm, r_norm = np.linalg.norm(w[i]), np.linalg.norm(r)
                trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
            w[i] = w[i] - lr * trust * r
    return w, m, v


@pytest.fixture(params=["pynative", "graph"])
def mode(request):
    old = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=old)


def _fixed_grads(params, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(steps)]


VARIANTS = {
    "adamw_fused": (lambda ps, lr: AdamW(ps, lr, BETA1, BETA2, EPS, WEIGHT_DECAY), False),
    "adamw_elementwise": (lambda ps, lr: AdamW(ps, lr, BETA1, BETA2, EPS, WEIGHT_DECAY, fused=False), False),
    "lamb": (lambda ps, lr: Lamb(ps, lr, BETA1, BETA2, EPS, WEIGHT_DECAY), True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_numpy_twin(mode, variant):
    build, is_lamb = VARIANTS[variant]
    net = TinyNet()
    params = net.trainable_params()
    initial = [p.asnumpy().copy() for p in params]  # asnumpy() shares memory on CPU
    grads = _fixed_grads(params, STEPS)
    # Constant lr in one mode, a per-step schedule in the other: both lr paths of nn.Optimizer are covered.
    use_schedule = mode == "graph"
    optimizer = build(params, InverseStepLR() if use_schedule else 0.05)
    lrs = [0.1 / (1 + t) for t in range(STEPS)] if use_schedule else [0.05] * STEPS
    for step_grads in grads:
        optimizer(tuple(Tensor(g) for g in step_grads))

    want_w, want_m, want_v = numpy_twin(initial, grads, lrs, [True, False, False, False], is_lamb)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.asnumpy(), want_w[i], atol=TOL, rtol=TOL, err_msg=p.name)
        np.testing.assert_allclose(optimizer.first_moments()[i].asnumpy(), want_m[i], atol=TOL, rtol=TOL)
        np.testing.assert_allclose(optimizer.second_moments()[i].asnumpy(), want_v[i], atol=TOL, rtol=TOL)
    assert int(optimizer.global_step.asnumpy()[0]) == STEPS
    # The update must actually have moved every tensor (guards against a silently skipped HyperMap update).
    assert all(not np.allclose(p.asnumpy(), w0) for p, w0 in zip(params, initial))


def test_lamb_trust_ratio_falls_back_to_one(mode):
    weight = ms.Parameter(Tensor(np.zeros((3, 2), np.float32)), name="zero.weight")  # ||w|| = 0
    frozen = ms.Parameter(Tensor(np.ones((2,), np.float32)), name="frozen.bias")  # zero grad, no decay: r = 0
    still = ms.Parameter(Tensor(np.zeros((2,), np.float32)), name="still.weight")  # w = 0 and r = 0
    optimizer = Lamb([weight, frozen, still], 0.01, BETA1, BETA2, EPS, WEIGHT_DECAY)
    grad = np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5
    optimizer((Tensor(grad), Tensor(np.zeros(2, np.float32)), Tensor(np.zeros(2, np.float32))))
    # Trust 1: a plain bias-corrected Adam step, which at t = 1 is -lr * g / (|g| + eps).
    np.testing.assert_allclose(weight.asnumpy(), -0.01 * grad / (np.abs(grad) + EPS), atol=1e-6)
    np.testing.assert_array_equal(frozen.asnumpy(), np.ones(2, np.float32))
    np.testing.assert_array_equal(still.asnumpy(), np.zeros(2, np.float32))


@pytest.mark.parametrize("cls", [AdamW, Lamb])
def test_scalar_parameter_keeps_its_shape(mode, cls):
    """0-d Parameters (e.g. a learnable quantization scale) must not be broadcast to the step counter's (1,)."""
    scale = ms.Parameter(Tensor(np.float32(0.5)), name="quant.scale")
    optimizer = cls([scale], 0.1, BETA1, BETA2, EPS, weight_decay=0.0)
    optimizer((Tensor(np.float32(1.0)),))
    assert scale.shape == () and optimizer.second_moments()[0].shape == ()
    expected = 0.5 - 0.1 * (0.5 if cls is Lamb else 1.0)  # Adam step at t = 1 is lr * sign(g); LAMB: trust = 0.5
    np.testing.assert_allclose(scale.asnumpy(), expected, atol=1e-5)


def test_decay_mask_by_name():
    excluded = ["dense.bias", "bias", "norm.gamma", "norm.beta", "encoder.layer.0.output.LayerNorm.weight",
                "embeddings.layernorm.gamma", "bert.embeddings.layer_norm.weight"]
    included = ["dense.weight", "weight", "embeddings.word_embeddings.embedding_table", "attention.beta_proj.weight",
                "biased.weight"]
    assert [applies_weight_decay(n) for n in excluded] == [False] * len(excluded)
    assert [applies_weight_decay(n) for n in included] == [True] * len(included)
    net = TinyNet()
    assert [p.name for p in net.trainable_params()] == ["dense.weight", "dense.bias", "norm.gamma", "norm.beta"]
    assert decay_mask(net.trainable_params()) == [True, False, False, False]


@pytest.mark.parametrize("cls", [AdamW, Lamb])
def test_decay_mask_by_effect(cls):
    """Zero gradients leave only the decay term: decayed tensors shrink, excluded ones do not move.

    With g = 0 the direction is r = wd * w: AdamW scales w by (1 - lr * wd); LAMB's trust ratio ||w|| / ||r|| = 1 / wd
    cancels wd, so it scales w by (1 - lr).
    """
    net = TinyNet()
    params = net.trainable_params()
    before = [p.asnumpy().copy() for p in params]
    optimizer = cls(params, 0.5, weight_decay=0.1)
    # Tensor(np.zeros): ops.zeros fails in PyNative in this venv (a NumPy 1.x-compiled module under NumPy 2).
    optimizer(tuple(Tensor(np.zeros(p.shape, np.float32)) for p in params))
    factor = 1 - 0.5 if cls is Lamb else 1 - 0.5 * 0.1
    np.testing.assert_allclose(params[0].asnumpy(), before[0] * factor, rtol=1e-5)
    for p, b in zip(params[1:], before[1:]):
        np.testing.assert_array_equal(p.asnumpy(), b, err_msg=p.name)


def test_plugs_into_value_and_grad_and_checkpoints(tmp_path):
    old = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = TinyNet()
        optimizer = build_optimizer("AdamW", net.trainable_params(), 0.05, weight_decay=0.01)
        x = Tensor(np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32))
        y = Tensor(np.random.default_rng(3).standard_normal((8, 3)).astype(np.float32))

        def loss_fn(inputs, targets):
            return ((net(inputs) - targets) ** 2).mean()

        grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)
        losses = []
        for _ in range(3):
            loss, grads = grad_fn(x, y)
            optimizer(grads)
            losses.append(float(loss.asnumpy()))
        assert losses[-1] < losses[0]

        names = [p.name for p in optimizer.second_moments()]
        assert names == ["adam_v." + p.name for p in net.trainable_params()]
        path = str(tmp_path / "optimizer.ckpt")
        ms.save_checkpoint(optimizer, path)
        restored = AdamW(TinyNet(seed=5).trainable_params(), 0.05)
        ms.load_param_into_net(restored, ms.load_checkpoint(path))
        assert int(restored.global_step.asnumpy()[0]) == 3
        for got, want in zip(restored.second_moments() + restored.first_moments(),
                             optimizer.second_moments() + optimizer.first_moments()):
            np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())
        assert restored.second_moment_bias_correction() == pytest.approx(1 - BETA2 ** 3)
    finally:
        ms.set_context(mode=old)


def test_bad_arguments_name_the_field():
    params = TinyNet().trainable_params()
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer("sgd", params, 0.1)
    assert isinstance(build_optimizer("lamb", params, 0.1), Lamb)
    with pytest.raises(ValueError, match="beta2"):
        AdamW(params, 0.1, beta2=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        Lamb(params, 0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        AdamW(params, -0.1)
