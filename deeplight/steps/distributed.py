"""The train and prune steps on N pods: a Kubeflow PyTorchJob launched (and waited for) by the step's own pod.

When the pipeline's `train_workers` > 1 the `train` / `prune` components call `job_step` instead of
`train_step` / `prune_step` (deeplight.steps.pipeline): it copies the hashed data (and the dense checkpoint) to the
shared volume (Config cluster.shared_claim mounted at cluster.shared_dir in this pod and in every rank's pod),
creates a PyTorchJob of `workers` pods on `image` (deeplight.ops.pytorchjob) running

    deeplight train --data SHARED/hashed --out SHARED/out --no-mlflow --set model.dnn=[400,400,400] ...

(every data/features/model/train/prune setting of the run's Config as --set, so each rank trains exactly what the
one-pod step would; no torchrun: the operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK in each pod),
waits for it, copies SHARED/out into the step's output artifact and logs the step's MLflow child run (params,
metrics, checkpoint) under the pipeline's parent run, as the one-pod step does. A failed rank fails the step with
the job's message and each failed pod's reason and last log lines.

A retried step resumes. The job's name (and its folder on the shared volume) is keyed by the pipeline run's
MLflow parent run, the step and its settings, so a second attempt of the same step in the same pipeline run finds
the first attempt's job: running, it follows it; succeeded, it takes its model; failed, it deletes the job and
creates it again, and the ranks resume from the checkpoints in the folder (deeplight.ops.pytorchjob.run_job).
A new pipeline run (a new parent run) trains anew. Without a parent run (tracking off) each call makes a new
job; `job_key` sets the key.

    from deeplight.steps.distributed import job_step
    job_step("train", "out/hashed", cfg_json, "out/dense", parent, workers=4, image="REGISTRY/deeplight:TAG")
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from deeplight.base.config import MODEL_SECTIONS, Config
from deeplight.base.errors import DeeplightError
from deeplight.steps.pipeline import _config, _tracker, prune_label, step

KINDS = ("train", "prune")
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def job_command(kind: str, cfg: Config, data_dir: str, out_dir: str, dense: str | None = None) -> list[str]:
    """The command each rank runs: `deeplight train|prune` with every setting the checkpoint records.

    >>> job_command("train", Config(), "/mnt/d/hashed", "/mnt/d/out")[:7]
    ['deeplight', 'train', '--data', '/mnt/d/hashed', '--out', '/mnt/d/out', '--no-mlflow']
    """
    if kind not in KINDS:
        raise DeeplightError(f"PyTorchJob: step {kind!r} is not one of {', '.join(KINDS)}")
    command = ["deeplight", kind, "--data", data_dir, "--out", out_dir, "--no-mlflow"]
    if kind == "prune":
        if not dense:
            raise DeeplightError("PyTorchJob prune: the dense checkpoint is missing")
        command += ["--dense", dense]
    return command + [f"--set={k}={json.dumps(v)}" for k, v in cfg.flat(MODEL_SECTIONS).items()]


def job_namespace(cfg: Config) -> str:
    """cluster.job_namespace, else the namespace this pod runs in, else `default`."""
    if cfg.cluster.job_namespace:
        return cfg.cluster.job_namespace
    return _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.is_file() else "default"


def job_name(kind: str, key: str) -> str:
    """A Kubernetes name (lowercase, digits, '-', at most 63 characters) for the step's job."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"deeplight-{kind}-{key}".lower()).strip("-")
    return name[:63].rstrip("-")


def attempt_key(kind: str, cfg: Config, parent_run_id: str) -> str:
    """The same for every attempt of one step in one pipeline run (its MLflow parent run, the step, its
    settings); random without a parent run.

    >>> attempt_key("train", Config(), "abc") == attempt_key("train", Config(), "abc") != attempt_key("prune",
    ...     Config(), "abc")
    True
    """
    if not parent_run_id:
        return uuid.uuid4().hex[:8]
    settings = json.dumps(cfg.flat(MODEL_SECTIONS), sort_keys=True, default=str)
    return hashlib.sha256(f"{parent_run_id}\0{kind}\0{settings}".encode()).hexdigest()[:12]


