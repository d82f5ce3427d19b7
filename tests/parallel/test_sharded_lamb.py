"""The sharded scheme's owner-side LAMB (parallel/sharded.py): per tensor, the trust ratio ||w|| / ||r|| over the
WHOLE tensor although tensors span shards.

Against a float64 numpy LAMB twin written from the definition (You et al. 2020; train/optim.py's
docstring: the bias-corrected AdamW direction r with decoupled decay, times ||w|| / ||r|| per tensor, 1 when either
norm is 0, biases and LayerNorms not decayed but still trust-scaled). One process:
- world size 1 end to end: three updates of `ShardedLowBitUpdate(optimizer="lamb")` driven by the exactly
  reproduced low-bit mean gradient, with a zero-initialised bias (||w|| = 0 at the first update), a tensor whose
  gradient is exactly 0 and is not decayed (||r|| = 0), LayerNorm / bias decay exclusion; the trust leg's bytes;
- two shards of a world-size-2 layout computed in one process by the per-shard maths (`ShardTrustRatio`), with the
  all-reduce replaced by the sum of the two ranks' (2 * n_tensors,) vectors: a tensor split across the shards gets
  its whole-tensor ratio on both, nonzero values planted in the padding never count.
2 msrun ranks (the real all-reduce): `msnc finetune` with train.optimizer lamb and comm.scheme sharded, 3 updates,
each rank's master and moment shards against the same twin on the reproduced low-bit mean of both ranks' gradients.
"""
import json

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

import lowbit_twin as twin
from ms_nlp_compress.models.dropout import set_dropout_seed
from ms_nlp_compress.parallel.comm_config import CommConfig
from ms_nlp_compress.parallel.lowbit import GRADIENT_NOISE_SITE
from ms_nlp_compress.parallel.sharded import ShardedLowBitUpdate, ShardTrustRatio
from ms_nlp_compress.train.checkpoints import load_rank_state, named_state, save_rank_state
from ms_nlp_compress.train.optim import decay_mask

# 35 + 13 + 72 + 1 + 6 = 127 entries -> 2 buckets of 64, one padding entry
TENSORS = [("encoder.dense.weight", (7, 5)), ("encoder.dense.bias", (13,)), ("encoder.LayerNorm.gamma", (3, 4, 6)),
           ("classifier.weight", (1,)), ("encoder.layer_norm.beta", (6,))]
BUCKET = 64


def decayed(name: str) -> bool:
    """The no-decay rule restated: biases and LayerNorm parameters are not decayed."""
    return name.rsplit(".", 1)[-1] not in ("bias", "beta", "gamma") and "layernorm" not in name.lower() \
        and "layer_norm" not in name.lower()


class Scales(nn.Cell):
    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer

    def construct(self, grads):
        return self.reducer.scales(self.reducer.fuse(grads))


def numpy_lamb(weights, moment1, moment2, grads, step, lr, beta1, beta2, eps, decay, decay_flags):
    """One LAMB update of a list of tensors in float64 (each tensor its own trust ratio); also the ratios."""
    new_weights, new_m, new_v, ratios = [], [], [], []
    for w, m, v, g, flag in zip(weights, moment1, moment2, grads, decay_flags):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        r = (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + eps)
        if flag:
            r = r + decay * w
        w_norm, r_norm = np.linalg.norm(w), np.linalg.norm(r)
        trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        new_weights.append(w - lr * trust * r)
        new_m.append(m)
        new_v.append(v)
        ratios.append(trust)
    return new_weights, new_m, new_v, ratios


