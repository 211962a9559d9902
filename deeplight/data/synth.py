"""Synthetic raw Criteo/Avazu files whose click model is known exactly (for tests, benchmarks and demos).

`synthesize` writes a raw file in the dataset's Kaggle layout (read from its schema only: delimiter, header,
columns and their cardinality / missing / style hints) plus a truth JSON. Clicks follow a known logistic model:

    logit = bias + sum_f effect_f(value_f) + sum_{(f, g, u) in planted_pairs} u * z_f(value_f) * z_g(value_g)

over the schema's feature fields. effect_f is a deterministic function of (seed, field, raw value): cat values
by their string, int values by t(x) = floor(ln(x)^2) if x > 2 else x, time columns through their derived
fields (hour_of_day, weekday); missing is a value with an effect of its own. z is +1/-1. Noise fields have no
effect. Values a 800k-row training set sees rarely get small effects, so the signal is learnable.

Rows are made in blocks of BLOCK_ROWS, each from a generator seeded by (seed, block index): memory is flat in
the row count and the bytes depend only on (dataset, rows, seed). Each block is a typed in-memory table (the
ingested-data contract) whose clicks are drawn from `true_logit` of that very table before it is formatted,
so recomputing the probability from the text file is exact by construction.

    >>> import os, tempfile
    >>> import pyarrow.csv as pacsv
    >>> from deeplight.data.synth import synthesize, load_truth, true_probability
    >>> out = os.path.join(tempfile.mkdtemp(), "criteo.txt")
    >>> s = synthesize("criteo", rows=2000, seed=1, out=out)
    >>> s["rows"], 0.15 < s["click_rate"] < 0.3, s["truth"] == out + ".truth.json"
    (2000, True, True)
    >>> truth = load_truth(s["truth"])
    >>> len(truth["planted_pairs"]), len(truth["noise_fields"]), 0.75 < truth["calibration"]["oracle_auc"] < 0.81
    (5, 5, True)
    >>> names = [c.name for c in get_schema("criteo").columns]
    >>> table = pacsv.read_csv(out, pacsv.ReadOptions(column_names=names), pacsv.ParseOptions(delimiter="\\t"),
    ...     pacsv.ConvertOptions(column_types={"label": pa.int8(), **{f"C{i}": pa.string() for i in range(1, 27)}},
    ...                          strings_can_be_null=True))
    >>> p = true_probability(table, truth)
    >>> bool(0.19 < p.mean() < 0.25), oracle_auc(table.column("label").to_numpy(), p) > 0.7
    (True, True)
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from deeplight.base.errors import DeeplightError
from deeplight.base.files import resolve
from deeplight.base.progress import progress
from deeplight.data.schema import Column, DatasetSchema, get_schema
from deeplight.data.click_model import (  # noqa: F401 (re-exported: synth's API includes the truth)
    MAIN_VARIANCE, PAIR_VARIANCE, REFERENCE_ROWS, SHRINK_COUNT, TIME_HOURS, TIME_START, TRUTH_FORMAT, _derived_pmf,
    _encode_cat, _field_pmf, _fixed_width_bytes, _model, _one_array, _salt, _sample_zipf, _splitmix64, _time_values,
    _unit_effect, load_truth, logit_components, oracle_auc, true_logit, true_probability)

BLOCK_ROWS = 65_536  # rows per generated block; each block has its own RNG seeded from (seed, block index)
CALIBRATION_BLOCKS = 1  # blocks of a separate stream used to fit the bias to the target click rate
_GZIP_LEVEL = 1  # fast; the text is mostly random hex, which no level compresses much better
NEGATIVE_SHARE = 0.05  # share of small negatives (-1..-3) in the first never-missing int column
N_PAIRS = 5
PAIR_MAX_CARDINALITY = 2_000  # planted pairs use fields a model sees mostly in its vocabulary


def _generate_table(schema: DatasetSchema, truth: dict, stream: int, block: int, start: int, n: int,
                    total: int) -> tuple[pa.Table, np.ndarray]:
    """Rows start .. start+n of a stream as a typed table with labels drawn from true_logit, and their p.

    Every column always draws BLOCK_ROWS values (then cut to n) so a row's values do not depend on the file
    length, apart from time, which spreads over the whole file.
    """
    seed = int(truth["seed"])
    model = _model(truth)
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream, block]))
    arrays: list[pa.Array] = []
    label_index = -1
    for c in schema.columns:
        spec = truth["fields"].get(c.name, {})
        if c.kind == "label":
            label_index = len(arrays)
            arrays.append(pa.nulls(n, pa.int8()))
        elif c.kind == "id":
            pos = np.arange(start, start + n, dtype=np.uint64)
            arrays.append(pa.array(_splitmix64(pos ^ np.uint64(_salt(seed, "id", c.name)))).cast(pa.string()))
        elif c.kind == "time":
            arrays.append(pa.array(_time_values(np.arange(start, start + n), total, TIME_HOURS), pa.int64()))
        elif c.kind == "int":
            # One uniform per cell decides missing, then (rescaled) negative and which of -1..-3.
            u = rng.random(BLOCK_ROWS)[:n]
            y = rng.standard_normal(BLOCK_ROWS)[:n]
            missing = u < spec["missing"]
            w = (u - spec["missing"]) / (1.0 - spec["missing"])
            x = np.floor(np.exp(np.minimum(spec["lognormal_mu"] + spec["lognormal_sigma"] * y, 40.0)))
            q = spec["negative_share"]
            if q > 0:
                x = np.where(w < q, -1.0 - np.floor(3.0 * w / q), x)
            arrays.append(pa.array(x.astype(np.int64), pa.int64(), mask=missing))
        else:  # cat: one uniform per cell decides missing, then (rescaled) the Zipf rank
            u = rng.random(BLOCK_ROWS)[:n]
            m = spec["missing"]
            missing = u < m
            fm = model.fields[c.name]
            w = np.maximum(u - m, 0.0) / (1.0 - m) if m else u
            arrays.append(_encode_cat(_sample_zipf(w, fm.cardinality, fm.zipf_exponent), missing, fm))
    table = pa.Table.from_arrays(arrays, names=schema.names)
    p = true_probability(table, truth)  # the same code path a test uses to recompute from the file
    clicks = (rng.random(BLOCK_ROWS)[:n] < p).astype(np.int8)
    table = table.set_column(label_index, schema.label.name, pa.array(clicks, pa.int8()))
    return table, p


# A 4-digit group of a decimal number as 4 bytes: absent (NUL), leading ("7\0\0\0") or zero-padded ("0007").
_DIGIT_GROUPS = np.concatenate([
    np.zeros(10_000, np.uint32),
    np.array([str(i).encode().ljust(4, b"\0") for i in range(10_000)]).view(np.uint32),
    np.array([str(i).encode().rjust(4, b"0") for i in range(10_000)]).view(np.uint32),
])


def _int_cells(values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """(n, w) decimal text of int64 values, NUL-padded (empty where not valid), by 4-digit table lookups.

    >>> bytes(_int_cells(np.array([-120034]), None)[0]).replace(b"\\0", b"")
    b'-120034'
    """
    v = values.astype(np.int64)
    a = np.abs(v)
    top = int(a.max()) if len(a) else 0
    groups = max(1, -(-len(str(top)) // 4))
    cells = np.empty((len(v), groups), np.uint32)
    rest = a
    for k in range(groups - 1, -1, -1):  # least significant group first; k = column
        j = groups - 1 - k  # this column holds digits 4j .. 4j+3
        high = rest // 10_000
        digits = rest - high * 10_000
        # state 0: nothing at or above this group (NUL); 1: leading group; 2: digits above (zero-pad)
        state = (high > 0).astype(np.int64) + ((a >= 10 ** (4 * j)) | (j == 0))
        cells[:, k] = _DIGIT_GROUPS[state * 10_000 + digits]
        rest = high
    text = cells.view(np.uint8).reshape(len(v), 4 * groups)
    if (v < 0).any():
        text = np.concatenate([np.where(v < 0, ord("-"), 0).astype(np.uint8)[:, None], text], axis=1)
    if valid is not None:
        text[~valid] = 0
    return text


def _cell_bytes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """((n, w) bytes of a column's text with NUL where there is no character, valid mask or None).

    Rows where valid is False must be emptied by the caller: a fixed-width string column (hex8) comes back
    as a zero-copy view, nulls included.
    """
    arr = _one_array(col)
    valid = np.asarray(arr.is_valid()) if arr.null_count else None
    if pa.types.is_signed_integer(arr.type):
        return _int_cells(np.asarray(arr.fill_null(0) if arr.null_count else arr), None), valid
    arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
    fixed = _fixed_width_bytes(arr)
    if fixed is not None:
        return fixed, valid
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int32, count=n + 1, offset=4 * arr.offset).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2] or b"", np.uint8)
    lengths = np.diff(offsets)
    if valid is not None:
        lengths = np.where(valid, lengths, 0)
    cells = np.zeros((n, int(lengths.max()) if n else 0), np.uint8)
    for length in np.unique(lengths[lengths > 0]).tolist():  # few distinct lengths: one 2-D gather each
        rows = np.flatnonzero(lengths == length)
        cells[rows, :length] = data[offsets[rows, None] + np.arange(length)]
    return cells, None


_WORDS = ((8, np.uint64), (4, np.uint32), (2, np.uint16), (1, np.uint8))


def _copy_columns(out: np.ndarray, at: int, cells: np.ndarray, valid: np.ndarray | None) -> None:
    """out[:, at:at+w] = cells (NUL where not valid), moved 8/4/2/1 bytes at a time: byte-wise strided
    copies are 4x slower."""
    done, width = 0, cells.shape[1]
    for size, dtype in _WORDS:
        while width - done >= size:
            src = cells[:, done:done + size].view(dtype)[:, 0]
            dst = out[:, at + done:at + done + size].view(dtype)[:, 0]
            if valid is None:
                dst[...] = src
            else:
                np.multiply(src, valid.view(np.uint8).astype(dtype), out=dst)
            done += size


class _RowFormatter:
    """Formats successive tables of the same schema, reusing the row buffer and its delimiter layout."""

    def __init__(self, delimiter: str) -> None:
        self.delimiter = ord(delimiter)
        self.buffer = np.empty((0, 0), np.uint8)
        self.layout: tuple[int, ...] = ()

    def __call__(self, table: pa.Table) -> np.ndarray:
        cells = [_cell_bytes(c) for c in table.columns]
        layout = tuple(c.shape[1] for c, _ in cells)
        width = sum(layout) + len(layout)
        if self.buffer.shape != (table.num_rows, width) or layout != self.layout:
            self.buffer = np.empty((table.num_rows, width), np.uint8)
            ends = np.cumsum(np.array(layout) + 1) - 1
            self.buffer[:, ends] = self.delimiter
            self.buffer[:, ends[-1]] = ord("\n")
            self.layout = layout
        at = 0
        for c, valid in cells:
            _copy_columns(self.buffer, at, c, valid)
            at += c.shape[1] + 1
        flat = self.buffer.reshape(-1)
        return flat[flat != 0]


def format_rows(table: pa.Table, delimiter: str) -> np.ndarray:
    """The text lines of a table (no header) as one uint8 array: cells joined by `delimiter`, null -> "".

    Same bytes as pyarrow's CSV writer with quoting_style="none" (for NUL-free text), about 3x faster: each
    row is laid out at a fixed width with NUL padding, then one boolean mask drops the padding.

    >>> t = pa.table({"a": pa.array([1, None, -30]), "b": pa.array(["x", "yz", None])})
    >>> format_rows(t, ",").tobytes()
    b'1,x\\n,yz\\n-30,\\n'
    """
    return _RowFormatter(delimiter)(table)


def _check_schema(schema: DatasetSchema) -> None:
    for c in schema.columns:
        if c.kind == "cat" and (c.cardinality < 1 or c.cardinality >= 2 ** 32):
            raise DeeplightError(f"schema {schema.name!r}: column {c.name} needs a cardinality in 1 .. 2^32-1")
        if not 0.0 <= c.missing < 1.0:
            raise DeeplightError(f"schema {schema.name!r}: column {c.name} missing share must be in [0, 1)")


def make_truth(schema: DatasetSchema, seed: int, rows: int, click_rate: float | None = None) -> dict:
    """The full click model for (schema, seed), bias fitted to the target click rate, as a JSON-ready dict.

    Everything is drawn from a seed-only RNG, so the truth does not depend on `rows` except for the record.
    """
    _check_schema(schema)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7_001]))
    fields = schema.feature_fields
    raw = [f for f in fields if f.kind != "derived"]
    n_noise = min(max(3, math.ceil(len(fields) / 8)), max(0, len(raw) - 2))
    noise = sorted((raw[i].name for i in rng.choice(len(raw), n_noise, replace=False)),
                   key=[f.name for f in fields].index)
    first_never_missing = next((c.name for c in schema.columns if c.kind == "int" and c.missing == 0), None)
    specs: dict[str, dict[str, Any]] = {}
    for f in fields:
        spec: dict[str, Any] = {"kind": f.kind, "source": f.source}
        if f.kind == "derived":
            cardinality = len(_derived_pmf(f.name))
        else:
            col: Column = schema.column(f.source)
            spec["missing"] = col.missing
            if f.kind == "cat":
                cardinality = col.cardinality
                spec.update(cardinality=cardinality, style=col.style,
                            zipf_exponent=round(float(rng.uniform(1.05, 1.2)), 4))
            else:
                cardinality = 50  # about as many distinct t(x) values as a lognormal int produces
                spec.update(lognormal_mu=round(float(rng.uniform(0.0, 4.0)), 4),
                            lognormal_sigma=round(float(rng.uniform(0.8, 1.8)), 4),
                            negative_share=NEGATIVE_SHARE if f.name == first_never_missing else 0.0)
        # Fields differ in importance; bigger vocabularies get a smaller per-value effect std.
        importance = 0.0 if f.name in noise else float(rng.uniform(0.3, 1.0))
        spec["effect_std"] = importance / math.sqrt(1.0 + math.log10(max(cardinality, 2)) / 2)
        spec["role"] = "noise" if f.name in noise else "signal"
        specs[f.name] = spec
    # Scale all stds so the main effects have variance MAIN_VARIANCE under the generator's value frequencies:
    # the signal strength is then about the same for every seed.
    variance = 0.0
    for name, spec in specs.items():
        pmf, keys = _field_pmf(name, spec)
        e = spec["effect_std"] * _unit_effect(seed, name, pmf, keys)
        variance += float((pmf * e * e).sum() - (pmf * e).sum() ** 2)
    for spec in specs.values():
        spec["effect_std"] = round(spec["effect_std"] * math.sqrt(MAIN_VARIANCE / variance), 5)
    candidates = [f.name for f in fields if f.name not in noise
                  and (f.kind != "cat" or 4 <= specs[f.name]["cardinality"] <= PAIR_MAX_CARDINALITY)]
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    n_pairs = min(N_PAIRS, len(order) * (len(order) - 1) // 2)
    pairs: list[list[Any]] = []
    if len(order) >= 2 * n_pairs:
        pairs = [[order[2 * i], order[2 * i + 1]] for i in range(n_pairs)]
    else:
        combos = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]
        pairs = [list(combos[i]) for i in rng.choice(len(combos), n_pairs, replace=False)]
    strength = rng.uniform(0.8, 1.2, len(pairs))
    strength *= math.sqrt(PAIR_VARIANCE / float((strength ** 2).sum()))  # sum u^2 = variance of the pair terms
    planted = [[a, b, round(float(u), 5)] for (a, b), u in zip(pairs, strength)]
    rate = click_rate if click_rate is not None else schema.click_rate
    if not 0.0 < rate < 1.0:
        raise DeeplightError(f"click rate must be in (0, 1), got {rate}")
    truth: dict[str, Any] = {
        "format": TRUTH_FORMAT,
        "dataset": schema.name,
        "seed": seed,
        "rows": rows,
        "model": ("logit = bias + sum_f effect_f(value_f) + sum_(f,g,u) u * z_f(value_f) * z_g(value_g); "
                  "effect_f(v) = effect_std_f * n_v / (n_v + shrink_count) * N(0,1)[hash(seed, f, v)] with n_v "
                  "the expected count of v in reference_rows rows; int values keyed by t(x) = floor(ln(x)^2) "
                  "if x > 2 else x; missing is a value of its own; z = +1/-1 (probability-balanced)"),
        "click_rate_target": rate,
        "bias": 0.0,
        "planted_pairs": planted,
        "noise_fields": noise,
        "logit_variance": {"fields": MAIN_VARIANCE, "pairs": PAIR_VARIANCE},
        "reference_rows": REFERENCE_ROWS,
        "shrink_count": SHRINK_COUNT,
        "block_rows": BLOCK_ROWS,
        "time": {"start": TIME_START, "hours": TIME_HOURS},
        "field_order": [f.name for f in fields],
        "fields": specs,
    }
    truth["bias"], truth["calibration"] = _calibrate(schema, truth, rate)
    return truth


def _calibrate(schema: DatasetSchema, truth: dict, rate: float) -> tuple[float, dict[str, float]]:
    """Solve mean(sigmoid(bias + logit)) = rate on a separate sample stream; report the oracle AUCs there."""
    n = CALIBRATION_BLOCKS * BLOCK_ROWS
    parts = [_generate_table(schema, truth, 1, b, b * BLOCK_ROWS, BLOCK_ROWS, n)[0]
             for b in range(CALIBRATION_BLOCKS)]
    table = pa.concat_tables(parts)
    comp = logit_components(table, truth)
    pair_sum = sum((v for k, v in comp.items() if k.startswith("pair:")), np.zeros(n))
    logit0 = sum((v for k, v in comp.items() if k.startswith("effect:")), np.zeros(n)) + pair_sum
    bias = math.log(rate / (1.0 - rate))
    for _ in range(50):  # Newton on mean(sigmoid(bias + logit0)) = rate: increasing and convex enough
        p = 1.0 / (1.0 + np.exp(-(bias + logit0)))
        step = (p.mean() - rate) / max(float((p * (1.0 - p)).mean()), 1e-12)
        bias -= step
        if abs(step) < 1e-9:
            break
    bias = round(bias, 6)
    p = 1 / (1 + np.exp(-(bias + logit0)))
    y = np.random.default_rng(np.random.SeedSequence([int(truth["seed"]), 7_002])).random(n) < p
    stats = {"rows": n, "mean_probability": round(float(p.mean()), 5),
             "oracle_auc": round(oracle_auc(y, p), 5),
             "oracle_auc_without_pairs": round(oracle_auc(y, logit0 - pair_sum), 5)}
    return bias, stats


def synthesize(dataset: str, rows: int, seed: int, out: str, truth_path: str | None = None,
               click_rate: float | None = None, probabilities_out: str | None = None) -> dict:
    """Write `rows` synthetic rows of `dataset` in its raw layout to `out` (.gz compresses; s3:// works) and
    the truth JSON to `truth_path` (default out + ".truth.json"). Returns a summary.

    The bytes depend only on (dataset, rows, seed, click_rate). `probabilities_out` (debugging and tests): a
    local .npy file receiving the true click probability the generator used for every row, in file order.
    """
    schema = get_schema(dataset)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise DeeplightError(f"--rows must be a positive integer, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DeeplightError(f"--seed must be a non-negative integer, got {seed!r}")
    if truth_path is None:
        if os.path.exists(out) and not os.path.isfile(out):
            raise DeeplightError(f"{out}: not a regular file; give the truth JSON a path of its own")
        truth_path = out + ".truth.json"
    t0 = time.perf_counter()
    truth = make_truth(schema, seed, rows, click_rate)
    probs = (np.lib.format.open_memmap(probabilities_out, mode="w+", dtype=np.float64, shape=(rows,))
             if probabilities_out else None)  # memory-mapped: memory stays flat for any row count
    clicks, p_sum = 0, 0.0
    formatter = _RowFormatter(schema.delimiter)
    with _output(out) as sink:
        if schema.header:  # pyarrow's CSV writer would quote the names
            sink.write((schema.delimiter.join(schema.names) + "\n").encode())
        with progress(total=rows, unit="rows", desc=f"synth {dataset}") as bar:
            for b in range(-(-rows // BLOCK_ROWS)):
                start = b * BLOCK_ROWS
                n = min(BLOCK_ROWS, rows - start)
                table, p = _generate_table(schema, truth, 0, b, start, n, rows)
                sink.write(formatter(table))
                clicks += int(np.asarray(table.column(schema.label.name)).sum())
                p_sum += float(p.sum())
                if probs is not None:
                    probs[start:start + n] = p
                bar.update(n)
    if probs is not None:
        probs.flush()
        del probs
    seconds = time.perf_counter() - t0
    truth["summary"] = {"click_rate": round(clicks / rows, 6), "mean_probability": round(p_sum / rows, 6)}
    _write_text(truth_path, json.dumps(truth, indent=2, sort_keys=True) + "\n")
    return {"path": out, "truth": truth_path, "dataset": dataset, "seed": seed, "rows": rows,
            "click_rate": clicks / rows, "mean_probability": p_sum / rows,
            "planted_pairs": truth["planted_pairs"], "noise_fields": truth["noise_fields"],
            "oracle_auc_estimate": truth["calibration"]["oracle_auc"],
            "seconds": round(seconds, 3), "rows_per_second": round(rows / seconds)}


# --- output ----------------------------------------------------------------------------------------------

class _output:
    """Context manager: a writable stream for a local path or s3:// URI, gzip when the name ends in .gz.

    A regular local file is written to a temporary sibling and renamed at the end, so a failed run leaves no
    partial file; an existing non-regular target (/dev/null, /dev/stdout, a FIFO) is written directly.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = resolve(uri)
        special = os.path.exists(self.path) and not os.path.isfile(self.path)
        self.rename = not uri.startswith("s3://") and not special
        self.target = f"{self.path}.tmp-{os.getpid()}" if self.rename else self.path

    def __enter__(self) -> Any:
        try:
            if self.rename:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.raw = self.fs.open_output_stream(self.target)
        except OSError as e:
            raise DeeplightError(f"{self.uri}: cannot write ({e})") from None
        # mtime=0 and no file name in the gzip header: the same rows give the same bytes.
        self.stream = (gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, compresslevel=_GZIP_LEVEL, mtime=0)
                       if self.uri.endswith(".gz") else self.raw)
        return self.stream

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.stream.close()
            if not self.raw.closed:
                self.raw.close()
        finally:
            if self.rename:
                if exc_type is None:
                    os.replace(self.target, self.path)
                elif os.path.exists(self.target):
                    os.remove(self.target)


def _write_text(uri: str, text: str) -> None:
    with _output(uri) as f:
        f.write(text.encode())
