"""`convert(prepared)`: a deployable model holding integer codes + float scales; `decode(model)` for CPU serving.

Storage per quantized 2-D weight (rows, cols), rows packed independently (packing.pack_rows) so an embedding row
can be gathered as bytes and unpacked alone:
    <cell>.<kind>_codes    twn / lat / 2-bit sym / 2-bit log: uint8 (rows, ceil(cols/4)), code = value + 1
                           3-4-bit sym / log: uint8 (rows, ceil(cols/2)), two's-complement nibbles
                           8-bit sym / log: int8 (rows, cols); min-max: unsigned codes, uint8 (2/4-bit packed)
    <cell>.<kind>_scale    float32, shape (1,) per tensor or (rows, 1) per row (alpha, step or log scale)
    <cell>.<kind>_minimum  float32, min-max only
where <kind> is `weight` (Dense) or `embedding` (word embedding). Biases, LayerNorms, the position / token-type
tables and full-precision cells keep their float Parameters and names. Activation quantization stays dynamic
(the training quantizer's values; the symmetric one in 8 ops instead of the STE's 18, see `_activation_body`), so
converted == fake-quant. `share_graph_functions(model)` makes the exported graph call shared `no_inline` functions
instead of inlining every cell (MiniLM 2-2-8 MindIR 14x smaller than fp32; README, size section). The converted
classes are registered architectures:
`save_model_dir` / `load_model_dir` / `msnc export` accept them; the model document keeps the QuantConfig.
Loading validates every code tensor (range of every field, padding, finite non-negative scales) before anything
is assigned (`validate_weights`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, no_inline, ops

from ms_nlp_compress.compress.quant import primitives
from ms_nlp_compress.compress.quant.config import QuantConfig, WeightQuantConfig
from ms_nlp_compress.compress.quant.packing import pack_rows, storage_bits, unpack_rows, unpack_rows_graph
from ms_nlp_compress.compress.quant.prepare import (FakeQuantDense, FakeQuantEmbedding, _parent, check_not_compiled,
                                                     dense_group)
from ms_nlp_compress.compress.quant.ste import straight_through
from ms_nlp_compress.errors import CheckpointError, ConfigError
from ms_nlp_compress.models.checkpoint import cell_weights, load_weights, register_architecture
from ms_nlp_compress.models.nezha import (NezhaForMaskedLM, NezhaForSequenceClassification, NezhaModel, QuantPoint)


# ----------------------------------------------------------------------------------------------------------------
# Code formats
# ----------------------------------------------------------------------------------------------------------------


def code_format(spec: WeightQuantConfig) -> Tuple[bool, int]:
    """(signed, field bits) of a group's codes: min-max codes are unsigned, every other method signed."""
    return spec.method != "minmax", storage_bits(spec.bits)


def code_range(spec: WeightQuantConfig) -> Tuple[int, int]:
    """Inclusive range of valid code VALUES (after sign handling) for the group's quantizer."""
    if spec.method in ("twn", "lat"):
        return -1, 1
    if spec.method == "minmax":
        return 0, 2 ** spec.bits - 1
    top = 2 ** (spec.bits - 1) - 1  # sym: +-(2^(b-1)-1); log: |code| <= K + 1 = 2^(b-1) - 1
    return -top, top


def _to_fields(values: np.ndarray, signed: bool, field_bits: int) -> np.ndarray:
    """Code values -> unsigned field contents: ternary value+1, nibbles two's complement, unsigned unchanged."""
    if not signed:
        return values
    if field_bits == 2:
        return values + 1
    if field_bits == 4:
        return values & 0xF
    return values


def _from_fields_numpy(fields: np.ndarray, signed: bool, field_bits: int) -> np.ndarray:
    fields = fields.astype(np.int64)
    if not signed:
        return fields
    if field_bits == 2:
        return fields - 1
    return fields - 16 * (fields >= 8)


