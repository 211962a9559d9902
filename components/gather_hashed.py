"""`gather_hashed`: the per-file feature ids -> one hashed dataset, files in input order (child run
`hash_features`). Its output is what `hash_features` gives the one-process pipeline: train, prune, evaluate and
register read it unchanged.

    gathered = gather_hashed(parts=dsl.Collected(ids.outputs["hashed"]), config_json=cfg, parent_run_id=parent)
    gathered.outputs["hashed"]   # Dataset: train/ valid/ test/ ids, manifest.json, feature_map.json
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gather_hashed(parts: Input[List[Dataset]], config_json: str, parent_run_id: str, hashed: Output[Dataset],
                  metrics: Output[Metrics]):
    from deeplight.steps.fanout import gather_step

    manifest = gather_step([p.path for p in parts], config_json, hashed.path, parent_run_id)
    hashed.metadata.update({"dataset": manifest["dataset"], "rows": manifest["rows"],
                            "feature_map_fingerprint": manifest["feature_map_fingerprint"]})
    metrics.log_metric("fields", len(manifest["field_sizes"]))
    metrics.log_metric("total_ids", sum(manifest["field_sizes"]))