def test_owner_lamb_matches_numpy_twin(graph_mode):
    set_dropout_seed(0, 0)  # the rounding-noise stream of rank 0
    rng = np.random.default_rng(5)
    values = [rng.normal(size=shape).astype(np.float32) for _, shape in TENSORS]
    values[0] *= 0.1  # tensor scales far from the Adam step's ~1 per entry: ratios far from 1 (LAMB is not AdamW)
    values[2] *= 4.0
    values[1][:] = 0.0  # a zero-initialised bias: ||w|| = 0 at the first update -> ratio 1 (a plain AdamW step)
    params = [Parameter(Tensor(value), name=name) for (name, _), value in zip(TENSORS, values)]
    flags = [decayed(name) for name, _ in TENSORS]
    assert flags == [True, False, False, True, False]
    lr, beta1, beta2, eps, decay = 0.01, 0.9, 0.98, 1e-6, 0.1
    comm = CommConfig(scheme="sharded", gradient_bits=4, bucket_size=BUCKET)
    update = ShardedLowBitUpdate(params, comm, 1, 0, learning_rate=lr, optimizer="lamb", beta1=beta1, beta2=beta2,
                                 eps=eps, weight_decay=decay, decay_flags=decay_mask(params))
    sizes = [int(np.prod(shape)) for _, shape in TENSORS]
    total, padded = sum(sizes), 2 * BUCKET
    # the trust leg: 2 floats per tensor in the all-reduce, counted in every update's bytes
    sizes_out = update.bytes_per_step()
    assert sizes_out["trust"] == 4 * 2 * len(TENSORS)
    assert sizes_out["lowbit"] == sizes_out["gradient"] + sizes_out["weight"] + 8 + 4 * 2 * len(TENSORS)

    weights = [value.astype(np.float64).reshape(-1) for value in values]
    moment1 = [np.zeros(size) for size in sizes]
    moment2 = [np.zeros(size) for size in sizes]
    for call in range(3):
        grads = [rng.standard_t(3, size=shape).astype(np.float32) for _, shape in TENSORS]
        grads[3][:] = 0.0  # no gradient but decayed: r = wd * w after the first update's Adam term, ratio ~ 1/wd
        grads[4][:] = 0.0  # a LayerNorm beta without gradient: r = 0 -> ratio 1, no 0/0
        inputs = ms.mutable(tuple(Tensor(g) for g in grads))
        flat = np.concatenate([g.reshape(-1) for g in grads] + [np.zeros(padded - total, np.float32)])
        noise = twin.stream_uniforms(0, 0, GRADIENT_NOISE_SITE, call + 1, padded)
        scales = Scales(update.exchange)(inputs).asnumpy()
        np.testing.assert_allclose(scales, twin.reference_scales(flat, [BUCKET, BUCKET], 3.0), rtol=2e-6)
        mean, _ = twin.exchange_mean([flat], [scales], [noise], [BUCKET, BUCKET], 4)
        pieces = np.split(mean[:total].astype(np.float64), np.cumsum(sizes)[:-1])
        weights, moment1, moment2, ratios = numpy_lamb(weights, moment1, moment2, pieces, call + 1, lr, beta1, beta2, eps,
                                               decay, flags)
        update(inputs)
        master = update.master.asnumpy()
        assert np.all(np.isfinite(master)), f"call {call}"
        # float32 graph vs float64 twin: each step's relative error is a few float32 ulps of the terms
        np.testing.assert_allclose(master[:total], np.concatenate(weights), rtol=2e-5, atol=2e-6,
                                   err_msg=f"call {call}")
        assert np.all(master[total:] == 0.0), "padding moved"
        # the cases this covers: LAMB is not AdamW (ratios far from 1), ||w|| = 0 then not, ||r|| = 0
        assert abs(ratios[0] - 1.0) > 0.5 and abs(ratios[2] - 1.0) > 0.5, ratios
        assert (ratios[1] == 1.0) == (call == 0) and ratios[4] == 1.0, ratios
        written = np.concatenate([p.asnumpy().reshape(-1) for p in params])  # weight_bits null: fp32 gathered
        np.testing.assert_array_equal(written, master[:total])
    assert int(update.adam_step.asnumpy()) == 3


