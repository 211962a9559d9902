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


# --- runs that compare well (issue 19, item 2) -----------------------------------------------------------

def test_a_training_run_has_mlflow_standard_tags_dataset_inputs_and_system_metrics(
        toy_hashed: Path, tmp_path: Path, mlflow_store: Path):
    import subprocess

    from deeplight.ops.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    result = train(toy_hashed, tmp_path / "out", CFG.replace(**{"train.epochs": 1}), run_name="train-toy",
                   tracker=MlflowTracker(data_dir=toy_hashed, system_metrics=True))
    client = MlflowClient(tracking_uri=tracking_uri())
    run = client.get_run(result["run_id"])
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.user"] != "unknown" and run.info.user_id == tags["mlflow.user"]
    assert tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert tags["mlflow.source.git.commit"] == head.strip()
    # the splits as MLflow datasets: digest = the split's fingerprint, context = the split
    inputs = {[t.value for t in d.tags if t.key == "mlflow.data.context"][0]: d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "valid", "test"}
    assert {k: d.digest for k, d in inputs.items()} == {k: f"fp-{k}-0-20000" for k in inputs}
    assert inputs["train"].name == "toy-train" and str(toy_hashed.absolute()) in inputs["train"].source
    # MLflow's own system metrics, even for a run shorter than one sampling interval
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_experiment_made_before_is_typed_for_the_model_training_view(mlflow_store: Path):
    from deeplight.ops.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_id

    plain = MlflowClient(tracking_uri=tracking_uri())
    exp = plain.create_experiment("old")  # as deeplight made them before: no kind, so the UI guessed GenAI
    assert EXPERIMENT_KIND_TAG not in plain.get_experiment(exp).tags
    assert experiment_id(plain, "old") == exp
    assert plain.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_run_names_say_what_the_run_holds():
    import time

    from deeplight.ops.tracking import model_label, run_label, source_name, sparsity_label

    when = time.mktime((2026, 12, 6, 22, 53, 0, 0, 0, -1))
    assert run_label("train", "criteo", "deepfwfm", when=when) == "train-criteo-deepfwfm-20261206-2253"
    assert run_label("criteo", "deepfwfm", sparsity_label({"dnn": 0.9, "field": 0.9, "embedding": 0.4}),
                     when=when, suffix="174d") == "criteo-deepfwfm-dnn90-field90-emb40-20261206-2253-174d"
    assert sparsity_label({"dnn": 0.95, "field": 0.9865, "embedding": 0.6, "mode": "structured"}) == \
        "dnn95-field98p65-emb60-structured"  # no dot: MLflow refuses it in a LoggedModel's name
    assert model_label("avazu", "fwfm") == "avazu-fwfm-dense"
    assert source_name(["/x/.venv/bin/deeplight", "train", "--data", "d"]) == ("deeplight train", "LOCAL")
    assert source_name(["/x/bin/deeplight", "pipeline", "run-local"]) == ("deeplight pipeline run-local", "LOCAL")
    kfp = ["/usr/bin/python3", "-m", "kfp.dsl.executor_main", "--executor_input", "{}", "--function_to_execute",
           "train"]
    assert source_name(kfp) == ("deeplight component train", "JOB")


def test_an_evaluation_run_is_open_while_the_evaluation_runs(mlflow_store: Path):
    from deeplight.ops.registry import evaluate_tracked

    client = MlflowClient(tracking_uri=tracking_uri())
    tracker = MlflowTracker()
    seen = []

    def evaluate() -> dict:  # the run exists, RUNNING, before the work: its duration is the evaluation's
        seen.extend(r.info.status for r in client.search_runs([tracker.experiment_id]))
        return {"split": "test", "auc": 0.75, "latency_us": {"1": 5.0}}

    metrics = evaluate_tracked(evaluate, None, tracker, name="evaluate-x")
    assert metrics["auc"] == 0.75 and seen == ["RUNNING"]
    run = client.search_runs([tracker.experiment_id])[0]
    assert run.info.run_name == "evaluate-x" and run.info.status == "FINISHED"
    assert run.data.tags["host.cores"] and run.data.tags["host.cpu"] is not None and "host.load_avg_1m" in run.data.tags
