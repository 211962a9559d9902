"""A/B of the engine's batch-1 call (`CompactModel.score_one`) against another git revision, in one process, on
the pruning study's models: each seed's dense model and the pruned model its operating-point search chose.

    .venv/bin/python bench/batch1_ab.py --against 9c80ba0      # the engine before 0b9e480 vs this checkout
    .venv/bin/python bench/batch1_ab.py --kernel               # the one-sample kernel (kernels.py) vs HEAD's

Both versions of deeplight/serve/engine.py (this checkout's and the revision's, from `git show`) compact the same
checkpoints and share the compiled kernels; the script checks that they score every row alike. With --kernel the
two versions are instead deeplight/serve/kernels.py's `score_one_kernel`, called directly on the same compacted
model (the engine's wrapper left out of both); their logits must agree to float rounding (rtol 1e-5). Then each model
and version is timed per call, in interleaved chunks of 300 calls (noise hits all alike), on real test-split rows
of its seed, and the medians are printed with the dense / pruned speedup each version gives. Issue 17 asks for
>= 10x at batch 1. One thread: OMP/OpenBLAS/MKL/NUMBA pinned to 1 before numpy loads. Needs the study's models
(bench/pruning_study.py --variants auto).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its thread pools

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from rows_ab import load_revision  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="the git revision to compare with (default HEAD)")
    ap.add_argument("--work", default=str(HERE / "out" / "pruning-study"))
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per model and version")
    ap.add_argument("--kernel", action="store_true", help="A/B kernels.py's one-sample kernel, not engine.py")
    a = ap.parse_args()

    from deeplight.model.checkpoint import load_model
    from deeplight.ops.sweep.measure import latency_ids
    from deeplight.serve.engine import CompactModel
    from deeplight.serve.kernels import score_one_kernel

    print(f"| seed | dense us, {a.against} -> this checkout | pruned us | speedup |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(a.against, Path(tmp), "deeplight/serve/kernels.py" if a.kernel else
                            "deeplight/serve/engine.py")
        for dataset in ("criteo", "avazu"):
            for seed in (0, 1, 2):
                base = Path(a.work) / f"{dataset}-seed{seed}"
                if not (base / "pruned-auto" / "best.pt").is_file():
                    continue
                rows = latency_ids(base / "hashed")
                calls = [np.ascontiguousarray(rows[i % len(rows)]) for i in range(a.calls)]
                fns = {}
                for kind, ckpt in (("dense", base / "dense-new" / "best.pt"), ("pruned", base / "pruned-auto" / "best.pt")):
                    model, ck = load_model(ckpt)
                    if a.kernel:
                        cm = CompactModel.from_model(model, ck.get("field_names"))
                        for version, kern in (("old", old.score_one_kernel), ("new", score_one_kernel)):
                            fns[kind, version] = (lambda k, args: lambda x: k(x, *args))(kern, cm._kargs)
                    else:
                        for version, cls in (("old", old.CompactModel), ("new", CompactModel)):
                            fns[kind, version] = cls.from_model(model, ck.get("field_names")).score_one
                    got = [[float(fns[kind, v](x)) for x in calls[:200]] for v in ("old", "new")]
                    same = np.allclose(got[0], got[1], rtol=1e-5, atol=1e-6) if a.kernel else got[0] == got[1]
                    assert same, f"{base}: {kind} scores differ between the versions"
                times: dict = {k: [] for k in fns}
                for start in range(0, a.calls, 300):
                    for k, fn in fns.items():
                        for x in calls[start:start + 300]:
                            t = time.perf_counter()
                            fn(x)
                            times[k].append(time.perf_counter() - t)
                us = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
                speed = {v: us["dense", v] / us["pruned", v] for v in ("old", "new")}
                print(f"| {dataset} {seed} | {us['dense', 'old']:.1f} -> {us['dense', 'new']:.1f} | "
                      f"{us['pruned', 'old']:.2f} -> {us['pruned', 'new']:.2f} | "
                      f"{speed['old']:.1f}x -> {speed['new']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
