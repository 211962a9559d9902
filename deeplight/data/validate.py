"""Validation of raw rows against a dataset schema: shared by ingest (text blocks) and serving (records).

Every bad value is reported with its row and field; the typed result follows the ingested-data contract
(`arrow_schema`).

    >>> from deeplight.data.schema import get_schema
    >>> criteo = get_schema("criteo")
    >>> rec = {c.name: "" for c in criteo.columns} | {"label": "1", "I1": "-3", "C1": "68fd1e64"}
    >>> t = parse_records(criteo, [rec])
    >>> t.column("I1").to_pylist(), t.column("C2").to_pylist(), t.schema.field("label").type
    ([-3], [None], DataType(int8))
    >>> parse_records(criteo, [rec, rec | {"I2": "0x1"}])
    Traceback (most recent call last):
    deeplight.base.errors.DeeplightError: row 1, field 'I2': non-integer in integer field 'I2': '0x1'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection

import numpy as np
import pyarrow as pa

from deeplight.base.arrow import from_numpy, to_numpy, valid_mask
from deeplight.base.errors import DeeplightError
from deeplight.data.schema import DatasetSchema, valid_yymmddhh

MAX_TEXT = 2000  # characters of a bad value or line kept in a message or the quarantine

ARROW_TYPES: dict[str, pa.DataType] = {
    "label": pa.int8(), "int": pa.int64(), "cat": pa.string(), "id": pa.string(), "time": pa.int64(),
}

_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0"):ord("9") + 1] = True
_NOT_DIGIT = ~_DIGIT
_NOT_INT_BYTE = _NOT_DIGIT.copy()
_NOT_INT_BYTE[ord("-")] = False


def arrow_schema(schema: DatasetSchema) -> pa.Schema:
    """The typed ingested-data contract: the schema's columns in file order, typed by kind."""
    return pa.schema([pa.field(c.name, ARROW_TYPES[c.kind]) for c in schema.columns])


# --- validation of string columns (shared with serving) ------------------------------------------------------

@dataclass
class _Bad:
    """Bad rows of a table: row index, first failing column (None for a whole-line problem), kind, message."""

    rows: list[int] = field(default_factory=list)
    fields: list[str | None] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, row: int, fld: str | None, kind: str, reason: str) -> None:
        self.rows.append(row)
        self.fields.append(fld)
        self.kinds.append(kind)
        self.reasons.append(reason)

    def __add__(self, other: "_Bad") -> "_Bad":
        return _Bad(self.rows + other.rows, self.fields + other.fields, self.kinds + other.kinds,
                    self.reasons + other.reasons)

    def sorted(self) -> "_Bad":
        order = np.argsort(self.rows, kind="stable").tolist()
        return _Bad(*([lst[i] for i in order] for lst in (self.rows, self.fields, self.kinds, self.reasons)))


