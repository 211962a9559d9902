"""Single-pass parser for clean blocks of delimited text (numba): the fast path of `deeplight.data.ingest`.

`parse_clean_block` scans every line once, splits it at the delimiter, checks each field by its kind and
returns typed Arrow arrays, one table per split, without pyarrow's CSV reader or a second validation pass. It
vouches only for blocks the exact path would accept unchanged: a wrong column count, any bad value, a byte
>= 0x80 (UTF-8 needs checking), a carriage return that is not part of a line end, or an integer longer than
18 digits (its int64 range needs checking) makes it return None, and ingest runs its exact path on that block,
which finds, explains and quarantines the bad rows. Clean blocks are nearly all of a real file.

    >>> from deeplight.data.schema import get_schema
    >>> criteo = get_schema("criteo")
    >>> line = "\\t".join(["1", "-3"] + [""] * 12 + ["68fd1e64"] * 25 + [""])
    >>> tables = parse_clean_block(criteo, (line + "\\n" + line + "\\n").encode(), lambda n: np.array([0, 2]))
    >>> tables[0].column("I1").to_pylist(), tables[1] is None, tables[2].column("C26").to_pylist()
    ([-3], True, [None])
    >>> parse_clean_block(criteo, (line.replace("-3", "x") + "\\n").encode(), lambda n: np.zeros(n)) is None
    True
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from deeplight.base.arrow import from_numpy
from deeplight.data.schema import DatasetSchema, valid_yymmddhh

try:
    import numba
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a pinned dependency; ingest then uses its exact path only
    HAVE_NUMBA = False

# Kind codes the kernel understands; ingest's ARROW_TYPES gives each its Arrow type.
KIND_CODES = {"label": 0, "int": 1, "time": 2, "cat": 3, "id": 4}
_MAX_DIGITS = 18  # any 18-digit integer fits int64; longer ones go to the exact path


if HAVE_NUMBA:
    def _u64_pointer(context, builder, aryty, ary_value, idx):  # type: ignore[no-untyped-def]
        ary = context.make_array(aryty)(context, builder, ary_value)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [idx], wraparound=False)
        return builder.bitcast(ptr, ir.IntType(64).as_pointer())

    @intrinsic
    def _load8(typingctx, arr, idx):  # type: ignore[no-untyped-def]
        """The 8 bytes arr[idx:idx + 8] of a uint8 array as one (unaligned, native-endian) uint64 load; the
        caller guarantees idx + 8 <= len(arr)."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.load(_u64_pointer(context, builder, signature.args[0], args[0], args[1]), align=1)

        return types.uint64(arr, idx), codegen

    @intrinsic
    def _store8(typingctx, arr, idx, value):  # type: ignore[no-untyped-def]
        """arr[idx:idx + 8] = the 8 bytes of `value` (the inverse of _load8)."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and isinstance(idx, types.Integer)
                and value == types.uint64):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            builder.store(args[2], _u64_pointer(context, builder, signature.args[0], args[0], args[1]), align=1)
            return context.get_dummy_value()

        return types.void(arr, idx, value), codegen

    @numba.njit(cache=True, nogil=True, inline="always")
    def _copy(dst, p, src, s, n):  # type: ignore[no-untyped-def]
        """dst[p:p + n] = src[s:s + n], 8 bytes at a time (most values here are 8-hex-digit strings)."""
        k = 0
        while k + 8 <= n:
            _store8(dst, p + k, _load8(src, s + k))
            k += 8
        while k < n:
            dst[p + k] = src[s + k]
            k += 1

    @numba.njit(cache=True, nogil=True, inline="always")
    def _digits(buf, first, end):  # type: ignore[no-untyped-def]
        """The value of the decimal digits buf[first:end] (at most 18 of them), or -1 if any byte is not a digit."""
        v = np.int64(0)
        for k in range(first, end):
            d = np.int64(buf[k]) - 48
            if d < 0 or d > 9:
                return np.int64(-1)
            v = v * 10 + d
        return v

    @numba.njit(cache=True, nogil=True)
    def _count_newlines(buf):  # type: ignore[no-untyped-def]
        n = 0
        for b in buf:
            n += b == 10
        return n

    @numba.njit(cache=True, nogil=True)
    def _scan(buf, delim, kinds, slots, n_int, n_time, n_str):  # type: ignore[no-untyped-def]
        """Parse every line of `buf`; returns (ok, labels, ints, int_valid, times, starts, lens), each 2-D
        output (lines x columns of its kind).

        ok is False as soon as a line is not clean (the other outputs are then meaningless). slots[c] is
        column c's index among the columns of its kind.
        """
        special = np.zeros(256, np.bool_)  # bytes that end a field or need a look: one test per plain byte
        special[delim] = special[10] = special[13] = True
        special[128:] = True
        size = len(buf)
        n = _count_newlines(buf)
        if size and buf[size - 1] != 10:
            n += 1  # a last line without its newline
        ncols = len(kinds)
        labels = np.empty(n, np.int8)
        ints = np.empty((n, n_int), np.int64)
        int_valid = np.empty((n, n_int), np.bool_)
        times = np.empty((n, n_time), np.int64)
        starts = np.empty((n, n_str), np.int64)
        lens = np.empty((n, n_str), np.int32)
        bad = (False, labels, ints, int_valid, times, starts, lens)
        pos = 0
        for i in range(n):
            col = 0
            while True:  # one field per iteration
                start = pos
                while pos < size:
                    b = buf[pos]
                    while not special[b]:  # the hot loop: plain bytes of a field
                        pos += 1
                        if pos == size:
                            break
                        b = buf[pos]
                    if pos == size or b == delim or b == 10:
                        break
                    if b >= 128:
                        return bad
                    if b == 13:  # allowed only as the \r of a \r\n (or of the buffer's last line)
                        if pos + 1 == size or buf[pos + 1] == 10:
                            break
                        return bad
                    pos += 1
                end = pos
                if col == ncols:
                    return bad  # too many fields
                kind, slot, length = kinds[col], slots[col], end - start
                if kind == 0:
                    if length != 1 or (buf[start] != 48 and buf[start] != 49):
                        return bad
                    labels[i] = buf[start] - 48
                elif kind == 1:
                    if length == 0:
                        ints[i, slot] = 0
                        int_valid[i, slot] = False
                    else:
                        neg = buf[start] == 45  # '-'
                        first = start + 1 if neg else start
                        if first == end or end - first > _MAX_DIGITS:
                            return bad
                        v = _digits(buf, first, end)
                        if v < 0:
                            return bad
                        ints[i, slot] = -v if neg else v
                        int_valid[i, slot] = True
                elif kind == 2:
                    if length != 8:
                        return bad
                    v = _digits(buf, start, end)
                    if v < 0:
                        return bad
                    times[i, slot] = v
                else:  # cat or id: a byte span
                    starts[i, slot] = start
                    lens[i, slot] = length
                col += 1
                if pos < size and buf[pos] == 13:
                    pos += 1  # the \r of a line end: the \n (if any) follows
                if pos < size and buf[pos] == delim:
                    pos += 1
                    continue
                pos += 1  # past the newline (or the end)
                break
            if col != ncols:
                return bad
        return (True, labels, ints, int_valid, times, starts, lens)

    @numba.njit(cache=True, nogil=True)
    def _take_rows(buf, labels, ints, int_valid, times, starts, lens, rows):  # type: ignore[no-untyped-def]
        """The selected lines' values, column-major: (labels, ints, int_valid, times, offsets, data, col_start,
        str_valid). String bytes are copied into one buffer holding the columns back to back (column c is
        data[col_start[c]:col_start[c + 1]] with int32 offsets[c] into it); `buf` is read in line order."""
        m, n_int, n_time, n_str = len(rows), ints.shape[1], times.shape[1], starts.shape[1]
        labels_out = np.empty(m, np.int8)
        ints_out = np.empty((n_int, m), np.int64)
        valid_out = np.empty((n_int, m), np.bool_)
        times_out = np.empty((n_time, m), np.int64)
        str_valid = np.empty((n_str, m), np.bool_)
        col_start = np.zeros(n_str + 1, np.int64)
        for r in rows:
            for c in range(n_str):
                col_start[c + 1] += lens[r, c]
        for c in range(n_str):
            col_start[c + 1] += col_start[c]
        data = np.empty(col_start[n_str], np.uint8)
        offsets = np.empty((n_str, m + 1), np.int32)
        fill = col_start[:n_str].copy()
        offsets[:, 0] = 0
        for j in range(m):
            r = rows[j]
            labels_out[j] = labels[r]
            for c in range(n_int):
                ints_out[c, j] = ints[r, c]
                valid_out[c, j] = int_valid[r, c]
            for c in range(n_time):
                times_out[c, j] = times[r, c]
            for c in range(n_str):
                s, ln, p = starts[r, c], lens[r, c], fill[c]
                _copy(data, p, buf, s, ln)
                fill[c] = p + ln
                offsets[c, j + 1] = p + ln - col_start[c]
                str_valid[c, j] = ln > 0
        return labels_out, ints_out, valid_out, times_out, offsets, data, col_start, str_valid


def count_lines(data: bytes | bytearray) -> int:
    """Lines in a block: newlines, plus a last line without one."""
    if not data:
        return 0
    newlines = _count_newlines(np.frombuffer(data, np.uint8)) if HAVE_NUMBA else data.count(b"\n")
    return int(newlines) + (data[-1] != 10)


def _bitmaps(valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a 2-D validity array: (Arrow bitmaps, one row of bytes each; null counts)."""
    return np.packbits(valid, axis=1, bitorder="little"), valid.shape[1] - np.count_nonzero(valid, axis=1)


