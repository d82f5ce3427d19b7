"""Scheme 2 (sharded low-bit worker/server) driven by the engine.

One process: TrainStep with the update cell (accumulation, dynamic loss scale with a skipped overflow, clipping
that bites, a warm-up schedule starting at lr 0; plain, with error feedback, and with 2 fp32 warm-up updates then
error feedback; the separate-members path) equals a numpy twin of the low-bit mean (or the exact mean), the
residual, the global-norm clip and the owner's AdamW; low-bit weights from the first forward; refused
combinations name their key.

2 msrun ranks, `msnc finetune` (the CLI, through tests/parallel/sharded_trainer_worker.py which only records):
4-bit gradients with fp32 weights, one fp32 warm-up update, then error feedback, equal a numpy twin update by
update (reference gradients from a fresh model at the twin's weights, each rank's noise recomputed from the stream
hash, each rank's residual), ranks bit-identical; with TWN weights the model's Parameters are ternary per bucket;
kill -9 of the launch after a low-bit update's checkpoint, then the same command, ends with the uninterrupted
run's weights and per-rank state (residuals included), bit for bit.
"""
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
from mindspore import Parameter, Tensor, nn, ops

import lowbit_twin as twin
from ms_nlp_compress.config import ExperimentConfig, NezhaConfig, TrainConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.checkpoint import read_safetensors
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.parallel.comm_config import CommConfig
from ms_nlp_compress.parallel.lowbit import GRADIENT_NOISE_SITE
from ms_nlp_compress.parallel.sharded import ShardedLowBitUpdate
from ms_nlp_compress.train.step import LossScaler, TrainStep

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))  # tiny_task

WORKER = Path(__file__).resolve().parent / "sharded_trainer_worker.py"
BUCKET = 64
SEED = 3
BETA1, BETA2, EPS = 0.9, 0.999, 1e-6  # the owner's Adam: build_optimizer's betas, train.adam_epsilon's default


# ----------------------------------------------------------------------------------------------------------------
# numpy twins (written from the maths; lowbit_twin supplies the noise hash and the quantizer)
# ----------------------------------------------------------------------------------------------------------------
def decayed(name: str) -> bool:
    """AdamW's decay rule, restated: not biases, not LayerNorm gamma / beta."""
    return name.rsplit(".", 1)[-1] not in ("bias", "beta", "gamma") and "layer_norm" not in name.lower()


def warmup_linear(step: int, peak: float, total: int, warmup: int) -> float:
    if step < warmup:
        return peak * step / max(warmup, 1)
    return peak * min(max((total - step) / max(total - warmup, 1), 0.0), 1.0)


def low_bit_mean(flats, seed, draw, groups, bits):
    """Mean over ranks of each rank's stochastic codes (noise draw `draw` of each rank's stream)."""
    padded = groups * BUCKET
    scales = [twin.reference_scales(flat, [BUCKET] * groups, 3.0).astype(np.float32) for flat in flats]
    noises = [twin.stream_uniforms(seed, rank, GRADIENT_NOISE_SITE, draw, padded) for rank in range(len(flats))]
    mean, _ = twin.exchange_mean(flats, scales, noises, [BUCKET] * groups, bits)
    return mean


def clip(mean, max_norm):
    norm = float(np.sqrt(np.sum(mean.astype(np.float64) ** 2)))
    factor = 1.0 if max_norm is None else min(max_norm / (norm + 1e-6), 1.0)
    return (mean * np.float32(factor)).astype(np.float32), norm


def adamw(master, moment1, moment2, gradient, step, lr, mask, decay):
    f = np.float32
    moment1 = (f(BETA1) * moment1 + f(1 - BETA1) * gradient).astype(np.float32)
    moment2 = (f(BETA2) * moment2 + f(1 - BETA2) * gradient * gradient).astype(np.float32)
    direction = moment1 / f(1 - BETA1 ** step) / (np.sqrt(moment2 / f(1 - BETA2 ** step)) + f(EPS))
    return (master - f(lr) * (direction + f(decay) * mask * master)).astype(np.float32), moment1, moment2


