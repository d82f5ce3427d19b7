"""Tokenized data on disk, read back shard by shard: the training batch source for data that should not sit in RAM.

TinyBERT's augmented task sets (~20 variants per example) and general distillation over a corpus are millions of
sentences; padded int32 arrays of 1M sentences at max_length 128 take 1.5 GB before any copy. Here the text is
tokenized once (with the batch API of the tokenizer) into shards of unpadded rows, and `StreamingBatches` reads a
few shards at a time and pads each batch as it is drawn.

On-disk layout of a shard directory (written by `ShardWriter`, built atomically: a `.partial-*` directory renamed
into place, `manifest.json` last):

    manifest.json           format, version, rows, max_length, pad_id, dtypes, tokenizer and source fingerprints,
                            and per shard: file, rows, bytes, sha256
    shard-000000.npz ...    uncompressed npz, `shard_rows` rows each (the last may be shorter):
                              input_ids      flat tokens of all rows ([CLS] A [SEP] (B [SEP])), uint16 when the
                                             vocabulary fits, else int32
                              lengths        tokens per row (the attention mask)
                              first_segment  tokens of [CLS] A [SEP] (token_type_ids are 1 from there on)
                              word_ids       flat, optional (whole-word masking)
                              label          optional, int32 (-1 unlabeled) or float32 (NaN unlabeled)

Why npz and not MindRecord: the reader needs rows by index in an order that is a pure function of (seed, epoch,
index), so resume is exact; MindRecord's Python FileReader only iterates, and MindDataset's own shuffle and
sharding cannot be restarted at a batch index. The measurements behind the choice are in the data README
(`python scripts/bench_data.py formats`).

Order of an epoch (`StreamingBatches.epoch`), all from (seed, epoch) alone:
- one window (`shuffle_shards` 0 or >= the shard count): the rows are permuted with exactly the permutation
  `ArrayBatches` uses, `default_rng([seed, epoch]).permutation(rows)`, so the batches are identical to the
  in-memory source's (tested). Memory: all shards, unpadded.
- several windows: the shard order is permuted (`default_rng([seed, epoch, 1])`), consecutive groups of
  `shuffle_shards` shards form windows, and each window's rows are permuted (`default_rng([seed, epoch, 2, w])`).
  Every row is still drawn exactly once per epoch; memory is one window (two while a batch straddles them).
Batch i of the epoch takes stream positions [i * B * W, (i + 1) * B * W) and rank r the slice
[r * B, (r + 1) * B) of it, as `ArrayBatches` does. Every rank reads every shard of a window (the price of batches
equal to a single process's); ranks on one host share the page cache.

Every shard is checked against its recorded size and sha256 when it is loaded: a corrupted or missing shard is a
`DataError` naming the file, never silently different data.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ms_nlp_compress.data.fetch import sha256_of
from ms_nlp_compress.data.tokenization import RaggedEncoding
from ms_nlp_compress.errors import ConfigError, DataError

FORMAT = "msnc-shards"
VERSION = 1
MANIFEST = "manifest.json"
STREAM_MODES = ("auto", "memory", "disk")
# `stream: auto` keeps a text file in memory while its padded input arrays (3 x int32 [rows, max_length]) stay
# under this size, about 350k rows at max_length 128; above it the file is streamed from shards.
AUTO_MEMORY_BYTES = 512 << 20
SEQUENCE_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
ENCODE_CHUNK = 4096  # texts per tokenizer batch call: big enough for the Rust thread pool, small in memory

ProgressFn = Callable[[dict], None]


# --------------------------------------------------------------------------------------------- writing


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides the ids: class, vocabulary file hash, lowercasing and special ids."""
    vocab = getattr(tokenizer, "vocab_path", None) or getattr(tokenizer, "model_path", None)
    return {"class": type(tokenizer).__name__, "vocab": str(vocab) if vocab else None,
            "vocab_sha256": sha256_of(Path(vocab)) if vocab else None,
            "lowercase": bool(getattr(tokenizer, "lowercase", False)), "vocab_size": int(tokenizer.vocab_size),
            "special_ids": {key: int(value) for key, value in tokenizer.special_ids().items()}}


