"""Files: local paths and s3:// URIs behind one interface, gzip by extension, atomic outputs, fingerprints.

S3 endpoint and credentials come only from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, and an endpoint from `DEEPLIGHT_S3_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`,
`AWS_ENDPOINT_URL` or `MLFLOW_S3_ENDPOINT_URL`, first set wins); they are never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from deeplight.base.errors import DeeplightError

_ENDPOINT_VARS = ("DEEPLIGHT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    return next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the environment (endpoint override for MinIO/moto)."""
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path (str or Path) or an s3://bucket/key URI."""
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):]
    if "://" in uri and not uri.startswith("file://"):
        raise DeeplightError(f"{uri}: unsupported URI scheme (use a local path or s3://bucket/key)")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def open_input(uri: str) -> pa.NativeFile:
    """A readable binary stream of `uri`, gunzipped when it ends in .gz. Errors name the input."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DeeplightError(f"{uri}: cannot read ({e})") from None
    if info.type == pafs.FileType.NotFound:
        raise DeeplightError(f"{uri}: no such file")
    if info.type != pafs.FileType.File:
        raise DeeplightError(f"{uri}: not a file")
    compression = "gzip" if uri.endswith(".gz") else None
    try:
        return fs.open_input_stream(path, compression=compression)
    except OSError as e:
        raise DeeplightError(f"{uri}: cannot read ({e})") from None


OUTPUT_MARKER = ".deeplight-output"  # in every folder a step writes: {"step": ...}; only such a folder is replaced


def check_output_dir(out_dir: str | os.PathLike, step: str, inputs: Any = (), legacy_files: tuple[str, ...] = ()
                     ) -> Path:
    """Refuse an output folder whose replacement would lose data: one that is, or contains, an input (local
    paths; s3:// inputs cannot be inside a local folder), a file, or a non-empty folder that is not a previous
    result of the same step (its marker file, or for results written before markers, one of `legacy_files`)."""
    out = Path(out_dir).absolute().resolve()
    for uri in inputs:
        if "://" in str(uri):
            continue
        src = Path(uri).absolute().resolve()
        if src == out or out in src.parents:
            raise DeeplightError(f"{out_dir}: the output folder is or contains the input {uri}; replacing it would "
                                 "delete that input (choose another --out)")
    if out.exists() and not out.is_dir():
        raise DeeplightError(f"{out_dir}: exists and is not a folder (choose another --out)")
    if out.is_dir() and any(out.iterdir()):
        marker = out / OUTPUT_MARKER
        ours = False
        if marker.is_file():
            try:
                ours = json.loads(marker.read_text()).get("step") == step
            except (ValueError, AttributeError):
                ours = False
        elif legacy_files:
            ours = any((out / f).exists() for f in legacy_files)
        if not ours:
            raise DeeplightError(f"{out_dir}: a non-empty folder that is not a previous `deeplight {step}` result; "
                                 "refusing to replace it (remove it yourself or choose another --out)")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = True, step: str | None = None,
                      inputs: Any = (), legacy_files: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out_dir` in one rename.

    A failed run leaves `out_dir` as it was (absent or the previous complete result), never half written. With
    `step`, the folder is first checked (`check_output_dir`: never an input, a file or someone else's folder)
    and the result carries the step's marker.
    """
    if step is not None:
        check_output_dir(out_dir, step, inputs, legacy_files)
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise DeeplightError(f"{out}: already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if step is not None:
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"step": step}) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DeeplightError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DeeplightError(f"{path}: not valid JSON ({e})") from None


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fingerprint_files(paths: list[str | os.PathLike]) -> str:
    """sha256 over the files' names (relative order) and bytes: the identity of a dataset split."""
    h = hashlib.sha256()
    for p in sorted(map(Path, paths)):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()

