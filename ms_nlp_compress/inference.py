"""Batched inference over texts with one compiled graph for every batch shape.

Texts are sorted by length so each batch pads only to its own longest row (far less work than padding everything
to max_length), the cell's inputs are declared dynamic so new (batch, length) shapes do not recompile, and results
come back in the original order.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn


def declare_dynamic_inputs(cell: nn.Cell, count: int = 3) -> None:
    """(batch, length) int32 inputs of any size: one compile instead of one per shape."""
    dynamic = Tensor(shape=[None, None], dtype=ms.int32)
    cell.set_inputs(*([dynamic] * count))


def run_batched(cell: nn.Cell, tokenizer, texts: Sequence, text_pairs: Optional[Sequence] = None,
                batch_size: int = 64, max_length: int = 128, output_index: Optional[int] = 0,
                progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Run `cell(input_ids, attention_mask, token_type_ids)` over all texts; returns stacked numpy outputs.

    `output_index` picks one element when the cell returns a tuple (None: the cell returns a single tensor).
    Every text is kept: the last partial batch is run, not dropped.
    """
    if not len(texts):
        raise ValueError("no texts to run")
    pairs = list(text_pairs) if text_pairs is not None else [None] * len(texts)
    encodings = [tokenizer.encode(text, pair, max_length=max_length, pad=False) for text, pair in zip(texts, pairs)]
    order = np.argsort([len(e.input_ids) for e in encodings], kind="stable")
    cell.set_train(False)
    declare_dynamic_inputs(cell)
    outputs: List[Optional[np.ndarray]] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = max(len(encodings[i].input_ids) for i in rows)
        ids = np.full((len(rows), length), tokenizer.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        types = np.zeros((len(rows), length), np.int32)
        for r, i in enumerate(rows):
            n = len(encodings[i].input_ids)
            ids[r, :n] = encodings[i].input_ids
            mask[r, :n] = encodings[i].attention_mask
            types[r, :n] = encodings[i].token_type_ids
        result = cell(Tensor(ids), Tensor(mask), Tensor(types))
        if output_index is not None and isinstance(result, (tuple, list)):
            result = result[output_index]
        values = result.asnumpy()
        for r, i in enumerate(rows):
            outputs[i] = values[r]
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return np.stack(outputs)
