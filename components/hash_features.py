"""`hash_features`: fit the feature map on the train split only and write int32 feature ids for every split.

Vocabulary with a min-count threshold (config features.min_count) or stable hashing into buckets
(features.buckets). The output holds `feature_map.json`, which serving reuses to transform raw rows.

    task = hash_features(ingested=ingest_task.outputs["ingested"], config_json=cfg_json, parent_run_id=parent)
    task.outputs["hashed"]     # Dataset: train/ valid/ test/ Parquet ids, manifest.json, feature_map.json
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def hash_features(ingested: Input[Dataset], config_json: str, parent_run_id: str, hashed: Output[Dataset],
                  metrics: Output[Metrics]):
    from deeplight.steps.pipeline import hash_step

    manifest = hash_step(ingested.path, config_json, hashed.path, parent_run_id)
    hashed.metadata.update({"dataset": manifest.get("dataset", ""), "rows": manifest["rows"],
                            "feature_map_fingerprint": manifest.get("feature_map_fingerprint", "")})
    metrics.log_metric("fields", len(manifest["field_sizes"]))
    metrics.log_metric("total_ids", sum(manifest["field_sizes"]))
