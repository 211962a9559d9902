"""Optuna sweeps: search space and objectives, parent/child MLflow runs, Pareto files, the choice, resume after
SIGKILL, two worker processes on PostgreSQL, the KFP sweep pipeline, and bad settings failing before training.

One small sweep (toy data, DNN (16,), 4 trials) is shared by the module; the subprocess tests prune from its
dense checkpoint so that no test trains twice.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from deeplight.model import checkpoint
from deeplight.cli import main as cli_main
from deeplight.base.errors import DeeplightError
from deeplight.data.hashing import hash_dataset
from deeplight.data.ingest import ingest
from deeplight.model.deepfwfm import DeepFwFM
from deeplight.ops.sweep import (SearchSpace, SweepSettings, choose, load_study, open_storage, pareto_front,
                             run_sweep)
from deeplight.data.synth import synthesize
from deeplight.model.train import evaluate_split

from conftest import REPO

TINY = {"model.dnn": [16], "train.batch_size": 512, "train.epochs": 1, "train.threads": 1, "prune.ramp_epochs": 1.0}
N_TRIALS = 4
SEARCHED = {"prune.dnn", "prune.field", "prune.embedding", "prune.mode", "prune.finetune_epochs"}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DEEPLIGHT_OPTUNA_STORAGE")}
    return {**env, "DEEPLIGHT_MLRUNS": str(root / "mlruns"), "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1",
            "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _env(root).items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("DEEPLIGHT_OPTUNA_STORAGE", raising=False)
        # Synthetic Criteo through the real data steps: registering needs the feature map.
        synthesize("criteo", rows=4000, seed=0, out=str(root / "raw.txt"))
        ingest("criteo", [str(root / "raw.txt")], str(root / "ingested"))
        data = root / "hashed"
        hash_dataset(str(root / "ingested"), str(data), min_count=2)
        # tolerance 1: a 1-epoch dense model on 3k rows is noise-level, so any trial may be chosen (and registered);
        # the rule itself is tested on its own below.
        settings = SweepSettings(study="toy", n_trials=N_TRIALS, latency_calls=200, tolerance=1.0,
                                 space=SearchSpace(finetune_epochs=(1, 1)))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            summary = run_sweep(data, root / "out", settings, overrides=TINY, register="sweep-test-model")
        from deeplight.ops.tracking import client

        yield SimpleNamespace(root=root, data=data, settings=settings, summary=summary, out=root / "out",
                              client=client(), dense=root / "out" / "dense" / "best.pt",
                              storage=settings.storage_url(), stderr=err.getvalue())


def _study(s: SimpleNamespace, name: str = "toy", url: str | None = None) -> optuna.Study:
    return load_study(name, open_storage(url or s.storage))


# --- the study -----------------------------------------------------------------------------------------------

def test_search_space_and_objectives(swept):
    study = _study(swept)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * N_TRIALS
    space = swept.settings.space
    for t in trials:
        assert set(t.params) == SEARCHED
        for c in ("dnn", "field", "embedding"):
            lo, hi = getattr(space, c)
            assert lo <= t.params[f"prune.{c}"] <= hi
        assert t.params["prune.mode"] in space.modes and t.params["prune.finetune_epochs"] == 1
        # Objective 1 is the pruned checkpoint's valid AUC, recomputed here from the file.
        ck = checkpoint.load(t.user_attrs["checkpoint"])
        model = DeepFwFM.from_spec(ck["spec"])
        model.load_state_dict(ck["model"])
        assert t.values[0] == pytest.approx(evaluate_split(model, swept.data, "valid")["auc"], abs=1e-9)
        # The trial pruned to its own targets (unstructured per-layer DNN / global embedding are exact).
        if t.params["prune.mode"] == "unstructured":
            assert t.user_attrs["sparsity"]["dnn"] == pytest.approx(t.params["prune.dnn"], abs=0.02)
            assert t.user_attrs["sparsity"]["embedding"] == pytest.approx(t.params["prune.embedding"], abs=0.01)
        # Objective 2: a batch-1 latency in microseconds.
        assert 0.1 < t.values[1] < 10_000
    # Reseeded per trial: no two trials drew the same point.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == N_TRIALS


def test_each_trial_logs_its_start_with_settings_and_its_result(swept):
    """Progress of a sweep off a terminal: a line when a trial starts (its settings) and when it ends."""
    started = [line for line in swept.stderr.splitlines() if line.startswith("sweep toy: trial ")
               and " started on " in line]
    done = [line for line in swept.stderr.splitlines() if line.startswith("sweep toy: trial ") and " done in " in line]
    assert len(started) == len(done) == N_TRIALS, swept.stderr[-2000:]
    assert all("prune.dnn=" in line and "prune.mode=" in line for line in started)
    assert all("valid AUC 0." in line and "batch-1 latency" in line for line in done)


def test_pareto_front_and_choice_rule():
    assert pareto_front([(0.8, 10.0), (0.79, 5.0), (0.78, 6.0), (0.8, 12.0)]) == [0, 1]
    rows = [{"number": i, "state": "COMPLETE", "valid_auc": a, "latency_us": t}
            for i, (a, t) in enumerate([(0.800, 9.0), (0.7992, 4.0), (0.7989, 2.0), (0.81, 8.0)])]
    rows.append({"number": 4, "state": "FAIL", "valid_auc": None, "latency_us": None})
    assert choose(rows, dense_auc=0.8, tolerance=0.001)["number"] == 1  # 2 is faster but 0.0011 below dense
    assert choose(rows, dense_auc=0.8, tolerance=0.0011)["number"] == 2
    assert choose(rows, dense_auc=0.82, tolerance=0.001) is None


def test_trials_are_child_runs_of_one_sweep_parent_run(swept):
    c, s = swept.client, swept.summary
    parent = c.get_run(s["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["deeplight.kind"] == "sweep"
    assert parent.data.params["sweep.n_trials"] == str(N_TRIALS)
    children = c.search_runs([parent.info.experiment_id],
                             f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=100)
    trial_runs = {int(r.data.tags["optuna.trial_number"]): r for r in children
                  if r.data.tags.get("deeplight.step") == "sweep_trial"}
    assert sorted(trial_runs) == list(range(N_TRIALS))
    assert [r.data.tags.get("deeplight.step") for r in children].count("dense") == 1
    for t in _study(swept).get_trials():
        run = trial_runs[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.params["prune.mode"] == t.params["prune.mode"]
        assert float(run.data.params["prune.dnn"]) == pytest.approx(t.params["prune.dnn"])
        m = run.data.metrics
        assert m["objective_valid_auc"] == pytest.approx(t.values[0]) == m["best_valid_auc"]
        assert m["objective_latency_us"] == pytest.approx(t.values[1])
        assert m["kept_pairs"] == len(t.user_attrs["kept_pairs"]) and "sparsity_field" in m
        # Trials prune on the data without its test split: no trial ever scored the test split.
        assert not any(k.startswith("test_") for k in m)
        arts = {a.path for a in c.list_artifacts(run.info.run_id)}
        assert {"kept_pairs.json", "best.pt"} <= arts


def test_pareto_plots_and_table_exist_and_are_logged(swept):
    report = swept.out / "report"
    for name, magic in (("pareto.png", b"\x89PNG"), ("sparsity.png", b"\x89PNG"), ("pairs.png", b"\x89PNG")):
        assert (report / name).read_bytes()[:4] == magic, name
    html = (report / "pareto.html").read_text()
    assert "plotly" in html.lower() and len(html) > 100_000  # self-contained, interactive
    md = (report / "report.md").read_text()
    assert "## Pareto front" in md and "| trial |" in md and "## RQ4" in md
    logged = {a.path for a in swept.client.list_artifacts(swept.summary["mlflow_parent_run_id"], "sweep")}
    assert {"sweep/pareto.png", "sweep/pareto.html", "sweep/report.md", "sweep/trials.csv"} <= logged


def test_the_chosen_model_is_registered_with_its_test_metrics(swept):
    final = swept.summary["final"]
    reg = final["registered"]
    version = swept.client.get_model_version("sweep-test-model", reg["version"])
    assert version.tags["optuna.trial_number"] == str(final["chosen"]) and version.tags["optuna.study"] == "toy"
    assert float(version.tags["test_auc"]) == pytest.approx(final["chosen_test"]["auc"])
    assert "Registered: `sweep-test-model` version" in (swept.out / "report" / "report.md").read_text()


def test_chosen_is_the_fastest_within_tolerance_and_only_it_is_tested(swept):
    s = swept.summary
    complete = [r for r in s["trials"] if r["state"] == "COMPLETE"]
    dense = s["dense"]["valid"]["auc"]
    chosen = choose(complete, dense, swept.settings.tolerance)
    assert s["chosen"] == (chosen["number"] if chosen else None)
    if chosen is not None:
        faster = [r for r in complete if r["latency_us"] < chosen["latency_us"]]
        assert all(r["valid_auc"] < dense - swept.settings.tolerance for r in faster)
        metrics = swept.client.get_run(s["mlflow_parent_run_id"]).data.metrics
        assert 0.5 < metrics["chosen_test_auc"] <= 1 and metrics["speedup"] > 0
        test_rows = json.loads((swept.data / "manifest.json").read_text())["rows"]["test"]
        assert s["final"]["chosen_test"]["rows"] == test_rows


def test_running_the_same_command_again_adds_nothing(swept):
    again = run_sweep(swept.data, swept.out, swept.settings, overrides=TINY)
    assert again["states"] == {"COMPLETE": N_TRIALS} and again["completed_here"] == 0
    assert again["mlflow_parent_run_id"] == swept.summary["mlflow_parent_run_id"]


def test_another_search_space_on_the_same_study_is_refused(swept):
    other = SweepSettings(study="toy", n_trials=N_TRIALS, space=SearchSpace(dnn=(0.5, 0.6), finetune_epochs=(1, 1)))
    with pytest.raises(DeeplightError, match="another search space"):
        run_sweep(swept.data, swept.out, other, overrides=TINY)


def test_report_command_rebuilds_the_report_from_the_study(swept, tmp_path):
    assert cli_main(["report", "--study", "toy", "--storage", swept.storage, "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert f"Chosen: trial {swept.summary['chosen']}" in md or "No trial reached" in md
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "pareto.html").stat().st_size > 0


# --- bad settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--dnn", "0.9:0.5"], "search range prune.dnn = 0.9:0.5 is empty"),
    (["--field", "0.5:1.0"], "must lie in [0, 1)"),
    (["--modes", "diagonal"], "unknown pruning mode"),
    (["--sampler", "annealing"], "unknown sampler 'annealing'"),
    (["--storage", "postgresql://u:secret@127.0.0.1:1/none"], "cannot open the Optuna storage postgresql://***@"),
    (["--storage", "nosuchdb://x/y"], "cannot open the Optuna storage nosuchdb://x/y"),
])
def test_bad_settings_fail_with_a_clear_message_before_training(args, message, toy_hashed, mlflow_store, tmp_path,
                                                                capsys):
    out = tmp_path / "out"
    started = time.monotonic()
    code = cli_main(["sweep", "--data", str(toy_hashed), "--out", str(out), "--storage",
                     f"sqlite:///{tmp_path / 'optuna.db'}", *args, *sum((["--set", f"{k}={json.dumps(v)}"]
                                                                         for k, v in TINY.items()), [])])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "secret" not in err
    assert not (out / "dense").exists() and time.monotonic() - started < 30


# --- resume after SIGKILL --------------------------------------------------------------------------------------

def _sweep_cmd(s: SimpleNamespace, out: Path, study: str, url: str, n: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deeplight.cli", "sweep", "--data", str(s.data), "--out", str(out),
            "--dense", str(s.dense), "--study", study, "--storage", url, "--n-trials", str(n),
            "--finetune-epochs", "1", "--set", "prune.ramp_epochs=1", "--heartbeat", "1", "--grace", "3", *extra]


@pytest.mark.slow
def test_a_killed_sweep_resumes_keeps_finished_trials_and_fails_the_killed_one(swept, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    # Longer latency timing keeps each trial running for a second or more: time to kill one mid-way.
    cmd = _sweep_cmd(swept, tmp_path / "out", "resume", url, 2, "--latency-calls", "100000", "--no-finalize")
    proc = subprocess.Popen(cmd, env=_env(swept.root), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    victim, deadline = None, time.monotonic() + 180
    try:
        while victim is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the sweep never had a finished and a running trial"
            time.sleep(0.2)
            try:
                trials = _study(swept, "resume", url).get_trials()
            except DeeplightError:
                continue  # not created yet
            # Killed once its MLflow run is open, so that the run's end can be checked below (a kill before
            # that is test_stale_trial_without_a_recorded_run_is_failed_by_its_tags).
            running = [t for t in trials if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
            if running and any(t.state.name == "COMPLETE" for t in trials):
                victim = running[0]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = {t.number: t for t in _study(swept, "resume", url).get_trials() if t.state.name == "COMPLETE"}
    assert _study(swept, "resume", url).trials[victim.number].state.name == "RUNNING"  # left running by the kill

    again = subprocess.run(_sweep_cmd(swept, tmp_path / "out", "resume", url, 2, "--latency-calls", "200"),
                           env=_env(swept.root), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(swept, "resume", url).get_trials()
    assert trials[victim.number].state.name == "FAIL"
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and not [t for t in trials if t.state.name == "RUNNING"]
    for number, t in before.items():  # kept as they were, not repeated
        assert trials[number].state.name == "COMPLETE" and trials[number].values == t.values
        assert trials[number].params == t.params
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 2
    run = swept.client.get_run(trials[victim.number].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    parent = swept.client.get_run(trials[0].user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    assert all(swept.client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent
               for t in trials)
    assert swept.client.get_run(parent).info.status == "FINISHED"
    assert json.loads(again.stdout)["states"] == {"COMPLETE": 2, "FAIL": 1}


def test_stale_trial_without_a_recorded_run_is_failed_by_its_tags(mlflow_store, tmp_path):
    """A worker that dies after opening a trial's MLflow run but before recording its id in the trial: the
    stale-trial callback still finds the run (by study, parent and trial number) and fails it, and leaves
    another study's run with the same trial number alone."""
    from deeplight.ops.sweep import TrialLogger
    from deeplight.ops.tracking import MlflowTracker

    tracker = MlflowTracker("stale-runs")
    parent = tracker.client.create_run(tracker.experiment_id, run_name="sweep").info.run_id
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    runs = {}
    for name in ("dies", "other"):
        logger = TrialLogger("stale-runs", parent, {"optuna.study": name, "optuna.storage": "sqlite"})
        study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
        trial = study.ask()
        if name == "dies":
            def die(key, value):
                raise KeyboardInterrupt  # the worker is killed right after create_run

            trial.set_user_attr = die
            with pytest.raises(KeyboardInterrupt):
                with logger.child_run(trial):
                    pass
            dying = (logger, study)
        else:
            with logger.child_run(trial):
                pass  # opened and recorded; still RUNNING (its callback closes it)
        found = tracker.client.search_runs([tracker.experiment_id],
                                           filter_string=f"tags.`optuna.study` = '{name}'")
        assert len(found) == 1 and found[0].info.status == "RUNNING"
        runs[name] = found[0].info.run_id
    logger, study = dying
    frozen = study.trials[0]
    assert "mlflow_run_id" not in frozen.user_attrs
    logger.on_stale(study, frozen)
    dead = tracker.client.get_run(runs["dies"])
    assert dead.info.status == "FAILED" and dead.data.tags["optuna.state"].startswith("FAIL (worker died")
    assert tracker.client.get_run(runs["other"]).info.status == "RUNNING"


