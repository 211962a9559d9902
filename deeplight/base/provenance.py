"""Where a result came from: code version and data identity, recorded with every run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import deeplight


def code_version() -> str:
    """`DEEPLIGHT_CODE_VERSION` (set in the image), else the git commit of this checkout (+dirty), else the
    package version."""
    if os.environ.get("DEEPLIGHT_CODE_VERSION"):
        return os.environ["DEEPLIGHT_CODE_VERSION"]
    root = Path(deeplight.__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return deeplight.__version__
