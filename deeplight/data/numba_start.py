"""Start numba without its optional SciPy and cffi bindings: ~0.3 s less start-up for `deeplight ingest`.

On its first compile or cache load, numba loads every implementation registry it has. Two of them import optional
packages the parser never uses: `numba.np.arraymath` imports `scipy.linalg` to check for BLAS (0.2-0.3 s: SciPy
pulls in `numpy.f2py`, and SciPy is here as an MLflow dependency), and numba's cffi typing imports `cffi`.
`start_without_scipy()` imports numba and loads those registries now, with `scipy` and `cffi` imports failing
meanwhile, so numba records "no BLAS, no cffi" for this process. Numba code compiled later in the same process
would take numba's loop fallback for inner products of 1-D arrays and could not call cffi functions, so call it
only in a process that runs no other numba code (the ingest command), before anything imports numba. The modules
are importable again afterwards.

    >>> import subprocess, sys
    >>> code = ("from deeplight.data.numba_start import start_without_scipy as s; print(s());"
    ...         "import sys; print('scipy' in sys.modules)")
    >>> subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    ['True', 'False']
"""

from __future__ import annotations

import importlib.abc
import sys

_HIDDEN = ("scipy", "cffi")


class _Hide(importlib.abc.MetaPathFinder):
    """Makes imports of the named top-level packages (and their submodules) fail."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is hidden while numba starts", name=fullname)
        return None


def start_without_scipy() -> bool:
    """Import numba and load its registries with SciPy and cffi hidden; True if that was done, False if it was too
    late (numba or one of those packages already imported: nothing is changed then) or numba is missing."""
    if "numba" in sys.modules or any(name in sys.modules for name in _HIDDEN):
        return False
    finder = _Hide(_HIDDEN)
    sys.meta_path.insert(0, finder)
    try:
        from deeplight.data.parser import HAVE_NUMBA, count_lines

        if not HAVE_NUMBA:
            return False
        count_lines(b"\n")  # the first call of a jitted function loads numba's registries
    finally:
        sys.meta_path.remove(finder)
    return True
