"""The bytes of many Python str objects, gathered by compiled code straight from the objects' memory.

Why: a DataFrame (or list) of raw rows holds one Python str per value; 1,000 Criteo rows are 39,000 of them.
Joining them into one buffer and splitting it again (`"\\x1f".join(values).encode()` + a compiled split) took
~1.4 ms of a ~4.5 ms pyfunc call at 1,000 rows; reading each object's length and bytes in one compiled loop takes
~0.25 ms (bench/RESULTS.md). Compact ASCII str objects (what CPython makes for ASCII text, e.g. every value
`str.split` or a CSV reader gives) keep their length and bytes at fixed offsets from the object's address.

Safety: the offsets are not assumed. `LAYOUT` is found at import by reading known strings and lists through
ctypes, and is None when anything differs (another interpreter or a changed layout): callers then take the
join route. The kernel reads a value's bytes only after checking that the object's type is exactly `str` and
that its state says compact ASCII, and it reads nothing outside [object, object + header + length): a short
value's last 8 bytes are read as the word that ends at its last byte (reaching back into the header). It holds
the GIL (no `nogil`), so the objects it reads are alive and unchanged while it runs.

    >>> values = ["a", "", "hello", "0123456789"]
    >>> off, data = gather(values, 2, 2, "row")
    >>> off.tolist(), bytes(data[:off[-1]])
    ([0, 1, 1, 6, 16], b'ahello0123456789')
    >>> gather(["caf\\u00e9"], 1, 1, "row") is None  # not ASCII: the caller's other route
    True
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# CPython's str state bits (PyASCIIObject.state, 3.11-3.13): interned 0-1, kind 2-4, compact 5, ascii 6
_STATE_MASK = 0x7C


@intrinsic
def _load_u64(typingctx, addr):  # type: ignore[no-untyped-def]
    """The 8 bytes at an address (little-endian int64); no alignment assumed."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)

    return types.int64(addr), codegen


@intrinsic
def _store_u64(typingctx, addr, value):  # type: ignore[no-untyped-def]
    """Write 8 bytes at an address; no alignment assumed."""
    if not isinstance(addr, types.Integer) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        builder.store(args[1], ptr, align=1)
        return context.get_dummy_value()

    return types.void(addr, value), codegen


def _address(obj: Any, at: int) -> int:
    return ctypes.c_ssize_t.from_address(id(obj) + at).value


def _find_layout() -> np.ndarray | None:
    """[id(str), state mask, compact-ASCII state, length offset, state offset, data offset, list items offset],
    each checked on sample objects, or None."""
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8 or sys.byteorder != "little":
        return None
    try:
        type_at, len_at, state_at, items_at = 8, 16, 32, 24
        data_at = sys.getsizeof("") - 1  # header + the terminating NUL
        ascii_state = _address("".join(["he", "llo"]), state_at) & _STATE_MASK
        for s in ["", "a", "".join(["hel", "lo"]), "0123456789abcdef" * 5, str(-12345), "x" * 1000]:
            if (_address(s, type_at) != id(str) or _address(s, len_at) != len(s)
                    or _address(s, state_at) & _STATE_MASK != ascii_state
                    or ctypes.string_at(id(s) + data_at, len(s)) != s.encode()):
                return None
        for s in ["caf\u00e9", "\u20ac", "\U0001f600", "a\ud800"]:
            if _address(s, state_at) & _STATE_MASK == ascii_state:
                return None
        sample = ["a", "b", "c"]
        items = _address(sample, items_at)
        if [ctypes.c_ssize_t.from_address(items + 8 * i).value for i in range(3)] != [id(v) for v in sample]:
            return None
        return np.array([id(str), _STATE_MASK, ascii_state, len_at, state_at, data_at, items_at], np.int64)
    except (OSError, ValueError, OverflowError):  # pragma: no cover - a layout ctypes cannot read
        return None


LAYOUT = _find_layout()


@numba.njit(cache=True)  # holds the GIL: see the module docstring
def _gather_kernel(base, n, k, s_row, s_col, layout, off):
    """Values (r, c) at the object pointers *(base + r * s_row + c * s_col), row-major -> off (Arrow offsets,
    filled) and the bytes; an empty array when a value is not a compact ASCII str."""
    str_type, mask, want, len_at, state_at, data_at = layout[0], layout[1], layout[2], layout[3], layout[4], \
        layout[5]
    total = 0
    j = 0
    off[0] = 0
    for r in range(n):
        for c in range(k):
            obj = _load_u64(base + r * s_row + c * s_col)
            if _load_u64(obj + 8) != str_type or (_load_u64(obj + state_at) & mask) != want:
                return np.empty(0, np.uint8)
            total += _load_u64(obj + len_at)
            j += 1
            off[j] = total
    data = np.empty(total + 8, np.uint8)  # 8 spare: a short value is written as one whole word
    dst = np.int64(data.ctypes.data)
    j = 0
    for r in range(n):
        for c in range(k):
            obj = _load_u64(base + r * s_row + c * s_col)
            lo = off[j]
            m = off[j + 1] - lo
            j += 1
            src = obj + data_at
            if m >= 8:
                for i in range(0, m - 7, 8):
                    _store_u64(dst + lo + i, _load_u64(src + i))
                _store_u64(dst + lo + m - 8, _load_u64(src + m - 8))  # the tail, overlapping
            elif m > 0:
                # the word ending at the value's last byte; its first 8 - m bytes are the header's
                _store_u64(dst + lo, _load_u64(src + m - 8) >> (8 * (8 - m)))
    return data


def gather(values: Any, n: int, k: int, order: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, bytes) of n x k values, row-major, or None when a value is not a compact ASCII str (or the
    layout is unknown). `values`: a list, row-major ("row": value (r, c) at r * k + c) or column-major ("col":
    at c * n + r), or a 2-D object ndarray (rows, columns) in any memory order."""
    if LAYOUT is None:
        return None
    if isinstance(values, np.ndarray):
        if values.dtype != object or values.shape != (n, k):
            return None
        base, (s_row, s_col) = values.__array_interface__["data"][0], values.strides
    elif type(values) is list and len(values) == n * k:
        base = _address(values, int(LAYOUT[6]))
        s_row, s_col = (8 * k, 8) if order == "row" else (8, 8 * n)
    else:
        return None
    off = np.empty(n * k + 1, np.int64)
    data = _gather_kernel(base, n, k, s_row, s_col, LAYOUT, off)
    return None if data.size == 0 else (off, data)
