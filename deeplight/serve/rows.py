"""Raw rows (DataFrame | dict of columns | list of record dicts | one record dict) -> ids -> probabilities, columnar.

    scorer = RawRowScorer.load("model/artifacts")     # compact.npz + feature_map.json; BLAS pinned to 1 thread
    scorer.score(rows)                                # float64 click probabilities, one per row
    conv = RowsToIds(FeatureMap.load("feature_map.json"))
    ids = conv.transform(rows)            # int32 (n, F), bit-identical to parse_records + FeatureMap.transform
    ids = conv.transform(rows, np.int64)  # C-contiguous int64: what CompactModel.score wants (no copy there)

This is the serving path of every deeplight server (the MLflow pyfunc, `deeplight serve`). It computes the same
function as the training-time path (`deeplight.data.validate` + `FeatureMap.transform`, which `hash` and
`apply-features` run over Parquet), compiled for requests: tests/test_rows.py checks that both give identical
ids, and identical error rows and fields, on every kind of good, bad and missing value and on the real samples.

Design
------
0. The text route, tried first: when every value is a str (JSON requests, frames of object columns) and the column
   names are a valid set (checked once per set of names, then cached), all values go into ONE Python list (a frame's
   row-major values, the records' values via one itemgetter, a dict's columns end to end), are joined with the byte
   0x1F in one C call and encoded once; a compiled pass splits them into Arrow-style offsets + bytes, and the kernel
   of step 2 runs on those. About 10 ns a value instead of ~80 ns for building an Arrow array from Python strings,
   and no per-call pandas/Arrow bookkeeping (one raw row: ~20 us instead of ~250 us). Any other value (a number,
   None, NaN, bytes), text that cannot be encoded, or a value holding 0x1F sends the rows down the general route
   below, which gives the same ids and errors (tests/test_rows.py runs every case through both).
1. The general route: normalise the input to per-column *sources*, at most one pyarrow conversion per column (no Python loop over
   rows x fields):
     string source  : an Arrow string array (offsets + bytes + validity), e.g. object/str columns;
     int source     : int64 values + validity, e.g. int columns, or float columns whose values are integral
                      (pandas' int-with-gaps columns: 3.0 counts as 3, NaN as missing);
   All string sources are concatenated into ONE Arrow string array and all int sources into ONE int64 matrix,
   so the kernel gets a fixed set of flat buffers.
   Small batches (<= SMALL rows) take a "flat" route: all values of the batch in one Python list, converted by a
   single `pa.array(..., pa.string())` call (one C++ loop), falling back to the per-column route when the values
   are not all strings/None (numbers in the payload).
   Records: keys are checked with one C-level Counter over all keys; a record missing a required key or having a
   key the schema does not know is an error naming row and field (today: silently scored as missing).
2. One numba kernel over rows x fields validates every value exactly like `deeplight.data.validate` (label 0/1, integer
   ^-?[0-9]+$ within int64, time = 8 digits YYMMDDHH of a real date and hour), derives hour_of_day / weekday,
   applies the Criteo integer transform t(x) (exact integer thresholds from deeplight.data.feature_map), builds each
   field's key (the value's bytes, or the decimal text of t(x) / the derived int) and maps it to an id:
     hash mode  : 1 + fmix64(FNV-1a64(key, field_seed)) % (size - 1)   (same as feature_map.stable_hash)
     vocab mode : an open-addressing table over the vocabulary (built once at load, in numba; its own hash reads
                  the key 8 bytes at a time), OOV -> 1
   Missing (null or "") -> 0. The first bad value (lowest row, then schema column order) is reported with its row
   and field, with the same reason text as ingest.

Beyond the training-time path, a record that lacks a required key or has a key the schema does not know is an
error naming row and field (a misspelt key would otherwise be scored as a missing value).
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import chain
from operator import itemgetter
from typing import Any

import numba
import numpy as np
import pyarrow as pa

from deeplight.base.errors import DeeplightError
from deeplight.data.feature_map import FNV_OFFSET, FNV_PRIME, FeatureMap, _log_sq_thresholds, field_seed
from deeplight.data.schema import get_schema
from deeplight.serve.kernels import _prefetch
from deeplight.serve.pystr import gather

SMALL = 16  # at most this many rows: the flat one-call conversion is tried first

# column kinds in the kernel
K_LABEL, K_INT, K_CAT, K_ID, K_TIME = 0, 1, 2, 3, 4
_KIND = {"label": K_LABEL, "int": K_INT, "cat": K_CAT, "id": K_ID, "time": K_TIME}
# field kinds
F_INT, F_CAT, F_HOUR, F_WEEKDAY = 0, 1, 2, 3
# error codes
E_LABEL, E_NONINT, E_OVERFLOW, E_TIME = 1, 2, 3, 4

_M64 = (1 << 64) - 1


class BadRows(DeeplightError):
    """A bad value or record: the message names the row and field."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------------------------
# numba kernels

@numba.njit(cache=True, nogil=True, inline="always")
def _hash(data, lo, hi, basis):
    h = basis
    prime = np.uint64(FNV_PRIME)
    for k in range(lo, hi):
        h ^= np.uint64(data[k])
        h *= prime
    return _fmix(h)


@numba.njit(cache=True, nogil=True, inline="always")
def _word8(data, lo, hi):
    """The first (up to) 8 bytes of data[lo:hi] as one int64, little-endian, zero-padded."""
    if hi - lo >= 8:  # unrolled: the 8 loads are independent (the loop's shifts by a variable were ~10 ns a key)
        w = (np.uint64(data[lo]) | (np.uint64(data[lo + 1]) << np.uint64(8))
             | (np.uint64(data[lo + 2]) << np.uint64(16)) | (np.uint64(data[lo + 3]) << np.uint64(24))
             | (np.uint64(data[lo + 4]) << np.uint64(32)) | (np.uint64(data[lo + 5]) << np.uint64(40))
             | (np.uint64(data[lo + 6]) << np.uint64(48)) | (np.uint64(data[lo + 7]) << np.uint64(56)))
        return np.int64(w)
    w = np.uint64(0)
    for q in range(hi - lo):
        w |= np.uint64(data[lo + q]) << np.uint64(8 * q)
    return np.int64(w)


