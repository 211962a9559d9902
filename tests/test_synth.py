"""Synthetic data with known truth: exact layout, determinism, and clicks that really follow the truth."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from deeplight.data import synth
from deeplight.base.errors import DeeplightError
from deeplight.data.schema import get_schema

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SAMPLES = {"criteo": REAL_DATA / "criteo" / "train_10k.txt", "avazu": REAL_DATA / "avazu" / "train_8k.csv"}
ARROW_TYPES = {"label": pa.int8(), "int": pa.int64(), "cat": pa.string(), "id": pa.string(), "time": pa.int64()}
HEX8 = re.compile(rb"^[0-9a-f]{8}$")
BIG_ROWS = 200_000


def read_typed(path: Path, dataset: str) -> pa.Table:
    """Parse a raw file into the typed ingested contract, independently of deeplight's own reader."""
    schema = get_schema(dataset)
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=None if schema.header else schema.names),
        parse_options=pacsv.ParseOptions(delimiter=schema.delimiter, quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={c.name: ARROW_TYPES[c.kind] for c in schema.columns},
            strings_can_be_null=True, include_columns=schema.names),
    )


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


@pytest.fixture(scope="module")
def big_criteo(tmp_path_factory) -> tuple[Path, pa.Table, dict, np.ndarray]:
    d = tmp_path_factory.mktemp("criteo_big")
    out = d / "train.txt"
    synth.synthesize("criteo", rows=BIG_ROWS, seed=11, out=str(out), probabilities_out=str(d / "p.npy"))
    truth = synth.load_truth(str(out) + ".truth.json")
    assert synth.load_truth(Path(f"{out}.truth.json")) == truth  # a Path works as well as a str
    return out, read_typed(out, "criteo"), truth, np.load(d / "p.npy")


@pytest.fixture(scope="module")
def avazu(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("avazu") / "train.csv"
    summary = synth.synthesize("avazu", rows=30_000, seed=4, out=str(out))
    return out, summary


# --- determinism --------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    synth.synthesize("criteo", rows=3_000, seed=5, out=str(a))
    synth.synthesize("criteo", rows=3_000, seed=5, out=str(b))
    synth.synthesize("criteo", rows=3_000, seed=6, out=str(c))
    assert a.read_bytes() == b.read_bytes()
    assert Path(f"{a}.truth.json").read_text() == Path(f"{b}.truth.json").read_text()
    assert a.read_bytes() != c.read_bytes()
    assert len(set(lines_of(a)) & set(lines_of(c))) == 0


def test_blocks_are_seeded_by_index_not_by_file_length(tmp_path):
    # Criteo has no time column, so a shorter file is an exact prefix of a longer one, across a block edge.
    short, long_ = tmp_path / "s.txt", tmp_path / "l.txt"
    synth.synthesize("criteo", rows=1_000, seed=2, out=str(short))
    synth.synthesize("criteo", rows=synth.BLOCK_ROWS + 500, seed=2, out=str(long_))
    long_lines = lines_of(long_)
    assert len(long_lines) == synth.BLOCK_ROWS + 500
    assert lines_of(short) == long_lines[:1_000]


def test_gz_output_is_gzip_of_the_same_text(tmp_path):
    plain, packed = tmp_path / "x.txt", tmp_path / "x.txt.gz"
    synth.synthesize("avazu", rows=2_000, seed=3, out=str(plain))
    s = synth.synthesize("avazu", rows=2_000, seed=3, out=str(packed))
    assert s["truth"] == str(packed) + ".truth.json" and Path(s["truth"]).exists()
    with gzip.open(packed, "rb") as f:
        assert f.read() == plain.read_bytes()


# --- layout -------------------------------------------------------------------------------------------------

def test_criteo_layout_types_and_missing_rates(big_criteo):
    path, _, truth, _ = big_criteo
    schema = get_schema("criteo")
    rows = [line.split(b"\t") for line in lines_of(path)[:50_000]]
    assert all(len(r) == 40 for r in rows)
    cols = list(zip(*rows))
    assert set(cols[0]) == {b"0", b"1"}
    for c, values in zip(schema.columns[1:], cols[1:]):
        empty = np.mean([v == b"" for v in values])
        assert abs(empty - c.missing) < 0.015, (c.name, empty, c.missing)
        present = [v for v in values if v]
        if c.kind == "cat":
            assert all(HEX8.match(v) for v in present), c.name
            assert len(set(present)) <= c.cardinality
        else:
            ints = np.array([int(v) for v in present])
            assert all(re.fullmatch(rb"-?[0-9]+", v) for v in present)
            negatives = set(ints[ints < 0].tolist())
            if c.name == "I2":  # the first never-missing int column takes small negatives, like the real I2
                assert negatives == {-1, -2, -3}
            else:
                assert not negatives, c.name
            assert ints.max() > 20 * max(np.median(ints), 1), c.name  # heavy tail


def test_hex8_values_are_distinct_per_field(big_criteo):
    _, table, _, _ = big_criteo
    c6, c14 = (set(table.column(c).drop_null().to_pylist()) for c in ("C6", "C14"))  # 24 and 27 values
    assert 15 <= len(c6) <= 24 and 15 <= len(c14) <= 27
    assert not c6 & c14


def test_categories_are_zipf_like(big_criteo):
    _, table, _, _ = big_criteo
    counts = np.sort(np.unique(table.column("C4").drop_null().to_numpy(zero_copy_only=False),
                               return_counts=True)[1])[::-1]
    # Zipf with exponent 1.05 .. 1.2: rank 1 vs rank 10 about 10^1.05 .. 10^1.2, and a long tail of rare values.
    assert 8 < counts[0] / counts[9] < 22
    assert (counts <= 2).sum() > 5_000


def test_avazu_layout_header_ids_and_hours(avazu):
    path, summary = avazu
    schema = get_schema("avazu")
    lines = lines_of(path)
    assert lines[0] == b"id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain," \
                       b"app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16," \
                       b"C17,C18,C19,C20,C21"
    assert len(lines) == 30_001 == summary["rows"] + 1
    rows = [line.split(b",") for line in lines[1:]]
    assert all(len(r) == 24 for r in rows)
    cols = dict(zip(schema.names, zip(*rows)))
    ids = cols["id"]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(rb"[0-9]{1,20}", v) for v in ids)
    assert max(len(v) for v in ids) >= 19
    hours = np.array([int(v) for v in cols["hour"]])
    assert hours[0] == 14102100 and hours[-1] == 14103023 and (np.diff(hours) >= 0).all()
    assert len(np.unique(hours)) == 240
    day = hours // 100 % 100
    test_rows = len(hours) // 10  # a 0.8/0.1/0.1 sequential split puts exactly the last day in test
    assert (day[-test_rows:] == 30).all() and (day[:-test_rows] < 30).all()
    for c in schema.columns[3:]:
        assert all(v for v in cols[c.name]), c.name  # no missing declared
        if c.style == "int":
            assert all(re.fullmatch(rb"[0-9]+", v) for v in cols[c.name]), c.name
        else:
            assert all(HEX8.match(v) for v in cols[c.name]), c.name
    assert 0.15 < summary["click_rate"] < 0.19


