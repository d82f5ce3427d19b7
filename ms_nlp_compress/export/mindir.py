"""MindIR export with dynamic (batch, length) inputs, and a reload check that fails loudly.

Why a thin wrapper Cell: the training models return tuples (logits, hidden states, attention scores) and take an
optional head mask; a deployed graph should take exactly the three int32 token arrays and return one tensor, so the
Lite converter and the phone-side code see a fixed, documented signature:

    inputs   input_ids, attention_mask, token_type_ids    int32 (batch, length), both dimensions dynamic
    output   ClassifierForExport: logits (batch, num_labels)
             EncoderForExport:    sentence embedding (batch, hidden) or last hidden state (batch, length, hidden)

Why the reload check: an export can succeed and still compute something else (a training-only branch compiled in,
a shape specialised to the example input, a constant folded wrongly). `verify_mindir` loads the file back with
`ms.load` + `nn.GraphCell`, runs it on several (batch, length) shapes of real tokens and compares with the Cell
itself; a difference above the tolerance, a shape mismatch or a non-finite output is an ExportError.

MindSpore facts this module works around (docs/mindspore.md 4.5):
- `ms.export` rejects file names outside ^[0-9a-zA-Z@_\\-.:/\\\\]+$ with a bare regex message; we check first and
  name the offending character.
- Exported files are created read-only (0400). Re-exporting over one must still work, so the old file is made
  writable and removed before the new export: a failed export then leaves no stale file behind that could be
  mistaken for the new one.
"""
from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

from ms_nlp_compress.export import ExportError
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification, NezhaModel, SentenceEncoder

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# The pattern `ms.export` enforces on the whole file name, directories included (mindspore/_checkparam.py).
FILE_NAME_PATTERN = re.compile(r"^[0-9a-zA-Z@_\-.:/\\]+$")
_ALLOWED_CHARACTER = re.compile(r"[0-9a-zA-Z@_\-.:/\\]")
# One tiny batch, one padded pair batch with an odd length, one longer batch: together they catch a graph that was
# specialised to one batch size or one sequence length.
DEFAULT_VERIFY_SHAPES: Tuple[Tuple[int, int], ...] = ((1, 7), (4, 23), (3, 64))
ENCODER_OUTPUTS = ("sentence_embedding", "last_hidden_state")

# Real sentences for the reload check (English and Chinese, so both kinds of vocabulary see real tokens; the last
# one is long enough to fill 64 tokens, so the longest shape has rows without padding).
SAMPLE_TEXTS = (
    "The film was a delight from start to finish.",
    "A quiet, careful story that never quite finds its heart.",
    "Compressed models must still answer the same way as the original.",
    "今天天气很好，我们去公园散步吧。",
    "这部电影的情节太拖沓了，演员的表演也很一般。",
    "The phone ran the small model in a few milliseconds, while the large one drained the battery before lunch "
    "and still answered more slowly than anyone on the team was willing to accept for a keyboard suggestion.",
)


# ----------------------------------------------------------------------------------------------------------------
# Inference wrappers: the exact signature that goes into the file
# ----------------------------------------------------------------------------------------------------------------


class ClassifierForExport(nn.Cell):
    """(input_ids, attention_mask, token_type_ids) -> logits (B, num_labels); hidden states and scores dropped."""

    def __init__(self, classifier: NezhaForSequenceClassification):
        super().__init__()
        self.classifier = classifier

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.classifier(input_ids, attention_mask, token_type_ids)[0]


class EncoderForExport(nn.Cell):
    """(input_ids, attention_mask, token_type_ids) -> sentence embedding (B, H) or last hidden state (B, L, H).

    The sentence embedding is `SentenceEncoder`'s masked mean (L2-normalised by default), the way all-MiniLM-L6-v2
    is meant to be used; the last hidden state suits token-level heads added on the device.
    """

    def __init__(self, backbone: NezhaModel, output: str = "sentence_embedding", normalize: bool = True):
        super().__init__()
        if output not in ENCODER_OUTPUTS:
            raise ExportError(f"encoder output {output!r}: expected one of {ENCODER_OUTPUTS}")
        self.sentence_embedding = output == "sentence_embedding"
        if self.sentence_embedding:
            self.encoder = SentenceEncoder(backbone, normalize)
        else:
            self.backbone = backbone

    def construct(self, input_ids, attention_mask, token_type_ids):
        if self.sentence_embedding:
            return self.encoder(input_ids, attention_mask, token_type_ids)
        return self.backbone(input_ids, attention_mask, token_type_ids)[0]


