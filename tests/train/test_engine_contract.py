"""The engine contract the compression algorithms plug into, and the engine defects fixed with it.

Each test here failed (or could not be written) on the engine before the fix: loss components, injected parts and
the checkpointed cell set, a frozen teacher inside a training loss cell, per-rank random streams, user run-time
model keys against a checkpoint's config, atomic replacement of checkpoints and files, the launcher's config keys.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

import tiny_task
from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.config import ExperimentConfig, NezhaConfig, TrainConfig, load_config
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.dropout import RandomStream, StatelessDropout, set_dropout_seed, stream_seed
from ms_nlp_compress.models.frozen import Frozen
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification
from ms_nlp_compress.train.batches import ArrayBatches
from ms_nlp_compress.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from ms_nlp_compress.train.step import TrainStep
from ms_nlp_compress.train.trainer import Trainer

TINY = dict(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_relative_position=4)


# ---------------------------------------------------------------------------------------------------------------
# Loss components
# ---------------------------------------------------------------------------------------------------------------
class TwoTermLoss(nn.Cell):
    """loss = a + 0.5 b with a = mean(w x)^2, b = mean(w)^2: components (a, b) are logged, loss differentiated."""

    component_names = ("square", "weight")

    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(Tensor(np.array([0.5, -1.0, 2.0], np.float32)), name="w")

    def construct(self, x):
        a = ops.square((self.w * x).mean())
        b = ops.square(self.w.mean())
        return a + 0.5 * b, (a, b)


def test_loss_components_are_returned_and_only_the_loss_is_differentiated(graph_mode):
    loss_cell = TwoTermLoss()
    optimizer = nn.SGD([loss_cell.w], learning_rate=0.1)
    step = TrainStep(loss_cell, optimizer, max_grad_norm=None)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    w = loss_cell.w.asnumpy().copy()
    result = step(Tensor(x))
    a, b = ((w * x).mean()) ** 2, w.mean() ** 2
    assert result.components == pytest.approx({"square": a, "weight": b}, rel=1e-6)
    assert result.loss == pytest.approx(a + 0.5 * b, rel=1e-6)
    # d/dw [mean(wx)^2 + 0.5 mean(w)^2] = 2 mean(wx) x / n + mean(w) / n; SGD moves w by -0.1 of it
    grad = 2 * (w * x).mean() * x / 3 + w.mean() / 3
    np.testing.assert_allclose(loss_cell.w.asnumpy(), w - 0.1 * grad, rtol=1e-5)


def test_trainer_logs_components_and_checkpoints_only_the_given_cells(tmp_path, graph_mode):
    """A distillation-shaped run: frozen teacher, trainable student + projection, injected optimizer."""
    ms.set_seed(0)
    config = NezhaConfig(**TINY, hidden_dropout=0.1, attention_dropout=0.1)
    teacher = NezhaForSequenceClassification(config, 2)
    student = NezhaForSequenceClassification(config, 2)
    projection = nn.Dense(16, 16)

    class Distill(nn.Cell):
        component_names = ("logits", "hidden")

        def __init__(self):
            super().__init__()
            self.teacher = Frozen(teacher)
            self.student = student
            self.projection = projection

        def construct(self, input_ids, attention_mask, token_type_ids, label):
            teacher_logits = self.teacher(input_ids, attention_mask, token_type_ids)[0]
            student_logits = self.student(input_ids, attention_mask, token_type_ids)[0]
            logits = ops.square(student_logits - teacher_logits).mean()
            hidden = ops.square(self.projection(self.student.bert.embeddings.word_embeddings.embedding_table)).mean()
            return logits + 0.01 * hidden, (logits, hidden)

    teacher_before = {n: p.asnumpy().copy() for n, p in teacher.parameters_and_names()}
    data = tiny_task.columns()
    batches = ArrayBatches(data, tiny_task.ORDER, batch_size=8, seed=0)
    experiment = ExperimentConfig(model=config, train=TrainConfig(max_steps=3, log_every=1, save_every=3,
                                                                  eval_every=0, warmup_ratio=0.0))
    weights = student.trainable_params() + projection.trainable_params()
    optimizer = nn.Momentum(weights, learning_rate=1e-2, momentum=0.9)
    trainer = Trainer(experiment, student, Distill(), batches, tmp_path, optimizer=optimizer,
                      checkpoint_cells=[student, projection], log=lambda message: None)
    assert trainer.optimizer is optimizer
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3]
    assert all(r["loss"] == pytest.approx(r["loss_logits"] + 0.01 * r["loss_hidden"], rel=1e-5) for r in records)
    for name, value in teacher.parameters_and_names():  # the teacher did not move and has no optimizer state
        np.testing.assert_array_equal(value.asnumpy(), teacher_before[name], err_msg=name)
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    from ms_nlp_compress.models.checkpoint import read_safetensors

    saved = read_safetensors(checkpoint / "model.safetensors")
    assert not any("teacher" in name for name in saved)
    assert any(name.endswith("projection.weight") or name == "1.weight" for name in saved)
    optimizer_state = read_safetensors(checkpoint / "optimizer.safetensors")
    assert any("moments" in name for name in optimizer_state)  # Momentum's own state was saved
    # a fresh trainer resumes the same cells from it
    projection_after = projection.weight.asnumpy().copy()
    projection.weight.set_data(Tensor(np.zeros((16, 16), np.float32)))
    again = Trainer(experiment, student, Distill(), batches, tmp_path, optimizer=optimizer,
                    checkpoint_cells=[student, projection], log=lambda message: None)
    again.resume()
    np.testing.assert_array_equal(projection.weight.asnumpy(), projection_after)


# ---------------------------------------------------------------------------------------------------------------
# Frozen teacher
# ---------------------------------------------------------------------------------------------------------------
def test_a_frozen_teacher_stays_in_eval_mode_inside_a_training_cell(graph_mode):
    ms.set_seed(1)
    config = NezhaConfig(**TINY, hidden_dropout=0.3, attention_dropout=0.3)

    class Holder(nn.Cell):
        def __init__(self, teacher, student):
            super().__init__()
            self.teacher, self.student = teacher, student

        def construct(self, ids):
            return self.teacher(ids)[0], self.student(ids)[0]

    ids = Tensor(np.arange(12).reshape(2, 6) % 30, ms.int32)
    bare_teacher = NezhaForSequenceClassification(config, 2)
    eval_logits = bare_teacher(ids)[0].asnumpy()  # a fresh cell is in eval mode
    holder = Holder(Frozen(bare_teacher), NezhaForSequenceClassification(config, 2))
    holder.set_train(True)
    first, second = holder(ids), holder(ids)
    np.testing.assert_array_equal(first[0].asnumpy(), second[0].asnumpy())
    np.testing.assert_allclose(first[0].asnumpy(), eval_logits, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(first[1].asnumpy(), second[1].asnumpy())  # the student's dropout is on
    assert all(not name.startswith("teacher") for name in (p.name for p in holder.trainable_params()))
    # the control: the same teacher unwrapped is put in training mode by set_train and draws dropout masks
    control = Holder(NezhaForSequenceClassification(config, 2), NezhaForSequenceClassification(config, 2))
    control.set_train(True)
    assert not np.array_equal(control(ids)[0].asnumpy(), control(ids)[0].asnumpy())


# ---------------------------------------------------------------------------------------------------------------
# Per-rank, resumable random streams
# ---------------------------------------------------------------------------------------------------------------
def test_random_streams_differ_across_ranks_and_resume_exactly(graph_mode):
    assert len({stream_seed(s, r) for s in range(40, 50) for r in range(8)}) == 80  # seed + rank would collide
    draws = {}
    for rank in (0, 1):
        set_dropout_seed(42, rank)
        stream = RandomStream(site=7)
        draws[rank] = [stream((64, 256)).asnumpy() for _ in range(3)]
    assert not np.array_equal(draws[0][0], draws[1][0])
    # independent: correlation within 4 standard errors (1/sqrt(16384) = 0.0078) of 0
    assert abs(np.corrcoef(draws[0][0].ravel(), draws[1][0].ravel())[0, 1]) < 0.032
    for values in draws[0]:  # uniform on [0, 1): mean 1/2 (s.e. 0.0023), variance 1/12
        assert 0 <= values.min() and values.max() < 1
        assert abs(values.mean() - 0.5) < 0.01 and abs(values.var() - 1 / 12) < 0.003
    # resume: a new stream whose counter is restored to 1 continues with the second draw
    set_dropout_seed(42, 0)
    resumed = RandomStream(site=7)
    resumed.rng_counter.set_data(Tensor(1, ms.int32))
    np.testing.assert_array_equal(resumed((64, 256)).asnumpy(), draws[0][1])
    # dropout masks of two ranks differ too
    masks = []
    for rank in (0, 1):
        set_dropout_seed(42, rank)
        dropout = StatelessDropout(0.5, site=3)
        dropout.set_train(True)
        masks.append(dropout(Tensor(np.ones((8, 64), np.float32))).asnumpy() > 0)
    assert 0.3 < (masks[0] != masks[1]).mean() < 0.7
    set_dropout_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# User model settings against a checkpoint's config
# ---------------------------------------------------------------------------------------------------------------
def _saved_model(tmp_path):
    from ms_nlp_compress.models.checkpoint import save_model_dir
    from ms_nlp_compress.models.nezha import NezhaModel

    config = NezhaConfig(**TINY, hidden_dropout=0.2, attention_dropout=0.2)
    return save_model_dir(NezhaModel(config), tmp_path / "backbone", config)


def test_run_time_model_keys_come_from_the_user_and_architecture_from_the_checkpoint(tmp_path):
    from ms_nlp_compress.train.finetune import model_config_for

    directory = _saved_model(tmp_path)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"pretrained: {directory}\nmodel:\n  kernels: fused\n  hidden_dropout: 0.3\n")
    config = load_config(config_file, ["model.dropout_impl=native"])
    model_config = model_config_for(config, directory)
    assert (model_config.kernels, model_config.hidden_dropout, model_config.dropout_impl) == ("fused", 0.3, "native")
    assert model_config.attention_dropout == 0.2  # not written by the user: the checkpoint's
    assert (model_config.hidden_size, model_config.num_layers, model_config.vocab_size) == (16, 2, 30)
    # an architecture value equal to the checkpoint's is fine; a different one is an error naming it
    assert model_config_for(load_config(config_file, ["model.hidden_size=16", "model.num_heads=2"]), directory).hidden_size == 16
    with pytest.raises(ConfigError, match=r"run.yaml.*model.num_layers is 4 but the checkpoint .* has 2.*"
                                          r"--set model.num_layers=2"):
        model_config_for(load_config(config_file, ["model.num_layers=4"]), directory)
    # architecture inherited from a preset (`base:`) yields to the checkpoint: a preset for MiniLM serves any
    # checkpoint; a run-time key from the preset still applies
    preset = tmp_path / "preset.yaml"
    preset.write_text("model:\n  num_layers: 6\n  hidden_size: 384\n  num_heads: 12\n  attention_dropout: 0.05\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: preset.yaml\npretrained: {directory}\n")
    inherited = model_config_for(load_config(child), directory)
    assert (inherited.num_layers, inherited.hidden_size, inherited.attention_dropout) == (2, 16, 0.05)
    with pytest.raises(ConfigError, match="child.yaml.*model.num_layers is 6"):
        model_config_for(load_config(child, ["model.num_layers=6"]), directory)


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------
def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_replacing_a_checkpoint_never_leaves_no_complete_copy(tmp_path, monkeypatch):
    cell = nn.Dense(2, 2)
    save_checkpoint(tmp_path, "step-0000001", cell, [], {"updates": 1}, keep=2)
    original = cell.weight.asnumpy().copy()
    cell.weight.set_data(Tensor(original + 1))
    real_replace = os.replace
    calls = []

    def kill_after_moving_the_old_one_aside(source, destination):
        if Path(destination).name.startswith((".retired-", "step-")):
            calls.append((Path(source).name, Path(destination).name))
        real_replace(source, destination)
        if Path(destination).name.startswith(".retired-"):
            raise KeyboardInterrupt("killed")  # the process dies right after moving the old copy aside

    monkeypatch.setattr(os, "replace", kill_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "step-0000001", cell, [], {"updates": 1}, keep=2)
    monkeypatch.undo()
    assert calls == [("step-0000001", ".retired-step-0000001")]
    path = latest_checkpoint(tmp_path)  # falls back to the retired complete copy
    cell.weight.set_data(Tensor(np.zeros((2, 2), np.float32)))
    assert load_checkpoint(path, cell, []) == {"updates": 1}
    np.testing.assert_array_equal(cell.weight.asnumpy(), original)


# ---------------------------------------------------------------------------------------------------------------
# The launcher reads the config's parallel section
# ---------------------------------------------------------------------------------------------------------------
def test_launch_settings_come_from_the_config_and_the_environment_overrides(tmp_path):
    from ms_nlp_compress.parallel.launch import launch_settings

    config_file = tmp_path / "dp.yaml"
    config_file.write_text("parallel:\n  world_size: 2\n  master_port: 9123\n  cluster_timeout: 77\n")
    settings = launch_settings(["finetune", "--config", str(config_file)], environ={})
    assert settings == {"MSNC_MASTER_PORT": "9123", "MSNC_CLUSTER_TIMEOUT": "77", "MSNC_RANK_TABLE_FILE": ""}
    settings = launch_settings(["finetune", "--config", str(config_file), "--set", "parallel.master_port=9200"],
                               environ={"CLUSTER_TIMEOUT": "30"})
    assert settings["MSNC_MASTER_PORT"] == "9200" and settings["MSNC_CLUSTER_TIMEOUT"] == "30"
    with pytest.raises(ConfigError, match=r"dp.yaml: parallel.rank_table_file: rank table .*table.json not found"):
        launch_settings(["finetune", "--config", str(config_file), "--set",
                         f"parallel.rank_table_file={tmp_path / 'table.json'}"], environ={})
    with pytest.raises(ConfigError, match="unknown key.*parallel.gradients_mean"):
        launch_settings(["finetune", "--config", str(config_file), "--set", "parallel.gradients_mean=true"], {})


def test_a_refused_thread_count_is_an_error_not_silence():
    """MindSpore takes the CPU thread count once per process; a second, different request must not pass silently.
    Runs in a subprocess: the setting is process-wide."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        from ms_nlp_compress.errors import ConfigError
        from ms_nlp_compress.runtime import set_cpu_threads
        set_cpu_threads(2)
        set_cpu_threads(2)  # the same count again: fine
        try:
            set_cpu_threads(3)
        except ConfigError as err:
            print("REFUSED", err)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED runtime.cpu_threads: MindSpore refused 3 threads (this process already set 2)" in result.stdout


