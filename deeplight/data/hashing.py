"""The `hash` step: fit a FeatureMap on the train split, then write every split's per-field ids.

`deeplight hash` = `hash_dataset` (fit + apply); `deeplight apply-features` = `apply_feature_map` with a saved map
(other data through a model's own features). Output: OUT/{train,valid,test}/part-NNNNN.parquet (one int32 column
per field, the label), OUT/feature_map.json and OUT/dataset.json (the manifest the loader and models check).
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deeplight.base.arrow import from_numpy, to_numpy, valid_mask
from deeplight.base.errors import DeeplightError
from deeplight.base.files import atomic_output_dir, fingerprint_files, read_json, write_json
from deeplight.base.progress import progress
from deeplight.data.feature_map import (FeatureMap, FieldSpec, _check_columns, _field_keys, _is_int, _is_string_type, _valid_keys, _values)
from deeplight.data.schema import DatasetSchema, get_schema

SPLITS = ("train", "valid", "test")
BATCH_ROWS = 262_144  # rows per record batch read; bounds memory
READ_THREADS = min(2, os.cpu_count() or 1)  # row groups read and mapped at once
PART_ROWS = 1_048_576  # a new output part file after this many rows
# Output Parquet, uncompressed: delta/bit-packed ids are ~1/3 the size of plain int32 for vocab ids and cost
# ~60% of the CPU of dictionary pages to write; the 0/1 label is dictionary encoded.
_ID_ENCODING = "DELTA_BINARY_PACKED"
_T = TypeVar("_T")


# --- fitting ---------------------------------------------------------------------------------------------

class _Counts:
    """key -> count for one field, merged across batches; compacted when pending keys pile up."""

    def __init__(self) -> None:
        self.keys: list[pa.Array] = []
        self.counts: list[np.ndarray] = []
        self.pending = 0
        self.compacted = 0

    def add(self, keys: pa.Array, counts: np.ndarray) -> None:
        self.keys.append(keys.cast(pa.string()))
        self.counts.append(counts.astype(np.int64, copy=False))
        self.pending += len(keys)
        if self.pending > max(1 << 20, 2 * self.compacted):
            self.compact()

    def compact(self) -> tuple[pa.Array, np.ndarray]:
        """(distinct keys, their summed counts)."""
        keys = pa.concat_arrays(self.keys) if self.keys else pa.nulls(0, pa.string())
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, np.int64)
        enc = pc.dictionary_encode(keys)  # also when there is one part: a Parquet dictionary may repeat a value
        # float64 sums are exact below 2^53, far above any row count
        counts = np.bincount(to_numpy(enc.indices), weights=counts, minlength=len(enc.dictionary)).astype(np.int64)
        keys = enc.dictionary
        self.keys, self.counts, self.pending, self.compacted = [keys], [counts], len(keys), len(keys)
        return keys, counts

    def vocab(self, min_count: int) -> list[str]:
        keys, counts = self.compact()
        keep = from_numpy(np.flatnonzero(counts >= min_count))
        t = pa.Table.from_arrays([keys.take(keep), from_numpy(counts).take(keep)], names=["key", "count"])
        order = pc.sort_indices(t, sort_keys=[("count", "descending"), ("key", "ascending")])
        return t["key"].take(order).to_pylist()


def fit_feature_map(input_dir: str, buckets: int | None = None, min_count: int | None = None) -> FeatureMap:
    """A feature map for the ingested dataset in `input_dir`; vocab mode counts the train split only."""
    if (buckets is None) == (min_count is None):
        raise DeeplightError("give exactly one of buckets (stable hashing) or min_count (vocabulary)")
    root, schema, splits = _ingested_layout(input_dir)
    if "train" not in splits:
        raise DeeplightError(f"{root}: no train split directory ({root / 'train'}) to fit the feature map on")
    if buckets is not None:
        return FeatureMap.hashed(schema.name, buckets)
    _check_min_count(min_count)
    if _count_rows(splits["train"]) == 0:
        raise DeeplightError(f"{root / 'train'}: the train split is empty; a vocabulary fitted on it would map every "
                             "value to unknown (ingest more rows, change --split, or use --buckets)")
    return _vocab_map(schema, _count_train_values(schema, splits["train"]), min_count)


def _check_min_count(min_count: object) -> None:
    if not _is_int(min_count) or min_count < 1:
        raise DeeplightError(f"min_count must be an integer >= 1, got {min_count!r}")


def _count_train_values(schema: DatasetSchema, files: list[Path]) -> list[_Counts]:
    """Per feature field (schema order): how often each key occurs in `files` (the train split)."""
    specs = [FieldSpec(f.name, f.source, f.kind, 0, []) for f in schema.feature_fields]
    counters = [_Counts() for _ in specs]

    def count(batch: pa.RecordBatch, path: Path, start: int) -> list[tuple[pa.Array, np.ndarray]]:
        out = []
        for f in specs:
            keys, codes, valid = _field_keys(f, batch.column(f.source))
            counts = np.bincount(codes if valid is None else codes[valid], minlength=len(keys))
            keep = np.flatnonzero((counts > 0) & _valid_keys(keys))
            out.append((keys.take(from_numpy(keep)), counts[keep]))
        return out

    with progress(total=_count_rows(files), unit="rows", desc="fit vocab") as bar:
        for _, batches in _map_row_groups(files, schema, specs, count):
            for rows, per_field in batches:
                for counter, (keys, counts) in zip(counters, per_field):
                    counter.add(keys, counts)
                bar.update(rows)
    return counters


def _vocab_map(schema: DatasetSchema, counters: list[_Counts], min_count: int) -> FeatureMap:
    """The vocabulary feature map from whole-train-split counts: min_count applied here, after any merge."""
    specs = [FieldSpec(f.name, f.source, f.kind, 0, []) for f in schema.feature_fields]
    for f, counter in zip(specs, counters):
        f.vocab = counter.vocab(min_count)
        f.size = 2 + len(f.vocab)
        if f.size >= 2**31:
            raise DeeplightError(f"field {f.name!r}: vocabulary of {len(f.vocab)} values does not fit int32 ids")
    return FeatureMap(schema.name, "vocab", None, min_count, specs)


# --- per-file counts, merged (the fan-out pipeline) ------------------------------------------------------

COUNTS_FILE = "value_counts.parquet"


def write_value_counts(input_dir: str, out_dir: str) -> dict:
    """Count the keys of every feature field in the train split of one ingested part (one input file) and write
    them to OUT/value_counts.parquet (field, key, count), with no threshold: `feature_map_from_counts` sums the
    parts and applies min_count over the whole train split. Returns {"dataset", "rows", "keys"}."""
    root, schema, splits = _ingested_layout(input_dir)
    files = splits.get("train", [])
    counters = _count_train_values(schema, files) if files else [_Counts() for _ in schema.feature_fields]
    tables = []
    for j, counter in enumerate(counters):
        keys, counts = counter.compact()
        tables.append(pa.table({"field": pa.array(np.full(len(keys), j, np.int32)), "key": keys,
                                "count": from_numpy(counts)}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.concat_tables(tables)
    pq.write_table(table, out / COUNTS_FILE)
    summary = {"dataset": schema.name, "rows": _count_rows(files), "keys": table.num_rows}
    write_json(out / "counts.json", summary)
    return summary


def feature_map_from_counts(count_dirs: list[str], buckets: int | None = None,
                            min_count: int | None = None) -> FeatureMap:
    """The feature map `fit_feature_map` would fit on the union of the parts' train splits, from their
    `write_value_counts` outputs (any order): counts summed per key, then min_count, then the usual id order
    (count descending, key ascending), so ids and fingerprint are identical."""
    if (buckets is None) == (min_count is None):
        raise DeeplightError("give exactly one of buckets (stable hashing) or min_count (vocabulary)")
    if not count_dirs:
        raise DeeplightError("no per-file value counts to merge")
    summaries = [read_json(Path(d) / "counts.json") for d in count_dirs]
    datasets = {s["dataset"] for s in summaries}
    if len(datasets) != 1:
        raise DeeplightError(f"value counts of different datasets: {sorted(datasets)}")
    schema = get_schema(datasets.pop())
    if buckets is not None:
        return FeatureMap.hashed(schema.name, buckets)
    _check_min_count(min_count)
    if sum(s["rows"] for s in summaries) == 0:
        raise DeeplightError(f"the train split of all {len(count_dirs)} files is empty; a vocabulary fitted on it "
                             "would map every value to unknown (ingest more rows, change --split, or use --buckets)")
    counters = [_Counts() for _ in schema.feature_fields]
    for d in count_dirs:
        path = Path(d) / COUNTS_FILE
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DeeplightError(f"{path}: not readable value counts ({e})") from None
        fields, keys = to_numpy(table["field"].combine_chunks()), table["key"].combine_chunks()
        counts = to_numpy(table["count"].combine_chunks())
        for j, counter in enumerate(counters):
            rows = np.flatnonzero(fields == j)
            if len(rows):
                counter.add(keys.take(from_numpy(rows)), counts[rows])
    return _vocab_map(schema, counters, min_count)


def apply_feature_map_to_part(fmap: FeatureMap, input_dir: str, out_dir: str) -> dict:
    """`apply_feature_map` on one file's ingested part (an `ingest_file` output); OUT/part.json keeps the file's
    place among the inputs for `gather_hashed`. Returns the manifest."""
    report = read_json(Path(input_dir) / "report.json")
    if not isinstance(report, dict) or "part" not in report:
        raise DeeplightError(f"{input_dir}/report.json: not a per-file ingest (no \"part\"); use apply_feature_map")
    manifest = apply_feature_map(fmap, input_dir, out_dir)
    write_json(Path(out_dir) / "part.json", report["part"])
    return manifest


def gather_hashed(part_dirs: list[str], out_dir: str) -> dict:
    """One hashed dataset from per-file ones (`apply_feature_map` of each file's ingested part with one feature map),
    ordered by each part's file index (dataset.json "part"): OUT/{split}/part-FFFFF-NNNNN.parquet (file F's parts,
    hard links when the filesystem allows, else copies), so the splits hold the rows of one `hash_dataset` of all
    files in the same order. Returns the manifest."""
    if not part_dirs:
        raise DeeplightError("no hashed parts to gather")
    parts = sorted((read_json(Path(d) / "part.json")["index"], Path(d)) for d in part_dirs)
    manifests = [read_json(d / "manifest.json") for _, d in parts]
    fps = {m["feature_map_fingerprint"] for m in manifests}
    if len(fps) != 1:
        raise DeeplightError(f"hashed parts with different feature maps ({len(fps)} fingerprints): "
                             "every file must be mapped with the one merged feature map")
    rows = {s: 0 for s in SPLITS}
    fingerprints: dict[str, str] = {}
    with atomic_output_dir(out_dir, step="hash", inputs=[d for _, d in parts], legacy_files=("feature_map.json",)) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
            written = []
            for index, d in parts:
                for src in sorted((d / split).glob("*.parquet")):
                    dst = tmp / split / f"part-{int(index):05d}-{src.name[len('part-'):]}"
                    try:
                        os.link(src, dst)
                    except OSError:  # another filesystem (KFP artifacts on a cluster): copy
                        shutil.copyfile(src, dst)
                    written.append(dst)
            rows[split] = sum(m["rows"][split] for m in manifests)
            fingerprints[split] = fingerprint_files(written)
        first = parts[0][1]
        for name in ("feature_map.json", "dataset.json"):
            shutil.copyfile(first / name, tmp / name)
        manifest = {**{k: manifests[0][k] for k in ("dataset", "mode", "field_names", "field_sizes",
                                                      "feature_map_fingerprint")},
                    "rows": rows, "fingerprints": fingerprints, "source": [m["source"] for m in manifests]}
        write_json(tmp / "manifest.json", manifest)
    return manifest


# --- applying --------------------------------------------------------------------------------------------

def hash_dataset(input_dir: str, out_dir: str, buckets: int | None = None, min_count: int | None = None) -> dict:
    """Fit a feature map on the train split of `input_dir` and write ids for every split; returns the manifest."""
    fmap = fit_feature_map(input_dir, buckets=buckets, min_count=min_count)
    return apply_feature_map(fmap, input_dir, out_dir)


def apply_feature_map(fmap: FeatureMap, input_dir: str, out_dir: str) -> dict:
    """Write the hashed-data layout for the ingested dataset in `input_dir` to `out_dir` (atomically)."""
    root, schema, splits = _ingested_layout(input_dir)
    if schema.name != fmap.dataset:
        raise DeeplightError(f"{root / 'dataset.json'}: dataset {schema.name!r}, but the feature map is for "
                             f"{fmap.dataset!r}")
    if not splits:
        raise DeeplightError(f"{root}: none of the split directories {', '.join(SPLITS)} exists")
    out = Path(out_dir).resolve()
    if out == root.resolve() or out in root.resolve().parents:
        # atomic_output_dir replaces `out` as a whole: that would delete the input.
        raise DeeplightError(f"{out_dir}: the output directory must differ from the input and not contain it")
    rows: dict[str, int] = {}
    fingerprints: dict[str, str] = {}
    with atomic_output_dir(out_dir, step="hash", inputs=[root], legacy_files=("feature_map.json",)) as tmp:
        for split in SPLITS:
            written = _write_split(fmap, schema, splits.get(split, []), tmp / split, split)
            rows[split] = sum(n for _, n in written)
            fingerprints[split] = fingerprint_files([p for p, _ in written])
        fmap.save(tmp / "feature_map.json")
        shutil.copyfile(root / "dataset.json", tmp / "dataset.json")
        manifest = {
            "dataset": fmap.dataset, "mode": fmap.mode, "field_names": fmap.field_names,
            "field_sizes": fmap.field_sizes, "rows": rows, "fingerprints": fingerprints,
            "feature_map_fingerprint": fmap.fingerprint(), "source": str(root.absolute()),
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _write_split(fmap: FeatureMap, schema: DatasetSchema, files: list[Path], out: Path,
                 split: str) -> list[tuple[Path, int]]:
    """Stream `files` through fmap.transform into part-NNNNN.parquet files; returns (path, rows) per part.

    Row groups are read and mapped to ids in `_map_row_groups`' threads while this thread writes the finished
    ones in file order; a few row groups are in memory at a time.
    """
    out.mkdir(parents=True)
    out_schema = pa.schema([pa.field(n, pa.int32(), nullable=False) for n in fmap.field_names]
                           + [pa.field("label", pa.float32(), nullable=False)])
    label_name = schema.label.name

    def to_ids(batch: pa.RecordBatch, path: Path, start: int) -> pa.RecordBatch:
        try:
            ids = fmap.transform(batch)
        except DeeplightError as e:
            raise DeeplightError(f"{path}: {e}") from None
        label = _labels(batch.column(label_name), path, start, label_name)
        return pa.RecordBatch.from_arrays([from_numpy(ids[:, j]) for j in range(ids.shape[1])] + [from_numpy(label)],
                                          schema=out_schema)

    parts: list[tuple[Path, int]] = []
    writer: pq.ParquetWriter | None = None
    try:
        with progress(total=_count_rows(files), unit="rows", desc=f"features {split}") as bar:
            for _, batches in _map_row_groups(files, schema, fmap.fields, to_ids):
                for rows, out_batch in batches:
                    if writer is None or parts[-1][1] >= PART_ROWS:
                        if writer is not None:
                            writer.close()
                        parts.append((out / f"part-{len(parts):05d}.parquet", 0))
                        writer = id_writer(parts[-1][0], out_schema)
                    writer.write_batch(out_batch)
                    parts[-1] = (parts[-1][0], parts[-1][1] + rows)
                    bar.update(rows)
    finally:
        if writer is not None:
            writer.close()
    return parts


def id_writer(path: Path, out_schema: pa.Schema) -> pq.ParquetWriter:
    """A Parquet writer for one part file of ids (`bench/data_floor.py` times this very writer)."""
    # No min/max statistics: ids are opaque indices no query filters on, and computing them was 11% of writing
    # the ids (280 -> 250 ns/row).
    ids = [n for n in out_schema.names if n != "label"]
    return pq.ParquetWriter(path, out_schema, use_dictionary=["label"],
                            column_encoding=dict.fromkeys(ids, _ID_ENCODING), compression="none",
                            write_statistics=False)


def _labels(col: pa.Array, path: Path, start: int, name: str) -> np.ndarray:
    """The label as float32 0/1; a missing or non-0/1 label is an error naming the file and row."""
    if not pa.types.is_integer(col.type):
        raise DeeplightError(f"{path}: label column {name!r} has type {col.type}, expected int8 0/1")
    if col.null_count:
        row = start + int(np.flatnonzero(~valid_mask(col))[0])
        raise DeeplightError(f"{path}: row {row} (0-based): label {name!r} is missing")
    v = _values(col, widen=False)
    bad = np.flatnonzero((v != 0) & (v != 1))
    if len(bad):
        raise DeeplightError(f"{path}: row {start + int(bad[0])} (0-based): label {name!r} is {v[bad[0]]}, "
                             "not 0 or 1")
    return v.astype(np.float32)


# --- reading the ingested layout -------------------------------------------------------------------------

def _ingested_layout(input_dir: str) -> tuple[Path, DatasetSchema, dict[str, list[Path]]]:
    """(root, schema, {split: sorted parquet files}) for splits whose directory exists."""
    root = Path(input_dir)
    if not root.is_dir():
        raise DeeplightError(f"{root}: not a directory (expected an ingested dataset)")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DeeplightError(f"{meta_path}: missing; {root} is not an ingested dataset directory")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("dataset"), str):
        raise DeeplightError(f"{meta_path}: wants a JSON object with a \"dataset\" name")
    try:
        schema = get_schema(meta["dataset"])
    except DeeplightError as e:
        raise DeeplightError(f"{meta_path}: {e}") from None
    splits = {}
    for s in SPLITS:
        if (root / s).is_dir():
            # Every visible .parquet file counts: ignoring one would silently drop rows.
            splits[s] = sorted(p for p in (root / s).glob("*.parquet") if not p.name.startswith("."))
    return root, schema, splits


def _count_rows(files: list[Path]) -> int:
    return sum(_open_parquet(p).metadata.num_rows for p in files)


def _open_parquet(path: Path, read_dictionary: list[str] | None = None,
                  metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """metadata: the file's footer, already read (then it is not read again)."""
    try:
        return pq.ParquetFile(path, read_dictionary=read_dictionary, metadata=metadata)
    except (pa.ArrowException, OSError) as e:
        raise DeeplightError(f"{path}: not a readable Parquet file ({e})") from None