def inference_wrapper(model: nn.Cell, kind: str, encoder_output: str = "sentence_embedding") -> nn.Cell:
    """The export wrapper for `model` (a classifier, a backbone, or a model holding its backbone as `.bert`)."""
    if kind == "classifier":
        if not isinstance(model, NezhaForSequenceClassification):
            raise ExportError(f"kind classifier needs a NezhaForSequenceClassification, got {type(model).__name__}; "
                              "use kind encoder for a backbone")
        wrapper = ClassifierForExport(model)
    elif kind == "encoder":
        backbone = model if isinstance(model, NezhaModel) else getattr(model, "bert", None)
        if not isinstance(backbone, NezhaModel):
            raise ExportError(f"kind encoder: {type(model).__name__} has no NezhaModel backbone")
        wrapper = EncoderForExport(backbone, encoder_output)
    else:
        raise ExportError(f"kind {kind!r}: expected classifier or encoder")
    wrapper.set_train(False)
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# Writing the file
# ----------------------------------------------------------------------------------------------------------------


def validate_file_name(file_name: Union[str, Path]) -> str:
    """The name as MindSpore will see it; an ExportError naming the first character `ms.export` would reject."""
    text = str(file_name)
    if not text:
        raise ExportError("export file name is empty")
    if text.endswith(("/", "\\")):
        raise ExportError(f"export file name {text!r} is a directory; give a file stem such as {text}model")
    if FILE_NAME_PATTERN.fullmatch(text):  # fullmatch: `$` alone would also accept a trailing newline
        return text
    position, character = next((i, c) for i, c in enumerate(text) if not _ALLOWED_CHARACTER.fullmatch(c))
    part = "directory" if position < len(text) - len(Path(text).name) else "file name"
    raise ExportError(
        f"export file name {text!r}: character {character!r} (U+{ord(character):04X}) at position {position}, in "
        f"the {part}, is not allowed by MindSpore; use only ASCII letters, digits and @ _ - . : / \\")


def mindir_path(file_stem: Union[str, Path]) -> Path:
    """`out/model` and `out/model.mindir` both name `out/model.mindir` (ms.export appends the suffix)."""
    text = str(file_stem)
    return Path(text if text.endswith(".mindir") else text + ".mindir")


def dynamic_input_specs(count: int = len(INPUT_NAMES)) -> List[Tensor]:
    """Placeholders with both dimensions unknown, so one file serves every batch size and sequence length."""
    return [Tensor(shape=[None, None], dtype=ms.int32) for _ in range(count)]


def _remove_read_only(path: Path) -> None:
    """Exports are 0400: make the file writable by its owner, then remove it."""
    if path.is_symlink() or path.exists():
        try:
            if not path.is_symlink():
                os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
            path.unlink()
        except OSError as err:
            raise ExportError(f"{path}: cannot replace the existing export: {err}") from None


def export_mindir(cell: nn.Cell, file_stem: Union[str, Path], input_specs: Optional[Sequence[Tensor]] = None,
                  overwrite: bool = True) -> Path:
    """Export `cell` (in inference mode) to `<file_stem>.mindir`; returns the path of the written file.

    `input_specs` are example Tensors or shape-only placeholders; the default is three int32 (None, None) inputs.
    The file is left read-only (0400), as MindSpore writes it.
    """
    path = mindir_path(file_stem)
    name = validate_file_name(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path}: already exists (pass overwrite=True to replace it)")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_read_only(path)
    specs = list(input_specs) if input_specs is not None else dynamic_input_specs()
    cell.set_train(False)  # dropout is a compile-time branch: training mode would bake it into the graph
    try:
        ms.export(cell, *specs, file_name=name, file_format="MINDIR")
    except (RuntimeError, ValueError, TypeError) as err:
        raise ExportError(f"{path}: ms.export of {type(cell).__name__} failed: {err}") from err
    if not path.is_file():
        split = path.with_name(path.stem + "_graph.mindir")
        hint = (f"; MindSpore split it into {split.name} + a _variables directory (models over 1 GB), which this "
                "exporter does not support") if split.exists() else ""
        raise ExportError(f"{path}: ms.export returned but wrote no such file{hint}")
    return path


def parameter_bytes(cell: nn.Cell) -> int:
    """Bytes of the Cell's parameters as stored (fp32 weights: 4 per value): what the file size is compared with."""
    seen = set()
    total = 0
    for parameter in cell.get_parameters():
        if parameter.name in seen:
            continue
        seen.add(parameter.name)
        total += int(np.prod(parameter.shape, dtype=np.int64)) * parameter.itemsize
    return total


def mindir_input_names(path: Union[str, Path]) -> List[str]:
    """The graph input names stored in a MindIR file (the Lite converter's --inputShape refers to them)."""
    from mindspore.train.mind_ir_pb2 import ModelProto

    model = ModelProto()
    try:
        model.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # noqa: BLE001 - protobuf raises its own DecodeError type
        raise ExportError(f"{path}: not a readable MindIR file: {err}") from None
    return [graph_input.name for graph_input in model.graph.input]


# ----------------------------------------------------------------------------------------------------------------
# Checking the file
# ----------------------------------------------------------------------------------------------------------------


