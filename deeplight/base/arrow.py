"""numpy <-> Arrow without importing pandas.

pyarrow imports pandas (~0.25 s) the first time a conversion asks whether its input is a pandas object:
`pa.array` (of numpy arrays or lists), `pa.scalar`, Python scalars passed to compute functions,
`Array.to_numpy` and `np.asarray(array)`. The data steps run as short-lived processes (one per CLI call or
pipeline step) and never use pandas, so they convert here instead:

    >>> from_numpy(np.array([3, 1, 2], np.int32)).to_pylist()
    [3, 1, 2]
    >>> from_numpy(np.array([1.5, 2.5]), mask=np.array([False, True])).to_pylist()
    [1.5, None]
    >>> from_numpy(np.array([True, False, True])).to_pylist()
    [True, False, True]
    >>> to_numpy(from_numpy(np.array([7, 8, 9]), mask=np.array([False, True, False])), fill=0)
    array([7, 0, 9])
    >>> valid_mask(from_numpy(np.array([7, 8]), mask=np.array([True, False])))
    array([False,  True])
    >>> string_array(["a", "bc", ""]).to_pylist()
    ['a', 'bc', '']
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def from_numpy(values: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """The Arrow array of a 1-D numeric or bool numpy array, like `pa.array(values, mask=mask)` (mask True =
    null). Numeric data is shared with numpy when it is already contiguous."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"from_numpy wants a 1-D array, got shape {values.shape}")
    n = len(values)
    validity, nulls = None, 0
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise ValueError(f"mask shape {mask.shape} differs from values shape {values.shape}")
        nulls = int(np.count_nonzero(mask))
        if nulls:
            validity = pa.py_buffer(np.packbits(~mask, bitorder="little"))
    if values.dtype == np.bool_:
        return pa.Array.from_buffers(pa.bool_(), n, [validity, pa.py_buffer(np.packbits(values, bitorder="little"))],
                                     null_count=nulls)
    if values.dtype.kind not in "iuf":
        raise TypeError(f"from_numpy wants a numeric or bool array, got dtype {values.dtype}")
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), n, [validity, pa.py_buffer(values)],
                                 null_count=nulls)


def to_numpy(arr: pa.Array, fill: int | float | bool | None = None) -> np.ndarray:
    """The values of a numeric or bool Arrow array as numpy (numeric: zero-copy unless `fill` is given).

    Null slots hold unspecified values unless `fill` is given, which replaces them (in a copy).
    """
    t = arr.type
    n = len(arr)
    if pa.types.is_boolean(t):
        values = _bits(arr.buffers()[1], arr.offset, n)
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        dtype = _numpy_dtype(t)
        values = np.frombuffer(arr.buffers()[1], dtype, count=arr.offset + n)[arr.offset:] if n else np.empty(0, dtype)
    else:
        raise TypeError(f"to_numpy wants a numeric or bool array, got {t}")
    valid = valid_mask(arr) if fill is not None else None
    if valid is not None:
        values = values.copy()
        values[~valid] = fill
    return values


def valid_mask(arr: pa.Array) -> np.ndarray | None:
    """Per row, whether it is not null, unpacked from the Arrow validity bitmap; None when nothing is null."""
    if arr.null_count == 0:
        return None
    return _bits(arr.buffers()[0], arr.offset, len(arr))


def _bits(buf: pa.Buffer, offset: int, n: int) -> np.ndarray:
    """Bits offset .. offset + n of an Arrow bitmap (least significant bit first) as a bool array."""
    if n == 0:
        return np.empty(0, bool)
    first = offset // 8  # unpack only the bytes that hold the wanted bits
    packed = np.frombuffer(buf, np.uint8, count=(offset % 8 + n + 7) // 8, offset=first)
    return np.unpackbits(packed, bitorder="little")[offset % 8:offset % 8 + n].view(bool)


def string_array(values: list[str]) -> pa.Array:
    """The Arrow string array (no nulls) of a list of Python strings."""
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string(), len(encoded),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]).cast(pa.string())


def _numpy_dtype(t: pa.DataType) -> np.dtype:
    if pa.types.is_floating(t):
        return np.dtype(f"f{t.bit_width // 8}")
    return np.dtype(f"{'i' if pa.types.is_signed_integer(t) else 'u'}{t.bit_width // 8}")
