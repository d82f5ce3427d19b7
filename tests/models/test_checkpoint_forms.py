"""Checkpoints as they are distributed (issue 15) and the loading contract of the model directory (issue 7).

Each tiny checkpoint is written here with exactly the tensor names its producer uses:
- transformers BertForMaskedLM (safetensors): `bert.` backbone without pooler, `cls.predictions.*` without the tied
  decoder tensors (save_pretrained drops them), the `position_ids` buffer;
- transformers BertForPreTraining as bert-base-uncased ships it: legacy `LayerNorm.gamma/beta` names, pooler,
  `cls.predictions.decoder.weight` (tied copy), `cls.seq_relationship.*`;
- NEZHA-PyTorch BertForPreTraining (modeling_nezha.py): `bert_config.json` with use_relative_position, no position
  table, BertLayerNorm `weight/bias`, tied decoder without bias, NSP head;
- a backbone-only transformers BertModel (no prefix);
- our own `mlm/` directory as `msnc pretrain` writes it (`lm_head.*`).
The forward passes are checked against the independent numpy reference (numpy_bert.py) and an MLM-head twin below.
"""
import importlib.util
import json
import pickle
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mindspore import Parameter, Tensor, nn, ops

import numpy_bert
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import CheckpointError, ConfigError
from ms_nlp_compress.models import checkpoint as ckpt
from ms_nlp_compress.models.checkpoint import (MLM_HEAD, cell_weights, load_model_dir, load_pretrained,
                                               pretrained_config, read_safetensors, register_architecture,
                                               save_model_dir, write_safetensors)
from ms_nlp_compress.models.nezha import NezhaForMaskedLM, NezhaForSequenceClassification, NezhaModel

REPO = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=40, hidden_size=12, num_layers=2, num_heads=3, intermediate_size=20, type_vocab_size=2,
             max_position_embeddings=16, layer_norm_eps=1e-12, max_relative_position=64)
