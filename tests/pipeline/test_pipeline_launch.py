"""Data-parallel stages in `msnc compress` (graph mode, CPU): a TinyBERT stage with `launch: {workers: 2}` runs
`msnc distill task` under msrun while the pipeline stays one process; its student equals one process on the same
global batch (2 ranks x 4 = 1 x 8); a rerun skips it without starting msrun; a rank killed mid-stage fails the
pipeline with an error naming the stage and its msrun logs, and the same command then resumes it to the
uninterrupted run's student; a time-out stops msrun and its ranks; `launch:` errors name the key; the number of
ranks is part of a stage's identity, the port is not."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms

HERE = Path(__file__).resolve().parent
for folder_name in ("distill", "dynabert"):
    sys.path.insert(0, str(HERE.parent / "compress" / folder_name))
import distill_tiny  # noqa: E402
import dynabert_cmd_tiny  # noqa: E402

from ms_nlp_compress.errors import ConfigError, MsncError  # noqa: E402
from ms_nlp_compress.models.checkpoint import read_model_dir  # noqa: E402
from ms_nlp_compress.train.finetune import run_eval  # noqa: E402
from ms_nlp_compress.pipeline.runner import (load_pipeline, resolve_stage_config, run_pipeline,  # noqa: E402
                                             stage_hash)
from ms_nlp_compress.pipeline.stages import StageKind, best_dir, register_stage  # noqa: E402

QUIET = dict(log=lambda message: None)
# msrun master ports of this file (tests/parallel uses 8231-8252, 8271, 8281-8283, 8291; test_engine_contract
# 9123 / 9200; test_distill_commands a free ephemeral port): every msrun test needs its own, xdist runs two at once
PORT_MAIN, PORT_VICTIM, PORT_TIMEOUT, PORT_DYNABERT = 8261, 8262, 8263, 8264
# Student dropout off: each rank draws its own masks by design, so only then are 2 ranks x 4 rows the maths of
# 1 process x 8 rows. 12 updates a epoch (96 training rows / global batch 8): 1 epoch of stage 1 (checkpoints
# every 4 updates), the 3 of stage 2 the student needs to learn the task.
STUDENT_SET = ["distill.student_model.hidden_dropout=0.0", "distill.intermediate_train.epochs=1"]


def pipeline_file(folder: Path, run: str, teacher: str, batch_size: int, launch: str = "") -> Path:
    """teacher stage + TinyBERT task distillation of distill_tiny's task, per-rank batch `batch_size`."""
    distill_tiny.teacher_config(folder)
    distill_tiny.task_config(folder, "student", init="teacher_layers")
    settings = ", ".join(json.dumps(item) for item in STUDENT_SET + [f"data.batch_size={batch_size}"])
    path = folder / f"{run}.yaml"
    path.write_text(f"""
name: tiny_launch
run_dir: {folder / run}
stages:
  {teacher}
  tinybert: {{kind: distill_task, config: student.yaml, set: [{settings}]{launch}}}
measure: {{batch_sizes: [1], sequence_length: 12, repeat: 1}}
""")
    return path


