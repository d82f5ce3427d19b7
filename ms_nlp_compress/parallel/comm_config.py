"""The `comm:` section: how data-parallel ranks exchange gradients (and, in the sharded scheme, weights).

    comm:
      scheme: allgather        # fp32 (MindSpore's all-reduce) | allgather (low-bit codes, every rank averages)
                               # | sharded (owner updates its fp32 master shard, low-bit weights are all-gathered)
      gradient_bits: 4         # 2..8: signed stochastic levels -(2^(b-1)-1)..2^(b-1)-1, packed 32//b per int32 word
      clip_factor: 3.0         # clip each group to +-clip_factor*std before quantizing; null = no clipping
      error_feedback: false    # carry each rank's quantization error into its next step (checkpointed)
      weight_bits: null        # sharded only: 2 = TWN ternary, 3..8 = symmetric m-bit, null = fp32 weights
      warmup_steps: 0          # the first updates exchange fp32 gradients (all-reduce), then low-bit
      bucket_size: 0           # 0 = one scale per gradient tensor; n = one scale per n elements of the fused vector

The dataclass follows config.py's conventions (typed fields, `validate(prefix)` naming the key), so the root
config can hold it as `comm: CommConfig` and the generic loader checks types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ms_nlp_compress.errors import ConfigError

SCHEMES = ("fp32", "allgather", "sharded")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class CommConfig:
    scheme: str = "fp32"
    gradient_bits: int = 4
    clip_factor: Optional[float] = 3.0
    error_feedback: bool = False
    weight_bits: Optional[int] = None
    warmup_steps: int = 0
    bucket_size: int = 0

    @property
    def compressed(self) -> bool:
        return self.scheme != "fp32"

    def validate(self, prefix: str = "comm") -> None:
        _check(self.scheme in SCHEMES, f"{prefix}.scheme", f"must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        _check(_is_int(self.gradient_bits) and 2 <= self.gradient_bits <= 8, f"{prefix}.gradient_bits",
               f"must be an integer in 2..8, got {self.gradient_bits!r}")
        _check(self.clip_factor is None or (isinstance(self.clip_factor, (int, float))
                                            and not isinstance(self.clip_factor, bool) and self.clip_factor > 0),
               f"{prefix}.clip_factor", f"must be > 0 or null (no clipping), got {self.clip_factor!r}")
        _check(isinstance(self.error_feedback, bool), f"{prefix}.error_feedback",
               f"must be true or false, got {self.error_feedback!r}")
        if self.weight_bits is not None:
            _check(_is_int(self.weight_bits) and 2 <= self.weight_bits <= 8, f"{prefix}.weight_bits",
                   f"must be an integer in 2..8 (2 = TWN ternary) or null, got {self.weight_bits!r}")
            _check(self.scheme == "sharded", f"{prefix}.weight_bits",
                   f"low-bit weights need scheme sharded (the owner quantizes its updated shard), got scheme "
                   f"{self.scheme!r}")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, f"{prefix}.warmup_steps",
               f"must be an integer >= 0, got {self.warmup_steps!r}")
        _check(_is_int(self.bucket_size) and (self.bucket_size == 0 or self.bucket_size >= 64),
               f"{prefix}.bucket_size", f"must be 0 (one scale per tensor) or >= 64 elements, got "
               f"{self.bucket_size!r}")

    @classmethod
    def from_dict(cls, values: dict, source: str = "comm") -> "CommConfig":
        """Build and validate from a mapping (unknown keys are errors naming the key)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(values).__name__}")
        known = set(cls.__dataclass_fields__)
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}.{key}: unknown key (known: {', '.join(sorted(known))})")
        config = cls(**values)
        config.validate(source)
        return config