HF_CONFIG = {"model_type": "bert", "vocab_size": 40, "hidden_size": 12, "num_hidden_layers": 2,
             "num_attention_heads": 3, "intermediate_size": 20, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
             "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 16, "type_vocab_size": 2,
             "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0}
FORMS = ("hf_masked_lm", "hf_pretraining_legacy", "nezha_pytorch", "backbone_only", "msnc_mlm_dir")
HEADED = ("hf_masked_lm", "hf_pretraining_legacy", "nezha_pytorch", "msnc_mlm_dir")


# ----------------------------------------------------------------------------------------------------------------
# Writing checkpoints the way their producers do
# ----------------------------------------------------------------------------------------------------------------


def reference_shape(relative):
    return dict(SHAPE, relative=relative)


def mlm_head(shape, seed):
    """The MLM head tensors under transformers' names (without the `cls.predictions.` prefix)."""
    rng = np.random.default_rng(seed)
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    return {"transform.dense.weight": (rng.standard_normal((hidden, hidden)) * 0.3).astype(np.float32),
            "transform.dense.bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
            "transform.LayerNorm.weight": (1.0 + rng.standard_normal(hidden) * 0.1).astype(np.float32),
            "transform.LayerNorm.bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
            "bias": (rng.standard_normal(vocab) * 0.5).astype(np.float32)}


def legacy(name):
    """Google-converted checkpoints name LayerNorm parameters gamma / beta."""
    return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")


def write_form(root: Path, form: str, shape=SHAPE, seed=5, vocab=None):
    """Write checkpoint `form` under root/form. Returns (folder, reference) where reference holds the HF-named
    backbone, the MLM head (or None), whether positions are relative and whether a pooler was saved."""
    folder = root / form
    folder.mkdir(parents=True)
    relative = form == "nezha_pytorch"
    with_pooler = form not in ("hf_masked_lm", "msnc_mlm_dir")
    backbone = numpy_bert.random_hf_weights(reference_shape(relative) | shape, seed=seed, relative=relative,
                                            with_pooler=with_pooler)
    head = mlm_head(shape, seed + 1) if form in HEADED else None
    config = dict(HF_CONFIG, vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                  num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                  intermediate_size=shape["intermediate_size"],
                  max_position_embeddings=shape["max_position_embeddings"])
    nsp = {"cls.seq_relationship.weight": np.full((2, shape["hidden_size"]), 0.5, np.float32),
           "cls.seq_relationship.bias": np.zeros(2, np.float32)}
    if form == "hf_masked_lm":
        tensors = {"bert." + k: v for k, v in backbone.items()}
        tensors["bert.embeddings.position_ids"] = np.arange(shape["max_position_embeddings"])[None]
        tensors.update({"cls.predictions." + k: v for k, v in head.items()})
        (folder / "config.json").write_text(json.dumps(dict(config, architectures=["BertForMaskedLM"])))
        write_safetensors(tensors, folder / "model.safetensors")
    elif form == "hf_pretraining_legacy":
        tensors = {legacy("bert." + k): v for k, v in backbone.items()}
        tensors.update({legacy("cls.predictions." + k): v for k, v in head.items()})
        tensors["cls.predictions.decoder.weight"] = backbone["embeddings.word_embeddings.weight"].copy()
        tensors.update(nsp)
        (folder / "config.json").write_text(json.dumps(dict(config, architectures=["BertForPreTraining"])))
        write_safetensors(tensors, folder / "model.safetensors")
    elif form == "nezha_pytorch":
        tensors = nezha_pytorch_state(backbone, head, nsp)
        nezha_config = {k: v for k, v in config.items() if k not in ("model_type", "pad_token_id")}
        nezha_config.update(use_relative_position=True, max_relative_position=shape["max_relative_position"])
        (folder / "bert_config.json").write_text(json.dumps(nezha_config))
        write_safetensors(tensors, folder / "model.safetensors")
    elif form == "backbone_only":
        (folder / "config.json").write_text(json.dumps(dict(config, architectures=["BertModel"])))
        write_safetensors(backbone, folder / "model.safetensors")
    elif form == "msnc_mlm_dir":
        # What `msnc pretrain` writes: NezhaForMaskedLM under our own names.
        model_config = NezhaConfig(**{k: v for k, v in shape.items()}, position_embedding="absolute")
        model = NezhaForMaskedLM(model_config)
        hf = {"bert." + k: v for k, v in backbone.items()}
        hf.update({"cls.predictions." + k: v for k, v in head.items()})
        weights, unmapped, _ = ckpt.hf_to_native(hf)
        assert not unmapped
        ckpt.load_weights(model, weights)
        folder.rmdir()
        save_model_dir(model, folder, model_config)
    if vocab is not None:
        (folder / "vocab.txt").write_text(vocab)
    return folder, {"backbone": backbone, "head": head, "relative": relative, "pooler": with_pooler}


def nezha_pytorch_state(backbone, head, nsp):
    """NEZHA-PyTorch BertForPreTraining.state_dict() names (decoder tied, no decoder bias)."""
    tensors = {"bert." + k: v for k, v in backbone.items()}
    tensors.update({"cls.predictions." + k: v for k, v in head.items()})
    tensors["cls.predictions.decoder.weight"] = backbone["embeddings.word_embeddings.weight"].copy()
    tensors.update(nsp)
    return tensors


def inputs(length=6):
    ids = np.array([[2, 5, 7, 9, 3, 0], [2, 11, 13, 3, 0, 0]], np.int32)[:, :length]
    mask = (ids != 0).astype(np.int32)
    types = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]], np.int32)[:, :length]
    return ids, mask, types


def numpy_mlm_logits(sequence, head, word_table, eps=1e-12):
    """The MLM head from the maths: LayerNorm(gelu(h W^T + b)) E^T + bias, float64."""
    inner = numpy_bert.gelu(sequence @ head["transform.dense.weight"].astype(np.float64).T
                            + head["transform.dense.bias"])
    normed = numpy_bert.layer_norm(inner, head["transform.LayerNorm.weight"], head["transform.LayerNorm.bias"], eps)
    return normed @ word_table.astype(np.float64).T + head["bias"]


def reference_forward(reference):
    ids, mask, types = inputs()
    return numpy_bert.forward(reference["backbone"], reference_shape(reference["relative"]), ids, mask, types)


def run_backbone(backbone):
    backbone.set_train(False)
    ids, mask, types = inputs()
    sequence, pooled, _, _ = backbone(Tensor(ids), Tensor(mask), Tensor(types))
    return sequence.asnumpy(), None if pooled is None else pooled.asnumpy()


