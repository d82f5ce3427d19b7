"""`msnc distill general` and `msnc distill task` end to end on a tiny task (graph mode): the distillation losses
fall, the student learns the task, the saved students load and compute what the trained cells computed, a kill -9
during stage 1 resumes to bit-identical students, a finished stage is skipped, and config errors name the key."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

import distill_tiny
from ms_nlp_compress.cli import main as msnc
from ms_nlp_compress.compress.distill.config import DistillConfig
from ms_nlp_compress.compress.distill.run import encoder_flops, run_general, run_task
from ms_nlp_compress.compress.distill.student import build_student
from ms_nlp_compress.config import NezhaConfig, load_config
from ms_nlp_compress.data.glue import get_task
from ms_nlp_compress.data.tokenization import load_tokenizer
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models import checkpoint
from ms_nlp_compress.models.checkpoint import load_model_dir, read_model_dir, read_safetensors
from ms_nlp_compress.models.nezha import NezhaModel
from ms_nlp_compress.train.finetune import encode, predict_logits, run_eval

WORKER = Path(__file__).resolve().parent / "distill_worker.py"
ROOT = Path(__file__).resolve().parents[3]
QUIET = dict(log=lambda message: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The assets and a fine-tuned teacher (dev accuracy >= 0.9), shared by the tests of this module."""
    with distill_tiny.teacher_in_graph_mode(tmp_path_factory.mktemp("distill")) as folder:
        yield folder


def dev_columns(folder):
    tokenizer = load_tokenizer(folder / "vocab.txt", max_length=12)
    examples = get_task("sst2").reader(folder / "sst2" / "dev.tsv")
    return encode(examples, tokenizer, 12, False)


def train_records(path):
    return [record for record in map(json.loads, path.read_text().splitlines()) if record["type"] == "train"]


