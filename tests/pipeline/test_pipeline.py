"""`msnc compress` end to end on the tiny distillation task (graph mode): teacher fine-tune -> TinyBERT (then
DynaBERT -> 2-bit QAT appended to the same run), every model measured (dev/test, bytes, MindIR reloaded, latency)
and reported; a rerun skips finished stages; a changed stage
config re-runs that stage only (the teacher is kept) and a changed teacher re-runs both; a kill -9 inside a stage
resumes to the uninterrupted run's weights; the report is rebuilt from the artifacts; config errors name the key."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms

HERE = Path(__file__).resolve().parent
for folder_name in ("distill", "dynabert", "quant"):
    sys.path.insert(0, str(HERE.parent / "compress" / folder_name))
import distill_tiny  # noqa: E402
import dynabert_cmd_tiny  # noqa: E402
import quant_tiny  # noqa: E402

from ms_nlp_compress.cli import main as msnc  # noqa: E402
from ms_nlp_compress.errors import ConfigError  # noqa: E402
from ms_nlp_compress.models.checkpoint import read_model_dir  # noqa: E402
from ms_nlp_compress.pipeline.commands import budget_overrides  # noqa: E402
from ms_nlp_compress.pipeline.report import build_report, choose_for_budget, pareto_front  # noqa: E402
from ms_nlp_compress.pipeline.runner import load_pipeline  # noqa: E402
from ms_nlp_compress.pipeline.runner import run_pipeline  # noqa: E402
from ms_nlp_compress.train.finetune import run_eval  # noqa: E402

QUIET = dict(log=lambda message: None)


TEACHER_STAGE = "teacher: {kind: finetune, config: teacher.yaml}"
# DynaBERT on the 1-layer student (depth 1.0 only), then 2-bit QAT of the extracted half-width sub-network
LATER_STAGES = """
  dynabert: {kind: dynabert, config: dynabert.yaml, options: {width: 0.5, depth: 1.0},
             set: ["dynabert.width_train.epochs=1", "dynabert.width_depth_train.epochs=1",
                   "dynabert.depth_multipliers=[1.0]"]}
  ternary: {kind: quantize, config: quant.yaml}"""


def pipeline_file(folder: Path, run: str, name: str = None, teacher: str = TEACHER_STAGE, later: str = "") -> Path:
    distill_tiny.teacher_config(folder)
    distill_tiny.task_config(folder, "student", init="teacher_layers")
    dynabert_cmd_tiny.dynabert_config(folder, "dynabert")
    quant_tiny.quant_config(folder, "quant")
    path = folder / f"{name or run}.yaml"
    path.write_text(f"""
name: tiny_compress
run_dir: {folder / run}
stages:
  {teacher}
  tinybert: {{kind: distill_task, config: student.yaml, set: ["distill.intermediate_train.epochs=2"]}}{later}
