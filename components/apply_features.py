"""`apply_features`: one file's ingested splits -> its feature ids, with the one merged feature map.

    with dsl.ParallelFor(merged.output) as item:
        part = dsl.importer(artifact_uri=item.ingested_uri, artifact_class=Dataset, reimport=False)
        ids = apply_features(item=item, ingested=part.output, feature_map=merged.outputs["feature_map"])
    ids.outputs["hashed"]   # Dataset: that file's train/ valid/ test/ ids, manifest.json, part.json
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def apply_features(item: dict, ingested: Input[Dataset], feature_map: Input[Artifact], hashed: Output[Dataset]):
    from deeplight.steps.fanout import apply_step

    manifest = apply_step(ingested.path, feature_map.path, hashed.path, item["parent_run_id"])
    hashed.metadata.update({"rows": manifest["rows"], "feature_map_fingerprint": manifest["feature_map_fingerprint"]})
