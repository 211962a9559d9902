"""The deeplight pipeline: ingest -> hash features -> train dense DeepFwFM -> prune -> evaluate (dense and
pruned) -> register (-> promote when asked), tracked in MLflow as one parent run with a child run per step.

    deeplight pipeline compile                       # -> pipelines/deeplight_pipeline.yaml (committed)
    deeplight pipeline run-local                     # make run: kfp.local.SubprocessRunner, synthetic Criteo
    deeplight pipeline submit --host URL --input s3://bucket/criteo/day_0.gz --epochs 10

or from Python:

    from kfp import local
    from pipelines.deeplight_pipeline import deeplight_pipeline
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root="/abs/out/kfp")
    deeplight_pipeline(input_uris=["/abs/data/raw.txt"], epochs=1, config_overrides='{"model.dnn": [16]}')

Parameter defaults are deeplight's Config defaults. `start_run` turns the parameters into one Config (JSON)
that every step reads and opens the MLflow parent run; the exit handler `finish_run` closes it as FINISHED or
FAILED whatever happened. Each step's pod gets the CPU/memory requests and limits of the Config section
`cluster` (GPUs on train and prune with cluster.gpus), compiled in; caching is off for every step
(components/resources.py says why, step by step).
"""

from kfp import dsl

from components import evaluate, finish_run, hash_features, ingest, promote, prune, register, start_run, train
from components.apply_features import apply_features
from components.gather_hashed import gather_hashed
from components.ingest_file import ingest_file
from components.merge_counts import merge_counts
from components.plan_inputs import plan_inputs
from components.resources import cluster_ready
from deeplight.base.config import ClusterConfig, Config

PIPELINE_NAME = "deeplight"
_D = Config()
# The model steps in pipeline order (task names in the compiled spec; evaluate runs twice, then register).
STEPS = ("ingest", "hash-features", "train", "prune", "evaluate", "register")
_cluster = [_D.cluster]  # the pod settings `build` compiles in (read while KFP traces the pipeline's body)