measure: {{batch_sizes: [1, 4], sequence_length: 12, repeat: 2}}
""")
    return path


def weights(model_dir):
    return read_model_dir(model_dir)[2]


def same_weights(first, second):
    return first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


first_models = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    distill_tiny.write_assets(folder)
    ms.set_context(mode=ms.GRAPH_MODE)
    config = pipeline_file(folder, "run")
    lines = []
    report = run_pipeline(config, log=lines.append)
    # the first run's models, before a later test re-runs stages of the same run folder
    first_models.update(teacher=weights(folder / "run" / "teacher" / "best"),
                        tinybert=weights(folder / "run" / "tinybert" / "best"))
    shutil.copytree(folder / "run" / "teacher" / "best", folder / "teacher_copy")  # for the kill -9 test
    yield folder, config, report, lines
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_end_to_end_measures_every_model_from_its_files(tiny):
    folder, _, report, lines = tiny
    run = folder / "run"
    assert [row["label"] for row in report["models"]] == ["teacher", "tinybert"]
    assert any(line.startswith("[1/2] teacher (finetune): running") for line in lines)
    assert any(line.startswith("[2/2] tinybert (distill_task): running") for line in lines)
    # each stage ran in its own child process (launch.process: child, the default)
    assert any("child process: `msnc finetune`" in line for line in lines)
    assert any("child process: `msnc distill task`" in line for line in lines)
    for row, model_dir in zip(report["models"], (run / "teacher" / "best", run / "tinybert" / "best")):
        assert Path(row["model_dir"]) == model_dir
        # the measurement equals `msnc eval` on the same files and the bytes on disk
        assert row["dev"] == run_eval(model_dir, "sst2", folder / "sst2" / "dev.tsv", batch_size=7)
        assert row["test"] == run_eval(model_dir, "sst2", folder / "sst2" / "test.tsv", batch_size=7)
        assert row["model_dir_bytes"] == sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
        assert Path(row["mindir"]["path"]).stat().st_size == row["mindir"]["bytes"]
        assert max(row["mindir"]["max_abs_difference"].values()) < 1e-4  # reloaded MindIR == the Cell
        assert set(row["latency_ms"]) == {"1", "4"} and all(v > 0 for v in row["latency_ms"].values())
    teacher, student = report["models"]
    assert teacher["dev"]["acc"] >= 0.9 and student["dev"]["acc"] >= 0.8
    assert student["parameters"] < teacher["parameters"] / 2 and student["size_ratio"] > 2
    assert student["accuracy_kept"] == pytest.approx(student["test"]["acc"] / teacher["test"]["acc"])
    markdown = (run / "report.md").read_text()
    assert "| tinybert | tinybert (distill_task) |" in markdown and (run / "pareto_size.png").stat().st_size > 0
    assert (run / "pareto_latency.png").is_file()
    # The student is the one distilled from this run's teacher.
    stage = json.loads((run / "tinybert" / "pipeline_stage.json").read_text())
    assert stage["input"] == str(run / "teacher" / "best")


def test_rerun_skips_finished_stages_and_measurements(tiny):
    folder, config, report, _ = tiny
    run = folder / "run"
    metrics_before = (run / "tinybert" / "stage2_prediction" / "metrics.jsonl").read_text()
    lines = []
    again = run_pipeline(config, log=lines.append)
    assert sum("skipped" in line for line in lines) == 2
    assert sum("measured before" in line for line in lines) == 2
    assert (run / "tinybert" / "stage2_prediction" / "metrics.jsonl").read_text() == metrics_before
    assert [row["dev"] for row in again["models"]] == [row["dev"] for row in report["models"]]


def test_a_moved_run_folder_is_still_recognised(tiny):
    # the input model is identified by its files, not by the path the pipeline wrote into the stage's config
    folder, config, report, _ = tiny
    moved = folder / "moved_run"
    shutil.copytree(folder / "run", moved)
    lines = []
    again = run_pipeline(config, [f"run_dir={moved}"], log=lines.append)
    assert sum("skipped" in line for line in lines) == 2, lines
    assert not (moved / "previous").exists()
    assert [row["dev"] for row in again["models"]] == [row["dev"] for row in report["models"]]


def test_later_stages_chain_onto_the_finished_ones(tiny):
    """DynaBERT and QAT appended to the same run: teacher and TinyBERT are skipped (same config and input), each
    new stage starts from the previous stage's model, and all four models are measured and reported."""
    folder, _, report, _ = tiny
    run = folder / "run"
    lines = []
    full = run_pipeline(pipeline_file(folder, "run", name="run_all", later=LATER_STAGES), log=lines.append)
    assert sum("skipped" in line for line in lines) == 2
    assert [row["label"] for row in full["models"]] == ["teacher", "tinybert", "dynabert", "ternary"]
    for stage, previous in (("dynabert", "tinybert/best"), ("ternary", "dynabert/chosen")):
        record = json.loads((run / stage / "pipeline_stage.json").read_text())
        assert record["input"] == str(run / previous), stage
    rows = {row["label"]: row for row in full["models"]}
    for label in ("dynabert", "ternary"):
        row = rows[label]
        assert row["dev"] == run_eval(Path(row["model_dir"]), "sst2", folder / "sst2" / "dev.tsv", batch_size=7)
        assert max(row["mindir"]["max_abs_difference"].values()) < 1e-3
    chosen = json.loads((run / "dynabert" / "pipeline_stage.json").read_text())["report"]["chosen"]
    assert chosen["width"] == 0.5 and chosen["depth"] == 1.0
    assert rows["dynabert"]["parameters"] < rows["tinybert"]["parameters"]
    from safetensors.numpy import load_file  # the quantized directory stores integer codes, not float weights

    stored = load_file(str(Path(rows["ternary"]["model_dir"]) / "model.safetensors"))
    assert any(array.dtype in (np.uint8, np.int8) for array in stored.values())
    assert rows["ternary"]["architecture"] != rows["dynabert"]["architecture"]
    assert "| ternary | ternary (quantize) |" in (run / "report.md").read_text()