def quantize_codes(weight: Tensor, spec: WeightQuantConfig, config: QuantConfig, preconditioner=None):
    """(integer code values (rows, cols) int64, scale float32, minimum float32 or None) with the SAME primitives the
    fake-quant cells use, so decoding reproduces the fake-quant weight."""
    per_row = spec.granularity == "row"
    clip = config.weight_clip
    minimum = None
    if spec.method == "twn":
        codes, scale = primitives.twn_ternarize(weight, per_row, clip)
    elif spec.method == "lat":
        codes, scale = primitives.lat_ternarize(weight, preconditioner, per_row, config.lat_iterations, clip,
                                                config.lat_init)
    elif spec.method == "sym":
        codes, scale = primitives.symmetric_quantize_codes(weight, spec.bits, per_row, clip)
    elif spec.method == "minmax":
        codes, scale, minimum = primitives.minmax_quantize_codes(weight, spec.bits, per_row, clip)
        minimum = minimum.asnumpy().astype(np.float32)
    elif spec.method == "log":
        codes, scale = primitives.log_quantize_codes(weight, spec.bits, per_row, clip)
    else:
        raise ConfigError(f"quantize_codes: method {spec.method!r} has no codes")
    return np.rint(codes.asnumpy()).astype(np.int64), scale.asnumpy().astype(np.float32), minimum


def encode(codes: np.ndarray, spec: WeightQuantConfig) -> np.ndarray:
    """Code values (rows, cols) -> the stored code tensor (uint8 packed rows, or int8 for signed 8-bit)."""
    signed, field_bits = code_format(spec)
    if field_bits == 8:
        return codes.astype(np.int8 if signed else np.uint8)
    pad = 1 if (signed and field_bits == 2) else 0  # pads decode to value 0
    return pack_rows(_to_fields(codes, signed, field_bits), field_bits, pad)


def decode_numpy(stored: np.ndarray, spec: WeightQuantConfig, cols: int) -> np.ndarray:
    """Host-side: stored code tensor -> code values (rows, cols) int64."""
    signed, field_bits = code_format(spec)
    if field_bits == 8:
        return stored.astype(np.int64)
    return _from_fields_numpy(unpack_rows(stored, field_bits, cols), signed, field_bits)


