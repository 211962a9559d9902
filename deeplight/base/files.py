"""Files: local paths and s3:// URIs behind one interface, gzip by extension, atomic outputs, fingerprints.

S3 endpoint and credentials come only from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, and an endpoint from `DEEPLIGHT_S3_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`,
`AWS_ENDPOINT_URL` or `MLFLOW_S3_ENDPOINT_URL`, first set wins); they are never logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
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


def umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def usual_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give under this umask (0644/0755 under 022). mkstemp and mkdtemp create
    0600/0700, which a step running as another user (the image's uid 1000) cannot read."""
    return (0o777 if directory else 0o666) & ~umask()


class _OutputLock:
    """An exclusive, non-blocking flock on `<parent>/.<name>.lock`, held for a step's whole write of `out`.

    Who holds it is the live writer of `out`: a second writer fails at once with a clear error, and temp folders
    of `out` found while holding it belong to dead runs. The file is removed on release; a writer that opened it
    just before that re-opens it (the inode check), so two writers never hold locks on different inodes."""

    def __init__(self, out: Path, step: str | None):
        self.path = out.parent / f".{out.name}.lock"
        self.out, self.step = out, step
        self.fd = -1

    def __enter__(self) -> "_OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise DeeplightError(
                    f"{self.out}: another `deeplight {self.step or 'step'}` (pid {holder or '?'}) is writing this "
                    f"output right now ({self.path} is locked); wait for it to finish or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the current one
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: see the class docstring
        os.close(self.fd)


_TMP, _OLD = ".tmp-", ".old-"


def _siblings(out: Path, kind: str) -> list[Path]:
    prefix = f".{out.name}{kind}"
    return sorted((p for p in out.parent.iterdir() if p.name.startswith(prefix)), key=lambda p: p.stat().st_mtime,
                   reverse=True)


def _recover_and_clean(out: Path) -> None:
    """Under the output lock: undo a replacement killed between its two renames (the fallback of
    `_replace_dir`: `out` missing, its previous result parked as .old-), then remove the temp and parked folders
    of runs that died (no live writer can own them: it would hold the lock)."""
    olds = _siblings(out, _OLD)
    if olds and not out.exists():
        olds.pop(0).rename(out)
    for stale in _siblings(out, _TMP) + olds:
        shutil.rmtree(stale, ignore_errors=True)


RENAME_EXCHANGE, AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the C library or
    the filesystem cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Make `tmp` the folder at `out`, never leaving a moment without a complete `out` where the system can swap
    atomically; elsewhere two renames, and a kill between them is undone by the next run (_recover_and_clean)."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous result
        return
    old = out.parent / f".{out.name}{_OLD}{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = True, step: str | None = None,
                      inputs: Any = (), legacy_files: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out_dir` in one atomic swap.

    A failed or killed run leaves `out_dir` as it was (absent or the previous complete result), never half
    written. With `step`, the folder is first checked (`check_output_dir`: never an input, a file or someone
    else's folder) and the result carries the step's marker. One writer per output at a time (`_OutputLock`):
    a concurrent one gets a DeeplightError; temp folders left by killed runs are removed. Folders and files
    written get the umask's usual modes.
    """
    if step is not None:
        check_output_dir(out_dir, step, inputs, legacy_files)
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise DeeplightError(f"{out}: already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _OutputLock(out, step):
        _recover_and_clean(out)
        if step is not None:  # again under the lock: a run that finished meanwhile may have changed `out`
            check_output_dir(out_dir, step, inputs, legacy_files)
        tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()  # not mkdtemp: its 0700 would hide the result from other users
        try:
            yield tmp
            if step is not None:
                (tmp / OUTPUT_MARKER).write_text(json.dumps({"step": step}) + "\n")
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), with the umask's usual mode (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, usual_mode())
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


def _hash_bytes(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def fingerprint_files(paths: list[str | os.PathLike]) -> str:
    """sha256 over the files' names (relative order) and bytes: the identity of a dataset split."""
    h = hashlib.sha256()
    for p in sorted(map(Path, paths)):
        h.update(p.name.encode() + b"\0")
        _hash_bytes(h, p)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: the identity of a checkpoint, whatever path names it."""
    h = hashlib.sha256()
    _hash_bytes(h, Path(path))
    return h.hexdigest()