def test_report_is_rebuilt_from_the_artifacts(tiny):
    folder, _, _, _ = tiny
    run = folder / "copy_for_report"
    shutil.copytree(folder / "run", run, ignore=shutil.ignore_patterns("*_mindir", "checkpoints"))
    record_path = run / "tinybert" / "measure" / "tinybert.json"
    record = json.loads(record_path.read_text())
    record["test"]["acc"] = 0.123
    record["latency_ms"]["4"] = record["latency_ms"]["4"] * 10
    record_path.write_text(json.dumps(record))
    assert msnc(["report", str(run)]) == 0
    rebuilt = json.loads((run / "report.json").read_text())
    student = rebuilt["models"][1]
    assert student["test_metric"] == 0.123 and "| 0.123 |" in (run / "report.md").read_text()
    teacher_ms = rebuilt["models"][0]["latency_ms"]["4"]
    assert student["speedup"]["4"] == pytest.approx(teacher_ms / record["latency_ms"]["4"])


def test_pareto_front_against_brute_force():
    rng = np.random.default_rng(0)
    points = [tuple(p) for p in rng.integers(0, 6, (12, 2)).astype(float)]
    expected = [i for i, (x, y) in enumerate(points)
                if not any(ox <= x and oy >= y and (ox, oy) != (x, y) for ox, oy in points)]
    assert pareto_front(points) == expected


def test_deploy_choice_under_a_latency_budget_is_read_from_the_artifacts(tiny):
    folder, _, _, _ = tiny
    run = folder / "copy_for_budget"
    shutil.copytree(folder / "run", run, ignore=shutil.ignore_patterns("*_mindir", "checkpoints"))

    def measured():  # independent reading of the measurements: label -> (dev accuracy, latency at batch 4, file)
        found = {}
        for path in run.glob("*/measure/*.json"):
            record = json.loads(path.read_text())
            found[record["label"]] = (record["dev"]["acc"], record["latency_ms"]["4"], path)
        return found

    def expected(budget):
        fits = {label: value for label, value in measured().items() if value[1] <= budget}
        return max(fits, key=lambda label: (fits[label][0], -fits[label][1])) if fits else None, set(fits)

    models = measured()
    teacher, student = models["teacher"], models["tinybert"]
    generous = 2 * max(teacher[1], student[1])
    assert msnc(["report", str(run), "--latency-ms", str(generous), "--batch-size", "4"]) == 0
    choice = json.loads((run / "report.json").read_text())["deploy_choice"]
    assert (choice["chosen"], set(choice["fits"])) == expected(generous)
    assert {"teacher", "tinybert"} <= set(choice["fits"])
    # edit the artifacts: the teacher becomes slower than the budget -> it drops out of the choice; the budget file
    # is kept with the run, so a plain `msnc report` rebuilds the choice from the edited files
    record = json.loads(teacher[2].read_text())
    record["latency_ms"]["4"] = 3 * generous
    teacher[2].write_text(json.dumps(record))
    assert msnc(["report", str(run)]) == 0
    rebuilt = json.loads((run / "report.json").read_text())["deploy_choice"]
    assert (rebuilt["chosen"], set(rebuilt["fits"])) == expected(generous)
    assert "teacher" not in rebuilt["fits"]
    assert f"Chosen: **{rebuilt['chosen']}**" in (run / "report.md").read_text()
    fastest = min(measured().items(), key=lambda item: item[1][1])
    assert msnc(["report", str(run), "--latency-ms", str(fastest[1][1] / 2), "--batch-size", "4"]) == 0
    none = json.loads((run / "report.json").read_text())["deploy_choice"]
    assert none["chosen"] is None and f"the fastest is {fastest[0]}" in none["reason"]
    assert msnc(["report", str(run), "--latency-ms", "5", "--batch-size", "7"]) == 2  # batch 7 was never timed


def test_choice_against_brute_force_and_budget_overrides(tiny):
    folder, config, _, _ = tiny
    rng = np.random.default_rng(1)
    rows = [{"label": f"m{i}", "dev_metric": float(rng.integers(0, 4)), "latency_ms": {"1": float(rng.integers(1, 9))},
             "model_dir_bytes": int(rng.integers(1, 5))} for i in range(20)]
    for budget in (0.5, 3, 5, 9):
        fits = [row for row in rows if row["latency_ms"]["1"] <= budget]
        best = sorted(fits, key=lambda r: (-r["dev_metric"], r["latency_ms"]["1"], r["model_dir_bytes"]))[:1]
        assert choose_for_budget(rows, budget, 1)["chosen"] == (best[0]["label"] if best else None)
    # `msnc compress --latency-ms 20 --batch-size 2`: DynaBERT stages select within the budget, batch 2 is timed
    later = pipeline_file(folder, "run_budget", later=LATER_STAGES)
    resolved = load_pipeline(later, budget_overrides(later, [], 20, 2))
    stage = {spec.name: spec for spec in resolved.specs()}["dynabert"]
    assert stage.options == {"latency_ms": 20.0, "batch_size": 2, "sequence_length": 12}
    assert resolved.measure.batch_sizes == [1, 2, 4]


