"""Each KFP component run alone through the real local runner, kfp.local.SubprocessRunner(use_venv=False) (this
venv's Python runs the component's embedded source, as the image's Python does in a container), on tiny
synthetic Criteo data, with a real MLflow sqlite store in a temp dir and real Parquet.

The components are chained the way the pipeline chains them (one module-scoped run of each, shared between
the assertions): start_run -> ingest -> hash_features -> train -> prune -> evaluate -> register -> promote.
kfp.local runs a component that takes input artifacts only inside a pipeline: those run in a one-step
pipeline that imports the upstream outputs by path (`run_alone`).
The exit handler finish_run needs a pipeline (it takes the final status of a task group): tests/test_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pyarrow.parquet as pq
import pytest

pytest.importorskip("kfp")
from kfp import dsl, local  # noqa: E402
from kfp.dsl import Artifact, Dataset, Metrics, Model  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import components  # noqa: E402
from deeplight.data.synth import synthesize  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

ROWS = 3000
SETTINGS = dict(epochs=1, min_count=2, ramp_epochs=1.0, finetune_epochs=1, dnn_sparsity=0.5, field_sparsity=0.5,
                embedding_sparsity=0.2,  # as given: prune.auto off (the default searches; see test_prune.py)
                config_overrides=json.dumps({"model.dnn": [16], "train.batch_size": 512, "prune.auto": False}))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DEEPLIGHT_MLRUNS", str(root / "mlruns"))  # the steps (subprocesses) inherit it
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        raw = root / "raw.txt"
        synthesize("criteo", rows=ROWS, seed=0, out=str(raw))
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"))
        client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        yield SimpleNamespace(root=root, raw=raw, client=client)


@pytest.fixture(scope="module")
def started(env):
    task = components.start_run(run_name="components-test", kfp_run_id="test-run-1", input_uris=[str(env.raw)],
                                model_name="ctr-test", **SETTINGS)
    return SimpleNamespace(parent=task.outputs["parent_run_id"], cfg=task.outputs["config_json"])


@pytest.fixture(scope="module")
def ingested(env, started):
    return components.ingest(input_uris=[str(env.raw)], config_json=started.cfg, parent_run_id=started.parent)


def run_alone(component, artifacts: dict, **params) -> dict:
    """Run one component with input artifacts through the local runner. kfp.local runs a component with input
    artifacts only inside a pipeline, so this wraps it in a one-step pipeline that imports the given paths
    (dsl.importer) and returns the component's output artifacts."""
    kinds = {"system.Model": Model, "system.Dataset": Dataset, "system.Metrics": Metrics, "system.Artifact": Artifact}
    fields = [(n, kinds[o.type.split("@")[0]]) for n, o in component.component_spec.outputs.items()
              if o.type.startswith("system.")]
    Outputs = NamedTuple("Outputs", fields)

    def alone():
        imported = {name: dsl.importer(artifact_uri=uri, artifact_class=kinds[f"system.{cls.__name__}"]).output
                    for name, (cls, uri) in artifacts.items()}
        task = component(**imported, **params)
        return Outputs(**{n: task.outputs[n] for n, _ in fields})

    alone.__annotations__["return"] = Outputs
    return dsl.pipeline(name=f"{component.name}-alone")(alone)().outputs


@pytest.fixture(scope="module")
def hashed(started, ingested):
    return run_alone(components.hash_features, {"ingested": (Dataset, ingested.outputs["ingested"].path)},
                     config_json=started.cfg, parent_run_id=started.parent)


@pytest.fixture(scope="module")
def dense(started, hashed):
    return run_alone(components.train, {"hashed": (Dataset, hashed["hashed"].path)}, config_json=started.cfg,
                     parent_run_id=started.parent)


@pytest.fixture(scope="module")
def pruned(started, hashed, dense):
    return run_alone(components.prune, {"dense": (Model, dense["model"].path),
                                        "hashed": (Dataset, hashed["hashed"].path)},
                     config_json=started.cfg, parent_run_id=started.parent)


@pytest.fixture(scope="module")
def evaluated(started, hashed, pruned):
    return run_alone(components.evaluate, {"model": (Model, pruned["model"].path),
                                           "hashed": (Dataset, hashed["hashed"].path)},
                     variant="pruned", parent_run_id=started.parent)