# --- two workers on PostgreSQL ---------------------------------------------------------------------------------

def _pg_bin() -> Path | None:
    for name in ("initdb", "pg_ctl", "postgres"):
        if shutil.which(name) is None:
            break
    else:
        return Path(shutil.which("initdb")).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's package, which .ci/run installs), in a temp dir,
    stopped by PID at the end. Yields a database URL."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql "
                    "(.ci/run does)")
    base = Path(tempfile.mkdtemp(prefix="deeplight-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use the package's system user
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                    "-o", f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=120)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE optuna")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
        try:  # pg_ctl stop signals the postmaster by its PID; make sure it is gone
            os.kill(pid, 0)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.integration
def test_two_workers_share_one_study_on_postgresql(swept, postgres, tmp_path):
    n = 6
    workers = [subprocess.Popen(_sweep_cmd(swept, tmp_path / f"worker{k}", "pg", postgres, n, "--latency-calls",
                                           "20000", "--no-finalize"),
                                env=_env(swept.root), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for k in range(2)]
    outs = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err[-3000:]
    study = _study(swept, "pg", postgres)
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # Every trial recorded exactly once: n complete, distinct numbers and points, none left running; a trial
    # started past the budget by a race for the last slot ends PRUNED without params.
    assert len(complete) == n
    assert len({t.number for t in trials}) == len(trials)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n
    assert all(t.state.name == "PRUNED" and not t.params and t.user_attrs.get("surplus")
               for t in trials if t.state.name != "COMPLETE")
    # Both processes did trials, and each trial has exactly one MLflow run under the one sweep parent run.
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    assert sum(json.loads(o)["completed_here"] for o, _ in outs) == n
    parent = study.user_attrs["deeplight.mlflow_parent_run_id"]
    runs = swept.client.search_runs([swept.client.get_run(parent).info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{parent}'", max_results=100)
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs)
    assert numbers == sorted(t.number for t in complete)


# --- the KFP pipeline -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_sweep_pipeline_runs_locally_and_compiles(tmp_path, monkeypatch):
    pytest.importorskip("kfp")
    from kfp import compiler, local

    from deeplight.data.synth import synthesize
    from pipelines.sweep_pipeline import sweep_pipeline

    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tmp_path / "raw.txt"
    synthesize("criteo", rows=6000, seed=1, out=str(raw))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep_pipeline(input_uris=[str(raw)], epochs=1, n_trials=3, workers=2, storage=url, study="kfp",
                   config_overrides=json.dumps(TINY), finetune_range="1:1", latency_calls=200,
                   model_name="deeplight-sweep-test", run_name="sweep-test")
    study = _study(SimpleNamespace(storage=url), "kfp", url)
    assert [t.state.name for t in study.get_trials()].count("COMPLETE") == 3
    from deeplight.ops.tracking import client

    c = client()
    # MLflow: pipeline run -> sweep run -> one run per trial; the chosen model registered with its test metrics.
    sweep_run = c.get_run(study.user_attrs["deeplight.mlflow_parent_run_id"])
    pipeline_run = c.get_run(sweep_run.data.tags["mlflow.parentRunId"])
    assert pipeline_run.data.tags["deeplight.run_name"] == "sweep-test"
    assert pipeline_run.info.status == "FINISHED" and sweep_run.info.status == "FINISHED"
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in c.search_runs(
        [sweep_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")) == [0, 1, 2]
    test_auc = [v for k, v in pipeline_run.data.metrics.items() if k.startswith("chosen_") and k.endswith("auc")]
    assert test_auc and all(0.5 < v <= 1 for v in test_auc)  # the evaluate step's test AUC of the chosen model
    versions = c.search_model_versions("name='deeplight-sweep-test'")
    assert len(versions) == 1
    assert study.user_attrs["deeplight.final"]["chosen"] is not None
    fresh = tmp_path / "sweep_pipeline.yaml"
    compiler.Compiler().compile(sweep_pipeline, str(fresh))
    assert "parameterIterator" in fresh.read_text()
    assert fresh.read_text() == (REPO / "pipelines" / "sweep_pipeline.yaml").read_text(), \
        "pipelines/sweep_pipeline.yaml is stale: python -m pipelines.sweep_pipeline"


def test_a_worker_that_loads_the_study_mid_creation_waits_for_all_its_metadata(tmp_path):
    """The creator records the sweep's metadata one attr at a time; a second worker that loads the study between
    two writes must wait for the rest, not report a base-config mismatch (seen in CI on PostgreSQL)."""
    import threading

    from deeplight.ops.sweep.space import ATTR
    from deeplight.ops.sweep.storage import _open_study

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    settings = SweepSettings(study="racing", storage=storage)
    meta = {"space": {"dnn": [0.9]}, "config": {"data.dataset": "criteo"}, "data": {"fields": ["I1"]}}
    study = optuna.create_study(storage=storage, study_name="racing", directions=["maximize", "minimize"])
    study.set_user_attr(ATTR + "space", meta["space"])  # the creator is here when the second worker loads it

    def creator_finishes():
        time.sleep(1.5)
        study.set_user_attr(ATTR + "config", meta["config"])
        study.set_user_attr(ATTR + "data", meta["data"])

    writer = threading.Thread(target=creator_finishes)
    writer.start()
    try:
        opened, created = _open_study(storage, settings, meta)
    finally:
        writer.join()
    assert not created and opened.user_attrs[ATTR + "config"] == meta["config"]
    with pytest.raises(DeeplightError, match="another base config"):
        _open_study(storage, settings, {**meta, "config": {"data.dataset": "avazu"}})
