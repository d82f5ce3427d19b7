"""Deterministic, resumable, rank-sharded batches over in-memory columns.

The order of epoch e is a permutation drawn from (seed, e) alone, so a resumed run regenerates exactly the batches
it had not yet seen, from nothing but (epoch, batch index). For data parallel each global batch of
`batch_size * world_size` rows is cut into consecutive per-rank slices: the union over ranks is the global batch a
single process with `batch_size * world_size` would see, which is what makes the 2-rank test comparable.
"""
from __future__ import annotations

from typing import Dict, Iterator, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

from ms_nlp_compress.errors import ConfigError

SEQUENCE_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


@runtime_checkable
class BatchSource(Protocol):
    """What the Trainer reads batches from: in-memory (`ArrayBatches`) or streamed from disk shards.

    Contract: `epoch(e, start)` yields (batch index, this rank's arrays in `order`) for batch indices start, start+1,
    ... of epoch e, and is a pure function of (seed, e, index), so a resumed run regenerates exactly the batches an
    uninterrupted run would have seen next. `__len__` is batches per epoch, the same on every rank.
    `dynamic_padding` says whether batches are trimmed to their longest row (one dynamic-shape graph);
    `column_layout()` gives, per column in `order`, (numpy dtype, shape of one row), for declaring those inputs.
    """

    order: Tuple[str, ...]
    dynamic_padding: bool

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, Tuple[np.ndarray, ...]]]: ...

    def column_layout(self) -> Sequence[Tuple[np.dtype, Tuple[int, ...]]]: ...


class ArrayBatches:
    def __init__(self, columns: Dict[str, np.ndarray], order: Sequence[str], batch_size: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 dynamic_padding: bool = False):
        sizes = {name: len(values) for name, values in columns.items()}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"columns have different lengths: {sizes}")
        missing = [name for name in order if name not in columns]
        if missing:
            raise ConfigError(f"batch columns {missing} not in the data (have {sorted(columns)})")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.columns = columns
        self.order = tuple(order)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.dynamic_padding = dynamic_padding
        self.size = next(iter(sizes.values()))
        global_batch = batch_size * world_size
        if drop_last and self.size < global_batch:
            raise ConfigError(f"{self.size} examples cannot fill one global batch of {global_batch} "
                              f"({batch_size} per rank x {world_size} ranks)")

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        global_batch = self.batch_size * self.world_size
        return self.size // global_batch if self.drop_last else -(-self.size // global_batch)

    def column_layout(self) -> Sequence[Tuple[np.dtype, Tuple[int, ...]]]:
        return [(self.columns[name].dtype, tuple(self.columns[name].shape[1:])) for name in self.order]

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Tuple[int, Tuple[np.ndarray, ...]]]:
        """Yields (batch index, this rank's arrays in `order`) from batch `start` on."""
        permutation = self.permutation(epoch)
        global_batch = self.batch_size * self.world_size
        for index in range(start, len(self)):
            rows = permutation[index * global_batch:(index + 1) * global_batch]
            rows = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield index, self.collate(rows)

    def collate(self, rows: np.ndarray) -> Tuple[np.ndarray, ...]:
        arrays = {name: self.columns[name][rows] for name in self.order}
        if self.dynamic_padding and "attention_mask" in arrays and len(rows):
            length = max(int(arrays["attention_mask"].sum(1).max()), 1)
            for name in SEQUENCE_COLUMNS:
                if name in arrays:
                    arrays[name] = arrays[name][:, :length]
        return tuple(np.ascontiguousarray(arrays[name]) for name in self.order)
