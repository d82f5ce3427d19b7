"""Bit packing of quantization codes: numpy packing on the host, MindSpore unpacking inside graphs.

Why: the reference TernaryBERT shipped fake-quantized float32 files as large as the original model. Real savings
need the codes stored at their bit width. Packing happens once at export time (numpy, host side); unpacking happens
inside the exported graph (MindSpore ops that compile and export to MindIR), so a loaded model carries only packed
integers plus float scales.

Formats (all flatten the tensor in C order and pad the tail; padding is dropped again on unpack, so every shape
round-trips, including lengths that are not a multiple of the pack factor):

- Ternary, 4 codes per uint8: value v in {-1, 0, +1} is stored as code c = v + 1 in {0, 1, 2} (value (c-1)*alpha),
  code i of a byte at bits 2*(i % 4) (little end first). Padding code 1 decodes to 0.
- 4-bit, 2 codes per uint8: signed values in [-8, 7] as two's-complement nibbles, element i at bits 4*(i % 2).
  Padding nibble 0. (The symmetric quantizer only uses [-7, 7]; -8 is still representable.)
- 8-bit: signed values in [-128, 127] as int8, one per byte.
- int32 words, for collectives: MindSpore's CPU AllGather rejects int8/uint8, so codes travel as int32 words.
  8-bit values are offset by +128 to unsigned bytes and packed 4 per word, byte i at bits 8*i; 2-bit and 4-bit
  unsigned codes pack 16 and 8 per word the same way. The top byte wraps into the sign bit (two's complement),
  which the unpack undoes by masking after an arithmetic shift. Padding: offset code of value 0.

Sizes: `quantized_size_bytes` reports code bytes + scale bytes for a set of tensors and a bit setting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_nlp_compress.compress.quant.primitives import validate_finite

PACKABLE_BITS = (2, 4, 8)


# --------------------------------------------------------------------------------------------------------------
# Host side (numpy)
# --------------------------------------------------------------------------------------------------------------
def _check_bits(bits) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")


def _as_integer_values(name: str, values, low: int, high: int) -> np.ndarray:
    """Flatten `values` to int64 after checking it is finite, integral and within [low, high]."""
    array = values.asnumpy() if isinstance(values, Tensor) else np.asarray(values)
    validate_finite(name, array)
    if array.dtype.kind == "b":
        raise ValueError(f"{name} must hold integers, got a boolean array")
    flat = array.reshape(-1)
    if array.dtype.kind == "f" and not np.array_equal(flat, np.round(flat)):
        raise ValueError(f"{name} must hold integer values, got non-integral floats")
    flat = flat.astype(np.int64)
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"{name} values must lie in [{low}, {high}], got range [{flat.min()}, {flat.max()}]")
    return flat


def _element_count(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _pack_fields(codes, bits: int, pad_code: int, container_bits: int) -> np.ndarray:
    """Unsigned `bits`-wide codes into int64 containers of `container_bits`, element i at bits*(i % per container).

    The one packing rule behind bytes (8) and collective-friendly int32 words (32); the tail is padded with
    `pad_code` up to a whole container.
    """
    _check_bits(bits)
    flat = _as_integer_values("codes", codes, 0, 2 ** bits - 1)
    per_container = container_bits // bits
    padding = (-flat.size) % per_container
    flat = np.concatenate([flat, np.full(padding, pad_code, np.int64)])
    grouped = flat.reshape(-1, per_container)  # (containers, per_container)
    shifts = bits * np.arange(per_container, dtype=np.int64)
    return np.bitwise_or.reduce(grouped << shifts, axis=1)  # in [0, 2^container_bits)


def pack_codes(codes, bits: int, pad_code: int = 0) -> np.ndarray:
    """Pack unsigned `bits`-wide codes (2, 4 or 8) into uint8, 8/bits per byte, element i at bits*(i % (8/bits))."""
    return _pack_fields(codes, bits, pad_code, 8).astype(np.uint8)


def unpack_codes(packed, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_codes: the first `count` unsigned codes as uint8."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    per_byte = 8 // bits
    if packed.size * per_byte < count or packed.size != math.ceil(count / per_byte):
        raise ValueError(f"packed holds {packed.size} bytes, but {count} codes of {bits} bits need "
                         f"{math.ceil(count / per_byte)}")
    shifts = (bits * np.arange(per_byte)).astype(np.uint8)
    codes = (packed[:, None] >> shifts) & np.uint8(2 ** bits - 1)  # (bytes, per_byte)
    return codes.reshape(-1)[:count]


def pack_ternary(signs) -> np.ndarray:
    """Pack ternary values in {-1, 0, +1} (any shape, any numeric dtype) 4 per byte; keep the shape yourself."""
    flat = _as_integer_values("ternary signs", signs, -1, 1)
    return pack_codes(flat + 1, 2, pad_code=1)


def unpack_ternary(packed, shape: Sequence[int]) -> np.ndarray:
    """int8 values in {-1, 0, +1} with the given shape."""
    codes = unpack_codes(packed, 2, _element_count(shape))
    return (codes.astype(np.int8) - 1).reshape(shape)


def pack_int4(values) -> np.ndarray:
    """Pack signed values in [-8, 7] as two's-complement nibbles, 2 per byte."""
    flat = _as_integer_values("int4 values", values, -8, 7)
    return pack_codes(flat & 0xF, 4)


