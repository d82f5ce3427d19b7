"""Data pipeline benchmarks: tokenization + batching throughput, peak memory of one epoch, shard format choice.

    python scripts/bench_data.py generate --out /tmp/msnc_data/aug_1m.tsv --rows 1000000
    python scripts/bench_data.py throughput --input /tmp/msnc_data/aug_1m.tsv --rows 200000
    python scripts/bench_data.py memory --input /tmp/msnc_data/aug_1m.tsv --work /tmp/msnc_data
    python scripts/bench_data.py formats --input /tmp/msnc_data/aug_1m.tsv --rows 200000 --work /tmp/msnc_data

`generate` writes a TinyBERT-style augmented SST-2 file from the real corpora: every VADER training sentence
(`vader/sst2/train.tsv`, 18,585 rows) is repeated with its label, round 0 unchanged, later rounds with each word
replaced with probability 0.15 by a word drawn from the Brown corpus' word frequencies (alphabetic words only).
TinyBERT's augmentation also replaces words (with BERT/GloVe candidates, p=0.4, 20 variants per example); this is a
light, dependency-free stand-in with the same shape: many near-duplicate sentences of the task's length
distribution. With --lines it writes one sentence per line instead (Brown sentences and VADER sentences cycled with
the same perturbation), a general-distillation corpus.

Timings are wall-clock on whatever machine runs this (the README says which); peak memory is `ru_maxrss` of a
fresh process per case (numpy + tokenizers only, no MindSpore), with the process' baseline after imports.
Generated files belong under /tmp, never in the repository.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ms_nlp_compress import paths  # noqa: E402

ORDER = ("input_ids", "attention_mask", "token_type_ids", "label")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tokenizer_for(max_length: int):
    from ms_nlp_compress.data.tokenization import WordPieceTokenizer

    return WordPieceTokenizer.from_vocab(paths.minilm_dir() / "vocab.txt", max_length=max_length)


# ------------------------------------------------------------------------------------------------ generate


def generate(args) -> None:
    from ms_nlp_compress.data.glue import read_sst2

    cache = paths.cache_dir()
    rng = np.random.default_rng(args.seed)
    brown = (cache / "brown/corpus.txt").read_text(encoding="utf-8").splitlines()
    counts = Counter(word.lower() for line in brown for word in line.split() if word.isalpha())
    vocabulary = np.array(list(counts))
    cumulative = np.cumsum(np.array(list(counts.values()), dtype=np.float64))
    cumulative /= cumulative[-1]  # draw by inverse CDF: rng.choice(p=...) rebuilds it on every call
    if args.lines:
        vader = [example.text_a for split in ("train", "dev", "test")
                 for example in read_sst2(cache / f"vader/sst2/{split}.tsv") if example.text_a]
        bases = [(sentence, None) for sentence in brown + vader]
    else:
        bases = [(example.text_a, example.label) for example in read_sst2(cache / "vader/sst2/train.tsv")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    written = 0
    with open(out, "w", encoding="utf-8") as handle:
        if not args.lines:
            handle.write("sentence\tlabel\n")
        round_index = 0
        while written < args.rows:
            order = rng.permutation(len(bases)) if round_index else np.arange(len(bases))
            for base in order[:args.rows - written]:
                text, label = bases[base]
                words = text.split()
                if round_index and words:
                    replace = rng.random(len(words)) < args.replace
                    if replace.any():
                        picks = vocabulary[np.searchsorted(cumulative, rng.random(int(replace.sum())))]
                        for position, word in zip(np.flatnonzero(replace), picks):
                            words[position] = str(word)
                line = " ".join(words)
                handle.write(line + "\n" if args.lines else f"{line}\t{label}\n")
            written += min(len(bases), args.rows - written)
            round_index += 1
    print(f"wrote {written:,} rows ({round_index} rounds over {len(bases):,} base sentences, p={args.replace}) to "
          f"{out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")


# ------------------------------------------------------------------------------------------------ throughput


def read_rows(path: Path, rows: int):
    from ms_nlp_compress.data.glue import read_sst2

    examples = read_sst2(path)
    return examples[:rows] if rows else examples


def iterate(source) -> int:
    count = 0
    for _, arrays in source.epoch(0):
        count += len(arrays[0])
    return count


def timed(function):
    """(result, wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def throughput(args) -> None:
    """Each path `--repeats` times, interleaved; the best wall time of each (the machine is shared and noisy)."""
    from ms_nlp_compress.data.mindrecord import _ENCODE_CHUNK
    from ms_nlp_compress.data.streaming import StreamingBatches, build_shards_from_tsv
    from ms_nlp_compress.data.tokenization import stack_encodings
    from ms_nlp_compress.train.batches import ArrayBatches

    tokenizer = tokenizer_for(args.max_length)
    examples = read_rows(Path(args.input), args.rows)
    count = len(examples)
    texts = [example.text_a for example in examples]
    labels = np.array([example.label for example in examples], dtype=np.int32)
    subset = Path(args.work) / f"bench_{count}.tsv"
    subset.parent.mkdir(parents=True, exist_ok=True)
    subset.write_text("sentence\tlabel\n" + "".join(f"{e.text_a}\t{e.label}\n" for e in examples), encoding="utf-8")
    shard_dir = Path(args.work) / f"bench_{count}_shards"

    def per_text():  # the previous encode_batch: one `encode` per text, stacked, in encode_examples' chunks
        parts = [stack_encodings([tokenizer.encode(text, None, args.max_length)
                                  for text in texts[start:start + _ENCODE_CHUNK]], tokenizer.pad_id, args.max_length)
                 for start in range(0, count, _ENCODE_CHUNK)]
        return {**{name: np.concatenate([getattr(part, name) for part in parts]) for name in ORDER[:3]},
                "label": labels}

    def batch_api(word_ids):  # with word ids: encode_batch; without: encode_batch_fast (what encode_examples uses)
        def run():
            parts = [tokenizer.encode_ragged(texts[start:start + _ENCODE_CHUNK], max_length=args.max_length,
                                             word_ids=word_ids).padded(tokenizer.pad_id, args.max_length)
                     for start in range(0, count, _ENCODE_CHUNK)]
            return {**{name: np.concatenate([getattr(part, name) for part in parts]) for name in ORDER[:3]},
                    "label": labels}
        return run

    def shards():  # the whole `msnc data shards` step: read the TSV, tokenize (no word ids), write
        build_shards_from_tsv("sst2", subset, tokenizer, shard_dir, args.max_length, shard_rows=args.shard_rows)
        return shard_dir

    def in_memory(columns):
        return lambda: iterate(ArrayBatches(columns, ORDER, args.batch_size, seed=0))

    def streamed(shuffle_shards):
        return lambda: iterate(StreamingBatches(shard_dir, ORDER, args.batch_size, seed=0,
                                                shuffle_shards=shuffle_shards))

    cases = {"before: per-text encode + ArrayBatches": (per_text, in_memory),
             "after: batch API (with word ids) + ArrayBatches": (batch_api(True), in_memory),
             "after: batch API (no word ids) + ArrayBatches": (batch_api(False), in_memory),
             f"after: batch API -> shards + StreamingBatches (shuffle_shards={args.shuffle_shards})":
                 (shards, lambda _: streamed(args.shuffle_shards)),
             "after: batch API -> shards + StreamingBatches (shuffle_shards=0)": (shards, lambda _: streamed(0))}
    best = {name: [math.inf] * 4 for name in cases}
    reference = None
    for _ in range(args.repeats):
        for name, (tokenize, batching) in cases.items():
            data, wall, cpu = timed(tokenize)
            if isinstance(data, dict):
                if reference is None:
                    reference = data
                for column in ORDER[:3]:  # every path gives the per-text path's ids
                    np.testing.assert_array_equal(data[column], reference[column])
            rows, batch_wall, batch_cpu = timed(batching(data))
            assert rows == count // args.batch_size * args.batch_size
            best[name] = [min(old, new) for old, new in zip(best[name], (wall, cpu, batch_wall, batch_cpu))]
            del data
    # One window is the ArrayBatches order: the streamed batches equal the in-memory ones.
    streamed_batches = StreamingBatches(shard_dir, ORDER, args.batch_size, seed=0, shuffle_shards=0).epoch(0, 7)
    memory_batches = ArrayBatches(reference, ORDER, args.batch_size, seed=0).epoch(0, 7)
    for (_, left), (_, right), _ in zip(streamed_batches, memory_batches, range(50)):
        assert all(np.array_equal(a, b) for a, b in zip(left, right))

    print(f"{count:,} sentences, max_length {args.max_length}, batch {args.batch_size}, best of {args.repeats}, "
          f"RAYON threads {os.environ.get('RAYON_NUM_THREADS', 'all')} of {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| path | tokenize wall (s) | tokenize CPU (s) | tokenize sent/s | one epoch of batches (s) | batches sent/s "
          "| total sent/s |")
    print("|---|---|---|---|---|---|---|")
    for name, (wall, cpu, batch_wall, batch_cpu) in best.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {count / wall:,.0f} | {batch_wall:.2f} | {count / batch_wall:,.0f} "
              f"| {count / (wall + batch_wall):,.0f} |")


