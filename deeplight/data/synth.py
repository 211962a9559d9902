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

import functools
import gzip
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from deeplight.base.errors import DeeplightError
from deeplight.data.feature_map import int_transform# the same t(x) the model's feature ids use
from deeplight.base.files import resolve
from deeplight.data.schema import DERIVATIONS, Column, DatasetSchema, get_schema

TRUTH_FORMAT = "deeplight-synth-truth/1"
_GZIP_LEVEL = 1  # fast; the text is mostly random hex, which no level compresses much better
BLOCK_ROWS = 65_536  # rows per generated block; each block has its own RNG seeded from (seed, block index)
CALIBRATION_BLOCKS = 1  # blocks of a separate stream used to fit the bias to the target click rate
REFERENCE_ROWS = 800_000  # training-set size the effect shrinkage is designed for
SHRINK_COUNT = 200.0  # a value expected n times in REFERENCE_ROWS gets effect weight n / (n + SHRINK_COUNT)
PAIR_MAX_CARDINALITY = 2_000  # planted pairs use fields a model sees mostly in its vocabulary
N_PAIRS = 5
MAIN_VARIANCE = 1.1  # variance of the logit's per-field part (sets the oracle AUC with PAIR_VARIANCE)
PAIR_VARIANCE = 0.35  # variance of the planted pairs' part (sum of u^2)
TIME_START = "2014-10-21T00"  # time columns span 10 days evenly by row position (Avazu's train range)
TIME_HOURS = 240
NEGATIVE_SHARE = 0.05  # share of small negatives (-1..-3) in the first never-missing int column
INT_T_MAX = 1_800  # int transform values the truth tables cover (t(2^62) is about 1847)

_MISSING_KEY = np.uint64(1 << 63)  # hash key of "missing" (no value maps there)
_M32_A, _M32_B = 0x85EBCA6B, 0xC2B2AE35
_M32_A_INV, _M32_B_INV = pow(_M32_A, -1, 1 << 32), pow(_M32_B, -1, 1 << 32)


# --- hashing ---------------------------------------------------------------------------------------------

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


# --- value encodings -------------------------------------------------------------------------------------

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


# --- the click model -------------------------------------------------------------------------------------

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


# --- generation ------------------------------------------------------------------------------------------

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
        with tqdm(total=rows, unit="row", unit_scale=True, desc=f"synth {dataset}", disable=None) as bar:
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
