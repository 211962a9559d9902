"""`start_run`: validate the pipeline's settings into one deeplight Config and open the MLflow parent run.

The defaults are deeplight's Config defaults (as literals: KFP embeds this function's source; a test keeps
them equal); `buckets` > 0 selects stable hashing instead of a min_count vocabulary; `config_overrides` is a
JSON object of dotted settings applied last (`{"model.dnn": [16], "train.batch_size": 512}`). Outputs
`config_json` (the Config every later step reads) and `parent_run_id` (every later step logs a child run of
it). Standalone:

    from kfp import local
    from components.start_run import start_run
    local.init(runner=local.SubprocessRunner(use_venv=False))
    task = start_run(run_name="try", kfp_run_id="local-1", epochs=1)
    task.outputs["parent_run_id"], task.outputs["config_json"]
"""

from typing import NamedTuple

from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_run(
    run_name: str = "",
    kfp_run_id: str = "",
    dataset: str = "criteo",
    input_uris: list = [],
    split: str = "0.8,0.1,0.1",
    split_mode: str = "random",
    seed: int = 0,
    min_count: int = 8,
    buckets: int = 0,
    epochs: int = 10,
    dnn_sparsity: float = 0.9,
    field_sparsity: float = 0.9,
    embedding_sparsity: float = 0.4,
    prune_mode: str = "unstructured",
    ramp_epochs: float = 1.0,
    finetune_epochs: int = 2,
    config_overrides: str = "{}",
    model_name: str = "",
    promote: bool = False,
) -> NamedTuple("StartRunOutputs", [("config_json", str), ("parent_run_id", str)]):
    from collections import namedtuple

    from deeplight.steps import pipeline as steps

    with steps.step("start_run", ""):
        cfg = steps.pipeline_config(
            dataset=dataset, split=split, split_mode=split_mode, seed=seed, min_count=min_count,
            buckets=buckets, epochs=epochs, dnn_sparsity=dnn_sparsity, field_sparsity=field_sparsity,
            embedding_sparsity=embedding_sparsity, prune_mode=prune_mode, ramp_epochs=ramp_epochs,
            finetune_epochs=finetune_epochs, overrides=config_overrides)
        parent = steps.start_pipeline_run(cfg.to_json(), run_name=run_name, kfp_run_id=kfp_run_id, params={
            "input_uris": ",".join(input_uris), "model_name": model_name, "promote": promote,
            "config_overrides": config_overrides})
    return namedtuple("StartRunOutputs", ["config_json", "parent_run_id"])(cfg.to_json(), parent)
