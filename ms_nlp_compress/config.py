"""Typed configs: dataclasses validated on load, one YAML loader with `base:` inheritance and dotted overrides.

A config file is a YAML mapping whose top-level keys are the fields of `ExperimentConfig` (model, runtime, data,
...). `base: other.yaml` (a path relative to the file, or a list of them) is merged first, the file's own values on
top. `--set model.num_layers=4` overrides are applied last; their values are parsed as YAML scalars.

Every error names the key (dotted path) and the file it came from: an unknown key, a wrong type or an impossible
value never becomes a silent default.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from ms_nlp_compress.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# Config dataclasses
# ----------------------------------------------------------------------------------------------------------------

HIDDEN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
POSITION_EMBEDDINGS = ("relative", "absolute")
DEVICES = ("cpu", "ascend", "gpu")
MODES = ("graph", "pynative")
PRECISIONS = ("fp32", "O1", "O2", "O3")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class NezhaConfig:
    """One backbone for NEZHA (relative positions) and plain BERT (absolute positions).

    `head_dim` is independent of hidden_size / num_heads because DynaBERT sub-networks keep full-width heads but
    fewer of them. `layer_num_heads` and `layer_intermediate_sizes`, when given, set each layer's width on its own
    (an extracted sub-network has a different number of heads and FFN neurons per layer).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact erf GELU, as BERT and NEZHA were trained; gelu_tanh is the fast approximation
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    position_embedding: str = "relative"
    max_relative_position: int = 64
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    layer_num_heads: Optional[List[int]] = None
    layer_intermediate_sizes: Optional[List[int]] = None
    # stateless: counter-hash masks saved with checkpoints (exact resume); native: MindSpore's kernel (faster on
    # Ascend, resume exact except for dropout masks). See models/dropout.py.
    dropout_impl: str = "stateless"
    # auto: CPU-friendly GELU / LayerNorm formulations (models/kernels.py) when the device target is CPU, MindSpore's
    # fused kernels otherwise; fused: always MindSpore's; cpu: always the CPU formulations.
    kernels: str = "auto"

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "max_relative_position"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_heads == 0, f"{prefix}.num_heads",
                   f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                   "set head_dim explicitly")
        else:
            _check(self.head_dim > 0, f"{prefix}.head_dim", f"must be > 0, got {self.head_dim}")
        _check(self.hidden_act in HIDDEN_ACTIVATIONS, f"{prefix}.hidden_act",
               f"must be one of {HIDDEN_ACTIVATIONS}, got {self.hidden_act!r}")
        _check(self.position_embedding in POSITION_EMBEDDINGS, f"{prefix}.position_embedding",
               f"must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"{prefix}.{name}", f"must be in [0, 1), got {value}")
        _check(self.dropout_impl in ("stateless", "native"), f"{prefix}.dropout_impl",
               f"must be stateless or native, got {self.dropout_impl!r}")
        _check(self.kernels in ("auto", "fused", "cpu"), f"{prefix}.kernels",
               f"must be auto, fused or cpu, got {self.kernels!r}")
        _check(self.layer_norm_eps > 0, f"{prefix}.layer_norm_eps", f"must be > 0, got {self.layer_norm_eps}")
        _check(self.initializer_range > 0, f"{prefix}.initializer_range", "must be > 0")
        _check(0 <= self.pad_token_id < self.vocab_size, f"{prefix}.pad_token_id",
               f"must be in [0, vocab_size), got {self.pad_token_id}")
        for name in ("layer_num_heads", "layer_intermediate_sizes"):
            values = getattr(self, name)
            if values is None:
                continue
            _check(len(values) == self.num_layers, f"{prefix}.{name}",
                   f"has {len(values)} entries but num_layers is {self.num_layers}")
            _check(all(v > 0 for v in values), f"{prefix}.{name}", f"every entry must be > 0, got {values}")

    @property
    def attention_head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def heads_of_layer(self, layer: int) -> int:
        return self.layer_num_heads[layer] if self.layer_num_heads is not None else self.num_heads

    def intermediate_of_layer(self, layer: int) -> int:
        if self.layer_intermediate_sizes is not None:
            return self.layer_intermediate_sizes[layer]
        return self.intermediate_size

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "<dict>") -> "NezhaConfig":
        config = from_mapping(cls, values, source, "model")
        _validate_with_source(config, source, "model")
        return config


