"""deeplight.data.feature_map and deeplight.data.hashing: stable hashing, vocabularies, the int transform, and the hashed-data contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import deeplight.data.feature_map as feature_map
import deeplight.data.hashing as hashing
from deeplight.base.errors import DeeplightError
from deeplight.data.feature_map import FeatureMap, field_seed, int_transform, stable_hash
from deeplight.data.hashing import apply_feature_map, fit_feature_map, hash_dataset
from deeplight.base.files import fingerprint_files
from deeplight.data.schema import get_schema

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO_SAMPLE = SHARED_DATA / "criteo" / "train_10k.txt"
AVAZU_SAMPLE = SHARED_DATA / "avazu" / "train_8k.csv"

# --- a pure-Python reference for the hash ----------------------------------------------------------------

M64 = (1 << 64) - 1


def ref_fnv1a(data: bytes, basis: int = 0xCBF29CE484222325) -> int:
    h = basis
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def ref_fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    return h ^ (h >> 33)


def ref_hash(s: str, seed: int) -> int:
    return ref_fmix64(ref_fnv1a(s.encode(), 0xCBF29CE484222325 ^ seed))


def test_reference_matches_published_fnv1a_vectors():
    # Known FNV-1a 64 test vectors: the reference itself is right before we compare against it.
    assert ref_fnv1a(b"") == 0xCBF29CE484222325
    assert ref_fnv1a(b"a") == 0xAF63DC4C8601EC8C
    assert ref_fnv1a(b"foobar") == 0x85944171F73967E8


def random_strings(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = list("abcdef0123456789") + ["é", "ß", "中", "😀", " ", "\t"]
    return ["".join(rng.choice(alphabet, rng.integers(0, 13))) for _ in range(n)]


def test_stable_hash_matches_reference():
    rng = np.random.default_rng(0)
    values = random_strings(rng, 400) + ["", "", "a", "ab", "中文", "68fd1e64"]
    for seed in (0, 1, field_seed("C1"), M64):
        want = [ref_hash(v, seed) for v in values]
        assert stable_hash(pa.array(values), seed).tolist() == want
        assert stable_hash(pa.array(values, pa.large_string()), seed).tolist() == want
        # Slices (non-zero offset) and chunked arrays read the right bytes.
        assert stable_hash(pa.array(values).slice(7, 50), seed).tolist() == want[7:57]
        chunked = pa.chunked_array([pa.array(values[:100]), pa.array(values[100:])])
        assert stable_hash(chunked, seed).tolist() == want
    # Equal-length strings take the 2-D fast path.
    hexes = [f"{x:08x}" for x in rng.integers(0, 2**32, 300)]
    assert stable_hash(pa.array(hexes), 5).tolist() == [ref_hash(v, 5) for v in hexes]
    assert stable_hash(pa.array([], pa.string()), 5).dtype == np.uint64
    assert field_seed("C1") == ref_fnv1a(b"C1")


def test_stable_hash_is_the_same_in_other_processes():
    values = ["68fd1e64", "", "é中😀", "x" * 40]
    code = ("import pyarrow as pa; from deeplight.data.feature_map import stable_hash, field_seed; "
            f"print(stable_hash(pa.array({values!r}), field_seed('C7')).tolist())")
    outs = []
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                              cwd=REPO)
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1] == stable_hash(pa.array(values), field_seed("C7")).tolist()


def test_int_transform_known_values():
    got = int_transform(np.array([3, 10, 1000, -1, -5, 0, 1, 2, 4, 2**63 - 1])).tolist()
    # floor(ln 3^2) = floor(1.207) = 1, ln(10)^2 = 5.30, ln(1000)^2 = 47.7, ln(4)^2 = 1.92, ln(2^63-1)^2 = 1906.9
    assert got == [1, 5, 47, -1, -5, 0, 1, 2, 1, 1906]
    rng = np.random.default_rng(1)
    # Where t steps up: the smallest x with floor(ln(x)^2) >= k, found with math only.
    steps = []
    for k in range(1, 1907, 7):
        x = math.ceil(math.exp(math.sqrt(k))) + 3
        while x > 3 and math.floor(math.log(x - 1) ** 2) >= k:
            x -= 1
        steps += [x - 1, x, x + 1]
    x = np.concatenate([np.arange(-2000, 3000), rng.integers(3, 2**62, 3000), rng.integers(60000, 70000, 500),
                        [-2**63, 2**63 - 1], np.array(steps, dtype=np.int64)])
    want = [math.floor(math.log(v) ** 2) if v > 2 else v for v in x.tolist()]
    assert int_transform(x).tolist() == want
    # The float estimate for large values may be off by one on some platforms: the snap repairs either way.
    big = x[x >= 2**16]
    exact = np.array([math.floor(math.log(v) ** 2) for v in big.tolist()])
    for off in (-1, 0, 1):
        assert np.array_equal(feature_map._snap_to_thresholds(exact + off, big), exact)


def test_garbage_under_nulls_is_ignored():
    # Arrow leaves the value slots of nulls undefined: build arrays whose null slots hold junk.
    n = 6
    validity = pa.py_buffer(np.packbits(np.array([1, 0, 1, 0, 1, 1], bool), bitorder="little").tobytes())
    junk = pa.Array.from_buffers(pa.int64(), n, [validity, pa.py_buffer(
        np.array([5, -99999, 70000, 2**40, 0, -3], np.int64).tobytes())])
    clean = pa.array([5, None, 70000, None, 0, -3], pa.int64())
    assert junk.to_pylist() == clean.to_pylist()
    fmap = FeatureMap.hashed("criteo", 1000)
    base = typed_table("criteo", n)
    got = fmap.transform(base.set_column(1, "I1", junk))
    assert np.array_equal(got, fmap.transform(base.set_column(1, "I1", clean)))
    assert got[[1, 3], 0].tolist() == [0, 0]
    hours = pa.Array.from_buffers(pa.int64(), n, [validity, pa.py_buffer(
        np.array([14102105, -1, 14102105, 99999999999, 14102200, 14102105], np.int64).tobytes())])
    avazu = typed_table("avazu", n)
    amap = FeatureMap.hashed("avazu", 1000)
    ids = amap.transform(avazu.set_column(2, "hour", hours))
    assert ids[[1, 3], 0].tolist() == [0, 0] and ids[[1, 3], 1].tolist() == [0, 0]
    assert np.array_equal(ids, amap.transform(avazu.set_column(2, "hour", pa.array(hours.to_pylist(), pa.int64()))))


# --- small typed ingested datasets built in code ---------------------------------------------------------

def typed_table(dataset: str, n: int, seed: int = 0, **overrides: list) -> pa.Table:
    """Rows in the typed ingested contract: label int8, int int64, cat string, id string, time int64."""
    rng = np.random.default_rng(seed)
    cols = {}
    for c in get_schema(dataset).columns:
        if c.name in overrides:
            values = overrides[c.name]
        elif c.kind == "label":
            values = rng.integers(0, 2, n).tolist()
        elif c.kind == "int":
            values = [None if rng.random() < 0.2 else int(v) for v in rng.integers(-3, 5000, n)]
        elif c.kind == "cat":
            values = [None if rng.random() < 0.1 else f"{v:08x}" for v in rng.zipf(1.5, n) % 50]
        elif c.kind == "id":
            values = [str(v) for v in rng.integers(0, 2**62, n)]
        else:
            values = (14102100 + rng.integers(0, 10, n) * 100 + rng.integers(0, 24, n)).tolist()
        kind_type = {"label": pa.int8(), "int": pa.int64(), "cat": pa.string(), "id": pa.string(),
                     "time": pa.int64()}[c.kind]
        cols[c.name] = pa.array(values, kind_type)
    return pa.table(cols)


def write_ingested(root: Path, dataset: str, splits: dict[str, list[pa.Table]]) -> Path:
    """An ingested dataset dir: dataset.json plus each split's tables as part-NNNNN.parquet files."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"dataset": dataset}))
    for split, tables in splits.items():
        (root / split).mkdir()
        for i, t in enumerate(tables):
            pq.write_table(t, root / split / f"part-{i:05d}.parquet")
    return root


