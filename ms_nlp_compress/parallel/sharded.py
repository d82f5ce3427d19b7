"""Scheme 2: the seed's worker/server design, sharded over the ranks (Hou, Zhang & Kwok 2019).

Rank r owns buckets [r*S/B, (r+1)*S/B) of the fused parameter vector (S = padded / N entries, whole buckets) and
keeps the fp32 MASTER copy of that shard. Each update:

    worker  : low-bit gradient codes + scales of its whole gradient (as in scheme 1)
    to owner: chunk j of every rank's codes goes to rank j          all-to-all on Ascend (HCCL); on CPU emulated by
                                                                    AllGather + local selection: same maths,
                                                                    not byte-saving (CPU has no AlltoAll kernel)
    owner   : mean of its chunk over ranks -> update of its master shard by the owner's optimizer: SGD
              (master -= lr * mean) or Adam (moments of its shard only, bias-corrected, decoupled weight decay)
              quantize the updated shard per bucket: TWN (weight_bits 2), symmetric m-bit (3..8) or fp32 (null)
    all     : AllGather(int32 weight codes) + AllGather(float32 per-bucket units) -> every rank writes the
              dequantized weights into its model Parameters (forward and backward run at the low-bit weights)

With the Ascend collectives a rank sends about b*d*(N-1)/N gradient bits and receives m*d*(N-1)/N weight bits per
update, a saving near 32/b at any N; on CPU the gradient leg costs what scheme 1 costs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_nlp_compress.compress.quant.primitives import TWN_THRESHOLD_FACTOR
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.parallel.comm_config import CommConfig
from ms_nlp_compress.parallel.lowbit import (LowBitAllGatherReducer, _safe_divide, codes_per_word, pack_words_graph,
                                             top_level, unpack_words_graph)


def quantize_weight_buckets(weights, weight_bits):
    """(buckets, B) fp32 -> (codes int32 in [0, 2k], unit (buckets, 1)) with value = (code - k) * unit.

    weight_bits 2: TWN (k = 1): keep |w| > 0.7 * mean|w|, unit = mean |w| over the kept entries.
    weight_bits m >= 3: symmetric round-to-nearest, k = 2^(m-1) - 1, unit = max|w| / k.
    """
    magnitude = ops.abs(weights)
    if weight_bits == 2:
        threshold = TWN_THRESHOLD_FACTOR * magnitude.mean(-1, True)
        keep = (magnitude > threshold).astype(weights.dtype)
        unit = _safe_divide((magnitude * keep).sum(-1, True), keep.sum(-1, True))
        return (ops.sign(weights) * keep + 1.0).astype(ms.int32), unit
    k = float(top_level(weight_bits))
    unit = ops.amax(magnitude, -1, True) / k
    level = ops.clamp(ops.round(_safe_divide(weights, unit)), -k, k)
    return (level + k).astype(ms.int32), unit


class ShardedLowBitUpdate(nn.Cell):
    """Call with the gradient tuple (in `parameters` order): exchanges, updates the owned master shard, gathers the
    low-bit weights and assigns them to `parameters`. Returns the tuple of new weights.

    Args:
        parameters: the model Parameters (their current values initialise every rank's master shard).
        comm: `comm:` with scheme sharded, bucket_size > 0 (shards are whole buckets) and weight_bits (or null).
        world_size, rank: data-parallel position (the owned shard is baked into the graph).
        learning_rate: step size of the owner's update.
        optimizer: "sgd" or "adam" (the owner keeps Adam's two moments for its shard only: 2 * S floats per rank
            instead of 2 * d); beta1, beta2, eps, weight_decay: Adam's settings (AdamW-style decoupled decay).
    State: the master shard and, for Adam, its moments and step differ per rank (`per_rank_state`): checkpoints
    keep them in each rank's own file (train/checkpoints.py `save_rank_state`).
    """

    per_rank_state = True

    def __init__(self, parameters: Sequence[Parameter], comm: CommConfig, world_size: int, rank: int,
                 learning_rate: float, optimizer: str = "sgd", beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__()
        comm.validate("comm")
        if comm.scheme != "sharded":
            raise ConfigError(f"comm.scheme: ShardedLowBitUpdate needs scheme sharded, got {comm.scheme!r}")
        if comm.bucket_size == 0:
            raise ConfigError("comm.bucket_size: the sharded scheme splits the fused vector into whole buckets; "
                              "set bucket_size >= 64")
        if comm.error_feedback:
            raise ConfigError("comm.error_feedback: not implemented for scheme sharded yet")
        if comm.warmup_steps:
            raise ConfigError("comm.warmup_steps: not implemented for scheme sharded yet")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if optimizer not in ("sgd", "adam"):
            raise ConfigError(f"sharded owner optimizer must be sgd or adam, got {optimizer!r}")
        self.parameters = list(parameters)
        self.exchange = LowBitAllGatherReducer(self.parameters, comm, world_size, shards=world_size)
        layout = self.exchange.layout
        self.world_size = world_size
        self.bucket_size = comm.bucket_size
        self.shard = layout.padded // world_size
        self.shard_buckets = self.shard // comm.bucket_size
        self.start = rank * self.shard
        self.first_bucket = rank * self.shard_buckets
        self.learning_rate = float(learning_rate)
        self.weight_bits = comm.weight_bits
        initial = np.concatenate([p.asnumpy().astype(np.float32).reshape(-1) for p in self.parameters])
        initial = np.concatenate([initial, np.zeros(layout.padded - initial.size, np.float32)])
        self.master = Parameter(Tensor(initial[self.start:self.start + self.shard]), name="master_shard",
                                requires_grad=False)
        self.adam = optimizer == "adam"
        if self.adam:
            self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
            self.weight_decay = float(weight_decay)
            self.moment1 = Parameter(Tensor(np.zeros(self.shard, np.float32)), name="moment1_shard",
                                     requires_grad=False)
            self.moment2 = Parameter(Tensor(np.zeros(self.shard, np.float32)), name="moment2_shard",
                                     requires_grad=False)
            self.adam_step = Parameter(Tensor(0.0, ms.float32), name="adam_step_shard", requires_grad=False)
        if self.weight_bits is not None:
            self.weight_top = float(top_level(self.weight_bits))
            self.weight_padding = (-self.shard) % codes_per_word(self.weight_bits)
        self.params = ms.ParameterTuple(self.parameters)
        if world_size > 1:
            self.all_gather = ops.AllGather()

    def gather(self, value):
        if self.world_size == 1:
            return value
        return self.all_gather(value)

    def shard_gradient(self, grads):
        """The owner's mean gradient shard (S,), from every rank's codes (the emulated all-to-all)."""
        exchange = self.exchange
        levels, scales = exchange.quantize(exchange.fuse(grads), exchange.noise((exchange.padded,)))
        words = self.gather(exchange.encode(levels))
        scales = self.gather(scales)
        codes = unpack_words_graph(words.reshape(self.world_size, -1), exchange.bits)  # (ranks, padded + pad)
        mine = codes[:, self.start:self.start + self.shard].reshape(self.world_size, self.shard_buckets,
                                                                     self.bucket_size)  # (ranks, buckets, B)
        units = scales.reshape(self.world_size, -1)[:, self.first_bucket:self.first_bucket + self.shard_buckets]
        steps = units.reshape(self.world_size, self.shard_buckets, 1) / exchange.top
        values = (mine.astype(ms.float32) - exchange.top) * steps
        return values.sum(0).reshape(-1) / float(self.world_size)

    def gathered_weights(self, master):
        """Every rank's updated shard, low-bit on the wire -> the full fused weight vector (padded,)."""
        if self.weight_bits is None:
            return self.gather(master)
        codes, unit = quantize_weight_buckets(master.reshape(self.shard_buckets, self.bucket_size), self.weight_bits)
        codes = codes.reshape(-1)
        if self.weight_padding:
            codes = ops.concat((codes, ops.full((self.weight_padding,), int(self.weight_top), dtype=ms.int32)))
        words = self.gather(pack_words_graph(codes, self.weight_bits))
        units = self.gather(unit.reshape(-1))  # (ranks * shard_buckets,)
        all_codes = unpack_words_graph(words.reshape(self.world_size, -1), self.weight_bits)[:, :self.shard]
        values = (all_codes.astype(ms.float32) - self.weight_top).reshape(-1, self.bucket_size)  # (buckets, B)
        return (values * units.reshape(-1, 1)).reshape(-1)

    def adam_update(self, gradient):
        """The owner's AdamW step on its shard: the moments never leave this rank."""
        step = self.adam_step + 1.0
        ops.assign(self.adam_step, step)
        moment1 = self.beta1 * self.moment1 + (1.0 - self.beta1) * gradient
        moment2 = self.beta2 * self.moment2 + (1.0 - self.beta2) * gradient * gradient
        ops.assign(self.moment1, moment1)
        ops.assign(self.moment2, moment2)
        corrected1 = moment1 / (1.0 - ops.pow(Tensor(self.beta1, ms.float32), step))
        corrected2 = moment2 / (1.0 - ops.pow(Tensor(self.beta2, ms.float32), step))
        update = corrected1 / (ops.sqrt(corrected2) + self.eps) + self.weight_decay * self.master
        return self.master - self.learning_rate * update

    def construct(self, grads):
        gradient = self.shard_gradient(grads)
        if self.adam:
            master = self.adam_update(gradient)
        else:
            master = self.master - self.learning_rate * gradient
        ops.assign(self.master, master)
        weights = self.exchange.split(self.gathered_weights(master))
        for index in range(len(weights)):
            ops.assign(self.params[index], weights[index])
        return weights
