"""The registered MLflow model: a pyfunc that scores raw rows of the dataset (no torch at serving time).

    model = mlflow.pyfunc.load_model("models:/deeplight-ctr@champion")
    model.predict(raw_rows_df)      # columns of the raw dataset (label optional) -> click probabilities

Rows (a DataFrame, a dict of columns, a list of records) are checked, mapped to ids and scored by
`deeplight.serve.rows.RawRowScorer` (the label and id columns optional): one compiled pass, the engine's BLAS
pinned to one thread. The signature lists the output only (see `signature`).

Code: models from code, no pickle: `MODEL_CODE` (three lines that build a `RawRowsModel`) plus the bundled
`deeplight` package (`code_paths`), which MLflow puts on sys.path when loading.
A bad value reaches a client of `mlflow models serve` as HTTP 400 naming the row and field, never a stack trace.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from deeplight.base.errors import DeeplightError


class BadRowsError(MlflowException, DeeplightError):
    """Raw rows that cannot be scored: an MlflowException (HTTP 400 when served) and a DeeplightError."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# MLflow's models-from-code entry point, written next to the artifacts at registration: loading the model runs
# these lines (with the bundled package on sys.path) instead of unpickling an object.
MODEL_CODE = (
    '"""deeplight raw-rows pyfunc (models from code); weights come from the model\'s artifacts."""\n'
    "import mlflow\n\nfrom deeplight.ops.pyfunc import RawRowsModel\n\nmlflow.models.set_model(RawRowsModel())\n"
)


class RawRowsModel(mlflow.pyfunc.PythonModel):
    """pyfunc: raw rows of the dataset -> click probabilities (float64, one per row), via `RawRowScorer`."""

    # The signature comes from `signature()`, not from type hints: this MLflow switch (the one its ChatModel
    # uses) skips the type-hint wrapper, and with it a warning about their absence at class creation.
    _skip_type_hint_validation = True

    def load_context(self, context):  # type: ignore[no-untyped-def]
        self.load(context.artifacts["compact"], context.artifacts["feature_map"])

    def load(self, compact_path: str | Path, feature_map_path: str | Path, threads: int | None = None
             ) -> "RawRowsModel":
        """`threads`: the engine's BLAS threads (default: $DEEPLIGHT_ENGINE_THREADS, else 1)."""
        from deeplight.serve.rows import RawRowScorer

        try:
            self.scorer = RawRowScorer.load(compact_path=compact_path, feature_map_path=feature_map_path,
                                            threads=threads)
        except DeeplightError as e:
            raise DeeplightError(f"{compact_path}, {feature_map_path}: {e}") from None
        self.schema = self.scorer.schema
        return self

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return self.score_rows(model_input)

    def score_rows(self, rows: Any) -> np.ndarray:
        try:
            return self.scorer.score(rows)
        except DeeplightError as e:
            raise BadRowsError(f"bad input for a {self.schema.name} model: {e}") from None


# MLflow's wrapper asks inspect.signature(python_model.predict) on every call whether it takes `params`: ~30 us,
# an eighth of a one-row prediction (interleaved A/B, bench/RESULTS.md). A signature computed once answers at once.
RawRowsModel.predict.__signature__ = inspect.signature(RawRowsModel.predict)  # type: ignore[attr-defined]


def signature(schema: Any) -> Any:
    """Outputs only. An input schema would make MLflow check every raw column on every call (6-20 ms, measured:
    bench/RESULTS.md) and drop columns it does not know before our code sees them, so a misspelt field would be
    scored as missing; `RowsToIds` checks names, types and values itself and names the row and field."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    outputs = Schema([TensorSpec(np.dtype(np.float64), (-1,), "probability")])
    return ModelSignature(inputs=None, outputs=outputs)


def input_example(fmap: Any) -> Any:
    """Two raw rows without label: frequent (vocab) values, then every feature column missing."""
    import pandas as pd

    from deeplight.data.schema import get_schema

    schema = get_schema(fmap.dataset)
    frequent = {f.source: f.vocab[0] for f in fmap.fields if f.kind == "cat" and f.vocab}
    value = {"int": "1", "cat": "a", "time": "14102100", "id": "0"}
    first = {c.name: frequent.get(c.name, value[c.kind]) for c in schema.columns if c.kind != "label"}
    second = {k: (v if schema.column(k).kind in ("time", "id") else None) for k, v in first.items()}
    return pd.DataFrame([first, second])
