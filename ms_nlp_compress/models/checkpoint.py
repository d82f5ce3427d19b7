"""Checkpoints: BERT / NEZHA checkpoints in the forms they are distributed in, and our own model directory.

Checkpoint forms read (README "Checkpoint forms"):
- our model directory: config.json {"format": "ms_nlp_compress", "architecture": ...} + model.safetensors;
- a Hugging Face / Google BERT / NEZHA folder: `config.json` or `bert_config.json`, and `model.safetensors`
  (sharded with `model.safetensors.index.json`) or `pytorch_model.bin`. A PyTorch pickle is read only through
  `torch.load(weights_only=True)` (torch is an optional extra); without torch the error gives the conversion
  command. Plain pickle loading never happens;
- tensor names of transformers' BertModel (no prefix), BertFor{MaskedLM,PreTraining,SequenceClassification}
  (`bert.` prefix, `cls.predictions.*`, `cls.seq_relationship.*`), NEZHA-PyTorch's BertForPreTraining, transformers'
  Nezha (`nezha.` prefix), `lm_head.*` heads, legacy `LayerNorm.gamma/beta`, DataParallel's `module.` prefix.

Loading rules: every tensor is checked (name, shape, dtype) before any is assigned, so a failed load leaves the
model untouched. What the model needs is strict: a missing, mis-shaped or wrongly typed tensor is an error naming
each one. Heads the model does not have (the MLM and NSP heads when fine-tuning, a classifier when continuing
pre-training) are named in one informational line and not loaded; a part the checkpoint has none of may start
fresh when the caller allows it (the pooler, which transformers' BertForMaskedLM does not save; the MLM head of a
backbone-only checkpoint in continued pre-training), said in the same line. An MLM decoder weight that differs from
the word embeddings is refused where the MLM head is used: our decoder is tied by construction.

Our model directory:
    config.json        {"format": "ms_nlp_compress", "version": 1, "architecture": ..., "model": NezhaConfig, ...}
    model.safetensors  parameters under our own names (`bert.encoder.layers.0.attention.self_attention.query.weight`),
                       floating point, or integer codes (uint8 / int8) with float scales for compressed models
    vocab.txt | spm.model | tokenizer.json | tokenizer_config.json   the tokenizer's files, copied
Any architecture in the registry (`register_architecture`) saves and loads; a directory is written to a staging
directory and swapped in whole, so a kill never leaves new weights beside an old document.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

from ms_nlp_compress.atomic import fsync_dir as _fsync  # files and directories alike
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import CheckpointError, ConfigError
from ms_nlp_compress.models.nezha import NezhaForMaskedLM, NezhaForSequenceClassification, NezhaModel

FORMAT_NAME = "ms_nlp_compress"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_FILES = (CONFIG_FILE, "bert_config.json")  # HF / Google BERT and NEZHA release names, in that order
TORCH_FILES = ("pytorch_model.bin",)
TOKENIZER_FILES = ("vocab.txt", "spm.model", "tokenizer.json", "tokenizer_config.json")

# Checkpoint tensors that are not weights: transformers' position-id buffer and the fixed relative-position table
# transformers' Nezha stores (ours is computed, models/nezha.py).
_IGNORED_PATTERNS = (re.compile(r"(^|\.)embeddings\.position_ids$"),
                     re.compile(r"\.relative_positions_encoding\.positions_encoding$"))
# Wrappers around the whole state dict (DataParallel) and around the backbone (BertFor*, transformers' Nezha*).
_STATE_PREFIXES = ("module.",)
_BACKBONE_PREFIXES = ("bert.", "nezha.")

# Hugging Face BERT names (without the backbone prefix) -> our names (relative to the backbone).
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
# Heads, by their full checkpoint name. The MLM decoder entries are settled against the word embeddings afterwards
# (`_settle_decoder`); the NSP head has no place in any of our models and is always reported unused.
_HEAD_RULES = (
    (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"lm_head.dense.\1"),
    (r"cls\.predictions\.transform\.LayerNorm\.(weight|gamma)", r"lm_head.layer_norm.gamma"),
    (r"cls\.predictions\.transform\.LayerNorm\.(bias|beta)", r"lm_head.layer_norm.beta"),
    (r"cls\.predictions\.bias", r"lm_head.bias"),
    (r"cls\.predictions\.decoder\.(weight|bias)", r"lm_head.decoder.\1"),
    (r"lm_head\.dense\.(weight|bias)", r"lm_head.dense.\1"),
    (r"lm_head\.(?:layer_norm|LayerNorm)\.(weight|gamma)", r"lm_head.layer_norm.gamma"),
    (r"lm_head\.(?:layer_norm|LayerNorm)\.(bias|beta)", r"lm_head.layer_norm.beta"),
    (r"lm_head\.bias", r"lm_head.bias"),
    (r"lm_head\.decoder\.(weight|bias)", r"lm_head.decoder.\1"),
    (r"cls\.seq_relationship\.(weight|bias)", r"nsp_head.\1"),
    (r"classifier\.(weight|bias)", r"classifier.\1"),
)
_WORD_TABLE = "bert.embeddings.word_embeddings.embedding_table"

# The parts of a model, by our parameter name: everything that is not a head or the pooler is "backbone" (custom
# architectures included), which is always loaded strictly.
BACKBONE, POOLER, MLM_HEAD, NSP_HEAD, CLASSIFIER = "backbone", "pooler", "MLM head", "NSP head", "classifier"


def part_of(name: str) -> str:
    """The model part an our-named tensor belongs to (with or without the `bert.` prefix)."""
    if name.startswith("lm_head."):
        return MLM_HEAD
    if name.startswith("nsp_head."):
        return NSP_HEAD
    if name.startswith("classifier."):
        return CLASSIFIER
    if re.search(r"(^|\.)pooler\.", name):
        return POOLER
    return BACKBONE


def _dotted_prefix(names: Sequence[str]) -> str:
    """`cls.predictions.*` for a group of names sharing that prefix; the name itself for one tensor."""
    if len(names) == 1:
        return names[0]
    parts = [name.split(".") for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) + ".*" if common else ", ".join(sorted(names))


@dataclass
class LoadReport:
    """What a load did (names are the model's, relative to the loaded cell).

    `missing`: model parameters not in the checkpoint; `unexpected`: checkpoint tensors that belong to no part of
    the model (an unknown name is never guessed at); `mismatched`: (name, checkpoint shape, model shape);
    `wrong_dtype`: (name, checkpoint dtype, model dtype); `refused`: (name, why); `unused`: tensors of heads the
    model does not have; `fresh`: parameters of a part the checkpoint has none of, left at their initialisation;
    `ignored`: not weights (position-id buffers); `names`: our name -> the checkpoint's name.
    """

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    wrong_dtype: List[Tuple[str, str, str]] = field(default_factory=list)
    refused: List[Tuple[str, str]] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    fresh: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    names: Dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype or self.refused)

    def checkpoint_name(self, name: str) -> str:
        return self.names.get(name, name)

    def _from(self, name: str) -> str:
        original = self.checkpoint_name(name)
        return f" (checkpoint name {original})" if original != name else ""

    def describe(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for name in self.missing:
            lines.append(f"  missing from checkpoint: {name}")
        for name in self.unexpected:
            lines.append(f"  unexpected in checkpoint: {name}")
        for name, got, want in self.mismatched:
            lines.append(f"  shape mismatch: {name}: checkpoint {tuple(got)} vs model {tuple(want)}{self._from(name)}")
        for name, got, want in self.wrong_dtype:
            lines.append(f"  dtype mismatch: {name}: checkpoint {got} vs model {want}{self._from(name)}")
        for name, why in self.refused:
            lines.append(f"  refused: {self.checkpoint_name(name)}: {why}")
        if self.unused:
            lines.append(f"  not used (heads this model does not have): {self.unused_groups()}")
        if self.fresh:
            lines.append(f"  starts fresh (none in the checkpoint): {self.fresh_groups()}")
        for name in self.ignored:
            lines.append(f"  ignored by design: {name}")
        return "\n".join(lines)

    def unused_groups(self) -> str:
        groups: Dict[str, List[str]] = {}
        for name in self.unused:
            groups.setdefault(part_of(name), []).append(self.checkpoint_name(name))
        return ", ".join(f"{part} ({_dotted_prefix(names)}: {len(names)} tensors)" for part, names in groups.items())

    def fresh_groups(self) -> str:
        groups: Dict[str, List[str]] = {}
        for name in self.fresh:
            groups.setdefault(part_of(name), []).append(name)
        return ", ".join(f"{part} ({_dotted_prefix(names)})" for part, names in groups.items())

    def summary(self) -> str:
        """The one informational line of a successful load."""
        line = f"{self.source}: loaded {len(self.loaded)} tensors"
        if self.unused:
            line += f"; not used: {self.unused_groups()}"
            if any(name.startswith("lm_head.decoder.") for name in self.unused):
                line += " (its MLM decoder is untied from the word embeddings)"
        if self.fresh:
            line += f"; starts fresh (not in the checkpoint): {self.fresh_groups()}"
        return line


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
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


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
        _fsync(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_missing_message(path: Path) -> str:
    directory = path.parent
    return (f"{path}: a PyTorch pickle. It is read only through torch.load(weights_only=True), which never runs code "
            f"from the file, and torch is not installed. Install the CPU build "
            f"(`pip install torch --index-url https://download.pytorch.org/whl/cpu`) and run "
            f"`msnc convert {directory} {directory}-msnc` once, then use --set pretrained={directory}-msnc "
            f"(torch is not needed after that); or run `msnc convert` where torch is installed and copy the result")


def _torch_reason(err: Exception) -> str:
    """The informative line of torch's refusal (its first lines advise loading the file unsafely: not repeated)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "WeightsUnpickler error" in line or "Unsupported" in line:
            return line.split(". Please")[0][:300]  # what follows is how to allow the global: not advised here
    return (lines[-1] if lines else type(err).__name__)[:300]


def read_torch_file(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """A PyTorch state dict (`pytorch_model.bin`) through `torch.load(weights_only=True)`, never plain pickle.

    weights_only=True unpickles only tensors, storages and plain containers: a file whose pickle would call anything
    else (the way a malicious `pytorch_model.bin` runs code) is refused before any of it runs. Without torch the file
    is not opened at all.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        import torch
    except ImportError:
        raise CheckpointError(torch_missing_message(path)) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only: refuse rather than unpickle
        raise CheckpointError(f"{path}: torch {torch.__version__} cannot load with weights_only=True; "
                              "`pip install 'torch>=1.13'`, then `msnc convert`") from None
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError ...: all refusals
        raise CheckpointError(f"{path}: refused: torch.load(weights_only=True) could not read it as tensors only "
                              f"({_torch_reason(err)}). Nothing in it was executed. A plain state dict of tensors loads; "
                              "re-save the weights as safetensors with the tool that wrote them") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model", "module"):  # training checkpoints wrap the state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    weights = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        weights[str(name)] = value.numpy().copy()
    return weights


def _index_shards(index_file: Path) -> List[Path]:
    values = _read_json(index_file, "index file not found")
    weight_map = values.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: no weight_map")
    return [index_file.parent / name for name in sorted(set(weight_map.values()))]


def read_weights_file(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """The tensors of a weights file (safetensors, a shard index, or a PyTorch state dict), checkpoint names."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        weights: Dict[str, np.ndarray] = {}
        for shard in _index_shards(path):
            weights.update(read_weights_file(shard))
        return weights
    if path.suffix in (".bin", ".pt", ".pth"):
        return read_torch_file(path)
    return read_safetensors(path)


def weight_names(path: Union[str, Path]) -> List[str]:
    """Tensor names of a weights file; safetensors from the header only."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return [name for shard in _index_shards(path) for name in weight_names(shard)]
    if path.suffix in (".bin", ".pt", ".pth"):
        return list(read_torch_file(path))
    return safetensors_names(path)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face / NEZHA format
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MappedCheckpoint:
    """A checkpoint's tensors under our names (backbone under `bert.`, heads at the top level)."""

    weights: Dict[str, np.ndarray]
    names: Dict[str, str]  # our name -> checkpoint name
    unmapped: List[str]  # checkpoint names no rule knows
    ignored: List[str]  # not weights (position-id buffers, a tied decoder that is the word embeddings)


def _strip(name: str, prefixes: Sequence[str]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _our_name(name: str) -> Optional[str]:
    for pattern, replacement in _HEAD_RULES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    stem = _strip(name, _BACKBONE_PREFIXES)
    match = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", stem)
    if match:
        index, rest = match.groups()
        for pattern, replacement in _LAYER_RULES:
            if re.fullmatch(pattern, rest):
                return f"bert.encoder.layers.{index}." + re.sub(pattern, replacement, rest)
        return None
    for pattern, replacement in _BACKBONE_RULES:
        if re.fullmatch(pattern, stem):
            return "bert." + re.sub(pattern, replacement, stem)
    return None


def _settle_decoder(mapped: MappedCheckpoint) -> None:
    """The MLM decoder: a weight equal to the word embeddings is the tied one (dropped, ours is tied by
    construction); a decoder bias equal to (or standing in for) `cls.predictions.bias` is that bias. What differs
    stays under `lm_head.decoder.*`, which no model has: unused when fine-tuning, refused where the MLM head is used.
    """
    weights, names = mapped.weights, mapped.names
    decoder = weights.get("lm_head.decoder.weight")
    word = weights.get(_WORD_TABLE)
    if decoder is not None and word is not None and decoder.shape == word.shape and np.array_equal(decoder, word):
        mapped.ignored.append(names.pop("lm_head.decoder.weight"))
        del weights["lm_head.decoder.weight"]
    bias = weights.get("lm_head.decoder.bias")
    if bias is not None:
        if "lm_head.bias" not in weights:
            weights["lm_head.bias"] = weights.pop("lm_head.decoder.bias")
            names["lm_head.bias"] = names.pop("lm_head.decoder.bias")
        elif bias.shape == weights["lm_head.bias"].shape and np.array_equal(bias, weights["lm_head.bias"]):
            mapped.ignored.append(names.pop("lm_head.decoder.bias"))
            del weights["lm_head.decoder.bias"]


def map_checkpoint(checkpoint: Dict[str, np.ndarray]) -> MappedCheckpoint:
    """Rename a Hugging Face / Google BERT / NEZHA state dict to our names."""
    mapped = MappedCheckpoint({}, {}, [], [])
    for original, value in checkpoint.items():
        name = _strip(original, _STATE_PREFIXES)
        if any(p.search(name) for p in _IGNORED_PATTERNS):
            mapped.ignored.append(original)
            continue
        target = _our_name(name)
        if target is None:
            mapped.unmapped.append(original)
            continue
        if target in mapped.weights:
            raise CheckpointError(f"checkpoint tensors {mapped.names[target]} and {original} are the same "
                                  f"weight ({target}); keep one of them")
        mapped.weights[target] = value
        mapped.names[target] = original
    _settle_decoder(mapped)
    return mapped


def hf_to_native(hf_weights: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], List[str], List[str]]:
    """Rename HF BERT / NEZHA tensors to our names. Returns (weights, unmapped names, ignored names)."""
    mapped = map_checkpoint(hf_weights)
    return mapped.weights, mapped.unmapped, mapped.ignored


_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "relu": "relu"}
_REQUIRED = object()


def config_from_hf(values: Dict[str, Any], source: str, tensor_names: Optional[Sequence[str]] = None
                   ) -> NezhaConfig:
    """Translate a HF BERT / NEZHA `config.json` or `bert_config.json` into a NezhaConfig (unknown keys are
    irrelevant here). Every key used is type-checked: a wrong type is a ConfigError naming the key and the file.

    `tensor_names` (the checkpoint's) settle the position type: NEZHA checkpoints have no position table.
    """
    def get(key, kinds, kind_name, default=_REQUIRED):
        if key not in values or (values[key] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                raise ConfigError(f"{source}: missing key {key}")
            return default
        value = values[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ConfigError(f"{source}: {key}: expected {kind_name}, got {value!r} ({type(value).__name__})")
        return value

    def integer(key, default=_REQUIRED):
        return get(key, (int,), "an integer", default)

    def number(key, default):
        return float(get(key, (int, float), "a number", default))

    activation = get("hidden_act", (str,), "a string", "gelu")
    if activation not in _HF_ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act {activation!r} is not supported; one of {sorted(_HF_ACTIVATIONS)}")
    relative = get("use_relative_position", (bool,), "true or false", False) or get(
        "position_embedding_type", (str,), "a string", "absolute") in ("relative", "relative_key", "nezha")
    if tensor_names is not None:
        has_table = any(k.endswith("embeddings.position_embeddings.weight") for k in tensor_names)
        if relative and has_table:
            raise CheckpointError(f"{source}: config says relative positions but the checkpoint has an absolute "
                                  "position table (embeddings.position_embeddings.weight)")
        if not relative and not has_table:
            relative = True  # NEZHA checkpoints carry no position table; their configs often say nothing
    config = NezhaConfig(
        vocab_size=integer("vocab_size"), hidden_size=integer("hidden_size"),
        num_layers=integer("num_hidden_layers"), num_heads=integer("num_attention_heads"),
        intermediate_size=integer("intermediate_size"), hidden_act=_HF_ACTIVATIONS[activation],
        hidden_dropout=number("hidden_dropout_prob", 0.1),
        attention_dropout=number("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=integer("max_position_embeddings", 512),
        type_vocab_size=integer("type_vocab_size", 2),
        position_embedding="relative" if relative else "absolute",
        max_relative_position=integer("max_relative_position", 64),
        layer_norm_eps=number("layer_norm_eps", 1e-12),
        initializer_range=number("initializer_range", 0.02),
        pad_token_id=integer("pad_token_id", 0),
    )
    try:
        config.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return config


def find_config_file(directory: Path) -> Path:
    """`config.json`, else `bert_config.json` (Google BERT and NEZHA releases)."""
    for name in CONFIG_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no {' or '.join(CONFIG_FILES)} (the model's config file)")


def find_weights_file(directory: Path) -> Path:
    """The weights of a checkpoint folder: safetensors first (single, or sharded with an index), then a PyTorch
    state dict. Anything else is named with what to do about it."""
    for name in (WEIGHTS_FILE, WEIGHTS_FILE + ".index.json"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise CheckpointError(f"{directory}: several .safetensors files {[p.name for p in found]} and no "
                              f"{WEIGHTS_FILE}.index.json; point pretrained: at one of them")
    for name in TORCH_FILES + tuple(n + ".index.json" for n in TORCH_FILES):
        if (directory / name).is_file():
            return directory / name
    torch_files = sorted(p for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if len(torch_files) == 1:
        return torch_files[0]
    present = sorted(p.name for p in directory.iterdir())
    if any(".ckpt" in name and name.endswith(".index") for name in present):
        raise CheckpointError(f"{directory}: a TensorFlow checkpoint ({present}); it is not read here. Convert it "
                              "to PyTorch with `transformers-cli convert --model_type bert` and then run "
                              f"`msnc convert {directory} OUT`")
    if any(name.endswith(".ckpt") for name in present):
        raise CheckpointError(f"{directory}: a MindSpore .ckpt ({present}) uses another model's parameter names; "
                              "only safetensors and PyTorch state dicts of BERT / NEZHA are read")
    raise CheckpointError(f"{directory}: no weights file (model.safetensors or pytorch_model.bin); found {present}")


def read_hf_checkpoint(path: Union[str, Path]) -> Tuple[NezhaConfig, Dict[str, np.ndarray], List[str], List[str]]:
    """Read a HF BERT / NEZHA folder (or one weights file in it). Returns (config, our-named weights, unmapped
    tensor names, ignored tensor names)."""
    config, mapped, _ = _read_hf(Path(path))
    return config, mapped.weights, mapped.unmapped, mapped.ignored


def _read_hf(path: Path) -> Tuple[NezhaConfig, MappedCheckpoint, Path]:
    directory = path if path.is_dir() else path.parent
    weights_file = path if path.is_file() else find_weights_file(directory)
    config_file = find_config_file(directory)
    values = _read_json(config_file, "config file not found")
    raw = read_weights_file(weights_file)
    config = config_from_hf(values, str(config_file), list(raw))
    return config, map_checkpoint(raw), weights_file


# ----------------------------------------------------------------------------------------------------------------
# Loading named weights into a Cell
# ----------------------------------------------------------------------------------------------------------------


def _is_backbone_cell(cell: nn.Cell) -> bool:
    names = [name for name, _ in cell.parameters_and_names()]
    return bool(names) and not any(n.startswith("bert.") for n in names)


def _relative_to(cell: nn.Cell, weights: Dict[str, Any]) -> Dict[str, Any]:
    """Our files name the backbone `bert.*`; a bare NezhaModel names it without the prefix."""
    if _is_backbone_cell(cell):
        return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in weights.items()}
    return weights


_NUMPY_DTYPES = {ms.float16: np.float16, ms.float32: np.float32, ms.float64: np.float64, ms.int8: np.int8,
                 ms.uint8: np.uint8, ms.int16: np.int16, ms.int32: np.int32, ms.int64: np.int64, ms.bool_: np.bool_}


def _numpy_dtype(param) -> np.dtype:
    if param.dtype in _NUMPY_DTYPES:
        return np.dtype(_NUMPY_DTYPES[param.dtype])
    return param.asnumpy().dtype  # bfloat16 and other rare types: what MindSpore hands to numpy


def _dtype_fits(value: np.ndarray, param_dtype: np.dtype) -> bool:
    """Floating parameters take any floating tensor (a float16 release into float32); integer parameters (codes,
    counters) take exactly their own type, never a silent cast."""
    if np.issubdtype(param_dtype, np.floating):
        return np.issubdtype(value.dtype, np.floating)
    return value.dtype == param_dtype


_FIX_HINT = ("`msnc convert {source} OUT --list` shows how every checkpoint tensor maps to the model; check that "
             "`pretrained:` (--set pretrained=PATH) names the checkpoint you meant and that its config file "
             "describes its weights")


def load_weights(cell: nn.Cell, weights: Dict[str, np.ndarray], strict: bool = True, source: str = "<weights>",
                 ignored: Sequence[str] = (), unmapped: Sequence[str] = (), names: Optional[Dict[str, str]] = None,
                 fresh: Sequence[str] = (POOLER,)) -> LoadReport:
    """Copy named numpy weights (our names) into `cell`'s Parameters.

    Every tensor is checked (name, shape, dtype) and converted before any Parameter is assigned. `fresh`: parts
    (POOLER, MLM_HEAD, ...) that keep their initialisation when the checkpoint has none of their tensors.
    strict=True: any missing, unexpected, unmapped, mis-shaped, mistyped or refused tensor is a CheckpointError
    naming each one, and nothing is loaded. strict=False loads what fits and returns the report of what was skipped.
    """
    weights = _relative_to(cell, weights)
    names = _relative_to(cell, dict(names or {}))
    report = LoadReport(source=source, ignored=list(ignored), unexpected=list(unmapped), names=names)
    # Run state (dropout counters) is not a weight: absent from a checkpoint, it keeps its current value.
    params = {name: param for name, param in cell.parameters_and_names()
              if not (is_run_state(name) and name not in weights)}
    parts_in_checkpoint = {part_of(name) for name in weights}
    uses_mlm_head = any(part_of(name) == MLM_HEAD for name in params)
    for name, param in params.items():
        if name not in weights:
            if part_of(name) in fresh and part_of(name) not in parts_in_checkpoint:
                report.fresh.append(name)
            else:
                report.missing.append(name)
            continue
        value = weights[name]
        if tuple(value.shape) != tuple(param.shape):
            report.mismatched.append((name, tuple(value.shape), tuple(param.shape)))
        elif not _dtype_fits(value, _numpy_dtype(param)):
            report.wrong_dtype.append((name, str(value.dtype), str(_numpy_dtype(param))))
    for name in sorted(k for k in weights if k not in params):
        part = part_of(name)
        if part == BACKBONE:
            report.unexpected.append(name)
        elif part == MLM_HEAD and uses_mlm_head:
            # Only the untied decoder gets here (the rest of the head is in params): replacing it by the word
            # embeddings would silently change the model, so it is refused.
            report.refused.append((name, "an MLM decoder that differs from the word embeddings (untied); this "
                                         "MLM head is tied to the word embeddings, so the checkpoint is refused "
                                         "rather than loaded with another decoder. To continue from its backbone "
                                         "with a fresh MLM head: `msnc convert SRC OUT --architecture NezhaModel` "
                                         "and --set pretrained=OUT"))
        else:
            report.unused.append(name)
    if strict and not report.complete:
        raise CheckpointError(f"{source} does not fit the {type(cell).__name__}:\n{report.describe()}\n"
                              + _FIX_HINT.format(source=source))
    bad = set(report.missing) | {m[0] for m in report.mismatched} | {m[0] for m in report.wrong_dtype}
    converted = {name: Tensor(weights[name], dtype=param.dtype) for name, param in params.items()
                 if name in weights and name not in bad}
    for name, value in converted.items():  # every check passed: assign
        params[name].set_data(value)
        report.loaded.append(name)
    return report


def directory_bytes(directory: Union[str, Path]) -> int:
    """Bytes of a model directory as it would be copied to a device: every file under it, recursively
    (model.safetensors, config, tokenizer files, and any sub-folder such as a Lite converter config)."""
    return sum(item.stat().st_size for item in Path(directory).rglob("*") if item.is_file())


def is_run_state(name: str) -> bool:
    """Parameters that are training-run state rather than weights (saved in training checkpoints only)."""
    return name.endswith("rng_counter")


def cell_weights(cell: nn.Cell, include_run_state: bool = False) -> Dict[str, np.ndarray]:
    """A Cell's parameters as named numpy arrays (copies: on CPU `asnumpy` shares the Parameter's memory)."""
    return {name: param.asnumpy().copy() for name, param in cell.parameters_and_names()
            if include_run_state or not is_run_state(name)}


# ----------------------------------------------------------------------------------------------------------------
# Architectures: what a model directory can hold
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """A model class our directory can save and rebuild.

    build(config, document, **kwargs): the Cell, from the backbone config and the model document (where a
    compressed model keeps its recipe); describe(cell): the document fields `build` needs (num_labels, ...).
    """

    name: str
    cell_type: type
    build: Callable[..., nn.Cell]
    describe: Callable[[nn.Cell], Dict[str, Any]]
    # validate(weights, document, source): checks a directory's tensors beyond name/shape/dtype (e.g. the range of
    # quantization codes) before anything is assigned; raises CheckpointError naming the tensor.
    validate: Optional[Callable[[Dict[str, np.ndarray], Dict[str, Any], str], None]] = None


_ARCHITECTURES: Dict[str, Architecture] = {}


def register_architecture(cell_type: type, build: Optional[Callable[..., nn.Cell]] = None,
                          describe: Optional[Callable[[nn.Cell], Dict[str, Any]]] = None,
                          name: Optional[str] = None,
                          validate: Optional[Callable[[Dict[str, np.ndarray], Dict[str, Any], str], None]] = None
                          ) -> Architecture:
    """Make `cell_type` savable and loadable as a model directory (and so usable by eval, predict and export).

    Registering the same class again under the same name replaces the entry (module reloads); another class under a
    taken name is an error.
    """
    name = name or cell_type.__name__
    existing = _ARCHITECTURES.get(name)
    if existing is not None and existing.cell_type.__qualname__ != cell_type.__qualname__:
        raise ConfigError(f"architecture {name!r} is already registered for {existing.cell_type.__qualname__}")
    entry = Architecture(name, cell_type, build or (lambda config, document, **kwargs: cell_type(config, **kwargs)),
                         describe or (lambda cell: {}), validate)
    _ARCHITECTURES[name] = entry
    return entry


def registered_architectures() -> List[str]:
    return sorted(_ARCHITECTURES)


def architecture_of(cell: nn.Cell) -> Architecture:
    for entry in _ARCHITECTURES.values():
        if type(cell) is entry.cell_type:
            return entry
    raise ConfigError(f"cannot save a {type(cell).__name__} as a model directory: not a registered architecture "
                      f"({registered_architectures()}); register it with models.checkpoint.register_architecture")


def build_model(architecture: str, config: NezhaConfig, document: Optional[Dict[str, Any]] = None,
                **kwargs) -> nn.Cell:
    if architecture not in _ARCHITECTURES:
        raise ConfigError(f"architecture: unknown {architecture!r}; one of {registered_architectures()}")
    return _ARCHITECTURES[architecture].build(config, document or {}, **kwargs)


register_architecture(NezhaModel,
                      build=lambda config, document, **kwargs: NezhaModel(
                          config, **{"add_pooler": document.get("add_pooler", True), **kwargs}),
                      describe=lambda cell: {"add_pooler": bool(cell.add_pooler)})
register_architecture(NezhaForSequenceClassification,
                      build=lambda config, document, **kwargs: NezhaForSequenceClassification(
                          config, **{"num_labels": document.get("num_labels", 2), **kwargs}),
                      describe=lambda cell: {"num_labels": cell.num_labels})
register_architecture(NezhaForMaskedLM)


# ----------------------------------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------------------------------


def _write_document(path: Path, document: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(document, indent=2))
        handle.flush()
        os.fsync(handle.fileno())


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    return renameat2(at_cwd, os.fsencode(str(first)), at_cwd, os.fsencode(str(second)), _RENAME_EXCHANGE) == 0


def _remove_stale_staging(directory: Path) -> None:
    """Staging directories a killed save left behind (their process is gone)."""
    for stale in directory.parent.glob(f".{directory.name}.staging-*"):
        try:
            pid = int(stale.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
            continue  # a live process is writing it
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(staging: Path, directory: Path) -> None:
    """Put the finished `staging` directory at `directory` so a reader (or a later run after a kill) finds the old
    directory or the new one, whole. The old one is deleted afterwards."""
    if not directory.exists():
        os.rename(staging, directory)
    elif _exchange(staging, directory):
        shutil.rmtree(staging)  # now the old version
    else:
        # No atomic exchange (not Linux): two renames a few microseconds apart; a kill between them leaves the
        # complete new version in the staging directory and the old one under `.old`, never a mixed directory.
        old = staging.with_name(staging.name.replace(".staging-", ".old-"))
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old)
    _fsync(directory.parent)


def write_model_dir(directory: Union[str, Path], weights: Dict[str, np.ndarray], document: Dict[str, Any],
                    tokenizer_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write weights + document (+ tokenizer files) as one unit: everything goes to a staging directory next to
    `directory`, which is then swapped in whole."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None and directory.is_dir():
        tokenizer_dir = directory  # a re-save keeps the tokenizer files the directory already has
    _remove_stale_staging(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-{os.getpid()}-", dir=directory.parent))
    try:
        write_safetensors(weights, staging / WEIGHTS_FILE, metadata={"format": FORMAT_NAME})
        _write_document(staging / CONFIG_FILE, document)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                source = Path(tokenizer_dir) / name
                if source.is_file():
                    shutil.copyfile(source, staging / name)
        _fsync(staging)
        _swap_in(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def save_model_dir(cell: nn.Cell, directory: Union[str, Path], config: NezhaConfig,
                   meta: Optional[Dict[str, Any]] = None, tokenizer_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) into `directory`, atomically as a whole.

    A later save replaces the whole directory; the tokenizer files come from `tokenizer_dir`, or without one from
    the directory being replaced.
    """
    entry = architecture_of(cell)
    document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "architecture": entry.name,
                "model": config.to_dict(), **entry.describe(cell)}
    document.update(meta or {})
    return write_model_dir(directory, cell_weights(cell), document, tokenizer_dir)


def is_model_dir(path: Union[str, Path]) -> bool:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        return False
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return isinstance(values, dict) and values.get("format") == FORMAT_NAME


def read_model_document(directory: Union[str, Path]) -> Tuple[Dict[str, Any], NezhaConfig]:
    """The config.json of our model directory, checked, and its NezhaConfig (the weights are not read)."""
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    document = _read_json(config_file, f"not found (is {directory} a model directory?)")
    if document.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_file}: not a {FORMAT_NAME} model directory (format "
                              f"{document.get('format')!r}); `msnc convert {directory} OUT` converts a Hugging "
                              "Face / NEZHA folder into one")
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
    cell = build_model(architecture, config, document, **build_kwargs)
    source = str(Path(directory) / WEIGHTS_FILE)
    if _ARCHITECTURES[architecture].validate is not None:
        _ARCHITECTURES[architecture].validate(weights, document, source)
    load_weights(cell, weights, strict=strict, source=source, fresh=())
    return cell, document


# ----------------------------------------------------------------------------------------------------------------
# Any checkpoint form
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint in any supported form, read: its config, its tensors under our names, where they came from."""

    path: Path
    config: NezhaConfig
    mapped: MappedCheckpoint
    weights_file: Path
    document: Optional[Dict[str, Any]] = None  # our model directory's document; None for other forms

    @property
    def architecture(self) -> Optional[str]:
        return None if self.document is None else self.document.get("architecture")

    def has(self, part: str) -> bool:
        return any(part_of(name) == part for name in self.mapped.weights)

    @property
    def untied_decoder(self) -> bool:
        return "lm_head.decoder.weight" in self.mapped.weights


def read_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """Our model directory, or a Hugging Face / Google BERT / NEZHA folder or weights file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.is_dir() and is_model_dir(path):
        document, config, weights = read_model_dir(path)
        return Checkpoint(path, config, MappedCheckpoint(weights, {}, [], []), path / WEIGHTS_FILE, document)
    config, mapped, weights_file = _read_hf(path)
    return Checkpoint(path, config, mapped, weights_file)


def load_checkpoint(cell: nn.Cell, checkpoint: Checkpoint, strict: bool = True, fresh: Sequence[str] = (POOLER,),
                    log: Optional[Callable[[str], None]] = print) -> LoadReport:
    mapped = checkpoint.mapped
    report = load_weights(cell, mapped.weights, strict=strict, source=str(checkpoint.path), ignored=mapped.ignored,
                          unmapped=mapped.unmapped, names=mapped.names, fresh=fresh)
    if log is not None:
        log(report.summary())
    return report


def load_pretrained(cell: nn.Cell, path: Union[str, Path], strict: bool = True, fresh: Sequence[str] = (POOLER,),
                    log: Optional[Callable[[str], None]] = print) -> LoadReport:
    """Load weights into `cell` from any supported checkpoint form; `log` gets the one informational line.

    A backbone (`model.bert`) takes the backbone of any checkpoint, heads named as unused; a whole model takes its
    heads too. `fresh` names the parts that may start from their initialisation when the checkpoint has none of
    them (the pooler by default; pre-training also passes MLM_HEAD).
    """
    return load_checkpoint(cell, read_checkpoint(path), strict=strict, fresh=fresh, log=log)


def pretrained_config(path: Union[str, Path]) -> NezhaConfig:
    """The NezhaConfig of any supported checkpoint, without building a model (safetensors: header only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.is_dir() and is_model_dir(path):
        return read_model_document(path)[1]
    directory = path if path.is_dir() else path.parent
    config_file = find_config_file(directory)
    values = _read_json(config_file, "config file not found")
    names = weight_names(find_weights_file(directory) if path.is_dir() else path)
    return config_from_hf(values, str(config_file), names)


def checkpoint_has_mlm_head(path: Union[str, Path]) -> bool:
    """Whether a checkpoint carries an MLM head (safetensors: from the header only)."""
    path = Path(path)
    if path.is_dir() and is_model_dir(path):
        names = safetensors_names(path / WEIGHTS_FILE)
    else:
        names = [_our_name(_strip(n, _STATE_PREFIXES)) or "" for n in
                 weight_names(find_weights_file(path) if path.is_dir() else path)]
    return any(part_of(name) == MLM_HEAD for name in names)


def load_masked_lm(path: Union[str, Path], log: Optional[Callable[[str], None]] = print, **build_kwargs
                   ) -> Tuple[NezhaForMaskedLM, NezhaConfig, LoadReport]:
    """A NezhaForMaskedLM with the checkpoint's own MLM head (for MLM data augmentation and scoring): a checkpoint
    without an MLM head, or with an untied decoder, is an error naming it."""
    checkpoint = read_checkpoint(path)
    model = NezhaForMaskedLM(checkpoint.config, **build_kwargs)
    report = load_checkpoint(model, checkpoint, fresh=(), log=log)
    return model, checkpoint.config, report