def parse_clean_block(schema: DatasetSchema, data: bytes | bytearray, split_of: Callable[[int], np.ndarray]
                      ) -> list[pa.Table | None] | None:
    """One table per split (None where the split gets no rows) of a block of whole lines, in the typed ingested
    layout (`deeplight.data.validate.arrow_schema`); None if any line is not clean (see the module docstring).

    split_of(n): the split index (0, 1, 2) of each of the block's n lines. Rows keep their order within a split.
    """
    if not HAVE_NUMBA or len(schema.delimiter.encode()) != 1 or len(data) >= 2**31:  # int32 string offsets
        return None
    from deeplight.data.validate import arrow_schema

    kinds = np.array([KIND_CODES[c.kind] for c in schema.columns], np.int8)
    is_str = (kinds == KIND_CODES["cat"]) | (kinds == KIND_CODES["id"])
    slots = np.zeros(len(kinds), np.int64)
    for group in (kinds == KIND_CODES["label"], kinds == KIND_CODES["int"], kinds == KIND_CODES["time"], is_str):
        slots[group] = np.arange(np.count_nonzero(group))  # cat and id columns share the byte-span arrays
    n_int, n_time = int(np.sum(kinds == KIND_CODES["int"])), int(np.sum(kinds == KIND_CODES["time"]))
    buf = np.frombuffer(data, np.uint8)
    ok, labels, ints, int_valid, times, starts, lens = _scan(
        buf, np.uint8(ord(schema.delimiter)), kinds, slots, n_int, n_time, int(np.sum(is_str)))
    if not ok:
        return None
    split_of = split_of(len(labels))
    if n_time and not valid_yymmddhh(times).all():
        return None
    out_schema = arrow_schema(schema)
    tables: list[pa.Table | None] = [None, None, None]
    for s in range(3):
        rows = np.flatnonzero(split_of == s)
        if not len(rows):
            continue
        labels_s, ints_s, valid_s, times_s, offsets, strings, col_start, str_valid = _take_rows(
            buf, labels, ints, int_valid, times, starts, lens, rows)
        int_bits, int_nulls = _bitmaps(valid_s)
        str_bits, str_nulls = _bitmaps(str_valid)
        data_buf = pa.py_buffer(strings)
        m = len(rows)
        arrays = []
        for c, col in enumerate(schema.columns):
            slot = int(slots[c])
            if col.kind == "label":
                arrays.append(from_numpy(labels_s))
            elif col.kind == "time":
                arrays.append(from_numpy(times_s[slot]))
            elif col.kind == "int":
                nulls = int(int_nulls[slot])
                arrays.append(pa.Array.from_buffers(pa.int64(), m, [pa.py_buffer(int_bits[slot]) if nulls else None,
                                                                    pa.py_buffer(ints_s[slot])], null_count=nulls))
            else:  # cat (empty -> null) or id (kept as is)
                nulls = int(str_nulls[slot]) if col.kind == "cat" else 0
                lo, hi = int(col_start[slot]), int(col_start[slot + 1])
                arrays.append(pa.Array.from_buffers(
                    pa.string(), m, [pa.py_buffer(str_bits[slot]) if nulls else None, pa.py_buffer(offsets[slot]),
                                     data_buf.slice(lo, hi - lo)], null_count=nulls))
        tables[s] = pa.Table.from_arrays(arrays, schema=out_schema)
    return tables