def unpack_int4(packed, shape: Sequence[int]) -> np.ndarray:
    """int8 values in [-8, 7] with the given shape (nibbles >= 8 are negative)."""
    nibbles = unpack_codes(packed, 4, _element_count(shape)).astype(np.int8)
    return (nibbles - 16 * (nibbles >= 8)).astype(np.int8).reshape(shape)


def pack_int8(values) -> np.ndarray:
    """Signed 8-bit codes as a flat int8 array (range-checked; no bit tricks needed)."""
    return _as_integer_values("int8 values", values, -128, 127).astype(np.int8)


def unpack_int8(packed, shape: Sequence[int]) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.int8).reshape(-1)
    if packed.size != _element_count(shape):
        raise ValueError(f"packed holds {packed.size} int8 codes, shape {tuple(shape)} needs {_element_count(shape)}")
    return packed.reshape(shape)


def pack_codes_to_int32(codes, bits: int, pad_code: int = 0) -> np.ndarray:
    """Pack unsigned `bits`-wide codes 32/bits per int32 word, element i at bits*(i % (32/bits))."""
    return _pack_fields(codes, bits, pad_code, 32).astype(np.uint32).view(np.int32)


def unpack_int32_to_codes(words, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_codes_to_int32: the first `count` unsigned codes as int64."""
    _check_bits(bits)
    words = np.asarray(words, dtype=np.int32).reshape(-1).view(np.uint32).astype(np.int64)
    per_word = 32 // bits
    if words.size != math.ceil(count / per_word):
        raise ValueError(f"words holds {words.size} int32, but {count} codes of {bits} bits need "
                         f"{math.ceil(count / per_word)}")
    shifts = bits * np.arange(per_word, dtype=np.int64)
    return ((words[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:count]


def pack_int8_to_int32(values) -> np.ndarray:
    """Signed 8-bit values -> int32 words (4 per word after a +128 offset), for collectives that reject int8."""
    flat = _as_integer_values("int8 values", values, -128, 127)
    return pack_codes_to_int32(flat + 128, 8, pad_code=128)


def unpack_int32_to_int8(words, count: int) -> np.ndarray:
    return (unpack_int32_to_codes(words, 8, count) - 128).astype(np.int8)


# --------------------------------------------------------------------------------------------------------------
# In graph (MindSpore); shapes and counts are Python constants, so slicing and reshapes are static
# --------------------------------------------------------------------------------------------------------------
def _static_count(shape) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count


def _take_leading(flat, count: int):
    """Drop the padding. Slice int32 only and only when needed: slicing the uint8 codes cost ~200 ms per 4M
    elements on CPU (MindSpore 2.10), slicing int32 ~3 ms (scripts/bench_packing.py)."""
    if flat.shape[0] == count:
        return flat
    return flat[:count]


def unpack_codes_graph(packed, bits: int, count: int):
    """uint8 tensor of packed codes -> int32 tensor of the first `count` unsigned codes (1-D)."""
    _check_bits(bits)
    per_byte = 8 // bits
    shifts = Tensor([bits * i for i in range(per_byte)], ms.uint8)
    mask = Tensor(2 ** bits - 1, ms.uint8)
    codes = ops.bitwise_and(ops.bitwise_right_shift(packed.reshape(-1, 1), shifts), mask)  # (bytes, per_byte)
    return _take_leading(codes.reshape(-1).astype(ms.int32), count)


def unpack_ternary_graph(packed, shape):
    """Packed ternary uint8 -> int32 values in {-1, 0, +1} with `shape`. Multiply by alpha after a float cast."""
    codes = unpack_codes_graph(packed, 2, _static_count(shape))
    return (codes - 1).reshape(shape)


def unpack_int4_graph(packed, shape):
    """Packed two's-complement nibbles -> int32 values in [-8, 7] with `shape`."""
    nibbles = unpack_codes_graph(packed, 4, _static_count(shape))
    # Sign extension without branches: nibbles 8..15 are the negatives -8..-1.
    return (nibbles - (nibbles >= 8).astype(ms.int32) * 16).reshape(shape)


def unpack_int8_graph(packed, shape):
    """int8 codes -> int32 values with `shape` (int8 arithmetic is avoided: several CPU kernels lack it)."""
    return packed.astype(ms.int32).reshape(shape)


def pack_codes_to_int32_graph(codes, bits: int, pad_code: int = 0):
    """In-graph: int32 tensor of unsigned `bits`-wide codes (any shape) -> 1-D int32 words, 32/bits per word.

    Used on both sides of a collective, e.g. AllGather of gradient codes. Same layout as pack_codes_to_int32.
    """
    _check_bits(bits)
    per_word = 32 // bits
    flat = codes.reshape(-1).astype(ms.int32)
    padding = (-_static_count(codes.shape)) % per_word
    if padding:
        flat = ops.concat((flat, ops.ones(padding, ms.int32) * pad_code))
    grouped = flat.reshape(-1, per_word)  # (words, per_word)
    shifts = Tensor([bits * i for i in range(per_word)], ms.int32)
    shifted = ops.bitwise_left_shift(grouped, shifts)  # the top field wraps into the sign bit, by design
    # OR the per_word columns together. ops.split is ~2.5x faster than column indexing on CPU, and staying with
    # bitwise ops avoids relying on int32 overflow behaviour of a sum (which MindSpore also promotes to int64).
    columns = ops.split(shifted, 1, axis=1)  # per_word tensors of shape (words, 1)
    words = columns[0]
    for position in range(1, per_word):
        words = ops.bitwise_or(words, columns[position])
    return words.reshape(-1)


def unpack_int32_to_codes_graph(words, bits: int, count: int):
    """In-graph inverse of pack_codes_to_int32_graph: the first `count` unsigned codes as 1-D int32."""
    _check_bits(bits)
    per_word = 32 // bits
    shifts = Tensor([bits * i for i in range(per_word)], ms.int32)
    mask = Tensor(2 ** bits - 1, ms.int32)
    # Arithmetic right shift copies the sign bit down, the mask removes those copies.
    codes = ops.bitwise_and(ops.bitwise_right_shift(words.reshape(-1, 1), shifts), mask)  # (words, per_word)
    return _take_leading(codes.reshape(-1), count)


def pack_int8_to_int32_graph(values):
    """In-graph: int tensor with values in [-128, 127] -> 1-D int32 words (4 per word after +128)."""
    return pack_codes_to_int32_graph(values.astype(ms.int32) + 128, 8, pad_code=128)


def unpack_int32_to_int8_graph(words, count: int):
    """In-graph: int32 words -> 1-D int32 tensor of the first `count` signed 8-bit values."""
    return unpack_int32_to_codes_graph(words, 8, count) - 128


class PackedTernaryWeight(nn.Cell):
    """Holds a ternary weight as packed uint8 codes + float alpha; construct() returns the float weight.

    Both are non-trainable Parameters so they are saved in checkpoints and MindIR files as real uint8/float data.
    `alpha` is a scalar (per matrix) or shape (rows, 1) (per row).
    """

    def __init__(self, packed: np.ndarray, alpha: np.ndarray, shape: Sequence[int]):
        super().__init__()
        self.weight_shape = tuple(int(extent) for extent in shape)
        expected = math.ceil(_element_count(self.weight_shape) / 4)
        if np.asarray(packed).size != expected:
            raise ValueError(f"packed has {np.asarray(packed).size} bytes, shape {self.weight_shape} needs {expected}")
        validate_finite("alpha", alpha)
        self.packed = ms.Parameter(Tensor(np.asarray(packed, np.uint8).reshape(-1)), name="packed",
                                   requires_grad=False)
        self.alpha = ms.Parameter(Tensor(np.asarray(alpha, np.float32)), name="alpha", requires_grad=False)

    def construct(self):
        return unpack_ternary_graph(self.packed, self.weight_shape).astype(ms.float32) * self.alpha


# --------------------------------------------------------------------------------------------------------------
# Size accounting
# --------------------------------------------------------------------------------------------------------------
FLOAT_BITS = (16, 32)  # stored as fp16 / fp32, no scale


def storage_bits(bits: int) -> int:
    """Bits actually used per element by this module's formats: codes are stored in 2-, 4- or 8-bit fields."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an integer, got {bits!r}")
    if bits in FLOAT_BITS:
        return bits
    for field_bits in PACKABLE_BITS:
        if 1 <= bits <= field_bits:
            return field_bits
    raise ValueError(f"bits must be in 1..8 (packed codes) or 16/32 (float), got {bits}")


@dataclass(frozen=True)
class QuantizedSize:
    """Byte counts of a quantized tensor set. per_tensor maps name -> (code bytes, scale bytes)."""

    code_bytes: int
    scale_bytes: int
    per_tensor: Mapping[str, tuple] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes


def quantized_size_bytes(tensors: Mapping[str, Union[Sequence[int], np.ndarray, Tensor]],
                         bits: Union[int, Mapping[str, int]],
                         per_row: Collection[str] = (),
                         asymmetric: Collection[str] = (),
                         scale_bytes: int = 4) -> QuantizedSize:
    """Bytes needed to store `tensors` (name -> shape or array) with this module's packed formats.

    bits: one width for all tensors or name -> width; 16/32 mean a float copy with no scale. Code bytes are
    ceil(elements / codes per byte) (formats flatten the whole tensor). Each quantized tensor carries one scale
    (per_row names: one per row = per slice along the last axis); `asymmetric` names (min-max) add a minimum per
    scale. Scales are `scale_bytes` wide (float32 by default).
    """
    unknown = (set(per_row) | set(asymmetric)) - set(tensors)
    if unknown:
        raise ValueError(f"per_row/asymmetric name tensors that are not in the set: {sorted(unknown)}")
    if isinstance(bits, Mapping):
        missing = set(tensors) - set(bits)
        if missing:
            raise ValueError(f"bits has no entry for tensors {sorted(missing)}")
    per_tensor = {}
    for name, tensor in tensors.items():
        shape = tuple(tensor.shape) if hasattr(tensor, "shape") else tuple(tensor)
        if any((not isinstance(extent, (int, np.integer))) or extent < 0 for extent in shape):
            raise ValueError(f"tensor {name!r}: shape must be non-negative integers, got {shape}")
        tensor_bits = bits[name] if isinstance(bits, Mapping) else bits
        field_bits = storage_bits(tensor_bits)
        count = _element_count(shape)
        code_bytes = math.ceil(count * field_bits / 8)
        if field_bits in FLOAT_BITS:
            scales = 0
        else:
            if name in per_row and len(shape) == 0:
                raise ValueError(f"tensor {name!r}: per_row needs at least one axis")
            groups = _element_count(shape[:-1]) if name in per_row else 1
            scales = groups * (2 if name in asymmetric else 1) * scale_bytes
        per_tensor[name] = (code_bytes, scales)
    return QuantizedSize(code_bytes=sum(code for code, _ in per_tensor.values()),
                         scale_bytes=sum(scale for _, scale in per_tensor.values()),
                         per_tensor=per_tensor)


# --------------------------------------------------------------------------------------------------------------
# Row-wise layout for model weights (quant/convert.py): each row packed on its own, so a row (a vocabulary entry)
# can be gathered as bytes and unpacked alone. Rows are padded to whole bytes with `pad_code`.
# --------------------------------------------------------------------------------------------------------------
def pack_rows(codes, bits: int, pad_code: int = 0) -> np.ndarray:
    """Unsigned `bits`-wide codes (rows, cols) -> uint8 (rows, ceil(cols / (8/bits))), same field order as
    pack_codes (code i of a byte at bits*(i % per_byte))."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_rows needs a 2-D code array, got shape {codes.shape}")
    per_byte = 8 // bits
    rows, cols = codes.shape
    padding = (-cols) % per_byte
    padded = np.concatenate([codes.astype(np.int64), np.full((rows, padding), pad_code, np.int64)], axis=1)
    return pack_codes(padded, bits, pad_code).reshape(rows, (cols + padding) // per_byte)


def unpack_rows(packed, bits: int, cols: int) -> np.ndarray:
    """Host-side inverse of pack_rows: unsigned codes (rows, cols) as uint8, plus nothing dropped silently."""
    packed = np.asarray(packed, np.uint8)
    per_byte = 8 // bits
    shifts = (bits * np.arange(per_byte)).astype(np.uint8)
    codes = (packed[:, :, None] >> shifts) & np.uint8(2 ** bits - 1)  # (rows, bytes, per_byte)
    return codes.reshape(packed.shape[0], -1)[:, :cols]


def unpack_rows_graph(packed, bits: int, cols: int):
    """In-graph: uint8 (rows, bytes) -> int32 unsigned codes (rows, cols); rows may be a gathered subset."""
    _check_bits(bits)
    per_byte = 8 // bits
    shifts = Tensor([bits * i for i in range(per_byte)], ms.uint8)
    mask = Tensor(2 ** bits - 1, ms.uint8)
    codes = ops.bitwise_and(ops.bitwise_right_shift(packed.expand_dims(-1), shifts), mask)  # (rows, bytes, per)
    codes = codes.reshape(-1, packed.shape[1] * per_byte).astype(ms.int32)  # (rows, bytes * per)
    if codes.shape[1] == cols:
        return codes
    return codes[:, :cols]  # int32 slice: cheap (see _take_leading)
