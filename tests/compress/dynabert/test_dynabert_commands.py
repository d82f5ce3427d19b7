"""`msnc dynabert importance | train | extract | grid | select` end to end on a tiny task (graph mode): the rewired
model computes what the teacher computes, both stages train and are skipped when finished, a kill -9 during stage 2
resumes to a bit-identical model, an extracted model loads with the standard loader and equals the sliced forward,
the grid's numbers are those of the extracted models, select picks by injected latencies, and bad widths and depths
are errors naming the value."""
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


import dynabert_cmd_tiny as tiny_cmd
from ms_nlp_compress.cli import main as msnc
from ms_nlp_compress.compress.dynabert.elastic import ElasticModel
from ms_nlp_compress.compress.dynabert.run import choose, run_grid, run_select, run_train
from ms_nlp_compress.config import load_config
from ms_nlp_compress.data.glue import get_task
from ms_nlp_compress.data.tokenization import load_tokenizer
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.checkpoint import load_model_dir, read_model_dir
from ms_nlp_compress.train.finetune import encode, predict_logits, run_eval

WORKER = Path(__file__).resolve().parent / "dynabert_train_worker.py"
QUIET = dict(log=lambda message: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Assets, a fine-tuned teacher and one finished DynaBERT run ("reference"), shared by this module's tests."""
    with tiny_cmd.distill_tiny.teacher_in_graph_mode(tmp_path_factory.mktemp("dynabert")) as folder:
        yield folder, run_train(load_config(tiny_cmd.dynabert_config(folder, "reference")), **QUIET)


def columns(folder, split="dev"):
    tokenizer = load_tokenizer(folder / "vocab.txt", max_length=12)
    return encode(get_task("sst2").reader(folder / "sst2" / f"{split}.tsv"), tokenizer, 12, False)


def weights_of(model_dir):
    return read_model_dir(model_dir)[2]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def train_records(path):
    return [record for record in map(json.loads, path.read_text().splitlines()) if record["type"] == "train"]


def test_train_stages_rewiring_skip_and_kill_minus_nine_resume(tiny):
    folder, report = tiny
    out = folder / "reference"
    dev = columns(folder)
    # Rewiring permutes heads and neurons only: the rewired model computes the fine-tuned teacher's logits.
    teacher, _ = load_model_dir(folder / "teacher" / "best")
    rewired, document = load_model_dir(out / "rewired")
    np.testing.assert_allclose(predict_logits(rewired, dev, 7), predict_logits(teacher, dev, 7), rtol=1e-5,
                               atol=1e-5)
    assert len(document["dynabert_rewiring"]["head_orders"]) == 2
    assert report["importance"]["importance_rows"] == 40 and report["importance"]["batches"] == 3  # 16+16+8

    width, both = report["stages"]["width"], report["stages"]["width_depth"]
    assert width["updates"] == 12 and both["updates"] == 12  # 2 epochs of 6 batches each
    assert width["subnetworks"] == ["w1_d1", "w0.5_d1"]
    assert both["subnetworks"] == ["w1_d1", "w0.5_d1", "w1_d0.5", "w0.5_d0.5"]
    for stage in (width, both):
        timing = stage["timing"]
        assert timing["timed_updates"] == 12 and timing["first_update_seconds"] > timing["update_seconds"] > 0
    # Each logged component is one sub-network's loss; the summed loss is their sum; distillation makes progress.
    records = train_records(out / "stage1_width" / "metrics.jsonl")
    for record in records:
        np.testing.assert_allclose(record["loss"], record["loss_w1_d1"] + record["loss_w0.5_d1"], rtol=1e-5)
    first = np.mean([r["loss_w0.5_d1"] for r in records[:3]])
    last = np.mean([r["loss_w0.5_d1"] for r in records[-3:]])
    assert last < 0.95 * first, (first, last)  # soft cross-entropy: the teacher's entropy (~0.6) is its floor
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["width_depth"]["timing"] == both["timing"]
    final, final_document = load_model_dir(out / "dynabert")
    assert final_document["dynabert_trained"] == {"widths": [1.0, 0.5], "depths": [1.0, 0.5], "stage": "width_depth"}
    assert_same_weights(weights_of(out / "dynabert"), weights_of(out / "stage2_width_depth" / "model"))

    # A rerun finds importance and both stages finished: skipped, the model unchanged.
    before = weights_of(out / "dynabert")
    again = run_train(load_config(tiny_cmd.dynabert_config(folder, "reference")), **QUIET)
    assert again["importance"]["skipped"]
    assert again["stages"]["width"]["skipped"] and again["stages"]["width_depth"]["skipped"]
    assert_same_weights(before, weights_of(out / "dynabert"))

    # kill -9 during stage 2 in another process, run again: the same trained model, bit for bit.
    victim_config = tiny_cmd.dynabert_config(folder, "victim")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    victim = subprocess.Popen([sys.executable, str(WORKER), str(victim_config)], env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = folder / "victim" / "stage2_width_depth" / "checkpoints" / "LATEST"
    deadline = time.time() + 1200
    while not pointer.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    assert (folder / "victim" / "stage1_width" / "stage.json").exists()
    assert not (folder / "victim" / "stage2_width_depth" / "stage.json").exists()  # killed inside stage 2
    resumed = subprocess.run([sys.executable, str(WORKER), str(victim_config)], env=environment,
                             capture_output=True, text=True, timeout=1800)  # generous: shared machines
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stage2 = json.loads((folder / "victim" / "stage2_width_depth" / "stage.json").read_text())
    assert stage2["resumed_from"] and stage2["updates"] == 12
    assert_same_weights(weights_of(out / "stage1_width" / "model"),
                        weights_of(folder / "victim" / "stage1_width" / "model"))
    assert_same_weights(weights_of(out / "dynabert"), weights_of(folder / "victim" / "dynabert"))


def test_final_fine_tuning_stage_continues_a_finished_run(tiny):
    """`stages: [width, width_depth, final]` on a run whose two stages are finished: both are skipped and the final
    stage trains every sub-network on the labels alone (no teacher), starting from the stage-2 model."""
    folder, _ = tiny
    source, out = folder / "reference", folder / "final"
    for name in ("rewired", "stage1_width", "stage2_width_depth"):
        shutil.copytree(source / name, out / name)
    shutil.copy(source / "importance.json", out / "importance.json")
    config = tiny_cmd.dynabert_config(folder, "final", extra="  stages: [width, width_depth, final]\n"
                                                             "  final_train: {epochs: 1, learning_rate: 0.005}")
    report = run_train(load_config(config), **QUIET)
    assert report["importance"]["skipped"]
    assert report["stages"]["width"]["skipped"] and report["stages"]["width_depth"]["skipped"]
    final = report["stages"]["final"]
    names = ["w1_d1", "w0.5_d1", "w1_d0.5", "w0.5_d0.5"]
    assert final["updates"] == 6 and final["subnetworks"] == names and final["teacher"] == "none (labels)"
    assert final["learning_rate"] == 0.005
    records = train_records(out / "stage3_final" / "metrics.jsonl")
    assert len(records) == 6
    for record in records:
        np.testing.assert_allclose(record["loss"], sum(record[f"loss_{name}"] for name in names), rtol=1e-5)
    _, document = load_model_dir(out / "dynabert")
    assert document["dynabert_trained"] == {"widths": [1.0, 0.5], "depths": [1.0, 0.5], "stage": "final"}
    assert_same_weights(weights_of(out / "dynabert"), weights_of(out / "stage3_final" / "model"))
    started, finished = weights_of(source / "stage2_width_depth" / "model"), weights_of(out / "dynabert")
    assert max(float(np.abs(finished[name] - started[name]).max()) for name in started) > 1e-4  # it trained


def test_augmented_set_replaces_the_training_split_in_the_listed_stages(tiny):
    """dynabert.augmented_train (`msnc augment`'s TSV) is what stage 1 reads; a missing file is an error naming the
    key before any work."""
    folder, _ = tiny
    augmented = folder / "train_aug.tsv"
    rows = len(augmented.read_text().splitlines()) - 1  # minus the header
    config = tiny_cmd.dynabert_config(folder, "augmented", extra=f"  augmented_train: {augmented}\n"
                                                                 "  stages: [width]")
    report = run_train(load_config(config, ["dynabert.width_train={epochs: 1}"]), **QUIET)
    width = report["stages"]["width"]
    assert width["data"] == str(augmented) and width["updates"] == -(-rows // 16)  # one epoch of the augmented set
    with pytest.raises(ConfigError, match=r"dynabert\.augmented_train: .*absent\.tsv is not a file"):
        run_train(load_config(config, ["dynabert.width_train={epochs: 1}",
                                       f"dynabert.augmented_train={folder / 'absent.tsv'}",
                                       f"output_dir={folder / 'augmented_absent'}"]), **QUIET)
    assert not (folder / "augmented_absent").exists()


def test_extract_command_equals_sliced_forward_and_grid_matches_extracted_models(tiny, capsys):
    folder, _ = tiny
    out = folder / "reference"
    config = str(tiny_cmd.dynabert_config(folder, "reference"))
    dev = columns(folder)
    full, _ = load_model_dir(out / "dynabert")
    elastic = ElasticModel(full)
    assert msnc(["dynabert", "extract", "--config", config, "--width", "0.5", "--depth", "0.5"]) == 0
    target = out / "extracted" / "w0.5_d0.5"
    small, document = load_model_dir(target)  # the standard loader
    assert document["dynabert"]["layers"] == [0] and document["dynabert"]["heads"] == [1]
    assert document["task"] == "sst2" and small.bert.config.num_layers == 1
    np.testing.assert_allclose(predict_logits(small, dev, 7), predict_logits(elastic.subnetwork(0.5, 0.5), dev, 7),
                               rtol=1e-5, atol=1e-5)

    grid = run_grid(load_config(config), **QUIET)
    assert [e["name"] for e in grid["entries"]] == ["w1_d1", "w0.5_d1", "w1_d0.5", "w0.5_d0.5"]
    assert (out / "grid.png").stat().st_size > 1000 and json.loads((out / "grid.json").read_text()) == grid
    entry = grid["entries"][3]
    params = sum(int(np.prod(p.shape)) for n, p in small.parameters_and_names() if "rng_counter" not in n)
    assert entry["parameters"] == params
    # `msnc eval` on the extracted model gives the grid's (sliced-forward) test accuracy.
    assert run_eval(target, "sst2", folder / "sst2" / "test.tsv", batch_size=7)["acc"] == entry["test"]["acc"]
    assert grid["entries"][0]["flops_ratio"] == 1.0 and 0 < entry["flops_ratio"] < 0.5

    # A width outside the trained list works, with a warning naming it (0.75 of 2 heads keeps both).
    capsys.readouterr()
    assert msnc(["dynabert", "extract", "--config", config, "--width", "0.75", "--depth", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "width 0.75 is not one of the trained widths" in printed

    # --measure: every sub-network extracted, sized and timed; speedups against the largest, and their ratio to the
    # FLOPs saving; the latency and size plots.
    assert msnc(["dynabert", "grid", "--config", config, "--measure", "--batch-sizes", "1,3", "--seq", "12",
                 "--repeat", "1"]) == 0
    measured = json.loads((out / "grid.json").read_text())
    assert measured["measured"]["batch_sizes"] == [1, 3] and measured["measured"]["sequence_length"] == 12
    by_name = {e["name"]: e for e in measured["entries"]}
    for entry in measured["entries"]:
        directory = Path(entry["model_dir"])
        assert load_model_dir(directory)[0].bert.config.num_layers == len(entry["layers"])
        assert entry["model_dir_bytes"] == sum(os.path.getsize(os.path.join(root, name))
                                               for root, _, names in os.walk(directory) for name in names)
        for batch in ("1", "3"):
            assert entry["latency_ms"][batch] > 0
            full = by_name["w1_d1"]["latency_ms"][batch]
            assert entry["speedup"][batch] == pytest.approx(full / entry["latency_ms"][batch], rel=1e-2)
            assert entry["speedup_vs_flops"][batch] == pytest.approx(entry["speedup"][batch] * entry["flops_ratio"],
                                                                     rel=1e-2)
    assert by_name["w0.5_d0.5"]["model_dir_bytes"] < by_name["w1_d1"]["model_dir_bytes"]
    assert (out / "grid_latency.png").stat().st_size > 1000 and (out / "grid_size.png").stat().st_size > 1000


@pytest.mark.parametrize("flag, value", [("--width", "0.2"), ("--depth", "1.5"), ("--depth", "0.2"),
                                         ("--width", "0")])
def test_impossible_width_or_depth_is_an_error_naming_the_value(tiny, capsys, flag, value):
    folder, _ = tiny
    config = str(tiny_cmd.dynabert_config(folder, "reference"))
    other = {"--width": ("--depth", "1.0"), "--depth": ("--width", "1.0")}[flag]
    capsys.readouterr()
    assert msnc(["dynabert", "extract", "--config", config, flag, value, *other]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: runtime warnings
    assert error.startswith("msnc: error:") and value in error and flag.strip("-") in error


def test_select_picks_the_most_accurate_within_the_budget(tiny):
    folder, _ = tiny
    config = load_config(tiny_cmd.dynabert_config(folder, "reference"))
    grid = json.loads((folder / "reference" / "grid.json").read_text()) if \
        (folder / "reference" / "grid.json").is_file() else run_grid(config, **QUIET)
    # Injected latencies: proportional to FLOPs, the full model slowest (no timing in a test).
    # (+ 0.1 * index: w0.5_d1 and w1_d0.5 have equal FLOPs, the latencies must differ)
    latency = {e["name"]: 1.0 + 10.0 * e["flops_ratio"] + 0.1 * i for i, e in enumerate(grid["entries"])}
    seen = []

    def measure(model_dir, entry):
        seen.append(load_model_dir(model_dir)[0].bert.config.num_layers)  # the candidate was extracted
        return latency[entry["name"]]

    budget = sorted(latency.values())[1] + 1e-3  # the two fastest fit
    report = run_select(config, budget, 4, measure=measure, **QUIET)
    fitting = [e for e in grid["entries"] if latency[e["name"]] <= budget]
    assert len(fitting) == 2
    best_acc = max(e["dev"]["acc"] for e in fitting)
    expected = min((e for e in fitting if e["dev"]["acc"] == best_acc), key=lambda e: latency[e["name"]])
    assert report["selected"]["name"] == expected["name"]
    assert seen == [len(e["layers"]) for e in grid["entries"]]
    # choose(): ties on accuracy go to the faster one; nothing within the budget is None
    candidates = [{"dev": {"acc": 0.9}, "latency_ms": 5.0, "n": "a"},
                  {"dev": {"acc": 0.9}, "latency_ms": 3.0, "n": "b"},
                  {"dev": {"acc": 0.95}, "latency_ms": 9.0, "n": "c"}]
    assert choose(candidates, 8.0)["n"] == "b" and choose(candidates, 9.0)["n"] == "c"
    assert choose(candidates, 2.0) is None
    with pytest.raises(ConfigError, match=r"--latency-ms 0.5: no sub-network fits"):
        run_select(config, 0.5, 4, measure=measure, **QUIET)