def read_split(out: Path, split: str) -> pa.Table:
    files = sorted((out / split).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def id_matrix(t: pa.Table, names: list[str]) -> np.ndarray:
    return np.stack([t.column(n).to_numpy() for n in names], axis=1)


@pytest.fixture
def criteo_dir(tmp_path: Path) -> Path:
    return write_ingested(tmp_path / "criteo", "criteo", {
        "train": [typed_table("criteo", 700, 1), typed_table("criteo", 500, 2)],
        "valid": [typed_table("criteo", 200, 3)],
        "test": [typed_table("criteo", 300, 4)],
    })


# --- the hashed contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [{"buckets": 1000}, {"min_count": 3}])
def test_written_ids_equal_transform_and_stay_in_range(criteo_dir, tmp_path, mode):
    out = tmp_path / "hashed"
    manifest = hash_dataset(str(criteo_dir), str(out), **mode)
    fmap = FeatureMap.load(out / "feature_map.json")
    assert manifest["field_names"] == [f.name for f in get_schema("criteo").feature_fields] == fmap.field_names
    assert manifest["field_sizes"] == fmap.field_sizes
    assert fmap.offsets == np.concatenate([[0], np.cumsum(fmap.field_sizes)[:-1]]).tolist()
    for split in ("train", "valid", "test"):
        src = pa.concat_tables([pq.read_table(f) for f in sorted((criteo_dir / split).glob("*.parquet"))])
        got = read_split(out, split)
        assert got.schema.names == fmap.field_names + ["label"]
        assert all(got.schema.field(n).type == pa.int32() for n in fmap.field_names)
        assert got.schema.field("label").type == pa.float32()
        ids = id_matrix(got, fmap.field_names)
        assert np.array_equal(ids, fmap.transform(src))
        assert ((ids >= 0) & (ids < np.array(fmap.field_sizes))).all()
        assert got.column("label").to_numpy().tolist() == src.column("label").to_numpy().astype(float).tolist()
        # Missing values -> 0, present ones -> > 0, field by field.
        for j, f in enumerate(fmap.fields):
            assert np.array_equal(ids[:, j] == 0, src.column(f.source).is_null().to_numpy(zero_copy_only=False))
    # Transform in one go, by slices and on one combined chunk all agree (chunking and offsets do not matter).
    src = pq.read_table(criteo_dir / "train" / "part-00000.parquet")
    whole = fmap.transform(src)
    assert np.array_equal(fmap.transform(src.slice(100, 50)), whole[100:150])
    assert np.array_equal(fmap.transform(pa.concat_tables([src.slice(0, 300), src.slice(300)])), whole)


def test_manifest_rows_fingerprints_and_copies(criteo_dir, tmp_path):
    out = tmp_path / "hashed"
    manifest = hash_dataset(str(criteo_dir), str(out), buckets=64)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"train": 1200, "valid": 200, "test": 300}
    for split, n in manifest["rows"].items():
        files = sorted((out / split).glob("*.parquet"))
        assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == n
        assert manifest["fingerprints"][split] == fingerprint_files(files)
        meta = pq.ParquetFile(files[0]).metadata  # no min/max statistics: no query filters on ids
        assert not any(meta.row_group(0).column(j).is_stats_set for j in range(meta.num_columns))
    assert manifest["feature_map_fingerprint"] == FeatureMap.load(out / "feature_map.json").fingerprint()
    assert manifest["dataset"] == "criteo" and manifest["mode"] == "hash"
    assert manifest["field_sizes"] == [64] * 39
    assert Path(manifest["source"]) == criteo_dir.absolute()
    assert json.loads((out / "dataset.json").read_text()) == {"dataset": "criteo"}
    # Same input, same output bytes: the fingerprints are reproducible.
    again = hash_dataset(str(criteo_dir), str(tmp_path / "again"), buckets=64)
    assert again["fingerprints"] == manifest["fingerprints"]
    # A different map changes the map fingerprint.
    assert hash_dataset(str(criteo_dir), str(tmp_path / "b65"), buckets=65)["feature_map_fingerprint"] != \
        manifest["feature_map_fingerprint"]