def lamb_update(params, error_feedback=False):
    comm = CommConfig(scheme="sharded", gradient_bits=3, bucket_size=BUCKET, error_feedback=error_feedback)
    return ShardedLowBitUpdate(params, comm, 1, 0, learning_rate=0.01, optimizer="lamb", beta1=0.9, beta2=0.98,
                               eps=1e-6, weight_decay=0.1, decay_flags=decay_mask(params))


@pytest.mark.parametrize("error_feedback", [False, True], ids=["plain", "error_feedback"])
def test_owner_lamb_resumes_bit_for_bit_from_its_rank_state(graph_mode, error_feedback, tmp_path):
    """LAMB on the shard carries nothing beyond its rank state (master, moments, counters, noise counter,
    residual): 2 updates, the rank file written and read back by the Trainer's own save_rank_state /
    load_rank_state into a FRESH update cell over fresh Parameters (model weights copied), 2 more updates == 4
    uninterrupted updates, bit for bit (weights and every state tensor)."""
    rng = np.random.default_rng(9)
    values = [rng.normal(size=shape).astype(np.float32) for _, shape in TENSORS]
    grads = [[rng.standard_t(3, size=shape).astype(np.float32) for _, shape in TENSORS] for _ in range(4)]

    def fresh(weights):
        params = [Parameter(Tensor(value.copy()), name=name) for (name, _), value in zip(TENSORS, weights)]
        return params, lamb_update(params, error_feedback)

    def run(update, calls):
        for call in calls:
            update(ms.mutable(tuple(Tensor(g) for g in grads[call])))

    set_dropout_seed(0, 0)
    params, straight = fresh(values)
    run(straight, range(4))
    expected_weights, expected_state = [p.asnumpy().copy() for p in params], named_state(straight.rank_state_cells())

    set_dropout_seed(0, 0)
    first_params, first = fresh(values)
    run(first, range(2))
    saved_weights = [p.asnumpy().copy() for p in first_params]
    assert not np.array_equal(saved_weights[0], values[0])  # it moved
    if error_feedback:
        assert np.abs(named_state(first.rank_state_cells())["residual"]).max() > 0
    save_rank_state(tmp_path, "step-0000002", 0, 1, first.rank_state_cells())

    set_dropout_seed(0, 0)
    resumed_params, resumed = fresh(saved_weights)
    load_rank_state(tmp_path / "step-0000002", 0, 1, resumed.rank_state_cells())
    assert resumed.updates_done() == 2
    run(resumed, range(2, 4))
    for name, got, want in zip([n for n, _ in TENSORS], resumed_params, expected_weights):
        np.testing.assert_array_equal(got.asnumpy(), want, err_msg=name)
    final = named_state(resumed.rank_state_cells())
    assert final.keys() == expected_state.keys()
    for name, value in expected_state.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


class PartialSums(nn.Cell):
    def __init__(self, trust):
        super().__init__()
        self.trust = trust

    def construct(self, weights, update):
        return self.trust.partial_sums(weights, update)


class EntryTrust(nn.Cell):
    def __init__(self, trust):
        super().__init__()
        self.trust = trust

    def construct(self, sums):
        return self.trust.entry_trust(sums)