def weights_of(model_dir):
    return read_model_dir(model_dir)[2]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_task_distillation_end_to_end_then_kill_minus_nine_resumes_exactly(tiny, monkeypatch):
    columns = dev_columns(tiny)
    # Every student the command saves: the logits its trained cell gives on dev at the moment of saving.
    at_save = {}
    real_save = checkpoint.save_model_dir

    def recording_save(cell, directory, config, meta=None, tokenizer_dir=None):
        training = cell.training
        at_save[Path(directory)] = predict_logits(cell, columns, 7)
        cell.set_train(training)
        return real_save(cell, directory, config, meta=meta, tokenizer_dir=tokenizer_dir)

    monkeypatch.setattr(checkpoint, "save_model_dir", recording_save)
    config_path = distill_tiny.task_config(tiny, "reference", init="scratch")
    report = run_task(load_config(config_path), **QUIET)
    out = tiny / "reference"
    stage1, stage2 = report["stages"]["intermediate"], report["stages"]["prediction"]
    assert stage1["updates"] == 36 and stage2["updates"] == 36  # 3 epochs of 12 batches each
    assert stage1["terms"] == ["embedding", "hidden", "attention"] and stage2["terms"] == ["prediction"]

    # The distillation losses fall: the first 4 updates' mean against the last 4's, each term of stage 1 too.
    intermediate = train_records(out / "stage1_intermediate" / "metrics.jsonl")
    first, last = intermediate[0], intermediate[-1]
    for key in ("loss", "loss_embedding", "loss_attention"):
        assert last[key] < 0.7 * first[key], (key, first[key], last[key])
    predictions = train_records(out / "stage2_prediction" / "metrics.jsonl")
    assert predictions[-1]["loss_prediction"] < predictions[0]["loss_prediction"]
    # From a random start (chance 0.5) the student learns the task from the teacher's soft labels alone.
    assert report["dev"]["acc"] >= 0.9 and report["test"]["acc"] >= 0.9
    assert report["student"]["encoder_flops_seq128"] < report["teacher_model"]["encoder_flops_seq128"] / 4

    # The saved students load as ordinary model directories and compute what the trained cells computed.
    best = out / "best"
    for directory in (best, out / "stage1_intermediate" / "student"):
        loaded, document = load_model_dir(directory)
        assert document["architecture"] == "NezhaForSequenceClassification" and document["task"] == "sst2"
        np.testing.assert_allclose(predict_logits(loaded, columns, 7), at_save[directory], rtol=1e-6, atol=1e-6)
    assert run_eval(best, "sst2", tiny / "sst2" / "test.tsv", batch_size=7) == report["test"]  # `msnc eval`

    # A rerun finds both stages finished and skips them; the student is unchanged.
    before = weights_of(best)
    again = run_task(load_config(config_path), **QUIET)
    assert again["stages"]["intermediate"]["skipped"] and again["stages"]["prediction"]["skipped"]
    assert_same_weights(before, weights_of(best))
    assert again["test"] == report["test"]

    # kill -9 during stage 1 in another process, run again: the same stage-1 student and the same best student.
    victim_config = tiny / "victim.yaml"
    victim_config.write_text(config_path.read_text().replace(str(out), str(tiny / "victim")))
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    victim = subprocess.Popen([sys.executable, str(WORKER), str(victim_config)], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tiny / "victim" / "stage1_intermediate" / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while not pointer.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    assert not (tiny / "victim" / "stage1_intermediate" / "stage.json").exists()  # killed inside stage 1
    resumed = subprocess.run([sys.executable, str(WORKER), str(victim_config)], env=environment,
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stage1_again = json.loads((tiny / "victim" / "stage1_intermediate" / "stage.json").read_text())
    assert stage1_again["resumed_from"] and stage1_again["updates"] == 36
    assert_same_weights(weights_of(out / "stage1_intermediate" / "student"),
                        weights_of(tiny / "victim" / "stage1_intermediate" / "student"))
    assert_same_weights(weights_of(best), weights_of(tiny / "victim" / "best"))
    results = json.loads((tiny / "victim" / "results.json").read_text())
    assert results["dev"] == report["dev"] and results["test"] == report["test"]


def test_general_distillation_then_a_task_student_starts_from_it(tiny):
    report = run_general(load_config(distill_tiny.general_config(
        tiny, "general", "  student_init: teacher_layers\n  student_init_layers: [2]")), **QUIET)
    out = tiny / "general"
    assert report["updates"] == 45  # 120 sentences / batch 8 = 15 batches, 3 epochs
    records = train_records(out / "metrics.jsonl")
    assert [record["update"] for record in records] == list(range(3, 46, 3))
    first = np.mean([record["loss"] for record in records[:3]])
    last = np.mean([record["loss"] for record in records[-3:]])
    assert last < 0.7 * first, (first, last)
    assert (out / "shards").is_dir()  # data.stream: disk read the corpus through tokenized shards

    # The saved student equals the student in the trainer's last checkpoint: same forward on a batch.
    student, document = load_model_dir(out / "student")
    assert document["architecture"] == "NezhaModel" and not document["add_pooler"]
    config = read_model_dir(out / "student")[1]
    from_checkpoint = NezhaModel(config, add_pooler=False)
    saved = read_safetensors(out / "checkpoints" / "step-0000045" / "model.safetensors")
    prefix = "0.backbone."  # the student is the first checkpointed cell, its projection the second
    checkpoint.load_weights(from_checkpoint, {name[len(prefix):]: value for name, value in saved.items()
                                              if name.startswith(prefix) and not name.endswith("rng_counter")},
                            fresh=())
    columns = dev_columns(tiny)
    inputs = [Tensor(columns[name][:7]) for name in ("input_ids", "attention_mask", "token_type_ids")]
    for cell in (student, from_checkpoint):
        cell.set_train(False)
    np.testing.assert_allclose(student(*inputs)[0].asnumpy(), from_checkpoint(*inputs)[0].asnumpy(),
                               rtol=1e-6, atol=1e-6)

    # `student_init: pretrained` takes that backbone for a task student; its pooler and head start fresh.
    teacher_config = read_model_dir(tiny / "teacher" / "best")[1]
    distill = DistillConfig(student=None, student_init="pretrained", student_init_path=str(out / "student"))
    task_student, _ = build_student(distill, teacher_config, num_labels=2)
    backbone = {name[len("bert."):]: param.asnumpy() for name, param in task_student.parameters_and_names()
                if name.startswith("bert.") and not name.startswith("bert.pooler.") and
                not name.endswith("rng_counter")}
    assert_same_weights(weights_of(out / "student"), backbone)


def test_general_distillation_on_two_ranks_equals_one_process(tiny):
    """`scripts/run_distributed.sh 2 distill general` (msrun, per-rank batch 4) against one process with batch 8:
    the same global batches, so the same student up to the all-reduce's float rounding (student dropout off: each
    rank draws its own masks by design)."""
    no_dropout = ["--set", "distill.student_model.hidden_dropout=0.0", "--set", "train.epochs=1"]
    config = distill_tiny.general_config(tiny, "general_one")
    run_general(load_config(config, no_dropout[1::2]), **QUIET)
    config = distill_tiny.general_config(tiny, "general_two")
    with socket.socket() as probe:  # a free port for msrun's master
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MSNC_PYTHON=sys.executable,
               LOG_DIR=str(tiny / "msrun_logs"), MASTER_PORT=str(port), CLUSTER_TIMEOUT="120")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "run_distributed.sh"), "2", "distill", "general",
                             "--config", str(config), "--set", "data.batch_size=4", *no_dropout],
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tiny / "general_two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["updates"] == 15
    one, two = weights_of(tiny / "general_one" / "student"), weights_of(tiny / "general_two" / "student")
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_config_errors_name_the_key(tiny, capsys):
    general = distill_tiny.general_config(tiny, "bad_general")
    with pytest.raises(ConfigError, match=r"distill\.corpus: general distillation needs"):
        run_general(load_config(general, ["distill.corpus=null"]), **QUIET)
    with pytest.raises(ConfigError, match=r"distill\.corpus: .*absent\.txt is not a file"):
        run_general(load_config(general, [f"distill.corpus={tiny / 'absent.txt'}"]), **QUIET)
    task = distill_tiny.task_config(tiny, "bad_task")
    with pytest.raises(ConfigError, match=r"distill\.teacher: teacher .*nowhere does not exist"):
        run_task(load_config(task, [f"distill.teacher={tiny / 'nowhere'}"]), **QUIET)
    with pytest.raises(ConfigError, match=r"distill\.augmented_train: .*absent\.tsv is not a file"):
        run_task(load_config(task, [f"distill.augmented_train={tiny / 'absent.tsv'}"]), **QUIET)
    with pytest.raises(ConfigError, match=r"distill\.teacher: .* has 2 outputs but data\.task stsb has 1"):
        run_task(load_config(task, ["data.task=stsb"]), **QUIET)
    student_model = distill_tiny.STUDENT_MODEL.replace("num_heads: 2", "num_heads: 4")
    with pytest.raises(ConfigError, match=r"distill\.attention_weight: student layer 1 has 4 heads but the teacher "
                                          r"layer it maps to \(2\) has 2"):
        run_task(load_config(task, [f"distill.student_model={student_model}"]), **QUIET)
    # a bare backbone is not a task teacher (the general student, written by the test above, is one)
    checkpoint.save_model_dir(NezhaModel(NezhaConfig(vocab_size=17, hidden_size=8, num_layers=1, num_heads=2,
                                                     intermediate_size=16)), tiny / "backbone",
                              NezhaConfig(vocab_size=17, hidden_size=8, num_layers=1, num_heads=2,
                                          intermediate_size=16))
    with pytest.raises(ConfigError, match=r"distill\.teacher: .*backbone holds a NezhaModel, not a fine-tuned"):
        run_task(load_config(task, [f"distill.teacher={tiny / 'backbone'}"]), **QUIET)
    # through the command line: a mistyped stage override names its key, the exit status is 2
    assert msnc(["distill", "task", "--config", str(task), "--set", "distill.intermediate_train={epoch: 2}"]) == 2
    assert "unknown key(s) distill.intermediate_train.epoch" in capsys.readouterr().err
    assert msnc(["distill", "task", "--config", str(task), "--set", "distill.stages=[prediction, intermediate]"]) == 2
    assert "distill.stages: stage 1 (intermediate) runs before stage 2" in capsys.readouterr().err


