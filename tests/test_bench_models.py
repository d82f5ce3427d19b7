"""`msnc bench --models` (bench/models.py) on tiny saved model directories: the cases run the saved models (their
logits equal the directory loaded separately), the FLOPs ratio equals a hand count, the distillation steps train the
student and projection and never the teacher, the JSON report is consistent, and bad input names the culprit.
Nothing here asserts on time."""
import json

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_nlp_compress import cli
from ms_nlp_compress.bench.models import (DISTILL_CASES, distill_cases, distill_cells, inference_cases,
                                          parse_models, run_model_benchmark)
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.checkpoint import load_model_dir, save_model_dir
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification, NezhaModel

VOCAB = 23


def _config(hidden, layers, inner, vocab=VOCAB):
    return NezhaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=2, intermediate_size=inner,
                       max_position_embeddings=32, position_embedding="absolute", hidden_dropout=0.1,
                       attention_dropout=0.1)


def _save_classifier(path, config, seed):
    ms.set_seed(seed)
    set_dropout_seed(seed)
    model = NezhaForSequenceClassification(config, num_labels=2)
    # a classifier scaled up (std 40) so the teacher's soft labels are far from uniform: the soft CE can then fall well
    # below its starting value (with near-uniform targets it starts at its floor, ln 2)
    rng = np.random.default_rng(seed)
    model.classifier.weight.set_data(Tensor(rng.normal(0.0, 40.0, (2, config.hidden_size)).astype(np.float32)))
    save_model_dir(model, path, config, meta={"task": "sst2"})
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A 2-layer 16-wide teacher and a 1-layer 8-wide student (2 heads each), saved as classifier directories."""
    ms.set_context(mode=ms.GRAPH_MODE)
    root = tmp_path_factory.mktemp("bench_models")
    teacher = _save_classifier(root / "teacher", _config(16, 2, 32), seed=0)
    student = _save_classifier(root / "student", _config(8, 1, 16), seed=1)
    yield [("teacher", teacher), ("student", student)]
    ms.set_context(mode=ms.PYNATIVE_MODE)


def hand_flops(hidden, layers, inner, seq):
    """2 x multiply-adds of Q, K, V, output (4 H^2 per token), Q K^T and P V (2 L H per token), FFN (2 H I)."""
    return layers * 2 * seq * (4 * hidden * hidden + 2 * seq * hidden + 2 * hidden * inner)


def test_inference_cases_run_the_saved_model(model_dirs):
    for _, path in model_dirs:
        model, _ = load_model_dir(path)
        cases = inference_cases(model, VOCAB, batch_sizes=(1, 3), seqs=(5,), seed=4)
        assert sorted(cases) == ["infer_b1_s5", "infer_b3_s5"]
        reference, _ = load_model_dir(path)  # a separate load of the same directory
        reference.set_train(False)
        for case in cases.values():
            ids = case.ids
            assert ids.min() >= 1 and ids.max() < VOCAB
            expected = reference(Tensor(ids), Tensor(np.ones_like(ids)), Tensor(np.zeros_like(ids)))[0].asnumpy()
            np.testing.assert_allclose(case(), expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(case(), expected, rtol=1e-5, atol=1e-6)  # eval mode: no dropout drift


def test_report_speedups_and_flops_ratio(model_dirs):
    result = run_model_benchmark(model_dirs, batch_sizes=(1, 8), seqs=(6,), repeat=2, threads=1)
    assert set(result["cases"]) == {"infer_b1_s6", "infer_b8_s6"}
    for case, by_model in result["cases"].items():
        calls = 10 if case == "infer_b1_s6" else 1  # small batches: 10 calls per round
        for name in ("teacher", "student"):
            assert by_model[name]["samples"] == 2 * calls
            assert by_model[name]["min_ms"] <= by_model[name]["median_ms"] <= by_model[name]["max_ms"]
        expected = round(by_model["teacher"]["median_ms"] / by_model["student"]["median_ms"], 2)
        assert result["speedup"][case] == {"teacher": 1.0, "student": expected}
    for seq in (6,):
        ratio = hand_flops(16, 2, 32, seq) / hand_flops(8, 1, 16, seq)
        assert result["flops_ratio"][str(seq)]["student"] == pytest.approx(ratio, abs=1e-3)
        assert result["models"]["student"][f"encoder_flops_seq{seq}"] == hand_flops(8, 1, 16, seq)
    assert result["models"]["teacher"]["parameters"] == hand_parameters(16, 2, 32)
    assert result["models"]["student"]["parameters"] == hand_parameters(8, 1, 16)


def hand_parameters(hidden, layers, inner, positions=32, types=2, labels=2):
    embeddings = (VOCAB + positions + types) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden + hidden * inner + inner + inner * hidden + hidden \
        + 2 * hidden
    return embeddings + layers * layer + hidden * hidden + hidden + hidden * labels + labels  # + pooler, classifier


def test_distillation_steps_train_the_student_never_the_teacher(model_dirs):
    built = distill_cells(model_dirs)
    teacher, _, cells = built
    assert set(cells) == set(DISTILL_CASES)
    teacher_names = {param.name for param in teacher.get_parameters()}
    for name in ("distill_intermediate_step", "distill_prediction_step"):
        _, weights, _ = cells[name]
        assert weights and not teacher_names & {param.name for param in weights}, name
    assert cells["distill_intermediate_step"][0].component_names == ("embedding", "hidden", "attention")
    assert cells["distill_prediction_step"][0].component_names == ("prediction",)
    teacher_before = {param.name: param.asnumpy().copy() for param in teacher.get_parameters()}
    student_before = {name: [param.asnumpy().copy() for param in cells[name][1]] for name in cells}

    cases = distill_cases(model_dirs, batch=4, seq=7, seed=0, built=built, learning_rate=1e-2)
    assert sorted(cases) == sorted(f"{name}_b4_s7" for name in DISTILL_CASES)
    # The soft cross-entropy's floor is the teacher's entropy on the batch (numpy, from the frozen teacher's logits):
    # the prediction step must close most of the gap to it; the other losses have floor 0.
    inputs = cases["distill_prediction_step_b4_s7"].inputs[:3]
    logits = teacher(*inputs)[0].asnumpy().astype(np.float64)  # (4, 2)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    floors = {name: 0.0 for name in DISTILL_CASES}
    floors["distill_prediction_step"] = float(-(probabilities * np.log(probabilities)).sum(-1).mean())
    for name in DISTILL_CASES:  # the same batch again and again: every step's loss must fall towards its floor
        results = [cases[f"{name}_b4_s7"]() for _ in range(10)]
        assert all(np.isfinite(r.loss) and r.applied for r in results), name
        gap = [r.loss - floors[name] for r in results]
        assert min(gap) > -1e-4, (name, gap)  # never below the floor
        assert gap[-1] < 0.9 * gap[0], (name, gap)
        assert any(not np.array_equal(param.asnumpy(), old)
                   for param, old in zip(cells[name][1], student_before[name])), name
    # 20 distillation updates later the frozen teacher is bit-identical
    for param in teacher.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), teacher_before[param.name], err_msg=param.name)


def test_bench_command_json_and_errors(model_dirs, tmp_path, capsys):
    teacher, student = (str(path) for _, path in model_dirs)
    status = cli.main(["bench", "--models", f"teacher={teacher},student={student}", "--batch-sizes", "2",
                       "--seqs", "4", "--repeat", "1", "--threads", "1", "--output", "json",
                       "--save", str(tmp_path / "bench.json")])
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "bench.json").read_text())
    assert list(printed["cases"]) == ["infer_b2_s4"] and printed["models"]["student"]["dir"] == student

    wide_vocab = _save_classifier(tmp_path / "other_vocab", _config(8, 1, 16, vocab=VOCAB + 1), seed=2)
    with pytest.raises(ConfigError, match=r"vocab_size 24 of other \(.*other_vocab\) differs from 23 of teacher"):
        run_model_benchmark([("teacher", model_dirs[0][1]), ("other", wide_vocab)], (1,), (4,), repeat=1)
    with pytest.raises(ConfigError, match=r"--models nothere: .*missing is not a model directory"):
        run_model_benchmark([("nothere", tmp_path / "missing")], (1,), (4,), repeat=1)
    with pytest.raises(ConfigError, match="needs exactly two --models"):
        distill_cells(model_dirs[:1])
    ms.set_seed(0)
    backbone_dir = tmp_path / "backbone"
    save_model_dir(NezhaModel(_config(8, 1, 16)), backbone_dir, _config(8, 1, 16))
    with pytest.raises(ConfigError, match=r"student backbone .* holds a NezhaModel"):
        distill_cells([model_dirs[0], ("backbone", backbone_dir)])
    with pytest.raises(ConfigError, match="distinct NAME=DIR"):
        parse_models("a=x,a=y")
    assert cli.main(["bench", "--models", f"t={teacher}", "--seqs", "4", "--train-batch", "0", "--distill"]) == 2
    assert "--train-batch: must be positive" in capsys.readouterr().err
