"""`prepare(model, QuantConfig)`: fake-quantize a NEZHA/BERT model in place for quantization-aware training.

What is swapped (cells found by walking `cells_and_names`; `insert_child_to_cell` so no Parameter is renamed):
- every `nn.Dense` -> `FakeQuantDense`: the SAME `weight` / `bias` Parameter objects under the same attribute
  names; forward = fake-quant(input activation) @ fake-quant(weight)^T + bias (bias and everything after stay float);
- the word `nn.Embedding` -> `FakeQuantEmbedding` (the same `embedding_table`); row-wise quantizers gather the rows
  first and quantize only those (equal to quantizing the table, since each row has its own scale);
- the backbone's identity `QuantPoint`s at Q, K, probabilities, V and the MLM decoder input -> activation fake-quant;
- the tied MLM decoder's table point -> `TiedTableQuant`, the embedding's quantizer applied to the whole table.
Cells matching `QuantConfig.full_precision` (default: the classifier, position and token-type embeddings) are left
untouched; biases and LayerNorms are never quantized.

LAT: a LAT-quantized cell owns one extra non-trainable Parameter `lat_preconditioner` (D, same shape as the weight,
named after the weight). Why a Parameter and not a graph input: the preconditioner must reach cells deep inside the
model without changing every construct signature; it is not trainable (no optimizer state, no gradient: the STE
cell receives it as an input and stops its gradient, so no `bprop` ever sees a Parameter). `LatRefresh` copies
D = sqrt(v / (1 - beta2^t)) + eps from the optimizer's second moment into every such Parameter, in one compiled
graph, after each optimizer step (see lat.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ms_nlp_compress.compress.quant.config import QuantConfig, WeightQuantConfig
from ms_nlp_compress.compress.quant.ste import (LogQuantSTE, LossAwareTernaryWeightSTE, MinMaxQuantSTE,
                                                SymmetricQuantSTE, TernaryWeightSTE)
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.nezha import QuantPoint

LAT_PARAMETER = "lat_preconditioner"


# ----------------------------------------------------------------------------------------------------------------
# Quantizer factories
# ----------------------------------------------------------------------------------------------------------------


def weight_quantizer(spec: WeightQuantConfig, clip_value, lat_iterations: int = 10, lat_init: str = "twn") -> nn.Cell:
    """The parameter-free STE cell for one tensor group (identity for method `none`)."""
    per_row = spec.granularity == "row"
    if spec.method == "twn":
        return TernaryWeightSTE(per_row, clip_value)
    if spec.method == "lat":
        return LossAwareTernaryWeightSTE(per_row, clip_value, lat_iterations, lat_init)
    if spec.method == "sym":
        return SymmetricQuantSTE(spec.bits, per_row, clip_value)
    if spec.method == "minmax":
        return MinMaxQuantSTE(spec.bits, per_row, clip_value)
    if spec.method == "log":
        return LogQuantSTE(spec.bits, per_row, clip_value)
    return QuantPoint()


def activation_quantizer(config: QuantConfig) -> nn.Cell:
    """Dynamic per-tensor activation fake-quant (identity when activation quantization is off)."""
    spec = config.activation
    if spec.method == "symmetric":
        return SymmetricQuantSTE(spec.bits, False, config.activation_clip)
    if spec.method == "minmax":
        return MinMaxQuantSTE(spec.bits, False, config.activation_clip)
    return QuantPoint()


def _lat_parameter(weight: Parameter) -> Parameter:
    """Identity preconditioner (ones) named after the weight, so names stay unique across the model."""
    prefix = weight.name.rsplit(".", 1)[0] if "." in weight.name else weight.name
    return Parameter(Tensor(np.ones(weight.shape, np.float32)), name=f"{prefix}.{LAT_PARAMETER}",
                     requires_grad=False)


# ----------------------------------------------------------------------------------------------------------------
# Fake-quant cells
# ----------------------------------------------------------------------------------------------------------------


class FakeQuantDense(nn.Cell):
    """A Dense whose input and weight pass through fake-quant STE cells; owns the original Dense's Parameters.

    The matmul mirrors `nn.Dense.construct` op for op (2-D reshape, MatMul(transpose_b), BiasAdd), so with identity
    quantizers it is bit-identical to the Dense it replaces.
    """

    def __init__(self, dense: nn.Dense, weight_quant: nn.Cell, input_quant: nn.Cell, spec: WeightQuantConfig):
        super().__init__()
        if dense.activation_flag:
            raise ConfigError(f"{dense.weight.name}: Dense cells with a fused activation are not supported")
        self.weight = dense.weight
        self.has_bias = dense.has_bias
        if self.has_bias:
            self.bias = dense.bias
        self.spec = spec
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.lat = spec.method == "lat"
        if self.lat:
            self.lat_preconditioner = _lat_parameter(dense.weight)
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def quantized_weight(self):
        if self.lat:
            return self.weight_quant(self.weight, self.lat_preconditioner)
        return self.weight_quant(self.weight)

    def construct(self, x):
        x_shape = x.shape
        x = self.input_quant(x)
        if len(x_shape) != 2:
            x = x.reshape(-1, x_shape[-1])  # (rows, in)
        x = self.matmul(x, self.quantized_weight())
        if self.has_bias:
            x = self.bias_add(x, self.bias)
        if len(x_shape) != 2:
            x = x.reshape(x_shape[:-1] + (x.shape[-1],))  # (..., out)
        return x


class FakeQuantEmbedding(nn.Cell):
    """Word-embedding lookup of the fake-quantized table; owns the original `embedding_table`.

    Row-wise quantizers (one scale per vocabulary row) gather first and quantize the looked-up rows only: each row's
    codes depend on that row alone, so this equals gathering from the quantized table at a fraction of the cost, and
    the STE gradient lands on the same rows.
    """

    def __init__(self, embedding: nn.Embedding, weight_quant: nn.Cell, spec: WeightQuantConfig):
        super().__init__()
        self.embedding_table = embedding.embedding_table
        self.embedding_size = embedding.embedding_size
        self.spec = spec
        self.weight_quant = weight_quant
        self.per_row = spec.granularity == "row"
        self.lat = spec.method == "lat"
        if self.lat:
            self.lat_preconditioner = _lat_parameter(embedding.embedding_table)

    def quantized_table(self):
        if self.lat:
            return self.weight_quant(self.embedding_table, self.lat_preconditioner)
        return self.weight_quant(self.embedding_table)

    def construct(self, ids):
        out_shape = ids.shape + (self.embedding_size,)
        flat_ids = ids.reshape(-1)
        if self.per_row:
            rows = ops.gather(self.embedding_table, flat_ids, 0)  # (B*L, H)
            if self.lat:
                rows = self.weight_quant(rows, ops.gather(self.lat_preconditioner, flat_ids, 0))
            else:
                rows = self.weight_quant(rows)
        else:
            rows = ops.gather(self.quantized_table(), flat_ids, 0)
        return rows.reshape(out_shape)  # (B, L, H)


class TiedTableQuant(nn.Cell):
    """The tied MLM decoder's table: the word embedding's quantizer applied to the table it is handed."""

    def __init__(self, weight_quant: nn.Cell, spec: WeightQuantConfig, table: Parameter):
        super().__init__()
        self.spec = spec
        self.weight_quant = weight_quant
        self.lat = spec.method == "lat"
        if self.lat:
            # Its own copy of D (refreshed from the same second moment): sharing the embedding's Parameter object
            # between two cells would give it two names.
            self.lat_preconditioner = Parameter(Tensor(np.ones(table.shape, np.float32)),
                                                name=f"word_table_quant.{LAT_PARAMETER}", requires_grad=False)
        self.table_name = table.name

    def construct(self, table):
        if self.lat:
            return self.weight_quant(table, self.lat_preconditioner)
        return self.weight_quant(table)


# ----------------------------------------------------------------------------------------------------------------
# The walker
# ----------------------------------------------------------------------------------------------------------------

_ACTIVATION_POINTS = ("query_quant", "key_quant", "probs_quant", "value_quant", "decoder_input_quant")


def dense_group(cell_name: str) -> str:
    """The QuantConfig tensor group of a Dense, by its place in the model."""
    if ".encoder.layers." in f".{cell_name}":
        return "encoder"
    if cell_name.endswith("pooler.dense"):
        return "pooler"
    if cell_name.endswith("lm_head.dense"):
        return "mlm_head"
    if cell_name.split(".")[-1] == "classifier":
        return "classifier"
    raise ConfigError(f"quant.prepare: Dense cell {cell_name!r} belongs to no tensor group (encoder, pooler, "
                      "mlm_head, classifier); add it to quant.full_precision to keep it in float")


def _parent(root: nn.Cell, dotted: str) -> Tuple[nn.Cell, str]:
    parent = root
    *path, attribute = dotted.split(".")
    for part in path:
        parent = parent._cells[part]  # pylint: disable=protected-access
    return parent, attribute


def check_not_compiled(model: nn.Cell, what: str) -> None:
    """Every in-place rewrite here (prepare; convert.decode and share_graph_functions) must come before the model's
    first graph-mode call: MindSpore keeps running the graph it compiled for a Cell (keyed by the Cell object, not
    by its children), so swapping cells afterwards changes nothing, silently (measured: a decoded model kept
    computing its activation quantizers)."""
    for name, cell in model.cells_and_names():
        if cell.compile_cache:
            raise ConfigError(f"{what}: {type(model).__name__}{' cell ' + name if name else ''} already ran in graph "
                              "mode, and MindSpore would keep running the graph it compiled then; call it on a "
                              "freshly loaded model (load_model_dir) before running it")


def _check_not_prepared(model: nn.Cell) -> None:
    for name, cell in model.cells_and_names():
        if isinstance(cell, (FakeQuantDense, FakeQuantEmbedding, TiedTableQuant)):
            raise ConfigError(f"quant.prepare: the model is already prepared ({name} is a {type(cell).__name__})")


def prepare(model: nn.Cell, config: QuantConfig) -> nn.Cell:
    """Swap `model`'s cells for fake-quant cells in place (Parameter names unchanged) and return it.

    The recipe is kept on the model as `model.quant_config` (convert and the model document read it).
    """
    config.validate()
    _check_not_prepared(model)
    check_not_compiled(model, "quant.prepare")
    fp32_dtypes = {ms.float32}
    replacements: List[Tuple[str, nn.Cell]] = []
    word_embedding: Optional[FakeQuantEmbedding] = None
    table_points: List[str] = []
    for name, cell in model.cells_and_names():
        if not name or config.keeps_full_precision(name):
            continue
        if isinstance(cell, nn.Dense):
            if cell.weight.dtype not in fp32_dtypes:
                raise ConfigError(f"quant.prepare: {name}.weight is {cell.weight.dtype}; prepare a float32 model")
            spec = getattr(config, dense_group(name))
            replacements.append((name, FakeQuantDense(
                cell, weight_quantizer(spec, config.weight_clip, config.lat_iterations, config.lat_init),
                activation_quantizer(config), spec)))
        elif isinstance(cell, nn.Embedding) and name.endswith("word_embeddings"):
            quantizer = weight_quantizer(config.embedding, config.weight_clip, config.lat_iterations, config.lat_init)
            word_embedding = FakeQuantEmbedding(cell, quantizer, config.embedding)
            replacements.append((name, word_embedding))
        elif isinstance(cell, nn.Embedding) and config.position.enabled:
            quantizer = weight_quantizer(config.position, config.weight_clip, config.lat_iterations, config.lat_init)
            replacements.append((name, FakeQuantEmbedding(cell, quantizer, config.position)))
        elif isinstance(cell, QuantPoint) and name.split(".")[-1] in _ACTIVATION_POINTS:
            replacements.append((name, activation_quantizer(config)))
        elif isinstance(cell, QuantPoint) and name.split(".")[-1] == "word_table_quant":
            table_points.append(name)
    for name in table_points:
        if word_embedding is None:
            raise ConfigError(f"quant.prepare: {name} decodes with the word embeddings, which are kept in float "
                              "(quant.full_precision); quantize both or neither")
        quantizer = weight_quantizer(config.embedding, config.weight_clip, config.lat_iterations, config.lat_init)
        replacements.append((name, TiedTableQuant(quantizer, config.embedding, word_embedding.embedding_table)))
    for name, replacement in replacements:
        parent, attribute = _parent(model, name)
        parent.insert_child_to_cell(attribute, replacement)  # no renaming of the model's Parameters
    model.quant_config = config
    return model


def quant_cells(model: nn.Cell) -> Dict[str, nn.Cell]:
    """Every weight fake-quant cell of a prepared model, by cell name."""
    return {name: cell for name, cell in model.cells_and_names()
            if isinstance(cell, (FakeQuantDense, FakeQuantEmbedding, TiedTableQuant))}