@dataclass
class _Strings:
    """Zero-copy numpy views of one Arrow string array's buffers."""

    arr: pa.Array
    offsets: np.ndarray  # n + 1 byte offsets into data
    data: np.ndarray  # uint8
    valid: np.ndarray  # bool, False where null

    @classmethod
    def of(cls, arr: pa.Array) -> "_Strings":
        n, bufs = len(arr), arr.buffers()
        itemsize = 8 if pa.types.is_large_string(arr.type) else 4
        offsets = np.frombuffer(bufs[1], dtype=np.int64 if itemsize == 8 else np.int32, count=n + 1,
                                offset=arr.offset * itemsize) if n else np.zeros(1, np.int64)
        data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
        valid = valid_mask(arr)
        return cls(arr, offsets.astype(np.int64, copy=False), data, np.ones(n, bool) if valid is None else valid)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def first_byte(self) -> np.ndarray:
        """Each value's first byte (0 for empty values)."""
        if len(self.data) == 0:
            return np.zeros(len(self.valid), np.uint8)
        out = self.data[np.minimum(self.offsets[:-1], len(self.data) - 1)]
        return np.where(self.lengths > 0, out, 0).astype(np.uint8)

    def rows_with(self, lut: np.ndarray) -> np.ndarray:
        """Bool mask of values containing a byte b with lut[b] True (one vectorised pass over the bytes)."""
        mask = np.zeros(len(self.valid), bool)
        lo, hi = int(self.offsets[0]), int(self.offsets[-1])
        pos = np.flatnonzero(lut[self.data[lo:hi]]) + lo
        if len(pos):
            mask[np.searchsorted(self.offsets, pos, side="right") - 1] = True
        return mask

    def minus_misplaced(self) -> np.ndarray:
        """Bool mask of values with a '-' anywhere but first, or that are just '-'."""
        mask = np.zeros(len(self.valid), bool)
        lo, hi = int(self.offsets[0]), int(self.offsets[-1])
        pos = np.flatnonzero(self.data[lo:hi] == ord("-")) + lo
        if len(pos):
            row = np.searchsorted(self.offsets, pos, side="right") - 1
            misplaced = (pos != self.offsets[row]) | (self.lengths[row] < 2)
            mask[row[misplaced]] = True
        return mask

    def with_validity(self, keep: np.ndarray) -> pa.Array:
        """The same strings with validity `keep` (a value not kept becomes null), as pa.string()."""
        bufs = self.arr.buffers()
        itemsize = 8 if pa.types.is_large_string(self.arr.type) else 4
        n = len(self.arr)
        offsets = bufs[1].slice(self.arr.offset * itemsize, (n + 1) * itemsize) if n else bufs[1]
        out = pa.Array.from_buffers(self.arr.type, n, [pa.py_buffer(np.packbits(keep, bitorder="little")),
                                                      offsets, bufs[2] or pa.py_buffer(b"")],
                                    null_count=int(n - np.count_nonzero(keep)))
        return out.cast(pa.string()) if itemsize == 8 else out


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _convert_column(kind: str, name: str, arr: pa.Array, may_be_null: bool
                    ) -> tuple[pa.Array, list[tuple[np.ndarray, str, Callable[[object], str]]]]:
    """One string array -> (typed array with bad values null, [(bad mask, kind, message(value)), ...])."""
    s = _Strings.of(arr)
    n, lengths = len(s.valid), s.lengths
    null_ok = (~s.valid) if may_be_null else np.zeros(n, bool)
    checks: list[tuple[np.ndarray, str, Callable[[object], str]]] = []
    if kind == "label":
        fb = s.first_byte()
        ok = s.valid & (lengths == 1) & ((fb == ord("0")) | (fb == ord("1")))
        checks.append((~ok & ~null_ok, "bad_label", lambda v: f"label {name!r} must be 0 or 1, got {_show(v)}"))
        typed = from_numpy((fb - ord("0")).astype(np.int8), mask=~ok)
    elif kind == "int":
        present = s.valid & (lengths > 0)
        bad = present & (s.rows_with(_NOT_INT_BYTE) | s.minus_misplaced())
        checks.append((bad, "non_integer", lambda v: f"non-integer in integer field {name!r}: {_show(v)}"))
        # Up to 18 digits always fits int64; longer values (rare) are checked one by one.
        digits = lengths - (s.first_byte() == ord("-"))
        overflow = np.zeros(n, bool)
        for i in np.flatnonzero(present & ~bad & (digits > 18)):
            overflow[i] = not (-(2 ** 63) <= int(arr[int(i)].as_py()) < 2 ** 63)
        checks.append((overflow, "int_overflow", lambda v: f"integer out of int64 range in field {name!r}: {_show(v)}"))
        typed = s.with_validity(present & ~bad & ~overflow).cast(pa.int64())
    elif kind == "time":
        ok = s.valid & (lengths == 8) & ~s.rows_with(_NOT_DIGIT)
        values = to_numpy(s.with_validity(ok).cast(pa.int64()), fill=0)
        ok &= valid_yymmddhh(values)
        checks.append((~ok & ~null_ok, "bad_time",
                       lambda v: f"bad time value in field {name!r}: {_show(v)} (want YYMMDDHH, a real date and hour)"))
        typed = from_numpy(values, mask=~ok)
    elif kind == "cat":
        typed = s.with_validity(s.valid & (lengths > 0))  # empty -> null
    else:  # id: kept as is
        typed = arr.cast(pa.string())
    return typed, checks


