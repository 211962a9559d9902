"""Model registry: a raw-rows pyfunc with alias and tags, the promotion gate, bad input, and the same against a
real `mlflow server` (local and S3 artifacts) and `mlflow models serve`.

The first tests use the embedded sqlite store; the `integration` ones start real servers on 127.0.0.1 (moto's S3
server in a thread; `mlflow server` and `mlflow models serve` as processes in their own session, stopped by PID).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from deeplight.cli import main
from deeplight.serve.engine import CompactModel
from deeplight.serve.export import compact_checkpoint
from deeplight.base.config import Config
from deeplight.base.errors import DeeplightError
from deeplight.evaluation.evaluate import evaluate_model
from deeplight.data.feature_map import FeatureMap
from deeplight.data.hashing import hash_dataset
from deeplight.data.ingest import ingest
from deeplight.data.validate import parse_records
from deeplight.model.prune import prune
from deeplight.ops.pyfunc import BadRowsError
from deeplight.ops.registry import log_evaluation, promote, register_model
from deeplight.data.schema import get_schema
from deeplight.data.synth import synthesize
from deeplight.ops.tracking import MlflowTracker, tracking_uri
from deeplight.model.train import train

CFG = Config().replace(**{"model.dnn": (16,), "train.batch_size": 512, "train.epochs": 2, "train.threads": 1,
                          "prune.dnn": 0.8, "prune.field": 0.6, "prune.embedding": 0.3, "prune.ramp_epochs": 1.0,
                          "prune.finetune_epochs": 1})
FAST = {"latency_rounds": 1, "latency_budget_s": 0.01}
CRITEO = get_schema("criteo")
COLUMNS = [c.name for c in CRITEO.columns]
BIN = Path(sys.executable).parent
SERVER_TIMEOUT = 180  # `mlflow server --workers 1` is ready in ~20 s on 2 idle cores


# --- data and models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Synthetic Criteo -> two hashed datasets (vocabulary / buckets: different feature maps) -> a dense and a
    pruned model on the first, a dense model on the second, each evaluated on its test split."""
    root = tmp_path_factory.mktemp("registry")
    raw = root / "raw.txt"
    synthesize("criteo", rows=4000, seed=0, out=str(raw))
    ingest("criteo", [str(raw)], str(root / "ingested"))
    hash_dataset(str(root / "ingested"), str(root / "a"), min_count=2)
    hash_dataset(str(root / "ingested"), str(root / "b"), buckets=500)
    train(root / "a", root / "dense", CFG)
    prune(root / "dense" / "best.pt", root / "a", root / "pruned", CFG)
    train(root / "b", root / "other", CFG.replace(**{"train.epochs": 1}))
    out = {"root": root, "raw": raw, "a": root / "a", "b": root / "b", "dense": root / "dense",
           "pruned": root / "pruned", "other": root / "other"}
    for key, data in (("dense", "a"), ("pruned", "a"), ("other", "b")):
        out[f"{key}_metrics"] = evaluate_model(str(out[key]), str(out[data]), **FAST)
    return out


@pytest.fixture(scope="module")
def raw_records(trained: dict) -> list[dict]:
    """Raw Criteo rows exactly as in the file: strings, empty = missing, label included."""
    lines = trained["raw"].read_text().splitlines()[:40]
    return [dict(zip(COLUMNS, line.split("\t"))) for line in lines]


def expected(model_dir: Path, data_dir: Path, records: list[dict]) -> np.ndarray:
    """Click probabilities of the compact model of a checkpoint, on raw rows mapped by its feature map."""
    out = model_dir / "compact-expected"
    if not (out / "compact.npz").exists():
        compact_checkpoint(model_dir / "best.pt", out, exports=False)
    ids = FeatureMap.load(data_dir / "feature_map.json").transform(parse_records(CRITEO, records, ("label",)))
    return CompactModel.load(out / "compact.npz").predict_proba(ids).astype(np.float64)


def with_metrics(m: dict, **changes: float) -> dict:
    """A copy of an evaluation with chosen test AUC / batch-1 latency (so the gate's inputs are known)."""
    m = copy.deepcopy(m)
    if "auc" in changes:
        m["auc"] = changes["auc"]
    if "latency" in changes:
        m["latency_us"]["1"] = changes["latency"]
    return m


def state(c: MlflowClient, name: str) -> dict:
    """Everything promote may change: aliases and every version's tags."""
    versions = c.search_model_versions(f"name='{name}'")
    return {"aliases": dict(c.get_registered_model(name).aliases),
            "tags": {str(v.version): dict(v.tags) for v in versions}}


