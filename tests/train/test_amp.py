"""Mixed precision (`runtime.apply_precision`): the returned network really computes in float16, the loss and the
gradients stay close to float32, the gradients reach the original float32 Parameters, the original model is left
computing in float32, and a mixed-precision export reloads and matches.

How "really float16" is observed: a value that went through float16 is exactly representable in float16, while
float32 results almost never are (a random float32 has 13 more mantissa bits). So each check runs the float32
model as a control (few representable values) and asserts that the outputs of the float16 parts are all
representable; a no-op amp fails every one of them. The bare Dense test adds two exact cases: an operand rounded
to float16 (1 + 2^-12 -> 1) and a product past the float16 range (90000 -> inf).
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.models.nezha import NezhaForMaskedLM, NezhaForSequenceClassification
from ms_nlp_compress.runtime import apply_precision
from ms_nlp_compress.train.losses import MaskedLMLoss, SequenceClassificationLoss
from ms_nlp_compress.train.step import LossScaler

LEVELS = ("O1", "O2", "O3")
KERNELS = ("fused", "cpu")
LOSS_RTOL = 1e-2  # |loss_amp - loss_fp32| / loss_fp32 (measured: 1e-3 - 4e-3 on this model)
GRAD_RTOL = 5e-2  # ||g_amp - g_fp32|| / ||g_fp32|| over all gradients (measured: 4e-3 - 1e-2)
OUTPUT_ATOL = 5e-2  # max |logits_amp - logits_fp32| (measured: 4e-3 - 8e-3)


def float16_fraction(values) -> float:
    """The fraction of values that are exactly representable in float16."""
    values = np.asarray(values, np.float32)
    return float(np.mean(values == values.astype(np.float16).astype(np.float32)))


def tiny_config(kernels: str) -> NezhaConfig:
    # head_dim 4: the attention scale 1/sqrt(4) is a power of two, so scaled float16 scores stay representable.
    # Large initial weights (0.5) make float16 rounding visible in the outputs. No dropout: amp vs fp32 compares
    # the same function.
    return NezhaConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=4, intermediate_size=32,
                       max_position_embeddings=16, position_embedding="absolute", hidden_dropout=0.0,
                       attention_dropout=0.0, initializer_range=0.5, kernels=kernels)


def classifier_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 30, (4, 7)).astype(np.int32)
    mask = np.ones_like(ids)  # no padding: the attention bias is exactly 0, so it cannot un-round the scores
    return (Tensor(ids), Tensor(mask), Tensor(np.zeros_like(ids)), Tensor(np.array([0, 1, 1, 0], np.int32)))


def classification_loss(kernels: str, seed=0):
    ms.set_seed(seed)
    set_dropout_seed(seed)
    model = NezhaForSequenceClassification(tiny_config(kernels), 2, output_hidden_states=True,
                                           output_attentions=True)
    return model, SequenceClassificationLoss(model)


def gradients(loss_cell, weights, batch):
    loss, grads = ms.value_and_grad(loss_cell, None, weights)(*batch)
    return float(loss.asnumpy()), [grad for grad in grads]


_FP32_GRADIENTS = {}


def fp32_gradients(kernels: str, batch):
    """(loss, flat gradient) of the float32 model: the same seed builds the same model, so compute it once."""
    if kernels not in _FP32_GRADIENTS:
        model, loss_cell = classification_loss(kernels)
        loss, grads = gradients(loss_cell, model.trainable_params(), batch)
        _FP32_GRADIENTS[kernels] = loss, np.concatenate([grad.asnumpy().ravel() for grad in grads])
    return _FP32_GRADIENTS[kernels]


@pytest.mark.parametrize("level", LEVELS)
def test_a_dense_layer_rounds_its_operands_and_result_to_float16(level, graph_mode):
    dense = nn.Dense(2, 1, weight_init=Tensor(np.array([[1.0, 300.0]], np.float32)), bias_init="zeros")
    x = Tensor(np.array([[1.0 + 2.0 ** -12, 0.0], [0.0, 300.0]], np.float32))
    np.testing.assert_array_equal(dense(x).asnumpy(), np.array([[1.0 + 2.0 ** -12], [90000.0]], np.float32))
    mixed = apply_precision(dense, level)
    out = mixed(x)
    assert out.dtype == ms.float32  # handed back in float32
    # 1 + 2^-12 is not a float16 (10 mantissa bits): it entered the matmul as 1.0; 90000 is past float16's 65504
    np.testing.assert_array_equal(out.asnumpy(), np.array([[1.0], [np.inf]], np.float32))
    np.testing.assert_array_equal(dense(x).asnumpy()[:, 0], [1.0 + 2.0 ** -12, 90000.0])  # the original: fp32


@pytest.mark.parametrize("level", LEVELS)
def test_model_matmuls_run_in_float16_and_the_original_stays_float32(level, graph_mode, tmp_path, monkeypatch):
    """With the fused kernels; the CPU kernels are covered by the gradient test below (their backward is what
    differs)."""
    monkeypatch.chdir(tmp_path)  # mindspore.amp's O1 wrote ./rewritten_network/ here; ours must write nothing
    model, loss_cell = classification_loss("fused")
    model.set_train(False)
    batch = classifier_batch()
    logits, hidden, scores = model(*batch[:3])
    reference = [logits.asnumpy(), hidden[-1].asnumpy(), scores[0].asnumpy()]
    for values in reference:  # the control: float32 results are almost never float16 values
        assert float16_fraction(values) < 0.2

    mixed = apply_precision(loss_cell, level)
    assert mixed is not loss_cell
    assert [p.name for p in mixed.get_parameters()] == [p.name for p in loss_cell.get_parameters()]
    assert all(a is b for a, b in zip(mixed.get_parameters(), loss_cell.get_parameters()))  # the fp32 masters
    mixed.set_train(False)
    logits16, hidden16, scores16 = mixed.model(*batch[:3])
    assert logits16.dtype == hidden16[-1].dtype == scores16[0].dtype == ms.float32  # outputs handed back in fp32
    assert float16_fraction(logits16.asnumpy()) == 1.0  # the classifier's Dense ran in float16
    assert float16_fraction(scores16[0].asnumpy()) == 1.0  # Q K^T ran in float16 (times 1/2, plus bias 0)
    if level == "O1":
        assert float16_fraction(hidden16[-1].asnumpy()) < 0.2  # O1: LayerNorm and the residual path in float32
    else:
        assert float16_fraction(hidden16[-1].asnumpy()) == 1.0  # O2 / O3: float16 activations between layers
    difference = np.abs(logits16.asnumpy() - reference[0]).max()
    assert 0.0 < difference <= OUTPUT_ATOL

    again = model(*batch[:3])  # the original still computes in float32 (mindspore.amp's O1: NameError MASK_BIAS)
    np.testing.assert_array_equal(again[0].asnumpy(), reference[0])
    np.testing.assert_array_equal(again[2][0].asnumpy(), reference[2])
    assert not (tmp_path / "rewritten_network").exists()


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("level", LEVELS)
def test_loss_and_gradients_of_the_original_parameters_stay_close_to_fp32(level, kernels, graph_mode):
    batch = classifier_batch(1)
    loss32, flat32 = fp32_gradients(kernels, batch)
    model, loss_cell = classification_loss(kernels)
    weights = model.trainable_params()
    loss16, grads16 = gradients(apply_precision(loss_cell, level), weights, batch)
    assert all(grad.dtype == ms.float32 for grad in grads16)  # gradients of the float32 masters
    flat16 = np.concatenate([grad.asnumpy().ravel() for grad in grads16])
    assert np.isfinite(flat16).all()
    assert abs(loss16 - loss32) <= LOSS_RTOL * loss32
    relative = np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)
    assert 0.0 < relative <= GRAD_RTOL  # close, and not the float32 computation itself


def test_an_sgd_step_with_a_dynamic_loss_scale_updates_the_fp32_masters(graph_mode):
    """value_and_grad over the returned loss cell, scaled by a dynamic loss scale; overflowing steps are skipped and
    halve the scale; the applied step equals a numpy SGD step on the unscaled gradients."""

    class ScaledLoss(nn.Cell):
        def __init__(self, loss_cell):
            super().__init__(auto_prefix=False)
            self.loss_cell = loss_cell

        def construct(self, scale, *batch):
            return self.loss_cell(*batch) * scale

    model, loss_cell = classification_loss("fused")
    weights = model.trainable_params()
    mixed = apply_precision(loss_cell, "O2")
    optimizer = nn.SGD(weights, learning_rate=0.1)
    scaler = LossScaler("dynamic", value=2.0 ** 24, factor=2.0, window=1000)  # starts high: must back off
    grad_fn = ms.value_and_grad(ScaledLoss(mixed), None, weights)
    batch = classifier_batch(2)
    for _ in range(12):
        before = [param.asnumpy().copy() for param in weights]
        _, grads = grad_fn(Tensor(scaler.scale, ms.float32), *batch)
        unscaled = [grad.asnumpy() / scaler.scale for grad in grads]
        finite = all(np.isfinite(grad).all() for grad in unscaled)
        scaler.update(finite)
        if finite:
            optimizer(tuple(Tensor(grad) for grad in unscaled))
            break
    else:
        pytest.fail("no finite step in 12 tries")
    assert scaler.skipped_steps >= 1 and scaler.scale < 2.0 ** 24  # 2^24 overflows float16 gradients here
    after = [param.asnumpy() for param in weights]
    assert all(value.dtype == np.float32 for value in after)
    for old, new, grad in zip(before, after, unscaled):
        np.testing.assert_allclose(new, old - 0.1 * grad, rtol=0, atol=1e-6)
    assert any(not np.array_equal(old, new) for old, new in zip(before, after))


def test_masked_lm_decoder_runs_in_float16_and_the_loss_stays_close(graph_mode):
    """O1, the level at which the tied decoder's bare matmul needs its own casts (O2 / O3 cast whole cells)."""
    ms.set_seed(0)
    model = NezhaForMaskedLM(tiny_config("fused"))
    loss_cell = MaskedLMLoss(model)
    rng = np.random.default_rng(3)
    ids = rng.integers(5, 30, (2, 7)).astype(np.int32)
    batch = (Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)),
             Tensor(np.array([[1, 3], [2, 5]], np.int32)), Tensor(ids[:, [1, 3]]),
             Tensor(np.array([[1, 1], [1, 0]], np.float32)))
    model.set_train(False)
    logits32 = model(*batch[:3], batch[3])[0].asnumpy()
    assert float16_fraction(logits32) < 0.2
    mixed = apply_precision(loss_cell, "O1")
    mixed.set_train(False)
    # The decoder bias starts at 0, so the float16 product of the tied-table matmul shows through unchanged.
    assert float16_fraction(mixed.model(*batch[:3], batch[3])[0].asnumpy()) == 1.0
    weights = model.trainable_params()
    loss32 = float(loss_cell(*batch).asnumpy())
    loss16, grads16 = gradients(mixed, weights, batch)
    assert abs(loss16 - loss32) <= LOSS_RTOL * loss32
    table = [grad for param, grad in zip(weights, grads16) if param.name.endswith("word_embeddings.embedding_table")]
    assert len(table) == 1 and table[0].dtype == ms.float32 and np.abs(table[0].asnumpy()).max() > 0


