"""Checkpoints: Hugging Face BERT-format / NEZHA-format safetensors import, and our own model directory.

Loading is strict by default: every model parameter must be filled and every checkpoint tensor must be used, with
matching shapes; the error lists each offending tensor. `strict=False` loads what fits and returns a report of
what was skipped. No torch is needed: safetensors files are read with `safetensors.numpy`.

Our model directory:
    config.json        {"format": "ms_nlp_compress", "version": 1, "architecture": ..., "model": NezhaConfig, ...}
    model.safetensors  parameters under our own names (`bert.encoder.layers.0.attention.self_attention.query.weight`)
    vocab.txt | spm.model   the tokenizer's files, copied
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mindspore import Tensor, nn

from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import CheckpointError, ConfigError
from ms_nlp_compress.models.nezha import NezhaForMaskedLM, NezhaForSequenceClassification, NezhaModel

FORMAT_NAME = "ms_nlp_compress"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("vocab.txt", "spm.model", "tokenizer.json")

# Checkpoint tensors that are deliberately not used: HF's position-id buffer, and the next-sentence head
# (NSP is not part of our pre-training).
_IGNORED_PATTERNS = (re.compile(r"^(bert\.)?embeddings\.position_ids$"), re.compile(r"^cls\.seq_relationship\."))

# Hugging Face BERT names (without the leading `bert.`) -> our names (relative to the backbone).
_LAYER_RULES = (
    (r"attention\.self\.(query|key|value)\.(weight|bias)", r"attention.self_attention.\1.\2"),
    (r"attention\.output\.dense\.(weight|bias)", r"attention.output.dense.\1"),
    (r"attention\.output\.LayerNorm\.(weight|gamma)", r"attention.output.layer_norm.gamma"),
    (r"attention\.output\.LayerNorm\.(bias|beta)", r"attention.output.layer_norm.beta"),
    (r"intermediate\.dense\.(weight|bias)", r"ffn.intermediate.\1"),
    (r"output\.dense\.(weight|bias)", r"ffn.output.\1"),
    (r"output\.LayerNorm\.(weight|gamma)", r"ffn.layer_norm.gamma"),
    (r"output\.LayerNorm\.(bias|beta)", r"ffn.layer_norm.beta"),
)
_BACKBONE_RULES = (
    (r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
     r"embeddings.\1.embedding_table"),
    (r"embeddings\.LayerNorm\.(weight|gamma)", r"embeddings.layer_norm.gamma"),
    (r"embeddings\.LayerNorm\.(bias|beta)", r"embeddings.layer_norm.beta"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
)
_HEAD_RULES = (
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"lm_head.dense.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|gamma)", r"lm_head.layer_norm.gamma"),
    (r"cls\.predictions\.transform\.LayerNorm\.(bias|beta)", r"lm_head.layer_norm.beta"),
    (r"cls\.predictions\.bias", r"lm_head.bias"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
)


@dataclass
class LoadReport:
    """What a load did. `missing`: model parameters not in the checkpoint; `unexpected`: checkpoint tensors the
    model has no place for; `mismatched`: (name, checkpoint shape, model shape); `ignored`: unused by design."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for name in self.missing:
            lines.append(f"  missing from checkpoint: {name}")
        for name in self.unexpected:
            lines.append(f"  unexpected in checkpoint: {name}")
        for name, got, want in self.mismatched:
            lines.append(f"  shape mismatch: {name}: checkpoint {tuple(got)} vs model {tuple(want)}")
        for name in self.ignored:
            lines.append(f"  ignored by design: {name}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------


def read_safetensors(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None


def _read_json(path: Path, missing: str) -> Dict[str, Any]:
    """A JSON config file; a missing file or bad JSON is an error naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None


def safetensors_names(path: Union[str, Path]) -> List[str]:
    """Tensor names of a safetensors file, from its header only (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None


def write_safetensors(weights: Dict[str, np.ndarray], path: Union[str, Path], metadata: Optional[Dict] = None) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint under the final name."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face / NEZHA format
# ----------------------------------------------------------------------------------------------------------------


def hf_to_native(hf_weights: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], List[str], List[str]]:
    """Rename HF BERT / NEZHA tensors to our names (backbone under `bert.`, heads at top level).

    Returns (weights, unmapped names, ignored names). The tied MLM decoder weight is dropped when it equals the
    word-embedding table (our decoder is tied by construction); an untied one is reported as unmapped.
    """
    native: Dict[str, np.ndarray] = {}
    unmapped: List[str] = []
    ignored: List[str] = []
    layer_pattern = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
    for name, value in hf_weights.items():
        if any(p.search(name) for p in _IGNORED_PATTERNS):
            ignored.append(name)
            continue
        target = None
        for pattern, replacement in _HEAD_RULES:
            if re.fullmatch(pattern, name):
                target = re.sub(pattern, replacement, name)
        if name.startswith("cls.predictions.decoder."):
            if name.endswith(".bias"):  # the same tensor as cls.predictions.bias in HF checkpoints
                ignored.append(name)
                continue
            word = hf_weights.get("bert.embeddings.word_embeddings.weight",
                                  hf_weights.get("embeddings.word_embeddings.weight"))
            if word is not None and word.shape == value.shape and np.array_equal(word, value):
                ignored.append(name)
                continue
            unmapped.append(name)
            continue
        if target is None:
            stem = name[len("bert."):] if name.startswith("bert.") else name
            match = layer_pattern.match(stem)
            if match:
                index, rest = match.groups()
                for pattern, replacement in _LAYER_RULES:
                    if re.fullmatch(pattern, rest):
                        target = f"bert.encoder.layers.{index}." + re.sub(pattern, replacement, rest)
                        break
            else:
                for pattern, replacement in _BACKBONE_RULES:
                    if re.fullmatch(pattern, stem):
                        target = "bert." + re.sub(pattern, replacement, stem)
                        break
        if target is None:
            unmapped.append(name)
        else:
            native[target] = value
    return native, unmapped, ignored


_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "relu": "relu"}


def config_from_hf(values: Dict[str, Any], source: str, tensor_names: Optional[Sequence[str]] = None
                   ) -> NezhaConfig:
    """Translate a HF BERT / NEZHA `config.json` into a NezhaConfig (unknown HF keys are irrelevant here).

    `tensor_names` (the checkpoint's) settle the position type: NEZHA checkpoints have no position table.
    """
    def need(key):
        if key not in values:
            raise ConfigError(f"{source}: missing key {key}")
        return values[key]

    activation = values.get("hidden_act", "gelu")
    if activation not in _HF_ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act {activation!r} is not supported; one of {sorted(_HF_ACTIVATIONS)}")
    relative = bool(values.get("use_relative_position", False)) or values.get("position_embedding_type") in (
        "relative", "relative_key", "nezha")
    if tensor_names is not None:
        has_table = any(k.endswith("embeddings.position_embeddings.weight") for k in tensor_names)
        if relative and has_table:
            raise CheckpointError(f"{source}: config says relative positions but the checkpoint has an absolute "
                                  "position table (embeddings.position_embeddings.weight)")
        if not relative and not has_table:
            relative = True  # NEZHA checkpoints carry no position table; their configs often say nothing
    config = NezhaConfig(
        vocab_size=need("vocab_size"), hidden_size=need("hidden_size"), num_layers=need("num_hidden_layers"),
        num_heads=need("num_attention_heads"), intermediate_size=need("intermediate_size"),
        hidden_act=_HF_ACTIVATIONS[activation],
        hidden_dropout=float(values.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(values.get("attention_probs_dropout_prob", 0.1)),
        max_position_embeddings=values.get("max_position_embeddings", 512),
        type_vocab_size=values.get("type_vocab_size", 2),
        position_embedding="relative" if relative else "absolute",
        max_relative_position=values.get("max_relative_position", 64),
        layer_norm_eps=float(values.get("layer_norm_eps", 1e-12)),
        initializer_range=float(values.get("initializer_range", 0.02)),
        pad_token_id=values.get("pad_token_id", 0) or 0,
    )
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return config


def _find_weights_file(directory: Path) -> Path:
    for name in (WEIGHTS_FILE,):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        others = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".ckpt", ".h5")]
        hint = f" (found {others}: convert them to safetensors first; torch pickles are not read)" if others else ""
        raise CheckpointError(f"{directory}: no .safetensors file{hint}")
    raise CheckpointError(f"{directory}: several .safetensors files {[p.name for p in found]}; name one")


