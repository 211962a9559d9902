"""`ingest`: raw Criteo/Avazu files (local paths or s3:// URIs) -> typed Parquet train/valid/test splits.

Bad rows go to `quarantine.jsonl` inside the output; a missing, empty or mostly bad input fails the step with
a message naming the file. S3: endpoint and credentials from the environment (DEEPLIGHT_S3_ENDPOINT_URL or
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from parameters.

    task = ingest(input_uris=["s3://bucket/train.txt"], config_json=cfg.to_json(), parent_run_id=parent)
    task.outputs["ingested"]   # Dataset: a directory with train/ valid/ test/ Parquet parts and report.json
"""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(input_uris: list, config_json: str, parent_run_id: str, ingested: Output[Dataset],
           metrics: Output[Metrics]):
    from deeplight.steps.pipeline import ingest_step

    report = ingest_step(input_uris, config_json, ingested.path, parent_run_id)
    ingested.metadata.update({"dataset": report["dataset"], "rows": report["written"], "splits": report["splits"]})
    for key in ("read", "written", "quarantined"):
        metrics.log_metric(f"rows_{key}", report[key])
