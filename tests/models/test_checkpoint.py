"""Checkpoint import (HF BERT / NEZHA safetensors), strictness, our model directory, and real MiniLM parity."""
import json

import numpy as np
import pytest

from mindspore import Tensor

import numpy_bert
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import CheckpointError
from ms_nlp_compress.models.checkpoint import (load_model_dir, load_pretrained, pretrained_config,
                                               read_hf_checkpoint, save_model_dir, write_safetensors)
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification, NezhaModel, SentenceEncoder

HF_CONFIG = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 40, "hidden_size": 12,
             "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 20, "hidden_act": "gelu",
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 16,
             "type_vocab_size": 2, "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0}


def reference_config(relative=False):
    return dict(vocab_size=40, hidden_size=12, num_layers=2, num_heads=3, intermediate_size=20, type_vocab_size=2,
                max_position_embeddings=16, layer_norm_eps=1e-12, relative=relative, max_relative_position=64)


def write_hf_folder(path, weights, config=HF_CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    write_safetensors(weights, path / "model.safetensors")
    return path


def inputs():
    ids = np.array([[2, 5, 7, 9, 3, 0], [2, 11, 13, 3, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    return ids, mask, np.zeros_like(ids)


@pytest.mark.parametrize("relative", [False, True], ids=["bert", "nezha"])
def test_hf_folder_imports_and_matches_reference(tmp_path, relative, graph_mode):
    hf = numpy_bert.random_hf_weights(reference_config(relative), seed=11, relative=relative)
    hf["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    config_values = dict(HF_CONFIG)
    if relative:  # NEZHA folders: no position table, relative flag (and K) in the config
        config_values.update(use_relative_position=True, max_relative_position=64)
    folder = write_hf_folder(tmp_path / "hf", {"bert." + k: v for k, v in hf.items()}, config_values)
    config = pretrained_config(folder)
    assert config.position_embedding == ("relative" if relative else "absolute")
    model = NezhaModel(config)
    report = load_pretrained(model, folder)
    assert report.complete and report.ignored == ["bert.embeddings.position_ids"]
    model.set_train(False)
    ids, mask, types = inputs()
    ours = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    ref = numpy_bert.forward(hf, reference_config(relative), ids, mask, types)[0]
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_nezha_checkpoint_without_table_is_detected_as_relative(tmp_path):
    hf = numpy_bert.random_hf_weights(reference_config(True), seed=1, relative=True)
    folder = write_hf_folder(tmp_path / "nezha", hf)  # config says nothing about positions
    assert pretrained_config(folder).position_embedding == "relative"


def test_strict_load_names_every_bad_tensor(tmp_path):
    hf = numpy_bert.random_hf_weights(reference_config(), seed=2)
    del hf["encoder.layer.1.output.dense.bias"]
    hf["encoder.layer.0.attention.self.query.weight"] = np.zeros((5, 12), np.float32)
    hf["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((3,), np.float32)
    folder = write_hf_folder(tmp_path / "bad", hf)
    model = NezhaModel(pretrained_config(folder))
    before = model.encoder.layers[0].ffn.intermediate.weight.asnumpy().copy()
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, folder)
    message = str(info.value)
    assert "missing from checkpoint: encoder.layers.1.ffn.output.bias" in message
    assert "shape mismatch: encoder.layers.0.attention.self_attention.query.weight: checkpoint (5, 12)" in message
    assert "unexpected in checkpoint: encoder.layer.0.attention.self.rotary.weight" in message
    np.testing.assert_array_equal(model.encoder.layers[0].ffn.intermediate.weight.asnumpy(), before)  # untouched
    report = load_pretrained(model, folder, strict=False)
    assert report.missing == ["encoder.layers.1.ffn.output.bias"] and len(report.mismatched) == 1
    np.testing.assert_array_equal(model.encoder.layers[0].ffn.intermediate.weight.asnumpy(),
                                  hf["encoder.layer.0.intermediate.dense.weight"])


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_pretrained(NezhaModel(NezhaConfig(vocab_size=40, hidden_size=12, num_layers=1, num_heads=3,
                                               intermediate_size=8)), tmp_path / "absent")
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        read_hf_checkpoint(folder)
    torch_only = tmp_path / "torch_only"
    torch_only.mkdir()
    (torch_only / "config.json").write_text(json.dumps(HF_CONFIG))
    (torch_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_hf_checkpoint(torch_only)


def test_model_directory_round_trip(tmp_path, graph_mode):
    config = NezhaConfig(vocab_size=40, hidden_size=12, num_layers=2, num_heads=3, intermediate_size=20,
                         layer_intermediate_sizes=[20, 9], max_relative_position=4)
    model = NezhaForSequenceClassification(config, num_labels=3)
    model.set_train(False)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    save_model_dir(model, tmp_path / "saved", config, meta={"task": "mnli"}, tokenizer_dir=tmp_path / "tok")
    loaded, document = load_model_dir(tmp_path / "saved")
    loaded.set_train(False)
    assert document["task"] == "mnli" and (tmp_path / "saved" / "vocab.txt").is_file()
    ids, mask, types = inputs()
    np.testing.assert_array_equal(model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy(),
                                  loaded(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy())
    # loading a model directory into the bare backbone strips the `bert.` prefix; the classifier is a head the
    # backbone does not have: named in the one informational line, not loaded
    backbone = NezhaModel(config)
    lines = []
    report = load_pretrained(backbone, tmp_path / "saved", log=lines.append)
    assert report.complete and sorted(report.unused) == ["classifier.bias", "classifier.weight"]
    assert len(lines) == 1 and "not used: classifier (classifier.*: 2 tensors)" in lines[0]
    np.testing.assert_array_equal(backbone.pooler.dense.weight.asnumpy(), model.bert.pooler.dense.weight.asnumpy())


# ---------------------------------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------------------

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar.",
    "The new movie is awesome and I loved it.",
    "This film was great, I really enjoyed it.",
    "The stock market fell sharply on Monday.",
    "Cats like to sleep in the sun.",
]


def encode_reference(minilm_path, sentences):
    """Token ids from the teacher's own tokenizer.json (independent of our tokenizer)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    tokenizer.no_padding()
    encodings = [tokenizer.encode(s) for s in sentences]
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(sentences), length), np.int32)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
    return ids, (ids != 0).astype(np.int32)


def test_real_minilm_parity_with_numpy_forward(minilm_path, execution_mode):
    from ms_nlp_compress.models.checkpoint import read_safetensors

    config = pretrained_config(minilm_path)
    model = NezhaModel(config)
    report = load_pretrained(model, minilm_path)
    assert report.complete and len(report.loaded) == 103
    model.set_train(False)
    ids, mask = encode_reference(minilm_path, SENTENCES)
    ours = model(Tensor(ids), Tensor(mask), Tensor(np.zeros_like(ids)))[0].asnumpy()
    hf = read_safetensors(minilm_path / "model.safetensors")
    ref_config = dict(num_layers=6, num_heads=12, hidden_size=384, layer_norm_eps=1e-12, relative=False)
    ref = numpy_bert.forward(hf, ref_config, ids, mask)[0]
    real = mask.astype(bool)
    diff = np.abs(ours - ref)[real].max()
    assert diff <= 1e-4, f"max |diff| on real tokens {diff}"


def test_real_minilm_sentence_embeddings_separate_paraphrases(minilm_path, graph_mode):
    model = NezhaModel(pretrained_config(minilm_path))
    load_pretrained(model, minilm_path)
    encoder = SentenceEncoder(model)
    encoder.set_train(False)
    ids, mask = encode_reference(minilm_path, SENTENCES)
    embeddings = encoder(Tensor(ids), Tensor(mask)).asnumpy()
    cosine = embeddings @ embeddings.T
    paraphrase = min(cosine[0, 1], cosine[2, 3])
    unrelated = max(cosine[0, 4], cosine[0, 5], cosine[2, 4], cosine[3, 5], cosine[1, 4])
    assert paraphrase > 0.5 and unrelated < 0.2 and paraphrase - unrelated > 0.4, cosine.round(2)
