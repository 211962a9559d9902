"""Tests of deeplight.data.parser, the compiled parser of clean blocks, against ingest's exact path.

The exact path (pyarrow's CSV reader + vectorised validation) is the reference: whenever the compiled parser
accepts a block, its tables must equal the exact path's, and it must accept every block the exact path finds
clean unless the block holds something it declines by design (a byte >= 0x80, an integer of 19+ digits).
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from deeplight.data import ingest
from deeplight.data.parser import parse_clean_block
from deeplight.data.ingest import _process_block, random_splits
from deeplight.data.schema import get_schema

CRITEO = get_schema("criteo")
AVAZU = get_schema("avazu")


def clean_value(kind: str, rng: random.Random) -> str:
    if kind == "label":
        return rng.choice("01")
    if kind == "int":
        return rng.choice(["", "0", "-0", "7", "-3", "007", str(rng.randrange(-10**6, 10**6)),
                           str(rng.randrange(10**17, 10**18)), "-" + "9" * 18])
    if kind == "time":
        return rng.choice(["14102100", "14102123", "16022923", "00010100"])
    if kind == "cat":
        return rng.choice(["", f"{rng.randrange(2**32):08x}", "a", "x y", "-1"])
    return rng.choice(["", "1000009418151094273", "id-7"])  # id


# Values the exact path rejects, by kind.
BAD_VALUES = {
    "label": ["", "2", "01", "-1", "1 ", "x"],
    "int": ["x", "-", "1-2", "+1", "0x10", " 1", "1.5", "--1", "1e3"],
    "time": ["", "1410210", "141021000", "14102124", "14023000", "14130100", "1410x100", "-1410210"],
}
# Values the exact path accepts but the compiled parser leaves to it.
DECLINED_VALUES = {"int": ["1234567890123456789", "-1234567890123456789"], "cat": ["café"], "id": ["ü"]}


def line(schema, rng: random.Random, overrides: dict[int, str] | None = None) -> str:
    values = [clean_value(c.kind, rng) for c in schema.columns]
    for i, v in (overrides or {}).items():
        values[i] = v
    return schema.delimiter.join(values)


def both_paths(schema, data: bytes, seed: int = 3):
    n = data.count(b"\n") + (not data.endswith(b"\n"))
    split_of = random_splits(seed, np.arange(n), (0.6, 0.2, 0.2))
    fast = parse_clean_block(schema, data, lambda lines: split_of[:lines])
    assert fast is None or sum(t.num_rows for t in fast if t is not None) == n
    exact = _process_block(schema, data, 0, lambda rows: random_splits(seed, rows, (0.6, 0.2, 0.2)), compiled=False)
    return fast, exact


def assert_same_tables(fast, exact) -> None:
    for s, (a, b) in enumerate(zip(fast, exact.tables)):
        if b is None or b.num_rows == 0:
            assert a is None or a.num_rows == 0, f"split {s}"
            continue
        assert a is not None, f"split {s}"
        assert a.schema.equals(b.schema), f"split {s}"
        assert a.equals(b), f"split {s}: {a.to_pylist()[:2]} != {b.to_pylist()[:2]}"


@pytest.mark.parametrize("schema", [CRITEO, AVAZU], ids=["criteo", "avazu"])
def test_clean_blocks_equal_the_exact_path(schema):
    rng = random.Random(0)
    for trial in range(20):
        text = "\n".join(line(schema, rng) for _ in range(rng.randrange(1, 300)))
        ending = rng.choice(["\n", "", "\r\n"])
        if ending == "\r\n":
            text = text.replace("\n", "\r\n")
        fast, exact = both_paths(schema, (text + ending).encode(), seed=trial)
        assert exact.bad.rows == []
        assert fast is not None, f"trial {trial}: a clean block was declined"
        assert_same_tables(fast, exact)


@pytest.mark.parametrize("schema", [CRITEO, AVAZU], ids=["criteo", "avazu"])
def test_every_bad_value_makes_it_decline(schema):
    rng = random.Random(1)
    cases = 0
    for col_index, col in enumerate(schema.columns):
        for bad in BAD_VALUES.get(col.kind, []):
            lines = [line(schema, rng) for _ in range(5)]
            lines[rng.randrange(5)] = line(schema, rng, {col_index: bad})
            fast, exact = both_paths(schema, ("\n".join(lines) + "\n").encode())
            assert len(exact.bad.rows) == 1, (col.name, bad)
            assert fast is None, f"{col.name}={bad!r} was accepted"
            cases += 1
    assert cases >= 14  # avazu: one label and one time column


@pytest.mark.parametrize("schema", [CRITEO, AVAZU], ids=["criteo", "avazu"])
def test_whole_line_problems_make_it_decline(schema):
    rng = random.Random(2)
    good = [line(schema, rng) for _ in range(4)]
    d = schema.delimiter
    broken = {
        "too_few": d.join(good[0].split(d)[:-1]),
        "too_many": good[0] + d,
        "blank": "",
        "stray_cr": good[0][:5] + "\r" + good[0][5:],
        "undecodable": good[0] + "\udcff",
    }
    for name, bad_line in broken.items():
        data = "\n".join([good[1], bad_line, good[2]]).encode("utf-8", errors="surrogateescape") + b"\n"
        fast, exact = both_paths(schema, data)
        assert len(exact.bad.rows) == 1, name
        assert fast is None, name


def test_declined_values_are_valid_but_left_to_the_exact_path():
    rng = random.Random(4)
    for schema in (CRITEO, AVAZU):
        for col_index, col in enumerate(schema.columns):
            for value in DECLINED_VALUES.get(col.kind, []):
                data = (line(schema, rng, {col_index: value}) + "\n").encode()
                fast, exact = both_paths(schema, data)
                assert exact.bad.rows == [], (col.name, value)
                assert fast is None, (col.name, value)


def test_random_mutations_never_disagree():
    """Fuzz: replace, delete or insert single bytes; accepted blocks must equal the exact path's tables."""
    rng = random.Random(5)
    accepted = declined = 0
    alphabet = "0123456789-\t,\r\nx \xe9"
    for trial in range(300):
        schema = CRITEO if trial % 2 else AVAZU
        text = "\n".join(line(schema, rng) for _ in range(3)) + "\n"
        chars = list(text)
        for _ in range(rng.randrange(1, 3)):
            pos = rng.randrange(len(chars))
            op = rng.choice(["replace", "delete", "insert"])
            if op == "replace":
                chars[pos] = rng.choice(alphabet)
            elif op == "delete":
                del chars[pos]
            else:
                chars.insert(pos, rng.choice(alphabet))
        data = "".join(chars).encode()
        if not data.strip(b"\n"):
            continue
        fast, exact = both_paths(schema, data, seed=trial)
        if fast is None:
            declined += 1
            continue
        accepted += 1
        assert exact.bad.rows == [], f"trial {trial}: accepted {data!r}, exact path found {exact.bad.reasons}"
        assert_same_tables(fast, exact)
    assert accepted > 20 and declined > 100


