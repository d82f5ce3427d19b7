"""`msnc compress` with a `pretrain` stage (train/pipeline_stage.py) on the tiny distillation task's corpus and
labels (tests/compress/distill/distill_tiny.py), graph mode: masked-LM pre-training of a tiny NEZHA -> fine-tuning
from its backbone. The fine-tuned classifier's encoder starts from the weights in the pre-trained backbone's file;
the backbone is passed on but not measured (the report's models table holds only the classifier, measured on the
fine-tuning stage's splits); a rerun skips both stages; a changed pre-training config re-runs pre-training and,
since the backbone's files change, the fine-tuning after it."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "compress" / "distill"))
import distill_tiny  # noqa: E402

from ms_nlp_compress.models.checkpoint import read_model_dir  # noqa: E402
from ms_nlp_compress.pipeline.measure import model_fingerprint  # noqa: E402
from ms_nlp_compress.pipeline.runner import run_pipeline  # noqa: E402
from ms_nlp_compress.train import finetune  # noqa: E402
from ms_nlp_compress.train.finetune import run_eval  # noqa: E402


def write_configs(folder: Path) -> Path:
    """The pipeline file and its two stage configs: a 2 x 16 NEZHA pre-trained on the task's 120-sentence corpus
    (its vocabulary built from the corpus, not the config's 500 tokens) by `msnc pretrain` in a child process (the
    default launch), then fine-tuned on the task's labels with no model keys of its own, in this process (so the
    test sees the classifier's initial weights)."""
    (folder / "pretrain.yaml").write_text(f"""
output_dir: {folder / 'pretrain_alone'}
{distill_tiny.RUNTIME}
model: {{vocab_size: 500, hidden_size: 16, num_layers: 2, num_heads: 2, intermediate_size: 32, hidden_act: gelu_tanh,
        position_embedding: relative, max_relative_position: 8, hidden_dropout: 0.0, attention_dropout: 0.0}}
data: {{max_length: 12, batch_size: 8, eval_batch_size: 8}}
train: {{learning_rate: 0.005, warmup_ratio: 0.0, schedule: constant, max_steps: 12, log_every: 4, eval_every: 6,
        save_every: 6}}
pretrain: {{corpus: {folder / 'corpus.txt'}, segmented: true, eval_sequences: 8, max_predictions: 3,
           vocab_min_frequency: 1}}
""")
    (folder / "finetune.yaml").write_text(f"""
output_dir: {folder / 'finetune_alone'}
{distill_tiny.RUNTIME}
pretrained: {folder / 'pretrain_alone' / 'pretrained'}
data: {{task: sst2, data_dir: {folder / 'sst2'}, max_length: 12, batch_size: 8, eval_batch_size: 7}}
train: {{learning_rate: 0.01, epochs: 2, warmup_ratio: 0.1, eval_every: 0, log_every: 4}}
""")
    path = folder / "pipeline.yaml"
    path.write_text(f"""
name: tiny_pretrain_pipeline
run_dir: {folder / 'run'}
stages:
  pretrain: {{kind: pretrain, config: pretrain.yaml}}
  teacher: {{kind: finetune, config: finetune.yaml, launch: {{process: same}}}}
measure: {{batch_sizes: [1], sequence_length: 12, repeat: 1, export: false}}
""")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline_pretrain")
    distill_tiny.write_assets(folder)
    ms.set_context(mode=ms.GRAPH_MODE)
    initial = []  # the classifier's weights right after build_classifier loaded `pretrained`, before any update
    original = finetune.build_classifier

    def recording_build_classifier(config, num_labels):
        model, model_config, pretrained = original(config, num_labels)
        initial.append((config.pretrained, {name: param.asnumpy().copy()
                                            for name, param in model.parameters_and_names()}))
        return model, model_config, pretrained

    finetune.build_classifier = recording_build_classifier
    try:
        config = write_configs(folder)
        lines = []
        report = run_pipeline(config, log=lines.append)
        yield folder, config, report, lines, initial
    finally:
        finetune.build_classifier = original
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_finetune_starts_from_the_pretrained_backbone_file(tiny):
    folder, _, _, lines, initial = tiny
    run = folder / "run"
    backbone_dir = run / "pretrain" / "pretrained"
    assert any(line.startswith("[1/2] pretrain (pretrain): running") for line in lines)
    assert any("child process: `msnc pretrain`" in line for line in lines)
    record = json.loads((run / "teacher" / "pipeline_stage.json").read_text())
    assert record["input"] == str(backbone_dir) and record["input_fingerprint"] == model_fingerprint(backbone_dir)
    assert len(initial) == 1 and initial[0][0] == str(backbone_dir)  # the key the pipeline set
    start = initial[0][1]
    _, saved_config, saved = read_model_dir(backbone_dir)
    # the saved backbone is the pre-training run's, vocabulary built from the corpus (not the config's 500)
    assert saved_config.vocab_size == len((backbone_dir / "vocab.txt").read_text().splitlines()) < 500
    assert saved_config.position_embedding == "relative"
    compared = [name for name in saved if not name.endswith("rng_counter")]
    assert any(name.startswith("encoder.layers.1.") for name in compared) and "pooler.dense.weight" in compared
    for name in compared:  # every tensor of the file is the classifier's encoder tensor, exactly
        np.testing.assert_array_equal(start[f"bert.{name}"], saved[name], err_msg=name)
    assert {name for name in start if not name.startswith("bert.")} >= {"classifier.weight", "classifier.bias"}
    # and fine-tuning moved it: the kept classifier is no longer the pre-trained encoder
    _, _, tuned = read_model_dir(run / "teacher" / "best")
    assert not np.array_equal(tuned["bert.encoder.layers.0.attention.self_attention.query.weight"],
                              saved["encoder.layers.0.attention.self_attention.query.weight"])


