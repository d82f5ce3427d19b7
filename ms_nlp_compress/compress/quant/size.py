"""Byte-exact size report per tensor group, for a model directory's safetensors file and for a MindIR file.

Groups: word embedding, position/type embeddings, encoder weights (codes + scales or float), biases and norms,
pooler/classifier, MLM head, and `container` = file bytes not in any tensor (safetensors JSON header, MindIR graph
protobuf). Every tensor's bytes are read from the file itself (safetensors header offsets; MindIR raw_data
lengths), so group sums + container == file size exactly. `mindir_container_breakdown` splits a MindIR container
further by kind (node names, input references, scopes, attributes, constants, function graphs, ...) and op type.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from ms_nlp_compress.errors import CheckpointError

GROUPS = ("word_embedding", "position_type_embeddings", "encoder_weights", "biases_and_norms",
          "pooler_classifier", "mlm_head", "other", "container")


def tensor_group(name: str) -> str:
    """The report group of a parameter name (ours: `bert.encoder.layers.0...weight_codes`, ...)."""
    last = name.rsplit(".", 1)[-1]
    if "word_embeddings" in name:
        return "word_embedding"
    if "position_embeddings" in name or "token_type_embeddings" in name:
        return "position_type_embeddings"
    if last in ("bias", "gamma", "beta") and "classifier" not in name and "pooler" not in name:
        return "biases_and_norms"
    if "pooler" in name or "classifier" in name:
        return "pooler_classifier"
    if "lm_head" in name:
        return "mlm_head"
    if ".encoder.layers." in f".{name}":
        return "encoder_weights"
    return "other"


@dataclass
class SizeReport:
    path: Path
    file_bytes: int
    groups: Dict[str, int] = field(default_factory=dict)

    def ratio_to(self, baseline: "SizeReport") -> float:
        return baseline.file_bytes / self.file_bytes

    def table(self, baseline: Optional["SizeReport"] = None) -> List[str]:
        lines = [f"{'group':<26}{'bytes':>14}" + (f"{'fp32 bytes':>14}{'ratio':>9}" if baseline else "")]
        for group in GROUPS:
            ours = self.groups.get(group, 0)
            if not ours and not (baseline and baseline.groups.get(group)):
                continue
            line = f"{group:<26}{ours:>14,}"
            if baseline:
                base = baseline.groups.get(group, 0)
                line += f"{base:>14,}" + (f"{base / ours:>8.1f}x" if ours else f"{'-':>9}")
            lines.append(line)
        total = f"{'total (file)':<26}{self.file_bytes:>14,}"
        if baseline:
            total += f"{baseline.file_bytes:>14,}{self.ratio_to(baseline):>8.2f}x"
        lines.append(total)
        return lines


def _report(path: Path, tensor_bytes: Dict[str, int]) -> SizeReport:
    file_bytes = path.stat().st_size
    groups = {group: 0 for group in GROUPS}
    for name, size in tensor_bytes.items():
        groups[tensor_group(name)] += size
    groups["container"] = file_bytes - sum(tensor_bytes.values())
    return SizeReport(path, file_bytes, groups)


def safetensors_report(path: Union[str, Path]) -> SizeReport:
    """Per-group bytes of a safetensors file (a model directory's model.safetensors or the directory itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    with path.open("rb") as handle:
        header_length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(header_length))
    sizes = {name: entry["data_offsets"][1] - entry["data_offsets"][0]
             for name, entry in header.items() if name != "__metadata__"}
    return _report(path, sizes)


def mindir_report(path: Union[str, Path]) -> SizeReport:
    """Per-group bytes of a MindIR file: each stored parameter's raw_data (integers stay integers)."""
    from mindspore.train.mind_ir_pb2 import ModelProto

    path = Path(path)
    model = ModelProto()
    model.ParseFromString(path.read_bytes())
    sizes = {}
    for parameter in model.graph.parameter:
        name = parameter.name.split(":")[-1]
        for wrapper in ("classifier.", "backbone."):  # export/mindir.py's inference wrappers hold the model so
            if name.startswith(wrapper + "bert.") or name.startswith(wrapper + "classifier."):
                name = name[len(wrapper):]
        sizes[name] = sizes.get(name, 0) + len(parameter.raw_data)
    return _report(path, sizes)