class ShardWriter:
    """Collects unpadded rows and writes them as shards of `shard_rows` rows; `finish` writes the manifest."""

    def __init__(self, directory: Union[str, Path], max_length: int, pad_id: int, vocab_size: int,
                 shard_rows: int = 8192, label_dtype: Optional[str] = None, word_ids: bool = True,
                 metadata: Optional[dict] = None, progress: Optional[ProgressFn] = None):
        if shard_rows < 1:
            raise ConfigError(f"shard_rows must be >= 1, got {shard_rows}")
        if label_dtype not in (None, "int32", "float32"):
            raise ValueError(f"label dtype must be int32 or float32, got {label_dtype}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_length = max_length
        self.pad_id = pad_id
        self.shard_rows = shard_rows
        self.label_dtype = label_dtype
        self.word_ids = word_ids
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.token_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        self.length_dtype = np.uint16 if max_length <= np.iinfo(np.uint16).max else np.int32
        self.word_dtype = np.int16 if max_length <= np.iinfo(np.int16).max else np.int32
        self.shards: List[dict] = []
        self.rows = 0
        self.tokens = 0
        self._pending: List[Tuple[RaggedEncoding, Optional[np.ndarray]]] = []
        self._pending_rows = 0
        self._started = time.perf_counter()

    def add(self, rows: RaggedEncoding, labels: Optional[np.ndarray] = None) -> None:
        if (labels is None) != (self.label_dtype is None):
            raise ValueError("labels must be given exactly when the writer has a label dtype")
        if labels is not None and len(labels) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
        if self.word_ids and rows.word_ids is None:
            raise ValueError("the writer keeps word ids but these rows have none")
        if len(rows) and int(rows.lengths.max()) > self.max_length:
            raise ValueError(f"a row of {int(rows.lengths.max())} tokens exceeds max_length {self.max_length}")
        self._pending.append((rows, labels))
        self._pending_rows += len(rows)
        if self._pending_rows >= self.shard_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write every full shard of the pending rows (and the short rest when `final`)."""
        ragged = RaggedEncoding.concatenate([rows for rows, _ in self._pending])
        labels = np.concatenate([values for _, values in self._pending]) if self.label_dtype is not None else None
        start = 0
        while len(ragged) - start >= self.shard_rows or (final and start < len(ragged)):
            stop = min(start + self.shard_rows, len(ragged))
            self._write_shard(ragged.take(np.arange(start, stop)), None if labels is None else labels[start:stop])
            start = stop
        rest = np.arange(start, len(ragged))
        self._pending = [(ragged.take(rest), None if labels is None else labels[start:])] if len(rest) else []
        self._pending_rows = len(rest)

    def _write_shard(self, rows: RaggedEncoding, labels: Optional[np.ndarray]) -> None:
        arrays = {"input_ids": rows.input_ids.astype(self.token_dtype),
                  "lengths": rows.lengths.astype(self.length_dtype),
                  "first_segment": rows.first_segment.astype(self.length_dtype)}
        if self.word_ids:
            arrays["word_ids"] = rows.word_ids.astype(self.word_dtype)
        if labels is not None:
            arrays["label"] = labels.astype(self.label_dtype)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        name = f"shard-{len(self.shards):06d}.npz"
        (self.directory / name).write_bytes(data)
        self.shards.append({"file": name, "rows": len(rows), "tokens": int(len(rows.input_ids)),
                            "bytes": len(data), "sha256": _sha256(data)})
        self.rows += len(rows)
        self.tokens += int(len(rows.input_ids))
        if self.progress:
            self.progress({"shards": len(self.shards), "rows": self.rows,
                           "seconds": time.perf_counter() - self._started})

    def finish(self, **metadata) -> dict:
        """Write the last (short) shard and the manifest; returns the manifest."""
        if self._pending_rows:
            self._flush(final=True)
        if not self.rows:
            raise DataError(f"{self.metadata.get('source', {}).get('path', self.directory)}: no rows to write")
        columns = list(SEQUENCE_COLUMNS) + (["word_ids"] if self.word_ids else []) + (
            ["label"] if self.label_dtype else [])
        manifest = {"format": FORMAT, "version": VERSION, "rows": self.rows, "tokens": self.tokens,
                    "max_length": self.max_length, "pad_id": self.pad_id, "shard_rows": self.shard_rows,
                    "columns": columns, "label_dtype": self.label_dtype,
                    "token_dtype": np.dtype(self.token_dtype).name, **self.metadata, **metadata,
                    "shards": self.shards}
        temporary = self.directory / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(temporary, self.directory / MANIFEST)  # last: its presence marks the directory complete
        return manifest


@contextlib.contextmanager
def _building(output: Path):
    """Yields a fresh `.partial-*` directory that replaces `output` when the block succeeds (removed otherwise)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".partial-{output.name}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        old = output.parent / f".old-{output.name}-{os.getpid()}"
        if output.exists():
            os.replace(output, old)
        os.replace(partial, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@dataclass
class LineProblem:
    line: int
    reason: str


def iter_lines(path: Union[str, Path], skip_malformed: bool = False,
               skipped: Optional[List[LineProblem]] = None) -> Iterator[Tuple[int, str, int]]:
    """(1-based line, sentence, bytes read so far) of a one-sentence-per-line file, streamed.

    Blank lines (document separators in pre-training corpora) are skipped. A line that is not UTF-8, or holds a tab
    (a TSV given where sentences were expected), is a `DataError` naming path:line, or is skipped and recorded in
    `skipped` with skip_malformed.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err
    consumed = 0
    with handle:
        for number, raw in enumerate(handle, start=1):
            consumed += len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8").strip()
                if "\t" in text:
                    raise ValueError("holds a tab: a TSV needs --task (one sentence per line expected)")
            except UnicodeDecodeError as err:
                problem = f"invalid UTF-8 at byte {err.start}"
            except ValueError as err:
                problem = str(err)
            else:
                if text:
                    yield number, text, consumed
                continue
            if not skip_malformed:
                raise DataError(f"{path}:{number}: {problem}")
            if skipped is not None:
                skipped.append(LineProblem(number, problem))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_shards_from_lines(path: Union[str, Path], tokenizer, output: Union[str, Path],
                            max_length: Optional[int] = None, shard_rows: int = 8192, word_ids: bool = True,
                            skip_malformed: bool = False, progress: Optional[ProgressFn] = None) -> dict:
    """Tokenize a one-sentence-per-line file into shards at `output` (replaced); returns the manifest.

    Streams: memory is one tokenizer chunk plus one shard, whatever the file size.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sentence file not found")
    max_length = max_length or tokenizer.max_length
    total_bytes = path.stat().st_size
    skipped: List[LineProblem] = []
    state = {"bytes": 0}

    def report(event: dict) -> None:
        if progress:
            progress({**event, "bytes": state["bytes"], "total_bytes": total_bytes})

    with _building(Path(output)) as partial:
        writer = ShardWriter(partial, max_length, tokenizer.pad_id, tokenizer.vocab_size, shard_rows,
                             word_ids=word_ids, progress=report,
                             metadata={"source": {"path": str(path), "kind": "lines", "sha256": sha256_of(path)},
                                       "tokenizer": tokenizer_fingerprint(tokenizer)})
        for chunk in _chunks(iter_lines(path, skip_malformed, skipped), ENCODE_CHUNK):
            state["bytes"] = chunk[-1][2]
            writer.add(tokenizer.encode_ragged([text for _, text, _ in chunk], max_length=max_length,
                                               word_ids=word_ids))
        manifest = writer.finish(skipped=len(skipped),
                                 skipped_lines=[[problem.line, problem.reason] for problem in skipped[:100]])
    return manifest


def build_shards_from_tsv(task: str, path: Union[str, Path], tokenizer, output: Union[str, Path],
                          max_length: Optional[int] = None, shard_rows: int = 8192, word_ids: bool = False,
                          skip_malformed: bool = False, progress: Optional[ProgressFn] = None) -> dict:
    """Tokenize a task TSV (its GLUE/CLUE reader, labels included) into shards at `output`; returns the manifest.

    The task reader holds the file's examples in memory while the shards are written (the training run that
    streams the shards does not); unlabeled rows get label -1 (NaN for regression), as in `encode_examples`.
    """
    from ms_nlp_compress.data.glue import get_task

    spec = get_task(task)
    max_length = max_length or tokenizer.max_length
    examples = spec.reader(path, skip_malformed=skip_malformed)
    label_dtype = "float32" if spec.is_regression else "int32"
    missing = math.nan if spec.is_regression else -1
    with _building(Path(output)) as partial:
        writer = ShardWriter(
            partial, max_length, tokenizer.pad_id, tokenizer.vocab_size, shard_rows, label_dtype=label_dtype,
            word_ids=word_ids, metadata={"source": {"path": str(path), "kind": "tsv", "task": spec.name,
                                                    "sha256": sha256_of(Path(path))},
                                         "tokenizer": tokenizer_fingerprint(tokenizer)},
            progress=(lambda event: progress({**event, "total_rows": len(examples)})) if progress else None)
        for start in range(0, len(examples), ENCODE_CHUNK):
            chunk = examples[start:start + ENCODE_CHUNK]
            rows = tokenizer.encode_ragged([e.text_a for e in chunk], [e.text_b for e in chunk], max_length,
                                           word_ids=word_ids)
            labels = np.array([missing if e.label is None else e.label for e in chunk], dtype=label_dtype)
            writer.add(rows, labels)
        return writer.finish(skipped=examples.skipped,
                             skipped_lines=[list(item) for item in examples.skipped_lines[:100]])


def build_shards_from_columns(columns: Dict[str, np.ndarray], output: Union[str, Path], pad_id: int,
                              vocab_size: int, shard_rows: int = 8192) -> dict:
    """Shards from padded in-memory columns (input_ids, attention_mask, token_type_ids; word_ids and label kept
    when present). Rows must be left-aligned: attention_mask ones then zeros, as the tokenizers here produce."""
    input_ids, mask, types = (np.asarray(columns[name]) for name in SEQUENCE_COLUMNS)
    lengths = mask.sum(1).astype(np.int64)
    real = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not np.array_equal(real, mask.astype(bool)):
        raise DataError("attention_mask: rows must be ones then zeros (left-aligned) to be stored unpadded")
    # token_type_ids are 0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding: the zeros before padding count A.
    first_segment = ((types == 0).sum(1) - (mask.shape[1] - lengths)).astype(np.int32)
    columns_index = np.arange(mask.shape[1])[None, :]
    if not np.array_equal(types.astype(bool), real & (columns_index >= first_segment[:, None])):
        raise DataError("token_type_ids: rows must be 0 for [CLS] A [SEP], then 1, then 0 for padding")
    label = columns.get("label")
    with _building(Path(output)) as partial:
        writer = ShardWriter(partial, mask.shape[1], pad_id, vocab_size, shard_rows,
                             label_dtype=None if label is None else np.dtype(label.dtype).name,
                             word_ids="word_ids" in columns, metadata={"source": {"kind": "columns"}})
        word_ids = np.asarray(columns["word_ids"])[real] if "word_ids" in columns else None
        writer.add(RaggedEncoding(input_ids[real], word_ids, np.concatenate([[0], np.cumsum(lengths)]),
                                  first_segment), label)
        return writer.finish()


# --------------------------------------------------------------------------------------------- reading


def read_manifest(directory: Union[str, Path]) -> dict:
    """The validated manifest of a shard directory; every shard file must exist with its recorded size."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no shard manifest (build shards with `msnc data shards`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a valid manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: shard format version {manifest.get('version')}, this code reads {VERSION}; "
                        f"rebuild the shards")
    for key in ("rows", "max_length", "pad_id", "columns", "shards"):
        if key not in manifest:
            raise DataError(f"{path}: key {key!r} is missing")
    shards = manifest["shards"]
    for number, record in enumerate(shards):
        if not isinstance(record, dict) or any(key not in record for key in ("file", "rows", "bytes", "sha256")):
            raise DataError(f"{path}: shard entry {number} needs file, rows, bytes and sha256")
    if sum(record["rows"] for record in shards) != manifest["rows"]:
        raise DataError(f"{path}: shard rows do not add up to {manifest['rows']}")
    for record in shards:
        shard = directory / record["file"]
        if not shard.is_file():
            raise DataError(f"{shard}: shard listed in {path} is missing")
        if shard.stat().st_size != record["bytes"]:
            raise DataError(f"{shard}: {shard.stat().st_size} bytes, the manifest says {record['bytes']} "
                            f"(truncated or replaced; rebuild the shards)")
    return manifest


def load_shard(directory: Path, record: dict) -> Dict[str, np.ndarray]:
    """One shard's arrays, after checking its size and sha256 against the manifest."""
    path = Path(directory) / record["file"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read shard ({err.strerror})") from err
    if len(data) != record["bytes"] or _sha256(data) != record["sha256"]:
        raise DataError(f"{path}: shard is corrupted (size or sha256 differs from {MANIFEST}); rebuild the shards")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable shard ({err})") from err
    lengths = arrays.get("lengths")
    if lengths is None or len(lengths) != record["rows"] or int(lengths.sum()) != len(arrays.get("input_ids", ())):
        raise DataError(f"{path}: shard arrays do not match its {record['rows']} rows")
    return arrays


@dataclass
class _Window:
    rows: RaggedEncoding
    label: Optional[np.ndarray]
    row_ids: np.ndarray  # global row index of each row
    order: np.ndarray  # stream position within the window -> row within the window


class StreamingBatches:
    """A `BatchSource` over a shard directory: deterministic, resumable, rank-sharded, bounded memory.

    Columns: input_ids, attention_mask, token_type_ids (int32 [max_length], or trimmed to the batch's longest row
    with dynamic_padding, like `ArrayBatches`), word_ids (int32 [max_length], if stored), label (if stored) and
    row (int64 global row index, e.g. to draw masks per row).
    """

    def __init__(self, directory: Union[str, Path], order: Sequence[str], batch_size: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 dynamic_padding: bool = False, shuffle_shards: int = 16):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        available = list(self.manifest["columns"]) + ["row"]
        missing = [name for name in order if name not in available]
        if missing:
            raise ConfigError(f"batch columns {missing} not in {self.directory / MANIFEST} (have {available})")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if shuffle_shards < 0:
            raise ConfigError(f"shuffle_shards must be >= 0 (0: all shards in one window), got {shuffle_shards}")
        self.order = tuple(order)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.dynamic_padding = dynamic_padding
        self.size = int(self.manifest["rows"])
        self.max_length = int(self.manifest["max_length"])
        self.pad_id = int(self.manifest["pad_id"])
        self.shards = self.manifest["shards"]
        self.shard_starts = np.concatenate([[0], np.cumsum([record["rows"] for record in self.shards])])
        count = len(self.shards)
        self.shuffle_shards = count if shuffle_shards == 0 else min(shuffle_shards, count)
        global_batch = batch_size * world_size
        if drop_last and self.size < global_batch:
            raise ConfigError(f"{self.size} rows in {self.directory} cannot fill one global batch of {global_batch} "
                              f"({batch_size} per rank x {world_size} ranks)")
        self._cache: Dict[Tuple[int, int], _Window] = {}
        self.windows_loaded = 0  # how many windows were read from disk (tests check the memory bound with it)

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        return self.size // global_batch if self.drop_last else -(-self.size // global_batch)

    def column_layout(self) -> Sequence[Tuple[np.dtype, Tuple[int, ...]]]:
        layout = {name: (np.dtype(np.int32), (self.max_length,)) for name in SEQUENCE_COLUMNS + ("word_ids",)}
        layout["row"] = (np.dtype(np.int64), ())
        if self.manifest.get("label_dtype"):
            layout["label"] = (np.dtype(self.manifest["label_dtype"]), ())
        return [layout[name] for name in self.order]

    # The epoch's stream: windows of shards, each window's rows permuted.
    def windows(self, epoch: int) -> List[np.ndarray]:
        """Shard indices of each window of `epoch`, in stream order."""
        count = len(self.shards)
        if self.shuffle_shards >= count:
            return [np.arange(count)]  # one window in shard order: the ArrayBatches permutation applies as is
        shard_order = (np.random.default_rng([self.seed, epoch, 1]).permutation(count) if self.shuffle
                       else np.arange(count))
        return [shard_order[start:start + self.shuffle_shards] for start in range(0, count, self.shuffle_shards)]

    def _window_order(self, epoch: int, window: int, size: int, single: bool) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        if single:
            return np.random.default_rng([self.seed, epoch]).permutation(size)  # == ArrayBatches.permutation
        return np.random.default_rng([self.seed, epoch, 2, window]).permutation(size)

    def _load_window(self, epoch: int, window: int, shards: np.ndarray, single: bool) -> _Window:
        key = (epoch, window)
        if key in self._cache:
            return self._cache[key]
        parts, labels, row_ids = [], [], []
        for shard in shards:
            arrays = load_shard(self.directory, self.shards[shard])
            lengths = arrays["lengths"].astype(np.int64)
            parts.append(RaggedEncoding(arrays["input_ids"], arrays.get("word_ids"),
                                        np.concatenate([[0], np.cumsum(lengths)]), arrays["first_segment"]))
            if "label" in arrays:
                labels.append(arrays["label"])
            row_ids.append(self.shard_starts[shard] + np.arange(len(lengths), dtype=np.int64))
        rows = RaggedEncoding.concatenate(parts)
        loaded = _Window(rows, np.concatenate(labels) if labels else None, np.concatenate(row_ids),
                         self._window_order(epoch, window, len(rows), single))
        # Batches move forward through the stream, so only the newest window is kept; a batch straddling two
        # windows holds the older one until it is collated.
        self._cache.clear()
        self._cache[key] = loaded
        self.windows_loaded += 1
        return loaded

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, Tuple[np.ndarray, ...]]]:
        """Yields (batch index, this rank's arrays in `order`) from batch `start` on."""
        windows = self.windows(epoch)
        sizes = [int(sum(self.shards[shard]["rows"] for shard in window)) for window in windows]
        window_starts = np.concatenate([[0], np.cumsum(sizes)])
        global_batch = self.batch_size * self.world_size
        for index in range(start, len(self)):
            end = min((index + 1) * global_batch, self.size)
            low = min(index * global_batch + self.rank * self.batch_size, end)
            high = min(low + self.batch_size, end)
            pieces = []
            window = int(np.searchsorted(window_starts, low, side="right") - 1)
            position = low
            while position < high:
                stop = min(high, int(window_starts[window + 1]))
                loaded = self._load_window(epoch, window, windows[window], len(windows) == 1)
                local = loaded.order[position - window_starts[window]:stop - window_starts[window]]
                pieces.append((loaded, local))
                position, window = stop, window + 1
            yield index, self.collate(pieces)

    def collate(self, pieces: List[Tuple[_Window, np.ndarray]]) -> Tuple[np.ndarray, ...]:
        if pieces:
            rows = RaggedEncoding.concatenate([loaded.rows.take(local) for loaded, local in pieces])
        else:  # a rank past the end of the last partial batch (drop_last=False) gets an empty batch
            rows = RaggedEncoding(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64),
                                  np.zeros(0, np.int32))
        longest = int(rows.lengths.max()) if len(rows) else 0
        # Like ArrayBatches: dynamic padding trims the three sequence columns to the longest row (at least 1);
        # word_ids keep max_length.
        width = max(longest, 1) if self.dynamic_padding and len(rows) else self.max_length
        encoding = rows.padded(self.pad_id, width, word_width=self.max_length)
        arrays = {"input_ids": encoding.input_ids, "attention_mask": encoding.attention_mask,
                  "token_type_ids": encoding.token_type_ids, "word_ids": encoding.word_ids}
        if "label" in self.order:
            dtype = np.dtype(self.manifest["label_dtype"])
            arrays["label"] = (np.concatenate([loaded.label[local] for loaded, local in pieces]) if pieces
                               else np.zeros(0, dtype))
        if "row" in self.order:
            arrays["row"] = (np.concatenate([loaded.row_ids[local] for loaded, local in pieces]) if pieces
                             else np.zeros(0, np.int64))
        return tuple(np.ascontiguousarray(arrays[name]) for name in self.order)


