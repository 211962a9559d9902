"""The deeplight pipeline with per-file data steps: several input files (or an s3:// prefix ending in "/") fan
out with KFP `dsl.ParallelFor`, then train -> prune -> evaluate -> register as in pipelines/deeplight_pipeline.py
(same parameters, same MLflow runs).

    plan_inputs -> ParallelFor(ingest_file: ingest + value counts of one file) -> merge_counts (one feature map,
    min_count over the whole train split) -> ParallelFor(apply_features: ids of one file) -> gather_hashed -> ...

The hashed dataset is the one the one-process pipeline writes from the same files (row for row, id for id, the
same feature map fingerprint; tests/test_fanout.py checks it through the local runner): plan_inputs counts every
file's rows first, so each file knows the global index of its first row and its rows get the same splits.

    deeplight pipeline compile --pipeline fanout           # -> pipelines/fanout_pipeline.yaml (committed)
    deeplight pipeline run-local --pipeline fanout --input day_0.txt day_1.txt day_2.txt day_3.txt
    deeplight pipeline submit --pipeline fanout --host URL --input s3://bucket/criteo/days/
"""

from pipelines.deeplight_pipeline import build as _build_deeplight

PIPELINE_NAME = "deeplight-fanout"


def build(cluster=None):
    """The fan-out pipeline with its pods sized by `cluster` (default: Config().cluster)."""
    return _build_deeplight(cluster, fan_out=True, name=PIPELINE_NAME)


fanout_pipeline = build()
