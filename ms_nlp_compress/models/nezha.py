"""NEZHA and BERT in one MindSpore implementation.

`position_embedding: relative` is NEZHA: no absolute position table; a fixed sinusoid table indexed by the clipped,
shifted distance clip(j - i, -K, K) + K is added to the keys (before the 1/sqrt(d) scale) and to the values.
`position_embedding: absolute` is plain BERT, so Hugging Face BERT-format checkpoints load into the same code.

Design for compression (later work relies on it):
- every projection is an `nn.Dense` (weight (out, in)), so a quantizer can swap them by walking `cells_and_names`;
- each layer owns its width (`num_heads`, FFN size), so DynaBERT sub-networks are ordinary models with per-layer
  widths; layers sit in a `CellList`, so dropping layers is building a shorter list;
- the encoder can return every hidden state (embedding output + each layer) and every layer's pre-softmax, masked,
  scaled attention scores, for distillation; both switches are construction-time constants so inference graphs
  stay lean.

Shapes: B batch, L sequence, H hidden, N heads, D head dim, I intermediate (FFN) size.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, TruncatedNormal, initializer

from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.models.dropout import StatelessDropout
from ms_nlp_compress.models.kernels import ExactGelu, LayerNorm, use_cpu_kernel

# Masked keys get this additive bias: large enough that softmax gives them ~0 weight, small enough for fp16.
# The distillation losses rely on it: scores <= -100 are treated as masked.
MASK_BIAS = -10000.0


def gelu_exact(x):
    """GELU with erf, as BERT and NEZHA were trained."""
    return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


def gelu_tanh(x):
    """Tanh approximation of GELU, written elementwise (MindSpore's nn.GELU is far slower on CPU)."""
    return 0.5 * x * (1.0 + ops.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


class Activation(nn.Cell):
    """The FFN non-linearity named by `NezhaConfig.hidden_act`.

    `kernels` is `NezhaConfig.kernels`: on CPU ("auto") exact GELU goes through the erf-free rational formulation
    of models/kernels.py, since MindSpore's CPU erf kernel is pathologically slow; elsewhere through `ops.erf`.
    """

    def __init__(self, kind: str, kernels: str = "auto"):
        super().__init__()
        self.kind = kind
        self.cpu_gelu = kind == "gelu" and use_cpu_kernel(kernels, "gelu")
        if self.cpu_gelu:
            self.exact_gelu = ExactGelu()  # no Parameters: parameter names are unchanged

    def construct(self, x):
        if self.kind == "gelu":
            if self.cpu_gelu:
                return self.exact_gelu(x)
            return gelu_exact(x)
        if self.kind == "gelu_tanh":
            return gelu_tanh(x)
        return ops.relu(x)


def _dense(in_features: int, out_features: int, config: NezhaConfig) -> nn.Dense:
    return nn.Dense(in_features, out_features, weight_init=TruncatedNormal(config.initializer_range),
                    bias_init="zeros")


# Dropout sites: a distinct number per place, so each draws its own masks (see models/dropout.py).
_EMBEDDING_SITE, _CLASSIFIER_SITE, _SITES_PER_LAYER = 1, 2, 3


def _dropout(config: NezhaConfig, p: float, site: int) -> StatelessDropout:
    return StatelessDropout(p, site, config.dropout_impl)


def _layer_norm(config: NezhaConfig, width: int) -> nn.Cell:
    """MindSpore's LayerNorm, or on CPU the one with the GEMM-based backward (same `gamma`/`beta` Parameters)."""
    if use_cpu_kernel(config.kernels, "layer_norm"):
        return LayerNorm((width,), epsilon=config.layer_norm_eps)
    return nn.LayerNorm((width,), epsilon=config.layer_norm_eps)


def relative_position_table(num_distances: int, dim: int) -> np.ndarray:
    """NEZHA's fixed table E (2K+1, D): E[p, 2t] = sin(p / 10000^(2t/D)), E[p, 2t+1] = cos(same).

    p is the SHIFTED index 0..2K (distance + K), as in the reference code, not the signed distance.
    """
    positions = np.arange(num_distances, dtype=np.float64)[:, None]  # (2K+1, 1)
    even = np.arange(0, dim, 2, dtype=np.float64)  # 2t
    angles = positions / np.power(10000.0, even / dim)[None, :]  # (2K+1, ceil(D/2))
    table = np.zeros((num_distances, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : dim // 2])
    return table.astype(np.float32)


class QuantPoint(nn.Cell):
    """Identity at a matmul input; `quant.prepare` swaps it for a fake-quant cell.

    Why a cell: the attention matmuls (Q K^T, probs V) and the tied MLM decoder are bare `ops.matmul` calls that a
    walker over `cells_and_names` cannot reach. No Parameters, so names and numerics of the float model are unchanged.
    """

    def construct(self, x):
        return x


class NezhaEmbeddings(nn.Cell):
    """Word + token-type (+ absolute position for BERT) embeddings, then LayerNorm and dropout."""

    def __init__(self, config: NezhaConfig):
        super().__init__()
        init = Normal(config.initializer_range)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, embedding_table=init)
        self.absolute = config.position_embedding == "absolute"
        if self.absolute:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                    embedding_table=init)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, embedding_table=init)
        self.layer_norm = _layer_norm(config, config.hidden_size)
        self.dropout = _dropout(config, config.hidden_dropout, _EMBEDDING_SITE)

    def construct(self, input_ids, token_type_ids):
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, L, H)
        if self.absolute:
            seq_length = input_ids.shape[1]
            positions = ops.arange(seq_length).reshape(1, -1)  # (1, L)
            embeddings = embeddings + self.position_embeddings(positions)
        return self.dropout(self.layer_norm(embeddings))