def test_two_shards_trust_ratio_is_per_whole_tensor(graph_mode):
    """World size 2 (shard = 1 bucket of 64): rank 0 holds tensor 0 (35), tensor 1 (13) and the first 16 entries of
    tensor 2; rank 1 the other 56 entries of tensor 2, tensors 3 and 4 and the padding entry."""
    rng = np.random.default_rng(11)
    sizes = [int(np.prod(shape)) for _, shape in TENSORS]
    total, shard = sum(sizes), BUCKET
    weights = rng.normal(size=2 * shard).astype(np.float32)
    update = rng.normal(size=2 * shard).astype(np.float32)
    weights[35:48] = 0.0  # tensor 1: ||w|| = 0 -> ratio 1
    update[120:121] = 0.0  # tensor 3: ||r|| = 0 -> ratio 1
    weights[total:], update[total:] = 7.0, -5.0  # padding never counts (it is 0 in a real run)
    # float64 twin: one ratio per whole tensor, the split tensor 2 included
    expected = np.ones(2 * shard)
    offset = 0
    for size in sizes:
        w, r = weights[offset:offset + size].astype(np.float64), update[offset:offset + size].astype(np.float64)
        w_norm, r_norm = np.linalg.norm(w), np.linalg.norm(r)
        expected[offset:offset + size] = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        offset += size
    assert sizes[0] + sizes[1] < shard < sizes[0] + sizes[1] + sizes[2]  # tensor 2 spans both shards
    cells = [ShardTrustRatio(sizes, rank * shard, shard) for rank in (0, 1)]
    partial = [PartialSums(cell)(Tensor(weights[r * shard:(r + 1) * shard]), Tensor(update[r * shard:(r + 1) * shard]))
               .asnumpy() for r, cell in enumerate(cells)]
    assert partial[0].shape == (2 * len(sizes),)
    # what the AllReduce (sum over ranks) of the two (2 * n_tensors,) vectors gives every rank
    summed = partial[0] + partial[1]
    np.testing.assert_allclose(summed[:len(sizes)], [np.sum(weights[o:o + s].astype(np.float64) ** 2) for o, s in
                                                     zip(np.cumsum([0] + sizes[:-1]), sizes)], rtol=1e-6)
    trust = np.concatenate([EntryTrust(cell)(Tensor(summed)).asnumpy() for cell in cells])
    np.testing.assert_allclose(trust[:total], expected[:total], rtol=1e-6)
    # the split tensor has ONE ratio on both shards, different from what either shard alone would give
    split = trust[48:120]
    np.testing.assert_allclose(split, np.full(72, split[0]), rtol=0)
    alone = EntryTrust(cells[0])(Tensor(partial[0])).asnumpy()[48:64]
    assert abs(alone[0] - split[0]) > 1e-3 * split[0]


# ----------------------------------------------------------------------------------------------------------------
# 2 msrun ranks: `msnc finetune` with train.optimizer lamb and comm.scheme sharded (the real all-reduce of the sums)
# ----------------------------------------------------------------------------------------------------------------
LAMB_UPDATES = 3


@pytest.fixture(scope="module")
def lamb_run(tmp_path_factory):
    """One launch of `msnc finetune` (tests/parallel/test_sharded_trainer.py's tiny task and recording worker):
    LAMB on the shard, 4-bit gradients, fp32 weights, 3 updates, no schedule warm-up (every update moves)."""
    import test_sharded_trainer as engine

    root = tmp_path_factory.mktemp("sharded_lamb")
    config = engine.write_task(root)
    engine.msrun(root, "lamb", [["finetune", "--config", str(config), "--set", "train.optimizer=lamb",
                                 "--set", f"train.max_steps={LAMB_UPDATES}", "--set", "train.warmup_ratio=0.0",
                                 "--set", "comm.error_feedback=false", "--set", "comm.warmup_steps=0",
                                 "--set", f"output_dir={root / 'lamb'}"]], port=8271)
    return root