# ------------------------------------------------------------------------------------------------ memory


def memory_worker(args) -> None:
    """One case in a fresh process: build (or not) and iterate one epoch; prints a JSON line."""
    from ms_nlp_compress.data.streaming import StreamingBatches, build_shards_from_tsv
    from ms_nlp_compress.train.batches import ArrayBatches

    tokenizer = tokenizer_for(args.max_length)
    baseline = current_rss_mib()
    started = time.perf_counter()
    if args.case == "memory":
        from ms_nlp_compress.data.glue import read_sst2
        from ms_nlp_compress.data.mindrecord import encode_examples

        columns = encode_examples(read_sst2(args.input), tokenizer, args.max_length, False)
        source = ArrayBatches({name: columns[name] for name in ORDER}, ORDER, args.batch_size, seed=0)
    elif args.case == "build":
        build_shards_from_tsv("sst2", args.input, tokenizer, args.shards, args.max_length, shard_rows=args.shard_rows)
        print(json.dumps({"case": "build", "seconds": time.perf_counter() - started, "baseline_mib": baseline,
                          "peak_mib": peak_rss_mib()}))
        return
    else:
        source = StreamingBatches(args.shards, ORDER, args.batch_size, seed=0,
                                  shuffle_shards=0 if args.case == "stream-one-window" else args.shuffle_shards)
    prepared = time.perf_counter() - started
    started = time.perf_counter()
    rows = iterate(source)
    print(json.dumps({"case": args.case, "rows": rows, "prepare_seconds": prepared,
                      "epoch_seconds": time.perf_counter() - started, "baseline_mib": baseline,
                      "peak_mib": peak_rss_mib()}))