def read_hf_checkpoint(path: Union[str, Path]) -> Tuple[NezhaConfig, Dict[str, np.ndarray], List[str], List[str]]:
    """Read a HF BERT / NEZHA folder (config.json + *.safetensors). Returns (config, our-named weights,
    unmapped tensor names, ignored tensor names)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    weights_file = path if path.is_file() else _find_weights_file(directory)
    config_file = directory / CONFIG_FILE
    values = _read_json(config_file, "config.json not found next to the weights")
    hf_weights = read_safetensors(weights_file)
    config = config_from_hf(values, str(config_file), list(hf_weights))
    native, unmapped, ignored = hf_to_native(hf_weights)
    return config, native, unmapped, ignored


# ----------------------------------------------------------------------------------------------------------------
# Loading named weights into a Cell
# ----------------------------------------------------------------------------------------------------------------


def _relative_to(cell: nn.Cell, weights: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Our files name the backbone `bert.*`; a bare NezhaModel names it without the prefix."""
    names = [name for name, _ in cell.parameters_and_names()]
    if names and not any(n.startswith("bert.") for n in names):
        return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in weights.items()}
    return weights


def load_weights(cell: nn.Cell, weights: Dict[str, np.ndarray], strict: bool = True, source: str = "<weights>",
                 ignored: Sequence[str] = (), unmapped: Sequence[str] = ()) -> LoadReport:
    """Copy named numpy weights into `cell`'s Parameters.

    strict=True: any missing, unexpected, unmapped or mis-shaped tensor is a CheckpointError naming each one, and
    nothing is loaded. strict=False: loads what fits and returns the report of what was skipped.
    """
    weights = _relative_to(cell, weights)
    report = LoadReport(source=source, ignored=list(ignored), unexpected=list(unmapped))
    # Run state (dropout counters) is not a weight: absent from a checkpoint, it keeps its current value.
    params = {name: param for name, param in cell.parameters_and_names()
              if not (is_run_state(name) and name not in weights)}
    for name, param in params.items():
        if name not in weights:
            report.missing.append(name)
            continue
        value = weights[name]
        if tuple(value.shape) != tuple(param.shape):
            report.mismatched.append((name, tuple(value.shape), tuple(param.shape)))
    report.unexpected.extend(sorted(k for k in weights if k not in params))
    if strict and not report.complete:
        raise CheckpointError("checkpoint does not match the model (pass strict=False to load what fits):\n"
                              + report.describe())
    bad = set(report.missing) | {m[0] for m in report.mismatched}
    for name, param in params.items():
        if name in bad:
            continue
        value = weights[name]
        if not is_run_state(name) and not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{source}: tensor {name} has dtype {value.dtype}; expected floating point")
        param.set_data(Tensor(value, dtype=param.dtype))
        report.loaded.append(name)
    return report