def value_shape(v: bytes) -> str:
    if not v:
        return "empty"
    if HEX8.match(v):  # before the decimal test: 8-digit decimals (hours) look like hex8 in both files
        return "hex8"
    return "decimal" if re.fullmatch(rb"-?[0-9]+", v) else "other"


@pytest.mark.parametrize("dataset", ["criteo", "avazu"])
def test_layout_matches_the_real_kaggle_sample(dataset, tmp_path):
    real = REAL_SAMPLES[dataset]
    if not real.exists():
        pytest.skip(f"{real} not present")
    schema = get_schema(dataset)
    out = tmp_path / "synthetic"
    synth.synthesize(dataset, rows=3_000, seed=1, out=str(out))
    delimiter = schema.delimiter.encode()
    real_lines, synth_lines = real.read_bytes().split(b"\n")[:3_001], lines_of(out)
    if schema.header:
        assert synth_lines[0] == real_lines[0].rstrip(b"\r")
        real_lines, synth_lines = real_lines[1:], synth_lines[1:]
    real_rows = [line.rstrip(b"\r").split(delimiter) for line in real_lines if line]
    synth_rows = [line.split(delimiter) for line in synth_lines]
    assert {len(r) for r in real_rows} == {len(r) for r in synth_rows} == {len(schema.columns)}
    for name, real_values, synth_values in zip(schema.names, zip(*real_rows), zip(*synth_rows)):
        real_shapes = {value_shape(v) for v in real_values}
        synth_shapes = {value_shape(v) for v in synth_values}
        assert synth_shapes <= real_shapes, (name, synth_shapes, real_shapes)


def test_format_rows_matches_pyarrow_csv_writer(big_criteo):
    _, table, _, _ = big_criteo
    extra = pa.table({"big": pa.array([0, -1, 9_999, 10_000, -123_456_789, 2 ** 63 - 1, None] * 3, pa.int64()),
                      "s": pa.array(["a", "", None, "xyz", "0123456789", "q", "r"] * 3)})
    for t in (table.slice(0, 5_000), extra):
        sink = pa.BufferOutputStream()
        options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
        with pacsv.CSVWriter(sink, t.schema, write_options=options) as w:
            w.write_table(t)
        assert synth.format_rows(t, "\t").tobytes() == sink.getvalue().to_pybytes()


# --- the truth --------------------------------------------------------------------------------------------------