def stored_shape(rows: int, cols: int, spec: WeightQuantConfig) -> Tuple[Tuple[int, int], type]:
    signed, field_bits = code_format(spec)
    if field_bits == 8:
        return (rows, cols), (np.int8 if signed else np.uint8)
    return (rows, math.ceil(cols / (8 // field_bits))), np.uint8


def scale_shape(rows: int, spec: WeightQuantConfig) -> Tuple[int, ...]:
    """(rows, 1) per row; (1,) per tensor (not (): safetensors files store 0-d tensors as shape (1,))."""
    return (rows, 1) if spec.granularity == "row" else (1,)


# ----------------------------------------------------------------------------------------------------------------
# Deployable cells
# ----------------------------------------------------------------------------------------------------------------


# Graph functions of the deployed cells. Inlined (the default), every PackedDense, PackedEmbedding and activation
# point copies ~10-20 nodes into the exported graph: 1,954 nodes for the MiniLM 2-2-8 classifier against 711 for
# fp32, and a MindIR node costs ~600 bytes of names, input references and scope strings, so the graph alone was
# 1.2 MB. `share_graph_functions(model)` switches the cells to `no_inline` copies of the same bodies: the MindIR then
# stores each body once per input signature (a function graph) and every call site is one call node. Same ops in
# the same order, so the same values. `no_inline` is documented for Ascend; measured on CPU with MindSpore 2.10:
# export, graph-mode forward and ms.load + GraphCell honour it, BUT a loaded GraphCell that recompiles for a second
# input shape fails ("The actor already exists: Call_..."), so loaders must compile it once for dynamic shapes
# (`GraphCell.set_inputs(Tensor(shape=[None, None], dtype=ms.int32), ...)`, as export.mindir.verify_mindir does).
_GRAPH_FUNCTIONS: Dict[tuple, Callable] = {}


def _shared_function(key: tuple, build: Callable[[], Callable]) -> Callable:
    """One `no_inline` function per key (a fresh function object: no_inline marks the object it is given)."""
    function = _GRAPH_FUNCTIONS.get(key)
    if function is None:
        function = _GRAPH_FUNCTIONS[key] = no_inline(build())
    return function


def _decode_body(spec: WeightQuantConfig, cols: int) -> Callable:
    """decode_codes(stored (rows, bytes), scale, minimum) -> float32 weight rows (rows, cols)."""
    method, bits = spec.method, spec.bits
    signed, field_bits = code_format(spec)

    def decode_codes(stored, scale, minimum):
        if field_bits == 8:
            codes = stored.astype(ms.int32)  # int8 arithmetic is avoided: several CPU kernels lack it
        else:
            codes = unpack_rows_graph(stored, field_bits, cols)  # (rows, cols) unsigned fields
            if signed:
                if field_bits == 2:
                    codes = codes - 1
                else:
                    codes = codes - (codes >= 8).astype(ms.int32) * 16  # nibble sign extension
        values = codes.astype(ms.float32)
        if method == "log":
            return primitives.log_dequantize(values, scale, bits)
        if method == "minmax":
            return values * scale + minimum
        return values * scale

    return decode_codes


# Smallest normal float32: the step floor of the deployed symmetric activation quantizer (see below).
_STEP_FLOOR = 1.1754944e-38


def _activation_body(config: QuantConfig) -> Optional[Callable]:
    """The recipe's activation fake-quant as a function (None: disabled).

    Symmetric (TernaryBERT's, the default) in 8 ops instead of the training cell's 18, same values: the STE's
    x*inside + (q - x*inside) is q in the forward pass (q and x*inside are within half a step, so the subtraction is
    exact), the clamp of the codes to +-(2^(b-1)-1) never binds (|x| <= max|x| = top * step), and the safe division
    becomes a division by max(step, smallest normal float), equal whenever step is 0 (then x is 0) or a normal
    float; only activations whose max |x| is below 1.5e-36 quantize differently. Tested bit for bit against the
    training cell (tests/compress/quant/test_quant_mindir_size.py). Min-max keeps the training cell's maths.
    """
    spec, clip = config.activation, config.activation_clip
    if spec.method == "symmetric":
        top_level = float(2 ** (spec.bits - 1) - 1)

        def quantize_activation(x):
            clipped = primitives.clip_symmetric(x, clip)
            step = ops.amax(ops.abs(clipped)) / top_level
            return ops.round(clipped / ops.maximum(step, _STEP_FLOOR)) * step
    elif spec.method == "minmax":
        def quantize_activation(x):
            return straight_through(x, primitives.minmax_quantize(x, spec.bits, False, clip), clip)
    else:
        return None
    return quantize_activation


def _activation_key(config: QuantConfig) -> tuple:
    return config.activation.method, config.activation.bits, config.activation_clip


def _dense_body(spec: WeightQuantConfig, cols: int, config: QuantConfig, has_bias: bool,
                shared: bool) -> Callable:
    """packed_dense(x, stored, scale, minimum, bias): activation quant, decode, matmul (+ bias)."""
    decode_codes = _decode_body(spec, cols)
    # Shared: the activation quant is itself one function called here, so its body is not copied into every
    # packed_dense signature (5 for MiniLM).
    quantize_activation = (_shared_function(("activation",) + _activation_key(config),
                                            lambda: _activation_body(config))
                           if shared and config.activation.enabled else _activation_body(config))
    matmul = ops.MatMul(transpose_b=True)
    bias_add = ops.BiasAdd()

    def packed_dense(x, stored, scale, minimum, bias):
        x_shape = x.shape
        if quantize_activation is not None:
            x = quantize_activation(x)
        if len(x_shape) != 2:
            x = x.reshape(-1, x_shape[-1])  # (rows, in)
        x = matmul(x, decode_codes(stored, scale, minimum))
        if has_bias:
            x = bias_add(x, bias)
        if len(x_shape) != 2:
            x = x.reshape(x_shape[:-1] + (x.shape[-1],))  # (..., out)
        return x

    return packed_dense


def _lookup_body(spec: WeightQuantConfig, cols: int) -> Callable:
    """packed_lookup(ids, stored, scale, minimum): per row, gather the rows' codes (and scales), decode only them."""
    decode_codes = _decode_body(spec, cols)
    per_row = spec.granularity == "row"
    minmax = spec.method == "minmax"

    def packed_lookup(ids, stored, scale, minimum):
        flat_ids = ids.reshape(-1)
        if per_row:
            row_scale = ops.gather(scale, flat_ids, 0)  # (B*L, 1)
            row_minimum = ops.gather(minimum, flat_ids, 0) if minmax else minimum
            rows = decode_codes(ops.gather(stored, flat_ids, 0), row_scale, row_minimum)
        else:
            rows = ops.gather(decode_codes(stored, scale, minimum), flat_ids, 0)
        return rows.reshape(ids.shape + (cols,))  # (B, L, H)

    return packed_lookup


class ActivationQuant(nn.Cell):
    """Deployed activation quant point (the recipe's dynamic per-tensor quantizer; identity when disabled)."""

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.config = config
        self.quantize = _activation_body(config)
        self.enabled = self.quantize is not None

    def share(self) -> None:
        if self.enabled:
            self.quantize = _shared_function(("activation",) + _activation_key(self.config),
                                             lambda: _activation_body(self.config))

    def construct(self, x):
        if self.enabled:
            return self.quantize(x)
        return x


def _code_parameters(cell: nn.Cell, prefix: str, kind: str, rows: int, cols: int, spec: WeightQuantConfig):
    shape, dtype = stored_shape(rows, cols, spec)
    cell.insert_param_to_cell(f"{kind}_codes", Parameter(Tensor(np.zeros(shape, dtype)),
                                                         name=f"{prefix}.{kind}_codes", requires_grad=False))
    cell.insert_param_to_cell(f"{kind}_scale", Parameter(Tensor(np.zeros(scale_shape(rows, spec), np.float32)),
                                                         name=f"{prefix}.{kind}_scale", requires_grad=False))
    if spec.method == "minmax":
        cell.insert_param_to_cell(f"{kind}_minimum", Parameter(
            Tensor(np.zeros(scale_shape(rows, spec), np.float32)), name=f"{prefix}.{kind}_minimum",
            requires_grad=False))


class PackedDense(nn.Cell):
    """A Dense with integer weight codes + scales; input activations are fake-quantized as in training."""

    def __init__(self, dense: nn.Cell, spec: WeightQuantConfig, config: QuantConfig, prefix: str):
        super().__init__()
        rows, cols = dense.weight.shape
        self.spec = spec
        self.config = config
        self.weight_shape = (rows, cols)
        self.has_bias = dense.has_bias
        if self.has_bias:
            self.bias = dense.bias
        _code_parameters(self, prefix, "weight", rows, cols, spec)
        self.minmax = spec.method == "minmax"
        self.decode_codes = _decode_body(spec, cols)
        self.input_quant = ActivationQuant(config)  # DecodedDense keeps it; packed_dense quantizes by itself
        self.packed_dense = _dense_body(spec, cols, config, self.has_bias, shared=False)

    def share(self) -> None:
        rows, cols = self.weight_shape
        key = ("dense", self.spec.method, self.spec.bits, cols, self.has_bias) + _activation_key(self.config)
        self.packed_dense = _shared_function(key, lambda: _dense_body(self.spec, cols, self.config, self.has_bias,
                                                                      shared=True))

    def weight(self):
        minimum = self.weight_minimum if self.minmax else None
        return self.decode_codes(self.weight_codes, self.weight_scale, minimum)

    def construct(self, x):
        minimum = self.weight_minimum if self.minmax else None
        bias = self.bias if self.has_bias else None
        return self.packed_dense(x, self.weight_codes, self.weight_scale, minimum, bias)


class PackedEmbedding(nn.Cell):
    """Word embedding as packed rows: a lookup gathers the rows' bytes (and per-row scales) and unpacks only them."""

    def __init__(self, embedding: nn.Cell, spec: WeightQuantConfig, prefix: str):
        super().__init__()
        rows, cols = embedding.embedding_table.shape
        self.spec = spec
        self.embedding_size = cols
        self.minmax = spec.method == "minmax"
        _code_parameters(self, prefix, "embedding", rows, cols, spec)
        self.decode_codes = _decode_body(spec, cols)
        self.packed_lookup = _lookup_body(spec, cols)

    def share(self) -> None:
        spec, cols = self.spec, self.embedding_size
        self.packed_lookup = _shared_function(("lookup", spec.method, spec.bits, spec.granularity, cols),
                                              lambda: _lookup_body(spec, cols))
        self.decode_codes = _shared_function(("decode", spec.method, spec.bits, cols),
                                             lambda: _decode_body(spec, cols))

    def table(self):
        """The whole decoded table (V, H): the tied MLM decoder's weight."""
        minimum = self.embedding_minimum if self.minmax else None
        return self.decode_codes(self.embedding_codes, self.embedding_scale, minimum)

    def construct(self, ids):
        minimum = self.embedding_minimum if self.minmax else None
        return self.packed_lookup(ids, self.embedding_codes, self.embedding_scale, minimum)


class DecodedDense(nn.Cell):
    """Decode-once serving form: the float weight materialised at load; input activations still fake-quantized."""

    def __init__(self, packed: PackedDense):
        super().__init__()
        self.weight = Parameter(packed.weight(), name=packed.weight_codes.name.replace("_codes", ""),
                                requires_grad=False)
        self.has_bias = packed.has_bias
        if self.has_bias:
            self.bias = packed.bias
        self.input_quant = packed.input_quant
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        x_shape = x.shape
        x = self.input_quant(x)
        if len(x_shape) != 2:
            x = x.reshape(-1, x_shape[-1])  # (rows, in)
        x = self.matmul(x, self.weight)
        if self.has_bias:
            x = self.bias_add(x, self.bias)
        if len(x_shape) != 2:
            x = x.reshape(x_shape[:-1] + (x.shape[-1],))  # (..., out)
        return x


class DecodedEmbedding(nn.Cell):
    def __init__(self, packed: PackedEmbedding):
        super().__init__()
        self.embedding_table = Parameter(packed.table(), name=packed.embedding_codes.name.replace("_codes", "_table"),
                                         requires_grad=False)
        self.embedding_size = packed.embedding_size

    def table(self):
        return self.embedding_table

    def construct(self, ids):
        return ops.gather(self.embedding_table, ids.reshape(-1), 0).reshape(ids.shape + (self.embedding_size,))


# ----------------------------------------------------------------------------------------------------------------
# Building the deployable structure
# ----------------------------------------------------------------------------------------------------------------

_ACTIVATION_POINTS = ("query_quant", "key_quant", "probs_quant", "value_quant", "decoder_input_quant")


def _pack_structure(model: nn.Cell, config: QuantConfig) -> nn.Cell:
    """Swap a float model's cells for Packed cells (zero codes) following `config`: the shapes a load fills."""
    replacements = []
    for name, cell in model.cells_and_names():
        if not name or config.keeps_full_precision(name):
            continue
        if isinstance(cell, nn.Dense):
            spec = getattr(config, dense_group(name))
            if spec.enabled:
                replacements.append((name, PackedDense(cell, spec, config, name)))
            elif config.activation.enabled:
                fake = FakeQuantDense(cell, QuantPoint(), ActivationQuant(config), spec)
                replacements.append((name, fake))
        elif isinstance(cell, nn.Embedding) and name.endswith("word_embeddings"):
            if not config.embedding.enabled:
                raise ConfigError("quant.convert: a float word embedding with a quantized model is not supported "
                                  "(set quant.embedding.method)")
            replacements.append((name, PackedEmbedding(cell, config.embedding, name)))
        elif isinstance(cell, nn.Embedding) and config.position.enabled:
            replacements.append((name, PackedEmbedding(cell, config.position, name)))
        elif isinstance(cell, QuantPoint) and name.split(".")[-1] in _ACTIVATION_POINTS:
            replacements.append((name, ActivationQuant(config)))
    for name, replacement in replacements:
        parent, attribute = _parent(model, name)
        parent.insert_child_to_cell(attribute, replacement)
    model.quant_config = config
    return model


class QuantizedNezhaModel(NezhaModel):
    def __init__(self, config, quant: Dict[str, Any], add_pooler: bool = True, **kwargs):
        super().__init__(config, add_pooler=add_pooler, **kwargs)
        _pack_structure(self, QuantConfig.from_dict(quant, "model document quant"))


class QuantizedNezhaForSequenceClassification(NezhaForSequenceClassification):
    def __init__(self, config, num_labels: int, quant: Dict[str, Any], **kwargs):
        super().__init__(config, num_labels, **kwargs)
        _pack_structure(self, QuantConfig.from_dict(quant, "model document quant"))


class QuantizedNezhaForMaskedLM(NezhaForMaskedLM):
    """The tied decoder decodes the word embedding's codes (PackedEmbedding.table())."""

    def __init__(self, config, quant: Dict[str, Any], **kwargs):
        super().__init__(config, **kwargs)
        _pack_structure(self, QuantConfig.from_dict(quant, "model document quant"))

    def decoder_table(self):
        return self.bert.embeddings.word_embeddings.table()  # (V, H), decoded from the codes


_QUANTIZED_OF = {NezhaModel: QuantizedNezhaModel,
                 NezhaForSequenceClassification: QuantizedNezhaForSequenceClassification,
                 NezhaForMaskedLM: QuantizedNezhaForMaskedLM}


def _quant_cells_by_name(model: nn.Cell, kinds) -> Dict[str, nn.Cell]:
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, kinds)}


def validate_weights(weights: Dict[str, np.ndarray], document: Dict[str, Any], source: str) -> None:
    """Check every code tensor of a quantized model directory BEFORE any is assigned: dtype, shape, every field
    within the quantizer's range, padding fields, finite non-negative scales. CheckpointError names the tensor."""
    config = QuantConfig.from_dict(document.get("quant", {}), f"{source} document quant")
    for name, stored in weights.items():
        for kind in ("weight", "embedding"):
            if not name.endswith(f".{kind}_codes"):
                continue
            prefix = name[: -len(f".{kind}_codes")]
            if kind == "embedding":
                group = "embedding" if prefix.endswith("word_embeddings") else "position"
            else:
                group = dense_group(prefix)
            spec = getattr(config, group)
            scale_name = f"{prefix}.{kind}_scale"
            if scale_name not in weights:
                raise CheckpointError(f"{source}: {name} has no scale tensor {scale_name}")
            scale = np.asarray(weights[scale_name])
            if not np.isfinite(scale).all() or (spec.method != "minmax" and (scale < 0).any()):
                raise CheckpointError(f"{source}: {scale_name} holds non-finite or negative scales")
            if spec.method == "minmax" and not np.isfinite(np.asarray(weights.get(f"{prefix}.{kind}_minimum",
                                                                                  np.zeros(1)))).all():
                raise CheckpointError(f"{source}: {prefix}.{kind}_minimum holds non-finite values")
            rows = scale.shape[0] if spec.granularity == "row" and scale.ndim else stored.shape[0]
            signed, field_bits = code_format(spec)
            per_byte = 8 // field_bits
            cols = stored.shape[1] if field_bits == 8 else None
            if cols is None:
                # The unpadded width is not stored: every padded field must hold the pad code, checked below.
                cols = stored.shape[1] * per_byte
            expected_shape, expected_dtype = stored_shape(rows, cols, spec)
            if stored.ndim != 2 or stored.dtype != expected_dtype or stored.shape[0] != rows:
                raise CheckpointError(f"{source}: {name} is {stored.dtype} {tuple(stored.shape)}; {group} codes "
                                      f"({spec.method}, {spec.bits} bits) are {np.dtype(expected_dtype)} with "
                                      f"{rows} rows")
            values = decode_numpy(stored, spec, cols)
            low, high = code_range(spec)
            bad = (values < low) | (values > high)
            if bad.any():
                row, col = (int(i) for i in np.argwhere(bad)[0])
                raise CheckpointError(f"{source}: {name} is corrupted: {int(bad.sum())} code(s) outside "
                                      f"[{low}, {high}] for {spec.method} {spec.bits}-bit (first at row {row}, "
                                      f"column {col}: {int(values[row, col])})")


def _register() -> None:
    def describe(cell):
        return {"quant": cell.quant_config.to_dict()}

    register_architecture(QuantizedNezhaModel,
                          build=lambda config, document, **kwargs: QuantizedNezhaModel(
                              config, document["quant"], **{"add_pooler": document.get("add_pooler", True),
                                                            **kwargs}),
                          describe=lambda cell: {"add_pooler": bool(cell.add_pooler), **describe(cell)},
                          validate=validate_weights)
    register_architecture(QuantizedNezhaForSequenceClassification,
                          build=lambda config, document, **kwargs: QuantizedNezhaForSequenceClassification(
                              config, document.get("num_labels", 2), document["quant"], **kwargs),
                          describe=lambda cell: {"num_labels": cell.num_labels, **describe(cell)},
                          validate=validate_weights)
    register_architecture(QuantizedNezhaForMaskedLM,
                          build=lambda config, document, **kwargs: QuantizedNezhaForMaskedLM(
                              config, document["quant"], **kwargs),
                          describe=describe, validate=validate_weights)


_register()


# ----------------------------------------------------------------------------------------------------------------
# The verbs
# ----------------------------------------------------------------------------------------------------------------


def convert(prepared: nn.Cell, config: Optional[QuantConfig] = None) -> nn.Cell:
    """A new deployable model (Quantized* class) from a prepared (fake-quant) model; `prepared` is untouched.

    Codes come from the same primitives and the same LAT preconditioner as the fake-quant forward, so the converted
    forward equals the fake-quant one (up to float rounding of the STE's x + (q - x)).
    """
    config = config or getattr(prepared, "quant_config", None)
    if config is None:
        raise ConfigError("quant.convert: the model was not prepared (no quant_config); run quant.prepare first")
    base = next((kind for kind in _QUANTIZED_OF if type(prepared) is kind), None)
    if base is None:
        raise ConfigError(f"quant.convert: {type(prepared).__name__} is not a NezhaModel, "
                          "NezhaForSequenceClassification or NezhaForMaskedLM")
    backbone = prepared if isinstance(prepared, NezhaModel) else prepared.bert
    if base is NezhaForSequenceClassification:
        deployed = QuantizedNezhaForSequenceClassification(backbone.config, prepared.num_labels, config.to_dict())
    elif base is NezhaModel:
        deployed = QuantizedNezhaModel(backbone.config, config.to_dict(), add_pooler=prepared.add_pooler)
    else:
        deployed = QuantizedNezhaForMaskedLM(backbone.config, config.to_dict())
    weights = {name: value for name, value in cell_weights(prepared).items()
               if not name.endswith(".lat_preconditioner")}
    prepared_cells = _quant_cells_by_name(prepared, (FakeQuantDense, FakeQuantEmbedding))
    for name, cell in _quant_cells_by_name(deployed, (PackedDense, PackedEmbedding)).items():
        fake = prepared_cells.get(name)
        if fake is None:
            raise ConfigError(f"quant.convert: {name} is quantized in the recipe but not in the prepared model")
        kind = "embedding" if isinstance(cell, PackedEmbedding) else "weight"
        weight = fake.embedding_table if kind == "embedding" else fake.weight
        preconditioner = fake.lat_preconditioner if fake.lat else None
        codes, scale, minimum = quantize_codes(weight.value(), cell.spec, config, preconditioner)
        weights.pop(f"{name}.{'embedding_table' if kind == 'embedding' else 'weight'}")
        weights[f"{name}.{kind}_codes"] = encode(codes, cell.spec)
        weights[f"{name}.{kind}_scale"] = scale.reshape(scale_shape(codes.shape[0], cell.spec))
        if minimum is not None:
            weights[f"{name}.{kind}_minimum"] = minimum.reshape(scale_shape(codes.shape[0], cell.spec))
    load_weights(deployed, weights, strict=True, source="quant.convert", fresh=())
    deployed.set_train(False)
    return deployed


def share_graph_functions(model: nn.Cell) -> nn.Cell:
    """Switch a converted model's Packed cells and activation points to shared `no_inline` graph functions (in
    place): same values, a much smaller exported graph (see `_GRAPH_FUNCTIONS` above for the GraphCell caveat).
    Before the model's first graph-mode call (`prepare.check_not_compiled`)."""
    check_not_compiled(model, "share_graph_functions")
    shared = 0
    for _, cell in model.cells_and_names():
        if isinstance(cell, (PackedDense, PackedEmbedding, ActivationQuant)):
            cell.share()
            shared += 1
    if not shared:
        raise ConfigError(f"share_graph_functions: {type(model).__name__} has no packed cells (run quant.convert)")
    return model


def decode(model: nn.Cell, activations: bool = True) -> nn.Cell:
    """Decode-once serving: replace every Packed cell by a float cell holding its decoded weight (in place).

    activations=True keeps every activation fake-quant point: the same outputs as the packed model (and the
    MindIR), but each matmul input still pays the dynamic 8-bit quantizer's elementwise passes (measured 1.6-2.5x
    fp32 on CPU, README "Latency"). activations=False removes them too: weight-only quantized serving, the fp32 graph
    at fp32 speed over the decoded weights, whose outputs are NOT those of the quantized model (its accuracy is
    measured separately: `scripts/quant_eval_teacher.py --weight-only`). Call it before the model's first graph-mode
    call (`prepare.check_not_compiled`)."""
    check_not_compiled(model, "decode")
    for name, cell in _quant_cells_by_name(model, (PackedDense, PackedEmbedding)).items():
        replacement = DecodedDense(cell) if isinstance(cell, PackedDense) else DecodedEmbedding(cell)
        parent, attribute = _parent(model, name)
        parent.insert_child_to_cell(attribute, replacement)
    if not activations:
        for name in list(_quant_cells_by_name(model, ActivationQuant)):
            parent, attribute = _parent(model, name)
            parent.insert_child_to_cell(attribute, nn.Identity())
    return model