@dataclass
class RuntimeConfig:
    """Where and how graphs run. Device is a config value: nothing in the code assumes CPU or Ascend."""

    device: str = "cpu"
    device_id: int = 0
    mode: str = "graph"  # graph (compiled) is the default; pynative is for debugging
    precision: str = "fp32"  # fp32 | O1 | O2 | O3 (runtime.apply_precision; fp32 master weights always)
    amp_dtype: str = "float16"  # the low-precision type of O1-O3: float16, or bfloat16 (Ascend only)
    seed: int = 42
    cpu_threads: Optional[int] = None  # None: MindSpore's default; 1 per rank under msrun on small machines
    graph_kernel_fusion: bool = False
    compile_cache_dir: Optional[str] = None

    def validate(self, prefix: str = "runtime") -> None:
        _check(self.device in DEVICES, f"{prefix}.device", f"must be one of {DEVICES}, got {self.device!r}")
        _check(self.mode in MODES, f"{prefix}.mode", f"must be one of {MODES}, got {self.mode!r}")
        _check(self.precision in PRECISIONS, f"{prefix}.precision",
               f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.amp_dtype in ("float16", "bfloat16"), f"{prefix}.amp_dtype",
               f"must be float16 or bfloat16, got {self.amp_dtype!r}")
        _check(self.amp_dtype != "bfloat16" or self.device == "ascend", f"{prefix}.amp_dtype",
               f"bfloat16 needs device ascend (device is {self.device}; MindSpore has no bfloat16 kernels there); "
               "use float16")
        _check(self.amp_dtype != "bfloat16" or self.precision != "fp32", f"{prefix}.amp_dtype",
               "bfloat16 is the compute type of precision O1-O3; precision is fp32")
        _check(self.device_id >= 0, f"{prefix}.device_id", "must be >= 0")
        if self.cpu_threads is not None:
            _check(self.cpu_threads > 0, f"{prefix}.cpu_threads", "must be > 0")


@dataclass
class DataConfig:
    """A task's data: its TSV folder (train/dev/test.tsv) and how to tokenize it."""

    task: str = "sst2"
    data_dir: Optional[str] = None  # None: the demo cache
    vocab: Optional[str] = None  # vocab.txt (WordPiece) or a .model (SentencePiece); None: the model's own
    lowercase: bool = True
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 64
    skip_malformed: bool = False
    train_limit: int = 0  # use a seeded random subset of this many training examples (0: all); quick presets
    eval_limit: int = 0  # likewise for dev and test
    # Training batches from RAM or from tokenized shards on disk (data/streaming.py): memory | disk | auto (disk
    # when the padded arrays would pass 512 MiB, ~350k rows at max_length 128).
    stream: str = "auto"
    shard_rows: int = 8192  # rows per shard file
    shuffle_shards: int = 16  # shards shuffled together per window when streaming; 0: all (the in-memory order)
    shard_dir: Optional[str] = None  # where shards are built and reused; None: <output_dir>/shards

    def validate(self, prefix: str = "data") -> None:
        _check(self.stream in ("auto", "memory", "disk"), f"{prefix}.stream",
               f"must be auto, memory or disk, got {self.stream!r}")
        _check(self.shard_rows >= 1, f"{prefix}.shard_rows", f"must be >= 1, got {self.shard_rows}")
        _check(self.shuffle_shards >= 0, f"{prefix}.shuffle_shards",
               f"must be >= 0 (0: all shards in one window), got {self.shuffle_shards}")
        _check(self.train_limit >= 0, f"{prefix}.train_limit", "must be >= 0 (0 means all)")
        _check(self.eval_limit >= 0, f"{prefix}.eval_limit", "must be >= 0 (0 means all)")
        _check(self.max_length >= 2, f"{prefix}.max_length", f"must be >= 2 ([CLS] and [SEP]), got {self.max_length}")
        _check(self.batch_size > 0, f"{prefix}.batch_size", "must be > 0")
        _check(self.eval_batch_size > 0, f"{prefix}.eval_batch_size", "must be > 0")