def test_truth_json_describes_the_model(big_criteo, avazu):
    _, _, truth, _ = big_criteo
    fields = [f.name for f in get_schema("criteo").feature_fields]
    assert truth["dataset"] == "criteo" and truth["seed"] == 11 and truth["rows"] == BIG_ROWS
    assert truth["field_order"] == fields and set(truth["fields"]) == set(fields)
    assert len(truth["planted_pairs"]) == 5 and len(truth["noise_fields"]) >= 5
    paired = {f for a, b, _ in truth["planted_pairs"] for f in (a, b)}
    assert paired <= set(fields) and not paired & set(truth["noise_fields"])
    assert all(u > 0 for _, _, u in truth["planted_pairs"])
    assert all(truth["fields"][f]["effect_std"] == 0 for f in truth["noise_fields"])
    assert 0.2 <= truth["click_rate_target"] <= 0.25
    a_truth = synth.load_truth(avazu[1]["truth"])
    assert len(a_truth["noise_fields"]) >= 3 and a_truth["click_rate_target"] == pytest.approx(0.17)
    assert {"hour_of_day", "weekday"} <= set(a_truth["fields"])


def test_probability_recomputed_from_text_is_exactly_the_generators(big_criteo, avazu, tmp_path):
    _, table, truth, p_gen = big_criteo
    p = synth.true_probability(table, truth)
    assert np.array_equal(p, p_gen)
    y = table.column("label").to_numpy()
    assert abs(y.mean() - p.mean()) < 3.5 * np.sqrt(p.mean() * (1 - p.mean()) / len(p))
    # Avazu: time-derived fields and int-style categories go through the same recomputation.
    out = tmp_path / "a.csv"
    synth.synthesize("avazu", rows=5_000, seed=4, out=str(out), probabilities_out=str(tmp_path / "p.npy"))
    assert np.array_equal(synth.true_probability(read_typed(out, "avazu"), synth.load_truth(f"{out}.truth.json")),
                          np.load(tmp_path / "p.npy"))


def test_logistic_regression_on_true_components_recovers_the_truth(big_criteo):
    from sklearn.linear_model import LogisticRegression

    _, table, truth, _ = big_criteo
    comp = synth.logit_components(table, truth)
    main = sum(v for k, v in comp.items() if k.startswith("effect:"))
    (a1, _, _), (_, b2, _) = truth["planted_pairs"][:2]
    products = [comp[f"z:{a}"] * comp[f"z:{b}"] for a, b, _ in truth["planted_pairs"]]
    cross = comp[f"z:{a1}"] * comp[f"z:{b2}"]  # two unrelated sign fields: no effect
    X = np.column_stack([main, *products, cross])
    y = table.column("label").to_numpy()
    model = LogisticRegression(C=1e6, max_iter=1_000).fit(X, y)
    coef = model.coef_[0]
    # Standard errors here are about 0.006 for the +-1 columns and 0.01 for the main effect.
    assert coef[0] == pytest.approx(1.0, abs=0.06)
    assert coef[1:6] == pytest.approx([u for _, _, u in truth["planted_pairs"]], abs=0.04)
    assert abs(coef[6]) < 0.03
    assert model.intercept_[0] == pytest.approx(truth["bias"], abs=0.06)


def test_planted_pairs_drive_clicks_and_noise_pairs_do_not(big_criteo):
    _, table, truth, _ = big_criteo
    comp = synth.logit_components(table, truth)
    y = table.column("label").to_numpy().astype(float)

    def rate_gap(product: np.ndarray) -> float:
        return y[product > 0].mean() - y[product < 0].mean()

    for a, b, u in truth["planted_pairs"]:
        assert rate_gap(comp[f"z:{a}"] * comp[f"z:{b}"]) > 0.2 * u, (a, b)
    pairs = truth["planted_pairs"]
    for i in range(len(pairs)):  # mismatched halves of different pairs
        a, b = pairs[i][0], pairs[(i + 1) % len(pairs)][1]
        assert abs(rate_gap(comp[f"z:{a}"] * comp[f"z:{b}"])) < 0.012, (a, b)


def chi2_per_dof(values: np.ndarray, y: np.ndarray, min_count: int = 500) -> tuple[float, int]:
    """(chi-square per dof, values used): per-value click rates vs the overall rate, values seen >= min_count."""
    uniq, inv, counts = np.unique(values, return_inverse=True, return_counts=True)
    clicks = np.bincount(inv, weights=y)
    keep = counts >= min_count
    rate = y.mean()
    chi2 = ((clicks[keep] - counts[keep] * rate) ** 2 / (counts[keep] * rate * (1 - rate))).sum()
    return float(chi2 / max(keep.sum() - 1, 1)), int(keep.sum())


