"""The whole pipeline through the real local runner (kfp.local.SubprocessRunner), its compiled YAML, and `submit`.

- One module-scoped pipeline run on tiny synthetic Criteo data read from moto's real S3 server on 127.0.0.1,
  tracked in a real MLflow sqlite store in a temp dir, shared by the assertions; a second run on the same
  store checks that runs compare side by side and exercises the promotion branch.
- A failing step (bad input file) fails the pipeline with the step's message and registers nothing.
- The committed pipelines/deeplight_pipeline.yaml must equal a fresh compile (regenerate it with
  `deeplight pipeline compile`).
- `submit` is tested against a STUB of the KFP API server: a small local HTTP server on 127.0.0.1 written in
  this file that records requests and answers like the KFP v2beta1 REST API. It is not Kubeflow; it checks
  the request kfp.Client sends.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

pytest.importorskip("kfp")
from mlflow.tracking import MlflowClient  # noqa: E402

from deeplight.cli import pipeline as pipeline_cli  # noqa: E402
from deeplight.cli import main as cli_main  # noqa: E402
from deeplight.base.errors import DeeplightError  # noqa: E402
from deeplight.data.synth import synthesize  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

REPO = Path(__file__).resolve().parents[1]
COMMITTED_YAML = REPO / "pipelines" / "deeplight_pipeline.yaml"
ROWS = 3000
SECRET = "s3cr3t-value-never-logged"
TINY = {"epochs": 1, "min_count": 2, "ramp_epochs": 1.0, "finetune_epochs": 1, "dnn_sparsity": 0.5,
        "field_sparsity": 0.5, "embedding_sparsity": 0.2, "model_name": "ctr-pipeline-test",
        # prune.auto off: these sparsity targets as given (the default searches; see test_prune.py)
        "config_overrides": json.dumps({"model.dnn": [16], "train.batch_size": 512, "prune.auto": False})}
STEP_RUNS = {"ingest", "hash_features", "train", "prune", "evaluate-dense", "evaluate-pruned", "register"}


# --- the local run ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_input(tmp_path_factory):
    """A tiny synthetic Criteo file in a bucket of moto's S3 server (127.0.0.1), credentials in the env."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    root = tmp_path_factory.mktemp("s3")
    raw = root / "raw.txt"
    synthesize("criteo", rows=ROWS, seed=0, out=str(raw))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                     "AWS_DEFAULT_REGION": "us-east-1", "DEEPLIGHT_S3_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)  # the steps are subprocesses: they inherit these
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="raw")
        s3.upload_file(str(raw), "raw", "criteo/train.txt")
        yield "s3://raw/criteo/train.txt"
    server.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DEEPLIGHT_MLRUNS", str(root / "mlruns"))
        yield SimpleNamespace(root=root, client=MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"))


@pytest.fixture(scope="module")
def first(store, s3_input):
    summary = pipeline_cli.run_local({**TINY, "input_uris": [s3_input], "run_name": "first"},
                                     pipeline_root=store.root / "kfp")
    return summary


@pytest.fixture(scope="module")
def second(store, s3_input, first):
    """The same pipeline again with the promotion gate on."""
    return pipeline_cli.run_local({**TINY, "input_uris": [s3_input], "promote_model": True},  # a generated name
                                  pipeline_root=store.root / "kfp")


def children(store, parent_id: str) -> dict:
    """A pipeline run's child runs by step (`evaluate-dense`...), whatever their descriptive names."""
    exp = store.client.get_experiment_by_name("deeplight").experiment_id
    return {pipeline_cli.step_of(r): r
            for r in store.client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")}


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_with_a_parent_run_and_a_child_run_per_step(store, first):
    parent = store.client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "first"
    assert parent.data.tags["deeplight.kind"] == "pipeline" and parent.data.tags["kfp.run_id"]
    assert parent.data.params["pipeline.input_uris"] == "s3://raw/criteo/train.txt"
    assert parent.data.params["train.epochs"] == "1" and parent.data.params["model.dnn"] == "(16,)"
    runs = children(store, parent.info.run_id)
    assert set(runs) == STEP_RUNS
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["ingest"].data.metrics["rows_written"] == ROWS  # read from S3 through the moto server
    assert runs["train"].data.params["train.epochs"] == "1" and runs["train"].data.metrics["test_auc"] > 0
    assert runs["prune"].data.metrics["final_sparsity_field"] == pytest.approx(0.5, abs=0.03)
    artifacts = {a.path for a in store.client.list_artifacts(runs["train"].info.run_id)}
    assert {"best.pt", "results.json", "learning_curve.png"} <= artifacts
    # runs that compare well (issue 19, item 2): names, MLflow's standard tags, inputs, system metrics
    assert re.fullmatch(r"train-criteo-deepfwfm-\d{8}-\d{4}", runs["train"].info.run_name)
    assert re.fullmatch(r"prune-criteo-deepfwfm-dnn50-field50-emb20-\d{8}-\d{4}", runs["prune"].info.run_name)
    assert re.fullmatch(r"evaluate-pruned-criteo-deepfwfm-dnn50-field50-emb20-\d{8}-\d{4}",
                        runs["evaluate-pruned"].info.run_name)
    assert runs["evaluate-dense"].info.run_name.startswith("evaluate-dense-criteo-deepfwfm-dense-")
    for run in (parent, *runs.values()):
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert runs["train"].data.tags["mlflow.source.name"] == "deeplight component train"
    for step in ("train", "prune"):
        assert "system/cpu_utilization_percentage" in runs[step].data.metrics
        assert {d.dataset.name for d in runs[step].inputs.dataset_inputs} == {"criteo-train", "criteo-valid",
                                                                            "criteo-test"}
    assert runs["evaluate-pruned"].data.tags["host.cores"]  # the host of every latency measurement
    # the parent links to the version it registered
    assert parent.data.tags["deeplight.registered.url"] == "#/models/ctr-pipeline-test/versions/1"
    assert "(#/models/ctr-pipeline-test/versions/1)" in parent.data.tags["mlflow.note.content"]
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"criteo-train", "criteo-valid", "criteo-test"}


@pytest.mark.slow
def test_a_challenger_is_registered_from_the_pruned_model(store, first):
    mv = store.client.get_model_version_by_alias("ctr-pipeline-test", "challenger")
    assert str(mv.version) == "1" and mv.tags["parent_run_id"] == first["parent_run_id"]
    assert mv.tags["pruned"] == "true" and mv.tags["deeplight.variant"] == "pruned"
    assert first["registered"] == "ctr-pipeline-test/1"


@pytest.mark.slow
def test_the_printed_table_is_what_mlflow_holds(store, first, capsys):
    pipeline_cli.print_summary(first)
    printed = capsys.readouterr().out
    runs = children(store, first["parent_run_id"])
    for variant in ("dense", "pruned"):
        m = runs[f"evaluate-{variant}"].data.metrics  # the evaluation child run, not the parent's copies
        line = next(l for l in printed.splitlines() if l.startswith(f"| {variant} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert cells == [f"{m['test_auc']:.4f}", f"{m['test_logloss']:.4f}", f"{m['latency_us_b1']:.1f}",
                         f"{m['latency_us_b4096'] / 1000:.2f}", f"{m['model_bytes'] / 1024:,.0f}",
                         f"{m['params_nonzero']:,.0f}"]
    assert first["rows"]["pruned"]["params_nonzero"] < first["rows"]["dense"]["params_nonzero"]
    assert "make ui" in printed and "http://127.0.0.1:5000" in printed
    assert "/#/experiments/1/runs?workflowType=machine_learning" in printed  # the UI's model-training view


@pytest.mark.slow
def test_no_secret_reaches_mlflow(store, first):
    for run in [store.client.get_run(first["parent_run_id"]), *children(store, first["parent_run_id"]).values()]:
        text = json.dumps([run.data.params, run.data.tags])
        assert SECRET not in text


@pytest.mark.slow
def test_a_second_run_adds_a_comparable_run_and_the_promotion_gate_runs(store, first, second):
    a, b = (store.client.get_run(s["parent_run_id"]) for s in (first, second))
    assert a.info.run_id != b.info.run_id and b.info.status == "FINISHED"
    # named for what it trains (dataset, model, sparsity targets, date) + a unique suffix run-local finds it by
    assert re.fullmatch(r"criteo-deepfwfm-dnn50-field50-emb20-\d{8}-\d{4}-[0-9a-f]{4}", b.info.run_name)
    assert second["run_name"] == b.info.run_name
    assert set(a.data.params) == set(b.data.params)
    assert {k for k in a.data.metrics if k.startswith(("dense_", "pruned_"))} == \
           {k for k in b.data.metrics if k.startswith(("dense_", "pruned_"))} != set()
    assert set(children(store, b.info.run_id)) == STEP_RUNS
    assert str(store.client.get_model_version_by_alias("ctr-pipeline-test", "challenger").version) == "2"
    champion = store.client.get_model_version_by_alias("ctr-pipeline-test", "champion")
    assert str(champion.version) == "2" and champion.tags["promotion.decision"] == "promoted"  # no champion before
    assert json.loads(b.data.tags["deeplight.promotion"])["decision"] == "promoted"


@pytest.mark.slow
def test_a_bad_input_file_fails_the_pipeline_with_its_message_and_registers_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DEEPLIGHT_MLRUNS", str(tmp_path / "mlruns"))
    bad = tmp_path / "bad.txt"
    bad.write_text("this is not criteo\n" * 50)
    code = cli_main(["pipeline", "run-local", "--input", str(bad), "--run-name", "broken", "--epochs", "1",
                     "--pipeline-root", str(tmp_path / "kfp")])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2
    assert "deeplight: error: pipeline failed" in err and f"ingest: {bad}: 50 of 50 rows are bad" in err
    # the terminal gets a line per step; KFP's executor output goes to the run's log file, which the error names
    log = tmp_path / "kfp" / "broken.log"
    assert f"every step's output: {log}" in err
    assert re.search(r"^ingest: started$", captured.out, re.M) and \
        re.search(r"^ingest: FAILURE in \d+ s$", captured.out, re.M), captured.out
    assert "Streamed logs" not in captured.out and "Streamed logs" in log.read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("deeplight").experiment_id],
                                "attributes.run_name = 'broken'")[0]
    assert parent.info.status == "FAILED"  # closed by the exit handler
    assert parent.data.tags["deeplight.error"].startswith(f"ingest: {bad}: 50 of 50 rows are bad")
    exp = client.get_experiment_by_name("deeplight").experiment_id
    steps = {pipeline_cli.step_of(r): r.info.status for r in
             client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert steps == {"ingest": "FAILED"}  # nothing ran after the failing step
    assert client.search_registered_models() == []


# --- settings checked before any work (issue 19, item 3) ---------------------------------------------------

def test_a_misspelt_dataset_fails_before_any_data_is_generated(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli_main(["pipeline", "run-local", "--dataset", "avazuu", "--rows", "100",
                     "--pipeline-root", str(tmp_path / "kfp")])
    assert code == 2 and "unknown dataset 'avazuu'; known: avazu, criteo" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "kfp").exists()


def test_avazu_without_input_gets_synthetic_avazu_data(tmp_path):
    from deeplight.data.ingest import ingest

    raw = pipeline_cli.default_input(rows=200, seed=0, data_root=tmp_path, dataset="avazu")
    assert raw.name == "raw.csv" and raw.read_text().splitlines()[0].startswith("id,click,hour")
    report = ingest("avazu", [str(raw)], str(tmp_path / "ingested"))  # what the pipeline's first step does
    assert report["written"] == 200 and report["quarantined"] == 0
    assert pipeline_cli.default_input(rows=200, seed=0, data_root=tmp_path) == \
        tmp_path / "criteo-synth-200-seed0" / "raw.txt"  # make run's Criteo file keeps its name


# --- the compiled pipeline -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return pipeline_cli.compile_pipeline(tmp_path_factory.mktemp("compile") / "deeplight_pipeline.yaml")


def test_the_committed_yaml_is_current(compiled):
    assert COMMITTED_YAML.read_text() == compiled.read_text(), (
        "pipelines/deeplight_pipeline.yaml is out of date: run `deeplight pipeline compile` and commit it")


def _order(dag: dict) -> list[str]:
    """Task names in an order that respects every dependency (ties by name)."""
    tasks, done, order = dag["tasks"], set(), []
    while len(order) < len(tasks):
        ready = sorted(t for t, spec in tasks.items() if t not in done and set(spec.get("dependentTasks", [])) <= done)
        assert ready, "cycle in the DAG"
        done.add(ready[0])
        order.append(ready[0])
    return order


def test_the_yaml_lists_the_six_steps_in_order(compiled):
    spec = yaml.safe_load(compiled.read_text())
    body = spec["components"]["comp-exit-handler-1"]["dag"]
    order = _order(body)
    steps = [t for t in order if t.split("-")[0] in ("ingest", "hash", "train", "prune", "evaluate", "register")]
    assert [s.rsplit("-2", 1)[0] for s in steps] == ["ingest", "hash-features", "train", "prune", "evaluate",
                                                      "evaluate", "register"]
    assert body["tasks"]["evaluate-2"]["taskInfo"]["name"] == "evaluate-pruned"
    assert body["tasks"]["register"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "prune"
    assert order[0] == "start-run"
    gate = next(t for t, v in body["tasks"].items() if v["taskInfo"]["name"] == "promote-when-asked")
    assert order[-1] == gate and "register" in body["tasks"][gate]["dependentTasks"]  # promote after register
    assert "promote_model" in body["tasks"][gate]["triggerPolicy"]["condition"]
    assert spec["root"]["dag"]["tasks"]["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    # every step runs in the project image, installs nothing, and is never served from the cache
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"] == "deeplight:local"
        assert "pip install" not in " ".join(container["command"])
    all_tasks = [*spec["root"]["dag"]["tasks"].values(), *body["tasks"].values(),
                 *spec["components"][body["tasks"][gate]["componentRef"]["name"]]["dag"]["tasks"].values()]
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in all_tasks)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "isOptional" not in params["input_uris"] and params["epochs"]["defaultValue"] == 10
    assert {"dataset", "split", "split_mode", "min_count", "buckets", "epochs", "dnn_sparsity", "field_sparsity",
            "embedding_sparsity", "prune_mode", "model_name", "promote_model", "promote_tolerance",
            "latency_slo_us"} <= set(params)


def test_compile_with_an_image_rewrites_every_step(tmp_path):
    out = pipeline_cli.compile_pipeline(tmp_path / "p.yaml", image="registry.example.com/ml/deeplight:1.2.3")
    spec = yaml.safe_load(out.read_text())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.example.com/ml/deeplight:1.2.3"}


# --- submit, against a local STUB of the KFP API ---------------------------------------------------------

class StubKfpApi(BaseHTTPRequestHandler):
    """A STUB of the KFP v2beta1 REST API (not Kubeflow): records each request, answers with canned JSON. It
    knows runs, experiments, pipeline uploads (multipart bodies are kept as text), pipeline versions and
    recurring runs; `pipelines` holds the pipelines it has "stored" (name -> id)."""

    requests: list[dict] = []
    pipelines: dict[str, str] = {}

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        multipart = (self.headers.get("Content-Type") or "").startswith("multipart/")
        body = raw.decode(errors="replace") if multipart else json.loads(raw) if raw else None
        url = urlsplit(self.path)
        req = {"method": self.command, "path": url.path, "query": {k: v[0] for k, v in parse_qs(url.query).items()},
               "body": body, "auth": self.headers.get("Authorization")}
        self.requests.append(req)
        return req

    def do_GET(self):  # noqa: N802
        req = self._record()
        if req["path"].startswith("/apis/v2beta1/healthz"):
            return self._reply(200, {"multi_user": False})
        if req["path"].startswith("/apis/v2beta1/experiments"):
            return self._reply(200, {"experiments": [], "total_size": 0})
        if req["path"].startswith("/apis/v2beta1/pipelines/") and req["path"].endswith("/versions"):
            pipeline_id = req["path"].split("/")[-2]
            return self._reply(200, {"pipeline_versions": [{"pipeline_id": pipeline_id, "pipeline_version_id":
                                                            f"{pipeline_id}-v1"}], "total_size": 1})
        if req["path"] == "/apis/v2beta1/pipelines":
            name = json.loads(req["query"]["filter"])["predicates"][0]["stringValue"]
            found = [{"pipeline_id": self.pipelines[name], "display_name": name}] if name in self.pipelines else []
            return self._reply(200, {"pipelines": found, "total_size": len(found)} if found else {})
        self._reply(404, {"error": "not in the stub"})

    def do_POST(self):  # noqa: N802
        req = self._record()
        if req["path"] == "/apis/v2beta1/experiments":
            return self._reply(200, {"experiment_id": "exp-123", "display_name": req["body"]["display_name"]})
        if req["path"] == "/apis/v2beta1/runs":
            return self._reply(200, {"run_id": "run-456", "display_name": req["body"]["display_name"],
                                     "experiment_id": req["body"]["experiment_id"], "state": "PENDING"})
        if req["path"] == "/apis/v2beta1/pipelines/upload":
            self.pipelines[req["query"]["name"]] = f"pipe-{len(self.pipelines) + 1}"
            return self._reply(200, {"pipeline_id": self.pipelines[req["query"]["name"]],
                                     "display_name": req["query"]["name"]})
        if req["path"] == "/apis/v2beta1/pipelines/upload_version":
            return self._reply(200, {"pipeline_id": req["query"]["pipelineid"], "pipeline_version_id": "ver-2",
                                     "display_name": req["query"]["name"]})
        if req["path"] == "/apis/v2beta1/recurringruns":
            return self._reply(200, {"recurring_run_id": "rr-789", "display_name": req["body"]["display_name"],
                                     "status": "ENABLED"})
        self._reply(404, {"error": "not in the stub"})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_stub():
    StubKfpApi.requests = []
    StubKfpApi.pipelines = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubKfpApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", StubKfpApi.requests
    server.shutdown()
    server.server_close()


def test_submit_uploads_the_pipeline_and_starts_a_run_with_the_parameters(kfp_stub, monkeypatch, capsys):
    host, requests = kfp_stub
    monkeypatch.setenv("KFP_TOKEN", "token-abc")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    code = cli_main(["pipeline", "submit", "--host", host, "--input", "s3://bucket/criteo/day_0.gz",
                     "s3://bucket/criteo/day_1.gz", "--epochs", "4", "--dnn", "0.8", "--buckets", "100000",
                     "--promote", "--run-name", "nightly", "--experiment", "ctr",
                     "--image", "registry.example.com/deeplight:abc"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Run details: " in out  # kfp.Client's own links, then the JSON result
    result = json.loads(out[out.index("{"):])
    assert result["run_id"] == "run-456" and result["run_url"] == f"{host}/#/runs/details/run-456"
    created = [r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/experiments"]
    assert [r["body"]["display_name"] for r in created] == ["ctr"]
    run = next(r for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs")
    body = run["body"]
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-123"
    assert body["runtime_config"]["parameters"] == {
        "input_uris": ["s3://bucket/criteo/day_0.gz", "s3://bucket/criteo/day_1.gz"], "epochs": 4,
        "dnn_sparsity": 0.8, "buckets": 100000, "promote_model": True, "run_name": "nightly"}
    spec = body["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "deeplight"
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {
        "registry.example.com/deeplight:abc"}
    assert all(r["auth"] == "Bearer token-abc" for r in requests)  # the token from the env, on every call
    assert SECRET not in json.dumps(requests)  # S3 credentials stay in the cluster's secrets


def test_submit_sends_the_committed_package_as_is(kfp_stub):
    host, requests = kfp_stub
    pipeline_cli.submit(host, {"input_uris": ["s3://b/k"]}, package=COMMITTED_YAML)
    run = next(r for r in requests if r["path"] == "/apis/v2beta1/runs")
    sent = run["body"]["pipeline_spec"]
    assert '"enableCache": true' not in json.dumps(sent)  # submit turns caching off for the whole run
    assert _without_caching_options(sent) == _without_caching_options(yaml.safe_load(COMMITTED_YAML.read_text()))


def _without_caching_options(node):
    if isinstance(node, dict):
        return {k: _without_caching_options(v) for k, v in node.items() if k != "cachingOptions"}
    if isinstance(node, list):
        return [_without_caching_options(v) for v in node]
    return node


def test_submit_rejects_bad_settings_before_contacting_the_server(kfp_stub):
    host, requests = kfp_stub
    with pytest.raises(DeeplightError, match="--input"):
        pipeline_cli.submit(host, {})
    assert cli_main(["pipeline", "submit", "--host", host, "--input", "s3://b/k", "--dnn", "1.5"]) == 2
    assert cli_main(["pipeline", "submit", "--host", host, "--input", "s3://b/k", "--set", "model.nope=1"]) == 2
    assert requests == []


def test_submit_to_an_unreachable_host_is_a_clear_error():
    with pytest.raises(DeeplightError, match=r"submit to http://127\.0\.0\.1:9"):
        pipeline_cli.submit("http://127.0.0.1:9", {"input_uris": ["s3://b/k"]}, package=COMMITTED_YAML)


# --- cluster: pod resources, GPUs, caching (compiled in; issue 19, item 6) -------------------------------

def _pods(spec: dict) -> dict[str, dict]:
    """Each executor's resources by step: exec-hash-features -> hash_features, exec-evaluate-2 -> evaluate."""
    out: dict[str, dict] = {}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        step = re.sub(r"-\d+$", "", name.removeprefix("exec-")).replace("-", "_")
        assert out.get(step, executor["container"].get("resources")) == executor["container"].get("resources")
        out[step] = executor["container"].get("resources")
    return out


def _asked(resources: dict) -> tuple:
    return tuple(resources[k] for k in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest",
                                        "resourceMemoryLimit"))


@pytest.mark.parametrize("which", ["deeplight", "sweep"])
def test_every_pod_asks_for_the_cluster_settings_and_no_gpu_by_default(which, tmp_path):
    from components.resources import CACHING
    from deeplight.base.config import Config

    committed = {"deeplight": COMMITTED_YAML, "sweep": REPO / "pipelines" / "sweep_pipeline.yaml"}[which]
    pods = _pods(yaml.safe_load(committed.read_text()))
    steps = {"start_run", "ingest", "hash_features", "train", "evaluate", "register", "finish_run"} | (
        {"prune", "promote"} if which == "deeplight" else {"sweep_init", "sweep_worker", "sweep_select"})
    assert set(pods) == steps
    cluster = Config().cluster
    for step, resources in pods.items():
        assert _asked(resources) == getattr(cluster, step), step
        assert "accelerator" not in resources
        assert CACHING[step][0] is False and CACHING[step][1]  # a decision, with its reason
    # the steps that time latency are in the Guaranteed QoS class: request == limit
    for step in {"evaluate", "sweep_worker", "sweep_select"} & steps:
        cpu_request, cpu_limit, memory_request, memory_limit = getattr(cluster, step)
        assert (cpu_request, memory_request) == (cpu_limit, memory_limit)


def test_compile_with_cluster_settings_and_gpus(tmp_path, capsys):
    code = cli_main(["pipeline", "compile", "--pipeline", "sweep", "--out", str(tmp_path / "s.yaml"), "--gpus", "2",
                     "--set", 'cluster.train=["6","8","12Gi","24Gi"]', "--set", "cluster.gpu_type=nvidia.com/mig-1g"])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "s.yaml")
    pods = _pods(yaml.safe_load((tmp_path / "s.yaml").read_text()))
    assert _asked(pods["train"]) == ("6", "8", "12Gi", "24Gi")
    gpus = {step: r["accelerator"] for step, r in pods.items() if "accelerator" in r}
    assert set(gpus) == {"train", "sweep_worker"}
    assert all(g["resourceCount"] == "2" and g["resourceType"] == "nvidia.com/mig-1g" for g in gpus.values())
    from deeplight.base.config import Config

    out = pipeline_cli.compile_pipeline(tmp_path / "p.yaml", cluster=Config().replace(
        **{"cluster.gpus": 1}).cluster)
    assert {s for s, r in _pods(yaml.safe_load(out.read_text())).items() if "accelerator" in r} == {"train", "prune"}


def test_bad_cluster_settings_fail_when_compiling(tmp_path):
    assert cli_main(["pipeline", "compile", "--out", str(tmp_path / "a.yaml"), "--set",
                     'cluster.train=["2","4","8Gi"]']) == 2
    assert cli_main(["pipeline", "compile", "--out", str(tmp_path / "b.yaml"), "--set",
                     'cluster.ingest=["2","4","4Gii","8Gi"]']) == 2
    assert cli_main(["pipeline", "compile", "--out", str(tmp_path / "c.yaml"), "--set", "train.epochs=3"]) == 2
    assert not list(tmp_path.iterdir())


def test_submit_the_sweep_pipeline(kfp_stub):
    host, requests = kfp_stub
    code = cli_main(["pipeline", "submit", "--pipeline", "sweep", "--host", host, "--input", "s3://b/day_0.gz",
                     "--epochs", "3", "--n-trials", "12", "--workers", "4", "--sampler", "nsga2",
                     "--set", "sweep.dnn=[0.5,0.95]", "--set", 'sweep.modes=["structured"]', "--device", "cpu"])
    assert code == 0
    body = next(r for r in requests if r["path"] == "/apis/v2beta1/runs")["body"]
    assert body["pipeline_spec"]["pipelineInfo"]["name"] == "deeplight-sweep"
    params = body["runtime_config"]["parameters"]
    assert {k: v for k, v in params.items() if k != "config_overrides"} == {
        "input_uris": ["s3://b/day_0.gz"], "epochs": 3, "n_trials": 12, "workers": 4, "sampler": "nsga2",
        "dnn_range": "0.5:0.95", "modes": "structured"}
    assert json.loads(params["config_overrides"]) == {"train.device": "cpu", "sweep.dnn": [0.5, 0.95],
                                                      "sweep.modes": ["structured"]}


def test_sweep_submission_rejects_what_the_sweep_pipeline_does_not_take(kfp_stub):
    host, requests = kfp_stub
    base = ["pipeline", "submit", "--pipeline", "sweep", "--host", host, "--input", "s3://b/k"]
    assert cli_main(base + ["--dnn", "0.8"]) == 2  # a target: the sweep searches it (--set sweep.dnn=...)
    assert cli_main(base + ["--storage", "postgresql://optuna:s3cret@db:5432/optuna"]) == 2
    assert cli_main(base + ["--set", "sweep.dnn=[0.9,0.1]"]) == 2
    assert cli_main(base + ["--workers", "0"]) == 2
    assert requests == []


def test_gpus_ask_for_accelerators_and_train_on_cuda(kfp_stub):
    host, requests = kfp_stub
    assert cli_main(["pipeline", "submit", "--host", host, "--input", "s3://b/k", "--gpus", "1"]) == 0
    body = next(r for r in requests if r["path"] == "/apis/v2beta1/runs")["body"]
    assert json.loads(body["runtime_config"]["parameters"]["config_overrides"]) == {"train.device": "cuda"}
    gpus = {s for s, r in _pods(body["pipeline_spec"]).items() if "accelerator" in r}
    assert gpus == {"train", "prune"}
    StubKfpApi.requests.clear()
    assert cli_main(["pipeline", "submit", "--host", host, "--input", "s3://b/k", "--gpus", "1", "--device",
                     "auto"]) == 0
    body = next(r for r in requests if r["path"] == "/apis/v2beta1/runs")["body"]
    assert json.loads(body["runtime_config"]["parameters"]["config_overrides"]) == {"train.device": "auto"}


def test_schedule_uploads_a_pipeline_version_and_creates_a_recurring_run(kfp_stub, monkeypatch, capsys):
    host, requests = kfp_stub
    monkeypatch.setenv("KFP_TOKEN", "token-abc")
    args = ["pipeline", "schedule", "--host", host, "--cron", "0 2 * * *", "--input", "s3://b/latest.gz",
            "--epochs", "4", "--name", "nightly", "--experiment", "ctr"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])
    assert result["recurring_run_id"] == "rr-789" and result["cron"] == "0 0 2 * * *"
    assert result["pipeline_id"] == "pipe-1" and result["pipeline_version_id"] == "pipe-1-v1"  # first upload
    upload = next(r for r in requests if r["path"] == "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == "deeplight" and "pipelineInfo" in upload["body"]  # the compiled package
    job = next(r for r in requests if r["path"] == "/apis/v2beta1/recurringruns")["body"]
    assert job["display_name"] == "nightly" and job["mode"] == "ENABLE" and int(job["max_concurrency"]) == 1
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *" and job["no_catchup"] is True
    assert job["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "pipe-1-v1"}
    assert "pipeline_spec" not in job or job["pipeline_spec"] is None
    assert job["runtime_config"]["parameters"] == {"input_uris": ["s3://b/latest.gz"], "epochs": 4}
    assert job["experiment_id"] == "exp-123"
    assert all(r["auth"] == "Bearer token-abc" for r in requests)
    # again: the pipeline exists, so the package becomes a new version of it
    requests.clear()
    assert cli_main(args[:4] + ["--pipeline", "sweep"] + args[4:]) == 0
    assert cli_main(args) == 0
    versions = [r for r in requests if r["path"] == "/apis/v2beta1/pipelines/upload_version"]
    assert [r["query"]["pipelineid"] for r in versions] == ["pipe-1"]  # the sweep was a new pipeline
    assert [r["query"]["name"] for r in requests if r["path"] == "/apis/v2beta1/pipelines/upload"] == [
        "deeplight-sweep"]
    job = [r for r in requests if r["path"] == "/apis/v2beta1/recurringruns"][-1]["body"]
    assert job["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-2"}


def test_schedule_checks_its_settings_before_contacting_the_server(kfp_stub):
    host, requests = kfp_stub
    base = ["pipeline", "schedule", "--host", host, "--input", "s3://b/k"]
    assert cli_main(base + ["--cron", "every night"]) == 2
    assert cli_main(base + ["--cron", "0 2 * * *", "--max-concurrency", "0"]) == 2
    assert cli_main(base + ["--cron", "0 2 * * *", "--dnn", "1.5"]) == 2
    assert cli_main(["pipeline", "schedule", "--host", host, "--cron", "0 2 * * *"]) == 2  # no --input
    assert cli_main(base + ["--cron", "0 2 * * *", "--package", str(COMMITTED_YAML), "--gpus", "1"]) == 2
    assert requests == []
    assert pipeline_cli.cron_expression("*/30 * * * *") == "0 */30 * * * *"
    assert pipeline_cli.cron_expression("0 0 2 * * *") == "0 0 2 * * *"


def test_sweep_settings_need_the_sweep_pipeline(kfp_stub):
    host, requests = kfp_stub
    assert cli_main(["pipeline", "submit", "--host", host, "--input", "s3://b/k", "--n-trials", "5"]) == 2
    assert requests == []