@numba.njit(cache=True, nogil=True, inline="always")
def _fmix(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@numba.njit(cache=True, nogil=True, inline="always")
def _table_hash(data, lo, hi, w, basis):
    """The vocabulary table's own hash of key data[lo:hi] whose first word is w (`_word8`): word at a time, ~4x
    faster than FNV-1a's byte at a time. Only the table uses it (built and probed with it), so it need not
    match feature_map.stable_hash, which hash mode keeps."""
    h = _fmix(basis ^ np.uint64(w) ^ (np.uint64(hi - lo) * np.uint64(0x9E3779B97F4A7C15)))
    k = lo + 8
    while k < hi:
        h = _fmix(h ^ np.uint64(_word8(data, k, hi)))
        k += 8
    return h


@numba.njit(cache=True, nogil=True)
def _build_tables(vdata, voff, vfield, basis, tab_off, tab_mask, table):
    """Insert vocabulary key v (bytes vdata[voff[v]:voff[v+1]] of field vfield[v]) into that field's table.

    A slot is (v | length << 32, the key's first 8 bytes), -1 when empty: a lookup compares the key in the slot
    itself (one memory access; keys of up to 8 bytes, e.g. Criteo's, need no other) instead of following v to
    the key's offsets and bytes (two more dependent accesses: they were two thirds of a lookup's time)."""
    for v in range(len(vfield)):
        f = vfield[v]
        w = _word8(vdata, voff[v], voff[v + 1])
        h = _table_hash(vdata, voff[v], voff[v + 1], w, basis[f])
        slot = np.int64(h & np.uint64(tab_mask[f]))
        while table[tab_off[f] + slot, 0] >= 0:
            slot = (slot + 1) & tab_mask[f]
        table[tab_off[f] + slot, 0] = v | ((voff[v + 1] - voff[v]) << 32)
        table[tab_off[f] + slot, 1] = w


@numba.njit(cache=True, nogil=True, inline="always")
def _bucket_id(data, lo, hi, basis, size):
    """Hash mode: id of the key data[lo:hi] (non-empty) among a field's `size` ids, 1 + hash % (size - 1) (id 0
    is "missing"), as feature_map.stable_hash computes it."""
    return np.int64(np.uint64(1) + _hash(data, lo, hi, basis) % np.uint64(size - 1))


@numba.njit(cache=True, nogil=True, inline="always")
def _key_id(data, lo, hi, f, basis, hashed, size, tab_off, tab_mask, table, vdata, voff, vfirst):
    """id of the key data[lo:hi] (non-empty) in field f."""
    if hashed:
        return _bucket_id(data, lo, hi, basis[f], size[f])
    return _vocab_id(data, lo, hi, basis[f], tab_off[f], tab_mask[f], table, vdata, voff, vfirst[f])


@numba.njit(cache=True, nogil=True, inline="always")
def _vocab_id(data, lo, hi, basis, base, mask, table, vdata, voff, first):
    """id of the key data[lo:hi] (non-empty) in a field's vocabulary table (at `base`, `mask` + 1 slots), 1 for
    OOV."""
    w = _word8(data, lo, hi)
    slot = np.int64(_table_hash(data, lo, hi, w, basis) & np.uint64(mask))
    return _vocab_probe(data, lo, hi, w, slot, base, mask, table, vdata, voff, first)


@numba.njit(cache=True, nogil=True, inline="always")
def _vocab_probe(data, lo, hi, w, slot, base, mask, table, vdata, voff, first):
    """`_vocab_id` from the key's first word `w` and home `slot`. One exit, no return from inside the probe loop:
    written that way LLVM compiled it ~2.5x slower."""
    n = hi - lo
    found = np.int64(1)
    while True:
        e = table[base + slot, 0]
        if e < 0:
            break
        if (e >> 32) == n and table[base + slot, 1] == w and (n <= 8 or _same_tail(data, lo, n, vdata,
                                                                                  voff[e & 0xFFFFFFFF])):
            found = (e & 0xFFFFFFFF) - first + 2
            break
        slot = (slot + 1) & mask
    return found


@numba.njit(cache=True, nogil=True, inline="always")
def _same_tail(data, lo, n, vdata, a):
    """Whether key bytes 8..n of data[lo:] equal those of the vocabulary key at vdata[a:] (keys over 8 bytes)."""
    for k in range(8, n):
        if vdata[a + k] != data[lo + k]:
            return False
    return True


@numba.njit(cache=True, nogil=True, inline="always")
def _decimal(x, buf):
    """Decimal text of int64 x into the end of buf (len 24); returns the start index."""
    pos = 24
    neg = x < 0
    u = np.uint64(-(x + 1)) + np.uint64(1) if neg else np.uint64(x)
    if u == 0:
        pos -= 1
        buf[pos] = 48
    while u > 0:
        pos -= 1
        buf[pos] = np.uint8(48 + u % np.uint64(10))
        u //= np.uint64(10)
    if neg:
        pos -= 1
        buf[pos] = 45
    return pos


@numba.njit(cache=True, nogil=True, inline="always")
def _valid_time(v):
    """(ok, hour, weekday) for a YYMMDDHH integer (as schema.valid_yymmddhh / weekday)."""
    if v < 0 or v > 99123123:
        return False, 0, 0
    yy, mm, dd, hh = v // 1000000, (v // 10000) % 100, (v // 100) % 100, v % 100
    if mm < 1 or mm > 12 or dd < 1 or hh > 23:
        return False, 0, 0
    y = 2000 + yy
    leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
    dim = 31
    if mm == 2:
        dim = 29 if leap else 28
    elif mm == 4 or mm == 6 or mm == 9 or mm == 11:
        dim = 30
    if dd > dim:
        return False, 0, 0
    # days since 1970-01-01 (H. Hinnant's days_from_civil), 1970-01-01 was a Thursday (weekday 3)
    yc = y - 1 if mm <= 2 else y
    era = yc // 400
    yoe = yc - era * 400
    mp = mm + 9 if mm <= 2 else mm - 3
    doy = (153 * mp + 2) // 5 + dd - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    return True, hh, (days + 3) % 7


@numba.njit(cache=True, nogil=True)
def _rows_kernel(n, s_off, s_data, s_valid, s_base, s_stride, i_val, i_valid, i_base, i_stride,
                 col_kind, col_src, col_nullok, fld_col, fld_kind, thresholds, basis, hashed, size,
                 tab_off, tab_mask, table, vdata, voff, vfirst, small, int_lut, int_row, out, err):
    """ids of n rows into out (n, F); err = (row, column, code) of the first bad value, or err[0] = -1.

    col_src[c]: 0 absent, 1 string source, 2 int source. Value of column c in row r: index base[c] + r * stride[c]
    of its block."""
    C = len(col_kind)
    F = len(fld_col)
    ival = np.zeros(C, np.int64)  # parsed int / time value of each column in the current row
    ipres = np.zeros(C, np.bool_)  # present (non-null, non-empty)
    buf = np.empty(24, np.uint8)
    for r in range(n):
        # 1. validate + parse every column of the row
        for c in range(C):
            kind, src = col_kind[c], col_src[c]
            ipres[c] = False
            if src == 0:
                if kind == 4 and not col_nullok[c]:
                    err[0], err[1], err[2] = r, c, 4
                    return
                continue
            # labels and times: `good` says whether a present value is acceptable; the verdict is shared below
            good = False
            v = np.int64(0)
            if src == 1:
                j = s_base[c] + r * s_stride[c]
                valid = s_valid[j]
                lo, hi = s_off[j], s_off[j + 1]
                ln = hi - lo
                if kind == 1:  # int: ^-?[0-9]+$ within int64; null or "" -> missing
                    if valid and ln > 0:
                        k = lo
                        neg = s_data[k] == 45
                        if neg:
                            k += 1
                        if k == hi:
                            err[0], err[1], err[2] = r, c, 2
                            return
                        acc = np.uint64(0)
                        over = False
                        for q in range(k, hi):
                            b = s_data[q]
                            if b < 48 or b > 57:
                                err[0], err[1], err[2] = r, c, 2
                                return
                            d = np.uint64(b - 48)
                            if acc > np.uint64(1844674407370955161) or (
                                    acc == np.uint64(1844674407370955161) and d > np.uint64(5)):
                                over = True  # beyond uint64; keep scanning for non-digits
                            else:
                                acc = acc * np.uint64(10) + d
                        lim = np.uint64(9223372036854775808) if neg else np.uint64(9223372036854775807)
                        if over or acc > lim:
                            err[0], err[1], err[2] = r, c, 3
                            return
                        if neg:
                            ival[c] = -np.int64(acc - np.uint64(1)) - 1
                        else:
                            ival[c] = np.int64(acc)
                        ipres[c] = True
                elif kind == 0:  # label: exactly "0" or "1"
                    good = ln == 1 and (s_data[lo] == 48 or s_data[lo] == 49)
                elif kind == 4:  # time: 8 digits, a real date and hour
                    good = valid and ln == 8
                    if good:
                        for q in range(lo, hi):
                            b = s_data[q]
                            if b < 48 or b > 57:
                                good = False
                                break
                            v = v * 10 + (b - 48)
                    if good:
                        good = _valid_time(v)[0]
                elif kind == 2:  # cat
                    ipres[c] = valid and ln > 0
            else:  # int source
                j = i_base[c] + r * i_stride[c]
                valid = i_valid[j]
                v = i_val[j]
                if kind == 1 or kind == 2:
                    if valid:
                        ival[c] = v
                        ipres[c] = True
                elif kind == 0:
                    good = v == 0 or v == 1
                elif kind == 4:
                    good = v >= 10000000 and v <= 99999999 and _valid_time(v)[0]
            if kind == 0:  # null allowed when the column is optional
                if (valid and not good) or (not valid and not col_nullok[c]):
                    err[0], err[1], err[2] = r, c, 1
                    return
            elif kind == 4:
                if valid and good:
                    ival[c] = v
                    ipres[c] = True
                elif valid or not col_nullok[c]:
                    err[0], err[1], err[2] = r, c, 4
                    return
        # 2. ids
        for f in range(F):
            c = fld_col[f]
            fk = fld_kind[f]
            if not ipres[c]:
                out[r, f] = 0
                continue
            if fk == 1 and col_src[c] == 1:  # cat key = the string's bytes: step 3
                continue
            x = ival[c]
            if fk == 0 and x >= -1024:  # t(x) + 1024 from the shared table, then the field's id of str(t)
                # Criteo transform t(x) = floor(ln(x)^2) for x > 2: beyond the table, the number of exact
                # thresholds <= x (a binary search; np.searchsorted allocates)
                if x < 65536:
                    t = small[x + 1024]
                else:
                    a, b = 0, len(thresholds)
                    while a < b:
                        m = (a + b) >> 1
                        if thresholds[m] <= x:
                            a = m + 1
                        else:
                            b = m
                    t = a + 1024
                out[r, f] = int_lut[int_row[f], t]
                continue
            if fk == 2:
                x = x % 100
            elif fk == 3:
                x = _valid_time(x)[2]
            # an int field here has x < -1024, which the transform leaves as it is (it changes only x > 2)
            p = _decimal(x, buf)
            out[r, f] = _key_id(buf, p, 24, f, basis, hashed, size, tab_off, tab_mask, table, vdata, voff, vfirst)
    # 3. cat fields given as strings, field by field (all values are valid by now: lookups cannot fail). A loop of
    # its own compiles to a much tighter lookup than the same call inside the row loop above (measured ~2x) and
    # keeps one field's table in cache.
    slots = np.empty(n, np.int64)
    for f in range(F):
        c = fld_col[f]
        if fld_kind[f] == 1 and col_src[c] == 1:
            _cat_column(n, f, s_base[c], s_stride[c], s_off, s_data, s_valid, basis, hashed, size, tab_off,
                        tab_mask, table, vdata, voff, vfirst, out, slots)
    err[0] = -1


@numba.njit(cache=True, nogil=True)
def _cat_column(n, f, base, stride, s_off, s_data, s_valid, basis, hashed, size, tab_off, tab_mask, table, vdata,
                voff, vfirst, out, slots):
    """ids of field f for n rows whose string values sit at base + r * stride; null or "" -> 0 (missing).
    `slots`: scratch, n int64.

    Vocabulary mode in two passes: the first hashes every key and asks the CPU for its home slot's cache line
    (`_prefetch`), the second probes. Between calls the tables fall out of L2 (a field's table is ~32 KB; all of
    them ~0.7 MB for Criteo), so a probe straight after its hash waited for its line, one key after another; the
    first pass lets those loads overlap (measured ~1.5x for the 26 Criteo fields)."""
    if hashed:
        for r in range(n):
            j = base + r * stride
            lo, hi = s_off[j], s_off[j + 1]
            if s_valid[j] and hi > lo:
                out[r, f] = _bucket_id(s_data, lo, hi, basis[f], size[f])
            else:
                out[r, f] = 0
        return
    fb, tb, tm, vf = basis[f], tab_off[f], tab_mask[f], vfirst[f]
    flat = table.reshape(-1)  # (slots x 2) as one row: _prefetch takes one index
    for r in range(n):
        j = base + r * stride
        lo, hi = s_off[j], s_off[j + 1]
        if s_valid[j] and hi > lo:
            slot = np.int64(_table_hash(s_data, lo, hi, _word8(s_data, lo, hi), fb) & np.uint64(tm))
            slots[r] = slot
            _prefetch(flat, 2 * (tb + slot))
        else:
            slots[r] = -1
    for r in range(n):
        slot = slots[r]
        if slot < 0:
            out[r, f] = 0
            continue
        j = base + r * stride
        lo, hi = s_off[j], s_off[j + 1]
        out[r, f] = _vocab_probe(s_data, lo, hi, _word8(s_data, lo, hi), slot, tb, tm, table, vdata, voff, vf)


@numba.njit(cache=True, nogil=True)
def _split_joined(joined, count, off, data):
    """Values joined by the byte 0x1F -> Arrow-style offsets + bytes (separators removed); False when the text
    does not hold exactly `count` values (a value contained the separator: the caller falls back)."""
    j = 0
    p = 0
    off[0] = 0
    for b in joined:
        if b == 31:
            j += 1
            if j >= count:
                return False
            off[j] = p
        else:
            data[p] = b
            p += 1
    if j != count - 1:
        return False
    off[count] = p
    return True


@numba.njit(cache=True, nogil=True)
def _split_lines(body, start, sep, k, off, data, bad):
    """Text lines of `k` fields separated by the byte `sep` (from byte `start`) -> Arrow-style offsets + bytes,
    row-major; a final newline is optional and "\\r\\n" ends a line too. Returns the number of rows, or -1 with
    bad = (row, fields on that line) for a line that does not hold exactly k fields (an empty line holds one)."""
    n = 0
    j = 0  # fields seen on the current line
    p = 0
    v = 0  # values written
    end = len(body)
    if end > start and body[end - 1] == 10:
        end -= 1
    if end > start and body[end - 1] == 13:
        end -= 1
    if end <= start:
        return 0
    off[0] = 0
    i = start
    while i < end:
        b = body[i]
        if b == sep or b == 10:
            j += 1
            if j > k:
                break
            v += 1
            off[v] = p
            if b == 10:
                if j != k:
                    break
                n += 1
                j = 0
        elif b == 13 and i + 1 < end and body[i + 1] == 10:
            pass  # the "\r" of "\r\n"
        else:
            data[p] = b
            p += 1
        i += 1
    if i == end:  # the last line
        j += 1
        if j == k:
            v += 1
            off[v] = p
            return n + 1
    bad[0], bad[1] = n, j
    if j > k and body[i] == sep:  # a long line: count the rest of its fields
        i += 1
        while i < end and body[i] != 10:
            if body[i] == sep:
                j += 1
            i += 1
        bad[1] = j + 1  # the last field ends at the newline or the end
    return -1


@numba.njit(cache=True, nogil=True, inline="always")
def _skip_ws(body, i, end):
    """Index of the first byte at or after i that is not JSON whitespace."""
    while i < end and (body[i] == 32 or body[i] == 10 or body[i] == 13 or body[i] == 9):
        i += 1
    return i


@numba.njit(cache=True, nogil=True, inline="always")
def _past_colon(body, i, end):
    """After a member name that ends before i: the index of its value past whitespace, ':' and whitespace, or -1
    when no colon follows."""
    i = _skip_ws(body, i, end)
    if i >= end or body[i] != 58:
        return -1
    return _skip_ws(body, i + 1, end)


@numba.njit(cache=True, nogil=True, inline="always")
def _plain_string_end(body, i, end):
    """Index just past a JSON string that starts at body[i] and holds no escape and no control byte, or -1."""
    if i >= end or body[i] != 34:
        return -1
    i += 1
    while i < end:
        b = body[i]
        if b == 34:
            return i + 1
        if b == 92 or b < 32:
            return -1
        i += 1
    return -1


@numba.njit(cache=True, nogil=True, inline="always")
def _next_item(body, i, end, close):
    """After an item of a JSON array or object (from body[i]): (index past ',' and whitespace, 1) when another
    item follows, (index past the byte `close`, 2) at the end, (i, 0) for anything else."""
    i = _skip_ws(body, i, end)
    if i < end and body[i] == 44:
        return _skip_ws(body, i + 1, end), 1
    if i < end and body[i] == close:
        return i + 1, 2
    return i, 0


@numba.njit(cache=True, nogil=True)
def _split_json_records(body, head, keys, spans):
    """A v1 request body `{"instances": [{"k": "v", ...}, ...]}` -> where its values are, row-major: value v is
    body[spans[2v]:spans[2v + 1]] (read in place, not copied: the kernel takes the body and these spans with
    doubled strides), and the first record's key spans in `keys` (start, end of each quoted key). Returns (records,
    keys per record), or (-1, 0) when the body is not in this plain form: every value a JSON string without
    escapes, every record with the first record's keys in the same order, nothing but "instances" at the top.
    `head` holds the bytes of '"instances"'. Anything else is left to the caller's general route."""
    end = len(body)
    i = _skip_ws(body, 0, end)
    if i >= end or body[i] != 123:
        return -1, 0
    i = _skip_ws(body, i + 1, end)
    if not _same_bytes(body, i, end, head):
        return -1, 0
    i = _past_colon(body, i + len(head), end)
    if i < 0:
        return -1, 0
    if i >= end or body[i] != 91:
        return -1, 0
    i = _skip_ws(body, i + 1, end)
    max_k, cap = len(keys) // 2, len(spans) // 2
    n, k, v = 0, 0, 0
    while True:  # one record a pass
        if i >= end or body[i] != 123:
            return -1, 0
        i = _skip_ws(body, i + 1, end)
        j = 0
        while True:  # one "key": "value" a pass
            if n == 0:
                ks = i
                i = _plain_string_end(body, i, end)
                if i < 0 or j >= max_k:
                    return -1, 0
                keys[2 * j], keys[2 * j + 1] = ks, i
            else:  # the same bytes as the first record's key, quotes included
                if j >= k:
                    return -1, 0
                a, length = keys[2 * j], keys[2 * j + 1] - keys[2 * j]
                if i + length > end:
                    return -1, 0
                for t in range(length):
                    if body[i + t] != body[a + t]:
                        return -1, 0
                i += length
            i = _past_colon(body, i, end)
            if i < 0:
                return -1, 0
            if i >= end or body[i] != 34 or v >= cap:
                return -1, 0
            i += 1
            spans[2 * v] = i
            while True:  # the value's bytes
                if i >= end:
                    return -1, 0
                b = body[i]
                if b == 34:
                    break
                if b == 92 or b < 32:
                    return -1, 0
                i += 1
            spans[2 * v + 1] = i
            v += 1
            j += 1
            i, state = _next_item(body, i + 1, end, 125)
            if state == 0:
                return -1, 0
            if state == 2:
                break
        if n == 0:
            k = j
        elif j != k:
            return -1, 0
        n += 1
        i, state = _next_item(body, i, end, 93)
        if state == 0:
            return -1, 0
        if state == 2:
            break
    i = _skip_ws(body, i, end)
    if i >= end or body[i] != 125:
        return -1, 0
    if _skip_ws(body, i + 1, end) != end:
        return -1, 0
    return n, k


@numba.njit(cache=True, nogil=True, inline="always")
def _same_bytes(body, i, end, word):
    """Whether body[i:] starts with the bytes of `word`."""
    if i + len(word) > end:
        return False
    for t in range(len(word)):
        if body[i + t] != word[t]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _split_v2_tensors(body, words, spans, tensors):
    """A v2 inference request body `{"id": "...", "inputs": [{"name": "I1", "shape": [n], "datatype": "BYTES",
    "data": ["5", ...]}, ...]}` -> where its string values are (value v is body[spans[2v]:spans[2v + 1]], read in
    place), and per tensor t: tensors[t] = (name start, name end, shape[0], shape[1] or -1, first value, values,
    datatype BYTES?). Members in any order; "id" optional. Returns (tensors, id start, id end), id start -1 when
    absent; (-1, 0, 0) when the body is not in this plain form (any other member, a value that is not a string
    without escapes, a shape of another form...): the caller then parses it in full. `words` holds the quoted
    member names "inputs", "data", "name", "shape", "datatype", '"BYTES"' and "id" at words[w, :words[6, w]]."""
    end = len(body)
    cap, max_t = len(spans) // 2, len(tensors)
    nt, v = 0, 0
    id_lo, id_hi = -1, -1
    seen_inputs = False
    i = _skip_ws(body, 0, end)
    if i >= end or body[i] != 123:
        return -1, 0, 0
    i = _skip_ws(body, i + 1, end)
    while True:  # one top-level member a pass
        w = 0 if _same_bytes(body, i, end, words[0, :words[6, 0]]) and not seen_inputs else \
            7 if _same_bytes(body, i, end, words[7, :words[6, 7]]) and id_lo < 0 else -1
        if w < 0:
            return -1, 0, 0
        i = _past_colon(body, i + words[6, w], end)
        if i < 0:
            return -1, 0, 0
        if w == 7:  # "id": a plain string
            e = _plain_string_end(body, i, end)
            if e < 0:
                return -1, 0, 0
            id_lo, id_hi, i = i + 1, e - 1, e
        else:  # "inputs": an array of tensor objects
            seen_inputs = True
            if i >= end or body[i] != 91:
                return -1, 0, 0
            i = _skip_ws(body, i + 1, end)
            while True:  # one tensor object a pass
                if i >= end or body[i] != 123 or nt >= max_t:
                    return -1, 0, 0
                tensors[nt, 0], tensors[nt, 2], tensors[nt, 3], tensors[nt, 4], tensors[nt, 6] = -1, -1, -1, -1, 0
                i = _skip_ws(body, i + 1, end)
                while True:  # one tensor member a pass
                    m = -1
                    for c in range(1, 5):  # "data", "name", "shape", "datatype"
                        if _same_bytes(body, i, end, words[c, :words[6, c]]):
                            m = c
                    if m < 0:
                        return -1, 0, 0
                    i = _past_colon(body, i + words[6, m], end)
                    if i < 0:
                        return -1, 0, 0
                    if m == 2:  # "name": a plain string
                        e = _plain_string_end(body, i, end)
                        if e < 0 or tensors[nt, 0] >= 0:
                            return -1, 0, 0
                        tensors[nt, 0], tensors[nt, 1], i = i + 1, e - 1, e
                    elif m == 4:  # "datatype": "BYTES"
                        if not _same_bytes(body, i, end, words[5, :words[6, 5]]) or tensors[nt, 6]:
                            return -1, 0, 0
                        tensors[nt, 6] = 1
                        i += words[6, 5]
                    else:  # "shape" [n] or [n, 1] (digits only), "data" [plain strings]
                        if i >= end or body[i] != 91 or tensors[nt, 2 if m == 3 else 4] >= 0:
                            return -1, 0, 0
                        i = _skip_ws(body, i + 1, end)
                        if m == 1:
                            tensors[nt, 4] = v
                        state = 1
                        if m == 1 and i < end and body[i] == 93:  # no values
                            i, state = i + 1, 2
                        dims = 0
                        while state == 1:  # one item a pass
                            if m == 1:
                                e = _plain_string_end(body, i, end)
                                if e < 0 or v >= cap:
                                    return -1, 0, 0
                                spans[2 * v], spans[2 * v + 1], i = i + 1, e - 1, e
                                v += 1
                            else:
                                x = np.int64(0)
                                start = i
                                while i < end and 48 <= body[i] <= 57 and i - start < 12:
                                    x = x * 10 + (body[i] - 48)
                                    i += 1
                                if i == start or dims >= 2 or (i - start > 1 and body[start] == 48):
                                    return -1, 0, 0
                                tensors[nt, 2 + dims] = x
                                dims += 1
                            i, state = _next_item(body, i, end, 93)
                        if state == 0:
                            return -1, 0, 0
                        if m == 1:
                            tensors[nt, 5] = v - tensors[nt, 4]
                    i, state = _next_item(body, i, end, 125)
                    if state == 0:
                        return -1, 0, 0
                    if state == 2:
                        break
                if tensors[nt, 0] < 0 or tensors[nt, 2] < 0 or tensors[nt, 4] < 0 or not tensors[nt, 6]:
                    return -1, 0, 0
                nt += 1
                i, state = _next_item(body, i, end, 93)
                if state == 0:
                    return -1, 0, 0
                if state == 2:
                    break
        i, state = _next_item(body, i, end, 125)
        if state == 0:
            return -1, 0, 0
        if state == 2:
            break
    if not seen_inputs or nt == 0 or _skip_ws(body, i, end) != end:
        return -1, 0, 0
    return nt, id_lo, id_hi


def _v2_words() -> np.ndarray:
    """The quoted member names `_split_v2_tensors` looks for, one per row, their lengths in row 6."""
    words = [b'"inputs"', b'"data"', b'"name"', b'"shape"', b'"datatype"', b'"BYTES"', b"", b'"id"']
    out = np.zeros((len(words), 16), np.int64)
    for w, word in enumerate(words):
        out[w, :len(word)] = list(word)
        out[6, w] = len(word)
    return out


# ------------------------------------------------------------------------------------------------------------
# input normalisation

class _Src:
    """One column's values: kind 's' (Arrow string array) or 'i' (int64 values, bool valid)."""

    __slots__ = ("kind", "arr", "vals", "valid")

    def __init__(self, kind: str, arr: Any = None, vals: Any = None, valid: Any = None):
        self.kind, self.arr, self.vals, self.valid = kind, arr, vals, valid


def _plain_text(v: Any, row: int, name: str) -> str | None:
    """The existing path's per-value rule (the pyfunc's old per-value rules + validate._record_text): slow path only."""
    if isinstance(v, np.ndarray) and v.ndim == 0:  # mlflow serve's `inputs` (no schema) wraps each value
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(v, str):
        try:
            v.encode()
        except UnicodeEncodeError:
            raise BadRows(f"row {row}, field {name!r}: not valid Unicode text: {_show(v)}") from None
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRows(f"row {row}, field {name!r}: expected a string or a number, got {_show(v)}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def _slow_strings(values: Any, name: str) -> pa.Array:
    """Per-value conversion of ONE column (mixed types: strings and numbers); rare."""
    return pa.array([_plain_text(v, i, name) for i, v in enumerate(values)], pa.string())


def _from_arrow(arr: pa.Array, values: Any, name: str) -> _Src:
    t = arr.type
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return _Src("s", arr)
    if pa.types.is_null(t):
        return _Src("s", pa.nulls(len(arr), pa.string()))
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t) and arr.null_count < len(arr) and \
                int(np.asarray(arr.fill_null(0)).max()) > 2**63 - 1:
            return _Src("s", arr.cast(pa.string()))  # beyond int64: as text (int fields say int_overflow)
        a = arr.cast(pa.int64())
        vals = np.asarray(a.fill_null(0)) if a.null_count else np.asarray(a)
        valid = np.asarray(a.is_valid()) if a.null_count else np.ones(len(a), bool)
        return _Src("i", None, vals, valid)
    if pa.types.is_floating(t):
        x = np.asarray(arr.cast(pa.float64()).fill_null(np.nan))
        valid = ~np.isnan(x)
        integral = valid & np.isfinite(x) & (np.abs(x) < 2.0**63) & (np.floor(x) == x)
        if (integral | ~valid).all():
            return _Src("i", None, np.where(integral, x, 0).astype(np.int64), valid)
        return _Src("s", _slow_strings(x.tolist(), name))  # 3.5, inf, 1e30: as the existing path's text
    # bool, bytes, dates, lists, ...: the first non-null value is refused like the existing path does
    if hasattr(values, "tolist"):
        values = values.tolist()
    return _Src("s", _slow_strings(values, name))


def _no_nan_text(series: Any, name: str, where: Any = None) -> None:
    """A NaN among a text column's values is a key the row did not have: pandas fills a record's missing keys
    with NaN when it builds a frame from records (MLflow's `dataframe_records`), while a null sent for a
    missing value stays None. So NaN in a text column is an error naming the row and field."""
    values = series.to_numpy() if hasattr(series, "to_numpy") else series
    try:
        nan = values != values  # only NaN differs from itself; None, strings and numbers do not
    except TypeError:  # pd.NA: refused later by value
        return
    if nan.any():
        i = int(np.flatnonzero(nan)[0])
        if where is not None:  # values picked from a row-major frame: where(i) -> (row, field)
            i, name = where(i)
        raise BadRows(f"row {i}, field {name!r}: missing (no value given; send null or \"\" for an empty value; "
                      "pandas.read_csv: pass keep_default_na=False)")


def _column(values: Any, name: str) -> _Src:
    """One column (pandas Series, numpy array, list, Arrow array) -> a source; at most one Arrow conversion."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return _from_arrow(values, values, name)
    try:
        arr = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
        if hasattr(values, "tolist"):
            values = values.tolist()
        return _Src("s", _slow_strings(values, name))
    return _from_arrow(arr, values, name)


class RowsToIds:
    """Compiled from a feature map: raw rows -> ids in one numba pass (see the module docstring)."""

    def __init__(self, fmap: FeatureMap, optional: tuple[str, ...] | None = None):
        self.fmap = fmap
        self.schema = schema = get_schema(fmap.dataset)
        if optional is None:
            optional = tuple(c.name for c in schema.columns if c.kind in ("label", "id"))
        self.optional = frozenset(optional)
        self.names = [c.name for c in schema.columns]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.required = [n for n in self.names if n not in self.optional]
        self.col_kind = np.array([_KIND[c.kind] for c in schema.columns], np.int8)
        self.col_nullok = np.array([c.name in self.optional for c in schema.columns], np.bool_)
        F = len(fmap.fields)
        self.fld_col = np.array([self.index[f.source] for f in fmap.fields], np.int64)
        self.fld_kind = np.array([F_INT if f.kind == "int" else F_CAT if f.kind == "cat" else
                                  F_HOUR if f.name == "hour_of_day" else F_WEEKDAY for f in fmap.fields], np.int8)
        for f in fmap.fields:
            if f.kind == "derived" and f.name not in ("hour_of_day", "weekday"):
                raise DeeplightError(f"serving: derived field {f.name!r} is not supported")
        self.thresholds = np.ascontiguousarray(_log_sq_thresholds(), np.int64)
        self.basis = np.array([(FNV_OFFSET ^ field_seed(f.name)) & _M64 for f in fmap.fields], np.uint64)
        self.hashed = fmap.mode == "hash"
        self.size = np.array(fmap.field_sizes, np.int64)
        self.tab_off = np.zeros(F, np.int64)
        self.tab_mask = np.zeros(F, np.int64)
        self.vfirst = np.zeros(F, np.int64)
        if self.hashed:
            self.table = np.full((1, 2), -1, np.int64)
            self.vdata, self.voff = np.zeros(1, np.uint8), np.zeros(1, np.int64)
        else:
            vocabs = [f.vocab or [] for f in fmap.fields]
            enc = [v.encode() for voc in vocabs for v in voc]
            if len(enc) >= 2**31:  # a table slot holds v in 32 bits
                raise DeeplightError(f"serving: {len(enc):,} vocabulary entries, at most 2**31 - 1 supported")
            self.vdata = np.frombuffer(b"".join(enc) or b"\0", np.uint8).copy()
            self.voff = np.zeros(len(enc) + 1, np.int64)
            np.cumsum([len(b) for b in enc], out=self.voff[1:])
            vfield = np.repeat(np.arange(F), [len(v) for v in vocabs]).astype(np.int64)
            self.vfirst = np.concatenate([[0], np.cumsum([len(v) for v in vocabs])[:-1]]).astype(np.int64)
            caps = [1 << max(1, (2 * len(v)).bit_length()) for v in vocabs]  # load factor <= 0.5
            self.tab_off = np.concatenate([[0], np.cumsum(caps)[:-1]]).astype(np.int64)
            self.tab_mask = np.array(caps, np.int64) - 1
            self.table = np.full((int(sum(caps)), 2), -1, np.int64)
            _build_tables(self.vdata, self.voff, vfield, self.basis, self.tab_off, self.tab_mask, self.table)
        # int fields: the id of every key str(t), t in [-1024, 1906], computed by the feature map itself
        from deeplight.data.feature_map import _int_base_keys, _small_table
        self.small = np.ascontiguousarray(_small_table(), np.int64)
        int_fields = [j for j, f in enumerate(fmap.fields) if f.kind == "int"]
        keys = _int_base_keys()
        self.int_row = np.zeros(F, np.int64)
        self.int_lut = np.zeros((max(1, len(int_fields)), len(keys)), np.int64)
        ref = FeatureMap.from_dict(fmap.to_dict())  # a copy: _lookup caches
        for r, j in enumerate(int_fields):
            self.int_row[j] = r
            self.int_lut[r] = ref._lookup(j, keys)
        self._fixed = (self.col_kind, None, self.col_nullok, self.fld_col, self.fld_kind, self.thresholds,
                       self.basis, self.hashed, self.size, self.tab_off, self.tab_mask, self.table, self.vdata,
                       self.voff, self.vfirst, self.small, self.int_lut, self.int_row)
        self._known = frozenset(self.names)
        self._getter = itemgetter(*self.names)
        self._getter_req = itemgetter(*self.required)
        self.fast_text = True  # the joined-text route (`_text_route`); tests turn it off to compare the routes
        # from this many values up the text route gathers the str objects' bytes (below it a join is cheaper:
        # the gather's fixed cost is ~10 us); tests set 0 and 2**62 to compare the two
        self.gather_min = 512
        self._plans: dict[tuple, _Plan | None] = {}
        self._zeros = np.zeros(len(self.names), np.int64)
        self._all_valid = np.ones(1024, np.bool_)
        self._ones = np.ones(len(self.names), np.int64)
        self.transform([{n: None for n in self.required} | {c.name: "14102100" for c in schema.columns
                                                            if c.kind == "time"}])  # compile / load the cache

    # -- input forms --------------------------------------------------------------------------------------------

    def _unknown(self, row: int, name: str) -> BadRows:
        return BadRows(f"row {row}, field {name!r}: unknown field (the {self.schema.name} columns are "
                       f"{', '.join(self.names)})")

    def _sources_records(self, records: list) -> tuple[int, dict[str, _Src] | None, list | None]:
        n = len(records)
        try:
            counts = Counter(chain.from_iterable(records))  # every key of every record, one C loop
        except TypeError:
            counts = None
        if counts is None or not all(isinstance(r, dict) for r in records):
            i = next(i for i, r in enumerate(records) if not isinstance(r, dict))
            raise BadRows(f"row {i}: expected an object, got {type(records[i]).__name__}")
        if len(counts) > len(self._known) or not counts.keys() <= self._known \
                or any(counts[k] != n for k in self.required):
            for i, r in enumerate(records):  # error path: find the first offending record
                for k in r:
                    if k not in self._known:
                        raise self._unknown(i, k)
                for k in self.required:
                    if k not in r:
                        raise BadRows(f"row {i}, field {k!r}: missing")
        present = [k for k in self.names if counts.get(k)]
        if len(present) == len(self.names) and all(counts[k] == n for k in present):
            flat = list(chain.from_iterable(map(self._getter, records)))  # row-major, all columns
            cols = self.names
        elif all(counts[k] == n for k in present):
            cols = [k for k in self.names if k in present]
            flat = list(chain.from_iterable(map(itemgetter(*cols), records))) if len(cols) > 1 else \
                [r[cols[0]] for r in records]
        else:  # an optional column given in some records only
            cols, flat = present, None
        if flat is not None:
            return n, None, (cols, flat)
        return n, {k: _column([r.get(k) for r in records], k) for k in cols}, None

    def sources(self, rows: Any) -> tuple[int, dict[str, _Src]]:
        """(rows, {column: source}) for any accepted input form."""
        import pandas as pd

        flat = None
        if isinstance(rows, dict):
            if rows and not any(isinstance(v, (list, tuple, np.ndarray, pd.Series, pa.Array, pa.ChunkedArray))
                                for v in rows.values()):
                rows = [rows]  # one record
            else:
                lens = {len(v) for v in rows.values()}
                if len(lens) > 1:
                    raise BadRows(f"columns of different lengths: {sorted(lens)}")
                n = lens.pop() if lens else 0
                self._check_columns(rows.keys(), n, lambda k: rows[k])
                if n <= SMALL:
                    cols = [k for k in self.names if k in rows]
                    flat = (cols, list(chain.from_iterable(rows[k] for k in cols)), "col")
                else:
                    return n, {k: _column(rows[k], k) for k in self.names if k in rows}
        if isinstance(rows, pd.DataFrame):
            n = len(rows)
            names = [str(k) for k in rows.columns]
            if len(set(names)) != len(names):
                raise BadRows("duplicate column names")
            self._check_columns(names, n, lambda k: rows[k])
            if n and all(dt == object for dt in rows.dtypes):
                # All text (pandas 2's str columns, MLflow's frames from JSON): one Arrow conversion for the
                # whole frame, row-major, instead of one per column (39 per call cost ~0.5 ms for one row).
                values = rows.to_numpy(dtype=object).ravel()
                flat = (names, values, "row", [k in self.required for k in names])
            else:
                frame = _frame_columns(rows)
                srcs = {k: _column(frame[k], k) for k in self.names if k in frame}
                for k, src in srcs.items():
                    if k in self.required and src.kind == "s" and src.arr.null_count and rows[k].dtype == object:
                        _no_nan_text(rows[k], k)
                return n, srcs
        elif isinstance(rows, list):
            n, srcs, fl = self._sources_records(rows)
            if srcs is not None:
                return n, srcs
            flat = (fl[0], fl[1], "row")
        elif flat is None:
            raise BadRows(f"expected a DataFrame, a list of row objects or a dict of columns, got "
                          f"{type(rows).__name__}")
        if flat is None:
            return n, {}
        cols, values, order = flat[:3]
        if n and len(values):
            try:
                arr = pa.array(values, from_pandas=True)  # all strings / None / NaN: one C++ loop
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                    OverflowError):
                arr = None
            if arr is not None and arr.null_count and len(flat) > 3:  # a frame: NaN in text is a missing key
                nulls = np.flatnonzero(~np.asarray(arr.is_valid()))
                required = np.asarray(flat[3])[nulls % len(cols)]
                _no_nan_text(values[nulls[required]], "", lambda i: (int(nulls[required][i]) // len(cols),
                                                                   cols[int(nulls[required][i]) % len(cols)]))
            if arr is not None and pa.types.is_null(arr.type):
                arr = pa.nulls(len(arr), pa.string())
            if arr is not None and arr.type == pa.string():  # not binary (bytes are refused below)
                return n, {"__flat__": _Src("s", arr), "__cols__": cols, "__order__": order}  # type: ignore
        k = len(cols)  # numbers among the values: column by column
        if order == "row":
            return n, {c: _column(values[j::k], c) for j, c in enumerate(cols)}
        return n, {c: _column(values[j * n:(j + 1) * n], c) for j, c in enumerate(cols)}

    def _check_columns(self, names: Any, n: int, get: Any) -> None:
        for k in names:
            if k not in self._known:
                col = get(k)
                nn = np.flatnonzero(~pd_isna(col)) if n else []
                raise self._unknown(int(nn[0]) if len(nn) else 0, k)
        for k in self.required:
            if k not in names:
                raise BadRows(f"row 0, field {k!r}: missing (no such column)")

    # -- the joined-text route: rows whose values are all str, by far the common case ---------------------------

    def _plan(self, names: tuple) -> "_Plan | None":
        """The column layout of inputs with these column names (cached), or None when the names are not a valid
        set (unknown, duplicate, a required one absent): the general route then reports the error."""
        try:
            return self._plans[names]
        except KeyError:
            pass
        plan = None
        if all(type(k) is str for k in names) and len(set(names)) == len(names) and set(names) <= self._known \
                and all(k in names for k in self.required):
            plan = _Plan(names, self.index, len(self.names))
        if len(self._plans) < 256:
            self._plans[names] = plan
        return plan

    def _text_route(self, rows: Any) -> tuple[int, "_Plan", str, list] | None:
        """(n, plan, "row" | "col", the values) when `rows` is a frame of object columns (its values as a 2-D object
        array), a list of records or a dict of list columns (every value in one list), with valid column names;
        else None (the general route decides)."""
        import pandas as pd

        if type(rows) is list:
            if not rows or type(rows[0]) is not dict:
                return None
            plan = self._plan(tuple(rows[0]))
            if plan is None:
                return None
            try:  # a record without one of the first record's keys raises KeyError
                values = list(chain.from_iterable(map(plan.getter, rows))) if plan.k > 1 else \
                    list(map(plan.getter, rows))
            except (KeyError, TypeError):
                return None
            if sum(map(len, rows)) != len(rows) * plan.k:  # a record with an extra key
                return None
            return len(rows), plan, "row", values
        if type(rows) is dict:
            if not rows:
                return None
            if all(type(v) is list for v in rows.values()):
                n = len(next(iter(rows.values())))
                plan = self._plan(tuple(rows))
                if plan is None or n == 0 or any(len(v) != n for v in rows.values()):
                    return None
                return n, plan, "col", list(chain.from_iterable(rows.values()))
            if any(isinstance(v, (list, tuple, np.ndarray, pd.Series, pa.Array, pa.ChunkedArray))
                   for v in rows.values()):
                return None
            return self._text_route([rows])  # one record
        if isinstance(rows, pd.DataFrame):
            n = len(rows)
            try:
                text = all(b.dtype == object for b in rows._mgr.blocks)
            except AttributeError:
                return None
            plan = self._plan(tuple(rows.columns)) if n and text else None
            if plan is None:
                return None
            return n, plan, "row", rows.to_numpy(dtype=object)
        return None

    def _transform_text(self, n: int, plan: "_Plan", order: str, values: list | np.ndarray,
                        dtype: Any) -> np.ndarray | None:
        """ids of all-str values: from `gather_min` values up, their bytes gathered from the str objects by
        compiled code (`deeplight.serve.pystr`, ~6 ns a value), else (and for text that is not ASCII) joined
        into one UTF-8 buffer (one C join + one compiled split, ~35 ns a value, against ~80 ns for building an
        Arrow array from Python strings). None when a value is not a str, cannot be encoded, or contains the
        join's separator: the general route then handles the rows. `values`: a list (`order` says row- or
        column-major) or a 2-D object array of rows."""
        count = n * plan.k
        if count >= self.gather_min:
            got = gather(values, n, plan.k, order)
            if got is not None:  # row-major whatever the order of `values`
                return self._text_kernel(n, plan.col_src, plan.pos, plan.stride_row, got[0], got[1], dtype)
        if isinstance(values, np.ndarray):
            values = values.ravel().tolist()
        try:
            joined = "\x1f".join(values).encode()
        except (TypeError, UnicodeEncodeError):
            return None
        off = np.empty(count + 1, np.int64)
        data = np.empty(max(1, len(joined)), np.uint8)
        if not _split_joined(np.frombuffer(joined, np.uint8), count, off, data):
            return None
        if order == "row":
            return self._text_kernel(n, plan.col_src, plan.pos, plan.stride_row, off, data, dtype)
        return self._text_kernel(n, plan.col_src, plan.pos * n, self._ones, off, data, dtype)

    def _text_kernel(self, n: int, col_src: np.ndarray, base: np.ndarray, stride: np.ndarray, off: np.ndarray,
                     data: np.ndarray, dtype: Any, first_line: int | None = None,
                     valid_count: int | None = None) -> np.ndarray:
        """The kernel over text values (offsets + bytes, all valid): value of column c in row r at base[c] +
        r * stride[c], its bytes data[off[j]:off[j + 1]] for j that index. `first_line`: the line number of row 0
        in a text body, named in errors. `valid_count`: the highest index + 1 (default len(off) - 1)."""
        out = np.empty((n, len(self.fld_col)), np.int64 if dtype == np.int64 else np.int32)
        err = np.empty(3, np.int64)
        fx = self._fixed
        valid = self._valid(len(off) - 1 if valid_count is None else valid_count)
        _rows_kernel(n, off, data, valid, base, stride, _EMPTY_I, _EMPTY_B, self._zeros, self._ones, fx[0], col_src,
                     *fx[2:], out, err)
        if err[0] >= 0:
            row, c = int(err[0]), int(err[1])
            j = int(base[c] + row * stride[c])
            value = bytes(data[off[j]:off[j + 1]]).decode("utf-8", "backslashreplace")
            where = "" if first_line is None else f" (line {row + first_line})"
            raise self._error(row, c, int(err[2]), {self.names[c]: ("v", value)}, where)
        return out

    def _valid(self, count: int) -> np.ndarray:
        """All-true validity for `count` values (text has no nulls), grown and reused across calls."""
        if len(self._all_valid) < count:
            self._all_valid = np.ones(max(count, 2 * len(self._all_valid)), np.bool_)
        return self._all_valid

    def transform_json_records(self, body: bytes, dtype: Any = np.int32) -> np.ndarray | None:
        """ids of a v1 JSON request body `{"instances": [{column: "value", ...}, ...]}` split by one compiled pass
        straight into the kernel's buffers, with no Python object per value (`orjson.loads` alone costs more
        than scoring the rows). None when the body is not in the plain form that pass reads (ASCII, every value
        a string without escapes, every record's keys those of the first record in the same order, a valid set
        of column names): the caller then decodes the JSON and calls `transform`, which gives the same ids, or
        the error naming row and field. Values found bad here get that same error."""
        if not self.fast_text or not isinstance(body, bytes) or not body.isascii():
            return None
        cap = len(body) // 5  # each value takes 5 bytes at least, '"":""' (bytes.count('"') took ~0.6 ms)
        if cap == 0:
            return None
        keys = np.empty(2 * len(self.names), np.int64)
        spans = np.empty(2 * cap, np.int64)
        data = np.frombuffer(body, np.uint8)
        n, k = _split_json_records(data, _INSTANCES, keys, spans)
        if n <= 0:
            return None
        plan = self._plan(tuple(body[keys[2 * j] + 1:keys[2 * j + 1] - 1].decode() for j in range(k)))
        if plan is None:
            return None
        # value v of the kernel's view is spans[2v]:spans[2v + 1]: every index doubled
        return self._text_kernel(n, plan.col_src, 2 * plan.pos, 2 * plan.stride_row, spans, data, dtype,
                                 valid_count=2 * n * k)

    def transform_v2_json(self, body: bytes, dtype: Any = np.int32) -> tuple[np.ndarray, str | None] | None:
        """(ids, the request's "id" or None) of a v2 inference request body holding one BYTES tensor per raw
        column, shape [n] or [n, 1], read by one compiled pass straight into the kernel's buffers (as
        `transform_json_records` reads v1 bodies). None when the body is not in the plain form that pass reads
        (ASCII; members "id" and "inputs" only, and "name", "shape", "datatype", "data" in each tensor; every
        value a string without escapes; tensors of one length naming a valid set of columns): the caller then
        parses it in full and gets the same ids, or the error naming row and field. Values found bad here get
        that same error."""
        if not self.fast_text or not isinstance(body, bytes) or not body.isascii() or len(body) < 8:
            return None
        spans = np.empty(2 * (len(body) // 3), np.int64)  # a value takes 3 bytes at least, '"",'
        tensors = np.empty((2 * len(self.names) + 1, 7), np.int64)
        data = np.frombuffer(body, np.uint8)
        nt, id_lo, id_hi = _split_v2_tensors(data, _V2_WORDS, spans, tensors)
        if nt <= 0:
            return None
        t = tensors[:nt]
        n = int(t[0, 2])
        if (t[:, 2] != n).any() or (t[:, 5] != n).any() or ((t[:, 3] != -1) & (t[:, 3] != 1)).any() or n == 0:
            return None  # shapes that disagree with their data or each other: the full parse says which
        plan = self._plan(tuple(body[lo:hi].decode() for lo, hi in t[:, :2].tolist()))
        if plan is None:
            return None
        base = np.zeros(len(self.names), np.int64)
        base[plan.col_src == 1] = 2 * t[plan.pos[plan.col_src == 1], 4]
        ids = self._text_kernel(n, plan.col_src, base, 2 * self._ones, spans, data, dtype, valid_count=2 * n * nt)
        return ids, (body[id_lo:id_hi].decode() if id_lo >= 0 else None)

    # -- raw text lines: the rows as they are in the dataset's files -------------------------------------------

    def transform_lines(self, body: bytes, sep: str = "\t", header: bool | None = None,
                        dtype: Any = np.int32) -> np.ndarray:
        """ids of raw text lines, the dataset's file format (Criteo: tab-separated, no header; Avazu: CSV with a
        header), split by one compiled pass straight into the kernel's buffers: no Python object per value.

        Each line holds either every column of the schema in its order (label and id included, as in train
        files), or the feature columns only (no label, no id: as in test files), or the columns a first
        header line names (`header`: True/False, or None to recognise a header by its names). Quoted CSV fields
        (a '"' in the body) are parsed by Python's csv module first. A line with the wrong number of fields, or
        bytes that are not UTF-8, is an error naming its row and line."""
        if len(sep) != 1 or sep in "\r\n\"":
            raise BadRows(f"separator {sep!r}: want one character such as a tab or a comma")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise BadRows(f"expected the text lines as bytes, got {type(body).__name__}")
        body = bytes(body)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            line = body.count(b"\n", 0, e.start)
            field = body.count(sep.encode(), body.rfind(b"\n", 0, e.start) + 1, e.start)
            raise BadRows(f"line {line + 1}: field {field + 1} is not valid UTF-8 text") from None
        if not body.strip(b"\r\n"):
            return np.empty((0, len(self.fld_col)), np.int64 if dtype == np.int64 else np.int32)
        first_end = body.find(b"\n")
        first = (body if first_end < 0 else body[:first_end]).rstrip(b"\r").decode().split(sep)
        if header is None:  # mostly column names, a feature among them: a header (a misspelt one is named below)
            named = [name for name in first if name in self._known]
            header = 2 * len(named) >= len(first) and any(name not in self.optional for name in named)
        start = 0
        if header:
            plan = self._plan(tuple(first))
            if plan is None:
                self._check_header(first)
            start = len(body) if first_end < 0 else first_end + 1
        elif len(first) == len(self.names):
            plan = self._plan(tuple(self.names))
        elif len(first) == len(self.required):
            plan = self._plan(tuple(self.required))
        else:
            raise BadRows(f"line 1: {len(first)} fields; expected {len(self.names)} (every {self.schema.name} "
                          f"column) or {len(self.required)} (the feature columns), or a header line")
        assert plan is not None
        if b'"' in body and sep == ",":
            return self._transform_csv_quoted(body, start, plan, dtype)
        lines = body.count(b"\n", start) + 1
        off = np.empty(lines * plan.k + 1, np.int64)
        data = np.empty(max(1, len(body) - start), np.uint8)
        bad = np.zeros(2, np.int64)
        n = _split_lines(np.frombuffer(body, np.uint8), start, ord(sep), plan.k, off, data, bad)
        if n < 0:
            row = int(bad[0])
            raise BadRows(f"row {row} (line {row + 1 + bool(header)}): {int(bad[1])} fields, expected "
                          f"{plan.k} ({', '.join(plan.names)})")
        return self._text_kernel(n, plan.col_src, plan.pos, plan.stride_row, off, data, dtype, 1 + bool(header))

    def _check_header(self, names: list) -> None:
        """The error for a header line that does not name a valid set of columns (row 0, like the other forms)."""
        for name in names:
            if name not in self._known:
                raise BadRows(f"row 0, field {name!r}: unknown field in the header line (the {self.schema.name} "
                              f"columns are {', '.join(self.names)})")
        dup = [name for name in names if names.count(name) > 1]
        if dup:
            raise BadRows(f"field {dup[0]!r} twice in the header line")
        for name in self.required:
            if name not in names:
                raise BadRows(f"row 0, field {name!r}: missing (no such column in the header line)")

    def _transform_csv_quoted(self, body: bytes, start: int, plan: "_Plan", dtype: Any) -> np.ndarray:
        """CSV with quoted fields: Python's csv module, then the joined-text route (rare: the datasets' files
        quote nothing)."""
        import csv
        import io

        reader = csv.reader(io.StringIO(body[start:].decode(), newline=""))
        first_line = 1 + body.count(b"\n", 0, start)
        rows = []
        for fields in reader:
            if len(fields) != plan.k:
                raise BadRows(f"row {len(rows)} (line {first_line + reader.line_num - 1}): {len(fields)} fields, "
                              f"expected {plan.k} ({', '.join(plan.names)})")
            rows.append(fields)
        out = self._transform_text(len(rows), plan, "row", list(chain.from_iterable(rows)), dtype)
        if out is None:  # a value holding the byte 0x1F
            return self.transform([dict(zip(plan.names, fields)) for fields in rows], dtype)
        return out

    # -- the transform ------------------------------------------------------------------------------------------

    def transform(self, rows: Any, dtype: Any = np.int32) -> np.ndarray:
        if self.fast_text:
            route = self._text_route(rows)
            if route is not None:
                out = self._transform_text(*route, dtype)
                if out is not None:
                    return out
        n, srcs = self.sources(rows)
        F = len(self.fld_col)
        out = np.empty((n, F), np.int64 if dtype == np.int64 else np.int32)
        if n == 0:
            return out
        C = len(self.names)
        col_src = np.zeros(C, np.int8)
        s_base = np.zeros(C, np.int64)
        s_stride = np.ones(C, np.int64)
        i_base = np.zeros(C, np.int64)
        i_stride = np.ones(C, np.int64)
        i_val, i_valid = _EMPTY_I, _EMPTY_B
        if "__flat__" in srcs:
            sarr = srcs["__flat__"].arr
            cols, order = srcs["__cols__"], srcs["__order__"]
            k = len(cols)
            for j, name in enumerate(cols):
                c = self.index[name]
                col_src[c] = 1
                if order == "row":
                    s_base[c], s_stride[c] = j, k
                else:
                    s_base[c], s_stride[c] = j * n, 1
            sources = {name: ("s", sarr, s_base[self.index[name]], s_stride[self.index[name]]) for name in cols}
        else:
            s_parts, i_parts, sources = [], [], {}
            for name, src in srcs.items():
                c = self.index[name]
                if src.kind == "s":
                    col_src[c], s_base[c] = 1, n * len(s_parts)
                    s_parts.append(src.arr)
                    sources[name] = ("s", src.arr, 0, 1)
                else:
                    col_src[c], i_base[c] = 2, n * len(i_parts)
                    i_parts.append(src)
                    sources[name] = ("i", src.vals, 0, 1)
            if not s_parts:
                sarr = pa.nulls(1, pa.string())
            elif len(s_parts) == 1:
                sarr = s_parts[0]
            else:
                chunks = [a.chunk(0) if isinstance(a, pa.ChunkedArray) and a.num_chunks == 1 else a for a in s_parts]
                types = {a.type for a in chunks}
                if len(types) > 1:  # string and large_string (pandas 3's str columns): one common type
                    chunks = [a.cast(pa.large_string()) for a in chunks]
                sarr = pa.concat_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
                                         for a in chunks])
            if i_parts:
                i_val = np.concatenate([p.vals for p in i_parts])
                i_valid = np.concatenate([p.valid for p in i_parts])
        if isinstance(sarr, pa.ChunkedArray):
            sarr = sarr.combine_chunks()
        if sarr.type not in (pa.string(), pa.large_string()):
            sarr = sarr.cast(pa.large_string())
        s_off, s_data, s_valid = _buffers(sarr)
        err = np.empty(3, np.int64)
        fx = self._fixed
        _rows_kernel(n, s_off, s_data, s_valid, s_base, s_stride, i_val, i_valid, i_base, i_stride,
                     fx[0], col_src, *fx[2:], out, err)
        if err[0] >= 0:
            raise self._error(int(err[0]), int(err[1]), int(err[2]), sources)
        return out

    def _error(self, row: int, c: int, code: int, sources: dict, where: str = "") -> BadRows:
        name = self.names[c]
        src = sources.get(name)
        if src is None:
            value = None
        elif src[0] == "v":
            value = src[1]
        elif src[0] == "s":
            value = src[1][int(src[2] + row * src[3])].as_py()
        else:
            value = str(int(src[1][int(src[2] + row * src[3])]))  # the text the existing path would have seen
        reason = {
            E_LABEL: f"label {name!r} must be 0 or 1, got {_show(value)}",
            E_NONINT: f"non-integer in integer field {name!r}: {_show(value)}",
            E_OVERFLOW: f"integer out of int64 range in field {name!r}: {_show(value)}",
            E_TIME: f"bad time value in field {name!r}: {_show(value)} (want YYMMDDHH, a real date and hour)",
        }[code]
        return BadRows(f"row {row}{where}, field {name!r}: {reason}")


class _Plan:
    """Where each schema column sits in an input with these column names (`RowsToIds._plan`)."""

    __slots__ = ("names", "k", "getter", "col_src", "pos", "stride_row")

    def __init__(self, names: tuple, index: dict[str, int], n_columns: int):
        self.names, self.k = names, len(names)
        self.getter = itemgetter(*names)
        self.col_src = np.zeros(n_columns, np.int8)  # 1: a string source; 0: absent
        self.pos = np.zeros(n_columns, np.int64)  # the column's position among the input's columns
        for j, name in enumerate(names):
            self.col_src[index[name]], self.pos[index[name]] = 1, j
        self.stride_row = np.full(n_columns, self.k, np.int64)


def _frame_columns(df: Any) -> dict[str, Any]:
    """{column name: its values} without building a Series per column: pandas' blocks (private API: one
    Arrow-backed ExtensionArray per str column in pandas 3, 2-D numpy blocks for int/float/object), falling back
    to df[name] when the internals differ."""
    try:
        out = {}
        names = df.columns.tolist()
        for blk in df._mgr.blocks:
            vals, locs = blk.values, blk.mgr_locs.as_array
            if getattr(vals, "ndim", 1) == 2:
                for i, loc in enumerate(locs.tolist()):
                    out[str(names[loc])] = vals[i]
            else:
                out[str(names[int(locs[0])])] = getattr(vals, "_pa_array", vals)
        if len(out) == df.shape[1]:
            return out
    except (AttributeError, TypeError, IndexError):
        pass
    return {str(k): df[k] for k in df.columns}


def pd_isna(col: Any) -> np.ndarray:
    import pandas as pd

    return np.asarray(pd.isna(pd.Series(col, dtype=object) if isinstance(col, (list, tuple)) else col), bool)


_EMPTY_I = np.zeros(1, np.int64)
_INSTANCES = np.frombuffer(b'"instances"', np.uint8)
_V2_WORDS = _v2_words()
_EMPTY_B = np.zeros(1, np.bool_)


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 offsets (n + 1), uint8 data, bool valid) of an Arrow string array."""
    n, bufs = len(arr), arr.buffers()
    width = np.int64 if arr.type == pa.large_string() else np.int32
    offsets = np.frombuffer(bufs[1], width, count=arr.offset + n + 1)[arr.offset:].astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    if arr.null_count == 0:
        valid = np.ones(n, np.bool_)
    else:
        packed = np.frombuffer(bufs[0], np.uint8, count=(arr.offset % 8 + n + 7) // 8, offset=arr.offset // 8)
        valid = np.unpackbits(packed, bitorder="little")[arr.offset % 8:arr.offset % 8 + n].view(np.bool_)
    return offsets, data, valid


# ------------------------------------------------------------------------------------------------------------
# the scorer

class RawRowScorer:
    """Raw rows -> click probabilities: `RowsToIds` + the compact engine, BLAS pinned (`deeplight.serve.threads`).

    Used by the MLflow pyfunc and by `deeplight serve`; needs no torch and no mlflow."""

    def __init__(self, compact: Any, fmap: FeatureMap, threads: int | None = None):
        if (compact.field_names, compact.field_sizes) != (fmap.field_names, fmap.field_sizes):
            raise DeeplightError("the compact model and the feature map disagree on fields or their sizes")
        from deeplight.serve.threads import pin_blas

        self.compact, self.feature_map = compact, fmap
        self.rows = RowsToIds(fmap)
        self.schema = self.rows.schema
        self.blas = pin_blas(compact, threads)

    @classmethod
    def load(cls, directory: Any = None, compact_path: Any = None, feature_map_path: Any = None,
             threads: int | None = None) -> "RawRowScorer":
        """From a folder holding compact.npz and feature_map.json (a registered model's artifacts), or the paths."""
        from pathlib import Path

        from deeplight.serve.engine import CompactModel

        if directory is not None:
            compact_path = Path(directory) / "compact.npz"
            feature_map_path = Path(directory) / "feature_map.json"
        return cls(CompactModel.load(compact_path), FeatureMap.load(feature_map_path), threads)

    def ids(self, rows: Any) -> np.ndarray:
        return self.rows.transform(rows, np.int64)

    def score(self, rows: Any) -> np.ndarray:
        """float64 probabilities, one per row; BadRows (a DeeplightError naming row and field) for bad input."""
        return self._proba(self.ids(rows))

    def score_lines(self, body: bytes, sep: str | None = None, header: bool | None = None) -> np.ndarray:
        """Probabilities of raw text lines as in the dataset's files (`RowsToIds.transform_lines`); `sep`
        defaults to the dataset's own (Criteo: tab, Avazu: comma)."""
        return self._proba(self.rows.transform_lines(body, sep or self.schema.delimiter, header, np.int64))

    def score_json_records(self, body: bytes) -> np.ndarray | None:
        """Probabilities of a v1 JSON body read without decoding it (`RowsToIds.transform_json_records`), or None
        when it is not in the plain form: then decode it and call `score`."""
        ids = self.rows.transform_json_records(body, np.int64)
        return None if ids is None else self._proba(ids)

    def score_v2_json(self, body: bytes) -> tuple[np.ndarray, str | None] | None:
        """(probabilities, the request's id) of a v2 JSON body read without decoding it
        (`RowsToIds.transform_v2_json`), or None when it is not in the plain form: then parse it and call `score`."""
        read = self.rows.transform_v2_json(body, np.int64)
        return None if read is None else (self._proba(read[0]), read[1])

    def _proba(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, np.float64)
        return self.compact.predict_proba(ids).astype(np.float64)


def example_rows(fmap: FeatureMap, n: int, seed: int = 0) -> Any:
    """`n` raw rows (a DataFrame of strings, no label) shaped like real traffic for timing the served model:
    categories drawn from the vocabulary (a tenth unseen), integers heavy-tailed, ~10% of values empty."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    schema = get_schema(fmap.dataset)
    vocab = {f.source: f.vocab for f in fmap.fields if f.kind == "cat" and f.vocab}
    cols: dict[str, Any] = {}
    for c in schema.columns:
        if c.kind == "label":
            continue
        if c.kind == "int":
            values = np.floor(np.exp(rng.uniform(0, 8, n))).astype(np.int64).astype(str).astype(object)
        elif c.kind == "time":
            values = np.array([f"141021{h:02d}" for h in rng.integers(0, 24, n)], dtype=object)
        elif c.kind == "id":
            values = rng.integers(0, 2**62, n).astype(str).astype(object)
        else:
            known = vocab.get(c.name) or [f"{k:08x}" for k in range(1000)]
            values = np.array([known[i] for i in rng.integers(0, len(known), n)], dtype=object)
            unseen = rng.random(n) < 0.1
            values[unseen] = [f"{k:08x}" for k in rng.integers(0, 2**32, int(unseen.sum()))]
        if c.kind in ("int", "cat"):
            values[rng.random(n) < 0.1] = ""
        cols[c.name] = values
    return pd.DataFrame(cols)