def sample_inputs(tokenizer, shapes: Sequence[Tuple[int, int]] = DEFAULT_VERIFY_SHAPES,
                  texts: Sequence[str] = SAMPLE_TEXTS) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(input_ids, attention_mask, token_type_ids) int32 batches of exactly `shapes`, from real sentences.

    Short rows are padded and long ones truncated to each length, so padding masks are exercised; the second
    batch holds sentence pairs, so token_type_ids 1 reach the graph too.
    """
    batches = []
    for index, (batch_size, length) in enumerate(shapes):
        rows = [texts[(index + row) % len(texts)] for row in range(batch_size)]
        pairs = [texts[(index + row + 1) % len(texts)] for row in range(batch_size)] if index == 1 else None
        encoding = tokenizer.encode_batch(rows, pairs, max_length=length, pad=True)
        batch = (encoding.input_ids, encoding.attention_mask, encoding.token_type_ids)
        batches.append(tuple(np.ascontiguousarray(array, dtype=np.int32) for array in batch))
    return batches


def max_abs_difference(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |expected - actual|; inf when shapes differ or either side has a NaN / inf (a NaN must never pass)."""
    if expected.shape != actual.shape:
        return float("inf")
    if not (np.isfinite(expected).all() and np.isfinite(actual).all()):
        return float("inf")
    if expected.size == 0:
        return 0.0
    return float(np.abs(expected.astype(np.float64) - actual.astype(np.float64)).max())


@dataclass
class VerifyReport:
    """What the reload check measured. Sizes in bytes; `max_differences` maps each input shape to max |diff|."""

    path: Path
    file_bytes: int
    parameter_bytes: int
    atol: float
    max_differences: Dict[Tuple[int, int], float] = field(default_factory=dict)
    output_shapes: Dict[Tuple[int, int], Tuple[int, ...]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def worst(self) -> float:
        return max(self.max_differences.values(), default=0.0)


def _as_arrays(output) -> List[np.ndarray]:
    if isinstance(output, (tuple, list)):
        return [item.asnumpy() for item in output]
    return [output.asnumpy()]


def verify_mindir(path: Union[str, Path], cell: nn.Cell,
                  inputs_list: Sequence[Sequence[np.ndarray]], atol: float = 1e-4) -> VerifyReport:
    """Load `path` with ms.load + nn.GraphCell and compare it with `cell` on every input batch.

    `cell` runs in the current execution mode (PyNative by default: an independent eager path, not the same
    compiled graph). Raises ExportError listing every shape whose max |diff| exceeds `atol`, whose output shape
    differs, or whose output is not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: MindIR file not found")
    started = time.perf_counter()
    try:
        graph = nn.GraphCell(ms.load(str(path)))
    except (RuntimeError, ValueError) as err:
        raise ExportError(f"{path}: ms.load failed: {err}") from err
    if inputs_list:
        # Compile once for dynamic (batch, length), as a deployment would: a loaded graph holding non-inlined
        # function graphs (quant.convert.share_graph_functions) fails to recompile per shape on CPU (MindSpore 2.10).
        graph.set_inputs(*dynamic_input_specs(len(inputs_list[0])))
    cell.set_train(False)
    report = VerifyReport(path=path, file_bytes=path.stat().st_size, parameter_bytes=parameter_bytes(cell),
                          atol=atol)
    failures = []
    for inputs in inputs_list:
        tensors = [Tensor(np.ascontiguousarray(array, dtype=np.int32)) for array in inputs]
        shape = tuple(int(size) for size in inputs[0].shape)
        expected = _as_arrays(cell(*tensors))
        actual = _as_arrays(graph(*tensors))
        if len(expected) != len(actual):
            failures.append(f"input shape {shape}: the Cell returns {len(expected)} outputs, the file {len(actual)}")
            report.max_differences[shape] = float("inf")
            continue
        differences = [max_abs_difference(e, a) for e, a in zip(expected, actual)]
        report.max_differences[shape] = max(differences)
        report.output_shapes[shape] = tuple(actual[0].shape)
        for index, (difference, e, a) in enumerate(zip(differences, expected, actual)):
            if e.shape != a.shape:
                failures.append(f"input shape {shape}, output {index}: shape {a.shape} from the file vs "
                                f"{e.shape} from the Cell")
            elif not np.isfinite(difference):
                failures.append(f"input shape {shape}, output {index}: non-finite values (Cell finite: "
                                f"{bool(np.isfinite(e).all())}, file finite: {bool(np.isfinite(a).all())})")
            elif difference > atol:
                failures.append(f"input shape {shape}, output {index} {a.shape}: max |diff| {difference:.3g} "
                                f"> atol {atol:g}")
    report.seconds = time.perf_counter() - started
    if failures:
        raise ExportError(f"{path}: the reloaded MindIR does not reproduce {type(cell).__name__}:\n  "
                          + "\n  ".join(failures))
    return report