def _deeplight_pipeline(
    input_uris: list,
    dataset: str = _D.data.dataset,
    split: str = ",".join(str(x) for x in _D.data.split),
    split_mode: str = _D.data.split_mode,
    seed: int = _D.train.seed,
    min_count: int = _D.features.min_count,
    buckets: int = 0,
    epochs: int = _D.train.epochs,
    dnn_sparsity: float = _D.prune.dnn,
    field_sparsity: float = _D.prune.field,
    embedding_sparsity: float = _D.prune.embedding,
    prune_mode: str = _D.prune.mode,
    ramp_epochs: float = _D.prune.ramp_epochs,
    finetune_epochs: int = _D.prune.finetune_epochs,
    config_overrides: str = "{}",
    model_name: str = _D.registry.model_name,
    promote_model: bool = False,
    promote_tolerance: float = _D.promote.tolerance,
    latency_slo_us: float = 0.0,
    run_name: str = "",
    train_workers: int = _D.cluster.train_workers,
):
    """input_uris: raw files, local paths (local runs) or s3:// URIs. buckets > 0: stable hashing into that many
    buckets per field instead of a min_count vocabulary. config_overrides: JSON object of dotted Config settings
    applied last. promote_model: run the promotion gate (AUC within promote_tolerance of the champion, latency
    under latency_slo_us when > 0). run_name: the MLflow parent run's name (default: pipeline-<KFP run id>).
    train_workers > 1: train and prune each run as a Kubeflow PyTorchJob of that many pods (README: On a cluster)."""
    finish = finish_run(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    cluster_ready([finish], _cluster[0])
    with dsl.ExitHandler(finish, name="deeplight-run"):
        start = start_run(
            run_name=run_name, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, dataset=dataset, input_uris=input_uris,
            split=split, split_mode=split_mode, seed=seed, min_count=min_count, buckets=buckets, epochs=epochs,
            dnn_sparsity=dnn_sparsity, field_sparsity=field_sparsity, embedding_sparsity=embedding_sparsity,
            prune_mode=prune_mode, ramp_epochs=ramp_epochs, finetune_epochs=finetune_epochs,
            config_overrides=config_overrides, model_name=model_name, promote=promote_model)
        cfg, parent = start.outputs["config_json"], start.outputs["parent_run_id"]

        data, data_tasks = (_per_file_data if _build[0]["fan_out"] else _one_process_data)(input_uris, cfg, parent)
        dense = train(hashed=data, config_json=cfg, parent_run_id=parent, workers=train_workers)
        pruned = prune(dense=dense.outputs["model"], hashed=data, config_json=cfg, parent_run_id=parent,
                       workers=train_workers)
        # Both evaluations after pruning: their latencies are then measured alike (not beside a training job).
        eval_dense = evaluate(model=dense.outputs["model"], hashed=data, variant="dense",
                              parent_run_id=parent).after(pruned).set_display_name("evaluate-dense")
        eval_pruned = evaluate(model=pruned.outputs["model"], hashed=data, variant="pruned",
                               parent_run_id=parent).after(eval_dense).set_display_name("evaluate-pruned")
        registered = register(model=pruned.outputs["model"], hashed=data, evaluation=eval_pruned.outputs["evaluation"],
                              dense=dense.outputs["model"], model_name=model_name, parent_run_id=parent)
        tasks = [start, *data_tasks, dense, pruned, eval_dense, eval_pruned, registered]
        with dsl.If(promote_model == True, name="promote-when-asked"):  # noqa: E712 (a KFP condition, not Python)
            gate = promote(model_name=model_name, tolerance=promote_tolerance, latency_slo_us=latency_slo_us,
                           parent_run_id=parent).after(registered)
            tasks.append(gate)
    cluster_ready(tasks, _cluster[0])


def _one_process_data(input_uris, cfg, parent):
    """ingest -> hash_features, one task each: (the hashed dataset, the tasks)."""
    raw = ingest(input_uris=input_uris, config_json=cfg, parent_run_id=parent)
    hashed = hash_features(ingested=raw.outputs["ingested"], config_json=cfg, parent_run_id=parent)
    return hashed.outputs["hashed"], [raw, hashed]


def _per_file_data(input_uris, cfg, parent):
    """The same hashed dataset from per-file tasks (pipelines/fanout_pipeline.py): plan -> ParallelFor(ingest and
    count one file) -> merge the counts into one feature map -> ParallelFor(apply it to one file) -> gather."""
    plan = plan_inputs(input_uris=input_uris, config_json=cfg, parent_run_id=parent)
    with dsl.ParallelFor(plan.output, name="per-file-ingest") as item:
        files = ingest_file(item=item)  # the item carries cfg and parent (components/plan_inputs.py says why)
    merged = merge_counts(ingested=dsl.Collected(files.outputs["ingested"]),
                          counts=dsl.Collected(files.outputs["counts"]), config_json=cfg, parent_run_id=parent)
    with dsl.ParallelFor(merged.outputs["Output"], name="per-file-ids") as part:
        # Brings exactly this file's ingested artifact into the task (a Collected list would bring all of them).
        ingested = dsl.importer(artifact_uri=part.ingested_uri, artifact_class=dsl.Dataset, reimport=False)
        ids = apply_features(item=part, ingested=ingested.output, feature_map=merged.outputs["feature_map"])
    gathered = gather_hashed(parts=dsl.Collected(ids.outputs["hashed"]), config_json=cfg, parent_run_id=parent)
    return gathered.outputs["hashed"], [plan, files, merged, ids, gathered]


# What `build` compiles: the pods' sizes and the data steps (one process, or per file), read while KFP traces.
_build = [{"fan_out": False}]


def build(cluster: ClusterConfig | None = None, fan_out: bool = False, name: str = PIPELINE_NAME):
    """The pipeline with its pods sized by `cluster` (default: Config().cluster, the committed YAML's); fan_out:
    the per-file data steps (pipelines/fanout_pipeline.py) instead of one ingest and one hash task."""
    _cluster[0] = cluster or _D.cluster
    _build[0] = {"fan_out": fan_out}
    how = " (data steps per input file, in parallel)" if fan_out else ""
    try:
        return dsl.pipeline(name=name, description="Train, prune (DeepLight), evaluate and register a "
                                                   f"sparse DeepFwFM CTR model; tracked in MLflow{how}")(
            _deeplight_pipeline)
    finally:
        _cluster[0] = _D.cluster
        _build[0] = {"fan_out": False}


deeplight_pipeline = build()
