"""Evaluation of dense and pruned checkpoints: metrics equal the model's, sparsity and kept pairs, size on disk,
latency, plots, refusal of data hashed with another feature map, the CLI (with and without MLflow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplight.model import checkpoint

from deeplight.model import metrics
from deeplight.cli import main
from deeplight.serve.export import compact_checkpoint
from deeplight.base.config import Config
from deeplight.data.loader import SplitLoader
from deeplight.base.errors import DeeplightError
from deeplight.evaluation.evaluate import evaluate_model, flat_metrics, measure_latency, pair_matrix, resolve_checkpoint
from deeplight.model.deepfwfm import DeepFwFM
from deeplight.model.prune import prune
from deeplight.model.train import train

from conftest import write_hashed_dataset

CFG = Config().replace(**{"model.dnn": (16,), "train.batch_size": 512, "train.epochs": 2, "train.threads": 1,
                          "prune.dnn": 0.8, "prune.field": 0.6, "prune.embedding": 0.3, "prune.ramp_epochs": 1.0,
                          "prune.finetune_epochs": 1})
FAST = {"latency_rounds": 2, "latency_budget_s": 0.01}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = write_hashed_dataset(root / "hashed", rows=8000)
    train(data, root / "dense", CFG)
    prune(root / "dense" / "best.pt", data, root / "pruned", CFG)
    return {"data": data, "dense": root / "dense", "pruned": root / "pruned", "root": root}


@pytest.fixture(scope="module")
def pruned_eval(models: dict[str, Path]) -> dict:
    root = models["root"]
    return evaluate_model(str(models["pruned"]), str(models["data"]), "test", out_json=str(root / "pruned.json"),
                          plots_dir=str(root / "plots"), dense=str(models["dense"]), **FAST)


def _torch_probs(ckpt: Path, data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    ck = checkpoint.load(ckpt)
    model = DeepFwFM.from_spec(ck["spec"])
    model.load_state_dict(ck["model"])
    ys, ps = [], []
    with torch.no_grad():
        for ids, y in SplitLoader(data, split, batch_size=4096):
            ys.append(y.numpy())
            ps.append(torch.sigmoid(model.eval()(ids)).numpy())
    return np.concatenate(ys), np.concatenate(ps)


def test_quality_metrics_are_those_of_the_model_on_the_split(models: dict[str, Path], pruned_eval: dict):
    labels, probs = _torch_probs(models["pruned"] / "best.pt", models["data"], "test")
    want = metrics.evaluate_arrays(labels, probs)
    assert pruned_eval["rows"] == want["rows"] == len(labels)
    # evaluate scores the model as it ships, through the compact engine, whose logits match PyTorch's to 1e-5
    # but not bit for bit: a near-tie between a positive and a negative row can flip, so AUC and logloss agree
    # to ~1e-5, not 1e-6.
    assert pruned_eval["auc"] == pytest.approx(want["auc"], abs=2e-5)
    assert pruned_eval["logloss"] == pytest.approx(want["logloss"], abs=2e-5)
    assert pruned_eval["calibration"] == pytest.approx(want["calibration"], rel=1e-5)
    curve = pruned_eval["calibration_curve"]
    assert sum(curve["rows"]) == len(labels) and len(curve["mean_pred"]) == 10
    assert curve["mean_pred"] == sorted(curve["mean_pred"])
    # The valid split is another split: another AUC.
    valid = evaluate_model(str(models["pruned"]), str(models["data"]), "valid", **FAST)
    assert valid["split"] == "valid" and valid["eval_data_fingerprint"] == "fp-valid-0-8000"
    assert valid["auc"] != pruned_eval["auc"]
    assert valid["auc"] == pytest.approx(metrics.auc(*_torch_probs(models["pruned"] / "best.pt", models["data"],
                                                                   "valid")), abs=2e-5)


def test_sparsity_pairs_size_and_identity_of_a_pruned_model(models: dict[str, Path], pruned_eval: dict):
    m = pruned_eval
    assert m["pruned"] is True and m["prune_targets"] == {"dnn": 0.8, "field": 0.6, "embedding": 0.3}
    assert m["sparsity"]["dnn"] == pytest.approx(0.8, abs=0.01)
    assert m["sparsity"]["field"] == pytest.approx(0.6, abs=0.05)
    assert m["sparsity"]["embedding"] == pytest.approx(0.3, abs=0.01)
    assert m["total_pairs"] == 15
    assert len(m["kept_pairs"]) == round(15 * (1 - m["sparsity"]["field"]))
    assert {"pair", "i", "j", "r"} <= set(m["kept_pairs"][0])
    assert m["params_nonzero"] < m["params_total"]
    stats = compact_checkpoint(models["pruned"] / "best.pt", models["root"] / "compact", exports=False)
    assert m["model_bytes"] == (models["root"] / "compact" / "compact.npz").stat().st_size
    assert m["compact"]["params_nonzero"] == stats["params_nonzero"]
    assert m["dataset"] == "toy" and m["feature_map_fingerprint"] == "fm-0"
    assert m["eval_data_fingerprint"] == "fp-test-0-8000"
    assert m["data_fingerprint"] == "fp-train-0-8000:fp-valid-0-8000"
    assert m["code_version"]
    assert json.loads((models["root"] / "pruned.json").read_text()) == json.loads(json.dumps(m))


def test_dense_model_keeps_every_pair_and_is_larger(models: dict[str, Path], pruned_eval: dict):
    dense = evaluate_model(str(models["dense"] / "best.pt"), str(models["data"]), **FAST)
    assert dense["pruned"] is False and dense["prune_targets"] is None
    assert len(dense["kept_pairs"]) == 15 and dense["sparsity"]["field"] == 0
    assert dense["params_nonzero"] > pruned_eval["params_nonzero"]
    assert dense["model_bytes"] > pruned_eval["model_bytes"]


def test_latency_and_throughput(pruned_eval: dict):
    lat = pruned_eval["latency_us"]
    assert set(lat) == {"1", "4096"} and 0 < lat["1"] < lat["4096"]
    assert pruned_eval["samples_per_s"] == pytest.approx(4096 / (lat["4096"] * 1e-6))
    flat = flat_metrics(pruned_eval)
    assert flat["latency_us_b1"] == lat["1"] and flat["test_auc"] == pruned_eval["auc"]
    assert flat["kept_pairs"] == len(pruned_eval["kept_pairs"])
    with pytest.raises(DeeplightError, match="rounds"):
        measure_latency(None, np.zeros((4, 6), np.int64), rounds=0)


def test_plots_and_the_pair_matrix_behind_the_heatmap(models: dict[str, Path], pruned_eval: dict):
    names = {Path(p).name for p in pruned_eval["plots"]}
    assert names == {"roc_curve.png", "calibration_curve.png", "field_pairs.png"}
    for p in pruned_eval["plots"]:
        data = Path(p).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    ck = checkpoint.load(models["pruned"] / "best.pt")
    model = DeepFwFM.from_spec(ck["spec"])
    model.load_state_dict(ck["model"])
    R = pair_matrix(model)
    kept = {(p["i"], p["j"]) for p in pruned_eval["kept_pairs"]}
    shown = {(i, j) for i, j in zip(*np.nonzero(np.isfinite(R))) if i < j}
    assert shown == kept  # the heatmap shows exactly the surviving interactions
    assert np.allclose(R, R.T, equal_nan=True)


def test_checkpoint_resolution_and_refusals(models: dict[str, Path], tmp_path: Path):
    assert resolve_checkpoint(models["dense"]) == models["dense"] / "best.pt"
    assert resolve_checkpoint(models["dense"] / "best.pt") == models["dense"] / "best.pt"
    with pytest.raises(DeeplightError, match="no best.pt"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(DeeplightError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nope.pt")
    other = write_hashed_dataset(tmp_path / "other", rows=2000, seed=1)
    with pytest.raises(DeeplightError, match="feature map"):
        evaluate_model(str(models["dense"]), str(other), **FAST)
    with pytest.raises(DeeplightError, match="missing split"):
        evaluate_model(str(models["dense"]), str(models["data"]), "holdout", **FAST)


def test_cli_writes_json_and_plots_and_logs_to_mlflow(models: dict[str, Path], tmp_path: Path,
                                                      mlflow_store: Path, capsys: pytest.CaptureFixture):
    from mlflow.tracking import MlflowClient

    from deeplight.ops.tracking import tracking_uri

    out = tmp_path / "eval" / "metrics.json"
    rc = main(["evaluate", "--model", str(models["pruned"]), "--data", str(models["data"]), "--out", str(out),
               "--latency-rounds", "1"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed["auc"] == saved["auc"] and printed["kept_pairs"] == len(saved["kept_pairs"])
    assert {p.name for p in (tmp_path / "eval" / "metrics_plots").iterdir()} == {
        "roc_curve.png", "calibration_curve.png", "field_pairs.png"}
    c = MlflowClient(tracking_uri())
    runs = c.search_runs([c.get_experiment_by_name("deeplight").experiment_id])
    # named for what was evaluated: step, dataset, model, its sparsity targets, split, date
    assert len(runs) == 1 and re.fullmatch(r"evaluate-toy-deepfwfm-dnn\d+-field\d+-emb\d+-test-\d{8}-\d{4}",
                                           runs[0].info.run_name), runs[0].info.run_name
    assert runs[0].data.metrics["test_auc"] == pytest.approx(saved["auc"])
    assert runs[0].data.metrics["latency_us_b1"] == pytest.approx(saved["latency_us"]["1"])
    assert runs[0].data.tags["feature_map_fingerprint"] == "fm-0"
    arts = {a.path for a in c.list_artifacts(runs[0].info.run_id)} | \
        {a.path for a in c.list_artifacts(runs[0].info.run_id, "plots")}
    assert {"evaluation.json", "plots/roc_curve.png", "plots/calibration_curve.png", "plots/field_pairs.png"} <= arts

    rc = main(["evaluate", "--model", str(tmp_path / "missing"), "--data", str(models["data"]), "--out",
               str(out), "--no-mlflow"])
    assert rc == 2 and "no such checkpoint" in capsys.readouterr().err
