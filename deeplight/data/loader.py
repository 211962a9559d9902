"""Streaming batches from hashed Parquet splits: record batches straight to tensors, bounded shuffle buffer.

    loader = SplitLoader("data/hashed", "train", batch_size=2048, shuffle=True, seed=0)
    for ids, labels in loader.epoch(0):      # ids int64 (B, F), labels float32 (B,)
        ...
    loader.rows, loader.num_batches()

Memory is bounded by `buffer_rows` (plus one Parquet record batch), whatever the split size. The order is a
pure function of (seed, epoch), so an interrupted epoch can be replayed to the same position (`skip_batches`).

Data-parallel ranks read shards: `SplitLoader(..., shard=(rank, world_size))` holds the contiguous rows
`shard_range(rows, rank, world_size)` of the split in file order (shard sizes differ by at most one row) and reads
only the Parquet row groups that overlap them, so each rank reads ~1/world_size of the data. Rows, not whole row
groups or files, so that shards stay balanced when a split has fewer row groups than ranks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from deeplight.base.errors import DeeplightError
from deeplight.base.files import read_json

SPLITS = ("train", "valid", "test")


def read_manifest(data_dir: str | Path) -> dict:
    """The hashed dataset's manifest; a clear error when `data_dir` is not a hashed dataset."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise DeeplightError(f"{data_dir}: not a hashed dataset (no manifest.json; run `deeplight hash` first)")
    manifest = read_json(path)
    for key in ("field_names", "field_sizes", "rows"):
        if key not in manifest:
            raise DeeplightError(f"{path}: missing key {key!r}")
    return manifest


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    split_dir = Path(data_dir) / split
    if not split_dir.is_dir():
        raise DeeplightError(f"{data_dir}: missing split {split!r} (expected a directory {split_dir})")
    return sorted(split_dir.glob("*.parquet"))


def shard_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of shard `rank` of `rows` rows split into `world_size` contiguous, balanced shards.

        >>> [shard_range(10, r, 3) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    if not 0 <= rank < world_size:
        raise DeeplightError(f"shard {rank} of {world_size}: want 0 <= rank < world size")
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def check_both_classes(data_dir: str | Path, splits: tuple[str, ...] = ("train", "valid")) -> None:
    """Fail before training when a split's labels are all one class: the loss has nothing to learn and the valid
    AUC that early stopping needs is undefined. Reads label batches until both classes are seen (usually one)."""
    for split in splits:
        seen: set[float] = set()
        for path in split_files(data_dir, split):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=["label"]):
                seen.update(np.unique(batch.column(0).to_numpy(zero_copy_only=False)).tolist())
                if len(seen) > 1:
                    break
            if len(seen) > 1:
                break
        if len(seen) < 2:
            what = f"only label {int(next(iter(seen)))}" if seen else "no rows"
            raise DeeplightError(f"{data_dir}: the {split} split has {what}; training needs clicks and non-clicks "
                                 "in train and valid (AUC needs both classes)")


class SplitLoader:
    """Batches of (ids, labels) from one split of a hashed dataset."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int = 2048, shuffle: bool = False,
                 seed: int = 0, buffer_rows: int = 262_144, read_rows: int = 65_536,
                 shard: tuple[int, int] = (0, 1)):
        manifest = read_manifest(data_dir)
        self.fields: list[str] = list(manifest["field_names"])
        self.files = split_files(data_dir, split)
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_rows = max(buffer_rows, batch_size)
        self.read_rows = read_rows
        file_rows = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        self.total_rows = sum(file_rows)
        expected = manifest["rows"].get(split)
        if expected is not None and expected != self.total_rows:
            raise DeeplightError(f"{data_dir}/{split}: manifest says {expected} rows, files hold {self.total_rows}")
        self.pieces = _pieces(file_rows, *shard_range(self.total_rows, *shard))
        self.rows = sum(end - start for _, start, end in self.pieces)
        for f in self.files[:1]:
            names = pq.ParquetFile(f).schema_arrow.names
            missing = [c for c in [*self.fields, "label"] if c not in names]
            if missing:
                raise DeeplightError(f"{f}: columns {missing} named by the manifest are missing (schema mismatch)")

    def num_batches(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def _chunks(self, rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = rng.permutation(len(self.pieces)) if rng is not None else range(len(self.pieces))
        for i in order:
            file_index, start, end = self.pieces[i]
            for rb in _read_rows(pq.ParquetFile(self.files[file_index]), start, end, self.read_rows,
                                 [*self.fields, "label"]):
                ids = np.empty((rb.num_rows, len(self.fields)), dtype=np.int64)
                for j in range(len(self.fields)):
                    ids[:, j] = rb.column(j).to_numpy(zero_copy_only=False)
                yield ids, rb.column(len(self.fields)).to_numpy(zero_copy_only=False).astype(np.float32)

    def _buffered(self, rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Fill a buffer up to `buffer_rows`, shuffle it, emit whole batches, carry the remainder."""
        ids_buf: list[np.ndarray] = []
        y_buf: list[np.ndarray] = []
        held = 0
        for ids, y in self._chunks(rng):
            ids_buf.append(ids)
            y_buf.append(y)
            held += len(y)
            if held >= self.buffer_rows:
                rest_ids, rest_y = yield from self._emit(ids_buf, y_buf, rng, final=False)
                ids_buf, y_buf, held = [rest_ids], [rest_y], len(rest_y)
        if held:
            yield from self._emit(ids_buf, y_buf, rng, final=True)

    def _emit(self, ids_buf: list[np.ndarray], y_buf: list[np.ndarray], rng: np.random.Generator | None,
              final: bool):
        ids_all, y_all = np.concatenate(ids_buf), np.concatenate(y_buf)
        if rng is not None:
            perm = rng.permutation(len(y_all))
            ids_all, y_all = ids_all[perm], y_all[perm]
        end = len(y_all) if final else len(y_all) // self.batch_size * self.batch_size
        for s in range(0, end, self.batch_size):
            yield ids_all[s:s + self.batch_size], y_all[s:s + self.batch_size]
        return ids_all[end:], y_all[end:]

    def epoch(self, epoch: int = 0, skip_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the split; the order depends only on (seed, epoch). Skipped batches are not yielded."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        for k, (ids, y) in enumerate(self._buffered(rng)):
            if k >= skip_batches:
                yield torch.from_numpy(ids), torch.from_numpy(y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


def _pieces(file_rows: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """(file index, first row, end row) of each file's part of the global rows [start, end). Without sharding
    every file is one piece, empty ones included (the shuffled file order stays what it always was)."""
    if start == 0 and end == sum(file_rows):
        return [(i, 0, n) for i, n in enumerate(file_rows)]
    pieces, offset = [], 0
    for i, n in enumerate(file_rows):
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            pieces.append((i, lo - offset, hi - offset))
        offset += n
    return pieces


def _read_rows(pf: pq.ParquetFile, start: int, end: int, batch_rows: int, columns: list[str]):
    """Record batches of rows [start, end) of one file, reading only the row groups that overlap them."""
    meta = pf.metadata
    if start == 0 and end == meta.num_rows:
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
        return
    groups, first, offset = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if offset < end and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return
    position = first
    for rb in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        lo, hi = max(start - position, 0), min(end - position, rb.num_rows)
        if lo < hi:
            yield rb.slice(lo, hi - lo)
        position += rb.num_rows