def test_changed_stage_config_reruns_that_stage_and_later_ones_only(tiny):
    folder, config, _, _ = tiny
    run = folder / "run"
    teacher_before = weights(run / "teacher" / "best")
    student_before = weights(run / "tinybert" / "best")
    lines = []
    changed = ["stages.tinybert.set=[distill.intermediate_train.epochs=1]"]
    run_pipeline(config, changed, log=lines.append, measure=False)
    assert any(line.startswith("[1/2] teacher (finetune): done before") for line in lines)
    assert any(line.startswith("[2/2] tinybert (distill_task): running") for line in lines)
    assert same_weights(teacher_before, weights(run / "teacher" / "best"))
    assert not same_weights(student_before, weights(run / "tinybert" / "best"))
    moved = list((run / "previous").glob("tinybert.*"))
    assert len(moved) == 1 and same_weights(student_before, weights(moved[0] / "best"))  # nothing lost
    # A changed teacher changes the teacher's weights, so the student re-runs too.
    lines = []
    run_pipeline(config, changed + ["stages.teacher.set=[train.learning_rate=0.02]"], log=lines.append,
                 measure=False)
    assert any(line.startswith("[1/2] teacher (finetune): running") for line in lines)
    assert any(line.startswith("[2/2] tinybert (distill_task): running") for line in lines)


def test_kill_minus_nine_inside_a_stage_resumes_to_the_same_models(tiny):
    folder, _, report, _ = tiny
    config = pipeline_file(folder, "victim", teacher=f"teacher: {{kind: model, model: {folder / 'teacher_copy'}}}")
    command = [sys.executable, "-m", "ms_nlp_compress.cli", "compress", "--config", str(config), "--no-measure"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    victim = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = folder / "victim" / "tinybert" / "stage1_intermediate" / "checkpoints" / "LATEST"
    deadline = time.time() + 400
    while not pointer.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the pipeline finished before it could be killed"
    assert not (folder / "victim" / "tinybert" / "pipeline_stage.json").exists()
    resumed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[1/2] teacher (model)" in resumed.stdout
    assert "[2/2] tinybert (distill_task): resuming" in resumed.stdout
    stage1 = json.loads((folder / "victim" / "tinybert" / "stage1_intermediate" / "stage.json").read_text())
    assert stage1["resumed_from"]
    assert same_weights(first_models["tinybert"], weights(folder / "victim" / "tinybert" / "best"))


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  teacher: {kind: finetuned, config: x.yaml}\n")
    with pytest.raises(ConfigError, match=r"stages\.teacher\.kind: unknown stage kind 'finetuned'.*finetune"):
        run_pipeline(bad, **QUIET)
    bad.write_text("stages:\n  teacher: {kind: finetune, config: x.yaml, epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"stages\.teacher: unknown key\(s\) epochs"):
        run_pipeline(bad, **QUIET)
    bad.write_text("stages:\n  student: {kind: distill_task, config: x.yaml}\n")
    with pytest.raises(ConfigError, match="first enabled stage 'student' \\(distill_task\\) needs an input"):
        run_pipeline(bad, **QUIET)
    bad.write_text("stages:\n  teacher: {kind: finetune, config: missing.yaml}\n")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        run_pipeline(bad, **QUIET)
    bad.write_text("stages:\n  teacher: {kind: finetune, config: x.yaml}\n"
                   "  dynabert: {kind: dynabert, config: x.yaml, options: {widht: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"stages\.dynabert\.options: unknown key\(s\) widht for kind 'dynabert'"):
        run_pipeline(bad, **QUIET)
    bad.write_text("launch: {process: thread}\nstages:\n  teacher: {kind: finetune, config: x.yaml}\n")
    with pytest.raises(ConfigError, match=r"launch\.process: 'child' or 'same', got 'thread'"):
        run_pipeline(bad, **QUIET)