def test_after_update_runs_once_per_applied_update_and_sees_the_new_weights(tmp_path, graph_mode):
    """The hook LAT needs: called after each optimizer update (here every 2 micro-batches), never before it."""
    seen = []
    trainer, model = tiny_task.build(tmp_path, max_steps=3, gradient_accumulation=2, eval_every=0, save_every=0)
    trainer.after_update = lambda: seen.append((int(trainer.optimizer.global_step.asnumpy().item()),
                                                model.classifier.weight.asnumpy().copy()))
    before = model.classifier.weight.asnumpy().copy()
    trainer.fit()
    assert [step for step, _ in seen] == [1, 2, 3]
    assert not np.array_equal(seen[0][1], before)  # the first call already sees the first update's weights
    np.testing.assert_array_equal(seen[-1][1], model.classifier.weight.asnumpy())


def test_a_final_evaluation_lost_to_a_crash_runs_on_resume(tmp_path, graph_mode):
    """Killed after the final checkpoint but before the final evaluation: the resumed run evaluates the final
    weights (and selects the best model) instead of finding nothing left to do and never writing `best/`."""
    trainer, _ = tiny_task.build(tmp_path, max_steps=4, eval_every=0, save_every=4, rows=48)

    def crash():
        raise KeyboardInterrupt("killed during the final evaluation")

    trainer.evaluate = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-0000004"  # saved before the crash
    resumed, _ = tiny_task.build(tmp_path, max_steps=4, eval_every=0, save_every=4, rows=48)
    best = []
    resumed.on_best = lambda metrics, update: best.append(update)
    result = resumed.fit()
    assert result.resumed_from.endswith("step-0000004") and best == [4] and result.best_step == 4
    assert "acc" in result.last_eval
    again, _ = tiny_task.build(tmp_path, max_steps=4, eval_every=0, save_every=4, rows=48)
    again.evaluate = crash  # evaluated and saved: a third start has nothing left to do
    assert again.fit().best_step == 4