def test_empty_splits_and_parts(tmp_path, monkeypatch):
    src = write_ingested(tmp_path / "in", "criteo", {"train": [typed_table("criteo", 1000)], "valid": []})
    monkeypatch.setattr(hashing, "BATCH_ROWS", 128)
    monkeypatch.setattr(hashing, "PART_ROWS", 300)
    manifest = hash_dataset(str(src), str(tmp_path / "out"), min_count=2)
    assert manifest["rows"] == {"train": 1000, "valid": 0, "test": 0}
    # Batches of 128 rows; a new part once a part holds >= 300 rows: 3 + 3 + 2 batches.
    parts = sorted((tmp_path / "out" / "train").iterdir())
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [384, 384, 232]
    assert list((tmp_path / "out" / "valid").iterdir()) == [] and (tmp_path / "out" / "test").is_dir()
    fmap = FeatureMap.load(tmp_path / "out" / "feature_map.json")
    assert np.array_equal(id_matrix(read_split(tmp_path / "out", "train"), fmap.field_names),
                          fmap.transform(pq.read_table(src / "train")))


# --- vocab mode ------------------------------------------------------------------------------------------

def test_vocab_fitted_on_train_only_and_min_count_exact(tmp_path, monkeypatch):
    # C1 counts over two train files: a x5, b x4, c x3, d x3, e x2, f x1; min_count 3 keeps a, b, c, d.
    c1_train = ["a"] * 3 + ["b"] * 2 + ["c", "e", "f", None], ["a"] * 2 + ["b"] * 2 + ["c", "c"] + ["d"] * 3 + ["e"]
    train = [typed_table("criteo", len(v), i, C1=v) for i, v in enumerate(c1_train)]
    # "z" is the most frequent value of valid and test, but never seen in train: it must be OOV (1).
    valid = [typed_table("criteo", 6, 5, C1=["z"] * 5 + ["d"])]
    test = [typed_table("criteo", 4, 6, C1=["z", "z", "a", "f"])]
    src = write_ingested(tmp_path / "in", "criteo", {"train": train, "valid": valid, "test": test})
    monkeypatch.setattr(hashing, "BATCH_ROWS", 4)  # counts merge across batches and files
    out = tmp_path / "out"
    hash_dataset(str(src), str(out), min_count=3)
    fmap = FeatureMap.load(out / "feature_map.json")
    c1 = fmap.fields[fmap.field_names.index("C1")]
    assert c1.vocab == ["a", "b", "c", "d"]  # by descending count, ties (c, d) by value
    assert c1.size == 6
    ids = {s: read_split(out, s).column("C1").to_pylist() for s in ("train", "valid", "test")}
    assert ids["valid"] == [1] * 5 + [5]
    assert ids["test"] == [1, 1, 2, 1]
    assert ids["train"][:10] == [2, 2, 2, 3, 3, 4, 1, 1, 0, 2]
    # The same threshold rule on every other field, checked against Counter on the raw train values.
    raw = pa.concat_tables(train)
    for f in fmap.fields:
        if f.kind != "cat":
            continue
        counts = Counter(v for v in raw.column(f.source).to_pylist() if v is not None)
        want = sorted((v for v, k in counts.items() if k >= 3), key=lambda v: (-counts[v], v))
        assert f.vocab == want, f.name