def experiment(pretrained):
    from ms_nlp_compress.config import ExperimentConfig, from_mapping

    return from_mapping(ExperimentConfig, {"pretrained": str(pretrained), "runtime": {"device": "cpu"}}, "<test>")


# ----------------------------------------------------------------------------------------------------------------
# Each form: fine-tuning, export, continued pre-training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_form_loads_for_finetuning(tmp_path, form, capsys, graph_mode):
    from ms_nlp_compress.train.finetune import build_classifier

    folder, reference = write_form(tmp_path, form)
    model, model_config, _ = build_classifier(experiment(folder), num_labels=2)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{folder}: loaded ")
    sequence, pooled = run_backbone(model.bert)
    ref_sequence, ref_pooled, _, _ = reference_forward(reference)
    np.testing.assert_allclose(sequence, ref_sequence, atol=2e-5)
    if reference["pooler"]:
        np.testing.assert_allclose(pooled, ref_pooled, atol=2e-5)
        assert "pooler" not in line
    else:
        assert "starts fresh (not in the checkpoint): pooler (pooler.dense.*)" in line
    head_names = {"hf_masked_lm": "cls.predictions.*: 5 tensors", "hf_pretraining_legacy": "cls.predictions.*: 5",
                  "nezha_pytorch": "cls.predictions.*: 5", "msnc_mlm_dir": "lm_head.*: 5 tensors"}
    if form in head_names:
        assert f"not used: MLM head ({head_names[form]}" in line
    assert ("NSP head (cls.seq_relationship.*: 2 tensors)" in line) == (form in ("hf_pretraining_legacy",
                                                                                 "nezha_pytorch"))
    assert model_config.position_embedding == ("relative" if reference["relative"] else "absolute")


@pytest.mark.parametrize("form", FORMS)
def test_form_loads_for_export(tmp_path, form, capsys):
    from ms_nlp_compress.export.commands import load_model_for_export

    folder, reference = write_form(tmp_path, form)
    model, architecture = load_model_for_export(folder)
    backbone = model if isinstance(model, NezhaModel) else model.bert
    sequence, pooled = run_backbone(backbone)
    ref_sequence, ref_pooled, _, _ = reference_forward(reference)
    np.testing.assert_allclose(sequence, ref_sequence, atol=2e-5)
    if reference["pooler"]:
        np.testing.assert_allclose(pooled, ref_pooled, atol=2e-5)


def test_nezha_pytorch_checkpoint_exports_to_mindir(tmp_path, capsys):
    """The form the issue found blocked in export: exported, reloaded and checked against the loaded model."""
    from ms_nlp_compress.export.commands import export_model

    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]) + "\n"
    folder, _ = write_form(tmp_path, "nezha_pytorch", vocab=vocab)
    summary = export_model(folder, tmp_path / "out" / "nezha", log=lambda line: None)
    assert Path(summary.mindir).is_file() and summary.verify is not None
    assert summary.verify.max_differences and max(summary.verify.max_differences.values()) <= 1e-4


@pytest.mark.parametrize("form", FORMS)
def test_form_loads_for_continued_pretraining(tmp_path, form):
    """The call `msnc pretrain` makes (train/pretrain.py): the checkpoint's MLM head is loaded and reproduces the
    checkpoint's logits; a checkpoint without a head gets a fresh one, said in the line."""
    folder, reference = write_form(tmp_path, form)
    model = NezhaForMaskedLM(pretrained_config(folder))
    lines = []
    report = load_pretrained(model, folder, fresh=(MLM_HEAD,), log=lines.append)
    model.set_train(False)
    ids, mask, types = inputs()
    logits = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()  # (B, L, V)
    sequence = reference_forward(reference)[0]
    word_table = reference["backbone"]["embeddings.word_embeddings.weight"]
    if reference["head"] is not None:
        assert not report.fresh
        np.testing.assert_allclose(logits, numpy_mlm_logits(sequence, reference["head"], word_table), atol=1e-4)
    else:
        assert sorted(report.fresh) == ["lm_head.bias", "lm_head.dense.bias", "lm_head.dense.weight",
                                        "lm_head.layer_norm.beta", "lm_head.layer_norm.gamma"]
        assert "starts fresh (not in the checkpoint): MLM head (lm_head.*)" in lines[0]
        # the backbone still came from the checkpoint
        np.testing.assert_allclose(run_backbone(model.bert)[0], sequence, atol=2e-5)
    if reference["pooler"]:
        assert "pooler (" in lines[0] and "not used" in lines[0]  # an MLM model has no pooler


