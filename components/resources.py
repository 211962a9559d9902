"""How each step's pod runs on a cluster: CPU and memory requests and limits, GPUs, caching. One place, applied
by both pipelines to every task when they are compiled (`cluster_ready`).

Resources come from the Config section `cluster` (deeplight/base/config.py: one (cpu request, cpu limit, memory
request, memory limit) per step, `gpus`, `gpu_type`) and are compiled into the pipeline spec as constants:
`deeplight pipeline compile | submit | schedule --set cluster.train='["8","8","16Gi","16Gi"]' --gpus 1`.
Not pipeline parameters, although KFP 2.17's SDK accepts them: the sizes belong to the cluster the pipeline is
deployed on rather than to one run; constants are validated when compiling (a typo such as `4Gii` fails then,
not when a pod is created hours into a run); the compiled YAML shows what every pod asks for (a test checks
it); and a parameter in a resource field needs a KFP backend recent enough to resolve it.

Caching is off for every step (`CACHING` says why, per step). KFP's cache key is the component and its input
values, so a cached step can only be reused when none of them changed, and in these pipelines that never
happens usefully: start_run opens the run's MLflow parent run, and every later step but finish_run takes its
id, `parent_run_id`, new in each run (each logs its child run to it: a cached step would leave that parent
without the step's run, metrics and registered version); `ingest` keys on URIs, not on the data behind them (a
recurring run reading the same s3:// key every night would silently reuse the first night's splits); and the
later steps consume artifacts that are new whenever ingest ran. Caching would need a content-keyed ingest
(object versions or ETags as inputs) and the MLflow records moved out of the cached steps.
"""

from __future__ import annotations

from typing import Any

from deeplight.base.config import ClusterConfig
from deeplight.base.errors import DeeplightError

# Steps that train with torch: they get the accelerators when cluster.gpus > 0 (train.device auto/cuda uses them).
GPU_STEPS = ("train", "prune", "sweep_worker")

# Every step's caching decision (False: off) and why.
CACHING: dict[str, tuple[bool, str]] = {
    "start_run": (False, "opens this run's MLflow parent run and returns its id"),
    "ingest": (False, "its input is URIs, not data: the same s3:// key may hold new rows; logs a child run"),
    "hash_features": (False, "pure given the ingested splits and config, but logs a child run to this run's "
                             "parent (parent_run_id is an input, new in every run: a cache hit is impossible)"),
    "train": (False, "deterministic with train.seed on the CPU, but logs its child run and learning curve"),
    "prune": (False, "as train"),
    "evaluate": (False, "measures latency on the node it runs on (a measurement, not a function of inputs)"),
    "register": (False, "creates a registered model version and moves the challenger alias"),
    "promote": (False, "moves the champion alias"),
    "finish_run": (False, "closes the parent run FINISHED or FAILED"),
    "plan_inputs": (False, "lists prefixes and counts rows: its inputs are URIs, not data (as ingest)"),
    "ingest_file": (False, "as ingest, for one file"),
    "merge_counts": (False, "logs the ingest child run to this run's parent"),
    "apply_features": (False, "consumes artifacts new whenever ingest_file ran"),
    "gather_hashed": (False, "as hash_features"),
    "sweep_init": (False, "creates or joins the Optuna study and its MLflow run"),
    "sweep_worker": (False, "runs trials in the shared Optuna study"),
    "sweep_select": (False, "measures latency and writes the chosen trial to MLflow"),
}


# The per-file data steps (pipelines/fanout_pipeline.py) get the pods of the step whose work they share out.
SIZED_LIKE = {"plan_inputs": "ingest", "ingest_file": "ingest", "merge_counts": "hash_features",
              "apply_features": "hash_features", "gather_hashed": "hash_features"}


def step_of(task: Any) -> str:
    """The step a task runs: its component's name (`hash-features` -> `hash_features`)."""
    return task.component_spec.name.replace("-", "_")


def cluster_ready(tasks: list[Any], cluster: ClusterConfig) -> None:
    """Set each task's CPU/memory requests and limits from `cluster`, GPUs on the training steps when asked,
    and its caching option from CACHING."""
    for task in tasks:
        name = step_of(task)
        sized = SIZED_LIKE.get(name, name)
        pod = getattr(cluster, sized)
        if len(pod) != 4:
            raise DeeplightError(f"cluster.{sized}={list(pod)}: want [CPU request, CPU limit, memory request, "
                                 "memory limit], e.g. [\"2\", \"4\", \"4Gi\", \"8Gi\"]")
        cpu_request, cpu_limit, memory_request, memory_limit = pod
        try:  # KFP checks the quantities (2, 500m, 4Gi, 512Mi...)
            task.set_cpu_request(cpu_request).set_cpu_limit(cpu_limit)
            task.set_memory_request(memory_request).set_memory_limit(memory_limit)
            if cluster.gpus and name in GPU_STEPS:
                task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(cluster.gpus)
        except ValueError as e:
            raise DeeplightError(f"cluster.{sized}={list(pod)} (gpus {cluster.gpus}): {e}") from None
        task.set_caching_options(CACHING[name][0])