def test_int_and_derived_keys_in_vocab_mode(tmp_path):
    i1 = [3, 10, 1000, -1, None, 2, 0, 1001, 11, 10]
    i2 = [-90000, 5, -90000, None, 7, 3, 8, 50000, -90000, -7]  # a wide range of keys: the np.unique path
    src = write_ingested(tmp_path / "c", "criteo", {"train": [typed_table("criteo", len(i1), 0, I1=i1, I2=i2)]})
    fmap = fit_feature_map(str(src), min_count=1)
    # t: 3->1, 10->5, 1000->47, -1, null, 2, 0, 1001->47, 11->5, 10->5: "5" x3, "47" x2, then singles by value.
    assert fmap.fields[0].vocab == ["5", "47", "-1", "0", "1", "2"]
    # t: -90000 x3, 5->2, 7->3, 3->1, 8->4, 50000->117, -7
    assert fmap.fields[1].vocab == ["-90000", "-7", "1", "117", "2", "3", "4"]
    ids = fmap.transform(pq.read_table(src / "train"))
    assert ids[:, 0].tolist() == [6, 2, 3, 4, 0, 7, 5, 3, 2, 2]
    assert ids[:, 1].tolist() == [2, 6, 2, 0, 7, 4, 8, 5, 2, 3]

    # Avazu: 14102105 is Tue 2014-10-21 05h; 14102005 Mon 05h; 14102623 Sun 23h; 14102200 Wed 00h.
    hours = [14102105, 14102105, 14102005, 14102623, 14102200, 14102105]
    src = write_ingested(tmp_path / "a", "avazu", {"train": [typed_table("avazu", len(hours), 0, hour=hours)]})
    fmap = fit_feature_map(str(src), min_count=1)
    assert fmap.fields[0].vocab == ["5", "0", "23"]  # hour_of_day: 5 x4, then 0 and 23 once each
    assert fmap.fields[1].vocab == ["1", "0", "2", "6"]  # weekday: Tue x3, then Mon, Wed, Sun
    ids = fmap.transform(pq.read_table(src / "train"))
    assert ids[:, 0].tolist() == [2, 2, 2, 4, 3, 2]
    assert ids[:, 1].tolist() == [2, 2, 3, 5, 4, 2]


