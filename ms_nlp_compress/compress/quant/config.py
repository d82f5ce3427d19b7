"""`QuantConfig`: what `quant.prepare` quantizes, how, and what stays full precision (the `quant:` section).

Tensor groups (each a `WeightQuantConfig`):
    encoder     Q, K, V, attention-output, FFN-in and FFN-out weights of every layer   (per matrix by default)
    embedding   the word embedding table; the tied MLM decoder reads the same quantized table  (per row by default)
    pooler      the pooler dense weight (the reference ternarizes it)
    mlm_head    the MLM head's transform dense
    classifier  the classifier weight (used only if "classifier" is removed from `full_precision`)
    position    position and token-type tables (kept in float by the default `full_precision` filter, as in the
                reference; remove their patterns to quantize them, 8-bit row-wise by default)
Never quantized, by construction: biases and LayerNorm. `full_precision` lists cells (dotted cell names, shell
patterns) kept entirely in float, weights and input activations: by default the classifier, as in the reference;
add e.g. "bert.encoder.layers.0.*" to keep the first layer in float.

W-E-A presets (TernaryBERT's notation: Transformer weights - word embedding - activations): `QuantConfig.preset`
"2-2-8" (TernaryBERT, TWN), "8-8-8" (Q8BERT-like), "4-4-8", and "fp" (everything off, for the identity check).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ms_nlp_compress.config import from_mapping
from ms_nlp_compress.errors import ConfigError

WEIGHT_METHODS = ("twn", "lat", "sym", "minmax", "log", "none")
ACTIVATION_METHODS = ("symmetric", "minmax", "none")
GRANULARITIES = ("tensor", "row")
WEIGHT_GROUPS = ("encoder", "embedding", "position", "pooler", "mlm_head", "classifier")
# Ternary methods produce codes in {-1, 0, +1}: 2-bit storage, nothing else makes sense.
TERNARY_METHODS = ("twn", "lat")
DEFAULT_FULL_PRECISION = ("classifier", "*.classifier", "*position_embeddings", "*token_type_embeddings")
# Inclusive bit ranges per method: the primitives' own limits, capped at 8 because codes are stored in 2/4/8-bit
# fields (packing.py).
_BIT_RANGES = {"twn": (2, 2), "lat": (2, 2), "sym": (2, 8), "minmax": (1, 8), "log": (2, 8), "none": (32, 32)}


@dataclass
class WeightQuantConfig:
    """One tensor group: quantizer (`twn` | `lat` | `sym` | `minmax` | `log` | `none`), bits, granularity."""

    method: str = "twn"
    bits: int = 2
    granularity: str = "tensor"  # tensor: one scale per matrix; row: one scale per row (slice of the last axis)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self, prefix: str) -> None:
        if self.method not in WEIGHT_METHODS:
            raise ConfigError(f"{prefix}.method: must be one of {WEIGHT_METHODS}, got {self.method!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"{prefix}.granularity: must be one of {GRANULARITIES}, got {self.granularity!r}")
        low, high = _BIT_RANGES[self.method]
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not low <= self.bits <= high:
            what = "2 (ternary codes)" if self.method in TERNARY_METHODS else f"an integer in [{low}, {high}]"
            if self.method == "none":
                what = "32 (full precision)"
            raise ConfigError(f"{prefix}.bits: method {self.method!r} needs {what}, got {self.bits!r}")


def _full_precision() -> WeightQuantConfig:
    return WeightQuantConfig("none", 32, "tensor")


@dataclass
class ActivationQuantConfig:
    """Dynamic per-tensor quantization of every matmul input (scale from the current batch, no calibration)."""

    method: str = "symmetric"  # symmetric: TernaryBERT (max-abs, levels +-(2^(b-1)-1)); minmax: asymmetric
    bits: int = 8

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self, prefix: str) -> None:
        if self.method not in ACTIVATION_METHODS:
            raise ConfigError(f"{prefix}.method: must be one of {ACTIVATION_METHODS}, got {self.method!r}")
        if self.enabled and (isinstance(self.bits, bool) or not isinstance(self.bits, int)
                             or not 2 <= self.bits <= 16):
            raise ConfigError(f"{prefix}.bits: must be an integer in [2, 16], got {self.bits!r}")


@dataclass
class QuantConfig:
    """Per-group weight quantizers, activation quantization, clip values and the full-precision filter."""

    encoder: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    embedding: WeightQuantConfig = field(default_factory=lambda: WeightQuantConfig("twn", 2, "row"))
    # Position and token-type tables: used only if their patterns are removed from `full_precision` (MiniLM's
    # 512 x 384 position table is 0.79 MB in float, enough to keep a 2-bit model under 14x; see README).
    position: WeightQuantConfig = field(default_factory=lambda: WeightQuantConfig("sym", 8, "row"))
    pooler: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    mlm_head: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    classifier: WeightQuantConfig = field(default_factory=_full_precision)
    activation: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    # TernaryBERT clamps weights and activations to +-2.5 before quantizing (`clip_val`); null: no clamp.
    weight_clip: Optional[float] = 2.5
    activation_clip: Optional[float] = 2.5
    lat_iterations: int = 10  # alternating steps of the LAT solver (BinaryBERT's LaqQuantizer uses 10)
    lat_epsilon: float = 1e-8  # D = sqrt(v_hat) + eps
    # twn: start the LAT alternation from TWN's codes, so LAT is never worse than TWN; sign: the reference's start
    lat_init: str = "twn"
    # Cells kept in float, by dotted cell name (shell patterns). Biases and LayerNorms are never quantized.
    full_precision: List[str] = field(default_factory=lambda: list(DEFAULT_FULL_PRECISION))
    # The exported MindIR's graph: inlined (every cell's ops in one graph) or shared (each packed Dense, embedding
    # lookup and activation point a call of one stored function: ~0.44 MB less file at MiniLM shape, 14.0x instead
    # of 13.1x; a loaded GraphCell must then be compiled for dynamic shapes, and no_inline is documented for Ascend
    # only: README "Size of the MiniLM shape").
    export_graph: str = "inlined"

    def validate(self, prefix: str = "quant") -> None:
        for group in WEIGHT_GROUPS:
            getattr(self, group).validate(f"{prefix}.{group}")
        self.activation.validate(f"{prefix}.activation")
        for key in ("weight_clip", "activation_clip"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"{prefix}.{key}: must be > 0 or null (no clamp), got {value!r}")
        if isinstance(self.lat_iterations, bool) or not isinstance(self.lat_iterations, int) \
                or self.lat_iterations < 1:
            raise ConfigError(f"{prefix}.lat_iterations: must be an integer >= 1, got {self.lat_iterations!r}")
        if self.export_graph not in ("inlined", "shared"):
            raise ConfigError(f"{prefix}.export_graph: must be inlined or shared, got {self.export_graph!r}")
        if self.lat_init not in ("twn", "sign"):
            raise ConfigError(f"{prefix}.lat_init: must be twn or sign, got {self.lat_init!r}")
        if not self.lat_epsilon > 0:
            raise ConfigError(f"{prefix}.lat_epsilon: must be > 0, got {self.lat_epsilon!r}")
        for index, pattern in enumerate(self.full_precision):
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"{prefix}.full_precision[{index}]: must be a non-empty cell-name pattern, "
                                  f"got {pattern!r}")

    @classmethod
    def from_section(cls, values: Dict[str, Any], source: str, key: str) -> "QuantConfig":
        """The `quant:` section of an experiment config (config.py calls this for sections that define it)."""
        return cls.from_dict(values, source, key)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "<dict>", prefix: str = "quant") -> "QuantConfig":
        """Unknown keys, wrong types and impossible values are ConfigErrors naming `source` and the dotted key.

        `preset: "2-2-8"` (or 8-8-8, 4-4-8, fp) starts from that preset; the other keys override it.
        """
        values = dict(values)
        preset = values.pop("preset", None)
        base = cls.preset(preset, f"{source}: {prefix}.preset") if preset is not None else cls()
        merged = _merge(dataclasses.asdict(base), values)
        config = from_mapping(cls, merged, source, prefix)
        try:
            config.validate(prefix)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return config

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, where: str = "preset") -> "QuantConfig":
        """W-E-A presets. 2-2-8: TWN ternary Transformer weights and row-wise ternary word embedding, 8-bit
        symmetric activations (TernaryBERT); 8-8-8 / 4-4-8: symmetric linear weights; fp: nothing quantized."""
        if name == "2-2-8":
            return cls()
        if name in ("8-8-8", "4-4-8"):
            bits = int(name[0])
            return cls(encoder=WeightQuantConfig("sym", bits), embedding=WeightQuantConfig("sym", bits, "row"),
                       pooler=WeightQuantConfig("sym", bits), mlm_head=WeightQuantConfig("sym", bits))
        if name == "fp":
            return cls(encoder=_full_precision(), embedding=_full_precision(), position=_full_precision(),
                       pooler=_full_precision(),
                       mlm_head=_full_precision(), activation=ActivationQuantConfig("none", 8))
        raise ConfigError(f"{where}: unknown preset {name!r}; one of 2-2-8, 8-8-8, 4-4-8, fp")

    def keeps_full_precision(self, cell_name: str) -> bool:
        return any(fnmatch.fnmatchcase(cell_name, pattern) for pattern in self.full_precision)

    def uses_lat(self) -> bool:
        return any(getattr(self, group).method == "lat" for group in WEIGHT_GROUPS)


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
