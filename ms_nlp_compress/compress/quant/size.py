"""Byte-exact size report per tensor group, for a model directory's safetensors file and for a MindIR file.

Groups: word embedding, position/type embeddings, encoder weights (codes + scales or float), biases and norms,
pooler/classifier, MLM head, and `container` = file bytes not in any tensor (safetensors JSON header, MindIR graph
protobuf). Every tensor's bytes are read from the file itself (safetensors header offsets; MindIR raw_data
lengths), so group sums + container == file size exactly.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

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