def weights(model_dir):
    return read_model_dir(model_dir)[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One pipeline run: the teacher fine-tuned in this process, then TinyBERT on 2 msrun ranks (per-rank batch 4)."""
    folder = tmp_path_factory.mktemp("launch")
    distill_tiny.write_assets(folder)
    ms.set_context(mode=ms.GRAPH_MODE)
    config = pipeline_file(folder, "run", "teacher: {kind: finetune, config: teacher.yaml}", 4,
                           f", launch: {{workers: 2, master_port: {PORT_MAIN}, timeout_seconds: 600}}")
    lines = []
    run_pipeline(config, log=lines.append, measure=False)
    yield folder, config, lines
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_two_rank_stage_equals_one_process_on_the_global_batch(tiny):
    folder, _, lines = tiny
    run = folder / "run"
    assert any(line.startswith("[1/2] teacher (finetune): running") and "msrun" not in line for line in lines)
    assert any(line.startswith("[2/2] tinybert (distill_task): running") and line.endswith("(2 ranks under msrun)")
               for line in lines)
    assert {p.name for p in (run / "tinybert" / "msrun_log").glob("worker_*.log")} == {"worker_0.log",
                                                                                        "worker_1.log"}
    # The stage's report is what rank 0 wrote, read back: the record the next run's skip decision uses.
    record = json.loads((run / "tinybert" / "pipeline_stage.json").read_text())
    assert record["report"] == json.loads((run / "tinybert" / "results.json").read_text())
    assert record["report"]["world_size"] == 2 and record["input"] == str(run / "teacher" / "best")
    assert record["report"]["dev"]["acc"] >= 0.8  # the student learned the task

    # The reference: the same stage in this process (the default launch) with the global batch on one rank.
    reference = pipeline_file(folder, "reference", f"teacher: {{kind: model, model: {run / 'teacher' / 'best'}}}", 8)
    reference_lines = []
    run_pipeline(reference, log=reference_lines.append, measure=False)
    assert any(line.startswith("[2/2] tinybert (distill_task): running") and line.endswith("tinybert")
               for line in reference_lines)
    one = json.loads((folder / "reference" / "tinybert" / "results.json").read_text())
    assert one["world_size"] == 1
    two_ranks, one_process = weights(run / "tinybert" / "best"), weights(folder / "reference" / "tinybert" / "best")
    stage1 = weights(run / "tinybert" / "stage1_intermediate" / "student")
    assert two_ranks.keys() == one_process.keys()
    moved = 0.0
    for name in one_process:
        # The all-reduce sums the two ranks' gradients in another order than one process's batch of 8: float
        # rounding only (measured: <= 2.4e-7). Key biases get no true gradient (softmax is invariant to a shift of
        # a query's scores), only that rounding, which Adam scales up to steps: 1e-5 for them (measured 2.4e-6).
        atol = 1e-5 if name.endswith("key.bias") else 1e-6
        np.testing.assert_allclose(two_ranks[name], one_process[name], rtol=1e-5, atol=atol, err_msg=name)
        if name in stage1:
            moved = max(moved, float(np.abs(two_ranks[name] - stage1[name]).max()))
    assert moved > 1e-3  # stage 2 trained: the equality above is not that of two untouched copies
    assert one["dev"] == record["report"]["dev"]


def test_rerun_skips_the_msrun_stage(tiny):
    folder, config, _ = tiny
    msrun_log = folder / "run" / "tinybert" / "msrun_log" / "msrun.log"
    before = msrun_log.stat().st_mtime_ns
    lines = []
    run_pipeline(config, log=lines.append, measure=False)
    assert sum(line.endswith("skipped") for line in lines) == 2, lines
    assert not any("msrun:" in line for line in lines)
    assert msrun_log.stat().st_mtime_ns == before  # msrun was not started again


def test_dynabert_trains_on_the_ranks_and_chooses_in_the_driver(tiny):
    """A `dynabert` stage on 2 ranks: `msnc dynabert train` under msrun, then the grid, the choice and the extraction
    in the pipeline's one process; the sub-network passed on is the one the grid scored."""
    folder, _, _ = tiny
    dynabert_cmd_tiny.dynabert_config(folder, "dynabert")
    settings = ["dynabert.width_train.epochs=1", "dynabert.width_depth_train.epochs=1",
                "dynabert.depth_multipliers=[1.0]", "data.batch_size=8"]
    path = folder / "dyna.yaml"
    path.write_text(f"""
name: tiny_dynabert
run_dir: {folder / 'dyna'}
stages:
  student: {{kind: model, model: {folder / 'run' / 'tinybert' / 'best'}}}
  dynabert: {{kind: dynabert, config: dynabert.yaml, options: {{width: 0.5, depth: 1.0}},
             set: {json.dumps(settings)}, launch: {{workers: 2, master_port: {PORT_DYNABERT}, timeout_seconds: 600}}}}
measure: {{batch_sizes: [1], sequence_length: 12, repeat: 1}}
""")
    lines = []
    run_pipeline(path, log=lines.append, measure=False)
    assert any(line.startswith("[2/2] dynabert (dynabert): running") and line.endswith("(2 ranks under msrun)")
               for line in lines)
    stage_dir = folder / "dyna" / "dynabert"
    report = json.loads((stage_dir / "pipeline_stage.json").read_text())["report"]
    assert report["train"]["world_size"] == 2  # trained on the ranks (rank 0's results.json) ...
    assert report["chosen"]["width"] == 0.5 and report["chosen"]["model_dir"] == str(stage_dir / "chosen")
    grid = json.loads((stage_dir / "grid.json").read_text())  # ... scored and extracted here
    assert sorted(entry["width"] for entry in grid["entries"]) == [0.5, 1.0]
    half = next(entry for entry in grid["entries"] if entry["width"] == 0.5)
    # the extracted directory on disk computes what the grid measured through the sliced elastic model
    assert run_eval(stage_dir / "chosen", "sst2", folder / "sst2" / "dev.tsv", batch_size=7)["acc"] == \
        pytest.approx(half["dev"]["acc"])
    assert report["chosen"]["parameters"] < sum(a.size for a in weights(folder / "run" / "tinybert" / "best").values())


def _processes_of(stage_dir: Path, role: str = "MS_WORKER"):
    """pids of the processes msrun started for `stage_dir` (their command line holds its output_dir override):
    the ranks (MS_ROLE MS_WORKER) or msrun's scheduler (MS_SCHED), which runs the same command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            environment = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (len(argv) > 1 and argv[1].endswith("msnc_entry.py") and f"output_dir={stage_dir}" in argv
                and (role is None or f"MS_ROLE={role}" in environment)):
            found.append(int(entry.name))
    return found


def test_a_killed_rank_fails_the_stage_and_a_rerun_resumes(tiny):
    folder, _, _ = tiny
    run = folder / "run"
    config = pipeline_file(folder, "victim", f"teacher: {{kind: model, model: {run / 'teacher' / 'best'}}}", 4,
                           f", launch: {{workers: 2, master_port: {PORT_VICTIM}, timeout_seconds: 600}}")
    stage_dir = folder / "victim" / "tinybert"
    command = [sys.executable, "-m", "ms_nlp_compress.cli", "compress", "--config", str(config), "--no-measure"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    driver = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pointer = stage_dir / "stage1_intermediate" / "checkpoints" / "LATEST"  # first checkpoint: update 4 of 12
        deadline = time.time() + 400
        while not pointer.exists() and time.time() < deadline and driver.poll() is None:
            time.sleep(0.05)
        ranks = _processes_of(stage_dir)
        assert len(ranks) == 2, f"expected the stage's 2 ranks alive, found {ranks}"
        os.kill(ranks[-1], signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=300)
    finally:  # a failed assertion above must not leave the run going
        if driver.poll() is None:
            for pid in _processes_of(stage_dir, role=None):
                os.kill(pid, signal.SIGKILL)
            driver.kill()
            driver.wait()
    assert driver.returncode == 2, stdout[-2000:] + stderr[-2000:]
    assert "stage 'tinybert' (distill_task, `msnc distill task` on 2 ranks): msrun failed" in stderr, stderr[-3000:]
    assert str(stage_dir / "msrun_log") in stderr
    assert not _processes_of(stage_dir, role=None)  # msrun took the surviving rank down with it: nothing hangs
    assert not (stage_dir / "pipeline_stage.json").exists()
    lines = []
    run_pipeline(config, log=lines.append, measure=False)
    assert any(line.startswith("[2/2] tinybert (distill_task): resuming") for line in lines), lines
    stage1 = json.loads((stage_dir / "stage1_intermediate" / "stage.json").read_text())
    resumed = stage1.get("resumed_from") or json.loads(
        (stage_dir / "stage2_prediction" / "stage.json").read_text()).get("resumed_from")
    assert resumed  # continued from a checkpoint, not from scratch
    expected, actual = weights(run / "tinybert" / "best"), weights(stage_dir / "best")
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_a_stage_past_its_time_out_is_stopped_with_its_ranks(tiny):
    folder, _, _ = tiny
    run = folder / "run"
    config = pipeline_file(folder, "slow", f"teacher: {{kind: model, model: {run / 'teacher' / 'best'}}}", 4,
                           f", launch: {{workers: 2, master_port: {PORT_TIMEOUT}, timeout_seconds: 12}}")
    began = time.perf_counter()
    with pytest.raises(MsncError, match=r"stage 'tinybert' .*msrun did not finish within 12 s \(launch\."
                                        r"timeout_seconds\); stopped it and its ranks"):
        run_pipeline(config, **QUIET, measure=False)
    assert time.perf_counter() - began < 70
    assert (folder / "slow" / "tinybert" / "msrun_log" / "worker_1.log").is_file()  # the ranks had started ...
    assert not _processes_of(folder / "slow" / "tinybert", role=None)  # ... and are gone
    assert not (folder / "slow" / "tinybert" / "pipeline_stage.json").exists()


def test_launch_errors_name_the_key(tiny):
    folder, _, _ = tiny
    bad = folder / "bad.yaml"
    cases = [
        ("launch: {wokers: 2}\n", r"unknown key\(s\) launch\.wokers"),
        ("launch: {workers: 0}\n", r"launch\.workers: at least 1, got 0"),
        ("launch: {master_port: 70000}\n", r"launch\.master_port: not a port: 70000"),
        ("launch: {timeout_seconds: 0}\n", r"launch\.timeout_seconds: must be > 0"),
        ("launch: {workers: two}\n", r"launch\.workers: expected an integer"),
    ]
    for text, message in cases:
        bad.write_text("stages:\n  teacher: {kind: finetune, config: teacher.yaml}\n" + text)
        with pytest.raises(ConfigError, match=message):
            run_pipeline(bad, **QUIET)
    per_stage = [
        ("{workers: -1}", r"stages\.teacher\.launch\.workers: at least 1, got -1"),
        ("{timeout: 5}", r"stages\.teacher\.launch: unknown key\(s\) timeout"),
    ]
    for launch, message in per_stage:
        bad.write_text(f"stages:\n  teacher: {{kind: finetune, config: teacher.yaml, launch: {launch}}}\n")
        with pytest.raises(ConfigError, match=message):
            run_pipeline(bad, **QUIET)
    bad.write_text(f"stages:\n  teacher: {{kind: model, model: {folder}, launch: {{workers: 2}}}}\n")
    with pytest.raises(ConfigError, match=r"stages\.teacher\.launch: kind `model` runs nothing"):
        run_pipeline(bad, **QUIET)
    # a kind registered without `run_parallel` (every built-in training kind has one) runs in one process only
    register_stage(StageKind("one_process_only", lambda *args: {}, best_dir))
    bad.write_text("stages:\n  teacher: {kind: finetune, config: teacher.yaml}\n"
                   "  other: {kind: one_process_only, config: teacher.yaml, launch: {workers: 2}}\n")
    with pytest.raises(ConfigError, match=r"stages\.other\.launch\.workers: kind 'one_process_only' has no "
                                          r"data-parallel launch"):
        run_pipeline(bad, **QUIET)


def test_ranks_are_part_of_the_stage_identity_and_the_port_is_not(tiny):
    folder, _, _ = tiny
    teacher = f"teacher: {{kind: model, model: {folder / 'run' / 'teacher' / 'best'}}}"

    def identity(launch: str, overrides=()):
        path = pipeline_file(folder, "identity", teacher, 4, launch)
        pipeline = load_pipeline(path, overrides)
        stage = pipeline.specs()[1]
        config = resolve_stage_config(path, stage, folder / "identity" / "tinybert", folder / "input",
                                      pipeline.stage_launch(stage).workers)
        return config.parallel.world_size, stage_hash(stage.kind, config, "input", stage.options)

    default = identity("")
    assert default[0] == 1
    assert identity(", launch: {workers: 1}") == default  # 1 worker is the in-process run it always was
    two = identity(", launch: {workers: 2, master_port: 8300}")
    assert two[0] == 2 and two[1] != default[1]
    assert identity(", launch: {workers: 2, master_port: 8301, timeout_seconds: 9}") == two
    # the pipeline-wide launch applies to every stage; a stage's own launch wins
    assert identity("", ["launch.workers=2"]) == two
    assert identity(", launch: {workers: 1}", ["launch.workers=2"]) == default


class _Launched(Exception):
    pass


def test_every_data_parallel_kind_launches_a_real_msnc_command(tmp_path):
    """The command line each kind's `run_parallel` hands to msrun parses as that msnc command (with the --config
    and --set the launcher adds), `--no-resume` follows the pipeline's resume flag, and the report is rank 0's
    results.json read back (msrun itself is exercised by the tests above, for distill_task)."""
    from types import SimpleNamespace

    from ms_nlp_compress.cli import build_parser
    from ms_nlp_compress.pipeline.stages import stage_kind

    expected = {"finetune": ["finetune"], "distill_task": ["distill", "task"], "pretrain": ["pretrain"],
                "dynabert": ["dynabert", "train"], "quantize": ["quantize"]}
    for name, command in expected.items():
        kind = stage_kind(name)
        config = SimpleNamespace(output_dir=str(tmp_path / name))
        for resume in (True, False):
            launched = []

            def launch(argv, name=name, config=config):
                launched.append(list(argv))
                Path(config.output_dir).mkdir(exist_ok=True)
                (Path(config.output_dir) / "results.json").write_text(json.dumps({"written_by": name}))
                if name == "dynabert":  # its grid / extraction would follow in this process: not this test's
                    raise _Launched()

            try:
                report = kind.run_parallel(config, resume, QUIET["log"], {}, launch)
            except _Launched:
                report = None
            assert launched == [command + ([] if resume else ["--no-resume"])], name
            args = build_parser().parse_args(launched[0] + ["--config", "x.yaml", "--set", "train.epochs=1"])
            assert args.config == "x.yaml" and args.overrides == ["train.epochs=1"], name
            assert args.no_resume is (not resume), name
            if name != "dynabert":
                assert report == {"written_by": name}
            (Path(config.output_dir) / "results.json").unlink()
    with pytest.raises(MsncError, match=r"finetune.results\.json: the stage's command finished but wrote no"):
        stage_kind("finetune").run_parallel(SimpleNamespace(output_dir=str(tmp_path / "finetune")), True,
                                            QUIET["log"], {}, lambda argv: None)
    launched = []

    def two_ranks(argv):
        launched.append(list(argv))

    two_ranks.workers = 2
    with pytest.raises(ConfigError, match=r"options\.ptq: post-training quantization trains nothing"):
        stage_kind("quantize").run_parallel(SimpleNamespace(output_dir=str(tmp_path)), True, QUIET["log"],
                                            {"ptq": True}, two_ranks)
    assert launched == []

    def one_child(argv):  # launch.process: child, one worker: PTQ runs as `msnc quantize --ptq` in the child
        launched.append(list(argv))
        (tmp_path / "results.json").write_text(json.dumps({"written_by": "ptq"}))

    one_child.workers = 1
    assert stage_kind("quantize").run_parallel(SimpleNamespace(output_dir=str(tmp_path)), True, QUIET["log"],
                                               {"ptq": True}, one_child) == {"written_by": "ptq"}
    assert launched == [["quantize", "--ptq"]]
    assert build_parser().parse_args(launched[0] + ["--config", "x.yaml"]).ptq is True
