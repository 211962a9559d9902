"""MLflow tracking against a real sqlite store in a temp dir: run contents, resume, no credentials logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deeplight.base.config import Config
from deeplight.ops.tracking import MlflowTracker, redact, tracking_uri
from deeplight.model.train import train

CFG = Config().replace(**{"model.dnn": (16,), "train.batch_size": 512, "train.epochs": 2, "train.threads": 1})


def test_default_store_is_sqlite_under_mlruns(mlflow_store: Path):
    assert tracking_uri() == f"sqlite:///{mlflow_store / 'mlflow.db'}"


def test_training_run_holds_params_metrics_artifacts_and_tags(toy_hashed: Path, tmp_path: Path,
                                                              mlflow_store: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-logged")
    result = train(toy_hashed, tmp_path / "out", CFG, tracker=MlflowTracker())
    client = MlflowClient(tracking_uri=tracking_uri())
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["model.kind"] == "deepfwfm"
    assert run.data.tags["data_fingerprint"] == "fp-train-0-20000:fp-valid-0-20000"
    assert run.data.tags["code_version"]
    history = client.get_metric_history(run.info.run_id, "valid_auc")
    assert [m.step for m in history] == [0, 1]
    assert run.data.metrics["test_auc"] == pytest.approx(result["test"]["auc"])
    assert run.data.metrics["test_logloss"] == pytest.approx(result["test"]["logloss"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curve.png", "results.json", "best.pt"} <= artifacts
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(mlflow_store)
    logged = list(run.data.params.values()) + list(run.data.tags.values())
    assert not any("s3cr3t" in v for v in logged)

    # Running the same command again resumes the finished run instead of opening a new one.
    again = train(toy_hashed, tmp_path / "out", CFG, tracker=MlflowTracker())
    assert again["run_id"] == result["run_id"]
    assert again["test"] == result["test"]


def test_redact_removes_userinfo_and_env_secrets(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abcd1234secret")
    assert redact("http://alice:pw@mlflow.internal:5000/x") == "http://***@mlflow.internal:5000/x"
    assert redact("key=abcd1234secret") == "key=***"
    assert redact("s3://bucket/data.tsv") == "s3://bucket/data.tsv"
