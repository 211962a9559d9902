"""Progress of long work: a tqdm bar on a terminal, timed log lines everywhere else (KFP's runner, a cluster pod,
CI, `make run` piped to a file), where tqdm's `disable=None` would show nothing for minutes.

    with progress(total=rows, desc="fit vocab", unit="rows") as bar:
        for batch in batches:
            bar.update(len(batch))
            bar.set_postfix(loss=f"{loss:.4f}")      # shown on the bar, and on the next log line

Off a terminal a line goes to stderr at most every `DEEPLIGHT_PROGRESS_SECONDS` seconds (default 30) and once at
the end:

    fit vocab: 1.20M/3.00M rows (40%), 41.5k rows/s, 29 s, eta 43 s, loss=0.4521

`DEEPLIGHT_PROGRESS=bar|log|off` forces one form (default: bar on a terminal, else log).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s} s"


class LogProgress:
    """The tqdm subset the project uses (update, set_postfix, close, context manager), as timed log lines."""

    def __init__(self, total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0,
                 every: float | None = None, file: TextIO | None = None, clock: Any = time.monotonic,
                 silent: bool = False):
        self.silent = silent
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = float(os.environ.get("DEEPLIGHT_PROGRESS_SECONDS", 30)) if every is None else every
        self.file, self.clock = file, clock
        self.start = self.last = clock()
        self.start_n = initial
        self.postfix = ""
        self.closed = False

    def line(self) -> str:
        elapsed = self.clock() - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{_si(self.n)}/{_si(self.total)} {self.unit}" if self.total else f"{_si(self.n)} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts += [f"{_si(rate)} {self.unit}/s", _secs(elapsed)]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_secs((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _emit(self) -> None:
        if self.silent:
            return
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self.last = self.clock()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.every:
            self._emit()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0, **tqdm_kw: Any
             ) -> Any:
    """A tqdm bar when stderr is a terminal, else a `LogProgress` (see the module docstring)."""
    form = os.environ.get("DEEPLIGHT_PROGRESS", "").lower()
    if not form:
        form = "bar" if sys.stderr.isatty() else "log"
    if form == "bar":
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=True, **tqdm_kw)
    return LogProgress(total=total, desc=desc, unit=unit, initial=initial, silent=form == "off")