def _map_row_groups(files: list[Path], schema: DatasetSchema, fields: list[FieldSpec],
                    fn: Callable[[pa.RecordBatch, Path, int], _T]) -> Iterator[tuple[Path, list[tuple[int, _T]]]]:
    """Apply fn(batch, file, first row of the batch in its file) to every batch of `files`, row groups in
    parallel threads (Arrow and numpy release the GIL for the heavy parts); yields (file, [(rows, result), ...])
    per row group, in file order. Reads only the columns the fields and the label need, cat columns as
    dictionaries straight from Parquet's dictionary pages (so per-key work runs once per distinct value).
    Memory: a few row groups at a time (ingest writes them at ~131k rows)."""
    label = schema.label.name
    columns = list(dict.fromkeys([f.source for f in fields] + [label]))
    cats = sorted({f.source for f in fields if f.kind == "cat"})
    # (file, its footer, dictionary columns, row group, first row)
    tasks: list[tuple[Path, pq.FileMetaData, list[str], int, int]] = []
    for path in files:
        meta = _open_parquet(path)
        file_schema = meta.schema_arrow
        try:
            _check_columns(fields, file_schema, schema.name)
        except DeeplightError as e:
            raise DeeplightError(f"{path}: {e}") from None
        if label not in file_schema.names:
            raise DeeplightError(f"{path}: label column {label!r} of dataset {schema.name!r} is missing")
        dictionary = [c for c in cats if _is_string_type(file_schema.field(c).type)]
        start = 0
        for g in range(meta.metadata.num_row_groups):
            tasks.append((path, meta.metadata, dictionary, g, start))
            start += meta.metadata.row_group(g).num_rows

    def run(task: tuple[Path, pq.FileMetaData, list[str], int, int]) -> list[tuple[int, _T]]:
        path, footer, dictionary, group, start = task
        out = []
        try:
            pf = _open_parquet(path, read_dictionary=dictionary, metadata=footer)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns,
                                         use_threads=False):
                out.append((batch.num_rows, fn(batch, path, start)))
                start += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DeeplightError(f"{path}: cannot read rows from {start} on ({e})") from None
        return out

    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="deeplight-features") as pool:
        ahead: deque[tuple[Path, Future]] = deque()
        for task in tasks:
            ahead.append((task[0], pool.submit(run, task)))
            if len(ahead) > READ_THREADS:
                path, future = ahead.popleft()
                yield path, future.result()
        while ahead:
            path, future = ahead.popleft()
            yield path, future.result()
