"""TSV -> MindRecord conversion and the MindSpore dataset pipelines that feed training and evaluation.

Tokenising once into MindRecord keeps the Python tokenizer out of the training loop (MindDataset reads ~37k
examples/s here, far above the training speed) and gives per-rank sharding for free.

Columns: input_ids, token_type_ids, attention_mask (int32 [max_length]) and label (int32 class index, or float32
for regression). Unlabeled rows (GLUE test files) get label -1 (classification) or NaN (regression).

Batching rules:
- Evaluation never drops the last partial batch: 10 examples in batches of 4 give 4, 4, 2.
- Training usually drops it (static shapes avoid a graph recompile for the odd last batch; the reference TinyBERT
  loop also skips it). `drop_remainder=None` means exactly that: drop when shuffling, keep otherwise.
- Sharding across ranks: MindSpore's distributed sampler makes every rank the same size by repeating examples,
  which would count some examples twice in a distributed evaluation. When the remainder is kept and the data is not
  shuffled, the dataset is instead padded with dummy rows (attention_mask all 0, label -1 or NaN) so each example is
  seen exactly once; metric code must ignore rows whose label is -1 / NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ms_nlp_compress.data.glue import Example, get_task
from ms_nlp_compress.errors import DataError

MODEL_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")
ALL_COLUMNS = MODEL_COLUMNS + ("label",)
UNLABELED_CLASS = -1
_ENCODE_CHUNK = 1024  # examples tokenised per call: bounds the memory of Python lists on big tasks like QQP


def encode_examples(examples: Sequence[Example], tokenizer, max_length: int,
                    is_regression: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """Tokenise examples into column arrays: three int32 [N, max_length] and label [N] (int32 or float32).

    This one helper feeds both the MindRecord writer and the in-memory GeneratorDataset, so the two paths can never
    encode differently.
    """
    if is_regression is None:
        is_regression = any(isinstance(example.label, float) for example in examples)
    columns: Dict[str, List[np.ndarray]] = {name: [] for name in MODEL_COLUMNS}
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[start:start + _ENCODE_CHUNK]
        # The batch API without word ids (no column here uses them): tokenizers' fastest path, the same ids.
        encoded = tokenizer.encode_ragged([example.text_a for example in chunk], [example.text_b for example in chunk],
                                          max_length=max_length, word_ids=False).padded(tokenizer.pad_id, max_length)
        for name in MODEL_COLUMNS:
            columns[name].append(getattr(encoded, name))
    arrays = {name: (np.concatenate(parts) if parts else np.zeros((0, max_length), np.int32))
              for name, parts in columns.items()}
    if is_regression:
        arrays["label"] = np.array([math.nan if e.label is None else e.label for e in examples], dtype=np.float32)
    else:
        arrays["label"] = np.array([UNLABELED_CLASS if e.label is None else e.label for e in examples], dtype=np.int32)
    return arrays


@dataclass
class ConversionReport:
    files: List[Path]
    examples: int
    skipped: int
    skipped_lines: list = field(default_factory=list)


def convert_tsv_to_mindrecord(task: str, tsv_path, tokenizer, out_path, max_length: int, shard_num: int = 1,
                              skip_malformed: bool = False) -> ConversionReport:
    """Read a task TSV with its GLUE/CLUE reader, tokenise it and write MindRecord file(s).

    With shard_num > 1 MindSpore writes `out_path0 .. out_path{N-1}`; pass any one of them (or `out_path` itself)
    to `build_dataset`, which loads the whole group.
    """
    from mindspore.mindrecord import FileWriter

    spec = get_task(task)
    examples = spec.reader(tsv_path, skip_malformed=skip_malformed)
    if not examples:
        raise DataError(f"{tsv_path}: no examples to convert")
    arrays = encode_examples(examples, tokenizer, max_length, spec.is_regression)
    schema = {name: {"type": "int32", "shape": [max_length]} for name in MODEL_COLUMNS}
    schema["label"] = {"type": "float32" if spec.is_regression else "int32"}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = FileWriter(file_name=str(out_path), shard_num=shard_num, overwrite=True)
    writer.add_schema(schema, f"{spec.name}_max_length_{max_length}")
    for start in range(0, len(examples), _ENCODE_CHUNK):
        rows = [{name: arrays[name][index] for name in ALL_COLUMNS}
                for index in range(start, min(start + _ENCODE_CHUNK, len(examples)))]
        writer.write_raw_data(rows)
    writer.commit()
    files = [out_path] if shard_num == 1 else [Path(f"{out_path}{index}") for index in range(shard_num)]
    return ConversionReport(files, len(examples), examples.skipped, list(examples.skipped_lines))


def _resolve_mindrecord(path) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    first_shard = Path(f"{path}0")
    if first_shard.is_file():
        return first_shard
    raise DataError(f"MindRecord file not found: {path}")


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _padding_row(schema: Dict[str, dict]) -> Dict[str, Union[bytes, int, float]]:
    """A dummy row in the form MindDataset's `padded_sample` wants (arrays as raw bytes)."""
    row = {}
    for name, spec in schema.items():
        if "shape" in spec:
            row[name] = np.zeros(spec["shape"], dtype=np.dtype(spec["type"])).tobytes()
        elif spec["type"].startswith("float"):
            row[name] = math.nan
        else:
            row[name] = UNLABELED_CLASS
    return row