# ----------------------------------------------------------------------------------------------------------------
# What the MindIR container (everything that is not a parameter's raw_data) is made of
# ----------------------------------------------------------------------------------------------------------------
# Field numbers of mindspore/core/proto/mind_ir.proto (MindSpore 2.10) that the breakdown needs.
_MODEL_GRAPH, _MODEL_FUNCTIONS, _MODEL_PRIMITIVES = 7, 8, 12
_GRAPH_NODE, _GRAPH_PARAMETER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 3, 5, 6
_NODE_FIELDS = {1: "node_inputs", 2: "node_names", 3: "node_names", 4: "op_types", 5: "node_attributes",
                6: "node_debug", 7: "node_scopes", 8: "node_attributes", 9: "node_attributes"}
_TENSOR_RAW_DATA = 9
CONTAINER_KINDS = ("node_names", "node_inputs", "node_scopes", "op_types", "node_attributes", "constant_values",
                   "node_debug", "parameter_headers", "graph_io", "functions", "primitives", "framing", "other")


def _varint(data: bytes, position: int):
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _wire_fields(data: bytes, start: int, end: int):
    """Protobuf wire-format walk of data[start:end]: (field number, field start, payload start, field end) per
    field occurrence. Field start..end covers tag, length prefix and payload, so the spans partition the range."""
    position = start
    while position < end:
        field_start = position
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(data, position)
            payload = position
        elif wire_type == 1:
            payload, position = position, position + 8
        elif wire_type == 2:
            length, payload = _varint(data, position)
            position = payload + length
        elif wire_type == 5:
            payload, position = position, position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {field_start}")
        if position > end:
            raise ValueError(f"field {number} at byte {field_start} runs past its message's end (byte {end})")
        yield number, field_start, payload, position


@dataclass
class ContainerBreakdown:
    """Bytes of a MindIR file outside parameter raw_data, by kind, plus node counts and bytes per op type.

    node_names: each node's name and output strings (the inlined function-graph prefix + CNode id);
    node_inputs: the input strings (references to producers, repeating their names); node_scopes: the `domain`
    field (Default/cell-Class/.../Op-op0); op_types: `REF::Prim:N` / `Constant`; node_attributes: inferred output
    shapes and flags of operation nodes; constant_values: the value attribute of Constant (value) nodes, inlined
    tensors included; parameter_headers: parameter names, dims, dtypes and raw_data length prefixes; graph_io:
    graph inputs/outputs; functions: non-inlined sub-graphs; primitives: the primitive table; framing: tags and
    length prefixes of nodes, graph and model fields. The kinds sum exactly to `container` of the SizeReport.
    """

    kinds: Dict[str, int] = field(default_factory=dict)
    node_count: int = 0
    constant_count: int = 0
    inlined_tensor_bytes: int = 0  # raw_data inside constant values (already counted in constant_values)
    op_counts: Dict[str, int] = field(default_factory=dict)
    op_bytes: Dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def table(self, baseline: Optional["ContainerBreakdown"] = None, top_ops: int = 12) -> List[str]:
        lines = [f"{'container kind':<26}{'bytes':>12}" + (f"{'baseline':>12}" if baseline else "")]
        for kind in CONTAINER_KINDS:
            ours, base = self.kinds.get(kind, 0), (baseline.kinds.get(kind, 0) if baseline else 0)
            if ours or base:
                lines.append(f"{kind:<26}{ours:>12,}" + (f"{base:>12,}" if baseline else ""))
        lines.append(f"{'total (container)':<26}{self.total:>12,}" + (f"{baseline.total:>12,}" if baseline else ""))
        lines.append(f"nodes {self.node_count:,} ({self.constant_count:,} constants, inlined tensor bytes "
                     f"{self.inlined_tensor_bytes:,})" + (f"; baseline {baseline.node_count:,} nodes"
                                                         if baseline else ""))
        ranked = sorted(self.op_bytes, key=lambda op: -self.op_bytes[op])[:top_ops]
        lines.append("op type: nodes / bytes  " + ", ".join(
            f"{op} {self.op_counts[op]} / {self.op_bytes[op]:,}" for op in ranked))
        return lines


