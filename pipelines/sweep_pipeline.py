"""The sweep pipeline: ingest -> hash -> sweep_init -> train dense once -> ParallelFor over N sweep workers
sharing one Optuna study (RDB storage) -> select the Pareto trade-off -> evaluate on test -> register.

    python -m pipelines.sweep_pipeline                 # compile -> pipelines/sweep_pipeline.yaml (committed)

    from kfp import local
    from pipelines.sweep_pipeline import sweep_pipeline
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root="/abs/out/kfp")
    sweep_pipeline(input_uris=["/abs/data/raw.txt"], epochs=1, n_trials=6, workers=2,
                   storage="sqlite:////abs/optuna.db", config_overrides='{"model.dnn": [16]}')

`sweep_init` runs right after hashing, so bad sweep settings (empty range, unknown sampler, unreachable
storage) fail before the dense model is trained. On a cluster every worker pod must reach the same storage:
pass a postgresql:// URL, or leave `storage` empty and give the pods $DEEPLIGHT_OPTUNA_STORAGE (keeps its
password out of the run's parameters). The chosen trial's checkpoint travels through MLflow when the select
pod cannot see a worker's disk. An empty `study` names the study after the KFP run; a name given again
resumes that study. MLflow: the pipeline run is the parent of every step's run and of the sweep's run, whose
children are the trials. Pods: the Config section `cluster` (components/resources.py), compiled in; GPUs for
train and the workers with cluster.gpus; caching off (each run must log its own runs). Submit or schedule it with
`deeplight pipeline submit | schedule --pipeline sweep ...`.
"""

from kfp import dsl

from components import evaluate, finish_run, hash_features, ingest, register, start_run, train
from components.resources import cluster_ready
from components.sweep import sweep_init, sweep_select, sweep_worker
from deeplight.base.config import ClusterConfig, Config

PIPELINE_NAME = "deeplight-sweep"
_D = Config()
_S = _D.sweep
_cluster = [_D.cluster]  # the pod settings `build` compiles in (read while KFP traces the pipeline's body)


def _range(lo_hi: tuple) -> str:
    return ":".join(str(v) for v in lo_hi)


def _sweep_pipeline(
    input_uris: list,
    dataset: str = _D.data.dataset,
    split: str = ",".join(str(x) for x in _D.data.split),
    seed: int = _D.train.seed,
    min_count: int = _D.features.min_count,
    epochs: int = _D.train.epochs,
    ramp_epochs: float = _D.prune.ramp_epochs,
    config_overrides: str = "{}",
    n_trials: int = _S.n_trials,
    workers: int = 2,
    study: str = "",
    storage: str = "",
    sampler: str = _S.sampler,
    tolerance: float = _S.tolerance,
    dnn_range: str = _range(_S.dnn),
    field_range: str = _range(_S.field),
    embedding_range: str = _range(_S.embedding),
    modes: str = ",".join(_S.modes),
    finetune_range: str = _range(_S.finetune_epochs),
    latency_calls: int = _S.latency_calls,
    model_name: str = _D.registry.model_name,
    run_name: str = "",
):
    """n_trials: COMPLETE trials over all workers. *_range: LOW:HIGH sparsity (or one value). storage: Optuna
    RDB URL shared by the workers (empty: $DEEPLIGHT_OPTUNA_STORAGE, else sqlite under the MLflow dir).
    tolerance: the chosen trial is the fastest whose valid AUC is at most this below dense."""
    finish = finish_run(kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    cluster_ready([finish], _cluster[0])
    with dsl.ExitHandler(finish, name="deeplight-sweep-run"):
        start = start_run(run_name=run_name, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, dataset=dataset,
                          input_uris=input_uris, split=split, seed=seed, min_count=min_count, epochs=epochs,
                          ramp_epochs=ramp_epochs, config_overrides=config_overrides, model_name=model_name)
        cfg, parent = start.outputs["config_json"], start.outputs["parent_run_id"]
        raw = ingest(input_uris=input_uris, config_json=cfg, parent_run_id=parent)
        hashed = hash_features(ingested=raw.outputs["ingested"], config_json=cfg, parent_run_id=parent)
        data = hashed.outputs["hashed"]
        sweep = dict(study=study, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, storage=storage, n_trials=n_trials,
                     sampler=sampler, seed=seed, tolerance=tolerance, dnn_range=dnn_range, field_range=field_range,
                     embedding_range=embedding_range, modes=modes, finetune_range=finetune_range,
                     latency_calls=latency_calls)
        slots = sweep_init(hashed=data, config_json=cfg, parent_run_id=parent, workers=workers, **sweep)
        dense = train(hashed=data, config_json=cfg, parent_run_id=parent).after(slots)
        with dsl.ParallelFor(slots.output, name="sweep-workers") as slot:
            worker = sweep_worker(hashed=data, dense=dense.outputs["model"], slot=slot, parent_run_id=parent,
                                  **sweep)
        chosen = sweep_select(hashed=data, dense=dense.outputs["model"],
                              completed=dsl.Collected(worker.outputs["Output"]), parent_run_id=parent, **sweep)
        scored = evaluate(model=chosen.outputs["model"], hashed=data, variant="chosen", parent_run_id=parent)
        registered = register(model=chosen.outputs["model"], hashed=data, evaluation=scored.outputs["evaluation"],
                              dense=dense.outputs["model"], model_name=model_name, parent_run_id=parent)
        cluster_ready([start, raw, hashed, slots, dense, worker, chosen, scored, registered], _cluster[0])


def build(cluster: ClusterConfig | None = None):
    """The sweep pipeline with its pods sized by `cluster` (default: Config().cluster, the committed YAML's)."""
    _cluster[0] = cluster or _D.cluster
    try:
        return dsl.pipeline(name=PIPELINE_NAME, description="Optuna sparsity sweep of a DeepFwFM CTR model "
                                                            "(accuracy vs latency Pareto front) with N parallel "
                                                            "workers; tracked in MLflow")(_sweep_pipeline)
    finally:
        _cluster[0] = _D.cluster


sweep_pipeline = build()


if __name__ == "__main__":
    from pathlib import Path

    from kfp import compiler

    out = Path(__file__).with_name("sweep_pipeline.yaml")
    compiler.Compiler().compile(sweep_pipeline, str(out))
    print(out)