# --------------------------------------------------------------------------------------------- the switch


def count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
    return count


def source_key(path: Path, tokenizer, task: Optional[str], max_length: int, shard_rows: int,
               word_ids: bool, skip_malformed: bool) -> str:
    """Names the shards of (file content, tokenizer, settings): a changed input never reuses stale shards."""
    identity = {"format": FORMAT, "version": VERSION, "source_sha256": sha256_of(path),
                "tokenizer": tokenizer_fingerprint(tokenizer), "task": task, "max_length": max_length,
                "shard_rows": shard_rows, "word_ids": word_ids, "skip_malformed": skip_malformed}
    return _sha256(json.dumps(identity, sort_keys=True).encode())


@contextlib.contextmanager
def _exclusive(directory: Path):
    """One builder per shard directory: the other ranks wait, then reuse what it built."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shards_for_file(path: Union[str, Path], tokenizer, shard_dir: Union[str, Path], task: Optional[str] = None,
                    max_length: Optional[int] = None, shard_rows: int = 8192, word_ids: Optional[bool] = None,
                    skip_malformed: bool = False, log: Optional[Callable[[str], None]] = None) -> Path:
    """The shard directory of a TSV (task given) or lines file under `shard_dir`, built once per content + settings.

    Safe to call from every rank at once: a file lock lets one build while the others wait.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training file not found")
    max_length = max_length or tokenizer.max_length
    word_ids = (task is None) if word_ids is None else word_ids  # corpora keep word ids for whole-word masking
    key = source_key(path, tokenizer, task, max_length, shard_rows, word_ids, skip_malformed)
    shard_dir = Path(shard_dir)
    output = shard_dir / f"{path.stem}-{key[:16]}"
    with _exclusive(shard_dir):
        if (output / MANIFEST).is_file():
            return output
        started = time.perf_counter()
        if log:
            log(f"tokenizing {path} into shards at {output}")
        if task is None:
            manifest = build_shards_from_lines(path, tokenizer, output, max_length, shard_rows, word_ids,
                                               skip_malformed)
        else:
            manifest = build_shards_from_tsv(task, path, tokenizer, output, max_length, shard_rows, word_ids,
                                             skip_malformed)
        if log:
            log(f"{manifest['rows']} rows in {len(manifest['shards'])} shards, "
                f"{time.perf_counter() - started:.1f} s")
    return output