@pytest.fixture(scope="module")
def registered(started, hashed, dense, pruned, evaluated):
    return run_alone(components.register, {"model": (Model, pruned["model"].path),
                                           "hashed": (Dataset, hashed["hashed"].path),
                                           "evaluation": (Artifact, evaluated["evaluation"].path),
                                           "dense": (Model, dense["model"].path)},
                     model_name="ctr-test", parent_run_id=started.parent)


def child(env, parent: str, step: str):
    """The parent's child run of `step` (`evaluate-pruned`: step and variant), found by its step tag: run names
    are descriptive (dataset, model, targets, date)."""
    name, _, variant = step.partition("-")
    query = f"tags.`mlflow.parentRunId` = '{parent}' and tags.`deeplight.step` = '{name}'"
    if variant:
        query += f" and tags.`deeplight.variant` = '{variant}'"
    runs = env.client.search_runs([env.client.get_experiment_by_name("deeplight").experiment_id], query)
    assert len(runs) == 1, f"want one child run {step!r} of {parent}, got {len(runs)}"
    return runs[0]


def test_start_run_defaults_are_the_config_defaults():
    from deeplight.base.config import Config
    from deeplight.steps.pipeline import pipeline_config

    defaults = {name: spec.default for name, spec in components.start_run.component_spec.inputs.items()
                if name not in ("run_name", "kfp_run_id", "input_uris", "model_name", "promote")}
    assert pipeline_config(**{k: v for k, v in defaults.items() if k != "config_overrides"}) == Config()


@pytest.mark.parametrize("settings, message", [
    ({"dataset": "foo"}, "unknown dataset 'foo'"),
    ({"split": "0.9,0.2,0.1"}, "split: want three non-negative fractions"),
    ({"dnn_sparsity": 1.0}, r"dnn sparsity: want a number in \[0, 1\)"),
    ({"overrides": '{"model.width": 3}'}, "unknown setting 'model.width'"),
    ({"overrides": "{oops"}, "config overrides: not valid JSON"),
])
def test_bad_pipeline_settings_are_clear_errors(settings, message):
    from deeplight.base.errors import DeeplightError
    from deeplight.steps.pipeline import pipeline_config

    with pytest.raises(DeeplightError, match=message):
        pipeline_config(**settings)


def test_buckets_select_stable_hashing():
    from deeplight.steps.pipeline import pipeline_config

    assert pipeline_config(buckets=1000, min_count=8).features.buckets == 1000
    assert pipeline_config(buckets=1000, min_count=8).features.min_count is None
    assert pipeline_config(buckets=0, min_count=3).features.min_count == 3


def test_start_run_builds_the_config_and_opens_the_parent_run(env, started):
    cfg = json.loads(started.cfg)
    assert cfg["train"]["epochs"] == 1 and cfg["model"]["dnn"] == [16] and cfg["features"]["min_count"] == 2
    assert cfg["prune"]["dnn"] == 0.5 and cfg["train"]["lr"] == 1e-3  # unset settings keep the Config default
    run = env.client.get_run(started.parent)
    assert run.info.run_name == "components-test"
    assert run.data.tags["kfp.run_id"] == "test-run-1" and run.data.tags["deeplight.kind"] == "pipeline"
    assert run.data.params["train.epochs"] == "1" and run.data.params["pipeline.model_name"] == "ctr-test"


def test_start_run_rejects_a_bad_setting_with_a_clear_message(env, capfd):
    with pytest.raises(RuntimeError):
        components.start_run(run_name="bad", split="0.8,0.3,0.1")
    assert "deeplight: error: split: want three non-negative fractions summing to 1" in capfd.readouterr().out


def test_ingest_writes_parquet_splits_and_a_child_run(env, started, ingested):
    out = Path(ingested.outputs["ingested"].path)
    report = json.loads((out / "report.json").read_text())
    assert report["read"] == report["written"] == ROWS and report["quarantined"] == 0
    rows = {s: sum(pq.read_metadata(p).num_rows for p in (out / s).glob("*.parquet")) for s in report["splits"]}
    assert rows == report["splits"] and sum(rows.values()) == ROWS
    assert ingested.outputs["ingested"].metadata["rows"] == ROWS
    run = child(env, started.parent, "ingest")
    assert run.info.status == "FINISHED" and run.data.metrics["rows_written"] == ROWS
    assert run.data.params["inputs"] == str(env.raw) and run.data.tags["deeplight.step"] == "ingest"


