"""Tests of deeplight.data.ingest: raw files -> typed Parquet splits with exact row accounting.

All raw inputs are generated here (synthetic values); the real samples are only read, never copied.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deeplight.base.errors import DeeplightError
from deeplight.data.ingest import _ingest, ingest
from deeplight.data.validate import parse_records, parse_string_table
from deeplight.data.schema import get_schema

CRITEO = get_schema("criteo")
AVAZU = get_schema("avazu")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# The contract, written out independently of the module's own table.
CONTRACT_TYPES = {"label": pa.int8(), "int": pa.int64(), "cat": pa.string(), "id": pa.string(), "time": pa.int64()}


# --- synthetic raw rows -------------------------------------------------------------------------------------

def criteo_values(i: int) -> list[str]:
    """Raw texts of synthetic Criteo row i: empties, negatives, 13-digit ints; I13 is always i (the row key)."""
    ints = []
    for j in range(13):
        if j == 12:
            ints.append(str(i))
        elif (i + j) % 5 == 0:
            ints.append("")
        elif j == 1:
            ints.append(str(-i))
        elif j == 2:
            ints.append(str(i * 10 ** 12))
        else:
            ints.append(str(i * 13 + j))
    cats = ["" if (i * 3 + j) % 7 == 0 else f"{(i * 2654435761 + j * 40503) % 2 ** 32:08x}" for j in range(26)]
    return [str(i % 2), *ints, *cats]


def criteo_line(i: int) -> str:
    return "\t".join(criteo_values(i))


def avazu_values(i: int) -> list[str]:
    hour = f"14{10 + i % 3:02d}{21 + i % 9:02d}{i % 24:02d}"
    cats = [f"{(i * 7 + j) % 1000}" if j % 3 else f"{(i * 40503 + j) % 2 ** 32:08x}" for j in range(21)]
    return [str(10 ** 19 + i), str(i % 2), hour, *cats]


def avazu_line(i: int) -> str:
    return ",".join(avazu_values(i))


AVAZU_HEADER = ",".join(c.name for c in AVAZU.columns)


def typed(schema, values: list[str]) -> dict:
    """The expected typed values of one raw row, per the contract (computed here, not by the module)."""
    out = {}
    for col, text in zip(schema.columns, values):
        if col.kind in ("label", "time"):
            out[col.name] = int(text)
        elif col.kind == "int":
            out[col.name] = int(text) if text else None
        elif col.kind == "cat":
            out[col.name] = text or None
        else:
            out[col.name] = text
    return out


def write(path: Path, data: bytes) -> str:
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


def read_split(out: Path, split: str) -> list[dict]:
    parts = sorted((out / split).glob("part-*.parquet"))
    return [row for p in parts for row in pq.read_table(p).to_pylist()]


def read_quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


def all_rows(out: Path) -> list[dict]:
    return [r for s in ("train", "valid", "test") for r in read_split(out, s)]


def keys(out: Path, split: str, key: str = "I13") -> list[int]:
    return [r[key] for r in read_split(out, split)]


# --- row accounting -----------------------------------------------------------------------------------------

def dirty_criteo() -> tuple[bytes, dict[int, tuple[str, str | None]], list[list[str]]]:
    """A Criteo file with one of each kind of bad line; returns (bytes, {line: (kind, field)}, good values)."""
    good, lines, bad = [], [], {}

    def add_good(values: list[str], end: bytes = b"\n") -> None:
        good.append(values)
        lines.append("\t".join(values).encode() + end)

    def add_bad(raw: bytes, kind: str, fld: str | None) -> None:
        lines.append(raw + b"\n")
        bad[len(lines)] = (kind, fld)

    add_good(criteo_values(0))
    add_good(criteo_values(1), b"\r\n")
    add_bad("\t".join(criteo_values(2)[:-1]).encode(), "wrong_column_count", None)
    v = criteo_values(3)
    v[5] = "12a"
    add_bad("\t".join(v).encode(), "non_integer", "I5")
    v = criteo_values(4)
    v[0] = "2"
    add_bad("\t".join(v).encode(), "bad_label", "label")
    add_bad("\t".join(criteo_values(5)).encode().replace(b"\t", b"\t\xff\xfe", 1), "undecodable", None)
    add_bad(b"", "wrong_column_count", None)
    add_good(criteo_values(6))
    v = criteo_values(7)
    v[20] = "caf\u00e9 \u4e2d"  # valid UTF-8 is data, not an error
    add_good(v)
    v = criteo_values(8)
    v[1] = "99999999999999999999"
    add_bad("\t".join(v).encode(), "int_overflow", "I1")
    v = criteo_values(9)
    v[2] = "+5"
    add_bad("\t".join(v).encode(), "non_integer", "I2")
    v = criteo_values(10)
    v[30] = "ab\rcd"
    add_bad("\t".join(v).encode(), "stray_cr", None)
    v = criteo_values(11)
    v[1], v[2] = "-9223372036854775808", "9223372036854775807"  # the int64 extremes are valid
    add_good(v)
    add_good(criteo_values(12), b"")  # last line without a newline
    return b"".join(lines), bad, good


@pytest.mark.parametrize("block_size", [None, 97])
def test_bad_rows_quarantined_with_exact_lines(tmp_path, block_size):
    data, bad, good = dirty_criteo()
    raw = write(tmp_path / "dirty.txt", data)
    out = tmp_path / "out"
    kw = {"block_size": block_size} if block_size else {}
    rep = _ingest("criteo", [raw], str(out), max_bad_fraction=0.9, **kw)

    q = read_quarantine(out)
    assert [(r["line"], r["kind"], r["field"]) for r in q] == [(n, k, f) for n, (k, f) in sorted(bad.items())]
    assert all(r["file"] == raw for r in q)
    raw_lines = data.split(b"\n")
    for r in q:
        assert r["text"] == raw_lines[r["line"] - 1].decode("utf-8", errors="replace")
    by_line = {r["line"]: r["reason"] for r in q}
    assert "expected 40, got 39" in by_line[3]
    assert "'I5'" in by_line[4] and "'12a'" in by_line[4]
    assert "'2'" in by_line[5]
    assert "expected 40, got 1" in by_line[7]

    assert rep["read"] == len(bad) + len(good) == rep["written"] + rep["quarantined"]
    assert (rep["written"], rep["quarantined"]) == (len(good), len(bad))
    (inp,) = rep["inputs"]
    assert inp["read"] == inp["written"] + inp["quarantined"] == rep["read"]
    assert inp["reasons"] == {"bad_label": 1, "int_overflow": 1, "non_integer": 2, "stray_cr": 1, "undecodable": 1,
                              "wrong_column_count": 2}
    assert sum(rep["splits"].values()) == rep["written"]
    assert json.loads((out / "report.json").read_text()) == rep

    rows = sorted(all_rows(out), key=lambda r: r["I13"])
    assert rows == [typed(CRITEO, v) for v in good]


def test_output_types_and_dataset_json(tmp_path):
    raw = write(tmp_path / "a.txt", "".join(criteo_line(i) + "\n" for i in range(50)).encode())
    ingest("criteo", [raw], str(tmp_path / "out"))
    for split in ("train", "valid", "test"):
        for part in (tmp_path / "out" / split).glob("*.parquet"):
            schema = pq.read_schema(part)
            assert schema.names == CRITEO.names
            assert [schema.field(c.name).type for c in CRITEO.columns] == [
                CONTRACT_TYPES[c.kind] for c in CRITEO.columns]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["dataset"] == "criteo"
    assert meta["columns"] == [[c.name, c.kind] for c in CRITEO.columns]


def test_avazu_header_and_bad_hours(tmp_path):
    lines = [AVAZU_HEADER]
    good, bad = [], {}
    for i in range(20):
        v = avazu_values(i)
        if i in (3, 7, 11, 15, 16):
            v[2] = {3: "14133100", 7: "1410210", 11: "14102124", 15: "14023012", 16: ""}[i]  # month 13, 7 digits,
            bad[len(lines) + 1] = "bad_time"                                                  # hour 24, Feb 30, empty
        elif i == 5:
            v[2] = "16022900"  # a leap day is a real date
            good.append(v)
        else:
            good.append(v)
        lines.append(",".join(v))
    raw = write(tmp_path / "train.csv", ("\r\n".join(lines) + "\r\n").encode())
    out = tmp_path / "out"
    rep = ingest("avazu", [raw], str(out), max_bad_fraction=0.5)
    q = read_quarantine(out)
    assert [(r["line"], r["kind"], r["field"]) for r in q] == [(n, k, "hour") for n, k in sorted(bad.items())]
    assert "'14133100'" in q[0]["reason"]
    assert rep["read"] == 20 and rep["written"] == 15 and rep["quarantined"] == 5
    rows = sorted(all_rows(out), key=lambda r: r["id"])
    assert rows == sorted((typed(AVAZU, v) for v in good), key=lambda r: r["id"])


def test_avazu_wrong_header_fails_naming_file(tmp_path):
    header = AVAZU_HEADER.replace("site_id", "site")
    raw = write(tmp_path / "bad_header.csv", (header + "\n" + avazu_line(0) + "\n").encode())
    with pytest.raises(DeeplightError, match=r"bad_header\.csv.*header.*'site'.*'site_id'"):
        ingest("avazu", [raw], str(tmp_path / "out"))
    no_header = write(tmp_path / "no_header.csv", (avazu_line(0) + "\n").encode())
    with pytest.raises(DeeplightError, match=r"no_header\.csv.*header"):
        ingest("avazu", [no_header], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_gz_and_multiple_inputs(tmp_path):
    a = write(tmp_path / "a.txt.gz", "".join(criteo_line(i) + "\n" for i in range(30)).encode())
    bad = criteo_values(31)
    bad[0] = "x"
    b = write(tmp_path / "b.txt", ("".join(criteo_line(i) + "\n" for i in range(30, 31))
                                   + "\t".join(bad) + "\n" + criteo_line(32)).encode())
    out = tmp_path / "out"
    rep = ingest("criteo", [a, b], str(out), split=(0.5, 0.25, 0.25), split_mode="sequential")
    assert [(i["file"], i["read"], i["written"], i["quarantined"]) for i in rep["inputs"]] == [
        (a, 30, 30, 0), (b, 3, 2, 1)]
    assert [(r["file"], r["line"], r["field"]) for r in read_quarantine(out)] == [(b, 2, "label")]
    assert sorted(r["I13"] for r in all_rows(out)) == [*range(31), 32]
    # sequential over both inputs in order: 33 rows -> train rows 0..16, valid 17..24, test 25..32
    assert keys(out, "train") == list(range(17))
    assert keys(out, "valid") == list(range(17, 25))
    assert keys(out, "test") == [25, 26, 27, 28, 29, 30, 32]


def test_empty_and_missing_inputs_fail_naming_file(tmp_path):
    good = write(tmp_path / "good.txt", (criteo_line(0) + "\n").encode())
    empty = write(tmp_path / "empty.txt", b"")
    with pytest.raises(DeeplightError, match=r"empty\.txt.*no data rows"):
        ingest("criteo", [good, empty], str(tmp_path / "out"))
    header_only = write(tmp_path / "header_only.csv", (AVAZU_HEADER + "\n").encode())
    with pytest.raises(DeeplightError, match=r"header_only\.csv.*no data rows"):
        ingest("avazu", [header_only], str(tmp_path / "out"))
    with pytest.raises(DeeplightError, match=r"header_only\.csv.*no data rows"):
        ingest("avazu", [header_only], str(tmp_path / "out"), split_mode="sequential")
    with pytest.raises(DeeplightError, match=r"nope\.txt.*no such file"):
        ingest("criteo", [good, str(tmp_path / "nope.txt")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_mostly_bad_input_fails_with_counts_and_reasons(tmp_path):
    lines = []
    for i in range(10):
        v = criteo_values(i)
        if i < 6:
            v[3] = "n/a"
        lines.append("\t".join(v))
    raw = write(tmp_path / "mostly_bad.txt", ("\n".join(lines) + "\n").encode())
    with pytest.raises(DeeplightError, match=r"mostly_bad\.txt: 6 of 10 rows are bad.*line 1: .*'I3'"):
        ingest("criteo", [raw], str(tmp_path / "out"))
    rep = ingest("criteo", [raw], str(tmp_path / "out"), max_bad_fraction=0.6)
    assert (rep["read"], rep["written"], rep["quarantined"]) == (10, 4, 6)


def test_failed_run_leaves_previous_output_intact(tmp_path):
    good = write(tmp_path / "good.txt", "".join(criteo_line(i) + "\n" for i in range(40)).encode())
    bad = write(tmp_path / "bad.txt", "".join("9\t" + criteo_line(i)[2:] + "\n" for i in range(5)).encode())
    out = tmp_path / "data" / "out"
    first = ingest("criteo", [good], str(out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DeeplightError, match="bad.txt"):
        ingest("criteo", [good, bad], str(out))  # fails after writing the good input's rows
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert json.loads((out / "report.json").read_text()) == first
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["out"]  # no temporary dir left behind
    with pytest.raises(DeeplightError):
        ingest("criteo", [bad], str(tmp_path / "data" / "other"))
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["out"]


# --- splits -------------------------------------------------------------------------------------------------

def test_random_split_deterministic_seeded_and_block_independent(tmp_path):
    n = 3000
    raw = write(tmp_path / "a.txt", "".join(criteo_line(i) + "\n" for i in range(n)).encode())

    def run(name: str, seed: int, **kw) -> dict[str, list[int]]:
        rep = _ingest("criteo", [raw], str(tmp_path / name), seed=seed, **kw)
        got = {s: keys(tmp_path / name, s) for s in ("train", "valid", "test")}
        assert rep["splits"] == {s: len(v) for s, v in got.items()}
        return got

    a = run("a", 0)
    assert sorted(a["train"] + a["valid"] + a["test"]) == list(range(n))
    assert run("b", 0) == a
    # Tiny blocks (many exact-path carries), tiny row groups and parts: same assignment, same order.
    c = run("c", 0, block_size=4096, part_rows=500, row_group_rows=100)
    assert c == a
    assert len(list((tmp_path / "c" / "train").glob("part-*.parquet"))) == -(-len(a["train"]) // 500)
    d = run("d", 1)
    assert d != a and sorted(d["train"]) != sorted(a["train"])
    for split, frac in zip(("train", "valid", "test"), (0.8, 0.1, 0.1)):
        for got in (a, d):
            # 5 binomial standard deviations
            assert abs(len(got[split]) / n - frac) < 5 * np.sqrt(frac * (1 - frac) / n)


def test_sequential_split_puts_last_rows_in_test(tmp_path):
    lines = []
    for i in range(100):
        v = criteo_values(i)
        if i == 85:
            v[7] = "1.5"  # a bad row still takes its position
        lines.append("\t".join(v))
    raw = write(tmp_path / "a.txt", ("\n".join(lines) + "\n").encode())
    rep = _ingest("criteo", [raw], str(tmp_path / "out"), split_mode="sequential", block_size=1000)
    assert keys(tmp_path / "out", "train") == list(range(80))
    assert keys(tmp_path / "out", "valid") == [80, 81, 82, 83, 84, 86, 87, 88, 89]
    assert keys(tmp_path / "out", "test") == list(range(90, 100))
    assert rep["splits"] == {"train": 80, "valid": 9, "test": 10}


def test_long_line_and_empty_split(tmp_path):
    v = criteo_values(1)
    v[20] = "z" * 100_000  # longer than the block size: carried until its newline
    raw = write(tmp_path / "a.txt", (criteo_line(0) + "\n" + "\t".join(v) + "\n" + criteo_line(2)).encode())
    rep = _ingest("criteo", [raw], str(tmp_path / "out"), split=(1.0, 0.0, 0.0), block_size=1000)
    assert rep["splits"] == {"train": 3, "valid": 0, "test": 0}
    assert [r["C7"] for r in read_split(tmp_path / "out", "train")][1] == "z" * 100_000
    assert (tmp_path / "out" / "valid").is_dir() and not list((tmp_path / "out" / "valid").iterdir())


# --- the shared validator -----------------------------------------------------------------------------------

def test_parse_string_table_int_rules():
    ints = ["0", "-0", "007", "-12", "", None, "+5", "0x10", " 5", "5 ", "1e3", "\u0663", "-", "--1", "1-",
            "9223372036854775807", "-9223372036854775808", "9223372036854775808", "12345678901234567890"]
    n = len(ints)
    cols = {c.name: [""] * n for c in CRITEO.columns}
    cols["label"] = ["1"] * n
    cols["I4"] = ints
    table = pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})
    out, bad = parse_string_table(CRITEO, table)
    ok = [0, 0, 7, -12, None, None, 2 ** 63 - 1, -(2 ** 63)]
    assert out.column("I4").to_pylist() == ok
    assert [(r, f) for r, f, _ in bad] == [(i, "I4") for i in [6, 7, 8, 9, 10, 11, 12, 13, 14, 17, 18]]
    assert "int64" in bad[-1][2]
    assert out.column("C1").to_pylist() == [None] * len(ok)


def test_parse_records_names_row_and_field():
    rec = {c.name: "" for c in CRITEO.columns} | {"label": "0", "I1": 3, "C1": "abc"}
    t = parse_records(CRITEO, [rec, rec | {"I1": "-4", "label": 1}])
    assert t.column("I1").to_pylist() == [3, -4] and t.column("label").to_pylist() == [0, 1]
    with pytest.raises(DeeplightError, match=r"row 2, field 'I7'.*'x'"):
        parse_records(CRITEO, [rec, rec, rec | {"I7": "x"}])
    with pytest.raises(DeeplightError, match=r"row 1, field 'C3'.*missing"):
        parse_records(CRITEO, [rec, {k: v for k, v in rec.items() if k != "C3"}])
    with pytest.raises(DeeplightError, match=r"row 0, field 'I2'"):
        parse_records(CRITEO, [rec | {"I2": 2.5}])
    with pytest.raises(DeeplightError, match=r"row 0, field 'label'"):
        parse_records(CRITEO, [rec | {"label": "yes"}])
    # Serving rows have no label: declared optional, it comes back null.
    served = parse_records(CRITEO, [{k: v for k, v in rec.items() if k != "label"}], optional=("label",))
    assert served.column("label").to_pylist() == [None] and served.column("I1").to_pylist() == [3]
    hour = {c.name: "1" for c in AVAZU.columns} | {"hour": "14102399"}
    with pytest.raises(DeeplightError, match=r"row 0, field 'hour'.*'14102399'"):
        parse_records(AVAZU, [hour])


# --- S3 through a real (moto) server ------------------------------------------------------------------------

@pytest.mark.integration
def test_s3_inputs_through_moto_server(tmp_path, moto_s3):
    s3 = moto_s3
    s3.create_bucket(Bucket="raw")
    plain = ("".join(criteo_line(i) + "\n" for i in range(20)) + "oops\n").encode()
    s3.put_object(Bucket="raw", Key="day0.txt", Body=plain)
    s3.put_object(Bucket="raw", Key="day1.txt.gz",
                  Body=gzip.compress("".join(criteo_line(i) + "\n" for i in range(20, 35)).encode()))
    out = tmp_path / "out"
    rep = ingest("criteo", ["s3://raw/day0.txt", "s3://raw/day1.txt.gz"], str(out), split_mode="sequential")
    assert [(i["file"], i["read"], i["quarantined"]) for i in rep["inputs"]] == [
        ("s3://raw/day0.txt", 21, 1), ("s3://raw/day1.txt.gz", 15, 0)]
    assert [(r["file"], r["line"], r["text"]) for r in read_quarantine(out)] == [("s3://raw/day0.txt", 21, "oops")]
    assert sorted(r["I13"] for r in all_rows(out)) == list(range(35))
    with pytest.raises(DeeplightError, match=r"s3://raw/missing\.txt.*no such file"):
        ingest("criteo", ["s3://raw/missing.txt"], str(tmp_path / "out2"))


# --- the real samples (read in place, never copied) ---------------------------------------------------------

@pytest.mark.skipif(not (SHARED / "criteo" / "train_10k.txt").exists(), reason="Criteo sample absent")
def test_real_criteo_sample(tmp_path):
    rep = ingest("criteo", [str(SHARED / "criteo" / "train_10k.txt")], str(tmp_path / "out"))
    assert (rep["read"], rep["written"], rep["quarantined"]) == (9999, 9999, 0)
    assert sum(rep["splits"].values()) == 9999
    labels = {r["label"] for r in all_rows(tmp_path / "out")}
    assert labels == {0, 1}


@pytest.mark.skipif(not (SHARED / "avazu" / "train_8k.csv").exists(), reason="Avazu sample absent")
def test_real_avazu_sample(tmp_path):
    rep = ingest("avazu", [str(SHARED / "avazu" / "train_8k.csv")], str(tmp_path / "out"), split_mode="sequential")
    assert (rep["read"], rep["written"], rep["quarantined"]) == (8567, 8567, 0)
    rows = read_split(tmp_path / "out", "test")
    assert len(rows) == 8567 - round(8567 * 0.9)
    assert all(r["hour"] // 1_000_000 == 14 for r in rows)  # Avazu is October 2014
