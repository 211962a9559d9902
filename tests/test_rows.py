"""deeplight.serve.rows: the compiled serving path (raw rows -> ids -> probabilities) computes exactly what the
training-time path computes (records of plain values -> `parse_records` -> `FeatureMap.transform`).

Every check compares `RowsToIds.transform` with a test-local reference built from that training-time path: both
give identical ids, or both raise an error naming the same row and field. Values of every kind (good, bad, missing)
in every column kind, in every input form (DataFrame, dict of columns, list of records, one record, 1-row
DataFrame), for hash-mode and vocabulary maps; the rules serving adds (a missing or unknown key, an unknown
DataFrame column); the real samples against the Parquet ids `deeplight hash` writes; `RawRowScorer`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deeplight.base.errors import DeeplightError
from deeplight.data.feature_map import FeatureMap
from deeplight.data.hashing import hash_dataset
from deeplight.data.ingest import ingest
from deeplight.data.schema import get_schema
from deeplight.data.synth import synthesize
from deeplight.data.validate import parse_records
from deeplight.serve import rows as rows_module
from deeplight.serve.pystr import gather
from deeplight.serve.rows import RawRowScorer, RowsToIds

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO_SAMPLE = SHARED_DATA / "criteo" / "train_10k.txt"
AVAZU_SAMPLE = SHARED_DATA / "avazu" / "train_8k.csv"

# --- the reference: the training-time path ---------------------------------------------------------------


def _plain(v: Any) -> Any:
    """A value as the old serving path passed it on (deeplight.registry._plain before the port)."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType"):
        return None  # pandas' missing markers: None, NaN, pd.NA, pd.NaT
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def to_records(rows: Any) -> list[dict[str, Any]]:
    """DataFrame, list of dicts, dict of columns or one dict -> records of plain Python values (the old
    deeplight.registry.to_records)."""
    if isinstance(rows, dict):
        rows = [rows] if not any(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in rows.values()) \
            else pd.DataFrame(rows)
    if isinstance(rows, pd.DataFrame):
        columns = {str(k): [_plain(v) for v in rows[k].astype(object).tolist()] for k in rows.columns}
        return [dict(zip(columns, vals)) for vals in zip(*columns.values())] if columns else [{}] * len(rows)
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows), type(rows)
    return [{str(k): _plain(v) for k, v in r.items()} for r in rows]


def optional_columns(schema: Any) -> tuple[str, ...]:
    return tuple(c.name for c in schema.columns if c.kind in ("label", "id"))


def where(message: str) -> tuple[int, str | None]:
    m = re.search(r"row (\d+)(?: \(line \d+\))?(?:, field '([^']*)')?", message)
    assert m, f"the error names no row: {message}"
    return int(m.group(1)), m.group(2)


def reference(fmap: FeatureMap, rows: Any) -> np.ndarray | tuple[int, str | None]:
    """ids of the training-time path, or (row, field) of its error."""
    schema = get_schema(fmap.dataset)
    try:
        table = parse_records(schema, to_records(rows), optional=optional_columns(schema))
        return fmap.transform(table)
    except DeeplightError as e:
        return where(str(e))


def _routed(conv: RowsToIds, rows: Any, dtype: Any, text_route: bool,
            gather_min: int = 512) -> np.ndarray | tuple[int, str | None]:
    conv.fast_text, conv.gather_min = text_route, gather_min
    try:
        return conv.transform(copy.deepcopy(rows) if isinstance(rows, (list, dict)) else rows, dtype)
    except DeeplightError as e:
        return where(str(e))
    finally:
        conv.fast_text, conv.gather_min = True, 512


def as_lines(conv: RowsToIds, rows: Any) -> bytes | None:
    """The rows as the dataset's file lines (a header line naming the columns, then one line per row), or None
    when they cannot be written so: a value that is not a str or holds the separator, a quote or a line break,
    or records whose keys differ."""
    if isinstance(rows, pd.DataFrame):
        names, values = [str(k) for k in rows.columns], rows.astype(object).values.tolist()
    elif isinstance(rows, dict) and rows and all(isinstance(v, list) for v in rows.values()):
        names, values = list(rows), [list(v) for v in zip(*rows.values())]
    elif isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        names = list(rows[0])
        if any(list(r) != names for r in rows):
            return None
        values = [list(r.values()) for r in rows]
    else:
        return None
    sep = conv.schema.delimiter
    flat = [v for row in values for v in row]
    if not values or not names or not all(type(v) is str and not any(ch in v for ch in (sep, "\n", "\r", '"'))
                                          for v in flat + names):
        return None
    try:
        return "\n".join(sep.join(row) for row in [names] + values).encode()
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text holds it (see test_text_lines_*)
        return None


def _lines(conv: RowsToIds, body: bytes, dtype: Any) -> np.ndarray | tuple[int, str | None]:
    try:
        return conv.transform_lines(body, conv.schema.delimiter, True, dtype)
    except DeeplightError as e:
        return where(str(e))


def _json_body(conv: RowsToIds, rows: Any, dtype: Any) -> np.ndarray | tuple[int, str | None] | None:
    """`transform_json_records` of the records as a v1 request body, or None when it declines the body (or the
    rows are not records): the server then decodes the body and calls `transform`."""
    records = [rows] if isinstance(rows, dict) and not any(isinstance(v, list) for v in rows.values()) else rows
    if not isinstance(records, list):
        return None
    try:
        body = json.dumps({"instances": records}).encode()
    except (TypeError, ValueError):
        return None
    try:
        return conv.transform_json_records(body, dtype)
    except DeeplightError as e:
        return where(str(e))


def _v2_body(conv: RowsToIds, rows: Any, dtype: Any) -> np.ndarray | tuple[int, str | None] | None:
    """`transform_v2_json` of the records as a v2 inference request (one BYTES tensor per column), or None when it
    declines the body (or the rows are not records with the same keys): the server then parses it in full."""
    records = [rows] if isinstance(rows, dict) and not any(isinstance(v, list) for v in rows.values()) else rows
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records) or \
            any(list(r) != list(records[0]) for r in records):
        return None
    tensors = [{"name": k, "shape": [len(records)], "datatype": "BYTES", "data": [r[k] for r in records]}
               for k in records[0]]
    try:
        body = json.dumps({"inputs": tensors}).encode()
    except (TypeError, ValueError):
        return None
    try:
        read = conv.transform_v2_json(body, dtype)
    except DeeplightError as e:
        return where(str(e))
    return None if read is None else read[0]


