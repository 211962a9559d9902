"""train/prune as a Kubeflow PyTorchJob (issue 20, item 2): the manifest, its submission, the pipeline option.

- The manifest is rendered with the operator's own SDK models (kubeflow-training) and read back by its
  deserializer; the test checks what the operator needs (container `pytorch`, Master + Workers, no torchrun).
- Submission goes through the SDK's TrainingClient and the real `kubernetes` client to a STUB of the Kubernetes
  API written in this file: a small HTTP server on 127.0.0.1 that records the POSTed PyTorchJob and plays the
  operator's part by running each replica's command as a local process with the env the operator sets (RANK,
  WORLD_SIZE, MASTER_ADDR, MASTER_PORT), the "shared volume" being a temp dir. It is not Kubernetes: it checks the
  requests the clients send and the step's handling of success and of a failed rank.
- The compiled pipeline carries the option (parameter train_workers into train and prune).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

pytest.importorskip("kubeflow.training")

from deeplight.base.config import Config  # noqa: E402
from deeplight.base.errors import DeeplightError  # noqa: E402
from deeplight.ops.pytorchjob import SharedVolume, from_manifest, manifest, pytorchjob  # noqa: E402
from deeplight.steps.distributed import job_command, job_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.com/deeplight:1.2"


# --- the manifest ----------------------------------------------------------------------------------------------

def test_the_manifest_is_a_pytorchjob_the_operator_runs():
    cmd = job_command("train", Config(), "/mnt/d/jobs/x/hashed", "/mnt/d/jobs/x/out")
    job = pytorchjob("deeplight-train-ab12", "team-a", IMAGE, cmd, workers=4, pod=("4", "8", "8Gi", "16Gi"),
                     volume=SharedVolume("deeplight-shared", "/mnt/d"), env={"PYTHONUNBUFFERED": "1"},
                     env_secret="deeplight-env", service_account="pipeline-runner", gpus=1)
    m = manifest(job)
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert m["metadata"] == {"name": "deeplight-train-ab12", "namespace": "team-a", "labels": {}}
    specs = m["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Master": 1, "Worker": 3}  # 4 ranks
    assert m["spec"]["runPolicy"] == {"backoffLimit": 0, "cleanPodPolicy": "Running"}
    for spec in specs.values():
        pod = spec["template"]["spec"]
        assert spec["restartPolicy"] == "Never" and pod["restartPolicy"] == "Never"
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == IMAGE  # the operator injects its env into `pytorch`
        assert c["command"][:2] == ["deeplight", "train"] and "torchrun" not in " ".join(c["command"])
        assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & {e["name"] for e in c["env"]}
        assert c["envFrom"] == [{"secretRef": {"name": "deeplight-env", "optional": True}}]
        assert c["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"},
                                  "limits": {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "1"}}
        assert c["volumeMounts"] == [{"name": "shared", "mountPath": "/mnt/d"}]
        assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "deeplight-shared"}}]
        assert pod["serviceAccountName"] == "pipeline-runner"
    # read back by the operator SDK's own deserializer: the same object
    back = from_manifest(json.loads(json.dumps(m)))
    assert type(back).__name__ == "KubeflowOrgV1PyTorchJob" and manifest(back) == m
    # every setting the checkpoint records travels as --set, JSON values
    sets = dict(a.split("=", 1) for a in (x[len("--set="):] for x in cmd if x.startswith("--set=")))
    assert json.loads(sets["model.dnn"]) == list(Config().model.dnn) and json.loads(sets["train.epochs"]) == 10
    assert set(sets) == set(Config().flat(("data", "features", "model", "train", "prune")))


def test_bad_job_settings_are_clear_errors():
    with pytest.raises(DeeplightError, match="at least 2 workers"):
        pytorchjob("x", "ns", IMAGE, ["deeplight"], workers=1, pod=("1", "1", "1Gi", "1Gi"),
                   volume=SharedVolume("c", "/mnt"))
    with pytest.raises(DeeplightError, match="pod resources want"):
        pytorchjob("x", "ns", IMAGE, ["deeplight"], workers=2, pod=("1", "1Gi"), volume=SharedVolume("c", "/mnt"))
    with pytest.raises(DeeplightError, match="dense checkpoint is missing"):
        job_command("prune", Config(), "/d", "/o")
    assert job_name("train", "Run_1/ABC") == "deeplight-train-run-1-abc"
    assert len(job_name("prune", "x" * 100)) == 63


# --- a stub of the Kubernetes API (and of the operator) ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KubeStub(BaseHTTPRequestHandler):
    """STUB of the Kubernetes API server + Training Operator, on 127.0.0.1, for tests only (not Kubernetes).

    POST .../pytorchjobs records the job and starts one local process per replica (Master 0, Worker 1..), with the
    container's env plus RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT, as the operator would; GET of
    the job reports Created/Running/Succeeded/Failed from the processes; pods are listed with their termination
    state; a pod's log is the process's output; GET of pod `launcher` reports the launching step's image."""

    jobs: dict = {}
    requests: list = []
    extra_env: dict = {}
    kill_when: str = ""  # a file name: the next job's ranks are killed once its --out folder holds it (a node loss)

    def _reply(self, code: int, body) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = urlsplit(self.path).path
        self.requests.append(("POST", path, body))
        m = re.fullmatch(r"/apis/kubeflow.org/v1/namespaces/([^/]+)/pytorchjobs", path)
        if not m:
            return self._reply(404, {"kind": "Status", "message": f"no route {path}"})
        if body["metadata"]["name"] in self.jobs:
            return self._reply(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
        self.jobs[body["metadata"]["name"]] = {"body": body, "pods": self._start(body)}
        if KubeStub.kill_when:
            (c,) = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
            marker = Path(c["command"][c["command"].index("--out") + 1]) / KubeStub.kill_when
            threading.Thread(target=self._kill_when_exists, args=(self.jobs[body["metadata"]["name"]], marker),
                             daemon=True).start()
            KubeStub.kill_when = ""
        self._reply(201, body)

    @staticmethod
    def _kill_when_exists(job: dict, marker: Path) -> None:
        while not marker.exists() and any(p["proc"].poll() is None for p in job["pods"]):
            time.sleep(0.01)
        for p in job["pods"]:
            p["proc"].kill()

    def do_DELETE(self):  # noqa: N802
        path = urlsplit(self.path).path
        self.requests.append(("DELETE", path, None))
        m = re.fullmatch(r"/apis/kubeflow.org/v1/namespaces/([^/]+)/pytorchjobs/([^/]+)", path)
        job = self.jobs.pop(m.group(2), None) if m else None
        if job is None:
            return self._reply(404, {"kind": "Status", "message": "not found", "code": 404})
        for p in job["pods"]:
            if p["proc"].poll() is None:
                p["proc"].kill()
        self._reply(200, {"kind": "Status", "status": "Success"})

    def _start(self, body: dict) -> list[dict]:
        specs = body["spec"]["pytorchReplicaSpecs"]
        world = sum(s["replicas"] for s in specs.values())
        port, pods, rank = _free_port(), [], 0
        for kind in ("Master", "Worker"):
            for index in range(specs.get(kind, {}).get("replicas", 0)):
                (c,) = specs[kind]["template"]["spec"]["containers"]
                env = {**os.environ, **self.extra_env, **{e["name"]: e["value"] for e in c.get("env", [])},
                       "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
                log = Path(env["STUB_LOGS"]) / f"{body['metadata']['name']}-{kind.lower()}-{index}.log"
                proc = subprocess.Popen(c["command"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
                pods.append({"name": f"{body['metadata']['name']}-{kind.lower()}-{index}", "kind": kind,
                             "index": index, "rank": rank, "proc": proc, "log": log})
                rank += 1
        return pods

    def do_GET(self):  # noqa: N802
        url = urlsplit(self.path)
        self.requests.append(("GET", url.path, parse_qs(url.query)))
        if m := re.fullmatch(r"/apis/kubeflow.org/v1/namespaces/([^/]+)/pytorchjobs/([^/]+)", url.path):
            job = self.jobs.get(m.group(2))
            if job is None:
                return self._reply(404, {"kind": "Status", "message": "not found", "code": 404})
            codes = [p["proc"].poll() for p in job["pods"]]
            conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}]
            if any(c not in (None, 0) for c in codes):
                failed = sum(c not in (None, 0) for c in codes)
                conditions.append({"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                                   "message": f"PyTorchJob {m.group(2)} is failed because {failed} replica(s) failed."})
            elif all(c == 0 for c in codes):
                conditions.append({"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
                                   "message": f"PyTorchJob {m.group(2)} is successfully completed."})
            else:
                conditions.append({"type": "Running", "status": "True", "reason": "PyTorchJobRunning"})
            return self._reply(200, {**job["body"], "status": {"conditions": conditions}})
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path):
            selector = parse_qs(url.query).get("labelSelector", [""])[0]
            name = selector.split("=", 1)[1]
            items = []
            for p in self.jobs.get(name, {}).get("pods", []):
                code = p["proc"].poll()
                phase = "Running" if code is None else ("Succeeded" if code == 0 else "Failed")
                state = {"running": {}} if code is None else {"terminated": {
                    "exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
                items.append({"metadata": {"name": p["name"], "labels": {
                    "training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": p["kind"].lower(),
                    "training.kubeflow.org/replica-index": str(p["index"])}},
                    "status": {"phase": phase, "containerStatuses": [{
                        "name": "pytorch", "state": state, "ready": False, "restartCount": 0, "image": IMAGE,
                        "imageID": "", "containerID": ""}]}})
            return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "items": items})
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", url.path):
            pod = next((p for j in self.jobs.values() for p in j["pods"] if p["name"] == m.group(2)), None)
            tail = int(parse_qs(url.query).get("tailLines", ["100"])[0])
            return self._reply(200, "\n".join(pod["log"].read_text().splitlines()[-tail:]) if pod else "")
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/launcher", url.path):
            return self._reply(200, {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "launcher"},
                                     "spec": {"containers": [{"name": "main", "image": IMAGE}]}})
        self._reply(404, {"kind": "Status", "message": f"no route {url.path}"})

    def log_message(self, *args):
        pass


@pytest.fixture()
def kube(tmp_path, monkeypatch):
    KubeStub.jobs, KubeStub.requests, KubeStub.kill_when = {}, [], ""
    server = ThreadingHTTPServer(("127.0.0.1", 0), KubeStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "logs").mkdir()
    monkeypatch.setenv("DEEPLIGHT_KUBE_API", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HOSTNAME", "launcher")
    monkeypatch.setenv("STUB_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DEEPLIGHT_MLRUNS", str(tmp_path / "mlruns"))
    yield KubeStub
    for job in KubeStub.jobs.values():
        for p in job["pods"]:
            if p["proc"].poll() is None:
                p["proc"].kill()
    server.shutdown()


@pytest.fixture(scope="module")
def hashed(tmp_path_factory) -> Path:
    from deeplight.data.hashing import hash_dataset
    from deeplight.data.ingest import ingest
    from deeplight.data.synth import synthesize

    root = tmp_path_factory.mktemp("data")
    synthesize("criteo", rows=1500, seed=0, out=str(root / "raw.txt"))
    ingest("criteo", [str(root / "raw.txt")], str(root / "ingested"))
    hash_dataset(str(root / "ingested"), str(root / "hashed"), min_count=2)
    return root / "hashed"


def _config(shared: Path, **settings) -> str:
    return Config().replace(**{"cluster.shared_dir": str(shared), "cluster.job_namespace": "team-a",
                               "model.dnn": [8], "train.epochs": 1, "train.batch_size": 256, "train.threads": 1,
                               **settings}).to_json()


def test_the_train_step_runs_as_a_pytorchjob_of_two_ranks(kube, hashed, tmp_path):
    from mlflow.tracking import MlflowClient

    from deeplight.steps.distributed import job_step

    shared = tmp_path / "shared"
    shared.mkdir()
    result = job_step("train", str(hashed), _config(shared), str(tmp_path / "dense"), "", workers=2, job_key="t1")
    (post,) = [r for r in kube.requests if r[0] == "POST"]
    assert post[1] == "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs"
    body = post[2]
    assert body["metadata"]["name"] == "deeplight-train-t1"
    assert {k: v["replicas"] for k, v in body["spec"]["pytorchReplicaSpecs"].items()} == {"Master": 1, "Worker": 1}
    (c,) = body["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert c["image"] == IMAGE  # the launching pod's own image, read from the API
    work = shared / "jobs" / "deeplight-train-t1"
    assert c["command"][:7] == ["deeplight", "train", "--data", str(work / "hashed"), "--out", str(work / "out"),
                                "--no-mlflow"]
    assert {p["rank"] for p in kube.jobs["deeplight-train-t1"]["pods"]} == {0, 1}
    assert all(p["proc"].returncode == 0 for p in kube.jobs["deeplight-train-t1"]["pods"])
    # the model came back from the shared volume into the step's output, and the child run was logged
    assert (tmp_path / "dense" / "best.pt").is_file() and result["valid"]["auc"] > 0
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(result["run_id"])
    assert run.data.tags["deeplight.pytorchjob"] == "deeplight-train-t1"
    assert run.data.params["cluster.train_workers"] == "2" and run.data.metrics["valid_auc"] == result["valid"]["auc"]


def test_a_failed_rank_fails_the_step_with_the_pods_reason(kube, hashed, tmp_path, capsys):
    from deeplight.steps.distributed import job_step

    shared = tmp_path / "shared"
    shared.mkdir()
    with pytest.raises(SystemExit) as e:  # a DeeplightError in a step: status 2 and the message
        job_step("train", str(hashed), _config(shared, **{"train.batch_size": 0}), str(tmp_path / "dense"), "",
                 workers=2, job_key="bad")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "PyTorchJob team-a/deeplight-train-bad failed: PyTorchJob deeplight-train-bad is failed because" in err
    # Both ranks fail alike; the job is failed as soon as either has (as the operator does), so either is named.
    assert re.search(r"pod deeplight-train-bad-(master-0 \(Master 0\)|worker-0 \(Worker 0\)): Error exit 2; "
                     r"log: .*deeplight: error: .*batch_size", err), err


def test_a_retried_step_resumes_from_the_failed_attempts_checkpoints(kube, hashed, tmp_path, capsys):
    """Attempt 1: both ranks are killed once the first epoch's checkpoint is written (as when a node is lost), and
    the step fails. Attempt 2 of the same step (same key): the failed job is deleted and created again, and its
    ranks resume from the checkpoint on the shared volume. Attempt 3 finds the job succeeded and takes its model
    without running anything."""
    from deeplight.steps.distributed import job_step

    shared = tmp_path / "shared"
    shared.mkdir()
    cfg = _config(shared, **{"train.epochs": 4, "train.patience": 10})
    kube.kill_when = "last.pt"
    with pytest.raises(SystemExit):
        job_step("train", str(hashed), cfg, str(tmp_path / "dense"), "", workers=2, job_key="retry")
    assert "PyTorchJob team-a/deeplight-train-retry failed" in capsys.readouterr().err
    work = shared / "jobs" / "deeplight-train-retry"
    assert (work / "out" / "last.pt").is_file() and not (work / "out" / "results.json").exists()

    result = job_step("train", str(hashed), cfg, str(tmp_path / "dense"), "", workers=2, job_key="retry")
    out = capsys.readouterr().out
    assert "failed in an earlier attempt; deleting it" in out and "deeplight-train-retry: created" in out
    methods = [r[0] for r in kube.requests if "pytorchjobs" in r[1] and r[0] != "GET"]
    assert methods == ["POST", "DELETE", "POST"]
    master_log = (tmp_path / "logs" / "deeplight-train-retry-master-0.log").read_text()
    assert re.search(r"resuming .*last\.pt: [1-9] epoch\(s\)", master_log), master_log
    assert (tmp_path / "dense" / "best.pt").is_file() and result["valid"]["auc"] > 0
    assert [h["epoch"] for h in result["history"]] == list(range(len(result["history"])))

    again = job_step("train", str(hashed), cfg, str(tmp_path / "dense-again"), "", workers=2, job_key="retry")
    assert "found from an earlier attempt (Succeeded)" in capsys.readouterr().out
    assert [r[0] for r in kube.requests if "pytorchjobs" in r[1] and r[0] != "GET"] == methods  # nothing new
    assert again["valid"] == result["valid"]


def test_no_shared_volume_is_a_clear_error(kube, hashed, tmp_path, capsys):
    from deeplight.steps.distributed import job_step

    with pytest.raises(SystemExit):
        job_step("train", str(hashed), _config(tmp_path / "absent"), str(tmp_path / "dense"), "", workers=2)
    assert "is not mounted in this pod" in capsys.readouterr().err
    assert not [r for r in kube.requests if r[0] == "POST"]


# --- the pipeline option ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deeplight_pipeline", "fanout_pipeline"])
def test_the_compiled_pipelines_carry_the_train_workers_option(name):
    spec = yaml.safe_load((REPO / "pipelines" / f"{name}.yaml").read_text())
    param = spec["root"]["inputDefinitions"]["parameters"]["train_workers"]
    assert param["parameterType"] == "NUMBER_INTEGER" and param["defaultValue"] == 1
    tasks = spec["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    dag = spec["components"][tasks]["dag"]["tasks"]
    for step in ("train", "prune"):
        assert dag[step]["inputs"]["parameters"]["workers"] == {"componentInputParameter": "pipelinechannel--train_workers"}
    source = json.dumps(spec["deploymentSpec"]["executors"])
    assert "deeplight.steps.distributed import job_step" in source