def test_hash_features_writes_ids_and_the_feature_map(env, started, hashed):
    out = Path(hashed["hashed"].path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "feature_map.json").is_file() and len(manifest["field_names"]) == 39
    assert sum(manifest["rows"].values()) == ROWS
    assert child(env, started.parent, "hash_features").data.metrics["fields"] == 39


def test_train_writes_a_dense_checkpoint_and_logs_epochs(env, started, dense):
    out = Path(dense["model"].path)
    results = json.loads((out / "results.json").read_text())
    assert (out / "best.pt").is_file() and results["epochs_run"] == 1
    assert dense["metrics"].metadata["test_auc"] == pytest.approx(results["test"]["auc"])
    run = child(env, started.parent, "train")
    assert run.data.metrics["test_auc"] == pytest.approx(results["test"]["auc"])
    assert run.data.params["model.dnn"] == "(16,)" and run.data.tags["deeplight.variant"] == "dense"


def test_prune_reaches_its_targets(env, started, pruned):
    out = Path(pruned["model"].path)
    results = json.loads((out / "results.json").read_text())
    assert results["pruning"]["sparsity"]["field"] == pytest.approx(0.5, abs=0.03)
    assert results["pruning"]["sparsity"]["dnn"] == pytest.approx(0.5, abs=0.03)
    assert pruned["metrics"].metadata["sparsity_dnn"] == pytest.approx(results["pruning"]["sparsity"]["dnn"])
    assert child(env, started.parent, "prune").data.metrics["final_sparsity_field"] == pytest.approx(
        results["pruning"]["sparsity"]["field"])


def test_evaluate_scores_the_model_and_copies_headline_metrics_to_the_parent(env, started, evaluated):
    out = Path(evaluated["evaluation"].path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0 < metrics["auc"] < 1 and metrics["latency_us"]["1"] > 0
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["calibration_curve.png", "field_pairs.png",
                                                                   "roc_curve.png"]
    assert evaluated["metrics"].metadata["test_auc"] == pytest.approx(metrics["auc"])
    run = child(env, started.parent, "evaluate-pruned")
    assert run.data.metrics["test_auc"] == pytest.approx(metrics["auc"])
    parent = env.client.get_run(started.parent)
    assert parent.data.metrics["pruned_test_auc"] == pytest.approx(metrics["auc"])
    assert parent.data.metrics["pruned_model_bytes"] == metrics["model_bytes"]


def test_register_creates_a_challenger_version(env, started, registered):
    info = json.loads(Path(registered["registered"].path).read_text())
    assert info["version"] == registered["registered"].metadata["version"] == "1" and info["alias"] == "challenger"
    mv = env.client.get_model_version_by_alias("ctr-test", "challenger")
    assert str(mv.version) == "1" and mv.tags["parent_run_id"] == started.parent
    assert env.client.get_run(started.parent).data.tags["deeplight.registered"] == "ctr-test/1"
    # What is served, timed at registration: the registered pyfunc beside the dense model, on raw rows.
    for key in ("served_latency_us_1row", "served_rows_per_s_1000", "served_dense_latency_us_1row",
                "served_dense_rows_per_s_1000"):
        assert float(mv.tags[key]) > 0, key
    parent_metrics = env.client.get_run(started.parent).data.metrics
    assert parent_metrics["served_latency_us_1row"] == float(mv.tags["served_latency_us_1row"])


def test_promote_makes_the_first_challenger_champion(env, started, registered):
    task = components.promote(model_name="ctr-test", tolerance=0.001, latency_slo_us=0.0,
                              parent_run_id=started.parent)
    decision = json.loads(Path(task.outputs["decision"].path).read_text())
    assert task.outputs["Output"] is True and decision["decision"] == "promoted"
    assert str(env.client.get_model_version_by_alias("ctr-test", "champion").version) == "1"


def test_a_bad_input_file_fails_the_step_with_its_message(env, started, capfd):
    missing = env.root / "no-such-file.txt"
    with pytest.raises(RuntimeError, match="'ingest'.* finished with status .*FAILURE"):
        components.ingest(input_uris=[str(missing)], config_json=started.cfg, parent_run_id=started.parent)
    out = capfd.readouterr().out
    assert f"deeplight: error: {missing}: no such file" in out
    assert "Traceback" not in out  # a user error is a message, not a stack trace
    assert env.client.get_run(started.parent).data.tags["deeplight.error"] == f"ingest: {missing}: no such file"