def _copy_whole(src: Path, dst: Path, copy: Any) -> None:
    """Copy under a temporary name, then rename: an attempt killed mid-copy leaves no partial `dst` behind."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.partial")
    copy(src, tmp)
    tmp.rename(dst)


def job_step(kind: str, hashed_dir: str, config_json: str, out_dir: str, parent_run_id: str, workers: int,
             image: str = "", dense_dir: str | None = None, job_key: str = "") -> dict[str, Any]:
    """Run step `kind` (train | prune) as a PyTorchJob of `workers` pods of `image` (default: this pod's own
    image); returns its results.json (+ run_id)."""
    from deeplight.base.files import read_json
    from deeplight.ops.pytorchjob import SharedVolume, own_image, pytorchjob, run_job

    with step(kind, parent_run_id):
        cfg = _config(config_json)
        if kind not in KINDS:
            raise DeeplightError(f"PyTorchJob: step {kind!r} is not one of {', '.join(KINDS)}")
        c = cfg.cluster
        namespace = job_namespace(cfg)
        image = image or own_image(namespace, default="")
        if not image:
            raise DeeplightError("PyTorchJob: no image for the ranks (this step does not run in a pod of namespace "
                                 f"{namespace!r}; give one)")
        key = job_key or attempt_key(kind, cfg, parent_run_id)
        root = Path(c.shared_dir)
        if not root.is_dir():
            raise DeeplightError(f"{root}: the shared volume (cluster.shared_claim {c.shared_claim!r}) is not "
                                 "mounted in this pod; the ranks read the data and write the model through it")
        work = root / "jobs" / job_name(kind, key)
        data, out = work / "hashed", work / "out"
        if not data.is_dir():  # a retried step finds the data (and the ranks their checkpoints) there already
            _copy_whole(Path(hashed_dir), data, shutil.copytree)
        dense = None
        if kind == "prune":
            dense = work / "dense" / "best.pt"
            if not dense.is_file():  # an earlier attempt's ranks may still be reading it
                dense.parent.mkdir(parents=True, exist_ok=True)
                _copy_whole(Path(dense_dir or "") / "best.pt", dense, shutil.copyfile)
        job = pytorchjob(job_name(kind, key), namespace, image,
                         job_command(kind, cfg, str(data), str(out), str(dense) if dense else None), workers,
                         pod=tuple(getattr(c, kind)), volume=SharedVolume(c.shared_claim, c.shared_dir),
                         env={"PYTHONUNBUFFERED": "1"}, env_secret=c.job_env_secret,
                         service_account=c.job_service_account, gpus=c.gpus, gpu_type=c.gpu_type,
                         labels={"app.kubernetes.io/name": "deeplight", "deeplight.step": kind})
        run_job(job, timeout_s=c.job_timeout_s)
        if not (out / "results.json").is_file():
            raise DeeplightError(f"PyTorchJob {job.metadata.name} succeeded but wrote no {out / 'results.json'}")
        shutil.copytree(out, out_dir, dirs_exist_ok=True)
        results = read_json(Path(out_dir) / "results.json")
        results["run_id"] = _log_child_run(kind, cfg, results, out_dir, hashed_dir, parent_run_id, workers,
                                           job.metadata.name)
        return results


def _log_child_run(kind: str, cfg: Config, results: dict, out_dir: str, hashed_dir: str, parent_run_id: str,
                   workers: int, name: str) -> str:
    """The step's MLflow child run, as the one-pod step logs it: settings, final metrics, checkpoint."""
    from deeplight.ops.tracking import run_label

    label = run_label(kind, cfg.data.dataset, cfg.model.kind, *((prune_label(cfg),) if kind == "prune" else ()))
    variant = "dense" if kind == "train" else "pruned"
    with _tracker(parent_run_id, kind, variant, name=label, data_dir=hashed_dir).run(label) as log:
        log.log_params({**cfg.flat(MODEL_SECTIONS), "cluster.train_workers": workers})
        log.set_tags({"deeplight.pytorchjob": name})
        log.log_metrics({f"{split}_{k}": float(v) for split in ("valid", "test")
                         for k, v in (results.get(split) or {}).items() if isinstance(v, (int, float))})
        for artifact in ("best.pt", "results.json", "learning_curve.png"):
            if (Path(out_dir) / artifact).is_file():
                log.log_artifact(Path(out_dir) / artifact)
        return log.run_id
