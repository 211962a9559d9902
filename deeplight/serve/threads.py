"""The engine owns its BLAS threads: one by default, whatever OPENBLAS_NUM_THREADS says, settable (`serve.threads`).

Why: numba's np.dot (the dense DNN layers of a batch) goes through SciPy's OpenBLAS, a copy of its own that starts
one thread per core. On a loaded 2-core machine two BLAS threads made batches of 100-1,000 rows 3-23x slower than
one (bench/RESULTS.md), and a server is a loaded machine. SciPy's BLAS is loaded lazily, on numba's first BLAS
call, and threadpoolctl limits only libraries already loaded, so `pin_blas` first scores a warm-up batch that
runs a dense layer (loading the library), then sets the limit process-wide and checks that every BLAS took it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from deeplight.base.errors import DeeplightError

ENV = "DEEPLIGHT_ENGINE_THREADS"  # overrides the setting for one process (e.g. a server's pod)


def pin_blas(compact: Any, threads: int | None = None) -> dict[str, int]:
    """Load the engine's BLAS with a warm-up batch, limit every loaded BLAS to `threads` (default: $ENV, else 1),
    check it took. Returns {library path: threads}."""
    from threadpoolctl import threadpool_info, threadpool_limits

    n = int(threads if threads is not None else os.environ.get(ENV, "1"))
    if n < 1:
        raise DeeplightError(f"BLAS threads: want at least 1, got {n}")
    from deeplight.serve.kernels import SMALL_BATCH

    compact.score(np.zeros((max(16, SMALL_BATCH), compact.n_fields), np.int64))  # the tiled kernel: sgemm
    threadpool_limits(limits=n, user_api="blas")  # not a context manager: the limit stays
    info = {d["filepath"]: d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}
    wrong = {k: v for k, v in info.items() if v != n}
    if wrong:
        raise DeeplightError(f"BLAS thread limit {n} did not take: {wrong}")
    return info