def load(uri: str) -> mlflow.pyfunc.PyFuncModel:
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.pyfunc.load_model(uri)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory):
    """The embedded sqlite store in a temp dir for this module's non-server tests."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DEEPLIGHT_MLRUNS", str(root / "mlruns"))
        yield MlflowClient(tracking_uri())


@pytest.fixture(scope="module")
def registered(trained: dict, local_store: MlflowClient) -> dict:
    tracker = MlflowTracker()
    parent = tracker.client.create_run(tracker.experiment_id, run_name="pipeline").info.run_id
    reg = register_model(str(trained["pruned"]), str(trained["a"]), "ctr", metrics=trained["pruned_metrics"],
                         parent_run_id=parent, tags={"team": "ads"})
    return {**reg, "parent": parent, "model": load("models:/ctr@challenger")}


# --- registering and scoring raw rows -------------------------------------------------------------------

def test_register_sets_alias_and_tags_and_logs_the_exports(trained: dict, registered: dict,
                                                           local_store: MlflowClient):
    c, m = local_store, trained["pruned_metrics"]
    assert registered["version"] == "1" and registered["alias"] == "challenger"
    v = c.get_model_version_by_alias("ctr", "challenger")
    assert str(v.version) == "1" and v.run_id == registered["run_id"]
    tags = v.tags
    assert float(tags["test_auc"]) == m["auc"] and float(tags["test_logloss"]) == m["logloss"]
    assert float(tags["latency_us_b1"]) == m["latency_us"]["1"] and float(tags["model_bytes"]) == m["model_bytes"]
    assert {k: float(tags[f"sparsity_target_{k}"]) for k in ("dnn", "field", "embedding")} == \
        {"dnn": 0.8, "field": 0.6, "embedding": 0.3}
    assert float(tags["sparsity_field"]) == m["sparsity"]["field"]
    manifest = json.loads((trained["a"] / "manifest.json").read_text())
    assert tags["feature_map_fingerprint"] == manifest["feature_map_fingerprint"]
    assert tags["test_data_fingerprint"] == manifest["fingerprints"]["test"]
    assert tags["data_fingerprint"] == f"{manifest['fingerprints']['train']}:{manifest['fingerprints']['valid']}"
    assert tags["dataset"] == "criteo" and tags["code_version"] and tags["team"] == "ads"
    assert tags["parent_run_id"] == registered["parent"]
    run = c.get_run(registered["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == registered["parent"]
    assert run.data.metrics["test_auc"] == pytest.approx(m["auc"])

    local = Path(mlflow.artifacts.download_artifacts("models:/ctr/1", tracking_uri=tracking_uri()))
    assert {p.name for p in (local / "artifacts").iterdir()} == {
        "compact.npz", "feature_map.json", "model.onnx", "model.torchscript.pt"}
    assert (local / "code" / "deeplight" / "ops" / "pyfunc.py").is_file()  # serving needs no installed deeplight
    info = mlflow.models.get_model_info("models:/ctr/1")
    # Outputs only: MLflow checks no input schema (costly, and it would drop misspelt columns); our code does.
    assert info.signature.inputs is None and info.signature.outputs.input_names() == ["probability"]
    assert (local / "input_example.json").is_file()
    mv = c.get_model_version("ctr", "1")
    assert float(mv.tags["served_latency_us_1row"]) > 0 and float(mv.tags["served_rows_per_s_1000"]) > 0
    assert mv.tags["host.cores"] and mv.tags["host.load_avg_1m"]


def test_the_logged_model_is_named_for_what_it_is_with_its_settings_as_params(trained: dict, registered: dict,
                                                                             local_store: MlflowClient):
    model_id = registered["logged_model_uri"].removeprefix("models:/")
    lm = local_store.get_logged_model(model_id)
    assert lm.name == "criteo-deepfwfm-dnn80-field60-emb30"  # not `model`
    assert lm.params["model.dnn"] == "(16,)" and lm.params["prune.field"] == "0.6"
    assert lm.params["registered_model"] == "ctr"
    assert not [k for k, v in lm.params.items() if v.startswith("/")], lm.params  # no local paths as params
    run = local_store.get_run(registered["run_id"])
    assert run.info.run_name.startswith("register-ctr-criteo-deepfwfm-dnn80-field60-emb30-")
    assert run.data.tags["deeplight.checkpoint"].endswith("best.pt")
    manifest = json.loads((trained["a"] / "manifest.json").read_text())
    assert {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs} == {
        f"criteo-{k}": manifest["fingerprints"][k][:32] for k in ("train", "valid", "test")}
    assert run.data.tags["host.cores"]  # the served latency was measured here


def test_evaluate_scores_a_raw_file_through_the_models_own_feature_map(trained: dict, registered: dict,
                                                                     local_store: MlflowClient, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture):
    """`evaluate --input RAW`: one command for ingest --split 0,0,1 + apply-features + evaluate, for a checkpoint
    (its feature map from --data) and for a registered model (its own feature map); bad rows counted."""
    from deeplight.data.hashing import apply_feature_map

    lines = trained["raw"].read_text().splitlines()[:1500]
    raw = tmp_path / "day2.txt"
    raw.write_text("\n".join(lines[:700] + ["not a criteo row", "1\tx\ty"] + lines[700:]) + "\n")
    # the three steps by hand
    ingest("criteo", [str(raw)], str(tmp_path / "ingested"), split=(0.0, 0.0, 1.0))
    apply_feature_map(FeatureMap.load(trained["a"] / "feature_map.json"), str(tmp_path / "ingested"),
                      str(tmp_path / "hashed"))
    want = evaluate_model(str(trained["pruned"]), str(tmp_path / "hashed"), "test", **FAST)

    out = tmp_path / "ckpt.json"
    rc = main(["evaluate", "--model", str(trained["pruned"]), "--data", str(trained["a"]), "--input", str(raw),
               "--out", str(out), "--latency-rounds", "1"])
    assert rc == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-9) and got["rows"] == want["rows"] == 1500
    assert got["input"] | {"quarantine": None} == {"files": [str(raw)], "read": 1502, "written": 1500,
                                                   "quarantined": 2, "reasons": {"wrong_column_count": 2},
                                                   "quarantine": None}
    assert len(Path(got["input"]["quarantine"]).read_text().splitlines()) == 2
    assert "2 of 1502 rows are bad" in capsys.readouterr().err

    out = tmp_path / "registered.json"
    rc = main(["evaluate", "--model", "models:/ctr@challenger", "--input", str(raw), "--out", str(out),
               "--latency-rounds", "1"])
    assert rc == 0, capsys.readouterr().err
    reg = json.loads(out.read_text())
    assert reg["auc"] == pytest.approx(want["auc"], abs=1e-6) and reg["input"]["quarantined"] == 2
    assert reg["model"] == "models:/ctr@challenger" and reg["feature_map_fingerprint"] == want["feature_map_fingerprint"]
    run = [r for r in local_store.search_runs([local_store.get_experiment_by_name("deeplight").experiment_id])
           if r.info.run_name.startswith("evaluate-ctr-v1-input-")][0]
    assert run.data.metrics["test_auc"] == pytest.approx(reg["auc"])
    [d] = run.inputs.dataset_inputs
    assert str(raw) in d.dataset.source and d.dataset.digest == reg["eval_data_fingerprint"][:32]

    # a registered model on a hashed split: only data hashed with its own feature map
    rc = main(["evaluate", "--model", "models:/ctr@challenger", "--data", str(trained["a"]), "--out", str(out),
               "--latency-rounds", "1", "--no-mlflow"])
    assert rc == 0 and json.loads(out.read_text())["auc"] == pytest.approx(trained["pruned_metrics"]["auc"], abs=1e-6)
    rc = main(["evaluate", "--model", "models:/ctr@challenger", "--data", str(trained["b"]), "--out", str(out),
               "--no-mlflow"])
    assert rc == 2 and "hashed with its feature map" in capsys.readouterr().err
    # a checkpoint without a feature map: one clear error before reading anything
    rc = main(["evaluate", "--model", str(trained["pruned"]), "--input", str(raw), "--out", str(out), "--no-mlflow"])
    assert rc == 2 and "does not hold its feature map" in capsys.readouterr().err
    rc = main(["evaluate", "--model", str(trained["pruned"]), "--data", str(trained["b"]), "--input", str(raw),
               "--out", str(out), "--no-mlflow"])
    assert rc == 2 and "another feature map" in capsys.readouterr().err


def test_pyfunc_scores_raw_rows_like_the_compact_model(trained: dict, registered: dict, raw_records: list[dict]):
    model, want = registered["model"], expected(trained["pruned"], trained["a"], raw_records)
    assert len(np.unique(want)) > 10  # the rows really differ
    got = model.predict(pd.DataFrame(raw_records))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    # Without the label, and with numbers instead of text (None = missing): the same scores.
    numeric = [{k: (None if v == "" else int(v) if k.startswith("I") else v) for k, v in r.items() if k != "label"}
               for r in raw_records]
    np.testing.assert_allclose(model.predict(pd.DataFrame(numeric)), want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(model.unwrap_python_model().predict(None, numeric), want, rtol=0, atol=1e-7)
    assert model.predict(pd.DataFrame(raw_records[:1])).shape == (1,)


_NO_DEEPLIGHT = """
import json, sys
src = sys.argv[1]
sys.path = [p for p in sys.path if p and (not p.startswith(src) or "site-packages" in p)]  # hide the checkout
try:
    import deeplight
    raise SystemExit("deeplight importable before loading: " + deeplight.__file__)
