"""Throughput of bit packing: numpy host-side pack/unpack and in-graph (MindSpore) unpack and int32-word packing.

Why: packing runs once at export (host), unpacking runs in every exported forward pass, and the int32-word
pack/unpack runs on every step of compressed gradient communication, so their speed decides where each belongs.
The table in ms_nlp_compress/compress/quant/README.md comes from this script.

    .venv/bin/python scripts/bench_packing.py                      # 4,194,304 elements (a 2048 x 2048 matrix)
    .venv/bin/python scripts/bench_packing.py --elements 1000003 --repeats 9

Reports the median of `repeats` calls after one warm-up call (which includes graph compilation), as milliseconds
and millions of elements per second. Elements are codes (not bytes): 4M ternary codes are 1 MB packed.
"""
import argparse
import statistics
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ms_nlp_compress.compress.quant import packing


def median_milliseconds(function, repeats):
    function()  # warm-up: compiles graphs, touches memory
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if isinstance(result, Tensor):
            result.asnumpy()  # wait for the device result
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=2048 * 2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="MindSpore CPU threads (0 = library default)")
    arguments = parser.parse_args()
    if arguments.threads:
        ms.device_context.cpu.op_tuning.threads_num(arguments.threads)
    count = arguments.elements
    rng = np.random.default_rng(0)
    signs = rng.integers(-1, 2, size=count).astype(np.int8)
    nibbles = rng.integers(-8, 8, size=count).astype(np.int8)
    bytes_ = rng.integers(-128, 128, size=count).astype(np.int8)
    packed_ternary, packed_int4 = packing.pack_ternary(signs), packing.pack_int4(nibbles)
    words = packing.pack_int8_to_int32(bytes_)
    ternary_tensor, int4_tensor = Tensor(packed_ternary), Tensor(packed_int4)
    int8_as_int32, words_tensor = Tensor(bytes_.astype(np.int32)), Tensor(words)

    @ms.jit
    def unpack_ternary_graph(packed):
        return packing.unpack_ternary_graph(packed, (count,))

    @ms.jit
    def unpack_int4_graph(packed):
        return packing.unpack_int4_graph(packed, (count,))

    @ms.jit
    def pack_words_graph(values):
        return packing.pack_int8_to_int32_graph(values)

    @ms.jit
    def unpack_words_graph(packed_words):
        return packing.unpack_int32_to_int8_graph(packed_words, count)

    cases = [
        ("ternary 2-bit", "numpy pack", lambda: packing.pack_ternary(signs)),
        ("ternary 2-bit", "numpy unpack", lambda: packing.unpack_ternary(packed_ternary, (count,))),
        ("ternary 2-bit", "graph unpack", lambda: unpack_ternary_graph(ternary_tensor)),
        ("int4", "numpy pack", lambda: packing.pack_int4(nibbles)),
        ("int4", "numpy unpack", lambda: packing.unpack_int4(packed_int4, (count,))),
        ("int4", "graph unpack", lambda: unpack_int4_graph(int4_tensor)),
        ("int8 -> int32 words", "numpy pack", lambda: packing.pack_int8_to_int32(bytes_)),
        ("int8 -> int32 words", "numpy unpack", lambda: packing.unpack_int32_to_int8(words, count)),
        ("int8 -> int32 words", "graph pack", lambda: pack_words_graph(int8_as_int32)),
        ("int8 -> int32 words", "graph unpack", lambda: unpack_words_graph(words_tensor)),
    ]
    print(f"elements {count:,}, median of {arguments.repeats}, MindSpore {ms.__version__}, "
          f"threads {arguments.threads or 'default'}")
    print(f"| format | operation | ms | M elements/s |")
    print(f"|---|---|---|---|")
    for format_name, operation, function in cases:
        milliseconds = median_milliseconds(function, arguments.repeats)
        print(f"| {format_name} | {operation} | {milliseconds:.1f} | {count / milliseconds / 1000.0:.0f} |")


if __name__ == "__main__":
    main()
