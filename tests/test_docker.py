"""The runtime image (docker/Dockerfile) built for real and used for real: pipeline steps run inside it.

Skipped when no Docker daemon answers (`bash .ci/docker.sh` installs and starts one as root). The image
is built through docker/build_image.sh (base image by debootstrap, no registry; Docker's layer cache makes
a rebuild with unchanged dependencies take well under a minute, a cold build ~5-8 min).
DEEPLIGHT_TEST_IMAGE=IMAGE tests an image that already exists instead of building one.
Every container runs with --network none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 45 * 60  # cold: base ~2.5 min, wheels ~1 min, image ~4.5 min on 2 cores
RUN_TIMEOUT = 300


def _docker_answers() -> str | None:
    """None when a Docker daemon answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH (run `bash .ci/docker.sh` as root)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0:
        return f"`docker info` failed, no Docker daemon answers (run `bash .ci/docker.sh` as root): {info.stderr.strip()[-300:]}"
    return None


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def image() -> str:
    why = _docker_answers()
    if why:
        pytest.skip(why)
    given = os.environ.get("DEEPLIGHT_TEST_IMAGE")
    if given:
        return given
    tag = "deeplight:test"
    build = subprocess.run(["bash", str(REPO / "docker" / "build_image.sh"), tag], cwd=REPO,
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    if build.returncode != 0:
        pytest.fail(f"docker/build_image.sh failed ({build.returncode}):\n{_tail(build.stdout)}\n{_tail(build.stderr)}")
    return tag


def run(image: str, *cmd: str, work: Path | None = None, user: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["docker", "run", "--rm", "--network", "none"]
    if work is not None:
        args += ["-v", f"{work}:/work"]
    if user is not None:
        args += ["--user", user]
    proc = subprocess.run([*args, image, *cmd], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed in the container ({proc.returncode}):\n"
                    f"{_tail(proc.stdout)}\n{_tail(proc.stderr)}")
    return proc


def test_synth_and_ingest_run_inside_the_container(image: str, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the container's user (uid 1000) writes here
    try:
        run(image, "deeplight", "synth", "--dataset", "criteo", "--rows", "2000", "--out", "/work/raw.txt",
            work=work)
        run(image, "deeplight", "ingest", "--dataset", "criteo", "--input", "/work/raw.txt",
            "--out", "/work/ingested", work=work)
    finally:
        # Files made by uid 1000 (some 0600): let any host user read and delete them.
        run(image, "chmod", "-R", "a+rwX", "/work", work=work, check=False)
    assert (work / "raw.txt").stat().st_uid == 1000  # written by the image's user, not root
    report = json.loads((work / "ingested" / "report.json").read_text())
    assert report["read"] == report["written"] == 2000
    assert report["quarantined"] == 0
    total = 0
    for split in ("train", "valid", "test"):
        parts = sorted((work / "ingested" / split).glob("*.parquet"))
        assert parts, f"no Parquet files for the {split} split"
        rows = sum(pq.read_metadata(p).num_rows for p in parts)
        assert rows == report["splits"][split]
        total += rows
    assert total == 2000


def test_runs_as_the_non_root_deeplight_user(image: str):
    out = run(image, "sh", "-c", 'id -u; id -un; pwd; echo "$HOME"').stdout.split()
    assert out == ["1000", "deeplight", "/home/deeplight", "/home/deeplight"]
    config = json.loads(subprocess.run(["docker", "image", "inspect", image, "--format", "{{json .Config}}"],
                                       capture_output=True, text=True, check=True).stdout)
    assert config["User"] == "1000:1000"  # numeric: Kubernetes runAsNonRoot can verify it
    assert not config.get("Entrypoint")  # KFP sets the command
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env.get("DEEPLIGHT_CODE_VERSION")


def test_torch_is_the_cpu_build(image: str):
    code = ("import importlib.metadata as m, torch; print(torch.__version__); print(torch.version.cuda); "
            "print(sorted(d.metadata['Name'] for d in m.distributions() "
            "if d.metadata['Name'].lower().startswith(('nvidia', 'triton'))))")
    out = run(image, "python", "-c", code).stdout.splitlines()
    assert out == ["2.13.0+cpu", "None", "[]"]


def test_the_project_and_its_runtime_deps_import(image: str):
    code = ("import deeplight.cli, deeplight.ops.server, kserve, numba, onnxruntime, pyarrow, mlflow, kfp, optuna, "
            "boto3, psycopg2; "
            "import importlib.metadata as m; print(m.version('deeplight'))")
    assert run(image, "python", "-c", code).stdout.strip() == "0.1.0"
    # non-editable: the package lives in the venv, not in a source checkout
    where = run(image, "python", "-c", "import deeplight; print(deeplight.__file__)").stdout.strip()
    assert where.startswith("/opt/venv/lib/python3.11/site-packages/deeplight/")


def test_the_image_compiles_the_pipelines_without_a_checkout(image: str):
    """components/ and pipelines/ are installed packages: compiling needs no repository on sys.path."""
    out = run(image, "sh", "-c", "cd /tmp && deeplight pipeline compile --out /tmp/p.yaml >/dev/null && "
                                 "python -c 'import pipelines; print(pipelines.__file__)' && "
                                 "grep -c 'deeplight.steps.pipeline' /tmp/p.yaml").stdout.split()
    assert out[0].startswith("/opt/venv/lib/python3.11/site-packages/pipelines/") and int(out[1]) > 0


def test_no_build_tools_caches_or_wheels_left(image: str):
    for tool in ("gcc", "cc", "g++", "make"):
        assert run(image, "which", tool, check=False).returncode != 0, f"{tool} is in the image"
    # as root, to see into /root; each line prints what it found
    checks = [
        "ls -d /root/.cache/pip /home/deeplight/.cache/pip /tmp/wheels /tmp/src 2>/dev/null",
        "find /opt /tmp /root /home -name '*.whl'",
        "find /var/cache/apt/archives -name '*.deb'",
        "find /var/lib/apt/lists -type f ! -name lock",
    ]
    proc = run(image, "sh", "-c", "; ".join(checks) + "; true", user="0")
    assert proc.stdout.strip() == "", f"left in the image:\n{proc.stdout}"