def _op_name(op_type: str) -> str:
    """`REF::MatMul:108` -> `MatMul` (the suffix is a per-file primitive id)."""
    name = op_type[5:] if op_type.startswith("REF::") else op_type
    return name.rsplit(":", 1)[0] if ":" in name else name


def _constant_tensor_bytes(data: bytes, start: int, end: int) -> int:
    """raw_data bytes of tensors inside an AttributeProto (field t = 6, tensors = 12, nested values = 17)."""
    total = 0
    for number, _, payload, field_end in _wire_fields(data, start, end):
        if number in (6, 12):
            total += sum(field_end_ - payload_ for number_, _, payload_, field_end_ in
                         _wire_fields(data, payload, field_end) if number_ == _TENSOR_RAW_DATA)
        elif number == 17:
            total += _constant_tensor_bytes(data, payload, field_end)
    return total


def mindir_container_breakdown(path: Union[str, Path]) -> ContainerBreakdown:
    """Account every byte of a MindIR file that is not a parameter's raw_data, by kind (ContainerBreakdown).

    Decodes the protobuf wire format directly, so each field occurrence is attributed with its exact encoded size
    (tag + length prefix + payload); `total` equals `mindir_report(path).groups["container"]`.
    """
    data = Path(path).read_bytes()
    kinds = {kind: 0 for kind in CONTAINER_KINDS}
    breakdown = ContainerBreakdown(kinds=kinds)
    try:
        for number, start, payload, end in _wire_fields(data, 0, len(data)):
            if number == _MODEL_FUNCTIONS:
                kinds["functions"] += end - start
            elif number == _MODEL_PRIMITIVES:
                kinds["primitives"] += end - start
            elif number != _MODEL_GRAPH:
                kinds["other"] += end - start
            else:
                kinds["framing"] += payload - start
                _graph_breakdown(data, payload, end, breakdown)
    except (IndexError, ValueError) as err:  # IndexError: a varint cut off by the end of the file
        raise CheckpointError(f"{path}: not a valid MindIR protobuf ({err or 'truncated varint'})") from None
    return breakdown


def _graph_breakdown(data: bytes, start: int, end: int, breakdown: ContainerBreakdown) -> None:
    kinds = breakdown.kinds
    for number, field_start, payload, field_end in _wire_fields(data, start, end):
        if number == _GRAPH_NODE:
            kinds["framing"] += payload - field_start
            op = _node_breakdown(data, payload, field_end, breakdown)
            breakdown.op_counts[op] = breakdown.op_counts.get(op, 0) + 1
            breakdown.op_bytes[op] = breakdown.op_bytes.get(op, 0) + field_end - field_start
        elif number == _GRAPH_PARAMETER:
            raw = sum(fe - p for n, _, p, fe in _wire_fields(data, payload, field_end) if n == _TENSOR_RAW_DATA)
            kinds["parameter_headers"] += field_end - field_start - raw  # raw_data itself is a tensor group
        elif number in (_GRAPH_INPUT, _GRAPH_OUTPUT):
            kinds["graph_io"] += field_end - field_start
        else:
            kinds["other"] += field_end - field_start


def _node_breakdown(data: bytes, start: int, end: int, breakdown: ContainerBreakdown) -> str:
    """Attribute one NodeProto's fields; returns its op name for the per-op counts."""
    fields = list(_wire_fields(data, start, end))
    op_type = next((data[p:fe].decode("utf-8", "replace") for n, _, p, fe in fields if n == 4), "")
    constant = op_type == "Constant"
    breakdown.node_count += 1
    breakdown.constant_count += constant
    for number, field_start, payload, field_end in fields:
        kind = _NODE_FIELDS.get(number, "other")
        if constant and number == 5:
            kind = "constant_values"
            breakdown.inlined_tensor_bytes += _constant_tensor_bytes(data, payload, field_end)
        breakdown.kinds[kind] += field_end - field_start
    return _op_name(op_type)
