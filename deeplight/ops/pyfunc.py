"""The registered MLflow model: a pyfunc that scores raw rows of the dataset (no torch at serving time).

    model = mlflow.pyfunc.load_model("models:/deeplight-criteo@champion")
    model.predict(raw_rows_df)      # columns of the raw dataset (label optional) -> click probabilities

Rows are validated by `deeplight.data.validate` (the label and id columns optional), mapped to ids by the feature
map, scored by the compact engine. Code: models from code, no pickle: `MODEL_CODE` (three lines that build a
`RawRowsModel`) plus the bundled `deeplight` package (`code_paths`), which MLflow puts on sys.path when loading.
A bad value reaches a client of `mlflow models serve` as HTTP 400 naming the row and field, never a stack trace.
"""

from __future__ import annotations

import math
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
    """pyfunc: raw rows of the dataset -> click probabilities (float64, one per row)."""

    # The signature comes from `signature()`, not from type hints: this MLflow switch (the one its ChatModel
    # uses) skips the type-hint wrapper, and with it a warning about their absence at class creation.
    _skip_type_hint_validation = True

    def load_context(self, context):  # type: ignore[no-untyped-def]
        self.load(context.artifacts["compact"], context.artifacts["feature_map"])

    def load(self, compact_path: str | Path, feature_map_path: str | Path) -> "RawRowsModel":
        from deeplight.serve.engine import CompactModel
        from deeplight.data.feature_map import FeatureMap
        from deeplight.data.schema import get_schema

        self.compact = CompactModel.load(compact_path)
        self.feature_map = FeatureMap.load(feature_map_path)
        if (self.compact.field_names, self.compact.field_sizes) != (self.feature_map.field_names,
                                                                     self.feature_map.field_sizes):
            raise DeeplightError(f"{compact_path} and {feature_map_path} disagree on fields or their sizes")
        self.schema = get_schema(self.feature_map.dataset)
        self.optional = optional_columns(self.schema)
        return self

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return self.score_rows(model_input)

    def score_rows(self, rows: Any) -> np.ndarray:
        from deeplight.data.validate import parse_records

        records = to_records(rows)
        if not records:
            return np.zeros(0, np.float64)
        try:
            table = parse_records(self.schema, records, optional=self.optional)
            ids = self.feature_map.transform(table)
        except DeeplightError as e:
            raise BadRowsError(f"bad input for a {self.schema.name} model: {e}") from None
        return self.compact.predict_proba(ids).astype(np.float64)


def optional_columns(schema: Any) -> tuple[str, ...]:
    """Raw columns a request may leave out: the label and id columns (not features)."""
    return tuple(c.name for c in schema.columns if c.kind in ("label", "id"))


def to_records(rows: Any) -> list[dict[str, Any]]:
    """A DataFrame, list of dicts or dict of columns -> records of plain Python values.

    pandas stores a number column with a gap as float (3 -> 3.0) and a gap as NaN: integral floats go back to
    int and NaN to None, so `3` stays a valid integer (and category key) while 3.5 is still refused.
    """
    import pandas as pd

    if isinstance(rows, dict):
        rows = [rows] if not any(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in rows.values()) \
            else pd.DataFrame(rows)
    if isinstance(rows, pd.DataFrame):
        columns = {str(k): [_plain(v) for v in rows[k].astype(object).tolist()] for k in rows.columns}
        return [dict(zip(columns, vals)) for vals in zip(*columns.values())] if columns else [{}] * len(rows)
    if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
        return [{str(k): _plain(v) for k, v in r.items()} for r in rows]
    raise BadRowsError(f"expected a DataFrame or a list of row objects, got {type(rows).__name__}")


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ in ("NAType", "NaTType"):
        return None  # pandas' missing markers: None, NaN, pd.NA, pd.NaT
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def signature(schema: Any) -> Any:
    """Every raw column, type Any (values are checked by parse_records), required unless optional."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

    optional = optional_columns(schema)
    inputs = Schema([ColSpec(AnyType(), c.name, required=c.name not in optional) for c in schema.columns])
    outputs = Schema([TensorSpec(np.dtype(np.float64), (-1,), "probability")])
    return ModelSignature(inputs=inputs, outputs=outputs)


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
