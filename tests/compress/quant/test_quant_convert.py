"""quant.convert: integer codes + scales, model-directory round trip, corrupted codes refused, decode-once serving."""
import os
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

sys.path.insert(0, os.path.dirname(__file__))
from test_quant_prepare import batch, classifier, tiny  # noqa: E402

from ms_nlp_compress.compress.quant.config import QuantConfig  # noqa: E402
from ms_nlp_compress.compress.quant.convert import (ActivationQuant, PackedDense,  # noqa: E402
                                                    PackedEmbedding,
                                                    QuantizedNezhaForMaskedLM,
                                                    QuantizedNezhaForSequenceClassification, convert, decode)
from ms_nlp_compress.compress.quant.packing import unpack_ternary  # noqa: E402
from ms_nlp_compress.compress.quant.prepare import prepare  # noqa: E402
from ms_nlp_compress.errors import CheckpointError, ConfigError  # noqa: E402
from ms_nlp_compress.models.checkpoint import (load_model_dir, read_safetensors, save_model_dir,  # noqa: E402
                                               write_safetensors)
from ms_nlp_compress.models.nezha import NezhaForMaskedLM  # noqa: E402

MIXED = {"encoder": {"method": "sym", "bits": 4}, "pooler": {"method": "log", "bits": 4},
         "embedding": {"method": "minmax", "bits": 2, "granularity": "row"}, "activation": {"method": "minmax"}}
RECIPES = {"2-2-8": {"preset": "2-2-8"}, "8-8-8": {"preset": "8-8-8"}, "mixed": MIXED,
           "lat": {"encoder": {"method": "lat"}, "embedding": {"method": "lat", "granularity": "row"}}}
QUERY = "bert.encoder.layers.0.attention.self_attention.query"


def run(model, arrays):
    return model(*[Tensor(a) for a in arrays])[0].asnumpy()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_convert_save_reload_forward_equals_fake_quant(recipe, tmp_path, graph_mode):
    prepared = prepare(classifier(tiny(), seed=11), QuantConfig.from_dict(RECIPES[recipe]))
    if recipe == "lat":  # a non-identity preconditioner must travel into the codes
        rng = np.random.default_rng(0)
        for name, param in prepared.parameters_and_names():
            if name.endswith("lat_preconditioner"):
                param.set_data(Tensor(rng.lognormal(0, 1, param.shape).astype(np.float32)))
    prepared.set_train(False)
    arrays = batch(seed=4)
    expected = run(prepared, arrays)
    deployed = convert(prepared)
    assert isinstance(deployed, QuantizedNezhaForSequenceClassification)
    np.testing.assert_allclose(run(deployed, arrays), expected, atol=1e-5)
    save_model_dir(deployed, tmp_path / "q", deployed.bert.config)
    reloaded, document = load_model_dir(tmp_path / "q")
    assert document["architecture"] == "QuantizedNezhaForSequenceClassification"
    assert document["quant"] == QuantConfig.from_dict(RECIPES[recipe]).to_dict()
    reloaded.set_train(False)
    np.testing.assert_allclose(run(reloaded, arrays), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="already ran in graph mode"):  # the compiled graph would stay
        decode(reloaded)
    served = decode(load_model_dir(tmp_path / "q")[0])
    assert not any(isinstance(c, (PackedDense, PackedEmbedding)) for _, c in served.cells_and_names())
    served.set_train(False)
    np.testing.assert_allclose(run(served, arrays), expected, atol=1e-5)


@pytest.mark.parametrize("recipe", ["2-2-8", "mixed"])
def test_weight_only_decode_equals_fake_quant_weights_without_activation_quant(recipe, tmp_path, graph_mode):
    """decode(activations=False): the training cells' quantized weights, no activation quantizer anywhere."""
    weights_only = dict(RECIPES[recipe], activation={"method": "none"})
    reference = prepare(classifier(tiny(), seed=5), QuantConfig.from_dict(weights_only))  # same latent weights
    reference.set_train(False)
    arrays = batch(seed=6)
    expected = run(reference, arrays)
    deployed = convert(prepare(classifier(tiny(), seed=5), QuantConfig.from_dict(RECIPES[recipe])))
    save_model_dir(deployed, tmp_path / "q", deployed.bert.config)
    with_activations = run(deployed, arrays)
    served = decode(load_model_dir(tmp_path / "q")[0], activations=False)
    assert not any(isinstance(c, (ActivationQuant, PackedDense, PackedEmbedding)) for _, c in served.cells_and_names())
    served.set_train(False)
    np.testing.assert_allclose(run(served, arrays), expected, atol=1e-5)
    assert np.abs(with_activations - expected).max() > 1e-4  # the activation quantizers did change the outputs