def test_precision_errors_name_the_key():
    dense = nn.Dense(2, 2)
    assert apply_precision(dense, "fp32") is dense
    with pytest.raises(ConfigError, match="runtime.amp_dtype: bfloat16 needs device ascend"):
        apply_precision(dense, "O2", "cpu", amp_dtype="bfloat16")
    with pytest.raises(ConfigError, match="runtime.amp_dtype"):
        apply_precision(dense, "O2", "cpu", amp_dtype="float8")
    with pytest.raises(ConfigError, match="runtime.precision"):
        apply_precision(dense, "O4", "cpu")


def test_mixed_precision_export_reloads_and_matches(tmp_path, graph_mode):
    """`msnc export --precision O2`: the file holds the float16 graph (its logits are float16 values), reloads
    matching the mixed-precision Cell, and the summary states how far it is from the float32 model."""
    from ms_nlp_compress.export import commands
    from ms_nlp_compress.models.checkpoint import save_model_dir

    ms.set_seed(0)
    set_dropout_seed(0)
    config = tiny_config("fused")
    model = NezhaForSequenceClassification(config, 3)
    model_dir = tmp_path / "model"
    save_model_dir(model, model_dir, config)
    words = ["the", "film", "was", "a", "model", "story", "phone", "今", "天"]
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    summary = commands.export_model(model_dir, tmp_path / "out" / "tiny16", precision="O2", atol=1e-5,
                                    log=lambda message: None)
    assert summary.precision == "O2" and summary.verify.worst <= 1e-5  # reloaded file == mixed-precision Cell
    assert set(summary.float32_differences) == set(summary.verify.max_differences)
    assert all(0.0 < difference <= OUTPUT_ATOL for difference in summary.float32_differences.values())
    assert any("precision O2 (float16 compute)" in note for note in summary.notes)

    graph = nn.GraphCell(ms.load(str(summary.mindir)))
    rng = np.random.default_rng(4)
    ids = rng.integers(5, 14, (3, 9)).astype(np.int32)
    inputs = [Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids))]
    from_file = graph(*inputs).asnumpy()
    model.set_train(False)
    float32 = model(*inputs)[0].asnumpy()
    assert float16_fraction(from_file) == 1.0 and float16_fraction(float32) < 0.2
    np.testing.assert_allclose(from_file, float32, rtol=0, atol=OUTPUT_ATOL)
    with pytest.raises(commands.ExportError, match="runtime.amp_dtype: bfloat16 needs device ascend"):
        commands.export_model(model_dir, tmp_path / "out" / "bf16", precision="O2", amp_dtype="bfloat16",
                              log=lambda message: None)


def test_amp_dtype_config_key():
    from pathlib import Path

    from ms_nlp_compress.config import load_config

    configs = Path(__file__).resolve().parents[2] / "ascend_configs"
    with pytest.raises(ConfigError, match="runtime.amp_dtype: bfloat16 needs device ascend"):
        load_config(configs / "vader_sst2_cpu.yaml", ["runtime.precision=O2", "runtime.amp_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="runtime.amp_dtype: must be float16 or bfloat16"):
        load_config(configs / "vader_sst2_cpu.yaml", ["runtime.amp_dtype=float8"])
    with pytest.raises(ConfigError, match="runtime.amp_dtype: bfloat16 is the compute type of precision O1-O3"):
        load_config(configs / "vader_sst2_cpu.yaml", ["runtime.device=ascend", "runtime.amp_dtype=bfloat16"])
    ascend = load_config(configs / "vader_sst2_cpu.yaml",
                         ["runtime.device=ascend", "runtime.precision=O2", "runtime.amp_dtype=bfloat16"])
    assert ascend.runtime.amp_dtype == "bfloat16"  # allowed where MindSpore has bfloat16 kernels