class RelativePositions(nn.Cell):
    """Gathers NEZHA's relative table for a sequence: (L, L, D), shared by all heads and layers."""

    def __init__(self, config: NezhaConfig):
        super().__init__()
        self.max_distance = config.max_relative_position
        table = relative_position_table(2 * config.max_relative_position + 1, config.attention_head_size)
        self.table = Tensor(table)  # a constant, not a Parameter: the reference table is fixed, not learned

    def construct(self, seq_length):
        positions = ops.arange(seq_length)
        distance = positions.reshape(1, -1) - positions.reshape(-1, 1)  # (L, L): key j minus query i
        index = ops.clip(distance, -self.max_distance, self.max_distance) + self.max_distance
        return ops.gather(self.table, index, 0)  # (L, L, D)


def low_precision_matmul(left, right, dtype):
    """left @ right with both operands cast to `dtype` (float16 / bfloat16) and the product returned as float32.

    For the bare matmuls of a cell under O1 mixed precision (models/precision.py), where nn.Dense is handled by
    MindSpore's `to_float` but an `ops.matmul` inside a float32 cell is not.
    """
    return ops.matmul(left.astype(dtype), right.astype(dtype)).astype(ms.float32)


class NezhaSelfAttention(nn.Cell):
    """Multi-head self-attention with optional NEZHA relative terms on keys and values."""

    # None: the score and context matmuls run in the type of their inputs. models/precision.py sets float16 (or
    # bfloat16) on an O1 copy: the matmuls then run in that type while softmax and the rest stay float32.
    matmul_dtype = None

    def __init__(self, config: NezhaConfig, num_heads: int, site: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = config.attention_head_size
        width = num_heads * self.head_dim
        self.query = _dense(config.hidden_size, width, config)
        self.key = _dense(config.hidden_size, width, config)
        self.value = _dense(config.hidden_size, width, config)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.relative = config.position_embedding == "relative"
        self.dropout = _dropout(config, config.attention_dropout, site)
        self.softmax = nn.Softmax(axis=-1)
        # Activation-quant points at the inputs of the score and context matmuls (compress/quant).
        self.query_quant = QuantPoint()
        self.key_quant = QuantPoint()
        self.probs_quant = QuantPoint()
        self.value_quant = QuantPoint()

    def _matmul(self, left, right):
        if self.matmul_dtype is None:
            return ops.matmul(left, right)
        return low_precision_matmul(left, right, self.matmul_dtype)

    def _split_heads(self, x, batch, seq_length):
        x = x.reshape(batch, seq_length, self.num_heads, self.head_dim)  # (B, L, N, D)
        return x.transpose(0, 2, 1, 3)  # (B, N, L, D)

    def construct(self, hidden, attention_bias, relative, head_mask):
        batch, seq_length = hidden.shape[0], hidden.shape[1]
        query = self.query_quant(self._split_heads(self.query(hidden), batch, seq_length))  # (B, N, L, D)
        key = self.key_quant(self._split_heads(self.key(hidden), batch, seq_length))
        value = self.value_quant(self._split_heads(self.value(hidden), batch, seq_length))
        scores = self._matmul(query, key.transpose(0, 1, 3, 2))  # (B, N, L, L)
        if self.relative:
            relative = relative.astype(query.dtype)
            query_by_position = query.transpose(2, 0, 1, 3).reshape(seq_length, -1, self.head_dim)  # (L, B*N, D)
            relative_scores = self._matmul(query_by_position, relative.transpose(0, 2, 1))  # (L, B*N, L)
            relative_scores = relative_scores.reshape(seq_length, batch, self.num_heads, seq_length)  # (L, B, N, L)
            scores = scores + relative_scores.transpose(1, 2, 0, 3)  # (B, N, L, L)
        # The relative term is added before the scale, as in the reference; this tensor (scaled, masked, before
        # softmax) is what attention distillation compares.
        scores = scores * self.scale + attention_bias.astype(scores.dtype)
        probs = self.dropout(self.softmax(scores))  # (B, N, L, L)
        if head_mask is not None:
            probs = probs * head_mask.reshape(1, -1, 1, 1).astype(probs.dtype)
        probs = self.probs_quant(probs)
        context = self._matmul(probs, value)  # (B, N, L, D)
        if self.relative:
            probs_by_position = probs.transpose(2, 0, 1, 3).reshape(seq_length, -1, seq_length)  # (L, B*N, L)
            relative_context = self._matmul(probs_by_position, relative)  # (L, B*N, D)
            relative_context = relative_context.reshape(seq_length, batch, self.num_heads, self.head_dim)
            context = context + relative_context.transpose(1, 2, 0, 3)  # (B, N, L, D)
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq_length, -1)  # (B, L, N*D)
        return context, scores