def test_stored_codes_are_real_integers_with_the_documented_layout(tmp_path):
    prepared = prepare(classifier(tiny(), seed=2), QuantConfig())
    deployed = convert(prepared)
    save_model_dir(deployed, tmp_path / "q", deployed.bert.config)
    stored = read_safetensors(tmp_path / "q" / "model.safetensors")
    codes = stored[QUERY + ".weight_codes"]
    assert codes.dtype == np.uint8 and codes.shape == (16, 4)  # 16 columns, four 2-bit codes per byte
    assert QUERY + ".weight" not in stored and "bert.embeddings.word_embeddings.embedding_table" not in stored
    emb = stored["bert.embeddings.word_embeddings.embedding_codes"]
    assert emb.shape == (40, 4) and stored["bert.embeddings.word_embeddings.embedding_scale"].shape == (40, 1)
    # Independent decode: rows of packed ternary codes times alpha reproduce the fake-quant (TWN) weight.
    signs = np.stack([unpack_ternary(row, (16,)) for row in codes])
    alpha = stored[QUERY + ".weight_scale"]
    cell = dict(prepared.cells_and_names())[QUERY]
    np.testing.assert_allclose(signs * alpha, cell.quantized_weight().asnumpy(), atol=1e-6)
    assert stored["classifier.weight"].dtype == np.float32  # full precision by default
    int8 = convert(prepare(classifier(tiny(), seed=2), QuantConfig.preset("8-8-8")))
    assert dict(int8.parameters_and_names())[QUERY + ".weight_codes"].dtype == ms.int8


def _corrupt(directory, name, change):
    path = directory / "model.safetensors"
    weights = read_safetensors(path)
    weights[name] = change(weights[name])
    write_safetensors(weights, path)


@pytest.mark.parametrize("recipe,name,change,message", [
    ("2-2-8", QUERY + ".weight_codes", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, 0xFF, a)
     .astype(np.uint8), "weight_codes is corrupted"),
    ("mixed", QUERY + ".weight_codes", lambda a: np.full_like(a, 0x88), "weight_codes is corrupted"),  # -8 nibble
    ("2-2-8", QUERY + ".weight_codes", lambda a: a[:, :3].copy(), "weight_codes"),  # mis-shaped
    ("2-2-8", QUERY + ".weight_codes", lambda a: a.astype(np.int8), "weight_codes"),  # wrong dtype
    ("2-2-8", QUERY + ".weight_scale", lambda a: np.full_like(a, np.nan), "weight_scale"),
])
def test_corrupted_or_mis_shaped_codes_fail_naming_the_tensor_and_load_nothing(recipe, name, change, message,
                                                                               tmp_path, monkeypatch):
    deployed = convert(prepare(classifier(tiny(layers=1), seed=2), QuantConfig.from_dict(RECIPES[recipe])))
    save_model_dir(deployed, tmp_path / "q", deployed.bert.config)
    _corrupt(tmp_path / "q", name, change)
    assigned = []
    original = ms.Parameter.set_data
    monkeypatch.setattr(ms.Parameter, "set_data", lambda self, *a, **k: (assigned.append(self.name),
                                                                          original(self, *a, **k))[1])
    with pytest.raises(CheckpointError, match=message) as error:
        load_model_dir(tmp_path / "q")
    assert name in str(error.value)
    assert not [n for n in assigned if n.endswith(("_codes", "_scale", ".bias", ".gamma"))]


def test_masked_lm_converts_with_the_tied_decoder_on_the_codes(tmp_path, graph_mode):
    ms.set_seed(3)
    model = NezhaForMaskedLM(tiny())
    model.set_train(False)
    prepared = prepare(model, QuantConfig())
    ids, mask, types = batch()
    expected = prepared(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    deployed = convert(prepared)
    assert isinstance(deployed, QuantizedNezhaForMaskedLM)
    save_model_dir(deployed, tmp_path / "mlm", deployed.bert.config)
    reloaded, _ = load_model_dir(tmp_path / "mlm")
    reloaded.set_train(False)
    np.testing.assert_allclose(reloaded(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy(), expected,
                               atol=1e-5)