def is_run_state(name: str) -> bool:
    """Parameters that are training-run state rather than weights (saved in training checkpoints only)."""
    return name.endswith("rng_counter")


def cell_weights(cell: nn.Cell, include_run_state: bool = False) -> Dict[str, np.ndarray]:
    """A Cell's parameters as named numpy arrays (copies: on CPU `asnumpy` shares the Parameter's memory)."""
    return {name: param.asnumpy().copy() for name, param in cell.parameters_and_names()
            if include_run_state or not is_run_state(name)}


# ----------------------------------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------------------------------

ARCHITECTURES = {
    "NezhaModel": NezhaModel,
    "NezhaForSequenceClassification": NezhaForSequenceClassification,
    "NezhaForMaskedLM": NezhaForMaskedLM,
}


def build_model(architecture: str, config: NezhaConfig, **kwargs) -> nn.Cell:
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture: unknown {architecture!r}; one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](config, **kwargs)


def save_model_dir(cell: nn.Cell, directory: Union[str, Path], config: NezhaConfig,
                   meta: Optional[Dict[str, Any]] = None, tokenizer_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) into `directory`, atomically per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = type(cell).__name__
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"cannot save a {architecture}: one of {sorted(ARCHITECTURES)}")
    document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "architecture": architecture,
                "model": config.to_dict()}
    if isinstance(cell, NezhaForSequenceClassification):
        document["num_labels"] = cell.num_labels
    document.update(meta or {})
    write_safetensors(cell_weights(cell), directory / WEIGHTS_FILE, metadata={"format": FORMAT_NAME})
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
    os.replace(tmp, directory / CONFIG_FILE)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file() and source.resolve() != (directory / name).resolve():
                shutil.copyfile(source, directory / name)
    return directory