def fast(conv: RowsToIds, rows: Any, dtype: Any = np.int32) -> np.ndarray | tuple[int, str | None]:
    """RowsToIds' answer; the text route (taken when every value is a str) with the str objects' bytes gathered
    and with them joined, the general route, a v1 JSON body of the records and a v2 one, each read in one pass
    (when it takes the body) and, when the rows can be written as the dataset's text lines, `transform_lines` on
    those lines must give the same ids, or name the same row and field."""
    got = _routed(conv, rows, dtype, True)
    answers = {"general route": _routed(conv, rows, dtype, False),
               "text route, gathered": _routed(conv, rows, dtype, True, gather_min=0),
               "text route, joined": _routed(conv, rows, dtype, True, gather_min=2**62)}
    body = as_lines(conv, rows)
    if body is not None:
        answers["text lines"] = _lines(conv, body, dtype)
    from_json = _json_body(conv, rows, dtype)
    if from_json is not None:
        answers["JSON body"] = from_json
    from_v2 = _v2_body(conv, rows, dtype)
    if from_v2 is not None:
        answers["v2 JSON body"] = from_v2
    for route, other in answers.items():
        if isinstance(got, np.ndarray) and isinstance(other, np.ndarray):
            assert got.dtype == other.dtype and np.array_equal(got, other), f"text route ids != {route} ids"
        else:
            assert got == other, f"text route says {got}, {route} {other}"
    return got


def same(conv: RowsToIds, rows: Any, what: str, error: tuple[int, str] | None = None) -> None:
    """RowsToIds == reference on `rows` (ids, or the error's row and field); `error`: the place both must name
    (None: both must give ids)."""
    want = reference(conv.fmap, copy.deepcopy(rows) if isinstance(rows, (list, dict)) else rows)
    got = fast(conv, rows)
    if error is None:
        assert isinstance(want, np.ndarray), f"{what}: the reference refused good rows: {want}"
        assert isinstance(got, np.ndarray), f"{what}: RowsToIds refused good rows at {got}"
        assert got.dtype == np.int32 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[:3].tolist()
            pytest.fail(f"{what}: ids differ at (row, field) {bad}")
    else:
        assert want == error, f"{what}: the reference says {want}, the test expected {error}"
        assert got == error, f"{what}: RowsToIds says {got if isinstance(got, tuple) else 'ids'}, want {error}"


def is_nan(v: Any) -> bool:
    return isinstance(v, float) and v != v


def frame(records: list[dict], required: Any = None) -> pd.DataFrame:
    """pd.DataFrame(records), with a NaN in a text (object) column of a `required` field sent as None: serving
    reads such a NaN as a key the record did not have (see test_dataframe_nan_in_a_text_column_is_a_missing_key);
    a NaN in a number column is a gap (missing value) like None."""
    df = pd.DataFrame(records)
    for c in df.columns:
        if (required is None or c in required) and df[c].dtype == object and any(map(is_nan, df[c])):
            df[c] = pd.Series([None if is_nan(v) else v for v in df[c]], index=df.index, dtype=object)
    return df


def required_of(schema) -> list[str]:
    return [c.name for c in schema.columns if c.name not in optional_columns(schema)]


def forms(records: list[dict], schema):
    """The same rows as a list of records, a DataFrame (pandas' own inference) and a dict of columns."""
    yield "records", records
    yield "dataframe", frame(records, required_of(schema))
    yield "dict", {k: [r.get(k) for r in records] for k in schema.names if any(k in r for r in records)}


# --- feature maps --------------------------------------------------------------------------------------------

def raw_records(path: Path, dataset: str) -> list[dict[str, str]]:
    """The rows of a raw file as records of strings, as a client that splits the lines would send them."""
    schema = get_schema(dataset)
    lines = path.read_text(encoding="utf-8").splitlines()
    names = lines.pop(0).split(schema.delimiter) if schema.header else schema.names
    assert names == schema.names
    return [dict(zip(names, ln.split(schema.delimiter))) for ln in lines]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FeatureMap, list[dict]]]:
    """{dataset: (vocabulary map fitted on a small synthetic set, its raw rows as string records)}."""
    out = {}
    for dataset in ("criteo", "avazu"):
        d = tmp_path_factory.mktemp(f"synth-{dataset}")
        raw = d / "raw.txt"
        synthesize(dataset, 2000, 0, str(raw))
        ingest(dataset, [str(raw)], str(d / "ingested"), split=(1.0, 0.0, 0.0), split_mode="sequential")
        hash_dataset(str(d / "ingested"), str(d / "hashed"), min_count=3)
        fmap = FeatureMap.load(d / "hashed" / "feature_map.json")
        out[dataset] = (fmap, raw_records(raw, dataset))
    return out


MAPS = ["criteo-hash", "avazu-hash", "criteo-vocab", "avazu-vocab"]


@pytest.fixture(scope="module", params=MAPS)
def case(request: pytest.FixtureRequest, synthetic) -> tuple[RowsToIds, list[dict]]:
    """(RowsToIds of the map, 20 base rows of good raw strings: synthetic rows of the map's dataset)."""
    dataset, mode = request.param.split("-")
    fmap, recs = synthetic[dataset]
    if mode == "hash":
        fmap = FeatureMap.hashed(dataset, 1000)
    else:
        assert fmap.mode == "vocab" and sum(f.size > 2 for f in fmap.fields) > len(fmap.fields) // 2
    return RowsToIds(fmap), [dict(r) for r in recs[:20]]


# --- values of every kind ----------------------------------------------------------------------------------

GOOD = {
    "label": ["0", "1", 0, 1, 1.0, None, float("nan"), np.int8(1), pd.NA],
    "int": ["", None, float("nan"), pd.NA, "0", "-0", "007", "-1", "2", "3", "4", "-1024", "-1025", "-99999",
            "65535", "65536", "9223372036854775807", "-9223372036854775808", "0000000000000000000000042",
            3, 3.0, -0.0, -2000, 2**62, 1e15, np.int64(12), np.float64(7.0), np.uint64(5)],
    "cat": ["", None, float("nan"), pd.NA, "68fd1e64", "ZZ", "a b", "ü€", "😀", 3, 3.0, 3.5, -1, 2**70, 1e20,
            1e23, float("inf"), np.str_("x1"), "0x1", np.int64(7)],
    "time": ["14102100", "00010100", "16022923", "99123123", "14103023", 14102100, 14102100.0, np.int64(14102905)],
    "id": ["1", None, 123, 1.5, "abc", float("nan"), "10000169349117863715"],
}
BAD = {
    "label": ["2", "", " 1", "01", "true", 2, 0.5, -1, True, b"1"],
    "int": ["3.5", "1e3", " 3", "+3", "-", "--3", "3-", "0x1", "١٢", "9223372036854775808",
            "-9223372036854775809", "99999999999999999999999", 3.5, float("inf"), 1e19, -1e19, 2**63,
            True, b"3", [3], {"a": 1}],
    "cat": [True, b"68fd1e64", [1], pd.Timestamp("2020-01-01")],
    "time": ["", None, float("nan"), "1410210", "141021000", "14132100", "14023000", "15022900", "14102124",
             "1410210x", "-1410210", 1410210, -14102100, 14102100.5, True],
    "id": [True, b"x", [1]],
}