class NezhaAttentionOutput(nn.Cell):
    """Projects the heads' context back to H, then dropout, residual and LayerNorm."""

    def __init__(self, config: NezhaConfig, num_heads: int, site: int = 0):
        super().__init__()
        self.dense = _dense(num_heads * config.attention_head_size, config.hidden_size, config)
        self.dropout = _dropout(config, config.hidden_dropout, site)
        self.layer_norm = _layer_norm(config, config.hidden_size)

    def construct(self, context, residual):
        return self.layer_norm(self.dropout(self.dense(context)) + residual)


class NezhaAttention(nn.Cell):
    def __init__(self, config: NezhaConfig, num_heads: int, site: int = 0):
        super().__init__()
        self.self_attention = NezhaSelfAttention(config, num_heads, site)
        self.output = NezhaAttentionOutput(config, num_heads, site + 1)

    def construct(self, hidden, attention_bias, relative, head_mask):
        context, scores = self.self_attention(hidden, attention_bias, relative, head_mask)
        return self.output(context, hidden), scores


class NezhaFeedForward(nn.Cell):
    """H -> I -> H with the configured activation, then dropout, residual and LayerNorm."""

    def __init__(self, config: NezhaConfig, intermediate_size: int, site: int = 0):
        super().__init__()
        self.intermediate = _dense(config.hidden_size, intermediate_size, config)
        self.activation = Activation(config.hidden_act, config.kernels)
        self.output = _dense(intermediate_size, config.hidden_size, config)
        self.dropout = _dropout(config, config.hidden_dropout, site)
        self.layer_norm = _layer_norm(config, config.hidden_size)

    def construct(self, hidden):
        inner = self.activation(self.intermediate(hidden))  # (B, L, I)
        return self.layer_norm(self.dropout(self.output(inner)) + hidden)