def is_model_dir(path: Union[str, Path]) -> bool:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except json.JSONDecodeError:
        return False


def read_model_document(directory: Union[str, Path]) -> Tuple[Dict[str, Any], NezhaConfig]:
    """The config.json of our model directory, checked, and its NezhaConfig (the weights are not read)."""
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    document = _read_json(config_file, f"not found (is {directory} a model directory?)")
    if document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_file}: not a {FORMAT_NAME} model directory (format "
                              f"{document.get('format')!r}); Hugging Face folders load with load_pretrained")
    if document.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format version {document['version']} is newer than this code "
                              f"({FORMAT_VERSION})")
    return document, NezhaConfig.from_dict(document.get("model", {}), str(config_file))


def read_model_dir(directory: Union[str, Path]) -> Tuple[Dict[str, Any], NezhaConfig, Dict[str, np.ndarray]]:
    document, config = read_model_document(directory)
    return document, config, read_safetensors(Path(directory) / WEIGHTS_FILE)


def saved_architecture(path: Union[str, Path]) -> Optional[str]:
    """The architecture saved in our model directory at `path`; None for anything else (e.g. a HF folder)."""
    path = Path(path)
    if not (path.is_dir() and is_model_dir(path)):
        return None
    return read_model_document(path)[0].get("architecture")


def load_model_dir(directory: Union[str, Path], strict: bool = True, **build_kwargs) -> Tuple[nn.Cell, Dict]:
    """Rebuild the saved architecture and load its weights. Returns (cell, config document)."""
    document, config, weights = read_model_dir(directory)
    architecture = document.get("architecture", "NezhaModel")
    if architecture == "NezhaForSequenceClassification":
        build_kwargs.setdefault("num_labels", document.get("num_labels", 2))
    cell = build_model(architecture, config, **build_kwargs)
    load_weights(cell, weights, strict=strict, source=str(Path(directory) / WEIGHTS_FILE))
    return cell, document


def load_pretrained(cell: nn.Cell, path: Union[str, Path], strict: bool = True) -> LoadReport:
    """Load weights into `cell` from our model directory or a HF BERT / NEZHA safetensors folder or file.

    To start fine-tuning from a backbone-only checkpoint, load into the backbone: `load_pretrained(model.bert, p)`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.is_dir() and is_model_dir(path):
        _, _, weights = read_model_dir(path)
        return load_weights(cell, weights, strict=strict, source=str(path / WEIGHTS_FILE))
    _, weights, unmapped, ignored = read_hf_checkpoint(path)
    return load_weights(cell, weights, strict=strict, source=str(path), ignored=ignored, unmapped=unmapped)


def pretrained_config(path: Union[str, Path]) -> NezhaConfig:
    """The NezhaConfig of a model directory or a HF folder, without building a model or reading weights."""
    path = Path(path)
    if path.is_dir() and is_model_dir(path):
        return read_model_document(path)[1]
    directory = path if path.is_dir() else path.parent
    config_file = directory / CONFIG_FILE
    values = _read_json(config_file, "config.json not found")
    names = safetensors_names(_find_weights_file(directory) if path.is_dir() else path)
    return config_from_hf(values, str(config_file), names)