def fused(arrays, padded):
    flat = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])
    return np.concatenate([flat, np.zeros(padded - flat.size, np.float32)])


# ----------------------------------------------------------------------------------------------------------------
# One process: the engine's update-cell path
# ----------------------------------------------------------------------------------------------------------------
class SquaredError(nn.Cell):
    """mean((x W + b - y)^2): gradients with a closed form for the twin."""

    def __init__(self, rng):
        super().__init__()
        self.weight = Parameter(Tensor(rng.normal(size=(12, 10)).astype(np.float32)), name="dense.weight")
        self.bias = Parameter(Tensor(rng.normal(size=(10,)).astype(np.float32)), name="dense.bias")

    def construct(self, x, y):
        error = ops.matmul(x, self.weight) + self.bias - y
        return (error * error).mean()


def squared_error_grads(weight, bias, x, y):
    error = (x.astype(np.float64) @ weight + bias - y)
    scale = 2.0 / error.size
    return [(x.T @ error * scale).astype(np.float32), (error.sum(0) * scale).astype(np.float32)]


class TwoMembers(nn.Cell):
    """A loss cell whose gradient is the sum of two members' (the separate-members path of TrainStep)."""

    component_names = ("first", "second")

    def __init__(self, member):
        super().__init__(auto_prefix=False)
        self.member = member

    @property
    def separate_members(self):
        return (self.member, self.member)