def test_msnc_finetune_sharded_lamb_matches_twin(lamb_run):
    import test_sharded_trainer as engine
    from ms_nlp_compress.models.checkpoint import read_safetensors
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification
    from ms_nlp_compress.train.losses import SequenceClassificationLoss

    root = lamb_run
    model = NezhaForSequenceClassification(engine.MODEL, 2)
    params = model.trainable_params()
    names = [p.name for p in params]
    grad_fn = ms.value_and_grad(SequenceClassificationLoss(model), None, params)
    initial = read_safetensors(root / "initial" / "model.safetensors")
    sizes = [int(np.prod(p.shape)) for p in params]
    total = sum(sizes)
    groups = -(-total // (2 * BUCKET)) * 2  # whole buckets per rank
    padded, shard = groups * BUCKET, groups * BUCKET // 2
    ends = np.cumsum(sizes)
    assert np.any((ends - np.array(sizes) < shard) & (ends > shard)), "no tensor spans the two shards"
    assert any(np.all(initial[name] == 0) for name in names), "no tensor starts at ||w|| = 0"
    flags = [decayed(name) for name in names]
    assert any(flags) and not all(flags)
    records = [np.load(root / "record_lamb" / "0" / f"batches_{rank}.npz") for rank in (0, 1)]
    assert all(int(record["count"]) == LAMB_UPDATES for record in records)
    master = engine.fused([initial[name] for name in names], padded)
    moment1, moment2 = np.zeros(padded, np.float32), np.zeros(padded, np.float32)
    for update in range(1, LAMB_UPDATES + 1):
        if update > 1:
            # from the engine's state after the previous update (which the twin matched there): float32 ulps of
            # the twin's gradients could otherwise move a stochastic rounding decision (test_sharded_trainer.py)
            previous = [engine.rank_state(root, "lamb", update - 1, rank) for rank in (0, 1)]
            master, moment1, moment2 = (np.concatenate([state[key] for state in previous])
                                        for key in ("master", "moment1", "moment2"))
        weights = {name: value.reshape(initial[name].shape)
                   for name, value in zip(names, np.split(master[:total], ends[:-1]))}
        flats = []
        for record in records:
            batch = [record[f"b{update - 1}_c{column}"] for column in range(4)]
            flats.append(engine.fused(engine.reference_gradients(model, grad_fn, weights, batch), padded))
        mean = engine.low_bit_mean(flats, engine.SEED, update, groups, 4)
        gradient, _ = engine.clip(mean, engine.MAX_NORM)
        lr = engine.warmup_linear(update - 1, engine.PEAK, LAMB_UPDATES, 0)

        def tensors(vector):
            return np.split(vector[:total].astype(np.float64), ends[:-1])

        new, new_m, new_v, ratios = numpy_lamb(tensors(master), tensors(moment1), tensors(moment2),
                                               tensors(gradient), update, lr, engine.BETA1, engine.BETA2,
                                               engine.EPS, 0.01, flags)
        assert min(ratios) < 0.5 and max(ratios) > 2.0, ratios  # LAMB is not AdamW on this model
        expected = [np.concatenate(values + [np.zeros(padded - total)]) for values in (new, new_m, new_v)]
        for rank in (0, 1):  # each owner: its shard of the twin's master and moments
            state = engine.rank_state(root, "lamb", update, rank)
            own = slice(rank * shard, (rank + 1) * shard)
            np.testing.assert_allclose(state["master"], expected[0][own], rtol=2e-5, atol=2e-6,
                                       err_msg=f"update {update} rank {rank}")
            np.testing.assert_allclose(state["moment1"], expected[1][own], rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(state["moment2"], expected[2][own], rtol=2e-5, atol=1e-10)
            assert state["updates"].item() == update
    finals = [dict(np.load(root / "record_lamb" / "0" / f"final_{rank}.npz")) for rank in (0, 1)]
    for name in finals[0]:
        np.testing.assert_array_equal(finals[0][name], finals[1][name], err_msg=f"ranks differ on {name}")
    stats = json.loads((root / "record_lamb" / "0" / "trainer_0.json").read_text())["comm"]
    assert stats["comm_trust_bytes_per_step"] == 4 * 2 * len(names)  # the (2 * n_tensors,) float32 all-reduce
    assert stats["comm_bytes_per_lowbit_step"] == (stats["comm_gradient_bytes_per_step"]
                                                   + stats["comm_weight_bytes_per_step"] + 8 + 4 * 2 * len(names))
    assert stats["comm_bytes_sent"] == LAMB_UPDATES * stats["comm_bytes_per_lowbit_step"]
