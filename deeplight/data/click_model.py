"""The known click model behind synthetic data: per-field effects, planted field pairs, the truth JSON.

`make_truth` (in `synth`) draws a model; `true_logit` / `true_probability` score raw rows with it, `oracle_auc` is
the AUC no model can beat on data drawn from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deeplight.base.errors import DeeplightError
from deeplight.base.files import resolve
from deeplight.data.feature_map import int_transform  # the same t(x) the model's feature ids use
from deeplight.data.schema import DERIVATIONS

TRUTH_FORMAT = "deeplight-synth-truth/1"
REFERENCE_ROWS = 800_000  # training-set size the effect shrinkage is designed for
SHRINK_COUNT = 200.0  # a value expected n times in REFERENCE_ROWS gets effect weight n / (n + SHRINK_COUNT)
MAIN_VARIANCE = 1.1  # variance of the logit's per-field part (sets the oracle AUC with PAIR_VARIANCE)
PAIR_VARIANCE = 0.35  # variance of the planted pairs' part (sum of u^2)
TIME_HOURS = 240
TIME_START = "2014-10-21T00"  # time columns span 10 days evenly by row position (Avazu's train range)
INT_T_MAX = 1_800  # int transform values the truth tables cover (t(2^62) is about 1847)

_MISSING_KEY = np.uint64(1 << 63)  # hash key of "missing" (no value maps there)
_M32_A, _M32_B = 0x85EBCA6B, 0xC2B2AE35
_M32_A_INV, _M32_B_INV = pow(_M32_A, -1, 1 << 32), pow(_M32_B, -1, 1 << 32)


def _salt(seed: int, *parts: object) -> int:
    """A stable 64-bit salt of (seed, parts) (not Python's per-process hash())."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 that mixes every input bit into every output bit."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3 fmix32, a bijection on uint32 (so hex8 strings decode back to ranks)."""
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(_M32_A)
    h ^= h >> np.uint32(13)
    h *= np.uint32(_M32_B)
    h ^= h >> np.uint32(16)
    return h


def _fmix32_inv(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(_M32_B_INV)
    h ^= (h >> np.uint32(13)) ^ (h >> np.uint32(26))
    h *= np.uint32(_M32_A_INV)
    h ^= h >> np.uint32(16)
    return h


def _hash_gauss(keys: np.ndarray, salt: int) -> np.ndarray:
    """N(0, 1) values, one per key, deterministic in (salt, key) (Box-Muller on two hashes)."""
    h1 = _splitmix64(keys.astype(np.uint64) ^ np.uint64(salt))
    h2 = _splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _hash_sign(keys: np.ndarray, salt: int) -> np.ndarray:
    return np.where(_splitmix64(keys.astype(np.uint64) ^ np.uint64(salt)) >> np.uint64(63), 1.0, -1.0)


def _int_style_params(cardinality: int, salt: int) -> tuple[int, int, int]:
    """(modulus, multiplier, offset) of the affine bijection rank -> decimal value of an `int`-style cat."""
    modulus = 10 ** min(9, len(str(cardinality)) + 3)  # about 3 more digits than needed: looks like ids
    a = (salt % modulus) | 1
    while a % 5 == 0 or math.gcd(a, modulus) != 1:
        a += 2
    b = (salt >> 32) % modulus
    return modulus, a, b


# Byte <-> two hex digits tables: hex encoding and decoding become single gathers.
_HEX_PAIRS = np.frombuffer("".join(f"{i:02x}" for i in range(256)).encode(), np.uint16)
_UNHEX_PAIRS = np.full(1 << 16, 0x100, np.uint16)  # 0x100 marks "not two lowercase hex digits"
_UNHEX_PAIRS[_HEX_PAIRS] = np.arange(256, dtype=np.uint16)


def _hex8_encode(code: np.ndarray) -> np.ndarray:
    """uint32 codes -> (n, 8) lowercase ASCII hex digits (most significant first).

    >>> bytes(_hex8_encode(np.array([0x68FD1E64], np.uint32))[0])
    b'68fd1e64'
    """
    big_endian = code.astype(">u4").view(np.uint8)
    return _HEX_PAIRS[big_endian].view(np.uint8).reshape(len(code), 8)


def _hex8_decode(chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8) ASCII bytes -> (uint32 codes, ok) where ok marks rows of exactly 8 lowercase hex digits."""
    pairs = _UNHEX_PAIRS[np.ascontiguousarray(chars).view(np.uint16)]  # (n, 4) byte values, 0x100 if bad
    ok = (pairs.view(np.uint64).ravel() & np.uint64(0x0100_0100_0100_0100)) == 0
    return pairs.astype(np.uint8).view(">u4").ravel().astype(np.uint32), ok


def _encode_cat(rank: np.ndarray, missing: np.ndarray, spec: "_FieldModel") -> pa.Array:
    """Ranks -> the typed string column (null where missing)."""
    n = len(rank)
    if spec.style == "int":
        m, a, b = spec.int_params
        values = (rank.astype(np.int64) * a + b) % m
        return pa.array(values, pa.int64(), mask=missing).cast(pa.string())
    chars = spec.hex_table[rank]  # 8 ASCII bytes per uint64
    offsets = np.arange(0, 8 * n + 1, 8, dtype=np.int32)  # null slots keep their 8 bytes: fixed stride
    validity = pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None
    return pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(chars)],
                                 null_count=int(missing.sum()))


def _fixed_width_bytes(arr: pa.Array, width: int | None = None) -> np.ndarray | None:
    """(n, w) zero-copy view of a string array whose every slot (nulls included) is w bytes, else None."""
    n = len(arr)
    if n == 0:
        return None
    offsets = np.frombuffer(arr.buffers()[1], np.int32, count=n + 1, offset=4 * arr.offset)
    w = int(offsets[1] - offsets[0]) if width is None else width
    if w <= 0 or int(offsets[-1] - offsets[0]) != w * n or not (np.diff(offsets) == w).all():
        return None
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    return data[offsets[0]:offsets[0] + w * n].reshape(n, w)


def _one_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The column as one contiguous array (no copy when it already is one chunk)."""
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _as_string_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = _one_array(col)
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def _bad_row(name: str, arr: pa.Array, bad: np.ndarray, why: str) -> DeeplightError:
    i = int(np.flatnonzero(bad)[0])
    return DeeplightError(f"field {name}, row {i}: value {arr[i].as_py()!r} {why} "
                          f"({int(bad.sum())} such rows)")


@dataclass
class _FieldModel:
    """Lookup tables of one field: per-key effect (and sign z for planted-pair fields)."""

    name: str
    kind: str  # cat | int | derived
    source: str
    style: str = "hex8"
    cardinality: int = 0
    salt32: int = 0
    int_params: tuple[int, int, int] = (0, 0, 0)
    effect: np.ndarray | None = None  # cat: [K + 1] (last = missing); int: [t + 3, missing last]; derived: [v]
    z: np.ndarray | None = None
    zipf_exponent: float = 0.0
    hex_table: np.ndarray | None = None  # hex8 cat: rank -> its 8 ASCII digits as one uint64 (a gather)


@dataclass
class _Model:
    fields: dict[str, _FieldModel]
    pairs: list[tuple[str, str, float]]


def _zipf_pmf(cardinality: int, exponent: float) -> np.ndarray:
    """P(rank = r), r = 0 .. K-1, of a discretised Pareto: p_r ~ (r+1)^-exponent (Zipf-like), exactly what
    `_sample_zipf` draws (closed-form inverse CDF: no table, no search)."""
    edges = np.arange(1, cardinality + 2, dtype=np.float64) ** (1.0 - exponent)
    return (edges[:-1] - edges[1:]) / (edges[0] - edges[-1])


def _sample_zipf(u: np.ndarray, cardinality: int, exponent: float) -> np.ndarray:
    """Ranks from uniforms in [0, 1): x = F^-1(u) of the density ~ x^-exponent on [1, K+1), rank = floor(x) - 1."""
    top = float(cardinality + 1) ** (1.0 - exponent)
    x = np.exp(np.log(1.0 - u * (1.0 - top)) * (1.0 / (1.0 - exponent)))  # 2x faster than np.power
    return np.minimum(x.astype(np.int64) - 1, cardinality - 1)  # x >= 1


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.tolist()])