def test_empty_string_and_null_dictionary_entries_are_missing(tmp_path):
    c2 = ["", "", "", "v", "v", None]
    src = write_ingested(tmp_path / "c", "criteo", {"train": [typed_table("criteo", 6, 0, C2=c2)]})
    fmap = fit_feature_map(str(src), min_count=1)
    assert fmap.fields[14].name == "C2" and fmap.fields[14].vocab == ["v"]  # "" is not a value
    table = pq.read_table(src / "train")
    assert fmap.transform(table)[:, 14].tolist() == [0, 0, 0, 2, 2, 0]
    # A dictionary column whose dictionary holds a null and "" (legal Arrow): both are missing too.
    dict_col = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, 2, 1, 0], pa.int32()), pa.array([None, "", "v"]))
    as_dict = table.set_column(15, "C2", dict_col)
    for m in (fmap, FeatureMap.hashed("criteo", 50)):
        got = m.transform(as_dict)[:, 14]
        assert (got[[0, 1, 4, 5]] == 0).all() and (got[[2, 3]] > 0).all()


def test_hash_mode_ids_follow_the_formula():
    # id = 1 + fmix64(FNV-1a(key, seed = FNV-1a(field name))) % (buckets - 1); key = the string / str(t(x)).
    table = typed_table("criteo", 5, I1=[3, 1000, None, -2, 70000], C1=["68fd1e64", "", None, "é", "a" * 30])
    ids = FeatureMap.hashed("criteo", 1000).transform(table)
    assert ids[:, 0].tolist() == [1 + ref_hash(k, ref_fnv1a(b"I1")) % 999 for k in ("1", "47")] + [0] + \
        [1 + ref_hash(k, ref_fnv1a(b"I1")) % 999 for k in ("-2", str(math.floor(math.log(70000) ** 2)))]
    c1 = [1 + ref_hash(k, ref_fnv1a(b"C1")) % 999 for k in ("68fd1e64", "é", "a" * 30)]
    assert ids[:, 13].tolist() == [c1[0], 0, 0, c1[1], c1[2]]

    fmap = FeatureMap.hashed("avazu", 997)
    hours = [14102105, 14102205, 14102805, 14102106, None]  # Tue 05, Wed 05, Tue 05 (a week later), Tue 06
    ids = fmap.transform(typed_table("avazu", 5, hour=hours))
    hod = [1 + ref_hash(s, ref_fnv1a(b"hour_of_day")) % 996 for s in ("5", "5", "5", "6")]
    wd = [1 + ref_hash(s, ref_fnv1a(b"weekday")) % 996 for s in ("1", "2", "1", "1")]
    assert ids[:, 0].tolist() == hod + [0]
    assert ids[:, 1].tolist() == wd + [0]


