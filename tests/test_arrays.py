"""deeplight.base.arrow: the same arrays as pyarrow's own conversions, and data-step processes that never load pandas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deeplight.base.arrow import from_numpy, string_array, to_numpy, valid_mask
from deeplight.data.synth import synthesize

DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64, np.float32, np.float64, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_numpy_equals_pa_array(dtype):
    rng = np.random.default_rng(0)
    values = (rng.integers(0, 100, 1000) % (2 if dtype is np.bool_ else 100)).astype(dtype)
    mask = rng.random(1000) < 0.2
    assert from_numpy(values).equals(pa.array(values))
    got = from_numpy(values, mask=mask)
    assert got.equals(pa.array(values, mask=mask))
    assert got.null_count == int(mask.sum())
    strided = values[::3]  # not contiguous
    assert from_numpy(strided).equals(pa.array(strided))
    assert from_numpy(values[:0]).equals(pa.array(values[:0]))


def test_from_numpy_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="1-D"):
        from_numpy(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="mask shape"):
        from_numpy(np.zeros(3), mask=np.zeros(2, bool))
    with pytest.raises(TypeError, match="numeric or bool"):
        from_numpy(np.array(["a"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_numpy_equals_arrow_to_numpy_on_slices(dtype):
    rng = np.random.default_rng(1)
    values = (rng.integers(0, 100, 1000) % (2 if dtype is np.bool_ else 100)).astype(dtype)
    arr = pa.array(values)
    for part in (arr, arr.slice(13, 500), arr.slice(1000)):
        np.testing.assert_array_equal(to_numpy(part), part.to_numpy(zero_copy_only=False))
    mask = rng.random(1000) < 0.3
    with_nulls = pa.array(values, mask=mask).slice(7, 600)
    want = np.where(mask[7:607], values[7:607].dtype.type(1), values[7:607])
    np.testing.assert_array_equal(to_numpy(with_nulls, fill=1), want)
    for part in (with_nulls, with_nulls.slice(3, 250), pa.array(values, mask=mask).slice(1, 9)):
        np.testing.assert_array_equal(valid_mask(part), part.is_valid().to_numpy(zero_copy_only=False))
    assert valid_mask(arr) is None


def test_to_numpy_rejects_strings():
    with pytest.raises(TypeError, match="numeric or bool"):
        to_numpy(pa.array(["a"]))


def test_string_array_equals_pa_array():
    values = ["", "a", "héllo", "x" * 300, "0a1b2c3d"]
    assert string_array(values).equals(pa.array(values, pa.string()))
    assert string_array([]).equals(pa.array([], pa.string()))


def test_data_step_commands_never_import_pandas(tmp_path: Path):
    """pyarrow would import pandas (~0.25 s, a tenth of a small ingest) on a pa.array / pa.scalar / to_numpy
    call; each data step is its own short process, so none of its code paths may make one. Exercises the compiled
    and exact ingest paths (a bad row), both hash modes, applying a fitted map, and Criteo and Avazu. The ingest command
    also never loads SciPy (numba would, for its BLAS check: `deeplight.data.numba_start`), and all of them freeze their
    start-up objects."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    probe = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print('PANDAS_LOADED', 'pandas' in sys.modules,"
             " 'SCIPY_LOADED', 'scipy' in sys.modules, 'FROZEN', __import__('gc').get_freeze_count() > 0))\n"
             "sys.argv = ['deeplight'] + sys.argv[1:]\n"
             "runpy.run_module('deeplight.cli', run_name='__main__')\n")

    def run(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "PANDAS_LOADED False" in proc.stdout, (args, proc.stdout[-500:])
        assert "FROZEN True" in proc.stdout, (args, proc.stdout[-500:])  # start-up objects exempt from GC
        if args[0] == "ingest":
            assert "SCIPY_LOADED False" in proc.stdout, (args, proc.stdout[-500:])

    for dataset in ("criteo", "avazu"):
        raw = tmp_path / f"{dataset}.txt"
        synthesize(dataset, 3000, seed=3, out=str(raw))
        lines = raw.read_bytes().splitlines(keepends=True)
        raw.write_bytes(b"".join(lines[:1500] + [b"not,a\tvalid row\n"] + lines[1500:]))
        ing = tmp_path / f"{dataset}_ing"
        run("ingest", "--dataset", dataset, "--input", str(raw), "--out", str(ing))
        run("hash", "--input", str(ing), "--out", str(tmp_path / f"{dataset}_vocab"), "--min-count", "2")
        run("hash", "--input", str(ing), "--out", str(tmp_path / f"{dataset}_hashed"), "--buckets", "1000")
        run("apply-features", "--feature-map", str(tmp_path / f"{dataset}_vocab" / "feature_map.json"),
            "--input", str(ing), "--out", str(tmp_path / f"{dataset}_applied"))