def _int_key_pmf(mu: float, sigma: float, negative_share: float) -> np.ndarray:
    """P(t(x) = k) for k = -3 .. INT_T_MAX - 1 when x = floor(lognormal(mu, sigma)), a share of them -1..-3."""
    pmf = np.zeros(INT_T_MAX + 3)
    cdf = lambda b: _normal_cdf((np.log(np.asarray(b, np.float64)) - mu) / sigma)  # P(floor(Y) < b), b >= 1
    # x = 0, 1, 2 keep their value (t = x).
    small = cdf([1.0, 2.0, 3.0])
    pmf[3:6] = np.diff(np.r_[0.0, small])
    # x >= 3 maps monotonically onto t >= 1: bin k holds the integers x in [lo_k, lo_(k+1)).
    k = np.arange(1, INT_T_MAX + 1)
    lo = np.minimum(np.ceil(np.exp(np.sqrt(k))), 2.0 ** 62).astype(np.int64)
    lo = np.maximum(3, np.where(int_transform(lo - 1) >= k, lo - 1, lo))  # guard the float boundary
    lo = np.where(int_transform(lo) < k, lo + 1, lo)
    pmf[3 + 1:] += np.diff(cdf(lo))
    pmf *= 1.0 - negative_share
    pmf[:3] = negative_share / 3.0
    return pmf


