"""Feature ids for the model: typed ingested rows -> one int32 id per field (0 = missing).

Each model field (`schema.feature_fields`) turns a raw value into a string key, then into a local id:
cat -> the string itself; int -> `str(t(x))` with t(x) = floor(ln(x)^2) if x > 2 else x; derived (Avazu
hour -> hour_of_day, weekday) -> the derived int as a string. Null (or an empty string) -> id 0.

* hash mode (`buckets` B): id = 1 + stable_hash(key, field_seed(name)) % (B - 1); every field has size B.
* vocab mode (`min_count` K): keys seen >= K times in the train split get ids 2.. (descending count, then key);
  rarer and unseen keys -> 1 (OOV); field size = 2 + len(vocab).

`FeatureMap.transform` is the one function that maps rows to ids; the `hash` step (`deeplight.data.hashing`:
fit + apply to every split), `deeplight apply-features` and the serving path all call it.

    >>> import numpy as np, pyarrow as pa
    >>> int_transform(np.array([-1, 0, 2, 3, 10, 1000])).tolist()
    [-1, 0, 2, 1, 5, 47]
    >>> hex(int(stable_hash(pa.array(["a"]), seed=0)[0]))   # FNV-1a 64 of b"a", then the fmix64 finalizer
    '0x82a2a958a9bece5b'
    >>> fmap = FeatureMap.hashed("avazu", buckets=1000)
    >>> fmap.field_names[:3], fmap.field_sizes[:3], fmap.offsets[:3]
    (['hour_of_day', 'weekday', 'C1'], [1000, 1000, 1000], [0, 1000, 2000])
    >>> row = {"id": ["1"], "click": [1], "hour": [14102105], **{f.source: ["x"] for f in fmap.fields[2:]}}
    >>> ids = fmap.transform(pa.table(row))
    >>> ids.shape, ids.dtype.name, bool(((ids > 0) & (ids < 1000)).all())
    ((1, 23), 'int32', True)
    >>> ids2 = fmap.transform(pa.table({**row, "hour": [14102205], "site_id": [None]}))  # next day, same hour
    >>> int(ids2[0, 0]) == int(ids[0, 0]), int(ids2[0, 1]) == int(ids[0, 1]), int(ids2[0, 4])
    (True, False, 0)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deeplight.base.arrow import from_numpy, string_array, to_numpy, valid_mask
from deeplight.base.errors import DeeplightError
from deeplight.base.files import read_json, write_json
from deeplight.data.schema import DERIVATIONS, get_schema

FORMAT_VERSION = 1

FieldKind = Literal["int", "cat", "derived"]

# --- stable hashing --------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_STRINGY = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())


def field_seed(name: str) -> int:
    """The hash seed of a field: FNV-1a 64 of its name, so fields hash independently and reproducibly."""
    h = FNV_OFFSET
    for b in name.encode():
        h = ((h ^ b) * FNV_PRIME) & _MASK64
    return h


def stable_hash(values: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """uint64 hash of each string: FNV-1a 64 (seed XORed into the offset basis), then murmur3's fmix64.

    Same result in every process and on every machine (unlike Python's `hash`). Vectorised over the Arrow
    offsets/data buffers: one numpy pass per byte position, all strings at once. Null entries get an
    unspecified value; callers mask them.
    """
    if isinstance(values, pa.ChunkedArray):
        parts = [stable_hash(c, seed) for c in values.chunks]
        return np.concatenate(parts) if parts else np.empty(0, np.uint64)
    if values.type not in _STRINGY:
        if not (pa.types.is_dictionary(values.type) or pa.types.is_string_view(values.type)
                or pa.types.is_null(values.type)):
            raise DeeplightError(f"stable_hash wants strings, got {values.type}")
        values = values.cast(pa.large_string())
    n = len(values)
    h = np.full(n, (FNV_OFFSET ^ seed) & _MASK64, dtype=np.uint64)
    if n == 0:
        return h
    bufs = values.buffers()
    large = values.type in (pa.large_string(), pa.large_binary())
    offsets = np.frombuffer(bufs[1], dtype=np.int64 if large else np.int32, count=values.offset + n + 1)
    offsets = offsets[values.offset:].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    prime = np.uint64(FNV_PRIME)
    min_len, max_len = int(lengths.min()), int(lengths.max())
    if min_len == max_len and min_len > 0:
        # Equal lengths means the strings are back to back: a 2-D view, no gathers.
        block = data[starts[0]:starts[0] + n * min_len].reshape(n, min_len)
        for k in range(min_len):
            h ^= block[:, k]
            h *= prime
    else:
        for k in range(min_len):
            h ^= data[starts + k]
            h *= prime
        active = np.flatnonzero(lengths > min_len)
        for k in range(min_len, max_len):
            active = active[lengths[active] > k]  # strings still longer than k: shrinks as k grows
            hk = h[active]
            hk ^= data[starts[active] + k]
            hk *= prime
            h[active] = hk
    # fmix64 spreads FNV's weakly mixed low bits before the modulo.
    h ^= h >> np.uint64(33)
    h *= _FMIX1
    h ^= h >> np.uint64(33)
    h *= _FMIX2
    h ^= h >> np.uint64(33)
    return h


# --- the Criteo integer transform ------------------------------------------------------------------------

_NEG, _SMALL = 1 << 10, 1 << 16  # -1024 <= x < 65536: t(x) comes from a lookup table


@functools.cache
def _log_sq_thresholds() -> np.ndarray:
    """T[k-1] = the smallest integer x > 2 with floor(math.log(x) ** 2) >= k, for every k reachable in int64.

    Integer thresholds make the transform exact and platform independent (numpy's SIMD log may differ from
    libm by an ulp, which could flip a floor).
    """
    def t(x: int) -> int:
        return math.floor(math.log(x) ** 2)

    out, k, limit = [], 1, 2**63 - 1
    while True:
        guess = math.exp(math.sqrt(k))
        lo, hi = max(3, int(guess * (1 - 1e-9)) - 2), int(guess * (1 + 1e-9)) + 2
        if lo > limit:
            break
        while t(lo) >= k and lo > 3:  # widen if the float guess was off
            lo = max(3, lo // 2)
        while t(hi) < k:
            hi *= 2
        while lo < hi:  # smallest x in [lo, hi] with t(x) >= k
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if t(mid) < k else (lo, mid)
        if lo > limit:
            break
        out.append(lo)
        k += 1
    return np.array(out, dtype=np.int64)


@functools.cache
def _padded_thresholds() -> np.ndarray:
    """[0, T1, T2, ..., int64 max]: entry k is where t reaches k, so t(x) = k iff P[k] <= x < P[k + 1]."""
    return np.concatenate([[0], _log_sq_thresholds(), [2**63 - 1]]).astype(np.int64)


@functools.cache
def _small_table() -> np.ndarray:
    """t(x) + _NEG for x in [-_NEG, _SMALL), indexed by x + _NEG; int32 keeps the gathers cheap."""
    x = np.arange(-_NEG, _SMALL, dtype=np.int64)
    return (np.where(x > 2, np.searchsorted(_log_sq_thresholds(), x, side="right"), x) + _NEG).astype(np.int32)


@functools.cache
def _int_base_keys() -> pa.Array:
    """Keys "-1024" .. "1906": t(x) of every int64 x >= -1024, in order, so that code = t(x) + _NEG."""
    return from_numpy(np.arange(-_NEG, len(_log_sq_thresholds()) + 1)).cast(pa.string())


def _log_sq_large(x: np.ndarray) -> np.ndarray:
    """t(x) for x >= _SMALL: numpy's float estimate, corrected against the exact thresholds."""
    return _snap_to_thresholds(np.floor(np.log(x.astype(np.float64)) ** 2).astype(np.int64), x)


def _snap_to_thresholds(t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fix an estimate `t` of t(x) that is off by at most one (in place)."""
    p = _padded_thresholds()
    t = np.clip(t, 0, len(p) - 2, out=t)
    t -= x < p[t]
    t += x >= p[t + 1]
    return np.minimum(t, len(p) - 2, out=t)  # only int64 max itself would step past the last threshold


def _int_codes(x: np.ndarray, valid: np.ndarray | None) -> tuple[pa.Array, np.ndarray, np.ndarray | None]:
    """(keys, per-row code, valid) for an int field: keys "-1024".."1906" (code = t + 1024), plus the distinct
    values below -1024 appended when there are any."""
    shifted = x + _NEG
    codes = _small_table()[np.clip(shifted, 0, _NEG + _SMALL - 1)]
    # One unsigned comparison finds both x >= _SMALL and x < -_NEG (negative shifted values wrap to huge).
    rare = np.flatnonzero(shifted.view(np.uint64) >= np.uint64(_NEG + _SMALL))
    if valid is not None:
        rare = rare[valid[rare]]  # garbage in null slots must not add keys
    keys = _int_base_keys()
    if len(rare):
        xr = x[rare]
        big = xr >= 0
        codes[rare[big]] = _log_sq_large(xr[big]) + _NEG
        if not big.all():
            extra, inverse = np.unique(xr[~big], return_inverse=True)
            codes[rare[~big]] = len(keys) + inverse
            keys = pa.concat_arrays([keys, from_numpy(extra).cast(pa.string())])
    return keys, codes, valid


def int_transform(x: np.ndarray) -> np.ndarray:
    """t(x) = floor(ln(x)^2) if x > 2 else x, exactly as Python's math computes it, vectorised (int64)."""
    x = np.asarray(x, dtype=np.int64)
    keys, codes, _ = _int_codes(x, None)
    return to_numpy(keys.cast(pa.int64()))[codes]


# --- the feature map -------------------------------------------------------------------------------------

@dataclass
class FieldSpec:
    """One model field: its raw source column, kind, id-space size and (vocab mode) its vocabulary."""

    name: str
    source: str
    kind: FieldKind
    size: int
    vocab: list[str] | None = None


@dataclass
class FeatureMap:
    """How each field's raw values become ids. Treat as immutable: transform caches per-field lookups."""

    dataset: str
    mode: Literal["hash", "vocab"]
    buckets: int | None
    min_count: int | None
    fields: list[FieldSpec]
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def hashed(cls, dataset: str, buckets: int) -> "FeatureMap":
        """A hash-mode map for `dataset` (no fitting needed)."""
        _check_buckets(buckets)
        fields = [FieldSpec(f.name, f.source, f.kind, buckets) for f in get_schema(dataset).feature_fields]
        return cls(dataset, "hash", buckets, None, fields)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def field_sizes(self) -> list[int]:
        return [f.size for f in self.fields]

    @property
    def offsets(self) -> list[int]:
        """Start of each field in one shared embedding table (cumulative sizes, first 0)."""
        return [0, *np.cumsum(self.field_sizes[:-1], dtype=np.int64).tolist()] if self.fields else []

    @property
    def num_features(self) -> int:
        return sum(self.field_sizes)

    # -- persistence --

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "dataset": self.dataset, "mode": self.mode, "buckets": self.buckets,
            "min_count": self.min_count,
            "fields": [{"name": f.name, "source": f.source, "kind": f.kind, "size": f.size, "vocab": f.vocab}
                       for f in self.fields],
        }

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: identical maps, identical fingerprints."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureMap":
        return cls.from_dict(read_json(path), where=str(path))

    @classmethod
    def from_dict(cls, d: Any, where: str = "feature map") -> "FeatureMap":
        """Validate and build; any problem raises DeeplightError naming `where` and the bad entry."""
        def bad(msg: str) -> DeeplightError:
            return DeeplightError(f"{where}: malformed feature map: {msg}")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        missing = {"format", "dataset", "mode", "buckets", "min_count", "fields"} - set(d)
        if missing:
            raise bad(f"missing keys {sorted(missing)}")
        if d["format"] != FORMAT_VERSION:
            raise bad(f"format {d['format']!r} is not {FORMAT_VERSION}")
        try:
            schema = get_schema(d["dataset"])
        except (DeeplightError, TypeError) as e:
            raise bad(str(e)) from None
        mode, buckets, min_count = d["mode"], d["buckets"], d["min_count"]
        if mode == "hash":
            if not _is_int(buckets) or buckets < 2 or buckets >= 2**31 or min_count is not None:
                raise bad(f"hash mode wants an integer buckets in [2, 2^31) and min_count null, got "
                          f"buckets={buckets!r}, min_count={min_count!r}")
        elif mode == "vocab":
            if not _is_int(min_count) or min_count < 1 or buckets is not None:
                raise bad(f"vocab mode wants an integer min_count >= 1 and buckets null, got "
                          f"min_count={min_count!r}, buckets={buckets!r}")
        else:
            raise bad(f"mode {mode!r} is not 'hash' or 'vocab'")
        expected = schema.feature_fields
        if not isinstance(d["fields"], list) or len(d["fields"]) != len(expected):
            raise bad(f"dataset {schema.name!r} has {len(expected)} fields, the map lists "
                      f"{len(d['fields']) if isinstance(d['fields'], list) else d['fields']!r}")
        fields = []
        for i, (e, want) in enumerate(zip(d["fields"], expected)):
            if not isinstance(e, dict) or set(e) != {"name", "source", "kind", "size", "vocab"}:
                raise bad(f"fields[{i}] must have exactly name, source, kind, size, vocab")
            if (e["name"], e["source"], e["kind"]) != (want.name, want.source, want.kind):
                raise bad(f"fields[{i}] is {e['name']!r} ({e['kind']} of {e['source']!r}); dataset "
                          f"{schema.name!r} expects {want.name!r} ({want.kind} of {want.source!r})")
            vocab = e["vocab"]
            if mode == "hash":
                if vocab is not None or e["size"] != buckets:
                    raise bad(f"field {e['name']!r}: hash mode wants vocab null and size == buckets")
            else:
                if not isinstance(vocab, list) or not all(isinstance(v, str) and v for v in vocab):
                    raise bad(f"field {e['name']!r}: vocab must be a list of non-empty strings")
                if len(set(vocab)) != len(vocab):
                    raise bad(f"field {e['name']!r}: vocab has duplicates")
                if e["size"] != 2 + len(vocab):
                    raise bad(f"field {e['name']!r}: size {e['size']!r} != 2 + len(vocab) = {2 + len(vocab)}")
            fields.append(FieldSpec(e["name"], e["source"], e["kind"], e["size"], vocab))
        return cls(schema.name, mode, buckets, min_count, fields)

    # -- transform --

    def check_columns(self, schema: pa.Schema) -> None:
        """Raise DeeplightError naming the missing column or wrong type if `schema` cannot feed this map."""
        _check_columns(self.fields, schema, self.dataset)

    def transform(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        """int32 ids of shape (rows, n_fields) for rows in the typed ingested layout (column j contiguous).

        Extra columns are ignored; a missing source column or one of the wrong type raises DeeplightError.
        """
        self.check_columns(table.schema)
        batches = [table] if isinstance(table, pa.RecordBatch) else table.to_batches()
        out = np.empty((len(self.fields), table.num_rows), dtype=np.int32)
        pos = 0
        for batch in batches:
            n = batch.num_rows
            for j, f in enumerate(self.fields):
                keys, codes, valid = _field_keys(f, batch.column(f.source))
                row = out[j, pos:pos + n]
                # mode="clip": codes of null rows may be anything; "raise" would also buffer a copy.
                np.take(self._lookup(j, keys), codes, out=row, mode="clip")
                if valid is not None:
                    row *= valid  # missing -> 0
            pos += n
        return out.T

    def _lookup(self, j: int, keys: pa.Array) -> np.ndarray:
        """The id of each key (0 for null / empty keys); reused while consecutive batches have the same keys."""
        cached = self._cache.get(("lut", j))
        if cached is not None and cached[0].equals(keys):
            return cached[1]
        f = self.fields[j]
        if len(keys) == 0:
            lut = np.zeros(1, dtype=np.int32)  # np.take needs a non-empty table even when every row is missing
        elif self.mode == "hash":
            lut = (1 + stable_hash(keys, field_seed(f.name)) % np.uint64(f.size - 1)).astype(np.int32)
        else:
            vocab = self._cache.get(("vocab", j))
            if vocab is None:
                vocab = self._cache[("vocab", j)] = string_array(f.vocab)
            pos = pc.index_in(keys.cast(pa.string()), value_set=vocab)
            lut = (to_numpy(pos, fill=-1) + 2).astype(np.int32)  # absent -> -1 + 2 = 1 (OOV)
        if len(keys):
            lut[~_valid_keys(keys)] = 0
        self._cache[("lut", j)] = (keys, lut)
        return lut


def _check_columns(fields: list[FieldSpec], schema: pa.Schema, dataset: str) -> None:
    for f in fields:
        idx = schema.get_field_index(f.source)
        if len(schema.get_all_field_indices(f.source)) > 1:
            raise DeeplightError(f"column {f.source!r} (field {f.name!r}) appears more than once")
        if idx < 0:
            raise DeeplightError(f"column {f.source!r} (needed by field {f.name!r}) is missing; the feature map is "
                                 f"for dataset {dataset!r}, the data has columns {schema.names}")
        t = schema.field(idx).type
        ok = pa.types.is_null(t) or (_is_string_type(t) if f.kind == "cat" else pa.types.is_integer(t))
        if not ok:
            want = "string" if f.kind == "cat" else "integer"
            raise DeeplightError(f"column {f.source!r} has type {t}, but {f.kind} field {f.name!r} of dataset "
                                 f"{dataset!r} wants {want}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _check_buckets(buckets: Any) -> None:
    if not _is_int(buckets) or not 2 <= buckets < 2**31:
        raise DeeplightError(f"buckets must be an integer in [2, 2^31) (ids are int32), got {buckets!r}")


def _valid_keys(keys: pa.Array) -> np.ndarray:
    """Keys that are real values: not null and not the empty string (both mean missing)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    if pa.types.is_null(keys.type):
        return np.zeros(len(keys), dtype=bool)
    return to_numpy(pc.binary_length(keys), fill=0) > 0


def _field_keys(f: FieldSpec, col: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray | None]:
    """(keys as strings, per-row index into keys, validity mask or None when nothing is missing).

    Keys are few (a dictionary, or a small set of ints), so hashing and vocabulary lookups run per key, not
    per row; per row there are only a few numpy passes over zero-copy Arrow buffers. Codes of missing rows
    are arbitrary (possibly out of range): callers mask them with `valid`.
    """
    n = len(col)
    if pa.types.is_null(col.type) or n == 0:
        return pa.nulls(0, pa.string()), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    if f.kind == "cat":
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        return col.dictionary, _values(col.indices, widen=False), valid_mask(col.indices)
    valid = valid_mask(col)
    x = _values(col)
    if f.kind == "int":
        return _int_codes(x, valid)
    if valid is not None:
        x = x * valid  # null slots hold arbitrary values: zero them before deriving dates from them
    return (*_dense_codes(DERIVATIONS[f.name](x)), valid)


def _dense_codes(values: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Small non-negative derived ints: every integer in [min, max] is a key, code = value - min."""
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < max(4096, len(values)):
        return from_numpy(np.arange(lo, hi + 1, dtype=np.int64)).cast(pa.string()), values - lo
    keys, codes = np.unique(values, return_inverse=True)
    return from_numpy(keys).cast(pa.string()), codes


def _values(arr: pa.Array, widen: bool = True) -> np.ndarray:
    """The values buffer of an integer array, zero-copy (as int64 if `widen`); null slots hold arbitrary values."""
    data = to_numpy(arr)
    return data.astype(np.int64, copy=False) if widen else data
