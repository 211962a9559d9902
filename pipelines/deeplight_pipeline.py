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
):
    """input_uris: raw files, local paths (local runs) or s3:// URIs. buckets > 0: stable hashing into that many
    buckets per field instead of a min_count vocabulary. config_overrides: JSON object of dotted Config settings
    applied last. promote_model: run the promotion gate (AUC within promote_tolerance of the champion, latency
    under latency_slo_us when > 0). run_name: the MLflow parent run's name (default: pipeline-<KFP run id>)."""
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

        raw = ingest(input_uris=input_uris, config_json=cfg, parent_run_id=parent)
        hashed = hash_features(ingested=raw.outputs["ingested"], config_json=cfg, parent_run_id=parent)
        data = hashed.outputs["hashed"]
        dense = train(hashed=data, config_json=cfg, parent_run_id=parent)
        pruned = prune(dense=dense.outputs["model"], hashed=data, config_json=cfg, parent_run_id=parent)
        # Both evaluations after pruning: their latencies are then measured alike (not beside a training job).
        eval_dense = evaluate(model=dense.outputs["model"], hashed=data, variant="dense",
                              parent_run_id=parent).after(pruned).set_display_name("evaluate-dense")
        eval_pruned = evaluate(model=pruned.outputs["model"], hashed=data, variant="pruned",
                               parent_run_id=parent).after(eval_dense).set_display_name("evaluate-pruned")
        registered = register(model=pruned.outputs["model"], hashed=data, evaluation=eval_pruned.outputs["evaluation"],
                              dense=dense.outputs["model"], model_name=model_name, parent_run_id=parent)
        tasks = [start, raw, hashed, dense, pruned, eval_dense, eval_pruned, registered]
        with dsl.If(promote_model == True, name="promote-when-asked"):  # noqa: E712 (a KFP condition, not Python)
            gate = promote(model_name=model_name, tolerance=promote_tolerance, latency_slo_us=latency_slo_us,
                           parent_run_id=parent).after(registered)
            tasks.append(gate)
    cluster_ready(tasks, _cluster[0])


def build(cluster: ClusterConfig | None = None):
    """The pipeline with its pods sized by `cluster` (default: Config().cluster, the committed YAML's)."""
    _cluster[0] = cluster or _D.cluster
    try:
        return dsl.pipeline(name=PIPELINE_NAME, description="Train, prune (DeepLight), evaluate and register a "
                                                            "sparse DeepFwFM CTR model; tracked in MLflow")(
            _deeplight_pipeline)
    finally:
        _cluster[0] = _D.cluster


deeplight_pipeline = build()