def build_dataset(mindrecord_path, batch_size: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                  drop_remainder: Optional[bool] = None, columns: Optional[Sequence[str]] = None):
    """A batched `MindDataset` for this rank's shard. drop_remainder=None: drop only when shuffling (training)."""
    import mindspore.dataset as ds
    from mindspore.mindrecord import FileReader

    _check_batching(batch_size, rank, world_size)
    path = _resolve_mindrecord(mindrecord_path)
    reader = FileReader(str(path))
    try:
        schema, total = reader.schema(), reader.len()
    finally:
        reader.close()
    columns = list(columns or [name for name in ALL_COLUMNS if name in schema])
    missing = [name for name in columns if name not in schema]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; the file has {sorted(schema)}")
    drop = shuffle if drop_remainder is None else drop_remainder
    options = {}
    if world_size > 1:
        options.update(num_shards=world_size, shard_id=rank)
        padding = (-total) % world_size
        if padding and not drop and not shuffle:
            options.update(padded_sample=_padding_row(schema), num_padded=padding)
    dataset = ds.MindDataset(str(path), columns_list=columns, shuffle=shuffle, **options)
    return dataset.batch(batch_size, drop_remainder=drop)


class _ArraySource:
    """Random-access source for GeneratorDataset: row i of every column array."""

    def __init__(self, arrays: Dict[str, np.ndarray], columns: Sequence[str]):
        self._columns = [arrays[name] for name in columns]

    def __getitem__(self, index):
        return tuple(column[index] for column in self._columns)

    def __len__(self):
        return len(self._columns[0])


def build_dataset_from_examples(examples: Sequence[Example], tokenizer, max_length: int, batch_size: int,
                                shuffle: bool = False, rank: int = 0, world_size: int = 1,
                                drop_remainder: Optional[bool] = None, is_regression: Optional[bool] = None,
                                columns: Optional[Sequence[str]] = None):
    """The in-memory twin of `build_dataset` (same columns, batching and sharding rules) through GeneratorDataset.

    One worker and no multiprocessing: more workers made GeneratorDataset 10x slower on these machines.
    """
    import mindspore.dataset as ds

    _check_batching(batch_size, rank, world_size)
    arrays = encode_examples(examples, tokenizer, max_length, is_regression)
    columns = list(columns or ALL_COLUMNS)
    drop = shuffle if drop_remainder is None else drop_remainder
    options = {}
    if world_size > 1:
        options.update(num_shards=world_size, shard_id=rank)
        padding = (-len(examples)) % world_size
        if padding and not drop and not shuffle:
            fill = {"label": arrays["label"].dtype.type(math.nan if arrays["label"].dtype.kind == "f"
                                                         else UNLABELED_CLASS)}
            arrays = {name: np.concatenate([values, np.full((padding,) + values.shape[1:], fill.get(name, 0),
                                                            dtype=values.dtype)])
                      for name, values in arrays.items()}
    dataset = ds.GeneratorDataset(_ArraySource(arrays, columns), column_names=columns, shuffle=shuffle,
                                  num_parallel_workers=1, python_multiprocessing=False, **options)
    return dataset.batch(batch_size, drop_remainder=drop)