def test_pretrained_backbone_is_not_measured_or_reported(tiny):
    folder, _, report, _, _ = tiny
    run = folder / "run"
    assert [row["label"] for row in report["models"]] == ["teacher"]
    assert not (run / "pretrain" / "measure").exists()
    teacher = report["models"][0]
    # measured on the fine-tuning stage's splits (not the pre-training config's), as `msnc eval` measures them
    assert teacher["dev"] == run_eval(run / "teacher" / "best", "sst2", folder / "sst2" / "dev.tsv", batch_size=7)
    assert teacher["test"] == run_eval(run / "teacher" / "best", "sst2", folder / "sst2" / "test.tsv", batch_size=7)
    assert [(stage["name"], stage["status"]) for stage in report["stages"]] == [("pretrain", "done"),
                                                                                ("teacher", "done")]
    markdown = (run / "report.md").read_text()
    models_table = markdown.split("## Models")[1].split("## Stages")[0]
    assert "| teacher | teacher (finetune) |" in models_table and "pretrain" not in models_table
    assert "| pretrain | pretrain | done |" in markdown


def test_rerun_skips_both_stages(tiny):
    folder, config, report, _, initial = tiny
    run = folder / "run"
    curve = (run / "pretrain" / "metrics.jsonl").read_text()
    fingerprint = model_fingerprint(run / "pretrain" / "pretrained")
    lines = []
    again = run_pipeline(config, log=lines.append)
    assert [line.split(":")[0] for line in lines if line.endswith("skipped")] == ["[1/2] pretrain (pretrain)",
                                                                                 "[2/2] teacher (finetune)"]
    assert len(initial) == 1  # no classifier was built again
    assert (run / "pretrain" / "metrics.jsonl").read_text() == curve
    assert model_fingerprint(run / "pretrain" / "pretrained") == fingerprint
    assert again["models"][0]["dev"] == report["models"][0]["dev"]


def test_changed_pretrain_config_reruns_pretrain_and_finetune(tiny):
    folder, config, _, _, initial = tiny
    run = folder / "run"
    old_backbone = read_model_dir(run / "pretrain" / "pretrained")[2]
    old_fingerprint = model_fingerprint(run / "pretrain" / "pretrained")
    lines = []
    changed = run_pipeline(config, ["stages.pretrain.set=[train.learning_rate=0.002]"], log=lines.append)
    assert any(line.startswith("[1/2] pretrain (pretrain): running") for line in lines)
    assert any(line.startswith("[2/2] teacher (finetune): running") for line in lines)
    assert not any(line.endswith("skipped") for line in lines)
    moved = sorted(path.name.split(".")[0] for path in (run / "previous").iterdir())
    assert moved == ["pretrain", "teacher"]  # both earlier folders kept aside, not deleted
    new_backbone = read_model_dir(run / "pretrain" / "pretrained")[2]
    assert not np.array_equal(new_backbone["encoder.layers.0.attention.self_attention.query.weight"],
                              old_backbone["encoder.layers.0.attention.self_attention.query.weight"])
    record = json.loads((run / "teacher" / "pipeline_stage.json").read_text())
    assert record["input_fingerprint"] == model_fingerprint(run / "pretrain" / "pretrained") != old_fingerprint
    assert len(initial) == 2  # the new classifier starts from the new backbone file
    for name, value in new_backbone.items():
        if not name.endswith("rng_counter"):
            np.testing.assert_array_equal(initial[1][1][f"bert.{name}"], value, err_msg=name)
    assert [row["label"] for row in changed["models"]] == ["teacher"]