@pytest.mark.parametrize("error_feedback, warmup_steps, overflows, calls", [
    (False, 0, (2,), 5),
    (True, 0, (2,), 5),  # the skipped update 3 must keep the residual
    (True, 2, (1, 4), 6),  # fp32 for applied updates 1-2 (a skipped call between them), then low-bit + residual
], ids=["plain", "error_feedback", "warmup_then_error_feedback"])
def test_update_cell_step_matches_twin_with_accumulation_overflow_and_schedule(graph_mode, error_feedback,
                                                                               warmup_steps, overflows, calls):
    set_dropout_seed(SEED, 0)
    rng = np.random.default_rng(0)
    cell = SquaredError(rng)
    params = [cell.weight, cell.bias]
    groups = -(-130 // BUCKET)  # 130 entries -> 3 buckets of 64, zero padded
    padded = groups * BUCKET
    max_norm, peak, total, warmup = 0.5, 0.05, 4, 2
    comm = CommConfig(scheme="sharded", gradient_bits=3, bucket_size=BUCKET, error_feedback=error_feedback,
                      warmup_steps=warmup_steps)
    update = ShardedLowBitUpdate(params, comm, 1, 0, optimizer="adam", beta1=BETA1, beta2=BETA2, eps=EPS,
                                 weight_decay=0.1, decay_flags=[True, False], max_grad_norm=max_norm)
    step = TrainStep(cell, None, LossScaler("dynamic", 1024.0), accumulation=2, update_cell=update,
                     learning_rate=lambda t: warmup_linear(t, peak, total, warmup))
    mask = fused([np.ones(120), np.zeros(10)], padded)
    master = initial = fused([p.asnumpy() for p in params], padded)
    moment1, moment2 = np.zeros(padded, np.float32), np.zeros(padded, np.float32)
    residual = np.zeros(padded, np.float32)
    draw, applied, norms, fp32_calls = 0, 0, [], 0

    def state():  # copies: asnumpy() may share the Parameter's memory, which the next call overwrites
        carried = [update.residual] if error_feedback else []
        return [value.asnumpy().copy() for value in [update.master, update.moment1] + carried + params]

    # an inf in a micro-batch of the calls in `overflows`: skipped (nothing moves, the scale halves); a low-bit
    # call still draws its noise, a warm-up call draws none
    for call in range(calls):
        batches = [(rng.normal(size=(6, 12)).astype(np.float32), rng.normal(size=(6, 10)).astype(np.float32))
                   for _ in range(2)]
        if call in overflows:
            batches[1][0][0, 0] = np.inf
        warming = applied < warmup_steps
        before = state()
        results = [step(Tensor(x), Tensor(y)) for x, y in batches]
        assert not results[0].boundary and results[1].boundary
        draw += not warming
        fp32_calls += warming
        if call in overflows:
            skipped = sum(index <= call for index in overflows)
            assert not results[1].applied and step.scaler.scale == 1024.0 / 2 ** skipped
            for old, new in zip(before, state()):
                np.testing.assert_array_equal(old, new)
            continue
        weight, bias = master[:120].reshape(12, 10), master[120:130]
        grads = [squared_error_grads(weight, bias, x, y) for x, y in batches]
        mean_grad = [(a + b) / np.float32(2) for a, b in zip(*grads)]  # the accumulation buffers' mean
        flat = fused(mean_grad, padded)
        if warming:
            mean = flat  # one rank: the exact fp32 mean is its own gradient
        else:
            corrected = flat + residual if error_feedback else flat
            mean = low_bit_mean([corrected], SEED, draw, groups, 3)  # one rank: its own dequantized codes
            if error_feedback:
                residual = (corrected - mean).astype(np.float32)
        gradient, norm = clip(mean, max_norm)
        norms.append(norm)
        applied += 1
        master, moment1, moment2 = adamw(master, moment1, moment2, gradient, applied,
                                         warmup_linear(applied - 1, peak, total, warmup), mask, 0.1)
        assert results[1].applied
        np.testing.assert_allclose(results[1].grad_norm, norm, rtol=1e-5)
        # float64 numpy gradients vs float32 MindSpore ones: a few float32 ulps through the quantizer and Adam
        np.testing.assert_allclose(update.moment1.asnumpy(), moment1, rtol=1e-5, atol=1e-7, err_msg=f"m {call}")
        np.testing.assert_allclose(update.master.asnumpy(), master, rtol=1e-5, atol=1e-6, err_msg=f"w {call}")
        if error_feedback:
            np.testing.assert_allclose(update.residual.asnumpy(), residual, rtol=1e-5, atol=1e-6,
                                       err_msg=f"residual {call}")
        written = np.concatenate([p.asnumpy().reshape(-1) for p in params])  # weight_bits null: the master itself
        np.testing.assert_array_equal(written, update.master.asnumpy()[:130])
    stats = update.comm_stats()
    assert update.updates_done() == applied == calls - len(overflows) and stats["comm_exchanges"] == calls
    assert stats["comm_fp32_exchanges"] == fp32_calls == (3 if warmup_steps else 0)
    assert update.exchange.noise.rng_counter.asnumpy() == draw == calls - fp32_calls
    sizes = update.bytes_per_step()
    assert sizes["warmup"] == 4 * padded + 4 * padded + 8  # fp32 all-reduce + fp32 weight shard + verdict
    assert stats["comm_bytes_sent"] == fp32_calls * sizes["warmup"] + (calls - fp32_calls) * sizes["lowbit"]
    assert max(norms) > max_norm  # the clip bit at least once
    assert np.abs(master - initial).max() > 0.01  # it trained (the first update, at lr 0, moved nothing)
    if error_feedback:
        assert np.abs(residual).max() > 0.01  # the residual carries real error (3-bit codes of ~unit gradients)


def test_separate_members_feed_the_update_cell(graph_mode):
    set_dropout_seed(SEED, 0)
    rng = np.random.default_rng(1)
    cell = SquaredError(rng)
    params = [cell.weight, cell.bias]
    groups = -(-130 // BUCKET)
    padded = groups * BUCKET
    update = ShardedLowBitUpdate(params, CommConfig(scheme="sharded", gradient_bits=4, bucket_size=BUCKET), 1, 0,
                                 optimizer="adam", beta1=BETA1, beta2=BETA2, eps=EPS, max_grad_norm=None)
    step = TrainStep(TwoMembers(cell), None, update_cell=update, learning_rate=lambda t: 0.01)
    master = fused([p.asnumpy() for p in params], padded)
    moment1, moment2 = np.zeros(padded, np.float32), np.zeros(padded, np.float32)
    for call in range(2):
        x, y = rng.normal(size=(5, 12)).astype(np.float32), rng.normal(size=(5, 10)).astype(np.float32)
        grads = squared_error_grads(master[:120].reshape(12, 10), master[120:130], x, y)
        result = step(Tensor(x), Tensor(y))
        assert result.applied and set(result.components) == {"first", "second"}
        flat = fused([g + g for g in grads], padded)  # the members' sum: the same member twice
        mean = low_bit_mean([flat], SEED, call + 1, groups, 4)
        master, moment1, moment2 = adamw(master, moment1, moment2, mean, call + 1, 0.01, np.zeros(padded), 0.0)
        np.testing.assert_allclose(update.master.asnumpy(), master, rtol=1e-5, atol=1e-6, err_msg=f"call {call}")


def test_low_bit_weights_from_the_first_forward():
    """With weight_bits the model starts at the TWN of its initial weights (every rank computes it alike); the
    owners' masters keep the full-precision values."""
    rng = np.random.default_rng(2)
    cell = SquaredError(rng)
    initial = fused([cell.weight.asnumpy(), cell.bias.asnumpy()], 3 * BUCKET)
    update = ShardedLowBitUpdate([cell.weight, cell.bias], CommConfig(scheme="sharded", bucket_size=BUCKET,
                                                                      weight_bits=2), 1, 0, learning_rate=0.1)
    start = fused([cell.weight.asnumpy(), cell.bias.asnumpy()], 3 * BUCKET)[:130]
    expected = twin.twn_buckets(initial, BUCKET)[:130]
    np.testing.assert_array_equal(start == 0, expected == 0)
    np.testing.assert_allclose(start, expected, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(update.master.asnumpy(), initial)


def tiny_experiment(**comm):
    config = ExperimentConfig(model=NezhaConfig(vocab_size=17, hidden_size=16, num_layers=1, num_heads=2,
                                                intermediate_size=32, max_relative_position=4),
                              train=TrainConfig(max_steps=2))
    config.comm = CommConfig(**comm)
    return config


def test_refused_combinations_name_the_key(tmp_path):
    import tiny_task
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification
    from ms_nlp_compress.train.batches import ArrayBatches
    from ms_nlp_compress.train.losses import SequenceClassificationLoss
    from ms_nlp_compress.train.optim import build_optimizer
    from ms_nlp_compress.train.trainer import Trainer

    def trainer(config, **kwargs):
        model = NezhaForSequenceClassification(config.model, 2)
        batches = ArrayBatches(tiny_task.columns(size=8), tiny_task.ORDER, batch_size=4, seed=0, rank=0,
                               world_size=2)
        return Trainer(config, model, SequenceClassificationLoss(model), batches, tmp_path, rank=0, world_size=2,
                       log=lambda message: None, **kwargs)

    sharded = dict(scheme="sharded", gradient_bits=4, bucket_size=BUCKET)
    with pytest.raises(ConfigError, match=r"^comm\.bucket_size"):
        trainer(tiny_experiment(**dict(sharded, bucket_size=0)))
    with pytest.raises(ConfigError, match=r"^comm\.weight_bits: .*scheme sharded"):
        tiny_experiment(scheme="allgather", weight_bits=2).comm.validate("comm")
    config = tiny_experiment(**sharded)
    model = NezhaForSequenceClassification(config.model, 2)
    optimizer = build_optimizer("adamw", model.trainable_params(), 0.01)
    with pytest.raises(ConfigError, match=r"^comm\.scheme: .*injects its own optimizer"):
        trainer(config, optimizer=optimizer)
    update = ShardedLowBitUpdate(model.trainable_params(), CommConfig(**sharded), 1, 0, learning_rate=0.1)
    with pytest.raises(ConfigError, match=r"^comm\.scheme: an update cell"):
        TrainStep(SequenceClassificationLoss(model), optimizer, update_cell=update, learning_rate=lambda t: 0.1)


# ----------------------------------------------------------------------------------------------------------------
# 2 msrun ranks: msnc finetune with comm.scheme sharded
# ----------------------------------------------------------------------------------------------------------------
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "a", "plot", "very"]
UPDATES, MAX_NORM, PEAK = 4, 0.05, 0.01
WARMUP = 1  # comm.warmup_steps of the msrun runs: update 1 exchanges fp32, updates 2-4 low-bit with error feedback
MODEL = NezhaConfig(vocab_size=17, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                    max_relative_position=8, hidden_dropout=0.0, attention_dropout=0.0)


def write_task(root: Path) -> Path:
    """A tiny SST-2-format task, its vocabulary, a saved initial classifier (so the twin knows the starting
    weights exactly) and the finetune config; returns the config path."""
    from ms_nlp_compress.models.checkpoint import save_model_dir
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

    rng = np.random.default_rng(0)
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", 32), ("dev", 8)):
        lines = ["sentence\tlabel"]
        for _ in range(rows):
            label = int(rng.integers(0, 2))
            words = list(rng.choice(WORDS[6:], 4))
            words.insert(int(rng.integers(0, 5)), rng.choice(WORDS[:3] if label else WORDS[3:6]))
            lines.append(" ".join(words) + f"\t{label}")
        (root / "sst2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    ms.set_seed(0)
    save_model_dir(NezhaForSequenceClassification(MODEL, 2), root / "initial", MODEL)
    config = root / "tiny.yaml"
    config.write_text(f"""
output_dir: {root / 'reference'}
pretrained: {root / 'initial'}
runtime: {{device: cpu, mode: graph, cpu_threads: 1, seed: {SEED}}}
model: {{hidden_dropout: 0.0, attention_dropout: 0.0}}
data: {{task: sst2, data_dir: {root / 'sst2'}, vocab: {root / 'vocab.txt'}, max_length: 10, batch_size: 4,
        eval_batch_size: 8}}
train: {{learning_rate: {PEAK}, max_steps: {UPDATES}, warmup_ratio: 0.5, eval_every: 0, save_every: 1,
         keep_checkpoints: 10, log_every: 1, max_grad_norm: {MAX_NORM}}}
comm: {{scheme: sharded, gradient_bits: 4, weight_bits: null, bucket_size: {BUCKET}, error_feedback: true,
        warmup_steps: {WARMUP}}}
""")
    return config


def msrun(root: Path, name: str, commands, port: int, env_extra=None, background=False):
    """msrun with 2 ranks of the recording worker; `commands` are msnc argument lists (run one after another)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **(env_extra or {}))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    arguments = []
    for command in commands:
        arguments += (["::"] if arguments else []) + list(command) + ["--set", "parallel.world_size=2"]
    command = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
               "--master_addr=127.0.0.1", f"--master_port={port}", f"--log_dir={root / f'logs_{name}'}",
               "--join=True", "--cluster_time_out=90", str(WORKER), str(root / f"record_{name}"), *arguments]
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (root / f"logs_{name}").glob("worker_*.log"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One launch, two `msnc finetune` runs (error feedback, 1 fp32 warm-up update): 4-bit gradients with fp32
    weights, then TWN weights (3 updates)."""
    root = tmp_path_factory.mktemp("sharded")
    config = write_task(root)
    msrun(root, "reference", [["finetune", "--config", str(config)],
                              ["finetune", "--config", str(config), "--set", "comm.weight_bits=2",
                               "--set", "train.max_steps=3", "--set", f"output_dir={root / 'ternary'}"]],
          port=8281)
    return root


def descendants(pid: int):
    """Every process below `pid` (msrun starts each worker in a session of its own, so killing msrun's process
    group would leave the workers training)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            child = int(stat.parent.name)
            found += [child] + descendants(child)
    return found


def kill_launch(launch: subprocess.Popen) -> None:
    """kill -9 of msrun and every process it started, then wait until all are gone."""
    victims = descendants(launch.pid) + [launch.pid]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launch.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in victims) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in victims)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by its (killed) parent


def rank_state(root: Path, run: str, update: int, rank: int):
    return read_safetensors(root / run / "checkpoints" / f"step-{update:07d}.rank{rank}.safetensors")


def reference_gradients(model, grad_fn, weights, batch):
    """The loss gradients of a fresh model (PyNative) set to `weights`, on one recorded batch."""
    for name, param in model.parameters_and_names():
        if name in weights:
            param.set_data(Tensor(weights[name]))
    _, grads = grad_fn(*[Tensor(column) for column in batch])
    return [grad.asnumpy() for grad in grads]


def test_msnc_finetune_sharded_matches_twin_and_ranks_agree(reference):
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification
    from ms_nlp_compress.train.losses import SequenceClassificationLoss

    root = reference
    model = NezhaForSequenceClassification(MODEL, 2)
    params = model.trainable_params()
    names = [p.name for p in params]
    grad_fn = ms.value_and_grad(SequenceClassificationLoss(model), None, params)
    initial = read_safetensors(root / "initial" / "model.safetensors")
    sizes = [int(np.prod(p.shape)) for p in params]
    groups = -(-sum(sizes) // (2 * BUCKET)) * 2  # whole buckets per rank
    padded, shard = groups * BUCKET, groups * BUCKET // 2
    mask = fused([np.full(size, float(decayed(name))) for name, size in zip(names, sizes)], padded)
    master = fused([initial[name] for name in names], padded)
    moment1, moment2 = np.zeros(padded, np.float32), np.zeros(padded, np.float32)
    residuals = [np.zeros(padded, np.float32) for _ in (0, 1)]
    records = [np.load(root / "record_reference" / "0" / f"batches_{rank}.npz") for rank in (0, 1)]
    assert all(int(record["count"]) == UPDATES for record in records)
    logged = [json.loads(line) for line in (root / "reference" / "metrics.jsonl").read_text().splitlines()]
    logged = [entry for entry in logged if entry["type"] == "train"]
    clipped = 0
    for update in range(1, UPDATES + 1):
        if update > 1:
            # One update at a time, from the engine's state after the previous update (which the twin matched
            # there): the twin's gradients (PyNative) and scales (float64) differ from the graph's by float32
            # ulps, a carried residual keeps such differences, and one of them can move a stochastic rounding
            # decision across its noise draw; in a bucket of ~1e-5 gradients Adam's normalisation turns that one
            # level into a ~1e-3 weight difference, and every later update would inherit it (seen at update 4).
            previous = [rank_state(root, "reference", update - 1, rank) for rank in (0, 1)]
            master, moment1, moment2 = (np.concatenate([state[key] for state in previous])
                                        for key in ("master", "moment1", "moment2"))
            residuals = [state["residual"] for state in previous]
        weights = dict(zip(names, np.split(master[:sum(sizes)], np.cumsum(sizes)[:-1])))
        weights = {name: value.reshape(initial[name].shape) for name, value in weights.items()}
        flats = []
        for rank, record in enumerate(records):
            batch = [record[f"b{update - 1}_c{column}"] for column in range(4)]
            flats.append(fused(reference_gradients(model, grad_fn, weights, batch), padded))
        assert not np.array_equal(records[0][f"b{update - 1}_c0"], records[1][f"b{update - 1}_c0"])  # own data
        draw = update - WARMUP  # the warm-up draws no rounding noise
        if update <= WARMUP:
            mean = ((flats[0] + flats[1]) / np.float32(2)).astype(np.float32)  # the fp32 all-reduce's mean
        else:
            corrected = [flat + residual for flat, residual in zip(flats, residuals)]
            scales = [twin.reference_scales(flat, [BUCKET] * groups, 3.0).astype(np.float32) for flat in corrected]
            noises = [twin.stream_uniforms(SEED, rank, GRADIENT_NOISE_SITE, draw, padded) for rank in (0, 1)]
            mean, sent = twin.exchange_mean(corrected, scales, noises, [BUCKET] * groups, 4)
            residuals = [(flat - own).astype(np.float32) for flat, own in zip(corrected, sent)]
        gradient, norm = clip(mean, MAX_NORM)
        clipped += norm > MAX_NORM
        lr = warmup_linear(update - 1, PEAK, UPDATES, UPDATES // 2)
        master, moment1, moment2 = adamw(master, moment1, moment2, gradient, update, lr, mask, 0.01)
        entry = logged[update - 1]
        assert entry["update"] == update and entry["lr"] == pytest.approx(lr, abs=1e-12)
        assert entry["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the MEAN gradient's norm, before the clip
        states = [rank_state(root, "reference", update, rank) for rank in (0, 1)]
        for rank, state in enumerate(states):  # each owner: its shard of the twin's master and moments
            own = slice(rank * shard, (rank + 1) * shard)
            np.testing.assert_allclose(state["master"], master[own], rtol=2e-5, atol=2e-6,
                                       err_msg=f"update {update} rank {rank}")
            np.testing.assert_allclose(state["moment1"], moment1[own], rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(state["moment2"], moment2[own], rtol=2e-5, atol=1e-10)
            # each rank's residual covers its whole gradient (it compressed all of it), not only its shard
            np.testing.assert_allclose(state["residual"], residuals[rank], rtol=2e-5, atol=2e-7,
                                       err_msg=f"residual update {update} rank {rank}")
            assert state["updates"].item() == update and state["noise.rng_counter"].item() == draw
            assert state["fp32_calls"].item() == min(update, WARMUP)
        assert (update <= WARMUP) == (not np.abs(states[0]["residual"]).max() > 0)  # untouched by the warm-up
        if update > WARMUP:
            assert not np.array_equal(states[0]["residual"], states[1]["residual"])  # per rank: own data, own noise
        saved = read_safetensors(root / "reference" / "checkpoints" / f"step-{update:07d}" / "model.safetensors")
        engine_master = np.concatenate([state["master"] for state in states])
        # weight_bits null: the model Parameters ARE the gathered masters, bit for bit
        np.testing.assert_array_equal(fused([saved[name] for name in names], padded)[:sum(sizes)],
                                      engine_master[:sum(sizes)])
    assert clipped >= 1  # the clip of the mean gradient bit at least once
    assert np.abs(master - fused([initial[name] for name in names], padded)).max() > 0.005  # it trained
    finals = [dict(np.load(root / "record_reference" / "0" / f"final_{rank}.npz")) for rank in (0, 1)]
    for name in finals[0]:
        np.testing.assert_array_equal(finals[0][name], finals[1][name], err_msg=f"ranks differ on {name}")
    trainer_notes = [json.loads((root / "record_reference" / "0" / f"trainer_{rank}.json").read_text())
                     for rank in (0, 1)]
    assert trainer_notes[0]["comm"] == trainer_notes[1]["comm"]
    stats = trainer_notes[0]["comm"]
    words = -(-padded // 8)  # 4-bit codes, 8 per int32 word
    assert stats["comm_gradient_bytes_per_step"] == 4 * words + 4 * groups
    assert stats["comm_weight_bytes_per_step"] == 4 * shard  # fp32 master shard
    assert stats["comm_fp32_exchanges"] == WARMUP and stats["comm_lowbit_exchanges"] == UPDATES - WARMUP
    assert stats["comm_bytes_per_warmup_step"] == 4 * padded + 4 * shard + 8  # fp32 all-reduce + weights + verdict
    assert stats["comm_bytes_sent"] == (WARMUP * stats["comm_bytes_per_warmup_step"] + (UPDATES - WARMUP)
                                        * stats["comm_bytes_per_lowbit_step"]) == logged[-1]["comm_bytes_sent"]
    assert trainer_notes[0]["optimizer"].startswith("comm.scheme: with scheme sharded")
    # rank 0's directory has no optimizer state: the moments live in the rank files only
    assert read_safetensors(root / "reference" / "checkpoints" / "step-0000004" / "optimizer.safetensors") == {}


def trainable_names():
    """The trainable tensors in the engine's fused order (the update cell's Parameter order)."""
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

    return [p.name for p in NezhaForSequenceClassification(MODEL, 2).trainable_params()]


def test_msnc_finetune_sharded_ternary_weights(reference):
    root = reference
    names = trainable_names()
    finals = [dict(np.load(root / "record_reference" / "1" / f"final_{rank}.npz")) for rank in (0, 1)]
    saved = read_safetensors(root / "ternary" / "checkpoints" / "step-0000003" / "model.safetensors")
    master = np.concatenate([rank_state(root, "ternary", 3, rank)["master"] for rank in (0, 1)])
    total = sum(saved[name].size for name in names)
    for rank in (0, 1):  # both ranks hold the weights rank 0 checkpointed
        for name in names:
            np.testing.assert_array_equal(finals[rank][name], saved[name], err_msg=f"rank {rank} {name}")
    weights = fused([saved[name] for name in names], master.size)[:total]
    zeros = 0
    for start in range(0, total, BUCKET):  # each bucket's values are in {-a, 0, a}
        magnitudes = set(np.unique(np.abs(weights[start:start + BUCKET])).tolist())
        assert len(magnitudes - {0.0}) == 1, (start, sorted(magnitudes))
        zeros += 0.0 in magnitudes
    assert zeros >= total // BUCKET // 2  # TWN's threshold really zeroes entries
    expected = twin.twn_buckets(master, BUCKET)[:total]  # TWN of the owners' fp32 masters, float64
    np.testing.assert_array_equal(weights == 0, expected == 0)
    np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=0)
    assert np.abs(master[:total] - weights).max() > 1e-3  # the masters stay full precision


def test_kill_minus_nine_mid_run_resumes_to_the_uninterrupted_weights(reference):
    root = reference
    command = ["finetune", "--config", str(root / "tiny.yaml"), "--set", f"output_dir={root / 'victim'}"]
    # the worker pauses 1 s before each micro-batch (test instrumentation), so the kill lands mid-run
    victim = msrun(root, "victim", [command], port=8282, env_extra={"SHARDED_WORKER_PAUSE": "1.0"},
                   background=True)
    pointer = root / "victim" / "checkpoints" / "LATEST"

    def latest():
        try:
            return pointer.read_text().strip()
        except OSError:
            return ""

    # wait for a checkpoint after a low-bit update: its residuals are non-zero, so the resume needs them
    first_lowbit = f"step-{WARMUP + 1:07d}"
    deadline = time.time() + 240
    while latest() < first_lowbit and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert len(descendants(victim.pid)) >= 2, "the launch's workers are not running"
    kill_launch(victim)
    assert victim.returncode == -signal.SIGKILL, "the launch finished before it could be killed"
    killed_at = pointer.read_text().strip()
    assert first_lowbit <= killed_at < f"step-{UPDATES:07d}", killed_at
    killed_update = int(killed_at.split("-")[1])
    for rank in (0, 1):
        assert np.abs(rank_state(root, "victim", killed_update, rank)["residual"]).max() > 0
    assert not (root / "victim" / "results.json").exists()
    msrun(root, "resumed", [command], port=8283)
    results = json.loads((root / "victim" / "results.json").read_text())
    assert results["resumed_from"].endswith(killed_at) and results["updates"] == UPDATES
    for rank in (0, 1):
        expected = dict(np.load(root / "record_reference" / "0" / f"final_{rank}.npz"))
        actual = dict(np.load(root / "record_resumed" / "0" / f"final_{rank}.npz"))
        assert expected.keys() == actual.keys()
        for name in expected:
            np.testing.assert_array_equal(expected[name], actual[name], err_msg=f"rank {rank} {name}")
        expected_state, actual_state = rank_state(root, "reference", UPDATES, rank), \
            rank_state(root, "victim", UPDATES, rank)
        for name in expected_state:  # master shard, moments, counters, noise counter
            np.testing.assert_array_equal(expected_state[name], actual_state[name], err_msg=f"rank {rank} {name}")