except ImportError:
    pass
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[3])
import deeplight
print(json.dumps({"file": deeplight.__file__, "p": model.predict(pd.DataFrame(json.loads(sys.argv[2]))).tolist()}))
"""


def test_model_loads_without_an_installed_deeplight(trained: dict, registered: dict, raw_records: list[dict],
                                                    tmp_path: Path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true"}
    src = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _NO_DEEPLIGHT, src, json.dumps(raw_records[:5]), "models:/ctr/1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "/code/deeplight/" in got["file"] and not got["file"].startswith(src)  # the copy in the model
    np.testing.assert_allclose(got["p"], expected(trained["pruned"], trained["a"], raw_records[:5]), rtol=0,
                               atol=1e-7)


def test_bad_rows_get_a_clear_error_naming_row_and_field(registered: dict, raw_records: list[dict]):
    model = registered["model"]
    good = pd.DataFrame(raw_records[:3])
    with pytest.raises(BadRowsError, match=r"row 0, field 'C26': missing"):
        model.predict(good.drop(columns=["C26"]))
    # A record of a batch without a field, or with a misspelt one: refused, naming row and field.
    lacking = [dict(r) for r in raw_records[:3]]
    del lacking[1]["C7"]
    with pytest.raises(BadRowsError, match=r"row 1, field 'C7': missing"):
        model.predict(lacking)
    with pytest.raises(BadRowsError, match=r"row 1, field 'C7': missing"):
        model.predict(pd.DataFrame(lacking))  # the frame MLflow builds from dataframe_records
    misspelt = [dict(r) for r in raw_records[:3]]
    misspelt[2]["C14x"] = misspelt[2].pop("C14")
    with pytest.raises(BadRowsError, match=r"row 2, field 'C14x': unknown"):
        model.predict(misspelt)
    with pytest.raises(BadRowsError, match=r"row 2, field 'C14x': unknown"):
        model.predict(pd.DataFrame(misspelt))
    cases = [("I2", "abc", r"row 1, field 'I2': non-integer"), ("I3", 3.5, r"row 1, field 'I3': non-integer"),
             ("C1", True, r"row 1, field 'C1': expected a string or a number"),
             ("label", "2", r"row 1, field 'label': label 'label' must be 0 or 1"),
             ("I1", "99999999999999999999", "out of int64 range")]
    for column, value, message in cases:
        bad = good.astype(object)
        bad.loc[1, column] = value
        with pytest.raises(BadRowsError, match=message) as e:
            model.predict(bad)
        assert isinstance(e.value, DeeplightError) and e.value.error_code == "INVALID_PARAMETER_VALUE"


def test_log_evaluation_records_metrics_tags_and_plots(trained: dict, local_store: MlflowClient, tmp_path: Path):
    m = evaluate_model(str(trained["dense"]), str(trained["a"]), plots_dir=str(tmp_path / "plots"), **FAST)
    tracker = MlflowTracker(experiment="evaluations")
    log_evaluation(m, str(tmp_path / "plots"), tracker)
    log_evaluation(m, None, None)  # tracking off: nothing to do
    run = local_store.search_runs([tracker.experiment_id])[0]
    assert run.info.run_name == "evaluate-test" and run.info.status == "FINISHED"
    assert run.data.metrics["test_auc"] == pytest.approx(m["auc"])
    assert run.data.metrics["params_nonzero"] == m["params_nonzero"]
    assert run.data.tags["eval_data_fingerprint"] == m["eval_data_fingerprint"]
    plots = {a.path for a in local_store.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/roc_curve.png", "plots/calibration_curve.png", "plots/field_pairs.png"}
    got = json.loads(Path(local_store.download_artifacts(run.info.run_id, "evaluation.json", str(tmp_path)))
                     .read_text())
    assert got["auc"] == m["auc"] and len(got["kept_pairs"]) == len(m["kept_pairs"])


# --- the gate -------------------------------------------------------------------------------------------

def test_gate_promotes_better_refuses_worse_and_is_idempotent(trained: dict, local_store: MlflowClient):
    c, base, ckpt, data = local_store, trained["pruned_metrics"], str(trained["pruned"]), str(trained["a"])
    register_model(ckpt, data, "gate", metrics=with_metrics(base, auc=0.75, latency=10.0))
    first = promote("gate")
    assert first["promoted"] and first["champion"] == "1" and "no champion yet" in first["reasons"][0]
    before = state(c, "gate")
    again = promote("gate")
    assert again["decision"] == "unchanged" and not again["changed"] and state(c, "gate") == before

    # Worse by more than the tolerance: not promoted; a repeated run changes nothing.
    register_model(ckpt, data, "gate", metrics=with_metrics(base, auc=0.7485, latency=10.0))
    worse = promote("gate", tolerance=0.001)
    assert worse["decision"] == "rejected" and worse["champion"] == "1"
    assert str(c.get_model_version_by_alias("gate", "champion").version) == "1"
    tags = c.get_model_version("gate", "2").tags
    assert tags["promotion.decision"] == "rejected" and "below champion version 1" in tags["promotion.reasons"]
    before = state(c, "gate")
    again = promote("gate", tolerance=0.001)
    assert again["decision"] == "rejected" and not again["changed"] and state(c, "gate") == before

    # Within the tolerance but slower than the SLO: rejected; with a looser SLO: promoted; then a no-op. The SLO
    # applies to what is served: one raw row through the registered pyfunc, measured at registration.
    register_model(ckpt, data, "gate", metrics=with_metrics(base, auc=0.7491, latency=80.0))
    served = float(c.get_model_version("gate", "3").tags["served_latency_us_1row"])
    assert served > 0
    slow = promote("gate", latency_slo_us=served / 2)
    assert slow["decision"] == "rejected" and any(f"exceeds the {served / 2}" in r for r in slow["reasons"])
    ok = promote("gate", latency_slo_us=served * 2)
    assert ok["promoted"] and ok["champion_before"] == "1" and ok["champion"] == "3"
    assert str(c.get_model_version_by_alias("gate", "champion").version) == "3"
    assert c.get_model_version("gate", "3").tags["promotion.decision"] == "promoted"
    before = state(c, "gate")
    assert not promote("gate", latency_slo_us=served * 2)["changed"] and state(c, "gate") == before

    with pytest.raises(DeeplightError, match="tolerance"):
        promote("gate", tolerance=-1)
    with pytest.raises(DeeplightError, match="no registered model"):
        promote("no-such-model")


def test_other_feature_map_is_refused_and_cli(trained: dict, local_store: MlflowClient, tmp_path: Path,
                                              capsys: pytest.CaptureFixture):
    c = local_store
    with pytest.raises(DeeplightError, match="another feature map"):
        register_model(str(trained["dense"]), str(trained["b"]), "mixed", metrics=trained["dense_metrics"])
    metrics_json = tmp_path / "dense.json"
    metrics_json.write_text(json.dumps(trained["dense_metrics"]))
    assert main(["register", "--model", str(trained["dense"]), "--data", str(trained["a"]), "--name", "mixed",
                 "--metrics", str(metrics_json), "--tag", "owner=me"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == "1" and printed["tags"]["owner"] == "me"
    assert main(["promote", "--name", "mixed"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "promoted"

    # A model of the same dataset hashed with another feature map: refused, and the refusal is tagged.
    register_model(str(trained["other"]), str(trained["b"]), "mixed", metrics=trained["other_metrics"])
    with pytest.raises(DeeplightError, match="another feature map"):
        promote("mixed")
    assert str(c.get_model_version_by_alias("mixed", "champion").version) == "1"
    assert c.get_model_version("mixed", "2").tags["promotion.decision"] == "refused"
    before = state(c, "mixed")
    assert main(["promote", "--name", "mixed"]) == 2
    assert "refused" in capsys.readouterr().err and state(c, "mixed") == before

    # Rejected by the gate: its own exit status (3), so a CI step or pipeline can tell it from promoted (0).
    worse = {**trained["dense_metrics"], "auc": trained["dense_metrics"]["auc"] - 0.01}
    register_model(str(trained["dense"]), str(trained["a"]), "mixed", metrics=worse)
    assert main(["promote", "--name", "mixed"]) == 3
    assert json.loads(capsys.readouterr().out)["decision"] == "rejected"
    assert main(["promote", "--name", "mixed"]) == 3  # the same decision again: still rejected


def _runs(c: MlflowClient) -> list:
    exp = c.get_experiment_by_name("deeplight")
    return c.search_runs([exp.experiment_id]) if exp is not None else []


def test_register_metrics_must_be_of_the_checkpoint_registered(trained: dict, local_store: MlflowClient,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture):
    """`register --metrics` (issue 18, item 4): the evaluation must be of the very checkpoint registered, by
    its sha256; another model's JSON, or one that cannot tell, is one clear error and no MLflow run; the same
    file under another spelling of its path registers normally."""
    c = local_store
    dense_json, old_json = tmp_path / "dense.json", tmp_path / "old.json"
    dense_json.write_text(json.dumps(trained["dense_metrics"]))
    old_json.write_text(json.dumps({k: v for k, v in trained["pruned_metrics"].items() if k != "checkpoint_sha256"}))
    runs_before = len(_runs(c))
    pruned = trained["pruned"] / "best.pt"
    assert main(["register", "--model", str(pruned), "--data", str(trained["a"]), "--name", "paths",
                 "--metrics", str(dense_json)]) == 2
    err = capsys.readouterr().err
    assert f"{dense_json} is the evaluation of another checkpoint ({trained['dense'] / 'best.pt'}" in err
    assert f"than {pruned} (sha256" in err and "Traceback" not in err
    assert main(["register", "--model", str(pruned), "--data", str(trained["a"]), "--name", "paths",
                 "--metrics", str(old_json)]) == 2
    assert f"{old_json}: no checkpoint_sha256 field" in capsys.readouterr().err
    assert len(_runs(c)) == runs_before and not c.search_registered_models("name='paths'")

    # The evaluated file under other spellings of its path: relative through `..`, and a symlink.
    pruned_json = tmp_path / "pruned.json"
    pruned_json.write_text(json.dumps(trained["pruned_metrics"]))
    (tmp_path / "alias.pt").symlink_to(pruned)
    monkeypatch.chdir(trained["root"])
    for spelling in ("./pruned/../pruned/best.pt", str(tmp_path / "alias.pt")):
        assert main(["register", "--model", spelling, "--data", str(trained["a"]), "--name", "paths",
                     "--metrics", str(pruned_json)]) == 0, capsys.readouterr().err
        run = c.get_run(json.loads(capsys.readouterr().out)["run_id"])
        # a tag, not a param: the run's params are copied onto the LoggedModel, which should not hold local paths
        assert run.info.status == "FINISHED" and run.data.tags["deeplight.checkpoint"] == str(Path(spelling))
    assert len(c.search_model_versions("name='paths'")) == 2
    assert not [r for r in _runs(c) if r.info.status == "FAILED"]


# --- real servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A server process in its own session (so that stop() reaches its workers too)."""
    env = {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = SERVER_TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this test started (its session), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server (a thread) and two `mlflow server` processes started together: sqlite backends, one
    serving artifacts from a local directory, one with artifacts in the S3 bucket (clients write them)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    root = tmp_path_factory.mktemp("servers")
    s3 = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    s3_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
              "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}"}
    boto3.client("s3", endpoint_url=s3_env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing-secret").create_bucket(Bucket="mlflow")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    base["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner + huey workers: 2 processes, not 12
    common = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--workers", "1"]
    ports = {"local": free_port(), "s3": free_port()}
    procs = {
        "local": start([*common, "--port", str(ports["local"]), "--backend-store-uri",
                        f"sqlite:///{root / 'local.db'}", "--serve-artifacts", "--artifacts-destination",
                        str(root / "artifacts")], root / "local.log", base),
        "s3": start([*common, "--port", str(ports["s3"]), "--backend-store-uri", f"sqlite:///{root / 's3.db'}",
                     "--no-serve-artifacts", "--default-artifact-root", "s3://mlflow/runs"], root / "s3.log", base),
    }
    try:
        for name, proc in procs.items():
            wait_ready(f"http://127.0.0.1:{ports[name]}/health", proc, root / f"{name}.log")
        yield {"root": root, "s3_env": s3_env, "s3_client": boto3.client(
                   "s3", endpoint_url=s3_env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing-secret"),
               "local": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['local']}"},
               "s3": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['s3']}", **s3_env}}
    finally:
        for proc in procs.values():
            stop(proc)
        s3.stop()


def _register_two_and_promote(trained: dict, env: dict[str, str]) -> dict:
    """dense (v1) then pruned (v2), each promoted when registered: the gate decides which is champion."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        register_model(str(trained["dense"]), str(trained["a"]), "ctr", metrics=trained["dense_metrics"])
        first = promote("ctr")
        register_model(str(trained["pruned"]), str(trained["a"]), "ctr", metrics=trained["pruned_metrics"])
        second = promote("ctr")
    return {"first": first, "second": second, "env": env}


@pytest.fixture(scope="module")
def local_server_registry(trained: dict, servers: dict):
    """Two versions on the local-artifact server, and `mlflow models serve` of its champion already starting
    (it takes ~15 s, overlapped with the other server tests; test_mlflow_models_serve_* waits for it)."""
    reg = _register_two_and_promote(trained, servers["local"])
    port, log = free_port(), servers["root"] / "serve.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}, **reg["env"]}
    proc = start([str(BIN / "mlflow"), "models", "serve", "-m", "models:/ctr@champion", "--env-manager", "local",
                  "-h", "127.0.0.1", "-p", str(port)], log, env)
    try:
        yield {**reg, "serve": (proc, port, log)}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def s3_server_registry(trained: dict, servers: dict) -> dict:
    return _register_two_and_promote(trained, servers["s3"])


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_champion_from_a_real_server_scores_raw_rows(backend: str, request: pytest.FixtureRequest, trained: dict,
                                                     servers: dict, raw_records: list[dict],
                                                     monkeypatch: pytest.MonkeyPatch):
    reg = request.getfixturevalue(f"{backend}_server_registry")
    for k, v in reg["env"].items():
        monkeypatch.setenv(k, v)
    assert reg["first"]["decision"] == "promoted" and reg["first"]["champion"] == "1"
    dense_auc, pruned_auc = trained["dense_metrics"]["auc"], trained["pruned_metrics"]["auc"]
    assert reg["second"]["promoted"] == (pruned_auc >= dense_auc - 0.001)
    champion = reg["second"]["champion"]
    c = MlflowClient(tracking_uri())
    assert str(c.get_model_version_by_alias("ctr", "champion").version) == champion
    assert str(c.get_model_version_by_alias("ctr", "challenger").version) == "2"
    want = expected(trained["dense" if champion == "1" else "pruned"], trained["a"], raw_records)
    got = load("models:/ctr@champion").predict(pd.DataFrame(raw_records))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    if backend == "s3":  # the artifacts really are in the bucket
        keys = [o["Key"] for o in servers["s3_client"].list_objects_v2(Bucket="mlflow")["Contents"]]
        assert sum(k.endswith("artifacts/compact.npz") for k in keys) == 2
    else:
        assert len(list((servers["root"] / "artifacts").rglob("compact.npz"))) == 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_no_credential_in_the_tracking_uri_is_ever_printed(trained: dict, servers: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture):
    """MLFLOW_TRACKING_URI=http://user:password@host (issue 18, item 2): train, evaluate, register, promote, an
    error, and `pipeline run-local` (a failing one: its error line, its steps' output, the summary's store line)
    work against a real `mlflow server` and print no password, MLflow's own "View run ... at: URL" lines
    included (at the file descriptors: the steps are other processes)."""
    pytest.importorskip("kfp")
    password = "pw-n0t-to-be-pr1nted"
    server = servers["local"]["MLFLOW_TRACKING_URI"]
    with_credentials = server.replace("http://", f"http://alice:{password}@")

    def point_at_server() -> None:  # deeplight moves the credentials into these: restored after the test
        monkeypatch.setenv("MLFLOW_TRACKING_URI", with_credentials)
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
            monkeypatch.setenv(var, "x")
            monkeypatch.delenv(var)

    point_at_server()
    model, data, metrics = tmp_path / "model", str(trained["a"]), tmp_path / "test.json"
    assert main(["train", "--data", data, "--out", str(model), "--epochs", "1", "--set", "model.dnn=[16]",
                 "--threads", "1"]) == 0
    assert main(["evaluate", "--model", str(model), "--data", data, "--out", str(metrics),
                 "--latency-rounds", "1"]) == 0
    assert main(["register", "--model", str(model), "--data", data, "--metrics", str(metrics),
                 "--name", "creds"]) == 0
    assert main(["promote", "--name", "creds"]) == 0
    assert main(["promote", "--name", "no-such-model"]) == 2
    point_at_server()  # as a fresh shell has it: the step processes start from the URI with credentials
    bad = tmp_path / "bad.txt"
    bad.write_text("this is not criteo\n" * 50)
    assert main(["pipeline", "run-local", "--input", str(bad), "--run-name", "creds-broken", "--epochs", "1",
                 "--pipeline-root", str(tmp_path / "kfp")]) == 2
    from deeplight.cli import pipeline as pipeline_cli

    pipeline_cli.print_summary(pipeline_cli.summarize("creds-broken"))
    captured = capfd.readouterr()
    logs = "".join(p.read_text() for p in (tmp_path / "kfp").glob("*.log"))
    printed = captured.out + captured.err + logs
    assert password not in printed and "alice" not in printed
    # MLflow's line for the training run (named train-<dataset>-<model>-<date>), without the credentials
    assert re.search(rf"View run train-\S+ at: {re.escape(server)}/#/experiments/", printed), printed[-2000:]
    assert f"no registered model 'no-such-model' at {server}" in captured.err
    assert "deeplight: error: pipeline failed" in captured.err and f"store {server}" in captured.out


def _post(url: str, body: object, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.integration
def test_mlflow_models_serve_answers_raw_rows(trained: dict, local_server_registry: dict, raw_records: list[dict]):
    proc, port, log = local_server_registry["serve"]
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping", proc, log)
        url = f"http://127.0.0.1:{port}/invocations"
        champion = local_server_registry["second"]["champion"]
        want = expected(trained["dense" if champion == "1" else "pruned"], trained["a"], raw_records)
        status, body = _post(url, {"dataframe_records": raw_records})
        assert status == 200
        np.testing.assert_allclose(body["predictions"], want, rtol=0, atol=1e-7)
        numeric = [{k: (None if v == "" else int(v) if k.startswith("I") else v) for k, v in r.items()}
                   for r in raw_records]
        status, body = _post(url, {"dataframe_split": pd.DataFrame(numeric).to_dict(orient="split")})
        assert status == 200
        np.testing.assert_allclose(body["predictions"], want, rtol=0, atol=1e-7)

        bad_value = [dict(r) for r in raw_records[:3]]
        bad_value[1]["I2"] = "abc"
        missing = [{k: v for k, v in r.items() if k != "C26"} for r in raw_records[:3]]
        wrong_type = [dict(r) for r in raw_records[:3]]
        wrong_type[2]["C5"] = {"nested": 1}
        lacking = [dict(r) for r in raw_records[:3]]  # one record of a batch without a field, one misspelt
        lacking[1] = {"I1": "5"}
        misspelt = [dict(r) for r in raw_records[:3]]
        misspelt[2]["C14x"] = misspelt[2].pop("C14")
        for rows, message in ((bad_value, "row 1, field 'I2': non-integer in integer field 'I2': 'abc'"),
                              (missing, "row 0, field 'C26': missing"),
                              (wrong_type, "row 2, field 'C5': expected a string or a number"),
                              (lacking, "row 1, field 'I2': missing"),
                              (misspelt, "row 2, field 'C14x': unknown field")):
            status, body = _post(url, {"dataframe_records": rows})
            assert status == 400, body
            assert body["error_code"] == "INVALID_PARAMETER_VALUE" and message in body["message"]
            assert "stack_trace" not in body and "Traceback" not in body["message"]
    finally:
        stop(proc)  # now rather than at module teardown: frees a core


@pytest.mark.parametrize("timings", [False, True])
def test_deeplight_serve_binds_loopback_and_keeps_kserves_timing_middleware_only_for_access_logs(
        timings: bool, monkeypatch: pytest.MonkeyPatch):
    """The REST server `deeplight serve` builds (KServe's own, with a real DataPlane): bound to the given host, all
    of KServe's routes, and KServe's per-request timing middleware (it tries every route to name each request)
    only when --access-log asks for its log lines."""
    import fastapi
    import kserve.model_server as model_server
    import kserve.protocol.rest.multiprocess.server as multiprocess_server
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    from deeplight.ops.server import _loopback_rest_server

    monkeypatch.setattr(model_server, "RESTServer", RESTServer)  # restored after the test
    monkeypatch.setattr(multiprocess_server, "RESTServer", RESTServer)
    _loopback_rest_server("127.0.0.1", timings=timings)
    repo = ModelRepository()
    server = model_server.RESTServer("kserve.model_server:app", DataPlane(model_registry=repo),
                                     ModelRepositoryExtension(model_registry=repo), http_port=0)
    ours, theirs = fastapi.FastAPI(), fastapi.FastAPI()
    for srv, app in ((server, ours), (RESTServer("kserve.model_server:app", DataPlane(model_registry=repo),
                                                 ModelRepositoryExtension(model_registry=repo), http_port=0), theirs)):
        srv._add_middlewares(app)
        srv._register_endpoints(app)
    assert server.config.host == "127.0.0.1"
    assert len(ours.openapi()["paths"]) > 10 and ours.openapi()["paths"] == theirs.openapi()["paths"]
    middleware = [m.cls.__name__ for m in ours.user_middleware]
    assert ("TimingMiddleware" in middleware) == timings, middleware
    assert "TimingMiddleware" in [m.cls.__name__ for m in theirs.user_middleware]  # what we leave out exists


@pytest.mark.integration
def test_deeplight_serve_answers_v1_and_v2_and_refuses_bad_rows(trained: dict, local_server_registry: dict,
                                                                raw_records: list[dict], tmp_path: Path):
    """`deeplight serve` (a real KServe ModelServer process on 127.0.0.1) of the champion: the same scores as the
    compact model over v1 and v2, and HTTP 400 naming row and field for every malformed request."""
    port, log = free_port(), tmp_path / "kserve.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
           **local_server_registry["env"]}
    proc = start([str(BIN / "deeplight"), "serve", "--model", "models:/ctr@champion", "--port", str(port)], log, env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, log)
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local = [line.split()[3] for line in listening.splitlines()]  # State Recv-Q Send-Q Local Peer
        assert local and all(addr.startswith("127.0.0.1:") for addr in local), listening  # loopback only
        champion = local_server_registry["second"]["champion"]
        want = expected(trained["dense" if champion == "1" else "pruned"], trained["a"], raw_records)
        records = [{k: v for k, v in r.items() if k != "label"} for r in raw_records]
        v1 = f"http://127.0.0.1:{port}/v1/models/deeplight:predict"
        status, body = _post(v1, {"instances": records})
        assert status == 200
        np.testing.assert_allclose(body["predictions"], want, rtol=0, atol=1e-7)
        # JSON the one-pass reading declines (numbers) and JSON with a charset: the same scores
        numbers = [dict(r, I1=int(r["I1"])) if r["I1"] else dict(r) for r in records]
        for body_, content_type in ((numbers, "application/json"), (records, "application/json; charset=utf-8"),
                                    (numbers, "application/json; charset=utf-8")):
            status, body = _post(v1, {"instances": body_}, content_type)
            assert status == 200, (content_type, body)
            np.testing.assert_allclose(body["predictions"], want, rtol=0, atol=1e-7)
        v2 = f"http://127.0.0.1:{port}/v2/models/deeplight/infer"
        tensors = [{"name": c, "shape": [len(records)], "datatype": "BYTES", "data": [r[c] for r in records]}
                   for c in COLUMNS[1:]]
        status, body = _post(v2, {"inputs": tensors})
        assert status == 200 and body["outputs"][0]["name"] == "probability"
        np.testing.assert_allclose(body["outputs"][0]["data"], want, rtol=0, atol=1e-7)

        # raw lines, as in the dataset's files: with the label (train.txt), without it, under a header
        tsv = "text/tab-separated-values"
        for content_type, body_ in (
                (tsv, "\n".join("\t".join(r[c] for c in COLUMNS) for r in raw_records).encode()),
                (tsv + "; header=absent", "\n".join("\t".join(r[c] for c in COLUMNS[1:]) for r in records).encode()),
                ("text/plain", "\n".join(["\t".join(COLUMNS[:0:-1])] +
                                          ["\t".join(r[c] for c in COLUMNS[:0:-1]) for r in records]).encode())):
            status, body = _post(v1, body_, content_type)
            assert status == 200, (content_type, body)
            np.testing.assert_allclose(body["predictions"], want, rtol=0, atol=1e-7)
        lines = ["\t".join(r[c] for c in COLUMNS[1:]) for r in records[:3]]
        for content_type, body_, message in (
                (tsv, "\n".join(lines[:1] + [lines[1].rsplit("\t", 1)[0]] + lines[2:]).encode(),
                 "row 1 (line 2): 38 fields, expected 39"),
                (tsv, "\n".join(lines[:2] + ["1.5\t" + lines[2].split("\t", 1)[1]]).encode(),
                 "row 2 (line 3), field 'I1': non-integer"),
                (tsv, "\n".join(lines).encode() + b"\xff", "line 3: field 39 is not valid UTF-8"),
                ("application/xml", b"\n".join(x.encode() for x in lines), "content type"),
                (tsv + "; header=maybe", "\n".join(lines).encode(), "header='maybe'")):
            status, body = _post(v1, body_, content_type)
            assert status == 400 and message in body["error"], (content_type, status, body)

        lacking = [dict(r) for r in records[:3]]
        del lacking[1]["C9"]
        misspelt = [dict(r) for r in records[:3]]
        misspelt[2]["C14x"] = misspelt[2].pop("C14")
        bad_value = [dict(r) for r in records[:3]]
        bad_value[1]["I5"] = "abc"
        bad_tensor = [dict(x, data=list(x["data"][:3])) | {"shape": [3]} for x in tensors]
        bad_tensor[4]["data"][2] = "1.5"
        for url, body_, message in (
                (v1, {"instances": lacking}, "row 1, field 'C9': missing"),
                (v1, {"instances": misspelt}, "row 2, field 'C14x': unknown"),
                (v1, {"instances": bad_value}, "row 1, field 'I5': non-integer"),
                (v1, {"rows": records}, "instances"),
                (v2, {"inputs": bad_tensor}, "row 2, field 'I5': non-integer"),
                (v2, {"inputs": tensors[:-1]}, "field 'C26': missing")):
            status, body = _post(url, body_)
            assert status == 400 and message in body["error"], (status, body)
        status, body = _post(v2, b'{"inputs": [')  # not JSON: FastAPI's 422, as before the one-pass routes
        assert status == 422 and body["detail"][0]["type"] == "json_invalid", body
        for url in (f"http://127.0.0.1:{port}/v2/models/deeplight", f"http://127.0.0.1:{port}/v1/models/deeplight"):
            with urllib.request.urlopen(url, timeout=30) as r:  # KServe's other routes still answer
                assert r.status == 200 and json.loads(r.read())["name"] == "deeplight", url
        served_log = log.read_text(errors="replace")
        assert "POST /v" not in served_log and "kserve.trace" not in served_log, served_log[-2000:]  # no access log
    finally:
        stop(proc)