def test_mlm_use_without_a_head_is_an_error_naming_it(tmp_path):
    folder, _ = write_form(tmp_path, "backbone_only")
    with pytest.raises(CheckpointError, match="missing from checkpoint: lm_head.dense.weight"):
        ckpt.load_masked_lm(folder, log=None)


def test_continued_pretraining_run_starts_from_the_checkpoint_mlm_head(tmp_path, graph_mode):
    """`msnc pretrain` with `pretrained:` a NEZHA-PyTorch checkpoint: one update at a tiny learning rate, and the
    saved MLM head is the checkpoint's head (a random head would differ by ~0.02, one AdamW step moves 1e-6)."""
    from ms_nlp_compress.train.pretrain import load_pretrain_experiment, run_pretrain

    tokens = [f"w{i}" for i in range(35)]
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + tokens) + "\n"
    folder, reference = write_form(tmp_path, "nezha_pytorch", vocab=vocab)
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(tokens, 12)) for _ in range(40)) + "\n", encoding="utf-8")
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text(textwrap.dedent(f"""
        name: continued
        output_dir: {tmp_path / 'run'}
        pretrained: {folder}
        runtime: {{device: cpu, mode: graph, seed: 0}}
        data: {{max_length: 16, batch_size: 4, eval_batch_size: 4}}
        train: {{learning_rate: 1.0e-6, warmup_ratio: 0.0, schedule: constant, max_steps: 1, log_every: 1,
                eval_every: 0, save_every: 0}}
        pretrain: {{corpus: {corpus}, eval_sequences: 0}}
        """))
    lines = []
    report = run_pretrain(load_pretrain_experiment(config_file), resume=False, log=lines.append)
    continued = [line for line in lines if line.startswith("continuing from")]
    assert len(continued) == 1 and "MLM head" not in continued[0].split("not used")[0]
    assert "starts fresh" not in continued[0] and "NSP head (cls.seq_relationship.*: 2 tensors)" in continued[0]
    saved = read_safetensors(Path(report["mlm_dir"]) / "model.safetensors")
    head = reference["head"]
    for ours, theirs in (("lm_head.dense.weight", "transform.dense.weight"), ("lm_head.bias", "bias"),
                         ("lm_head.layer_norm.gamma", "transform.LayerNorm.weight")):
        np.testing.assert_allclose(saved[ours], head[theirs], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Strictness about what the model needs
# ----------------------------------------------------------------------------------------------------------------


def test_misshaped_backbone_tensor_fails_naming_it_and_loads_nothing(tmp_path):
    from ms_nlp_compress.train.finetune import build_classifier

    folder, reference = write_form(tmp_path, "hf_pretraining_legacy")
    tensors = read_safetensors(folder / "model.safetensors")
    tensors["bert.encoder.layer.1.attention.output.dense.weight"] = np.zeros((12, 11), np.float32)
    write_safetensors(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        build_classifier(experiment(folder), num_labels=2)
    message = str(info.value)
    assert ("shape mismatch: encoder.layers.1.attention.output.dense.weight: checkpoint (12, 11) vs model (12, 12) "
            "(checkpoint name bert.encoder.layer.1.attention.output.dense.weight)") in message
    assert "strict=False" not in message and "msnc convert" in message and "--set pretrained=" in message


def test_a_failed_load_assigns_nothing(tmp_path):
    """Every tensor is checked (name, shape, dtype) before any is assigned: a wrong dtype on the last layer's
    LayerNorm leaves every parameter, embeddings included, as it was."""
    folder, _ = write_form(tmp_path, "backbone_only")
    tensors = read_safetensors(folder / "model.safetensors")
    tensors["encoder.layer.1.output.LayerNorm.bias"] = np.zeros(12, np.int32)
    write_safetensors(tensors, folder / "model.safetensors")
    model = NezhaModel(pretrained_config(folder))
    before = cell_weights(model)
    with pytest.raises(CheckpointError, match="dtype mismatch: encoder.layers.1.ffn.layer_norm.beta: "
                                              "checkpoint int32 vs model float32"):
        load_pretrained(model, folder)
    after = cell_weights(model)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_untied_decoder_is_unused_for_finetuning_and_refused_for_mlm(tmp_path):
    folder, reference = write_form(tmp_path, "hf_pretraining_legacy")
    tensors = read_safetensors(folder / "model.safetensors")
    tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"] + 0.25
    write_safetensors(tensors, folder / "model.safetensors")
    lines = []
    classifier = NezhaForSequenceClassification(pretrained_config(folder), 2)
    load_pretrained(classifier.bert, folder, log=lines.append)
    assert "MLM head (cls.predictions.*: 6 tensors)" in lines[0] and "untied" in lines[0]
    model = NezhaForMaskedLM(pretrained_config(folder))
    before = cell_weights(model)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, folder, fresh=(MLM_HEAD,))
    message = str(info.value)
    assert "refused: cls.predictions.decoder.weight: an MLM decoder that differs from the word embeddings" in message
    assert "--architecture NezhaModel" in message
    for name, value in cell_weights(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_hf_config_with_a_wrong_type_names_the_key(tmp_path):
    folder, _ = write_form(tmp_path, "backbone_only")
    for key, value, expected in (("hidden_size", "384", "hidden_size: expected an integer, got '384' (str)"),
                                 ("num_hidden_layers", True, "num_hidden_layers: expected an integer, got True"),
                                 ("layer_norm_eps", "1e-12", "layer_norm_eps: expected a number, got '1e-12'"),
                                 ("hidden_act", 3, "hidden_act: expected a string, got 3")):
        (folder / "config.json").write_text(json.dumps(dict(HF_CONFIG, **{key: value})))
        with pytest.raises(ConfigError) as info:
            pretrained_config(folder)
        assert f"{folder / 'config.json'}: {expected}" in str(info.value)


def test_config_file_names(tmp_path):
    folder, _ = write_form(tmp_path, "nezha_pytorch")  # bert_config.json only
    assert pretrained_config(folder).position_embedding == "relative"
    (folder / "bert_config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json or bert_config.json"):
        pretrained_config(folder)


# ----------------------------------------------------------------------------------------------------------------
# pytorch_model.bin: only torch.load(weights_only=True), never plain pickle
# ----------------------------------------------------------------------------------------------------------------

TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None


class _CreatesAFile:
    """Unpickling this calls open(marker, "w"): the way a malicious pytorch_model.bin runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_bins(folder, marker):
    """The payload as a legacy pickle file and inside torch's zip layout (archive/data.pkl)."""
    payload = pickle.dumps({"bert.embeddings.word_embeddings.weight": _CreatesAFile(marker)}, protocol=2)
    (folder / "legacy").mkdir()
    (folder / "legacy" / "pytorch_model.bin").write_bytes(payload)
    (folder / "zip").mkdir()
    with zipfile.ZipFile(folder / "zip" / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    for sub in ("legacy", "zip"):
        (folder / sub / "config.json").write_text(json.dumps(HF_CONFIG))
    return [folder / "legacy", folder / "zip"]


@pytest.fixture
def no_pickle(monkeypatch):
    """Any use of the stdlib unpickler fails the test: our loader must never call it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("plain pickle was used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


def test_pytorch_bin_without_torch_names_the_conversion_command(tmp_path, monkeypatch, no_pickle):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError, whether or not it is installed
    marker = tmp_path / "pwned"
    for folder in malicious_bins(tmp_path, marker):
        for call in (lambda: pretrained_config(folder), lambda: load_pretrained(NezhaModel(NezhaConfig(**{
                k: v for k, v in SHAPE.items()})), folder)):
            with pytest.raises(CheckpointError) as info:
                call()
            message = str(info.value)
            assert f"{folder / 'pytorch_model.bin'}: a PyTorch pickle" in message
            assert "pip install torch" in message and f"msnc convert {folder} {folder}-msnc" in message
            assert not marker.exists()


def test_malicious_pytorch_bin_is_never_executed(tmp_path, monkeypatch, no_pickle):
    """Both paths, whatever is installed: without torch the file is refused unread; with torch (when importable)
    it goes only through torch.load(weights_only=True), which refuses the payload's global. Either way the file the
    payload would create does not appear and the stdlib unpickler is never called."""
    marker = tmp_path / "pwned"
    folders = malicious_bins(tmp_path, marker)
    with monkeypatch.context() as hidden:
        hidden.setitem(sys.modules, "torch", None)
        for folder in folders:
            with pytest.raises(CheckpointError, match="torch is not installed"):
                ckpt.read_checkpoint(folder)
    assert not marker.exists()
    if TORCH_AVAILABLE:
        for folder in folders:
            with pytest.raises(CheckpointError, match="refused: torch.load\\(weights_only=True\\)"):
                ckpt.read_checkpoint(folder)
            assert not marker.exists()
    else:
        with pytest.raises(CheckpointError, match="torch is not installed"):
            ckpt.read_checkpoint(folders[0])
        assert not marker.exists()


def test_pytorch_bin_loads_through_torch_or_is_refused_without_it(tmp_path):
    """With torch importable: a NEZHA-PyTorch pytorch_model.bin written by torch.save (decoder sharing the word
    embeddings' storage, as a tied model saves it) loads like its safetensors twin and matches the numpy reference.
    Without torch: the documented refusal naming `msnc convert`."""
    folder, reference = write_form(tmp_path, "nezha_pytorch")
    tensors = read_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if not TORCH_AVAILABLE:
        # nothing here can write a real .bin: an empty one stands in, and is refused unread
        (folder / "pytorch_model.bin").write_bytes(b"")
        with pytest.raises(CheckpointError, match=r"torch is not installed.*msnc convert"):
            load_pretrained(NezhaModel(NezhaConfig(**SHAPE)), folder)
        return
    import collections

    import torch

    state = collections.OrderedDict((name, torch.from_numpy(value.copy())) for name, value in tensors.items())
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]  # tied: one storage
    torch.save(state, folder / "pytorch_model.bin")
    model = NezhaForMaskedLM(pretrained_config(folder))
    lines = []
    report = load_pretrained(model, folder, log=lines.append)
    assert report.complete and "cls.predictions.decoder.weight" in report.ignored
    model.set_train(False)
    ids, mask, types = inputs()
    logits = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    sequence = reference_forward(reference)[0]
    expected = numpy_mlm_logits(sequence, reference["head"], reference["backbone"]["embeddings.word_embeddings.weight"])
    np.testing.assert_allclose(logits, expected, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# msnc convert
# ----------------------------------------------------------------------------------------------------------------


def test_convert_writes_our_directory_and_reports_mapped_and_skipped(tmp_path, capsys):
    from ms_nlp_compress.cli import main

    folder, reference = write_form(tmp_path, "hf_pretraining_legacy", vocab="[PAD]\n[UNK]\n")
    out = tmp_path / "converted"
    assert main(["convert", str(folder), str(out), "--list"]) == 0
    printed = capsys.readouterr().out
    assert "mapped 42 tensors into NezhaForMaskedLM: backbone 37, MLM head 5" in printed
    assert "  bert.embeddings.LayerNorm.gamma -> bert.embeddings.layer_norm.gamma" in printed
    assert "skipped (no place in NezhaForMaskedLM): pooler (bert.pooler.dense.*: 2 tensors), NSP head " \
           "(cls.seq_relationship.*: 2 tensors)" in printed
    assert "ignored (not weights, or the tied decoder that is the word-embedding table): " \
           "cls.predictions.decoder.weight" in printed
    model, document = load_model_dir(out)
    assert isinstance(model, NezhaForMaskedLM) and (out / "vocab.txt").is_file()
    model.set_train(False)
    ids, mask, types = inputs()
    logits = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    expected = numpy_mlm_logits(reference_forward(reference)[0], reference["head"],
                                reference["backbone"]["embeddings.word_embeddings.weight"])
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    # the backbone with its pooler, on request; an existing output needs --force
    assert main(["convert", str(folder), str(out), "--architecture", "NezhaModel"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["convert", str(folder), str(out), "--architecture", "NezhaModel", "--force"]) == 0
    backbone, document = load_model_dir(out)
    assert document["converted_weights"] == "model.safetensors" and document["add_pooler"] is True
    np.testing.assert_allclose(run_backbone(backbone)[1], reference_forward(reference)[1], atol=2e-5)


def test_convert_backbone_without_pooler_keeps_it_absent(tmp_path, capsys):
    """A pooler-less checkpoint converts to a pooler-less backbone, so a later fine-tuning load says the pooler
    starts fresh instead of silently loading a random one."""
    folder, reference = write_form(tmp_path, "hf_masked_lm")
    out = tmp_path / "backbone"
    from ms_nlp_compress.models.convert_command import convert_checkpoint

    summary = convert_checkpoint(folder, out, architecture="NezhaModel", log=lambda line: None)
    assert summary["mapped"] == 37 and summary["skipped"] == ["MLM head (cls.predictions.*: 5 tensors)"]
    backbone, document = load_model_dir(out)
    assert document["add_pooler"] is False and not backbone.add_pooler
    lines = []
    load_pretrained(NezhaForSequenceClassification(pretrained_config(out), 2).bert, out, log=lines.append)
    assert "starts fresh (not in the checkpoint): pooler" in lines[0]


# ----------------------------------------------------------------------------------------------------------------
# The model directory: any registered architecture, integer tensors, atomic saves
# ----------------------------------------------------------------------------------------------------------------


class PackedClassifier(nn.Cell):
    """A stand-in for a compressed model registered by another module: a backbone plus a classifier stored as
    int8 codes with per-row float32 scales and a uint8 zero point, dequantised in construct."""

    def __init__(self, config, num_labels):
        super().__init__()
        self.num_labels = num_labels
        self.bert = NezhaModel(config)
        hidden = config.hidden_size
        self.codes = Parameter(Tensor(np.zeros((num_labels, hidden), np.int8)), name="codes", requires_grad=False)
        self.zero = Parameter(Tensor(np.zeros((num_labels, 1), np.uint8)), name="zero", requires_grad=False)
        self.scale = Parameter(Tensor(np.ones((num_labels, 1), np.float32)), name="scale")

    def construct(self, input_ids, attention_mask=None, token_type_ids=None):
        pooled = self.bert(input_ids, attention_mask, token_type_ids)[1]
        weight = (self.codes.astype(pooled.dtype) - self.zero.astype(pooled.dtype)) * self.scale  # (C, H)
        return ops.matmul(pooled, weight.T), (), ()


@pytest.fixture
def packed_architecture():
    entry = register_architecture(PackedClassifier,
                                  build=lambda config, document, **kw: PackedClassifier(config, document["labels"]),
                                  describe=lambda cell: {"labels": cell.num_labels})
    yield entry
    ckpt._ARCHITECTURES.pop(entry.name)


def test_registered_architecture_with_integer_tensors_round_trips(tmp_path, packed_architecture):
    from ms_nlp_compress.export.commands import load_model_for_export

    folder, reference = write_form(tmp_path, "backbone_only")
    config = pretrained_config(folder)
    model = PackedClassifier(config, 3)
    load_pretrained(model.bert, folder, log=None)
    rng = np.random.default_rng(3)
    codes = rng.integers(-127, 128, (3, 12)).astype(np.int8)
    zero = rng.integers(0, 4, (3, 1)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (3, 1)).astype(np.float32)
    ckpt.load_weights(model, dict(cell_weights(model), codes=codes, zero=zero, scale=scale))
    save_model_dir(model, tmp_path / "packed", config)
    stored = read_safetensors(tmp_path / "packed" / "model.safetensors")
    assert stored["codes"].dtype == np.int8 and stored["zero"].dtype == np.uint8
    loaded, document = load_model_dir(tmp_path / "packed")
    assert isinstance(loaded, PackedClassifier) and document["architecture"] == "PackedClassifier"
    loaded.set_train(False)
    ids, mask, types = inputs()
    logits = loaded(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    pooled = reference_forward(reference)[1]
    expected = pooled @ ((codes.astype(np.float64) - zero) * scale).T
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    exported, architecture = load_model_for_export(tmp_path / "packed")  # the export path rebuilds it too
    assert isinstance(exported, PackedClassifier) and architecture == "PackedClassifier"
    # integer codes are never cast from floats: a float file is refused, naming the tensor, and nothing is loaded
    stored["codes"] = codes.astype(np.float32)
    write_safetensors(stored, tmp_path / "packed" / "model.safetensors")
    with pytest.raises(CheckpointError, match="dtype mismatch: codes: checkpoint float32 vs model int8"):
        load_model_dir(tmp_path / "packed")


def test_unregistered_and_clashing_architectures_are_refused(tmp_path, packed_architecture):
    class Unknown(nn.Cell):
        def __init__(self):
            super().__init__()
            self.weight = Parameter(Tensor(np.zeros(2, np.float32)), name="weight")

    with pytest.raises(ConfigError, match="Unknown.*not a registered architecture.*register_architecture"):
        save_model_dir(Unknown(), tmp_path / "unknown", NezhaConfig(**SHAPE))
    with pytest.raises(ConfigError, match="'PackedClassifier' is already registered"):
        register_architecture(Unknown, name="PackedClassifier")


def _tiny_classifier(seed):
    from ms_nlp_compress.models.dropout import set_dropout_seed

    import mindspore as ms
    ms.set_seed(seed)
    set_dropout_seed(seed)
    return NezhaForSequenceClassification(NezhaConfig(**SHAPE, position_embedding="absolute"), 2)


def test_save_is_atomic_when_it_fails_between_weights_and_document(tmp_path, monkeypatch):
    config = NezhaConfig(**SHAPE, position_embedding="absolute")
    old, new = _tiny_classifier(1), _tiny_classifier(2)
    directory = tmp_path / "best"
    save_model_dir(old, directory, config, meta={"update": 1})

    def fail(path, document):
        assert (Path(path).parent / "model.safetensors").is_file()  # the new weights are already written
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "_write_document", fail)
        with pytest.raises(OSError, match="disk full"):
            save_model_dir(new, directory, config, meta={"update": 2})
    loaded, document = load_model_dir(directory)
    assert document["update"] == 1
    for name, value in cell_weights(old).items():
        np.testing.assert_array_equal(cell_weights(loaded)[name], value, err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no staging left behind
    # without an atomic exchange (not Linux) the two-rename fallback gives the same result
    monkeypatch.setattr(ckpt, "_exchange", lambda first, second: False)
    save_model_dir(new, directory, config, meta={"update": 2})
    loaded, document = load_model_dir(directory)
    assert document["update"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    np.testing.assert_array_equal(loaded.classifier.weight.asnumpy(), new.classifier.weight.asnumpy())


def test_save_is_atomic_under_kill_9_between_weights_and_document(tmp_path):
    """A process killed (SIGKILL, no cleanup) after writing the new weights and before the document: the
    directory is still the old, consistent model; the next save clears the dead process's staging directory."""
    config = NezhaConfig(**SHAPE, position_embedding="absolute")
    old = _tiny_classifier(1)
    directory = tmp_path / "best"
    save_model_dir(old, directory, config, meta={"update": 1})
    script = tmp_path / "killed_save.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from ms_nlp_compress.config import NezhaConfig
        from ms_nlp_compress.models import checkpoint
        from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

        config = NezhaConfig(**{SHAPE!r}, position_embedding="absolute")
        checkpoint._write_document = lambda path, document: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_model_dir(NezhaForSequenceClassification(config, 2), {str(directory)!r}, config,
                                  meta={{"update": 2}})
        """))
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".best.staging-")]
    assert len(staging) == 1 and (staging[0] / "model.safetensors").is_file()  # killed mid-save
    loaded, document = load_model_dir(directory)
    assert document["update"] == 1
    for name, value in cell_weights(old).items():
        np.testing.assert_array_equal(cell_weights(loaded)[name], value, err_msg=name)
    save_model_dir(old, directory, config, meta={"update": 3})
    assert not any(p.name.startswith(".best.staging-") for p in tmp_path.iterdir())


def test_resave_keeps_tokenizer_files(tmp_path):
    config = NezhaConfig(**SHAPE, position_embedding="absolute")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    save_model_dir(_tiny_classifier(1), tmp_path / "m", config, tokenizer_dir=tmp_path / "tok")
    save_model_dir(_tiny_classifier(2), tmp_path / "m", config)
    assert (tmp_path / "m" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text()) == {"do_lower_case": False}