def by_kind(schema) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in schema.columns:
        out.setdefault(c.kind, []).append(c.name)
    return out


def scalar(v: Any) -> bool:
    """A value a one-record dict can hold (a list or dict value makes the dict a dict of columns)."""
    return not isinstance(v, (list, dict))


def mixed_batch(rows: list[dict], schema) -> list[dict]:
    """Every good value of its kind in every column, at many positions: row i, column j (j-th of its kind) holds
    GOOD[kind][(i + j) % len]; columns of one kind mix strings, numbers and missing markers."""
    n = max(len(v) for v in GOOD.values())
    out = [dict(rows[i % len(rows)]) for i in range(n + 3)]
    for kind, cols in by_kind(schema).items():
        for j, name in enumerate(cols):
            for i, r in enumerate(out):
                r[name] = GOOD[kind][(i + j) % len(GOOD[kind])]
    return out + [dict(r) for r in rows]  # and the plain rows (vocabulary values)


def test_good_values_in_every_form(case):
    """Good and missing values of every kind, mixed in every column: identical ids in a batch of records, a
    DataFrame, a dict of columns; in small batches (the flat route); as one record and as a 1-row DataFrame."""
    conv, rows = case
    schema = conv.schema
    batch = mixed_batch(rows, schema)
    want = None
    for form, data in forms(batch, schema):
        same(conv, data, f"mixed good values, {form}")
        want = reference(conv.fmap, data)
    n = len(batch) - len(rows)
    assert len({tuple(r) for r in want[:n].tolist()}) == n  # the values really differ
    assert (want[n:] >= 2).any() and (want == 0).any()  # vocabulary (or hash) ids and missing values
    for lo in range(0, len(batch), 3):  # small batches, one record, one row
        for form, data in forms(batch[lo:lo + 3], schema):
            got = conv.transform(data)
            assert np.array_equal(got, want[lo:lo + 3]), (form, lo)
        rec = batch[lo]
        assert np.array_equal(conv.transform(dict(rec)), want[lo:lo + 1]), rec
        assert np.array_equal(conv.transform(pd.DataFrame([rec])), want[lo:lo + 1]), rec