def test_ingest_output_is_the_same_with_and_without_the_compiled_parser(tmp_path, monkeypatch):
    """A whole file with bad rows scattered over small blocks: same Parquet, quarantine and report."""
    rng = random.Random(6)
    bad = [i for i in range(3000) if i % 97 == 5 or i % 389 == 7]
    lines = [line(CRITEO, rng, {1 + i % 13: "bad"}) if i % 97 == 5 else "" if i % 389 == 7 else line(CRITEO, rng)
             for i in range(3000)]
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join(lines) + "\n")
    accepted = []
    original_parse = ingest.parse_clean_block

    def counting_parse(*a, **k):
        tables = original_parse(*a, **k)
        accepted.append(tables is not None)
        return tables

    monkeypatch.setattr(ingest, "parse_clean_block", counting_parse)
    outs = {}
    original = ingest._process_block
    for compiled in (True, False):
        monkeypatch.setattr(ingest, "_process_block",
                            lambda *a, compiled=compiled, **k: original(*a, compiled=compiled, **k))
        out = tmp_path / f"out-{compiled}"
        report = ingest._ingest("criteo", [str(raw)], str(out), block_size=4096, row_group_rows=500)
        outs[compiled] = (report, (out / "quarantine.jsonl").read_text(),
                          {s: pq.read_table(out / s) for s in ingest.SPLITS})
    assert 0 < sum(accepted) < len(accepted)  # both paths ran in the compiled run
    assert outs[True][0]["quarantined"] == len(bad)
    assert outs[True][0] == outs[False][0]
    assert outs[True][1] == outs[False][1]
    for s in ingest.SPLITS:
        assert outs[True][2][s].equals(outs[False][2][s]), s