def memory(args) -> None:
    shards = Path(args.work) / f"{Path(args.input).stem}_shards"
    common = ["--input", args.input, "--shards", str(shards), "--max-length", str(args.max_length),
              "--batch-size", str(args.batch_size), "--shard-rows", str(args.shard_rows),
              "--shuffle-shards", str(args.shuffle_shards)]
    print(f"| case | rows | prepare (s) | one epoch (s) | RSS after imports (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for case in ("memory", "build", "stream", "stream-one-window"):
        output = subprocess.run([sys.executable, __file__, "_memory", "--case", case, *common], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(output)
        print(f"| {case} | {result.get('rows', '-')} | {result.get('prepare_seconds', result.get('seconds')):.1f} | "
              f"{result.get('epoch_seconds', float('nan')):.1f} | {result['baseline_mib']:.0f} | "
              f"{result['peak_mib']:.0f} |", flush=True)


# ------------------------------------------------------------------------------------------------ formats


def formats(args) -> None:
    """MindRecord (variable-length int32 columns) vs our npz shards, on the same tokenized rows."""
    import mindspore.dataset as ds
    from mindspore.mindrecord import FileReader, FileWriter

    from ms_nlp_compress.data.streaming import ShardWriter, StreamingBatches
    from ms_nlp_compress.data.tokenization import RaggedEncoding

    tokenizer = tokenizer_for(args.max_length)
    examples = read_rows(Path(args.input), args.rows)
    count = len(examples)
    ragged = RaggedEncoding.concatenate([
        tokenizer.encode_ragged([e.text_a for e in examples[start:start + 4096]], max_length=args.max_length)
        for start in range(0, count, 4096)])
    labels = np.array([e.label for e in examples], dtype=np.int32)
    work = Path(args.work) / "formats"
    work.mkdir(parents=True, exist_ok=True)
    print(f"{count:,} rows, {len(ragged.input_ids) / count:.1f} tokens/row")
    print("| format | write (s) | size (MiB) | read every row in order (s) | 32 rows by index (ms) |")
    print("|---|---|---|---|---|")

    # MindRecord, as msnc data convert would write it with variable-length columns.
    for stale in work.glob("rows.mindrecord*"):
        stale.unlink()
    path = work / "rows.mindrecord"
    started = time.perf_counter()
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "first_segment": {"type": "int32"},
                       "label": {"type": "int32"}}, "rows")
    for start in range(0, count, 4096):
        rows = ragged.take(np.arange(start, min(start + 4096, count)))
        writer.write_raw_data([{"input_ids": rows.input_ids[rows.offsets[i]:rows.offsets[i + 1]],
                                "first_segment": int(rows.first_segment[i]), "label": int(labels[start + i])}
                               for i in range(len(rows))])
    writer.commit()
    write_mr = time.perf_counter() - started
    size_mr = sum(p.stat().st_size for p in work.glob("rows.mindrecord*")) / 2**20
    started = time.perf_counter()
    reader = FileReader(str(path))
    seen = sum(1 for _ in reader.get_next())
    reader.close()
    read_mr = time.perf_counter() - started
    assert seen == count
    started = time.perf_counter()
    seen = sum(1 for _ in ds.MindDataset(str(path), shuffle=False).create_tuple_iterator(output_numpy=True))
    read_md = time.perf_counter() - started
    indices = np.random.default_rng(0).choice(count, 32, replace=False).tolist()
    started = time.perf_counter()
    for _ in range(3):
        picked = list(ds.MindDataset(str(path), sampler=ds.SubsetSampler(indices)).create_tuple_iterator(
            output_numpy=True))
    by_index_mr = (time.perf_counter() - started) / 3 * 1000
    assert len(picked) == 32
    print(f"| MindRecord, FileReader | {write_mr:.1f} | {size_mr:.1f} | {read_mr:.1f} | - |")
    print(f"| MindRecord, MindDataset | (same file) | | {read_md:.1f} | {by_index_mr:.0f} (a SubsetSampler pipeline) |")

    # npz shards.
    directory = work / "rows_shards"
    started = time.perf_counter()
    writer = ShardWriter(directory, args.max_length, tokenizer.pad_id, tokenizer.vocab_size, args.shard_rows,
                         label_dtype="int32", word_ids=False)
    writer.add(RaggedEncoding(ragged.input_ids, None, ragged.offsets, ragged.first_segment), labels)
    writer.finish()
    write_np = time.perf_counter() - started
    size_np = sum(p.stat().st_size for p in directory.glob("*.npz")) / 2**20
    source = StreamingBatches(directory, ORDER, 32, shuffle=False, shuffle_shards=args.shuffle_shards,
                              drop_last=False)
    started = time.perf_counter()
    assert iterate(source) == count
    read_np = time.perf_counter() - started
    shuffled = StreamingBatches(directory, ORDER, 32, seed=0, shuffle_shards=args.shuffle_shards)
    next(iter(shuffled.epoch(0, 5)))  # window loaded
    started = time.perf_counter()
    for index, _ in zip(range(100), shuffled.epoch(0, 6)):
        pass
    by_index_np = (time.perf_counter() - started) / 100 * 1000
    print(f"| npz shards + StreamingBatches (padded batches of 32) | {write_np:.1f} | {size_np:.1f} | "
          f"{read_np:.1f} | {by_index_np:.2f} (a shuffled batch from the loaded window) |")
    print(f"padded int32 [rows, {args.max_length}] x 3 columns in RAM: {count * args.max_length * 12 / 2**20:.0f} MiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write the augmented file from the real corpora")
    gen.add_argument("--out", required=True)
    gen.add_argument("--rows", type=int, default=1_000_000)
    gen.add_argument("--replace", type=float, default=0.15, help="per-word replacement probability")
    gen.add_argument("--lines", action="store_true", help="one sentence per line (Brown + VADER) instead of TSV")
    gen.add_argument("--seed", type=int, default=20240601)
    gen.set_defaults(func=generate)
    for name, func in (("throughput", throughput), ("memory", memory), ("_memory", memory_worker),
                       ("formats", formats)):
        command = sub.add_parser(name)
        command.add_argument("--input", required=True, help="an SST-2-format TSV (e.g. from `generate`)")
        command.add_argument("--rows", type=int, default=0, help="use the first N rows (0: all)")
        command.add_argument("--work", default="/tmp/msnc_data", help="where shards and subsets are written")
        command.add_argument("--max-length", type=int, default=128)
        command.add_argument("--batch-size", type=int, default=32)
        command.add_argument("--shard-rows", type=int, default=8192)
        command.add_argument("--shuffle-shards", type=int, default=16)
        command.add_argument("--repeats", type=int, default=3, help="throughput: runs per path (best kept)")
        command.add_argument("--case", default=None)
        command.add_argument("--shards", default=None)
        command.set_defaults(func=func)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