class NezhaLayer(nn.Cell):
    def __init__(self, config: NezhaConfig, num_heads: int, intermediate_size: int, site: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.attention = NezhaAttention(config, num_heads, site)
        self.ffn = NezhaFeedForward(config, intermediate_size, site + 2)

    def construct(self, hidden, attention_bias, relative, head_mask):
        attended, scores = self.attention(hidden, attention_bias, relative, head_mask)
        return self.ffn(attended), scores


class NezhaEncoder(nn.Cell):
    def __init__(self, config: NezhaConfig, output_hidden_states: bool = False, output_attentions: bool = False):
        super().__init__()
        self.layers = nn.CellList([
            NezhaLayer(config, config.heads_of_layer(i), config.intermediate_of_layer(i),
                       site=10 + _SITES_PER_LAYER * i)
            for i in range(config.num_layers)
        ])
        self.layer_heads = tuple(config.heads_of_layer(i) for i in range(config.num_layers))
        self.relative = config.position_embedding == "relative"
        if self.relative:
            self.relative_positions = RelativePositions(config)
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions

    def construct(self, hidden, attention_bias, head_mask=None):
        relative = None
        if self.relative:
            relative = self.relative_positions(hidden.shape[1])  # (L, L, D), once for all layers
        all_hidden = ()
        all_scores = ()
        if self.output_hidden_states:
            all_hidden = all_hidden + (hidden,)
        for index, layer in enumerate(self.layers):
            layer_mask = None
            if head_mask is not None:
                layer_mask = head_mask[index][: self.layer_heads[index]]
            hidden, scores = layer(hidden, attention_bias, relative, layer_mask)
            if self.output_hidden_states:
                all_hidden = all_hidden + (hidden,)
            if self.output_attentions:
                all_scores = all_scores + (scores,)
        return hidden, all_hidden, all_scores


class NezhaPooler(nn.Cell):
    """tanh(dense(first token)): BERT's sentence representation for classification heads."""

    def __init__(self, config: NezhaConfig):
        super().__init__()
        self.dense = _dense(config.hidden_size, config.hidden_size, config)

    def construct(self, sequence_output):
        return ops.tanh(self.dense(sequence_output[:, 0]))  # (B, H)


def attention_bias_from_mask(attention_mask):
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive bias: 0 for real keys, MASK_BIAS for padding."""
    mask = attention_mask.astype(ms.float32)
    return ((1.0 - mask) * MASK_BIAS).reshape(mask.shape[0], 1, 1, mask.shape[1])


class NezhaModel(nn.Cell):
    """The backbone. Returns (sequence_output, pooled_output, hidden_states, attention_scores).

    hidden_states: (embedding output, layer 1, ..., layer n) when `output_hidden_states`, else ().
    attention_scores: each layer's (B, N, L, L) pre-softmax scaled masked scores when `output_attentions`, else ().
    pooled_output is None without a pooler.
    """

    def __init__(self, config: NezhaConfig, add_pooler: bool = True, output_hidden_states: bool = False,
                 output_attentions: bool = False):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = NezhaEmbeddings(config)
        self.encoder = NezhaEncoder(config, output_hidden_states, output_attentions)
        self.add_pooler = add_pooler
        if add_pooler:
            self.pooler = NezhaPooler(config)

    def construct(self, input_ids, attention_mask=None, token_type_ids=None, head_mask=None):
        if attention_mask is None:
            attention_mask = ops.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = ops.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)  # (B, L, H)
        attention_bias = attention_bias_from_mask(attention_mask)  # (B, 1, 1, L)
        sequence_output, all_hidden, all_scores = self.encoder(hidden, attention_bias, head_mask)
        pooled = None
        if self.add_pooler:
            pooled = self.pooler(sequence_output)
        return sequence_output, pooled, all_hidden, all_scores


class NezhaForSequenceClassification(nn.Cell):
    """Pooler + dropout + linear classifier (num_labels = 1 is regression). Returns (logits, hidden, scores)."""

    def __init__(self, config: NezhaConfig, num_labels: int, classifier_dropout: Optional[float] = None,
                 output_hidden_states: bool = False, output_attentions: bool = False):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.bert = NezhaModel(config, add_pooler=True, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        rate = config.hidden_dropout if classifier_dropout is None else classifier_dropout
        self.dropout = _dropout(config, rate, _CLASSIFIER_SITE)
        self.classifier = _dense(config.hidden_size, num_labels, config)

    def construct(self, input_ids, attention_mask=None, token_type_ids=None, head_mask=None):
        _, pooled, all_hidden, all_scores = self.bert(input_ids, attention_mask, token_type_ids, head_mask)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        return logits, all_hidden, all_scores


class NezhaMaskedLMHead(nn.Cell):
    """dense + activation + LayerNorm, then a decoder tied to the word embeddings (plus its own bias)."""

    matmul_dtype = None  # as in NezhaSelfAttention: set on an O1 copy for the decoder matmul

    def __init__(self, config: NezhaConfig):
        super().__init__()
        self.dense = _dense(config.hidden_size, config.hidden_size, config)
        self.activation = Activation(config.hidden_act, config.kernels)
        self.layer_norm = _layer_norm(config, config.hidden_size)
        self.bias = Parameter(initializer("zeros", (config.vocab_size,), ms.float32), name="bias")
        self.decoder_input_quant = QuantPoint()  # activation quant of the decoder matmul's input (compress/quant)

    def construct(self, hidden, table):
        """`table` is the word-embedding table (V, H): passed in, not owned, so the weight stays tied."""
        hidden = self.decoder_input_quant(self.layer_norm(self.activation(self.dense(hidden))))  # (..., H)
        if self.matmul_dtype is None:
            logits = ops.matmul(hidden, table.astype(hidden.dtype).T)  # (..., V)
        else:
            logits = low_precision_matmul(hidden, table.T, self.matmul_dtype)  # (..., V)
        return logits + self.bias.astype(logits.dtype)


class NezhaForMaskedLM(nn.Cell):
    """Masked LM. With `masked_positions` (B, P) only those positions are decoded: (B, P, V); else (B, L, V)."""

    def __init__(self, config: NezhaConfig, output_hidden_states: bool = False, output_attentions: bool = False):
        super().__init__()
        self.bert = NezhaModel(config, add_pooler=False, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        self.lm_head = NezhaMaskedLMHead(config)
        # The tied decoder's weight point: a quantized model decodes with the same quantized table it embeds with.
        self.word_table_quant = QuantPoint()

    def construct(self, input_ids, attention_mask=None, token_type_ids=None, masked_positions=None):
        sequence_output, _, all_hidden, all_scores = self.bert(input_ids, attention_mask, token_type_ids)
        if masked_positions is not None:
            index = masked_positions.astype(ms.int32).expand_dims(-1)  # (B, P, 1)
            index = ops.broadcast_to(index, (index.shape[0], index.shape[1], sequence_output.shape[2]))
            sequence_output = ops.gather_elements(sequence_output, 1, index)  # (B, P, H)
        return self.lm_head(sequence_output, self.decoder_table()), all_hidden, all_scores

    def decoder_table(self):
        """The (V, H) table the tied decoder multiplies by: the word embeddings, through their weight point (a
        converted model overrides this to decode its integer codes)."""
        return self.word_table_quant(self.bert.embeddings.word_embeddings.embedding_table)


class SentenceEncoder(nn.Cell):
    """Mean of the last hidden states over real tokens, optionally L2-normalised.

    This is how all-MiniLM-L6-v2 (a sentence-embedding model with no MLM head) was trained to be used.
    """

    def __init__(self, backbone: NezhaModel, normalize: bool = True):
        super().__init__()
        self.backbone = backbone
        self.normalize = normalize

    def construct(self, input_ids, attention_mask, token_type_ids=None):
        sequence_output = self.backbone(input_ids, attention_mask, token_type_ids)[0]  # (B, L, H)
        weights = attention_mask.astype(sequence_output.dtype).expand_dims(-1)  # (B, L, 1)
        pooled = (sequence_output * weights).sum(1) / ops.clamp(weights.sum(1), min=1e-9)  # (B, H)
        if self.normalize:
            pooled = pooled / ops.clamp(ops.sqrt((pooled * pooled).sum(-1, keepdims=True)), min=1e-12)
        return pooled
