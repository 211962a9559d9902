"""deeplight's KFP v2 components, one per file, each a thin wrapper over `deeplight.steps.pipeline`.

    from components import ingest, hash_features, train, prune, evaluate, register, promote
    from components import start_run, finish_run        # MLflow parent run: open / close (exit handler)

All are lightweight Python components on the project image (`components.image.IMAGE`) with
install_kfp_package=False: they run unchanged under kfp.local.SubprocessRunner, kfp.local.DockerRunner and on
a Kubeflow cluster. Settings travel as one `config_json` (a deeplight Config, made by `start_run`); data and
models as typed artifacts (Dataset, Model, Artifact, Metrics); MLflow through the environment
(MLFLOW_TRACKING_URI, or the embedded store under DEEPLIGHT_MLRUNS).
"""

from components.evaluate import evaluate
from components.finish_run import finish_run
from components.hash_features import hash_features
from components.image import IMAGE
from components.ingest import ingest
from components.promote import promote
from components.prune import prune
from components.register import register
from components.start_run import start_run
from components.train import train

__all__ = ["IMAGE", "start_run", "ingest", "hash_features", "train", "prune", "evaluate", "register", "promote",
           "finish_run"]