def _to_strings(table: pa.Table, name: str) -> pa.ChunkedArray:
    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DeeplightError(f"column {name!r}: cannot read {col.type} values as text") from None


def _validate(schema: DatasetSchema, table: pa.Table, optional: Collection[str] = (), drop_bad: bool = True
              ) -> tuple[pa.Table, _Bad]:
    """String table -> (typed table of the good rows, bad rows); each bad row reports its first failing column.

    drop_bad=False keeps every row (bad values null) for a caller that filters anyway.
    """
    n = table.num_rows
    columns: list[pa.ChunkedArray] = []
    marked = np.zeros(n, bool)
    bad = _Bad()
    for col in schema.columns:
        if col.name not in table.column_names:
            if col.name not in optional:
                raise DeeplightError(f"missing column {col.name!r}")
            columns.append(pa.chunked_array([pa.nulls(n, ARROW_TYPES[col.kind])]))
            continue
        strings = _to_strings(table, col.name)
        chunks, masks = [], []
        for arr in (c for c in strings.chunks if len(c)):
            typed, checks = _convert_column(col.kind, col.name, arr, col.name in optional)
            chunks.append(typed)
            masks.append(checks)
        columns.append(pa.chunked_array(chunks, ARROW_TYPES[col.kind]))
        for k in range(len(masks[0]) if masks else 0):  # same checks, in the same order, for every chunk
            mask = np.concatenate([m[k][0] for m in masks])
            kind, message = masks[0][k][1], masks[0][k][2]
            new = np.flatnonzero(mask & ~marked)  # report a row once, at its first failing column
            if len(new):
                marked[new] = True
                for i, value in zip(new.tolist(), strings.take(from_numpy(new)).to_pylist()):
                    bad.add(i, col.name, kind, message(value))
    typed = pa.Table.from_arrays(columns, schema=arrow_schema(schema))
    if bad.rows:
        if drop_bad:
            typed = typed.filter(from_numpy(~marked))
    return typed, bad.sorted()


def parse_string_table(schema: DatasetSchema, table: pa.Table, optional: Collection[str] = ()
                       ) -> tuple[pa.Table, list[tuple[int, str, str]]]:
    """Validate and type a table of raw strings (one column per schema column, by name; extra columns ignored).

    Returns (typed table of the good rows in input order, per the typed ingested-data contract;
    [(row_index, column_name, reason), ...] for the bad rows, reporting each row's first failing column).
    Columns named in `optional` may be absent or null (e.g. the label when serving); others are required.
    Rules: label exactly "0"/"1"; int matches ^-?[0-9]+$ and fits int64, empty -> null; time is 8 digits
    YYMMDDHH of a real date and hour; cat empty -> null; id kept as is.
    """
    typed, bad = _validate(schema, table, optional)
    return typed, list(zip(bad.rows, bad.fields, bad.reasons))  # type: ignore[arg-type]


def parse_records(schema: DatasetSchema, records: list[dict], optional: Collection[str] = ()) -> pa.Table:
    """Records (dicts of column -> str, number or None) to a typed table; the first bad row raises.

    Numbers are read as their decimal text (so 3 is valid for an int field, 3.5 is not). Keys not in the schema
    are ignored; a missing key raises unless the column is in `optional`.
    """
    if not isinstance(records, list):
        raise DeeplightError(f"records: expected a list of objects, got {type(records).__name__}")
    required = [c.name for c in schema.columns if c.name not in optional]
    values: dict[str, list[str | None]] = {c.name: [] for c in schema.columns}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DeeplightError(f"row {i}: expected an object, got {type(rec).__name__}")
        missing = [name for name in required if name not in rec]
        if missing:
            raise DeeplightError(f"row {i}, field {missing[0]!r}: missing")
        for name, out in values.items():
            out.append(_record_text(rec.get(name), i, name))
    table = pa.table({name: pa.array(v, pa.string()) for name, v in values.items()})
    typed, bad = parse_string_table(schema, table, optional)
    if bad:
        row, name, reason = bad[0]
        raise DeeplightError(f"row {row}, field {name!r}: {reason}")
    return typed


def _record_text(value: object, row: int, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DeeplightError(f"row {row}, field {name!r}: expected a string or a number, got {_show(value)}")
    return str(value)
