"""The sweep report from a summary made in code: every plot file exists and is non-empty, the Markdown states
the dense baseline, the data and the machine, the RQ1-RQ4 sections and the choice; `deeplight report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from deeplight.cli import main as cli_main
from deeplight.base.errors import DeeplightError
from deeplight.evaluation.sweep_report import load_summary, machine_info, trial_table, write_report
from deeplight.ops.sweep import choose, pareto_front

FIELDS = ["I1", "I2", "C1", "C2", "C3"]


def _trial(n: int, mode: str, dnn: float, field: float, emb: float, auc: float, us: float) -> dict:
    pairs = [[0, 2, 0.8], [2, 3, -0.5], [1, 4, 0.1]][: max(1, round(3 * (1 - field)))]
    return {"number": n, "state": "COMPLETE", "valid_auc": auc, "latency_us": us, "duration_s": 3.0,
            "params": {"prune.dnn": dnn, "prune.field": field, "prune.embedding": emb, "prune.mode": mode,
                       "prune.finetune_epochs": 1},
            "sparsity": {"dnn": dnn, "field": field, "embedding": emb}, "nonzero": int(10_000 * (1 - dnn)),
            "kept_pairs": pairs, "top_pairs": [f"{FIELDS[i]} x {FIELDS[j]}" for i, j, _ in pairs],
            "mlflow_run_id": f"run{n}", "worker": "host:1"}


def summary(dense_auc: float = 0.8) -> dict:
    trials = [_trial(0, "unstructured", 0.9, 0.9, 0.4, 0.8003, 6.0),
              _trial(1, "structured", 0.95, 0.95, 0.6, 0.7995, 3.0),
              _trial(2, "unstructured", 0.5, 0.2, 0.1, 0.8010, 9.0),
              _trial(3, "structured", 0.98, 0.98, 0.9, 0.77, 1.5),
              {"number": 4, "state": "FAIL", "params": {"prune.dnn": 0.3}, "valid_auc": None, "latency_us": None}]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    chosen = choose(trials, dense_auc, 0.001)
    return {"study": "unit", "states": {"COMPLETE": 4, "FAIL": 1}, "trials": trials,
            "pareto": [complete[i]["number"] for i in pareto_front([(t["valid_auc"], t["latency_us"])
                                                                    for t in complete])],
            "chosen": chosen["number"] if chosen else None, "sampler": "tpe", "seed": 0, "experiment": "deeplight",
            "space": {"dnn": [0.0, 0.98], "field": [0.0, 0.98], "embedding": [0.0, 0.9],
                      "modes": ["unstructured", "structured"], "finetune_epochs": [1, 1]},
            "config": {"model.kind": "deepfwfm", "model.embed_dim": 10, "model.dnn": [400, 400, 400],
                       "train.epochs": 2, "train.batch_size": 2048},
            "data": {"dataset": "criteo", "fields": FIELDS, "rows": {"train": 8000, "valid": 1000, "test": 1000},
                     "train": "abc", "valid": "def", "feature_map": "fm"},
            "machine": machine_info(), "dense": {"valid": {"auc": dense_auc, "logloss": 0.45}, "params": 25_000,
                                                 "epoch": 1, "checkpoint": "/x/best.pt"},
            "mlflow_parent_run_id": "parent123", "tolerance": 0.001,
            "final": {"tolerance": 0.001, "chosen": chosen["number"] if chosen else None, "dense_latency_us": 12.0,
                      **({"chosen_latency_us": 3.1, "speedup": 12.0 / 3.1, "dense_test": {"auc": 0.7991},
                          "chosen_test": {"auc": 0.7987}} if chosen else {})}}


def test_report_files_exist_and_are_non_empty(tmp_path: Path):
    s = summary()
    assert s["chosen"] == 1 and s["pareto"] == [0, 1, 2, 3]
    files = write_report(s, tmp_path)
    for key in ("pareto_png", "sparsity_png", "pairs_png"):
        assert files[key].read_bytes()[:4] == b"\x89PNG" and files[key].stat().st_size > 5_000, key
    html = files["pareto_html"].read_text()
    assert "plotly" in html.lower() and "trial 1 (structured" in html
    rows = list(csv.DictReader(files["trials_csv"].open()))
    assert [r["number"] for r in rows] == ["0", "1", "2", "3", "4"] and rows[4]["state"] == "FAIL"
    assert json.loads(files["summary"].read_text())["chosen"] == 1


def test_markdown_states_baseline_data_machine_and_the_choice(tmp_path: Path):
    md = write_report(summary(), tmp_path)["report"].read_text()
    for text in ("## Data", "dataset `criteo`, 5 fields", "train 8,000", "## Machine", "cores usable",
                 "## Dense baseline", "valid AUC 0.80000", "test AUC 0.79910", "batch-1 latency 12.0 us",
                 "## RQ1-RQ3", "![sparsity](sparsity.png)", "## RQ4", "Chosen: trial 1", "| speedup | 1.0x | 3.87x |",
                 "| test AUC (scored once, after the choice) | 0.79910 | 0.79870 |", "![field pairs](pairs.png)",
                 "![Pareto front](pareto.png)", "[pareto.html](pareto.html)", "trial 4 fail", "parent123"):
        assert text in md, text
    # The Pareto table lists exactly the front, fastest first; the full table marks the choice.
    front = md.split("## Pareto front")[1].split("## RQ1")[0]
    assert [line.split("|")[1].strip() for line in front.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()] == ["3", "1", "0", "2"]
    assert "| 1 | structured |" in md and "**chosen**" in md


def test_fastest_first_table_shows_targets_and_achieved_sparsity():
    table = trial_table(summary())
    assert [r["trial"] for r in table] == [3, 1, 0, 2]
    assert table[1]["dnn"] == "0.95 -> 95.0%" and table[1]["chosen"] == "**chosen**"


def test_no_trial_within_tolerance_is_said_plainly(tmp_path: Path):
    s = summary(dense_auc=0.9)
    assert s["chosen"] is None
    files = write_report(s, tmp_path)
    md = files["report"].read_text()
    assert "No trial reached a valid AUC within 0.001 of the dense model (0.90000)" in md
    assert files["pareto_png"].stat().st_size > 0 and files["pairs_png"].stat().st_size > 0
    assert "Field pairs of the most accurate trial (2)" in md


def test_an_empty_sweep_cannot_be_reported(tmp_path: Path):
    s = summary()
    s["trials"] = [t for t in s["trials"] if t["state"] != "COMPLETE"]
    with pytest.raises(DeeplightError, match="no complete trial yet"):
        write_report(s, tmp_path)


def test_report_command_from_a_summary_file(tmp_path: Path, capsys):
    src = write_report(summary(), tmp_path / "first")["summary"]
    assert cli_main(["report", "--summary", str(src), "--out", str(tmp_path / "again")]) == 0
    assert json.loads(capsys.readouterr().out)["report"].endswith("report.md")
    assert (tmp_path / "again" / "report.md").read_text() == (tmp_path / "first" / "report.md").read_text()
    (tmp_path / "bad.json").write_text("{}")
    assert cli_main(["report", "--summary", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(DeeplightError, match="not a sweep summary"):
        load_summary(tmp_path / "bad.json")