def _read_columns(path: Path, tokenizer, task: Optional[str], max_length: int, skip_malformed: bool,
                  word_ids: bool) -> Dict[str, np.ndarray]:
    """A whole text file tokenized into padded in-memory columns (the memory mode)."""
    if task is not None:
        from ms_nlp_compress.data.glue import get_task
        from ms_nlp_compress.data.mindrecord import encode_examples

        spec = get_task(task)
        return encode_examples(spec.reader(path, skip_malformed=skip_malformed), tokenizer, max_length,
                               spec.is_regression)
    parts = [tokenizer.encode_ragged([text for _, text, _ in chunk], max_length=max_length, word_ids=word_ids)
             for chunk in _chunks(iter_lines(path, skip_malformed), ENCODE_CHUNK)]
    if not parts:
        raise DataError(f"{path}: no sentences")
    encoding = RaggedEncoding.concatenate(parts).padded(tokenizer.pad_id, max_length)
    columns = {name: getattr(encoding, name) for name in SEQUENCE_COLUMNS}
    if word_ids:
        columns["word_ids"] = encoding.word_ids
    return columns


def build_batch_source(source, order: Sequence[str], batch_size: int, seed: int, rank: int = 0,
                       world_size: int = 1, dynamic_padding: bool = False, *, stream: str = "auto",
                       shuffle: bool = True, drop_last: bool = True, shuffle_shards: int = 16,
                       shard_rows: int = 8192, shard_dir: Union[str, Path, None] = None, tokenizer=None,
                       task: Optional[str] = None, max_length: Optional[int] = None, skip_malformed: bool = False,
                       log: Optional[Callable[[str], None]] = None):
    """The training `BatchSource` for `source`, in memory (`ArrayBatches`) or streamed (`StreamingBatches`).

    source:
      - a dict of column arrays (already tokenized): memory and auto give ArrayBatches; disk writes them to shards
        under `shard_dir` and streams them (the order is then the windowed one unless shuffle_shards is 0).
      - a shard directory (has manifest.json): streamed; memory loads every shard as one window, which gives the
        ArrayBatches order.
      - a text file: a task TSV when `task` is given, else one sentence per line. memory tokenizes it into
        ArrayBatches; disk builds shards under `shard_dir` (once per content and settings, see `shards_for_file`);
        auto streams when the padded arrays would exceed AUTO_MEMORY_BYTES.
    """
    if stream not in STREAM_MODES:
        raise ConfigError(f"data.stream must be one of {', '.join(STREAM_MODES)}, got {stream!r}")
    from ms_nlp_compress.train.batches import ArrayBatches

    common = dict(shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last,
                  dynamic_padding=dynamic_padding)
    if isinstance(source, dict):
        if stream != "disk":
            return ArrayBatches(source, order, batch_size, **common)
        if shard_dir is None:
            raise ConfigError("data.shard_dir: needed to stream in-memory columns from disk")
        if tokenizer is None:
            raise ConfigError("a tokenizer is needed to write in-memory columns to shards (pad id, vocab size)")
        output = Path(shard_dir) / f"columns-rank{rank}"
        build_shards_from_columns(source, output, tokenizer.pad_id, tokenizer.vocab_size, shard_rows)
        return StreamingBatches(output, order, batch_size, shuffle_shards=shuffle_shards, **common)
    path = Path(source)
    if (path / MANIFEST).is_file() or path.is_dir():
        return StreamingBatches(path, order, batch_size, shuffle_shards=0 if stream == "memory" else shuffle_shards,
                                **common)
    if tokenizer is None:
        raise ConfigError(f"{path}: a tokenizer is needed to read a text file")
    if not path.is_file():
        raise DataError(f"{path}: training file not found")
    max_length = max_length or tokenizer.max_length
    word_ids = task is None and "word_ids" in order
    if stream == "auto":
        padded_bytes = count_lines(path) * max_length * 4 * len(SEQUENCE_COLUMNS)
        stream = "disk" if padded_bytes > AUTO_MEMORY_BYTES else "memory"
        if log:
            log(f"data.stream auto: {path} -> {stream} (padded arrays ~{padded_bytes / 2**20:.0f} MiB)")
    if stream == "memory":
        columns = _read_columns(path, tokenizer, task, max_length, skip_malformed, word_ids)
        return ArrayBatches(columns, order, batch_size, **common)
    if shard_dir is None:
        raise ConfigError("data.shard_dir: needed to stream a file from disk")
    directory = shards_for_file(path, tokenizer, shard_dir, task, max_length, shard_rows, None, skip_malformed,
                                log)
    return StreamingBatches(directory, order, batch_size, shuffle_shards=shuffle_shards, **common)


def batch_source_from_config(config, source, order: Sequence[str], rank: int, world_size: int,
                             output_dir: Union[str, Path], tokenizer=None, task: Optional[str] = None,
                             log: Optional[Callable[[str], None]] = None):
    """`build_batch_source` with the experiment's settings: data.stream / shard_rows / shuffle_shards / shard_dir,
    data.batch_size and max_length, runtime.seed, train.padding; shards default to `<output_dir>/shards`."""
    from ms_nlp_compress import paths

    data = config.data
    if data.shard_dir is None:
        shard_dir = Path(output_dir) / "shards"
    elif data.shard_dir.startswith("cache:"):  # the same `cache:` prefix as the other paths of a config
        shard_dir = paths.cache_dir() / data.shard_dir[len("cache:"):]
    else:
        shard_dir = Path(data.shard_dir).expanduser()
    return build_batch_source(source, order, data.batch_size, config.runtime.seed, rank, world_size,
                              config.train.padding == "dynamic", stream=data.stream, shuffle_shards=data.shuffle_shards,
                              shard_rows=data.shard_rows, shard_dir=shard_dir, tokenizer=tokenizer, task=task,
                              max_length=data.max_length, skip_malformed=data.skip_malformed, log=log)
