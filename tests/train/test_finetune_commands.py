"""msnc finetune / eval / predict end to end on a tiny SST-2-format task written in the test."""
import json

import numpy as np
import pytest

from ms_nlp_compress.cli import main as msnc
from ms_nlp_compress.config import load_config
from ms_nlp_compress.errors import DataError
from ms_nlp_compress.train.finetune import run_eval, run_finetune, run_predict

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "a", "plot", "very"]


def write_task(folder, rows, seed):
    rng = np.random.default_rng(seed)
    lines = ["sentence\tlabel"]
    for _ in range(rows):
        label = int(rng.integers(0, 2))
        cue = rng.choice(WORDS[:3] if label else WORDS[3:6])
        filler = list(rng.choice(WORDS[6:], 4))
        filler.insert(int(rng.integers(0, 5)), cue)
        lines.append(" ".join(filler) + f"\t{label}")
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    return lines


@pytest.fixture
def task_dir(tmp_path):
    for split, rows, seed in (("train", 96, 0), ("dev", 30, 1), ("test", 30, 2)):
        (tmp_path / "sst2").mkdir(exist_ok=True)
        (tmp_path / "sst2" / f"{split}.tsv").write_text("\n".join(write_task(tmp_path, rows, seed)) + "\n")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
output_dir: {tmp_path / 'run'}
runtime: {{device: cpu, mode: graph, cpu_threads: 1}}
model: {{vocab_size: 17, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32,
         max_relative_position: 8, hidden_dropout: 0.0, attention_dropout: 0.0}}
data: {{task: sst2, data_dir: {tmp_path / 'sst2'}, vocab: {tmp_path / 'vocab.txt'}, max_length: 12,
        batch_size: 8, eval_batch_size: 7}}
train: {{learning_rate: 0.03, epochs: 5, warmup_ratio: 0.1, eval_every: 0, log_every: 4}}
""")
    return tmp_path


def test_finetune_eval_predict(task_dir, capsys):
    report = run_finetune(load_config(task_dir / "tiny.yaml"), log=lambda message: None)
    assert report["updates"] == 60 and report["best_dev"]["acc"] >= 0.9 and report["test"]["acc"] >= 0.9
    best = task_dir / "run" / "best"
    saved = json.loads((best / "config.json").read_text())
    assert saved["task"] == "sst2" and saved["labels"] == ["0", "1"] and (best / "vocab.txt").is_file()
    # eval keeps every row (eval_batch_size 7 does not divide 30) and reproduces the trainer's number
    assert run_eval(best, "sst2", task_dir / "sst2" / "test.tsv", batch_size=7) == report["test"]
    lines = run_predict(best, ["the movie was great", "a very awful plot", "fine\tbad"])
    assert [line.split("\t")[0] for line in lines[:2]] == ["1", "0"]
    assert all(0.5 <= float(line.split("\t")[1]) <= 1.0 for line in lines)
    (task_dir / "in.txt").write_text("the movie was good\n\nthe plot was poor\n")
    assert msnc(["predict", "--model", str(best), "--input", str(task_dir / "in.txt")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in printed] == ["1", "0"]
    # a rerun resumes from the final checkpoint and has nothing left to train
    again = run_finetune(load_config(task_dir / "tiny.yaml"), log=lambda message: None)
    assert again["resumed_from"].endswith("step-0000060") and again["updates"] == 60


def test_bad_inputs_are_named(task_dir, capsys):
    with (task_dir / "sst2" / "dev.tsv").open("a") as handle:
        handle.write("a sentence without a label\n")
    with pytest.raises(DataError, match=r"dev.tsv:32"):
        run_finetune(load_config(task_dir / "tiny.yaml", ["train.max_steps=1"]), log=lambda message: None)
    assert msnc(["finetune", "--config", str(task_dir / "tiny.yaml"), "--set", "train.optimiser=sgd"]) == 2
    assert "unknown key(s) train.optimiser" in capsys.readouterr().err
    assert msnc(["predict", "--model", str(task_dir / "nowhere"), "--input", str(task_dir / "absent.txt")]) == 2


def test_streamed_training_data_trains_the_same_model_as_memory(task_dir):
    """data.stream: disk with one shuffle window (shuffle_shards 0) serves the batches ArrayBatches serves, from
    tokenized shards on disk, so fine-tuning ends with the same weights; the shards are built once and reused."""
    from ms_nlp_compress.models.checkpoint import read_model_dir

    settings = ["train.epochs=1", "data.shard_rows=20"]
    memory = run_finetune(load_config(task_dir / "tiny.yaml", settings + ["data.stream=memory",
                                                                          f"output_dir={task_dir / 'memory'}"]),
                          log=lambda message: None)
    lines = []
    streamed = run_finetune(load_config(task_dir / "tiny.yaml", settings + [
        "data.stream=disk", "data.shuffle_shards=0", f"output_dir={task_dir / 'disk'}"]), log=lines.append)
    assert any("StreamingBatches" in line for line in lines)
    assert len(list((task_dir / "disk" / "shards").rglob("*.npz"))) == 5  # 96 rows / 20 per shard
    assert streamed["updates"] == memory["updates"] == 12
    _, _, memory_weights = read_model_dir(task_dir / "memory" / "best")
    _, _, disk_weights = read_model_dir(task_dir / "disk" / "best")
    assert memory_weights.keys() == disk_weights.keys()
    for name in memory_weights:
        np.testing.assert_array_equal(memory_weights[name], disk_weights[name], err_msg=name)
