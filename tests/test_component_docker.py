"""A real component in the real project image through kfp.local.DockerRunner: the `ingest` component (a
lightweight Python component whose base_image is the project image, install_kfp_package=False) on a tiny
synthetic Criteo file, in a container with no network, as the image's non-root user (uid 1000).

Skipped when no Docker daemon answers (`bash .ci/docker.sh` starts one as root). The image is built from this
tree by docker/build_image.sh as `deeplight:test` (the tag tests/test_docker.py builds: one build serves
both); the component's own function then runs on that tag (in the pipeline its base_image is
deeplight:local, what `make image` builds). DEEPLIGHT_TEST_IMAGE=IMAGE tests an existing image instead.
The pipeline root is mounted at the same path in the container, so it is an absolute temp dir with mode 777;
settings reach the step through the environment only (here the embedded MLflow store, under the pipeline
root so that the container can write it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("kfp")
pytest.importorskip("docker")
from kfp import dsl, local  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import components  # noqa: E402
from deeplight.base.config import Config  # noqa: E402
from deeplight.data.synth import synthesize  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

ROWS = 2000
REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 45 * 60  # cold build (base image, wheels, image) on 2 cores; warm: seconds


def _docker(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def image() -> str:
    """The image under test, built from this tree (as tests/test_docker.py does, same tag: one build serves
    both, and Docker's layer cache makes it seconds when nothing changed), so that it can never be older
    than the code it is tested with. DEEPLIGHT_TEST_IMAGE=IMAGE tests an existing image instead."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH (run `bash .ci/docker.sh` as root)")
    try:
        if _docker("info", timeout=60).returncode != 0:
            pytest.skip("no Docker daemon answers (run `bash .ci/docker.sh` as root)")
    except subprocess.TimeoutExpired:
        pytest.skip("`docker info` timed out")
    given = os.environ.get("DEEPLIGHT_TEST_IMAGE")
    if given:
        if _docker("image", "inspect", given).returncode != 0:
            pytest.skip(f"DEEPLIGHT_TEST_IMAGE={given} is absent")
        return given
    tag = "deeplight:test"
    build = subprocess.run(["bash", str(REPO / "docker" / "build_image.sh"), tag], cwd=REPO, capture_output=True,
                           text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    if build.returncode != 0:
        pytest.fail(f"docker/build_image.sh failed ({build.returncode}):\n{build.stdout[-3000:]}\n"
                    f"{build.stderr[-3000:]}")
    return tag


def test_ingest_component_runs_in_the_image_through_the_docker_runner(image, tmp_path):
    root = tmp_path / "kfp"
    (root / "input").mkdir(parents=True)
    (root / "mlruns").mkdir()
    for d in (root, root / "mlruns"):
        d.chmod(0o777)  # the container's user (uid 1000) writes here; the dirs are mounted at the same path
    raw = root / "input" / "raw.txt"
    synthesize("criteo", rows=ROWS, seed=0, out=str(raw))
    raw.chmod(0o644)
    local.init(runner=local.DockerRunner(network_mode="none", environment={
        "DEEPLIGHT_MLRUNS": str(root / "mlruns"), "MLFLOW_DISABLE_TELEMETRY": "true"}), pipeline_root=str(root))
    ingest = components.ingest
    if image != components.IMAGE:  # the same component function on another image tag
        ingest = dsl.component(base_image=image, install_kfp_package=False)(components.ingest.python_func)
    try:
        task = ingest(input_uris=[str(raw)], config_json=Config().to_json(), parent_run_id="")
    finally:
        # Files made by uid 1000 (some 0600): let any host user read and delete them.
        _docker("run", "--rm", "--network", "none", "--user", "0", "-v", f"{root}:{root}", image,
                "chmod", "-R", "a+rwX", str(root))
    out = Path(task.outputs["ingested"].path)
    assert out.is_relative_to(root) and out.stat().st_uid == 1000  # written inside the container
    report = json.loads((out / "report.json").read_text())
    assert report["read"] == report["written"] == ROWS and report["quarantined"] == 0
    rows = {s: sum(pq.read_metadata(p).num_rows for p in (out / s).glob("*.parquet")) for s in report["splits"]}
    assert rows == report["splits"] and sum(rows.values()) == ROWS
    # The step logged to MLflow from inside the container, through the environment alone.
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("deeplight").experiment_id],
                              "attributes.run_name = 'ingest'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["rows_written"] == ROWS