def _shrink(expected_count: np.ndarray) -> np.ndarray:
    """Effect weight by how often a reference training set sees the value: the long tail carries little."""
    return expected_count / (expected_count + SHRINK_COUNT)


def _balanced_signs(pmf: np.ndarray, salt: int) -> np.ndarray:
    """+1/-1 per key with probability-weighted mean near 0, so a pair term is (nearly) pure interaction.

    Keys are visited from most to least likely; each goes to the lighter side (ties by a hash sign).
    """
    z = _hash_sign(np.arange(len(pmf)), salt)
    order = np.argsort(-pmf, kind="stable")
    balance = 0.0
    for k in order[pmf[order] > 0].tolist():
        if balance != 0.0:
            z[k] = -1.0 if balance > 0 else 1.0
        balance += z[k] * pmf[k]
    return z


def _derived_pmf(name: str) -> np.ndarray:
    """Share of rows per derived value when rows spread evenly over the TIME_HOURS hours."""
    v = DERIVATIONS[name](_time_values(np.arange(TIME_HOURS), TIME_HOURS, TIME_HOURS))
    return np.bincount(v, minlength=int(v.max()) + 1) / len(v)


def _field_pmf(name: str, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(probability, hash key) of every lookup-table slot of a field, as the generator draws them."""
    if spec["kind"] == "cat":
        k = int(spec["cardinality"])
        pmf = np.append(_zipf_pmf(k, float(spec["zipf_exponent"])) * (1.0 - spec["missing"]), spec["missing"])
        keys = np.append(np.arange(k, dtype=np.uint64), _MISSING_KEY)
    elif spec["kind"] == "int":
        pmf = np.append(_int_key_pmf(spec["lognormal_mu"], spec["lognormal_sigma"], spec["negative_share"])
                        * (1.0 - spec["missing"]), spec["missing"])
        keys = np.append(np.arange(-3, INT_T_MAX).astype(np.uint64), _MISSING_KEY)
    else:
        pmf = _derived_pmf(name)
        keys = np.arange(len(pmf), dtype=np.uint64)
    return pmf, keys


def _unit_effect(seed: int, name: str, pmf: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per-slot effect for effect_std = 1: hashed N(0, 1), shrunk for values a reference set sees rarely."""
    return _shrink(pmf * REFERENCE_ROWS) * _hash_gauss(keys, _salt(seed, "effect", name))


def _build_model(truth: dict) -> _Model:
    """Lookup tables of every field (the bias is read from the truth on each use)."""
    seed = int(truth["seed"])
    pair_fields = {f for a, b, _ in truth["planted_pairs"] for f in (a, b)}
    fields: dict[str, _FieldModel] = {}
    for name in truth["field_order"]:  # schema order (JSON objects come back with sorted keys)
        spec = truth["fields"][name]
        fm = _FieldModel(name=name, kind=spec["kind"], source=spec["source"])
        if spec["kind"] == "cat":
            k = int(spec["cardinality"])
            fm.cardinality, fm.style = k, spec["style"]
            fm.salt32 = _salt(seed, "value", name) & 0xFFFFFFFF
            fm.int_params = _int_style_params(k, _salt(seed, "value", name))
            fm.zipf_exponent = float(spec["zipf_exponent"])
            if fm.style == "hex8":
                code = _fmix32(np.arange(k, dtype=np.uint32) ^ np.uint32(fm.salt32))
                fm.hex_table = _hex8_encode(code).view(np.uint64).ravel()
        pmf, keys = _field_pmf(name, spec)
        fm.effect = float(spec["effect_std"]) * _unit_effect(seed, name, pmf, keys)
        if name in pair_fields:
            fm.z = _balanced_signs(pmf, _salt(seed, "z", name))
        fields[name] = fm
    pairs = [(a, b, float(u)) for a, b, u in truth["planted_pairs"]]
    return _Model(fields=fields, pairs=pairs)


@functools.lru_cache(maxsize=4)
def _model_from_json(truth_json: str) -> _Model:
    return _build_model(json.loads(truth_json))


# Truth keys that do not change the lookup tables: the cached model is shared across them.
_NOT_MODEL_KEYS = ("bias", "calibration", "summary", "rows")


def _model(truth: dict) -> _Model:
    if truth.get("format") != TRUTH_FORMAT:
        raise DeeplightError(f"truth: format {truth.get('format')!r} is not {TRUTH_FORMAT!r}")
    key = {k: v for k, v in truth.items() if k not in _NOT_MODEL_KEYS}
    return _model_from_json(json.dumps(key, sort_keys=True))


def _field_keys(table: pa.Table, fm: _FieldModel) -> np.ndarray:
    """Row -> index into the field's lookup tables, from the typed column. Raises on values the model lacks."""
    if fm.source not in table.column_names:
        raise DeeplightError(f"table has no column {fm.source!r} (needed by field {fm.name})")
    col = table.column(fm.source)
    n = table.num_rows
    if fm.kind == "derived":
        arr = _one_array(col)
        if arr.null_count:
            raise _bad_row(fm.name, arr, np.asarray(arr.is_null()), "is missing (time is required)")
        v = DERIVATIONS[fm.name](arr.to_numpy(zero_copy_only=False).astype(np.int64))
        bad = (v < 0) | (v >= len(fm.effect))
        if bad.any():
            raise _bad_row(fm.name, arr, bad, "gives a derived value outside the model")
        return v
    if fm.kind == "int":
        arr = _one_array(col)
        missing = np.asarray(arr.is_null())
        x = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        key = int_transform(x) + 3
        bad = ~missing & ((key < 0) | (key >= INT_T_MAX + 3))
        if bad.any():
            raise _bad_row(fm.name, arr, bad, "is outside the generator's range")
        return np.where(missing, INT_T_MAX + 3, key)
    arr = _as_string_array(col)
    missing = np.asarray(arr.is_null()) if arr.null_count else np.zeros(n, bool)
    if fm.style == "int":
        filled = arr.fill_null("0") if arr.null_count else arr
        try:
            values = pc.cast(filled, pa.int64())
        except pa.ArrowInvalid:
            ok = np.asarray(pc.match_substring_regex(filled, r"^-?[0-9]{1,18}$"))
            raise _bad_row(fm.name, arr, ~ok, "is not a decimal integer") from None
        canonical = np.asarray(pc.equal(values.cast(pa.string()), filled))  # "007" is not the value "7"
        v = values.to_numpy()
        m, a, b = fm.int_params
        rank = ((v - b) % m) * pow(a, -1, m) % m
        bad = ~missing & (~canonical | (v < 0) | (v >= m) | (rank >= fm.cardinality))
    else:
        chars = _fixed_width_bytes(arr, 8)
        if chars is None:  # e.g. read back from Parquet: nulls are empty, so pad them to the fixed width
            filled = arr.fill_null("00000000") if arr.null_count else arr
            lengths = np.asarray(pc.binary_length(filled))
            if (lengths != 8).any():
                raise _bad_row(fm.name, arr, lengths != 8, "is not 8 hex digits")
            fixed = pc.cast(filled, pa.binary(8))
            chars = np.frombuffer(fixed.buffers()[1], np.uint8, count=8 * n, offset=8 * fixed.offset).reshape(n, 8)
        code, ok = _hex8_decode(chars)
        if (~ok & ~missing).any():
            raise _bad_row(fm.name, arr, ~ok & ~missing, "is not 8 lowercase hex digits")
        rank = (_fmix32_inv(code) ^ np.uint32(fm.salt32)).astype(np.int64)
        bad = ~missing & (rank >= fm.cardinality)
    if bad.any():
        raise _bad_row(fm.name, arr, bad, "is not a value of this synthetic dataset")
    return np.where(missing, fm.cardinality, rank)


def logit_components(table: pa.Table, truth: dict) -> dict[str, np.ndarray]:
    """Per-row parts of the true logit of a typed table (the ingested contract).

    Keys: `effect:FIELD` for every field, `z:FIELD` for fields in planted pairs, `pair:A*B` (= u * z_A * z_B).
    `true_logit` = truth["bias"] + the sum of the effect: and pair: parts.
    """
    model = _model(truth)
    out: dict[str, np.ndarray] = {}
    for fm in model.fields.values():
        key = _field_keys(table, fm)
        out[f"effect:{fm.name}"] = fm.effect[key]
        if fm.z is not None:
            out[f"z:{fm.name}"] = fm.z[key]
    for a, b, u in model.pairs:
        out[f"pair:{a}*{b}"] = u * out[f"z:{a}"] * out[f"z:{b}"]
    return out


def true_logit(table: pa.Table, truth: dict) -> np.ndarray:
    """The true click logit of every row of a typed table (ingested contract), from the truth JSON."""
    model = _model(truth)
    logit = np.full(table.num_rows, float(truth["bias"]))
    z: dict[str, np.ndarray] = {}
    for fm in model.fields.values():
        key = _field_keys(table, fm)
        logit += fm.effect[key]
        if fm.z is not None:
            z[fm.name] = fm.z[key]
    for a, b, u in model.pairs:
        logit += u * z[a] * z[b]
    return logit


def true_probability(table: pa.Table, truth: dict) -> np.ndarray:
    """sigmoid(true_logit): the click probability the generator used for each row."""
    return 1.0 / (1.0 + np.exp(-true_logit(table, truth)))


def oracle_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney), tied scores sharing their average rank.

    >>> oracle_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(probs, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise DeeplightError(f"oracle_auc: {len(y)} labels but {len(s)} scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DeeplightError("oracle_auc: AUC needs both clicks and non-clicks")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average rank per tie group: groups start where the sorted score changes.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def load_truth(path: str) -> dict:
    """Read a truth JSON written by `synthesize` (local path or s3:// URI)."""
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            truth = json.loads(f.read().decode())
    except FileNotFoundError:
        raise DeeplightError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DeeplightError(f"{path}: cannot read truth JSON ({e})") from None
    if not isinstance(truth, dict) or truth.get("format") != TRUTH_FORMAT:
        raise DeeplightError(f"{path}: not a synthetic-data truth file ({TRUTH_FORMAT})")
    return truth


def _time_values(positions: np.ndarray, total: int, hours: int) -> np.ndarray:
    """Row positions -> YYMMDDHH, `hours` hours from TIME_START spread evenly (non-decreasing)."""
    h = (positions.astype(np.int64) * hours) // max(total, 1)
    t = np.datetime64(TIME_START, "h") + h
    day = t.astype("datetime64[D]")
    month = t.astype("datetime64[M]")
    yy = t.astype("datetime64[Y]").astype(np.int64) + 1970 - 2000
    mm = month.astype(np.int64) % 12 + 1
    dd = (day - month.astype("datetime64[D]")).astype(np.int64) + 1
    hh = (t - day.astype("datetime64[h]")).astype(np.int64)
    return yy * 1_000_000 + mm * 10_000 + dd * 100 + hh