def test_apply_to_another_dir_gives_identical_ids(criteo_dir, tmp_path):
    out = tmp_path / "hashed"
    hash_dataset(str(criteo_dir), str(out), min_count=2)
    fmap = FeatureMap.load(out / "feature_map.json")
    # Another ingested dir: test rows reversed and mixed with unseen rows, all in a "test" split only.
    test = pq.read_table(criteo_dir / "test")
    other_rows = pa.concat_tables([typed_table("criteo", 50, 99), test.take(np.arange(test.num_rows)[::-1])])
    other = write_ingested(tmp_path / "other", "criteo", {"test": [other_rows]})
    manifest = apply_feature_map(fmap, str(other), str(tmp_path / "applied"))
    assert manifest["rows"] == {"train": 0, "valid": 0, "test": 50 + test.num_rows}
    assert manifest["feature_map_fingerprint"] == fmap.fingerprint()
    applied = id_matrix(read_split(tmp_path / "applied", "test"), fmap.field_names)[50:]
    original = id_matrix(read_split(out, "test"), fmap.field_names)
    assert np.array_equal(applied, original[::-1])
    assert FeatureMap.load(tmp_path / "applied" / "feature_map.json") == fmap


def test_feature_map_round_trip_and_validation(criteo_dir, tmp_path):
    fmap = fit_feature_map(str(criteo_dir), min_count=2)
    fmap.save(tmp_path / "fm.json")
    loaded = FeatureMap.load(tmp_path / "fm.json")
    assert loaded == fmap and loaded.fingerprint() == fmap.fingerprint()
    d = json.loads((tmp_path / "fm.json").read_text())

    def broken(mutate) -> str:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DeeplightError) as e:
            FeatureMap.load(tmp_path / "bad.json")
        assert "bad.json" in str(e.value)
        return str(e.value)

    assert "mode" in broken(lambda m: m.update(mode="bloom"))
    assert "size" in broken(lambda m: m["fields"][5].update(size=3))
    assert "duplicates" in broken(lambda m: m["fields"][20].update(vocab=["x", "x"], size=4))
    assert "'I1'" in broken(lambda m: m["fields"].__setitem__(0, {**m["fields"][0], "name": "X1"}))
    assert "missing keys" in broken(lambda m: m.pop("fields"))
    assert "unknown dataset" in broken(lambda m: m.update(dataset="kdd"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DeeplightError, match="bad.json"):
        FeatureMap.load(tmp_path / "bad.json")


# --- errors ----------------------------------------------------------------------------------------------

def test_schema_mismatch_fails_clearly(criteo_dir, tmp_path):
    criteo = typed_table("criteo", 10)
    with pytest.raises(DeeplightError, match=r"column 'hour'.*missing.*'avazu'"):
        FeatureMap.hashed("avazu", 100).transform(criteo)
    with pytest.raises(DeeplightError, match=r"'C17'.*missing"):
        FeatureMap.hashed("criteo", 100).transform(criteo.drop_columns(["C17"]))
    with pytest.raises(DeeplightError, match=r"'I3' has type string"):
        FeatureMap.hashed("criteo", 100).transform(criteo.set_column(3, "I3", criteo.column("I3").cast(pa.string())))
    with pytest.raises(DeeplightError, match=r"dataset 'criteo'.*for 'avazu'"):
        apply_feature_map(FeatureMap.hashed("avazu", 100), str(criteo_dir), str(tmp_path / "x"))
    # A data file whose columns do not match its dataset.json: the error names the file and the column.
    bad = write_ingested(tmp_path / "bad", "criteo", {"train": [criteo.drop_columns(["C3"])]})
    with pytest.raises(DeeplightError, match=r"part-00000.parquet: column .C3. .*missing"):
        hash_dataset(str(bad), str(tmp_path / "y"), buckets=10)
    assert not (tmp_path / "y").exists()  # nothing half written
    # An all-null column (e.g. a serving request without that field) is just missing everywhere.
    ids = FeatureMap.hashed("criteo", 100).transform(criteo.set_column(14, "C1", pa.nulls(10)))
    assert (ids[:, 13] == 0).all() and (ids[:, 12] > 0).any()


def test_bad_inputs_and_settings(tmp_path, criteo_dir):
    with pytest.raises(DeeplightError, match="exactly one"):
        hash_dataset(str(criteo_dir), str(tmp_path / "o"))
    with pytest.raises(DeeplightError, match="exactly one"):
        hash_dataset(str(criteo_dir), str(tmp_path / "o"), buckets=10, min_count=2)
    with pytest.raises(DeeplightError, match="buckets"):
        hash_dataset(str(criteo_dir), str(tmp_path / "o"), buckets=1)
    with pytest.raises(DeeplightError, match="min_count"):
        hash_dataset(str(criteo_dir), str(tmp_path / "o"), min_count=0)
    no_meta = tmp_path / "nometa"
    (no_meta / "train").mkdir(parents=True)
    with pytest.raises(DeeplightError, match=r"nometa/dataset.json"):
        hash_dataset(str(no_meta), str(tmp_path / "o"), buckets=10)
    no_train = write_ingested(tmp_path / "notrain", "criteo", {"test": [typed_table("criteo", 5)]})
    with pytest.raises(DeeplightError, match=r"notrain.*train"):
        hash_dataset(str(no_train), str(tmp_path / "o"), min_count=1)
    with pytest.raises(DeeplightError, match="must differ"):
        apply_feature_map(FeatureMap.hashed("criteo", 10), str(criteo_dir), str(criteo_dir))
    labels = [0, 1, 1, None, 0]
    bad_label = write_ingested(tmp_path / "badlabel", "criteo", {
        "train": [typed_table("criteo", 5), typed_table("criteo", 5, label=labels)]})
    with pytest.raises(DeeplightError, match=r"part-00001.parquet: row 3 \(0-based\): label"):
        hash_dataset(str(bad_label), str(tmp_path / "o"), buckets=10)
    two = write_ingested(tmp_path / "two", "criteo", {"train": [typed_table("criteo", 5, label=[0, 1, 2, 1, 0])]})
    with pytest.raises(DeeplightError, match=r"row 2 \(0-based\): label 'label' is 2"):
        hash_dataset(str(two), str(tmp_path / "o"), buckets=10)
    # A wrongly typed column is caught while fitting too, naming the file and the column.
    t = typed_table("criteo", 5)
    typed_wrong = write_ingested(tmp_path / "wrong", "criteo", {"train": [
        t.set_column(3, "I3", t.column("I3").cast(pa.string()))]})
    with pytest.raises(DeeplightError, match=r"part-00000.parquet: column 'I3' has type string"):
        hash_dataset(str(typed_wrong), str(tmp_path / "o"), min_count=1)
    assert not (tmp_path / "o").exists()
    with pytest.raises(DeeplightError, match="not contain it"):  # replacing tmp_path would delete the input
        apply_feature_map(FeatureMap.hashed("criteo", 10), str(criteo_dir), str(tmp_path))


# --- real samples through ingest -------------------------------------------------------------------------

def _ingest():
    from deeplight.data.ingest import ingest  # a broken import fails the test, never skips it

    return ingest


@pytest.mark.parametrize("dataset, sample", [("criteo", CRITEO_SAMPLE), ("avazu", AVAZU_SAMPLE)])
def test_real_sample_ingest_then_hash(tmp_path, dataset, sample):
    if not sample.exists():
        pytest.skip(f"{sample} is not present")
    ingest = _ingest()
    ingested = tmp_path / "ingested"
    ingest(dataset, [str(sample)], str(ingested))
    for mode in ({"min_count": 2}, {"buckets": 10_007}):
        out = tmp_path / f"hashed-{next(iter(mode))}"
        manifest = hash_dataset(str(ingested), str(out), **mode)
        fmap = FeatureMap.load(out / "feature_map.json")
        total = 0
        for split in ("train", "valid", "test"):
            files = sorted((ingested / split).glob("*.parquet"))
            src = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
            n = src.num_rows if src is not None else 0
            assert manifest["rows"][split] == n
            total += n
            if n:
                ids = id_matrix(read_split(out, split), fmap.field_names)
                assert np.array_equal(ids, fmap.transform(src))
                assert ((ids >= 0) & (ids < np.array(fmap.field_sizes))).all()
        assert total > 0.9 * sum(1 for _ in open(sample))  # only quarantined rows may be missing
        if "min_count" in mode:
            # Real data has both frequent values (in the vocabulary) and rare ones (OOV) in most fields.
            ids = id_matrix(read_split(out, "train"), fmap.field_names)
            assert sum(f.size > 2 for f in fmap.fields) >= len(fmap.fields) // 2
            assert (ids == 1).any() and (ids >= 2).any()