def test_encoder_flops_match_the_tinybert_paper():
    """Jiao et al. (2020) Table 1: BERT-base 22.5 GFLOPs, TinyBERT4 1.2 GFLOPs (sequence 128)."""
    bert_base = NezhaConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    tinybert4 = NezhaConfig(hidden_size=312, num_layers=4, num_heads=12, intermediate_size=1200)
    assert abs(encoder_flops(bert_base, 128) / 22.5e9 - 1) < 0.01
    assert 1.15e9 <= encoder_flops(tinybert4, 128) < 1.25e9  # "1.2" to the paper's one decimal


def test_stage_one_alone_reads_the_augmented_set(tiny):
    """distill.augmented_train replaces the training split in the stages listed by augmented_stages; with
    stages: [intermediate] the stage-1 student is the result."""
    config = distill_tiny.task_config(tiny, "augmented", "  augmented_train: " + str(tiny / "train_aug.tsv") +
                                      "\n  stages: [intermediate]")
    report = run_task(load_config(config, ["distill.intermediate_train={epochs: 1}"]), **QUIET)
    assert list(report["stages"]) == ["intermediate"]
    assert report["stages"]["intermediate"]["data"] == str(tiny / "train_aug.tsv")
    assert report["stages"]["intermediate"]["updates"] == 20  # 160 augmented rows / batch 8, one epoch
    assert report["student_dir"] == str(tiny / "augmented" / "stage1_intermediate" / "student")
    assert not (tiny / "augmented" / "stage2_prediction").exists()


