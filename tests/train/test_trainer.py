"""Trainer: exact resume (in-process and after kill -9), best-model selection, metrics log, batches."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mindspore import Tensor

import tiny_task
from ms_nlp_compress.errors import CheckpointError, ConfigError
from ms_nlp_compress.train.batches import ArrayBatches
from ms_nlp_compress.train.checkpoints import latest_checkpoint

WORKER = Path(__file__).resolve().parent / "resume_worker.py"


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_interrupted_run_resumes_exactly(tmp_path, graph_mode):
    straight, straight_model = tiny_task.build(tmp_path / "straight")
    straight.fit()
    interrupted, _ = tiny_task.build(tmp_path / "interrupted")
    interrupted.fit(stop_after=3)  # stops after update 3; the last checkpoint is update 2
    assert latest_checkpoint(tmp_path / "interrupted" / "checkpoints").name == "step-0000002"
    resumed, resumed_model = tiny_task.build(tmp_path / "interrupted")
    result = resumed.fit()
    assert result.resumed_from.endswith("step-0000002") and result.updates == 8
    # metrics.jsonl reads as one run: update 3 was logged before the interruption and again after the resume
    logged = [json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in logged if r["type"] == "train"] == list(range(1, 9))
    assert [r["update"] for r in logged if r["type"] == "eval"] == [4, 8]
    # dropout was on: identical weights mean identical masks, data order, moments, schedule and step counts
    assert_same_weights(tiny_task.weights(straight_model), tiny_task.weights(resumed_model))
    assert resumed.optimizer.global_step.asnumpy().item() == 8


@pytest.mark.parametrize("worker_args", [("12",), ("6", "3", "0", "56")], ids=["plain", "accumulation3-mid-cycle"])
def test_kill_minus_nine_then_resume(tmp_path, worker_args):
    """kill -9 right after the first checkpoint, resume, compare with an uninterrupted run.

    The second case accumulates 3 micro-batches per update over 7 batches per epoch and checkpoints at each epoch
    end, so the checkpoint falls one micro-batch into a cycle: the partial gradient sum AND the position in the
    cycle must both come back (before the fix only the sum did, and the resumed run applied 4 micro-batches / 3).
    """
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    reference = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "reference"), *worker_args],
                               env=environment, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    victim = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "victim"), *worker_args],
                              env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "victim" / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    while not pointer.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # mid-run: right after its first checkpoint
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
    assert not (tmp_path / "victim" / "final.npz").exists()
    if len(worker_args) > 1:  # the checkpoint really is inside an accumulation cycle
        state = json.loads((latest_checkpoint(tmp_path / "victim" / "checkpoints") / "state.json").read_text())
        assert state["step"]["micro_step"] in (1, 2) and state["next_batch"] == 0  # epoch 0 or 1 ended mid-cycle
    resumed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "victim"), *worker_args],
                             env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = dict(np.load(tmp_path / "reference" / "final.npz"))
    actual = dict(np.load(tmp_path / "victim" / "final.npz"))
    assert_same_weights(expected, actual)


def test_metrics_log_and_best_selection(tmp_path, graph_mode):
    saved = []
    trainer, model = tiny_task.build(tmp_path, max_steps=40, eval_every=10, save_every=20, learning_rate=3e-2)
    trainer.on_best = lambda metrics, update: saved.append((update, metrics["acc"]))
    result = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["update"] for r in train_records] == list(range(1, 41))
    assert [r["update"] for r in evals] == [10, 20, 30, 40]
    assert result.best_metric == max(r["acc"] for r in evals) and result.best_metric > 0.8  # it learned
    assert saved and saved[-1] == (result.best_step, result.best_metric)
    assert [update for update, _ in saved] == sorted(update for update, _ in saved)
    assert train_records[0]["lr"] == 0.0 and train_records[-1]["lr"] > 0  # warmup starts at 0
    assert np.mean([r["loss"] for r in train_records[-5:]]) < np.mean([r["loss"] for r in train_records[:5]])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-0000020", "step-0000040"]


def test_resume_rejects_a_changed_model(tmp_path, graph_mode):
    trainer, _ = tiny_task.build(tmp_path, max_steps=2, save_every=2)
    trainer.fit()
    other, _ = tiny_task.build(tmp_path, max_steps=4)
    from ms_nlp_compress.config import NezhaConfig
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

    other.model = NezhaForSequenceClassification(NezhaConfig(vocab_size=30, hidden_size=16, num_layers=1,
                                                             num_heads=2, intermediate_size=32), 2)
    with pytest.raises(CheckpointError, match="missing: bert.encoder.layers.1|unexpected: bert.encoder.layers.1"):
        other.resume()


def test_batches_shard_the_global_batch_and_resume_mid_epoch():
    data = {"x": np.arange(20).reshape(20, 1), "y": np.arange(20)}
    single = ArrayBatches(data, ("x", "y"), batch_size=4, seed=3)
    ranks = [ArrayBatches(data, ("x", "y"), batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == 5
    for (i, (x, _)), (_, (x0, _)), (_, (x1, _)) in zip(single.epoch(1), ranks[0].epoch(1), ranks[1].epoch(1)):
        np.testing.assert_array_equal(x, np.concatenate([x0, x1]))  # the union of the ranks = the global batch
    assert [i for i, _ in single.epoch(1, start=3)] == [3, 4]
    np.testing.assert_array_equal(next(single.epoch(1, start=3))[1][1], list(single.epoch(1))[3][1][1])
    assert not np.array_equal(single.permutation(0), single.permutation(1))
    keep = ArrayBatches(data, ("x", "y"), batch_size=8, shuffle=False, drop_last=False)
    assert [len(b[1][0]) for b in keep.epoch(0)] == [8, 8, 4]
    with pytest.raises(ConfigError, match="cannot fill one global batch"):
        ArrayBatches(data, ("x", "y"), batch_size=16, world_size=2)
    with pytest.raises(ConfigError, match=r"batch columns \['z'\]"):
        ArrayBatches(data, ("z",), batch_size=2)


def test_dynamic_padding_trims_to_the_longest_row():
    data = {"input_ids": np.array([[2, 7, 3, 0, 0], [2, 3, 0, 0, 0]], np.int32),
            "attention_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int32)}
    batches = ArrayBatches(data, ("input_ids", "attention_mask"), batch_size=2, shuffle=False, dynamic_padding=True)
    (_, (ids, mask)), = list(batches.epoch(0))
    assert ids.shape == (2, 3) and mask.shape == (2, 3)


@pytest.mark.parametrize("level, kernels", [("O2", "fused"), ("O1", "cpu")])
def test_mixed_precision_trains_with_dynamic_loss_scale(tmp_path, graph_mode, monkeypatch, level, kernels):
    """The Trainer differentiates the float16 copy apply_precision returns (its logits are float16 values), updates
    the model's own float32 Parameters, and the model itself still evaluates in float32. Fails if amp is a no-op."""
    monkeypatch.chdir(tmp_path)  # mindspore.amp's O1 wrote a rewritten_network/ folder here; ours writes nothing
    trainer, model = tiny_task.build(tmp_path / "amp", kernels=kernels, max_steps=6, save_every=6, eval_every=0)
    assert trainer.scaler.mode == "none"  # fp32 config: no scaling
    trainer_config = trainer.config
    trainer_config.runtime.precision = level
    import ms_nlp_compress.train.trainer as trainer_module

    fp32_loss_cell = trainer.step.loss_cell
    mixed = trainer_module.Trainer(trainer_config, model, fp32_loss_cell, trainer.batches, tmp_path / "ampb",
                                   log=lambda message: None)
    assert mixed.scaler.mode == "dynamic" and mixed.scaler.scale == 65536.0
    assert mixed.loss_cell is not fp32_loss_cell
    before = tiny_task.weights(model)
    result = mixed.fit()
    after = tiny_task.weights(model)
    assert result.updates == 6 and result.updates - result.skipped_updates >= 1
    assert all(value.dtype == np.float32 for value in after.values() if value.dtype.kind == "f")  # fp32 masters
    assert any(not np.array_equal(before[name], after[name]) for name in before if "classifier" in name)
    columns = tiny_task.columns(size=8, seed=5)
    inputs = [Tensor(columns[name]) for name in tiny_task.ORDER[:3]]
    mixed.loss_cell.set_train(False)
    model.set_train(False)
    trained_logits = mixed.loss_cell.model(*inputs)[0].asnumpy()
    model_logits = model(*inputs)[0].asnumpy()
    assert np.array_equal(trained_logits, trained_logits.astype(np.float16).astype(np.float32))  # fp16 classifier
    assert np.mean(model_logits == model_logits.astype(np.float16).astype(np.float32)) < 0.2  # the model: fp32
    assert np.abs(trained_logits - model_logits).max() < 5e-2
    assert not (tmp_path / "rewritten_network").exists()