def test_whole_columns_of_one_kind_of_value(case):
    """A column of one value (pandas makes int64 / float64 / object / Int8 ... columns of them), every good value
    in some column of its kind; ints with NaN gaps (float64) and nullable Int64 in every label, int and cat
    column."""
    conv, rows = case
    schema = conv.schema
    cols = by_kind(schema)
    batches = max(-(-len(GOOD[k]) // len(c)) for k, c in cols.items())
    for b in range(batches):
        rs = [dict(r) for r in rows]
        setting = {}
        for kind, names in cols.items():
            for j, name in enumerate(names):
                setting[name] = GOOD[kind][(b * len(names) + j) % len(GOOD[kind])]
        rs = [r | setting for r in rs]
        for form, data in forms(rs, schema):
            same(conv, data, f"whole columns {setting}, {form}")
        same(conv, pd.DataFrame(rs[:1]), f"whole columns {setting}, 1-row DataFrame")
    gaps = {}
    for kind in ("label", "int", "cat"):
        for j, name in enumerate(cols.get(kind, [])):
            gaps[name] = [None if (i + j) % 3 == 0 else (i % 2 if kind == "label" else i * 7 - 30 - j)
                          for i in range(len(rows))]
    rs = [dict(r) | {k: v[i] for k, v in gaps.items()} for i, r in enumerate(rows)]
    df = pd.DataFrame(rs)
    assert all(df[k].dtype == np.float64 for k in gaps)
    same(conv, df, "ints with NaN gaps, DataFrame")
    same(conv, rs, "ints with gaps, records")
    nullable = df.astype(dict.fromkeys(gaps, "Int64"))
    same(conv, nullable, "nullable Int64 DataFrame")
    for i in range(3):
        same(conv, nullable.iloc[[i]].reset_index(drop=True), f"nullable Int64 1-row DataFrame, row {i}")
    for name in cols.get("time", []):
        df = pd.DataFrame(rows).astype({name: "int64"})
        same(conv, df, f"column {name} int64 DataFrame")
        df.loc[5, name] = 14023000
        same(conv, df, f"column {name} int64 DataFrame, a bad date", error=(5, name))
        df = pd.DataFrame(rows).astype({name: "float64"})
        same(conv, df, f"column {name} float64 DataFrame")
        df.loc[6, name] = np.nan  # a time value may not be missing
        same(conv, df, f"column {name} float64 DataFrame with a NaN", error=(6, name))
        same(conv, df.astype({name: "Int64"}), f"column {name} Int64 DataFrame with <NA>", error=(6, name))


def test_bad_values_name_row_and_field(case):
    """Each bad value, in a column of its kind at some row: every form names that row and field, as the
    training-time path does; alone (one record, 1-row DataFrame) row 0; a whole column of it, row 0."""
    conv, rows = case
    schema = conv.schema
    cols = by_kind(schema)
    positions = (0, 7, len(rows) - 1)
    k = 0
    for kind, values in BAD.items():
        for v in values if kind in cols else ():
            k += 1
            name, pos = cols[kind][k % len(cols[kind])], positions[k % 3]
            rs = [dict(r) for r in rows]
            rs[pos][name] = v
            want = reference(conv.fmap, rs)
            assert want == (pos, name), f"{name}={v!r} at row {pos}: the reference says {want}"
            for form, data in forms(rs, schema):
                assert fast(conv, data) == (pos, name), f"{name}={v!r} at row {pos}, {form}"
            for form, data in forms(rs[pos:pos + 2], schema):
                assert fast(conv, data) == (0, name), f"{name}={v!r} at row 0 of 2, {form}"
            assert fast(conv, pd.DataFrame([rs[pos]])) == (0, name), f"{name}={v!r}, 1-row DataFrame"
            if scalar(v):
                assert fast(conv, dict(rs[pos])) == (0, name), f"{name}={v!r}, one record"
            if k % 3 == 0:
                rs = [dict(r) | {name: v} for r in rows]
                for form, data in forms(rs, schema):
                    same(conv, data, f"column {name} all {v!r}, {form}", error=(0, name))


def test_first_bad_value_is_the_one_the_training_path_reports(case):
    """Two bad values: both paths name the same one (a value that is no text or number stops the training path's
    record loop, which goes row by row; a bad text is found after that, lowest row first)."""
    conv, rows = case
    schema = conv.schema
    cols = by_kind(schema)
    last_cat = cols["cat"][-1]
    label = schema.label.name
    for bad in ({(12, label): "7", (9, last_cat): True},
                {(3, label): "7", (12, last_cat): True},  # the non-text value wins over an earlier bad text
                {(3, label): "7", (12, label): "8"},
                {(5, label): "7", (5, last_cat): True}):
        rs = [dict(r) for r in rows]
        for (i, name), v in bad.items():
            rs[i][name] = v
        want = reference(conv.fmap, rs)
        assert isinstance(want, tuple)
        for form, data in forms(rs, schema):
            assert fast(conv, data) == want, (bad, form)
    if "int" in cols:  # criteo: bad int texts in two rows, the later one in an earlier column
        rs = [dict(r) for r in rows]
        rs[9][cols["int"][-1]], rs[12][cols["int"][0]] = "x", "y"
        for form, data in forms(rs, schema):
            same(conv, data, f"bad int, {form}", error=(9, cols["int"][-1]))


# Of several bad values in one request, the training path names the lowest row (it checks records row by row);
# RowsToIds checks every record's keys first, then converts column by column, so it may name another bad cell.
# Either way the error names a row and field that really are bad: that is what a client needs to fix its request.


def test_of_several_bad_values_one_of_them_is_named(case):
    conv, rows = case
    cols = by_kind(conv.schema)
    first_cat, last_cat = cols["cat"][0], cols["cat"][-1]
    rs = [dict(r) for r in rows]
    rs[12][first_cat], rs[3][last_cat] = True, True
    bad = {(3, last_cat), (12, first_cat)}
    assert reference(conv.fmap, rs) in bad
    for form, data in forms(rs, conv.schema):
        assert fast(conv, data) in bad, form
    assert fast(conv, rs[2:5] + rs[12:14]) in {(1, last_cat), (3, first_cat)}  # the flat route too


def test_a_bad_value_and_a_missing_key_in_another_row(case):
    conv, rows = case
    cols = by_kind(conv.schema)
    rs = [dict(r) for r in rows]
    rs[3][cols["cat"][-1]] = True
    del rs[9][cols["cat"][0]]
    bad = {(3, cols["cat"][-1]), (9, cols["cat"][0])}
    assert reference(conv.fmap, rs) in bad and fast(conv, rs) in bad


def test_optional_columns_may_be_absent(case):
    conv, rows = case
    schema = conv.schema
    optional = optional_columns(schema)
    assert schema.label.name in optional
    rs = [{k: v for k, v in r.items() if k not in optional} for r in rows]
    for form, data in forms(rs, schema):
        same(conv, data, f"no optional columns, {form}")
    same(conv, dict(rs[3]), "no optional columns, one record")
    rs = [dict(r) if i % 2 else {k: v for k, v in r.items() if k != schema.label.name} for i, r in enumerate(rows)]
    same(conv, rs, "label in some records only")
    ids = conv.transform(rs)
    assert np.array_equal(ids, conv.transform([{k: v for k, v in r.items() if k != schema.label.name}
                                               for r in rows]))
    # the ids do not depend on the label or the id at all
    assert np.array_equal(ids, conv.transform([dict(r) | {schema.label.name: "1"} for r in rows]))
    same(conv, [], "no rows")
    assert conv.transform([]).shape == (0, len(conv.fmap.fields))


def test_missing_required_values_and_columns(case):
    conv, rows = case
    schema = conv.schema
    required = [n for n in schema.names if n not in optional_columns(schema)]
    for name in (required[0], required[-1]):
        df = pd.DataFrame(rows).drop(columns=[name])
        same(conv, df, f"no column {name}", error=(0, name))
        same(conv, {k: [r[k] for r in rows] for k in schema.names if k != name}, f"no column {name}, dict",
             error=(0, name))
        # a missing key in one record of a batch: the training path refuses it too
        for pos in (0, 5, len(rows) - 1):
            rs = [dict(r) for r in rows]
            del rs[pos][name]
            same(conv, rs, f"record {pos} without {name}", error=(pos, name))


def test_unknown_or_misspelt_keys_are_errors(case):
    """New in serving: the training path ignores unknown keys (so a misspelt key scored as a missing value);
    RowsToIds names the row and the key."""
    conv, rows = case
    schema = conv.schema
    name = schema.names[-1]
    for pos in (0, 5, len(rows) - 1):
        rs = [dict(r) for r in rows]
        rs[pos][name + "x"] = rs[pos].pop(name)  # misspelt: the real key is missing in that record
        assert fast(conv, rs) == (pos, name + "x")
        rs = [dict(r) for r in rows]
        rs[pos]["extra"] = "1"  # every schema key present, plus one
        assert isinstance(reference(conv.fmap, rs), np.ndarray)  # the training path ignores it
        assert fast(conv, rs) == (pos, "extra")
        # mlflow serve builds a DataFrame from the records: the unknown column is non-null only in that row
        rs = [dict(r) for r in rows]
        rs[pos]["extra"] = "1"
        df = pd.DataFrame(rs)
        assert isinstance(reference(conv.fmap, df), np.ndarray)
        assert fast(conv, df) == (pos, "extra")
        rs = [dict(r) for r in rows]
        rs[pos][name + "x"] = rs[pos].pop(name)
        df = pd.DataFrame(rs)
        assert df[name + "x"].notna().sum() == 1
        assert fast(conv, df) == (pos, name + "x")
    assert fast(conv, dict(rows[0]) | {"extra": 1}) == (0, "extra")
    assert fast(conv, pd.DataFrame(rows).assign(extra="a")) == (0, "extra")
    assert fast(conv, {k: [r[k] for r in rows] for k in schema.names} | {"extra": [None] * 3 + ["a"] * 17}) \
        == (3, "extra")


def test_dataframe_nan_in_a_text_column_is_a_missing_key(case):
    """New in serving: pandas fills a record's missing key with NaN when it builds a DataFrame from records (what
    mlflow serve does with `dataframe_records`); in a text (object) column of a required field, a NaN is an
    error naming the row and field. None stays a missing value; a NaN in a number column is a gap; the optional
    label may be absent from some records."""
    conv, rows = case
    schema = conv.schema
    texts = [n for n in required_of(schema) if schema.column(n).kind != "time"]  # a time value may not be null
    for name in (texts[0], texts[-1]):
        for pos in (0, 13):
            rs = [dict(r) for r in rows]
            del rs[pos][name]
            df = pd.DataFrame(rs)
            assert df[name].dtype == object and is_nan(df[name][pos])
            assert fast(conv, df) == (pos, name)
            rs[pos][name] = None  # sent as null: a missing value
            same(conv, pd.DataFrame(rs), f"{name} None at row {pos}")
            rs[pos][name] = float("nan")  # in a list of records, NaN is a missing value too
            same(conv, rs, f"{name} NaN at row {pos}, records")
    rs = [dict(r) for r in rows]
    del rs[4][schema.label.name]
    df = pd.DataFrame(rs)
    assert is_nan(df[schema.label.name][4])
    same(conv, df, "a label missing from one record")
    if schema.name == "criteo":  # int columns: NaN is a gap
        rs = [dict(r) | {"I2": i if i % 4 else float("nan")} for i, r in enumerate(rows)]
        assert pd.DataFrame(rs)["I2"].dtype == np.float64
        same(conv, pd.DataFrame(rs), "ints with NaN gaps")


def test_int64_output_and_unsupported_inputs(case):
    conv, rows = case
    want = reference(conv.fmap, rows)
    got = conv.transform(rows, np.int64)
    assert got.dtype == np.int64 and got.flags.c_contiguous and np.array_equal(got, want)
    for bad in ("a string", 3, (dict(rows[0]),), [dict(rows[0]), "x"]):
        with pytest.raises(DeeplightError):
            conv.transform(bad)


# --- the real samples: ids equal what `deeplight hash` wrote --------------------------------------------------

@pytest.mark.parametrize("dataset, sample", [("criteo", CRITEO_SAMPLE), ("avazu", AVAZU_SAMPLE)])
def test_real_sample_ids_equal_the_hashed_parquet(tmp_path, dataset, sample):
    if not sample.exists():
        pytest.skip(f"{sample} is not present")
    report = ingest(dataset, [str(sample)], str(tmp_path / "ingested"), split=(1.0, 0.0, 0.0),
                    split_mode="sequential")
    manifest = hash_dataset(str(tmp_path / "ingested"), str(tmp_path / "hashed"), min_count=2)
    fmap = FeatureMap.load(tmp_path / "hashed" / "feature_map.json")
    files = sorted((tmp_path / "hashed" / "train").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    want = np.stack([table.column(n).to_numpy() for n in fmap.field_names], axis=1)

    records = raw_records(sample, dataset)
    header = 1 if get_schema(dataset).header else 0
    quarantined = [json.loads(line) for line in open(tmp_path / "ingested" / "quarantine.jsonl")]
    bad_rows = {int(q["line"]) - 1 - header for q in quarantined}
    assert report["quarantined"] == len(bad_rows) and len(records) == report["read"]
    good = [r for i, r in enumerate(records) if i not in bad_rows]
    assert manifest["rows"]["train"] == len(good) == len(want)
    assert (want == 1).any() and (want >= 2).any()  # both OOV and vocabulary values

    conv = RowsToIds(fmap)
    for form, rows in (("records", good), ("DataFrame", pd.DataFrame(good)),
                       ("dict", {k: [r[k] for r in good] for k in good[0]})):
        got = conv.transform(rows)
        assert got.shape == want.shape and np.array_equal(got, want), form
    for i in range(0, len(good), 997):  # single records (the flat route)
        assert np.array_equal(conv.transform(good[i])[0], want[i])
    if not bad_rows:  # the file's own bytes, as `deeplight serve` takes them (text/tab-separated-values, text/csv)
        body = sample.read_bytes()
        got = conv.transform_lines(body, get_schema(dataset).delimiter)
        assert got.shape == want.shape and np.array_equal(got, want), "the raw file's lines"
    for i in sorted(bad_rows)[:20]:  # a quarantined row is refused (the samples have none today)
        assert isinstance(fast(conv, records[i]), tuple)
    broken = [dict(r) for r in good[:40]]
    name = next(c.name for c in get_schema(dataset).columns if c.kind in ("int", "time"))
    broken[31][name] = "12x"
    assert reference(fmap, broken) == fast(conv, broken) == (31, name)

    # what a pandas client sends: read_csv's typed columns (int columns with NaN gaps as float64, Avazu's id
    # as uint64, its numeric categories as int64); empty text stays "" (read_csv's default NaN would be a
    # missing key: see test_dataframe_nan_in_a_text_column_is_a_missing_key)
    schema = get_schema(dataset)
    ints = [c.name for c in schema.columns if c.kind == "int"]
    df = pd.read_csv(sample, sep=schema.delimiter, header=0 if header else None,
                     names=None if header else schema.names, keep_default_na=False,
                     na_values=dict.fromkeys(ints, [""]))
    assert len(df) == len(records)
    if ints:
        assert all(df[c].dtype == np.float64 for c in ints if df[c].isna().any())
        assert any(df[c].isna().any() for c in ints)
    keep = np.array([i not in bad_rows for i in range(len(df))])
    got = fast(conv, df.loc[keep].reset_index(drop=True))
    assert isinstance(got, np.ndarray) and np.array_equal(got, want)
    if any(df[c].dtype == object and (df[c] == "").any() for c in schema.names):  # criteo: empty categories
        plain = pd.read_csv(sample, sep=schema.delimiter, header=0 if header else None,
                            names=None if header else schema.names).loc[keep].reset_index(drop=True)
        row, name = fast(conv, plain)
        assert plain[name].dtype == object and is_nan(plain[name][row]) and plain[name][:row].notna().all()


# --- raw text lines (the dataset's file format) -------------------------------------------------------------

def test_text_lines_with_and_without_header_and_label(synthetic):
    """A body of the file's lines: every column (label/id included) or the feature columns only, positional, or
    under a header line (recognised, or told); "\r\n" and a missing final newline change nothing."""
    for dataset in ("criteo", "avazu"):
        fmap, recs = synthetic[dataset]
        conv, schema, sep = RowsToIds(fmap), get_schema(dataset), get_schema(dataset).delimiter
        recs = recs[:50]
        want = reference(fmap, recs)
        required = required_of(schema)
        full = "\n".join(sep.join(r[k] for k in schema.names) for r in recs)
        features = "\n".join(sep.join(r[k] for k in required) for r in recs)
        shuffled = list(reversed(required))
        header = sep.join(shuffled) + "\n" + "\n".join(sep.join(r[k] for k in shuffled) for r in recs)
        for what, body, hdr in (("every column", full, None), ("features only", features, False),
                                ("header", header, None), ("header, told", header, True),
                                ("CRLF and final newline", full.replace("\n", "\r\n") + "\r\n", None),
                                ("final newline", features + "\n", None)):
            got = conv.transform_lines(body.encode(), sep, hdr)
            assert np.array_equal(got, want), f"{dataset}: {what}"
        assert conv.transform_lines(b"", sep).shape == (0, len(fmap.fields))
        with pytest.raises(DeeplightError, match=r"row 0 \(line 1\), field '\w+': "):  # told: no header
            conv.transform_lines(header.encode(), sep, False)  # so the names are values (bad ones)


def test_text_lines_errors_name_row_line_and_field(synthetic):
    fmap, recs = synthetic["criteo"]
    conv, schema = RowsToIds(fmap), get_schema("criteo")
    lines = ["\t".join(r[k] for k in schema.names) for r in recs[:10]]
    k = len(schema.names)

    def error(body: bytes, header: bool | None = None) -> str:
        with pytest.raises(DeeplightError) as e:
            conv.transform_lines(body, "\t", header)
        return str(e.value)

    short = lines[:4] + [lines[4].rsplit("\t", 1)[0]] + lines[5:]
    assert error("\n".join(short).encode()) == f"row 4 (line 5): {k - 1} fields, expected {k} ({', '.join(schema.names)})"
    long = lines[:7] + [lines[7] + "\tx\ty"] + lines[8:]
    assert error("\n".join(long).encode()).startswith(f"row 7 (line 8): {k + 2} fields, expected {k} ")
    last_long = lines[:9] + [lines[9] + "\tx"]
    assert error("\n".join(last_long).encode()).startswith(f"row 9 (line 10): {k + 1} fields")
    blank = lines[:3] + [""] + lines[3:]
    assert error("\n".join(blank).encode()).startswith("row 3 (line 4): 1 fields")
    bad = [ln.split("\t") for ln in lines]
    bad[6][schema.names.index("I3")] = "12x"
    assert re.match(r"row 6 \(line 7\), field 'I3': non-integer", error("\n".join(map("\t".join, bad)).encode()))
    with_header = ["\t".join(schema.names)] + ["\t".join(b) for b in bad]
    assert re.match(r"row 6 \(line 8\), field 'I3'", error("\n".join(with_header).encode()))
    body = "\n".join(lines).encode()
    cut = body.index(b"\n", body.index(b"\n") + 1) + 5  # inside line 3, field 1 (the label) .. count tabs
    broken = body[:cut] + b"\xff" + body[cut:]
    field = body[body.index(b"\n", body.index(b"\n") + 1) + 1:cut].count(b"\t") + 1
    assert error(broken) == f"line 3: field {field} is not valid UTF-8 text"
    assert error(b"1\t2\t3\n").startswith(f"line 1: 3 fields; expected {k} (every criteo column) or {k - 1}")
    assert error(("\t".join(schema.names[1:] + ["I99"]) + "\n" + lines[0]).encode(), True).startswith(
        "row 0, field 'I99': unknown field in the header line")
    assert error(("\t".join(schema.names[2:]) + "\n" + lines[0]).encode(), True) == \
        "row 0, field 'I1': missing (no such column in the header line)"
    misspelt = "\t".join(schema.names).replace("C5", "C55")  # recognised as a header all the same
    assert error((misspelt + "\n" + lines[0]).encode()).startswith("row 0, field 'C55': unknown field in the header")
    with pytest.raises(DeeplightError, match="separator"):
        conv.transform_lines(body, "\n")


def test_text_lines_quoted_csv(synthetic):
    """Quoted CSV fields (RFC 4180) are read by Python's csv module: the same ids as the plain lines."""
    fmap, recs = synthetic["avazu"]
    conv, schema = RowsToIds(fmap), get_schema("avazu")
    recs = recs[:30]
    plain = "\n".join([",".join(schema.names)] + [",".join(r[k] for k in schema.names) for r in recs])
    quoted = "\n".join([",".join(schema.names)] + [",".join(f'"{r[k]}"' for k in schema.names) for r in recs])
    assert np.array_equal(conv.transform_lines(quoted.encode(), ","), conv.transform_lines(plain.encode(), ","))
    assert np.array_equal(conv.transform_lines(plain.encode(), ","), reference(fmap, recs))
    broken = quoted.replace(f'"{recs[3]["id"]}"', f'"{recs[3]["id"]}","extra"', 1).encode()
    with pytest.raises(DeeplightError, match=r"row 3 \(line 5\): 25 fields, expected 24"):
        conv.transform_lines(broken, ",")


# --- RawRowScorer -------------------------------------------------------------------------------------------

def small_model(fmap: FeatureMap):
    from test_compact import make_model  # the compact tests' model with non-trivial random weights

    return make_model(dnn=(16, 8), sizes=tuple(fmap.field_sizes))


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory, synthetic) -> Path:
    from deeplight.serve.engine import CompactModel

    fmap = synthetic["avazu"][0]
    d = tmp_path_factory.mktemp("scorer")
    CompactModel.from_model(small_model(fmap), field_names=fmap.field_names).save(d / "compact.npz")
    fmap.save(d / "feature_map.json")
    return d


def test_scorer_probabilities_equal_the_engine_on_reference_ids(scorer_dir, synthetic):
    from deeplight.serve.engine import CompactModel

    fmap, recs = synthetic["avazu"]
    compact = CompactModel.load(scorer_dir / "compact.npz")
    scorer = RawRowScorer(compact, fmap)
    rows = [dict(r) for r in recs[:300]]
    rows[4]["site_id"], rows[9]["C14"], rows[17]["hour"] = "", None, 14102923  # missing values, a number
    ids = reference(fmap, rows)
    assert isinstance(ids, np.ndarray)
    want = compact.predict_proba(np.ascontiguousarray(ids, np.int64)).astype(np.float64)
    assert len(set(np.round(want, 6))) > 50  # the model really tells rows apart
    for form, data in forms(rows, get_schema("avazu")):
        got = scorer.score(data)
        assert got.dtype == np.float64 and np.array_equal(got, want), form
    assert np.array_equal(scorer.score(rows[4]), want[4:5])
    assert np.array_equal(scorer.ids(rows), ids)
    assert scorer.score([]).shape == (0,)
    with pytest.raises(DeeplightError, match=r"row 2, field 'click'"):
        scorer.score(rows[:2] + [dict(rows[2]) | {"click": "yes"}])
    loaded = RawRowScorer.load(scorer_dir)
    assert np.array_equal(loaded.score(rows), want)
    with pytest.raises(DeeplightError):  # a map of other sizes than the model's
        RawRowScorer(compact, FeatureMap.hashed("avazu", 50))


THREADS_SCRIPT = """
import json, sys
from threadpoolctl import threadpool_info
from deeplight.serve.rows import RawRowScorer
scorer = RawRowScorer.load(sys.argv[1], threads=int(sys.argv[2]))
blas = [(d["filepath"], d["num_threads"]) for d in threadpool_info() if d["user_api"] == "blas"]
print(json.dumps({"blas": blas, "pinned": scorer.blas}))
"""


def test_scorer_pins_blas_threads(scorer_dir):
    """threads=1 and threads=2, each in a process of its own (the limit is process-wide), both started at once:
    after construction every BLAS library runs that many threads, whatever OPENBLAS_NUM_THREADS said."""
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", OPENBLAS_NUM_THREADS="3", OMP_NUM_THREADS="3")
    env.pop("DEEPLIGHT_ENGINE_THREADS", None)
    procs = {n: subprocess.Popen([sys.executable, "-c", THREADS_SCRIPT, str(scorer_dir), str(n)], env=env,
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (1, 2)}
    for threads, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        info = json.loads(out.strip().splitlines()[-1])
        assert info["blas"], "no BLAS library loaded after construction"
        assert all(n == threads for _, n in info["blas"]), (threads, info["blas"])
        assert info["pinned"] == dict(info["blas"])


def test_text_route_is_taken_for_text_and_falls_back_exactly(case):
    """All-str rows in the three forms take the text route, with their bytes gathered from the str objects and
    with them joined (one join + one compiled split); a value holding the join's separator byte is gathered
    but not joined, a value that is not ASCII is joined but not gathered, and a non-str value or text that
    cannot be encoded falls back to the general route: all with the same ids or the same named row and field."""
    conv, recs = case
    schema = conv.schema
    text = [{k: v for k, v in r.items() if isinstance(v, str)} for r in recs]
    text = [r for r in text if all(k in r for k in required_of(schema))]
    assert text, "the base rows have text values"

    def text_route(rows: Any, gather_min: int) -> np.ndarray | None:
        route = conv._text_route(rows)
        assert route is not None, "not routed as text"
        conv.gather_min = gather_min
        try:
            return conv._transform_text(*route, np.int32)
        finally:
            conv.gather_min = 512

    for what, rows in (("records", text), ("dataframe", pd.DataFrame(text, dtype=object)),
                       ("dict", {k: [r[k] for r in text] for k in text[0]}), ("one record", text[0])):
        n, plan, order, values = conv._text_route(rows)
        if all(v.isascii() for v in (values.ravel() if isinstance(values, np.ndarray) else values)):
            assert gather(values, n, plan.k, order) is not None, f"{what}: ASCII values not gathered"
        for gather_min in (0, 2**62):
            assert text_route(rows, gather_min) is not None, f"{what}: the text route gave up ({gather_min})"
        same(conv, rows, what)
    cat = by_kind(schema)["cat"][0]
    sep = [dict(r) for r in text]
    sep[1][cat] = "a\x1fb"  # the separator inside a value: the split finds one value too many
    assert text_route(sep, 2**62) is None and text_route(sep, 0) is not None
    same(conv, sep, "separator inside a value")
    accent = [dict(r) for r in text]
    accent[-1][cat] = "caf\u00e9"  # not ASCII: joined, not gathered
    n, plan, order, values = conv._text_route(accent)
    assert gather(values, n, plan.k, order) is None and text_route(accent, 0) is not None
    same(conv, accent, "a value that is not ASCII")
    lone = [dict(r) for r in text]
    lone[2][cat] = "\ud800"  # a lone surrogate cannot be encoded: named by the general route
    assert fast(conv, lone) == (2, cat)


def test_json_body_is_read_in_one_pass_and_anything_else_is_declined(case):
    """A v1 body of records whose values are all strings is read straight into the kernel's buffers, however it
    is spaced, with the ids (or the named bad row and field) of `transform`; every other body is declined (None),
    for the server to decode it and take `transform`, which names what is wrong with it."""
    conv, recs = case
    text = [{k: v for k, v in r.items() if isinstance(v, str) and v.isascii()} for r in recs]
    text = [r for r in text if all(k in r for k in required_of(conv.schema))][:20]
    assert len(text) >= 3, "the base rows have text values"
    want = conv.transform(copy.deepcopy(text))
    for body in (json.dumps({"instances": text}), json.dumps({"instances": text}, separators=(",", ":")),
                 json.dumps({"instances": text}, indent=2), "\r\n\t " + json.dumps({"instances": text}) + " \n"):
        got = conv.transform_json_records(body.encode())
        assert got is not None and np.array_equal(got, want), body[:80]
    one = conv.transform_json_records(json.dumps({"instances": text[:1]}).encode(), np.int64)
    assert one is not None and one.dtype == np.int64 and np.array_equal(one, want[:1])

    kinds = by_kind(conv.schema)
    cat, checked = kinds["cat"][0], (kinds.get("int") or kinds["time"])[0]
    bad = copy.deepcopy(text)
    bad[2][checked] = "3.5" if "int" in kinds else "14132100"
    # a bad value is named by the same row and field as `transform` names, and quoted as it was sent (the body
    # is read in place: the message's value comes from the body's bytes)
    assert _json_body(conv, bad, np.int32) == _routed(conv, bad, np.int32, False) == (2, checked)
    with pytest.raises(DeeplightError) as from_body:
        conv.transform_json_records(json.dumps({"instances": bad}).encode())
    with pytest.raises(DeeplightError) as from_records:
        conv.transform(copy.deepcopy(bad))
    assert repr(bad[2][checked]) in str(from_body.value) and str(from_body.value) == str(from_records.value)

    def changed(edit: Any) -> bytes:
        rows = copy.deepcopy(text)
        edit(rows)
        return json.dumps({"instances": rows}).encode()

    reordered = dict(reversed(list(text[1].items())))
    declined = {
        "a number": changed(lambda rows: rows[1].update({cat: 5})),
        "a null": changed(lambda rows: rows[1].update({cat: None})),
        "an escape": changed(lambda rows: rows[1].update({cat: 'a"b'})),
        "non-ASCII text": json.dumps({"instances": [dict(text[0], **{cat: "é"})]}, ensure_ascii=False).encode(),
        "a nested value": changed(lambda rows: rows[0].update({cat: ["x"]})),
        "keys in another order": changed(lambda rows: rows.__setitem__(1, reordered)),
        "an extra key": changed(lambda rows: rows[1].update({cat + "x": "1"})),
        "a missing key": changed(lambda rows: rows[1].pop(cat)),
        "a misspelt key in the first record": changed(lambda rows: rows[0].update({cat + "x": rows[0].pop(cat)})),
        "another top-level key": json.dumps({"instances": text, "parameters": {}}).encode(),
        "no instances": json.dumps({"instances": []}).encode(),
        "instances not a list": json.dumps({"instances": text[0]}).encode(),
        "a record not an object": json.dumps({"instances": [text[0], [1]]}).encode(),
        "trailing bytes": json.dumps({"instances": text}).encode() + b"x",
        "cut short": json.dumps({"instances": text}).encode()[:-3],
        "not JSON": b"instances",
        "empty": b"",
    }
    for what, body in declined.items():
        assert conv.transform_json_records(body) is None, what


def test_v2_body_is_read_in_one_pass_and_anything_else_is_declined(case):
    """A v2 request of one BYTES tensor per column, string values, members in any order and any spacing, is read
    straight into the kernel's buffers with the ids of `transform` and its "id"; every other body is declined
    (None), for the server to parse it in full (pydantic, then KServe's handler and `transform`)."""
    conv, recs = case
    text = [{k: v for k, v in r.items() if isinstance(v, str) and v.isascii()} for r in recs]
    text = [r for r in text if all(k in r for k in required_of(conv.schema)) and list(r) == list(text[0])][:20]
    assert len(text) >= 3, "the base rows have text values"
    want = conv.transform(copy.deepcopy(text))

    def tensors(rows: list[dict], **extra: Any) -> list[dict]:
        return [{"name": k, "shape": [len(rows)], "datatype": "BYTES", "data": [r[k] for r in rows], **extra}
                for k in rows[0]]

    plain = {"id": "r-7", "inputs": tensors(text)}
    reordered = {"inputs": [dict(reversed(list(t.items())), shape=[len(text), 1]) for t in tensors(text)],
                 "id": "r-7"}
    for request in (plain, reordered):
        for body in (json.dumps(request), json.dumps(request, separators=(",", ":")), json.dumps(request, indent=2)):
            got = conv.transform_v2_json(body.encode())
            assert got is not None and np.array_equal(got[0], want) and got[1] == "r-7", body[:80]
    got = conv.transform_v2_json(json.dumps({"inputs": tensors(text[:1])}).encode(), np.int64)
    assert got is not None and got[0].dtype == np.int64 and np.array_equal(got[0], want[:1]) and got[1] is None

    kinds = by_kind(conv.schema)
    cat, checked = kinds["cat"][0], (kinds.get("int") or kinds["time"])[0]
    bad = copy.deepcopy(text)
    bad[2][checked] = "3.5" if "int" in kinds else "14132100"
    with pytest.raises(DeeplightError) as from_body:
        conv.transform_v2_json(json.dumps({"inputs": tensors(bad)}).encode())
    with pytest.raises(DeeplightError) as from_records:
        conv.transform(copy.deepcopy(bad))
    assert str(from_body.value) == str(from_records.value) and f"row 2, field {checked!r}" in str(from_body.value)

    def changed(edit: Any) -> bytes:
        request = copy.deepcopy(plain)
        edit(request["inputs"], request)
        return json.dumps(request).encode()

    def data_of(ts: list[dict], name: str) -> list:
        return next(t for t in ts if t["name"] == name)["data"]

    declined = {
        "a number": changed(lambda ts, rq: data_of(ts, cat).__setitem__(1, 5)),
        "a null": changed(lambda ts, rq: data_of(ts, cat).__setitem__(1, None)),
        "an escape": changed(lambda ts, rq: data_of(ts, cat).__setitem__(1, 'a"b')),
        "non-ASCII text": json.dumps({"inputs": tensors([dict(text[0], **{cat: "é"})])},
                                     ensure_ascii=False).encode(),
        "a parameters member": changed(lambda ts, rq: rq.update(parameters={})),
        "an outputs member": changed(lambda ts, rq: rq.update(outputs=[{"name": "probability"}])),
        "tensor parameters": changed(lambda ts, rq: ts[0].update(parameters={})),
        "another datatype": changed(lambda ts, rq: ts[0].update(datatype="INT64")),
        "no datatype": changed(lambda ts, rq: ts[0].pop("datatype")),
        "no shape": changed(lambda ts, rq: ts[0].pop("shape")),
        "a shape of two columns": changed(lambda ts, rq: ts[0].update(shape=[len(text), 2])),
        "a shape of three dims": changed(lambda ts, rq: ts[0].update(shape=[len(text), 1, 1])),
        "a shape that is not its data's length": changed(lambda ts, rq: ts[0].update(shape=[len(text) + 1])),
        "a tensor one value short": changed(lambda ts, rq: ts[1]["data"].pop()),
        "tensors of different lengths": changed(lambda ts, rq: ts[1].update(shape=[1], data=ts[1]["data"][:1])),
        "a name twice": changed(lambda ts, rq: ts.append(dict(ts[0]))),
        "a missing column": changed(lambda ts, rq: ts.pop(next(i for i, t in enumerate(ts) if t["name"] == cat))),
        "an unknown column": changed(lambda ts, rq: ts[0].update(name=ts[0]["name"] + "x")),
        "a numeric id": changed(lambda ts, rq: rq.update(id=7)),
        "no rows": json.dumps({"inputs": tensors([{k: "" for k in text[0]}])}).replace(
            '[""]', "[]").replace(f"[{1}]", "[0]").encode(),
        "no inputs": b'{"id": "x"}',
        "inputs not a list": json.dumps({"inputs": tensors(text)[0]}).encode(),
        "trailing bytes": json.dumps(plain).encode() + b"x",
        "cut short": json.dumps(plain).encode()[:-3],
        "not JSON": b"inputs inputs",
        "empty": b"",
    }
    for what, body in declined.items():
        assert conv.transform_v2_json(body) is None, what


def test_vocabulary_keys_longer_and_shorter_than_a_table_word(synthetic):
    """Table slots hold a key's first 8 bytes: keys that share them, or differ only in length, or are longer
    than 8 bytes, must still map exactly as the feature map does (hits, and near misses -> OOV). The near misses
    are chosen to land in the slot of a vocabulary key with the same first 8 bytes, so only the length and the
    bytes after the 8th tell them apart."""
    fmap, recs = synthetic["criteo"]
    d = fmap.to_dict()
    field = next(x for x in d["fields"] if x["kind"] == "cat")

    def converter(vocab: list[str]) -> RowsToIds:
        field["vocab"], field["size"] = vocab, len(vocab) + 2
        return RowsToIds(FeatureMap.from_dict(d))

    vocab = ["abcdefghij", "abcdefgh", "abcdefghijk", "ab", "ü€ü€ü€", "abcdefghijklmnopqrstuvwxyz", "PLACEHOLDER"]
    conv = converter(vocab)  # the table's size and hash basis depend on the field and the vocabulary's size
    f = [x.name for x in conv.fmap.fields].index(field["name"])

    def slot(text: str) -> int:
        b = np.frombuffer(text.encode(), np.uint8)
        h = rows_module._table_hash(b, 0, len(b), rows_module._word8(b, 0, len(b)), conv.basis[f])
        return int(h & np.uint64(conv.tab_mask[f]))

    def colliding(pattern: str, target: str) -> str:
        return next(t for t in (pattern.format(k) for k in range(10**5)) if slot(t) == slot(target))

    vocab[-1] = colliding("abcdefghi{}", "abcdefghi")  # a longer key in the slot of the 9-byte probe below
    conv = converter(vocab)
    near = ["abcdefghi", colliding("abcdefgh{:02d}", "abcdefghij"), colliding("abcdefghi{}", "abcdefghij"),
            colliding("abcdefgh{:03d}", "abcdefghijk"), colliding("abcdefgh{}", "abcdefgh")]
    probes = vocab + near + ["abcdefghiX", "abcdefg", "abcdefghijkl", "abcdefgh\x00", "a", "ü€ü€ü", "",
                             "abcdefghijklmnopqrstuvwxyZ", "abcdefghijklmnopqrstuvwxy", "abcdefghijklmnopqrstuvwxyz!"]
    rows = []
    for i, value in enumerate(probes):
        r = dict(recs[i % len(recs)])
        r[field["source"]] = value
        rows.append(r)
    same(conv, rows, "long and short vocabulary keys")
    got = conv.transform(rows)
    assert got[:len(vocab), f].tolist() == list(range(2, len(vocab) + 2))  # every key found
    assert got[len(vocab):, f].tolist() == [0 if p == "" else 1 for p in probes[len(vocab):]]  # OOV; "": missing
