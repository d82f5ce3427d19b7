"""Bit packing: exact round trips for every shape, layout checked against a bit-by-bit twin, in-graph unpack,
int32 words for collectives, MindIR export of a packed weight, and size accounting."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_nlp_compress.compress.quant import packing

SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (4,), (9,)]  # 4 is a multiple of every pack factor, 9 of none


def random_values(shape, low, high, seed=0):
    return np.random.default_rng(seed).integers(low, high + 1, size=shape).astype(np.int8)


def twin_pack(codes, bits):
    """Bit-by-bit reference: element i goes to byte i // per_byte at bit offset bits * (i % per_byte)."""
    per_byte = 8 // bits
    flat = [int(c) for c in np.asarray(codes).reshape(-1)]
    out = [0] * -(-len(flat) // per_byte)
    for index, code in enumerate(flat):
        out[index // per_byte] |= code << (bits * (index % per_byte))
    return out


# ---------------------------------------------------------------- host round trips ------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_ternary_round_trip_and_layout(shape):
    signs = random_values(shape, -1, 1)
    packed = packing.pack_ternary(signs)
    assert packed.dtype == np.uint8 and packed.size == -(-signs.size // 4)
    expected = twin_pack(signs.reshape(-1) + 1, 2)
    tail = (-signs.size) % 4  # padding codes are 1 (value 0)
    if tail:
        expected[-1] |= sum(1 << (2 * (4 - tail + k)) for k in range(tail))
    assert packed.tolist() == expected
    unpacked = packing.unpack_ternary(packed, shape)
    assert unpacked.dtype == np.int8 and unpacked.shape == shape
    np.testing.assert_array_equal(unpacked, signs)


def test_ternary_layout_little_end_first():
    # codes 0,1,2,1 -> 0 | 1<<2 | 2<<4 | 1<<6 = 0b01_10_01_00
    assert packing.pack_ternary(np.array([-1, 0, 1, 0])).tolist() == [0b01100100]


@pytest.mark.parametrize("shape", SHAPES)
def test_int4_round_trip_and_layout(shape):
    values = random_values(shape, -8, 7, seed=1)
    packed = packing.pack_int4(values)
    assert packed.size == -(-values.size // 2)
    assert packed.tolist() == twin_pack(values.reshape(-1).astype(np.int64) & 0xF, 4)
    np.testing.assert_array_equal(packing.unpack_int4(packed, shape), values)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_and_int32_word_round_trip(shape):
    values = random_values(shape, -128, 127, seed=2)
    np.testing.assert_array_equal(packing.unpack_int8(packing.pack_int8(values), shape), values)
    words = packing.pack_int8_to_int32(values)
    assert words.dtype == np.int32 and words.size == -(-values.size // 4)
    # independent twin: little-endian bytes of the offset codes (+128, pad 128) viewed as int32
    offset = np.concatenate([values.reshape(-1).astype(np.int16) + 128, np.full((-values.size) % 4, 128)])
    np.testing.assert_array_equal(words, offset.astype(np.uint8).view("<i4"))
    np.testing.assert_array_equal(packing.unpack_int32_to_int8(words, values.size), values.reshape(-1))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_generic_int32_word_round_trip(bits):
    codes = np.random.default_rng(3).integers(0, 2 ** bits, size=37)
    words = packing.pack_codes_to_int32(codes, bits)
    assert words.size == -(-37 // (32 // bits))
    np.testing.assert_array_equal(packing.unpack_int32_to_codes(words, bits, 37), codes)


def test_extreme_values_and_empty():
    extremes = np.array([-128, 127, -128, 127, 0], np.int8)  # top byte sets the int32 sign bit
    np.testing.assert_array_equal(packing.unpack_int32_to_int8(packing.pack_int8_to_int32(extremes), 5), extremes)
    np.testing.assert_array_equal(packing.unpack_int4(packing.pack_int4([-8, 7, -1]), (3,)), [-8, 7, -1])
    assert packing.pack_ternary(np.zeros(0)).size == 0
    assert packing.unpack_ternary(np.zeros(0, np.uint8), (0,)).shape == (0,)


def test_host_packing_rejects_bad_input():
    with pytest.raises(ValueError, match=r"ternary signs values must lie in \[-1, 1\]"):
        packing.pack_ternary([0, 2])
    with pytest.raises(ValueError, match="non-integral"):
        packing.pack_ternary(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="ternary signs contains 1 NaN"):
        packing.pack_ternary(np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match=r"int4 values .*\[-8, 7\]"):
        packing.pack_int4([8])
    with pytest.raises(ValueError, match="bits must be one of"):
        packing.pack_codes([1], 3)
    with pytest.raises(ValueError, match="need 2"):
        packing.unpack_ternary(np.zeros(1, np.uint8), (7,))


# ---------------------------------------------------------------- in graph --------------------------------------
@ms.jit
def unpack_all(ternary_packed, int4_packed, int8_codes, shape):
    return (packing.unpack_ternary_graph(ternary_packed, shape), packing.unpack_int4_graph(int4_packed, shape),
            packing.unpack_int8_graph(int8_codes, shape))


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_in_graph_unpack_matches_host(shape):
    signs, nibbles, bytes_ = (random_values(shape, -1, 1, 4), random_values(shape, -8, 7, 5),
                              random_values(shape, -128, 127, 6))
    ternary, int4, int8 = unpack_all(Tensor(packing.pack_ternary(signs)), Tensor(packing.pack_int4(nibbles)),
                                     Tensor(packing.pack_int8(bytes_)), shape)
    for tensor, expected in ((ternary, signs), (int4, nibbles), (int8, bytes_)):
        assert tensor.shape == shape and tensor.dtype == ms.int32
        np.testing.assert_array_equal(tensor.asnumpy(), expected)


@ms.jit
def int32_round_trip(values, count):
    words = packing.pack_int8_to_int32_graph(values)
    return words, packing.unpack_int32_to_int8_graph(words, count)


@ms.jit
def ternary_codes_round_trip(codes, count):
    words = packing.pack_codes_to_int32_graph(codes, 2)
    return words, packing.unpack_int32_to_codes_graph(words, 2, count)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_in_graph_int32_words_match_host_and_round_trip(shape):
    values = random_values(shape, -128, 127, seed=7)
    values.reshape(-1)[:2] = (-128, 127)
    words, restored = int32_round_trip(Tensor(values.astype(np.int32)), values.size)
    np.testing.assert_array_equal(words.asnumpy(), packing.pack_int8_to_int32(values))
    np.testing.assert_array_equal(restored.asnumpy(), values.reshape(-1))
    codes = random_values(shape, 0, 3, seed=8).astype(np.int32)  # e.g. ternary gradient codes + 1
    words, restored = ternary_codes_round_trip(Tensor(codes), codes.size)
    np.testing.assert_array_equal(words.asnumpy(), packing.pack_codes_to_int32(codes, 2))
    np.testing.assert_array_equal(restored.asnumpy(), codes.reshape(-1))


class PackedTernaryLinear(nn.Cell):
    def __init__(self, weight_signs, alpha):
        super().__init__()
        self.weight = packing.PackedTernaryWeight(packing.pack_ternary(weight_signs), alpha, weight_signs.shape)

    def construct(self, x):
        return ops.matmul(x, self.weight().T)  # (B, in) x (in, out) -> (B, out)


def test_packed_weight_exports_to_mindir_and_reloads(tmp_path):
    rng = np.random.default_rng(9)
    signs = rng.integers(-1, 2, size=(6, 10)).astype(np.int8)  # 60 codes: 15 bytes
    alpha = rng.random((6, 1)).astype(np.float32) + 0.5  # per-row scales
    network = PackedTernaryLinear(signs, alpha)
    x = Tensor(rng.standard_normal((3, 10)).astype(np.float32))
    expected = x.asnumpy() @ (signs * alpha).T
    np.testing.assert_allclose(network(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    file_stem = os.path.join(str(tmp_path), "packed_ternary")
    ms.export(network, x, file_name=file_stem, file_format="MINDIR")
    reloaded = nn.GraphCell(ms.load(file_stem + ".mindir"))
    np.testing.assert_array_equal(reloaded(x).asnumpy(), network(x).asnumpy())


# ---------------------------------------------------------------- size accounting -------------------------------
def test_size_accounting_by_hand():
    tensors = {"word_embeddings": (30522, 312), "query": (312, 312), "classifier": (2, 312), "scalar": ()}
    size = packing.quantized_size_bytes(tensors, {"word_embeddings": 2, "query": 2, "classifier": 32, "scalar": 8},
                                        per_row=["word_embeddings"])
    assert size.per_tensor["word_embeddings"] == (30522 * 312 // 4, 30522 * 4)
    assert size.per_tensor["query"] == (312 * 312 // 4, 4)
    assert size.per_tensor["classifier"] == (2 * 312 * 4, 0)
    assert size.per_tensor["scalar"] == (1, 4)
    assert size.total_bytes == sum(code + scale for code, scale in size.per_tensor.values())
    odd = packing.quantized_size_bytes({"x": (7,)}, 2)  # 7 codes still need 2 bytes
    assert (odd.code_bytes, odd.scale_bytes) == (2, 4)
    asymmetric = packing.quantized_size_bytes({"x": (3, 5)}, 3, per_row=["x"], asymmetric=["x"])
    assert asymmetric.per_tensor["x"] == (8, 3 * 2 * 4)  # 3 bits are stored as 4-bit fields


def test_size_accounting_matches_real_packed_lengths():
    for shape in SHAPES:
        count = int(np.prod(shape))
        report = packing.quantized_size_bytes({"t": shape}, {"t": 2})
        assert report.code_bytes == packing.pack_ternary(np.zeros(shape)).nbytes
        report = packing.quantized_size_bytes({"t": shape}, 4)
        assert report.code_bytes == packing.pack_int4(np.zeros(shape)).nbytes
        assert packing.quantized_size_bytes({"t": shape}, 8).code_bytes == count


def test_size_accounting_rejects_bad_settings():
    with pytest.raises(ValueError, match="bits must be in"):
        packing.quantized_size_bytes({"x": (3,)}, 12)
    with pytest.raises(ValueError, match=r"no entry for tensors \['y'\]"):
        packing.quantized_size_bytes({"x": (3,), "y": (2,)}, {"x": 2})
    with pytest.raises(ValueError, match="not in the set"):
        packing.quantized_size_bytes({"x": (3,)}, 2, per_row=["z"])
