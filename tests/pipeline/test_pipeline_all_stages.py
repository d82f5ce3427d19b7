"""`msnc compress` through every stage kind on the tiny task: teacher fine-tune -> TinyBERT -> DynaBERT on the
student (one sub-network extracted) -> 2-bit QAT of that sub-network. Each stage's model is the next one's input,
and each measured model equals `msnc eval` on its own files; the chosen sub-network and the quantized model are
physically smaller than what they came from."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "compress" / "distill"))
sys.path.insert(0, str(HERE.parent / "compress" / "dynabert"))
sys.path.insert(0, str(HERE.parent / "compress" / "quant"))
import distill_tiny  # noqa: E402
import dynabert_cmd_tiny  # noqa: E402
import quant_tiny  # noqa: E402

from ms_nlp_compress.errors import ConfigError  # noqa: E402
from ms_nlp_compress.pipeline.runner import run_pipeline  # noqa: E402
from ms_nlp_compress.train.finetune import run_eval  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline_all")
    distill_tiny.write_assets(folder)
    distill_tiny.teacher_config(folder)
    distill_tiny.task_config(folder, "student", init="teacher_layers")
    dynabert_cmd_tiny.dynabert_config(folder, "dynabert")
    quant_tiny.quant_config(folder, "quant")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield folder
    ms.set_context(mode=ms.PYNATIVE_MODE)


def write_pipeline(folder: Path) -> Path:
    path = folder / "all.yaml"
    path.write_text(f"""
name: tiny_all
run_dir: {folder / 'run'}
stages:
  teacher: {{kind: finetune, config: teacher.yaml}}
  tinybert: {{kind: distill_task, config: student.yaml,
             set: ["distill.intermediate_train.epochs=1", "distill.prediction_train.epochs=2"]}}
  dynabert: {{kind: dynabert, config: dynabert.yaml, options: {{width: 0.5, depth: 1.0}},
             set: ["dynabert.width_train.epochs=1", "dynabert.width_depth_train.epochs=1",
                   "dynabert.depth_multipliers=[1.0]"]}}  # the student has 1 layer
  ternary: {{kind: quantize, config: quant.yaml}}
measure: {{batch_sizes: [1, 4], sequence_length: 12, repeat: 1}}
""")
    return path


def test_every_stage_kind_chained_and_measured(folder):
    lines = []
    report = run_pipeline(write_pipeline(folder), log=lines.append)
    run = folder / "run"
    labels = [row["label"] for row in report["models"]]
    assert labels == ["teacher", "tinybert", "dynabert", "ternary"]
    # each stage started from the previous stage's model
    for stage, previous in (("tinybert", "teacher/best"), ("dynabert", "tinybert/best"),
                            ("ternary", "dynabert/chosen")):
        record = json.loads((run / stage / "pipeline_stage.json").read_text())
        assert record["input"] == str(run / previous), stage
    rows = {row["label"]: row for row in report["models"]}
    for row in rows.values():
        assert row["dev"] == run_eval(Path(row["model_dir"]), "sst2", folder / "sst2" / "dev.tsv", batch_size=7)
        assert max(row["mindir"]["max_abs_difference"].values()) < 1e-3
    chosen = json.loads((run / "dynabert" / "pipeline_stage.json").read_text())["report"]["chosen"]
    assert chosen["width"] == 0.5 and chosen["depth"] == 1.0
    assert rows["dynabert"]["parameters"] < rows["tinybert"]["parameters"]
    # the quantized model directory stores integer codes, not float weights
    from safetensors.numpy import load_file

    stored = load_file(str(Path(rows["ternary"]["model_dir"]) / "model.safetensors"))
    assert any(array.dtype in (np.uint8, np.int8) for array in stored.values())
    assert rows["ternary"]["architecture"] != rows["dynabert"]["architecture"]
    assert (run / "report.md").read_text().count("\n| ") >= 5


def test_dynabert_stage_options_are_checked(folder):
    bad = folder / "bad.yaml"
    bad.write_text(f"""
run_dir: {folder / 'bad_run'}
stages:
  teacher: {{kind: finetune, config: teacher.yaml}}
  dynabert: {{kind: dynabert, config: dynabert.yaml, options: {{widht: 0.5}}}}
""")
    with pytest.raises(ConfigError, match=r"stages\.dynabert\.options: unknown key\(s\) widht for kind 'dynabert'"):
        run_pipeline(bad, log=lambda message: None)
