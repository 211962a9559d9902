"""Arrow's memory pool for the data steps.

    >>> use_jemalloc() in ("jemalloc", "mimalloc", "system")
    True
"""

from __future__ import annotations

import pyarrow as pa


def use_jemalloc() -> str:
    """Make jemalloc Arrow's default memory pool when this pyarrow build has it; returns the pool in use.

    Why: with the default mimalloc pool the hash step handed freed memory back to the OS and faulted it in
    again batch after batch (transparent huge pages, each zeroed by the kernel): a quarter of its CPU went to
    clearing pages. jemalloc keeps freed memory for reuse; on 2M Criteo rows hashing went from 2.8 to 2.35 s.
    Process-wide, so it is called by the data-step entry points (CLI handlers, pipeline steps), not the library.
    """
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except (NotImplementedError, pa.ArrowNotImplementedError):  # a build without jemalloc keeps its default
        pass
    return pa.default_memory_pool().backend_name
