"""Checkpoints: plain tensors and Python scalars only, written atomically, read with `weights_only=True`.

A model file can therefore never run code when loaded (no pickled classes), and a run killed during a write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from deeplight.base.errors import DeeplightError
from deeplight.base.files import usual_mode


def save(obj: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, usual_mode())  # mkstemp's 0600 would hide the model from a step running as another user
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DeeplightError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe or corrupt file: refuse with the reason, never fall back to pickle
        raise DeeplightError(f"{path}: not a loadable deeplight checkpoint ({e.__class__.__name__}: {e})") from None


MODEL_KEYS = ("spec", "model", "config")  # what every deeplight model checkpoint (best.pt, last.pt) holds


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A deeplight model checkpoint as a dict; any other loadable file is refused with one clear error."""
    ck = load(path)
    if not isinstance(ck, dict) or any(k not in ck for k in MODEL_KEYS) or not isinstance(ck["spec"], dict) \
            or "field_sizes" not in ck["spec"]:
        raise DeeplightError(f"{path}: not a deeplight checkpoint (want a best.pt or last.pt written by "
                             "`deeplight train` or `deeplight prune`)")
    return ck


def load_model(path: str | Path, ck: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The one checkpoint -> model loader: (DeepFwFM in eval mode, the checkpoint dict). `ck`: the checkpoint
    already read from `path` with `load_checkpoint` (the model is built from it; the file is not read again)."""
    from deeplight.model.deepfwfm import DeepFwFM

    ck = load_checkpoint(path) if ck is None else ck
    try:
        model = DeepFwFM.from_spec(ck["spec"])
        model.load_state_dict(ck["model"])
    except (KeyError, TypeError, ValueError, RuntimeError, DeeplightError) as e:
        raise DeeplightError(f"{path}: not a deeplight checkpoint ({e})") from None
    return model.eval(), ck