@dataclass
class TrainConfig:
    """The optimisation loop: optimizer, schedule, loss scaling, clipping, accumulation, evaluation, checkpoints."""

    optimizer: str = "adamw"  # adamw | lamb
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    adam_epsilon: float = 1e-6
    schedule: str = "linear"  # constant | linear | cosine | polynomial
    warmup_ratio: float = 0.1
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs when set
    gradient_accumulation: int = 1
    max_grad_norm: Optional[float] = 1.0  # global-norm clipping; null disables
    loss_scale: str = "auto"  # auto (dynamic with O1-O3, none with fp32) | dynamic | static | none
    loss_scale_value: float = 65536.0
    loss_scale_factor: float = 2.0
    loss_scale_window: int = 1000
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end of each epoch
    save_every: int = 0  # optimizer steps between checkpoints; 0: at the end of each epoch
    keep_checkpoints: int = 2
    log_every: int = 10
    padding: str = "max_length"  # max_length (one static shape) | dynamic (pad per batch, one dynamic graph)

    def validate(self, prefix: str = "train") -> None:
        _check(self.optimizer in ("adamw", "lamb"), f"{prefix}.optimizer",
               f"must be adamw or lamb, got {self.optimizer!r}")
        _check(self.learning_rate > 0, f"{prefix}.learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _check(self.adam_epsilon > 0, f"{prefix}.adam_epsilon", "must be > 0")
        _check(self.schedule in ("constant", "linear", "cosine", "polynomial"), f"{prefix}.schedule",
               f"unknown schedule {self.schedule!r}")
        _check(0.0 <= self.warmup_ratio < 1.0, f"{prefix}.warmup_ratio", "must be in [0, 1)")
        _check(self.epochs > 0, f"{prefix}.epochs", "must be > 0")
        if self.max_steps is not None:
            _check(self.max_steps > 0, f"{prefix}.max_steps", "must be > 0")
        _check(self.gradient_accumulation >= 1, f"{prefix}.gradient_accumulation", "must be >= 1")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, f"{prefix}.max_grad_norm", "must be > 0 (null disables clipping)")
        _check(self.loss_scale in ("auto", "dynamic", "static", "none"), f"{prefix}.loss_scale",
               f"must be auto, dynamic, static or none, got {self.loss_scale!r}")
        _check(self.loss_scale_value >= 1, f"{prefix}.loss_scale_value", "must be >= 1")
        _check(self.loss_scale_factor > 1, f"{prefix}.loss_scale_factor", "must be > 1")
        _check(self.loss_scale_window >= 1, f"{prefix}.loss_scale_window", "must be >= 1")
        for name in ("eval_every", "save_every"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        _check(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", "must be >= 1")
        _check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        _check(self.padding in ("max_length", "dynamic"), f"{prefix}.padding",
               f"must be max_length or dynamic, got {self.padding!r}")


@dataclass
class PretrainConfig:
    """The `pretrain:` section. Sequence length / batch size come from `data.max_length` / `data.batch_size`."""

    corpus: str = "cache:peoples_daily/corpus.txt"  # one paragraph per line; a blank line ends a document
    segmented: bool = True  # lines are whitespace-separated words (word boundaries for whole-word masking)
    max_lines: Optional[int] = None  # read only the first N lines (quick runs)
    eval_sequences: int = 256  # packed rows held out from the END of the corpus for MLM loss / accuracy
    vocab: Optional[str] = None  # an existing vocab.txt or spm.model; null: build one from the corpus
    vocab_kind: str = "wordpiece"  # wordpiece (characters + frequent words) | sentencepiece (unigram)
    vocab_size: int = 8000  # upper bound when building (a char-level Chinese vocab stops at the corpus alphabet)
    vocab_min_frequency: int = 2
    short_seq_prob: float = 0.1  # BERT's: this fraction of rows is packed to a random shorter length
    whole_word: bool = True
    mask_ratio: float = 0.15
    max_predictions: int = 20  # P: predictions per row (padded), also the cap of the PMLM count
    pmlm: bool = False  # PMLM: masked count uniform over [1, min(max_predictions, round(n * pmlm_max_ratio))]
    pmlm_max_ratio: float = 1.0
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    dynamic_masking: bool = True  # re-mask every epoch (seeded by seed, epoch, row); false: epoch 0's masks always

    def validate(self, prefix: str = "pretrain") -> None:
        def check(condition: bool, key: str, message: str) -> None:
            if not condition:
                raise ConfigError(f"{prefix}.{key}: {message}")

        check(bool(self.corpus), "corpus", "must name a text file")
        check(self.max_lines is None or self.max_lines > 0, "max_lines", f"must be > 0, got {self.max_lines}")
        check(self.eval_sequences >= 0, "eval_sequences", f"must be >= 0, got {self.eval_sequences}")
        check(self.vocab_kind in ("wordpiece", "sentencepiece"), "vocab_kind",
              f"must be wordpiece or sentencepiece, got {self.vocab_kind!r}")
        check(self.vocab_size > 5, "vocab_size", f"must exceed the 5 special tokens, got {self.vocab_size}")
        check(self.vocab_min_frequency >= 1, "vocab_min_frequency", "must be >= 1")
        check(0.0 <= self.short_seq_prob < 1.0, "short_seq_prob", f"must be in [0, 1), got {self.short_seq_prob}")
        check(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        check(self.max_predictions >= 1, "max_predictions", f"must be >= 1, got {self.max_predictions}")
        check(0.0 < self.pmlm_max_ratio <= 1.0, "pmlm_max_ratio", f"must be in (0, 1], got {self.pmlm_max_ratio}")
        for key in ("mask_token_prob", "random_token_prob"):
            check(0.0 <= getattr(self, key) <= 1.0, key, f"must be in [0, 1], got {getattr(self, key)}")
        check(self.mask_token_prob + self.random_token_prob <= 1.0, "random_token_prob",
              f"mask_token_prob + random_token_prob = {self.mask_token_prob + self.random_token_prob} exceeds 1")

    def masking_kwargs(self) -> Dict:
        return {"mask_ratio": self.mask_ratio, "max_predictions": self.max_predictions, "pmlm": self.pmlm,
                "pmlm_max_ratio": self.pmlm_max_ratio, "whole_word": self.whole_word,
                "mask_token_prob": self.mask_token_prob, "random_token_prob": self.random_token_prob}


@dataclass
class ParallelConfig:
    """Data parallel over `world_size` ranks, launched by msrun (HCCL on Ascend, MindSpore's CPU collectives here)."""

    world_size: int = 1
    # msrun's settings, read by scripts/run_distributed.sh (parallel/launch.py); gradients are always averaged
    # over ranks, so a data-parallel run takes the same steps as one process on the global batch.
    master_port: int = 8118
    rank_table_file: Optional[str] = None  # an HCCL rank table, for clusters whose launcher needs one
    cluster_timeout: int = 600  # seconds msrun waits for every rank before failing loudly

    def validate(self, prefix: str = "parallel") -> None:
        _check(self.world_size >= 1, f"{prefix}.world_size", f"must be >= 1, got {self.world_size}")
        _check(0 < self.master_port < 65536, f"{prefix}.master_port", f"not a port: {self.master_port}")
        _check(self.cluster_timeout > 0, f"{prefix}.cluster_timeout", "must be > 0")


@dataclass
class ExperimentConfig:
    """The root of a config file."""

    name: str = "experiment"
    output_dir: str = "runs/experiment"
    pretrained: Optional[str] = None  # a model directory or a Hugging Face BERT-format safetensors folder
    model: NezhaConfig = field(default_factory=NezhaConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # Compression sections; their dataclasses live with their algorithm (which imports this module), so they are
    # looked up lazily: see `section_types`.
    distill: "DistillConfig" = field(default_factory=lambda: section_types()["DistillConfig"]())
    augment: "AugmentConfig" = field(default_factory=lambda: section_types()["AugmentConfig"]())
    quant: "QuantConfig" = field(default_factory=lambda: section_types()["QuantConfig"]())
    comm: "CommConfig" = field(default_factory=lambda: section_types()["CommConfig"]())
    dynabert: "DynaBertConfig" = field(default_factory=lambda: section_types()["DynaBertConfig"]())

    def validate(self, prefix: str = "") -> None:
        self.model.validate("model")
        self.distill.validate("distill")
        self.augment.validate("augment")
        self.quant.validate("quant")
        self.comm.validate("comm")
        self.dynabert.validate("dynabert")
        self.train.validate("train")
        self.pretrain.validate("pretrain")
        self.runtime.validate("runtime")
        self.data.validate("data")
        self.parallel.validate("parallel")
        if self.parallel.world_size > 1 and self.runtime.device == "cpu" and self.runtime.precision != "fp32":
            raise ConfigError("runtime.precision: mixed precision on CPU gives no speed-up and its collectives "
                              "reject low-precision types; use fp32 with device cpu")


# ----------------------------------------------------------------------------------------------------------------
# Generic typed construction from mappings
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; the only conversions are int -> float and list -> tuple."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        options = [option for option in args if option is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the precise one
            return _coerce(value, options[0], key, source)
        for option in options:
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        section_loader = getattr(tp, "from_section", None)  # a section with its own keys (e.g. quant.preset)
        if section_loader is not None:
            return section_loader(value, source, key)
        return from_mapping(tp, value, source, key)
    if origin in (list, List, tuple, Tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(item, inner, f"{key}[{i}]", source) for i, item in enumerate(value)]
        return tuple(items) if origin in (tuple, Tuple) else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported annotation {tp}")


def section_types() -> Dict[str, type]:
    """The config sections defined next to their algorithm, by the names ExperimentConfig's annotations use.

    Imported on first use, not at module level: those modules import NezhaConfig and `from_mapping` from here, so a
    module-level import would be circular whichever side is imported first.
    """
    from ms_nlp_compress.compress.distill.config import AugmentConfig, DistillConfig
    from ms_nlp_compress.compress.quant.config import QuantConfig
    from ms_nlp_compress.compress.dynabert.config import DynaBertConfig
    from ms_nlp_compress.parallel.comm_config import CommConfig

    return {"DistillConfig": DistillConfig, "AugmentConfig": AugmentConfig, "QuantConfig": QuantConfig,
            "CommConfig": CommConfig, "DynaBertConfig": DynaBertConfig}


def from_mapping(cls: type, values: Dict[str, Any], source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types (named by dotted key)."""
    hints = typing.get_type_hints(cls, localns=section_types() if cls is ExperimentConfig else None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: unknown key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys of {cls.__name__}: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _validate_with_source(config: Any, source: str, prefix: str = "") -> None:
    try:
        if prefix:
            config.validate(prefix)
        else:
            config.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# YAML loading: base inheritance, deep merge, dotted overrides
# ----------------------------------------------------------------------------------------------------------------


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path, chain: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: circular `base:` chain: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(values).__name__}")
    bases = values.pop("base", None)
    if bases is None:
        return values
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a path or a list of paths")
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml(path.parent / base, chain + (path,)))
    return _deep_merge(merged, values)


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` strings; values are YAML scalars (`4`, `true`, `null`, `[1, 2]`, `relative`)."""
    values = copy.deepcopy(values)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set {override!r}: expected key=value")
        key, raw = override.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {override!r}: empty key part")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from None
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part} is not a mapping")
            node = child
        node[parts[-1]] = parsed
    return values


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                cls: type = ExperimentConfig) -> Any:
    """Load, merge, override, type-check and validate a config. Errors name the key and the file."""
    source = str(Path(path).resolve()) if path is not None else "<defaults>"
    values = _read_yaml(Path(path)) if path is not None else {}
    own = {}
    if path is not None:  # the file's own keys, without its `base:` chain
        own = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        own.pop("base", None)
    if overrides:
        values = apply_overrides(values, overrides)
        own = apply_overrides(own, overrides)
        source = f"{source} (with --set {' '.join(overrides)})"
    config = from_mapping(cls, values, source)
    _validate_with_source(config, source)
    # What the files and --set actually said (dotted keys), as opposed to dataclass defaults: lets a command tell a
    # value the user chose from one nobody wrote. `_given_keys`: anywhere in the base chain; `_own_keys`: in the
    # file itself or --set, i.e. not inherited from a preset (see train/finetune.py: model_config_for).
    object.__setattr__(config, "_given_keys", frozenset(_dotted_keys(values)))
    object.__setattr__(config, "_own_keys", frozenset(_dotted_keys(own)))
    object.__setattr__(config, "_source", source)
    return config


def _dotted_keys(values: Dict[str, Any], prefix: str = ""):
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict):
            yield from _dotted_keys(value, dotted + ".")


def given_keys(config: Any, inherited: bool = True) -> Optional[frozenset]:
    """The dotted keys written in the config file, its `base:` chain (unless `inherited=False`) and --set
    overrides; None for a config built in code."""
    return getattr(config, "_given_keys" if inherited else "_own_keys", None)


def train_overrides(train: "TrainConfig", overrides: Dict[str, Any], key: str) -> "TrainConfig":
    """`train` with the keys of `overrides` (a mapping of TrainConfig keys, e.g. `distill.intermediate_train`)
    replaced, typed and validated; errors name `key`. The per-stage schedules of TinyBERT and DynaBERT."""
    typed = from_mapping(TrainConfig, overrides, f"{key} (overrides of train:)", key)
    resolved = dataclasses.replace(train, **{name: getattr(typed, name) for name in overrides})
    resolved.validate(key)
    return resolved


def config_source(config: Any) -> str:
    return getattr(config, "_source", "<config built in code>")


def config_to_dict(config: Any) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: Any, path: Union[str, Path]) -> None:
    """Write a resolved config (no `base:`), so a run's exact settings are kept with its outputs."""
    from ms_nlp_compress.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))

