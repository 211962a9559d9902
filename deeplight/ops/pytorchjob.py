"""A Kubeflow Training Operator `PyTorchJob`: render it with the operator's own SDK models (`kubeflow-training`),
create it with its TrainingClient (the `kubernetes` client underneath), wait for it, and say why it failed.

The train and prune steps run as one when the pipeline's `train_workers` > 1 (deeplight.steps.distributed). The
job has one Master and workers - 1 Worker replicas of the project image, each running `deeplight train|prune`
itself, without torchrun: the operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK in every pod (Master
RANK 0), which is what torch.distributed's env:// rendezvous (and torchrun) provide, one process per pod.

    job = pytorchjob("train-ab12", "kubeflow", "REGISTRY/deeplight:TAG", ["deeplight", "train", ...], workers=4,
                     pod=("4", "8", "8Gi", "16Gi"), volume=SharedVolume("deeplight-shared", "/mnt/deeplight"))
    manifest(job)                   # the dict POSTed to /apis/kubeflow.org/v1/namespaces/kubeflow/pytorchjobs
    run_job(job, api=None)          # create, poll until Succeeded; Failed -> DeeplightError naming pod and reason

The Kubernetes API: in a pod, its service account (in-cluster config); elsewhere ~/.kube/config; or the URL in
DEEPLIGHT_KUBE_API (tests point it at a local stub on 127.0.0.1).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from deeplight.base.errors import DeeplightError

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the training container by this name (and adds the rendezvous env)
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


@dataclass(frozen=True)
class SharedVolume:
    """A ReadWriteMany PersistentVolumeClaim mounted at `mount_path` in the launching step and in every job pod:
    the hashed data goes in, the checkpoints come out through it."""

    claim: str
    mount_path: str


def pytorchjob(name: str, namespace: str, image: str, command: list[str], workers: int,
               pod: tuple[str, str, str, str], volume: SharedVolume, env: dict[str, str] | None = None,
               env_secret: str = "", service_account: str = "", gpus: int = 0, gpu_type: str = "nvidia.com/gpu",
               labels: dict[str, str] | None = None) -> Any:
    """A KubeflowOrgV1PyTorchJob: 1 Master + (workers - 1) Workers of `image` running `command`, each with `pod`
    (CPU request, CPU limit, memory request, memory limit) and `gpus`, the shared volume, `env` and, optionally,
    every key of the Secret `env_secret` as environment (MLflow and S3 credentials stay out of the manifest).
    Pods are not restarted (restartPolicy Never, backoffLimit 0): a failed rank fails the job at once and
    `run_job` reports why; running the step again resumes from the last checkpoint on the shared volume."""
    from kubeflow.training import models
    from kubernetes import client as k8s

    if workers < 2:
        raise DeeplightError(f"PyTorchJob: want at least 2 workers (1 runs in the step's own pod), got {workers}")
    if len(pod) != 4:
        raise DeeplightError(f"PyTorchJob: pod resources want [CPU request, CPU limit, memory request, memory limit], "
                             f"got {list(pod)}")
    limits = {"cpu": pod[1], "memory": pod[3], **({gpu_type: str(gpus)} if gpus else {})}
    container = k8s.V1Container(
        name=CONTAINER, image=image, command=list(command),
        env=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted((env or {}).items())],
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=env_secret, optional=True))]
        if env_secret else None,
        resources=k8s.V1ResourceRequirements(requests={"cpu": pod[0], "memory": pod[2]}, limits=limits),
        volume_mounts=[k8s.V1VolumeMount(name="shared", mount_path=volume.mount_path)])
    template = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=dict(labels or {})),
        spec=k8s.V1PodSpec(containers=[container], restart_policy="Never",
                           service_account_name=service_account or None,
                           volumes=[k8s.V1Volume(name="shared", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                               claim_name=volume.claim))]))
    replicas = {"Master": models.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="Never", template=template),
                "Worker": models.KubeflowOrgV1ReplicaSpec(replicas=workers - 1, restart_policy="Never",
                                                          template=template)}
    return models.KubeflowOrgV1PyTorchJob(
        api_version=f"{GROUP}/{VERSION}", kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels or {})),
        spec=models.KubeflowOrgV1PyTorchJobSpec(
            pytorch_replica_specs=replicas,
            run_policy=models.KubeflowOrgV1RunPolicy(backoff_limit=0, clean_pod_policy="Running")))


def manifest(job: Any) -> dict:
    """The job as the JSON the Kubernetes API receives (camelCase keys, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(job)


def from_manifest(body: dict) -> Any:
    """A manifest read back into the SDK's KubeflowOrgV1PyTorchJob (what the TrainingClient's get_job returns)."""
    import json

    from kubeflow.training import ApiClient

    class _Response:
        data = json.dumps(body)

    return ApiClient().deserialize(_Response(), "KubeflowOrgV1PyTorchJob")


def training_client(namespace: str) -> Any:
    """The operator SDK's TrainingClient: DEEPLIGHT_KUBE_API (a URL) when set, else in-cluster or kube-config."""
    from kubeflow.training import TrainingClient
    from kubernetes import client as k8s

    url = os.environ.get("DEEPLIGHT_KUBE_API")
    configuration = None
    if url:
        configuration = k8s.Configuration(host=url.rstrip("/"))
        token = os.environ.get("DEEPLIGHT_KUBE_TOKEN")
        if token:
            configuration.api_key = {"authorization": f"Bearer {token}"}
    try:
        return TrainingClient(client_configuration=configuration, namespace=namespace, job_kind=KIND)
    except Exception as e:  # no kube-config and not in a pod
        raise DeeplightError(f"PyTorchJob: no Kubernetes API ({type(e).__name__}: {e}); run in the cluster or set "
                             "DEEPLIGHT_KUBE_API") from None


def own_image(namespace: str, default: str) -> str:
    """The image of the pod this code runs in (its `main` container, as KFP names it, else its first): the ranks
    run the very image of the step that launches them. `default` outside a pod (HOSTNAME is no pod of
    `namespace`)."""
    tc = training_client(namespace)
    try:
        pod = tc.core_api.read_namespaced_pod(os.environ.get("HOSTNAME", ""), namespace)
    except Exception:
        return default
    containers = pod.spec.containers or []
    main = next((c for c in containers if c.name == "main"), containers[0] if containers else None)
    return main.image if main is not None and main.image else default


def run_job(job: Any, timeout_s: float = 24 * 3600, poll_s: float = 10.0, log: Callable[[str], None] = print) -> dict:
    """Create `job`, wait until its Succeeded condition (returns the last status as a dict); Failed, or no end
    within `timeout_s`: DeeplightError with the job's message and each failed pod's reason (its container's
    termination reason, exit code, message, and the last lines of its log).

    A job of the same name from an earlier attempt (a retried step): still running, it is waited for; succeeded,
    its result is taken; failed, it is deleted and created again, and its ranks resume from the checkpoints they
    left on the shared volume."""
    name, namespace = job.metadata.name, job.metadata.namespace
    tc = training_client(namespace)
    earlier = job_state(tc, name, namespace)
    if earlier == "Failed":
        log(f"PyTorchJob {namespace}/{name}: failed in an earlier attempt; deleting it to run it again (its ranks "
            "resume from their checkpoints)")
        try:
            tc.delete_job(name=name, namespace=namespace)
        except (RuntimeError, TimeoutError) as e:
            raise DeeplightError(f"PyTorchJob {namespace}/{name}: cannot delete the failed attempt: {e}") from None
        gone_by = time.monotonic() + 300
        while job_state(tc, name, namespace) is not None:  # deletion waits for the pods' finalizers
            if time.monotonic() > gone_by:
                raise DeeplightError(f"PyTorchJob {namespace}/{name}: the failed attempt is still there 300 s after "
                                     f"its deletion: kubectl -n {namespace} delete pytorchjob {name}")
            time.sleep(1.0)
        earlier = None
    if earlier is None:
        try:
            tc.create_job(job=job, namespace=namespace)
        except (RuntimeError, ValueError) as e:
            raise DeeplightError(f"PyTorchJob {namespace}/{name}: cannot create it: {e}") from None
        log(f"PyTorchJob {namespace}/{name}: created ({_replicas(job)})")
    else:
        log(f"PyTorchJob {namespace}/{name}: found from an earlier attempt ({earlier}); following it")
    deadline, seen, polls = time.monotonic() + timeout_s, "", 0
    while True:
        try:
            current = tc.get_job(name=name, namespace=namespace)
        except (RuntimeError, TimeoutError) as e:
            raise DeeplightError(f"PyTorchJob {namespace}/{name}: cannot read its status: {e}") from None
        conditions = [c for c in (current.status.conditions if current.status else None) or [] if c.status == "True"]
        last = conditions[-1] if conditions else None
        state = last.type if last else "Pending"
        if state != seen:
            log(f"PyTorchJob {namespace}/{name}: {state}" + (f" ({last.message})" if last and last.message else ""))
            seen = state
        if state == "Succeeded":
            return manifest(current.status)
        if state == "Failed":
            raise DeeplightError(f"PyTorchJob {namespace}/{name} failed: {last.message or last.reason}"
                                 + "".join(f"; {why}" for why in failed_pods(tc, name, namespace)))
        if time.monotonic() > deadline:
            raise DeeplightError(f"PyTorchJob {namespace}/{name}: not finished after {timeout_s:.0f} s (state "
                                 f"{state}); it keeps running: kubectl -n {namespace} get pytorchjob {name}")
        time.sleep(min(poll_s, 0.5 * 2 ** polls))  # quick at first (a bad setting fails in seconds), then poll_s
        polls += 1


def job_state(tc: Any, name: str, namespace: str) -> str | None:
    """The job's latest true condition (Created, Running, Succeeded, Failed...; Pending when it has none), or None
    when there is no such job."""
    try:
        current = tc.get_job(name=name, namespace=namespace)
    except RuntimeError as e:
        if getattr(e.__cause__, "status", None) == 404:
            return None
        raise DeeplightError(f"PyTorchJob {namespace}/{name}: cannot read it: {e}") from None
    except TimeoutError as e:
        raise DeeplightError(f"PyTorchJob {namespace}/{name}: cannot read it: {e}") from None
    conditions = [c for c in (current.status.conditions if current.status else None) or [] if c.status == "True"]
    return conditions[-1].type if conditions else "Pending"


def failed_pods(tc: Any, name: str, namespace: str, tail_lines: int = 5) -> list[str]:
    """'<pod> (<Master|Worker> <index>): <reason> exit <code>: <message>; log: <last lines>' per failed pod."""
    try:
        pods = tc.core_api.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
    except Exception as e:  # the job's own message still goes out
        return [f"(pods not readable: {e})"]
    out = []
    for pod in pods:
        if pod.status is None or pod.status.phase != "Failed":
            continue
        labels = pod.metadata.labels or {}
        who = f"{labels.get(REPLICA_TYPE_LABEL, '?').capitalize()} {labels.get(REPLICA_INDEX_LABEL, '?')}"
        reasons = []
        for cs in pod.status.container_statuses or []:
            t = cs.state.terminated if cs.state else None
            if t is not None:
                reasons.append(f"{t.reason or 'Terminated'} exit {t.exit_code}" + (f": {t.message.strip()}"
                                                                                   if t.message else ""))
        text = f"pod {pod.metadata.name} ({who}): {', '.join(reasons) or pod.status.reason or 'failed'}"
        try:
            tail = tc.core_api.read_namespaced_pod_log(pod.metadata.name, namespace, container=CONTAINER,
                                                        tail_lines=tail_lines)
            if tail and tail.strip():
                text += "; log: " + " | ".join(tail.strip().splitlines())
        except Exception:
            pass
        out.append(text)
    return out


def _replicas(job: Any) -> str:
    specs = job.spec.pytorch_replica_specs
    return ", ".join(f"{k} x{v.replicas}" for k, v in specs.items())