def test_noise_fields_have_flat_click_rates(big_criteo):
    _, table, truth, _ = big_criteo
    y = table.column("label").to_numpy().astype(float)

    def values(name: str) -> np.ndarray:
        col = table.column(name)
        return col.fill_null("" if pa.types.is_string(col.type) else -99).to_numpy(zero_copy_only=False)

    for f in truth["noise_fields"]:
        stat, dof = chi2_per_dof(values(f), y)
        assert dof >= 2, f
        assert stat < 1 + 5 * np.sqrt(2 / dof), (f, stat, dof)  # chi2/dof of pure noise: 1 +- sqrt(2/dof)
    signal = [f for f, s in truth["fields"].items() if s["role"] == "signal" and s["kind"] == "cat"]
    strongest = max(signal, key=lambda f: truth["fields"][f]["effect_std"])
    assert chi2_per_dof(values(strongest), y)[0] > 10


def test_oracle_auc_is_as_advertised(big_criteo):
    _, table, truth, p = big_criteo
    y = table.column("label").to_numpy()
    auc = synth.oracle_auc(y, p)
    assert 0.75 <= auc <= 0.81
    comp = synth.logit_components(table, truth)
    without_pairs = sum(v for k, v in comp.items() if k.startswith("effect:"))
    assert auc - synth.oracle_auc(y, without_pairs) >= 0.02


def test_long_tail_carries_little_signal():
    # Variance share of the main effects on values a 800k-row training set sees fewer than 8 times.
    truth = synth.make_truth(get_schema("criteo"), seed=0, rows=1)
    model = synth._model(truth)
    tail = total = 0.0
    for name, spec in truth["fields"].items():
        pmf, _ = synth._field_pmf(name, spec)
        e = model.fields[name].effect
        var = pmf * (e - pmf @ e) ** 2
        total += var.sum()
        tail += var[pmf * synth.REFERENCE_ROWS < 8].sum()
    assert total == pytest.approx(synth.MAIN_VARIANCE, rel=0.01)
    assert tail / total < 0.005


def test_oracle_auc_agrees_with_sklearn_including_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(5_000) < 0.3
    s = np.round(rng.random(5_000) + 0.3 * y, 1)  # many ties
    assert synth.oracle_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert synth.oracle_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    with pytest.raises(DeeplightError, match="both"):
        synth.oracle_auc(np.ones(3), np.arange(3.0))


# --- errors ---------------------------------------------------------------------------------------------------

def test_bad_arguments_and_foreign_values_are_named(tmp_path, big_criteo):
    with pytest.raises(DeeplightError, match="unknown dataset"):
        synth.synthesize("kddcup", rows=10, seed=0, out=str(tmp_path / "x"))
    with pytest.raises(DeeplightError, match="rows"):
        synth.synthesize("criteo", rows=0, seed=0, out=str(tmp_path / "x"))
    _, table, truth, _ = big_criteo
    small = table.slice(0, 10)

    def with_c3(*values: str | None) -> pa.Table:
        column = pa.array(small.column("C3").to_pylist()[:10 - len(values)] + list(values))
        return small.set_column(small.schema.get_field_index("C3"), "C3", column)

    with pytest.raises(DeeplightError, match=r"field C3, row 8: value 'ABCDEF12' is not 8 lowercase hex"):
        synth.true_logit(with_c3("ABCDEF12", None), truth)
    with pytest.raises(DeeplightError, match=r"field C3, row 9: value 'zz' is not 8 hex digits"):
        synth.true_logit(with_c3("zz"), truth)
    with pytest.raises(DeeplightError, match=r"field C3, row 9: value 'ffffffff' is not a value of this synth"):
        synth.true_logit(with_c3("ffffffff"), truth)
    with pytest.raises(DeeplightError, match="no column 'I5'"):
        synth.true_logit(small.drop_columns(["I5"]), truth)
    with pytest.raises(DeeplightError, match="not a synthetic-data truth"):
        (tmp_path / "t.json").write_text(json.dumps({"dataset": "criteo"}))
        synth.load_truth(str(tmp_path / "t.json"))


# --- memory -----------------------------------------------------------------------------------------------------

_RSS_SCRIPT = """
import resource, sys
from deeplight.data.synth import synthesize
synthesize("criteo", rows=int(sys.argv[1]), seed=0, out="/dev/null", truth_path=sys.argv[2])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_does_not_grow_with_rows(tmp_path):
    runs = {rows: subprocess.Popen([sys.executable, "-c", _RSS_SCRIPT, str(rows), str(tmp_path / f"{rows}.json")],
                                   stdout=subprocess.PIPE, text=True)
            for rows in (200_000, 2_000_000)}  # both at once: two cores
    peak_kib = {rows: int(p.communicate()[0].split()[-1]) for rows, p in runs.items()}
    assert all(p.returncode == 0 for p in runs.values())
    assert peak_kib[2_000_000] - peak_kib[200_000] < 20_000, peak_kib  # ten times the rows, the same peak