def test_distilled_student_predicts_and_exports_like_the_saved_model(tiny, tmp_path, capsys):
    """The best student of `msnc distill task` through `msnc predict` and `msnc export`: predict's labels and
    probabilities are the softmax of the model's logits, and the exported MindIR, reloaded here with ms.load +
    GraphCell, gives the logits of the model directory."""
    config = load_config(distill_tiny.task_config(tiny, "deploy"),
                         ["distill.intermediate_train.epochs=1", "distill.prediction_train.epochs=1"])
    run_task(config, **QUIET)
    best = tiny / "deploy" / "best"
    model, _ = load_model_dir(best)
    dev = dev_columns(tiny)
    logits = predict_logits(model, dev, 7)  # (30, 2)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)

    texts = [line.split("\t")[0] for line in (tiny / "sst2" / "dev.tsv").read_text().splitlines()[1:]]
    (tmp_path / "dev.txt").write_text("\n".join(texts) + "\n")
    assert msnc(["predict", "--model", str(best), "--input", str(tmp_path / "dev.txt"), "--batch-size", "4"]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(texts) == len(logits)
    labels = get_task("sst2").labels
    assert [label for label, _ in printed] == [labels[i] for i in logits.argmax(-1)]
    np.testing.assert_allclose([float(p) for _, p in printed], probabilities.max(-1), atol=2e-6)

    stem = tmp_path / "export" / "student"
    assert msnc(["export", "--model", str(best), "--output", str(stem)]) == 0
    assert "(classifier;" in capsys.readouterr().out
    graph = ms.nn.GraphCell(ms.load(str(stem) + ".mindir"))
    exported = graph(*(Tensor(dev[name]) for name in ("input_ids", "attention_mask", "token_type_ids")))
    exported = exported[0] if isinstance(exported, (tuple, list)) else exported
    np.testing.assert_allclose(exported.asnumpy(), logits, rtol=1e-5, atol=1e-5)
