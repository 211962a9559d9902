"""Dataset schemas: one declaration per raw dataset names every column, its type and its role.

A new dataset is added by declaring a `DatasetSchema` and registering it in `SCHEMAS`; ingest, hashing,
synthesis and serving read only the schema, never a dataset name.

    >>> from deeplight.data.schema import get_schema
    >>> criteo = get_schema("criteo")
    >>> len(criteo.columns), criteo.label.name, len(criteo.feature_fields)
    (40, 'label', 39)
    >>> [f.name for f in get_schema("avazu").feature_fields][:3]
    ['hour_of_day', 'weekday', 'C1']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from deeplight.base.errors import DeeplightError

ColumnKind = Literal["label", "int", "cat", "id", "time"]


@dataclass(frozen=True)
class Column:
    """One raw column.

    kind: `label` (0/1 click), `int` (integer feature, may be empty or negative), `cat` (categorical string,
    may be empty), `id` (kept but never a feature), `time` (YYMMDDHH integer; only its `derive`d values
    are features).
    cardinality / missing / style: hints for the synthetic generator only (number of distinct values,
    share of empty values, `hex8` 8-hex-digit strings or `int` decimal strings).
    """

    name: str
    kind: ColumnKind
    derive: tuple[str, ...] = ()
    cardinality: int = 100
    missing: float = 0.0
    style: Literal["hex8", "int"] = "hex8"


@dataclass(frozen=True)
class FeatureField:
    """One model field: a raw `int` or `cat` column, or a value derived from a `time` column."""

    name: str
    source: str
    kind: Literal["int", "cat", "derived"]


def _yymmddhh_parts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    v = values.astype(np.int64)
    return v // 1_000_000, (v // 10_000) % 100, (v // 100) % 100, v % 100


def hour_of_day(values: np.ndarray) -> np.ndarray:
    """YYMMDDHH -> hour 0..23."""
    return _yymmddhh_parts(values)[3]


def weekday(values: np.ndarray) -> np.ndarray:
    """YYMMDDHH -> weekday 0 (Monday) .. 6, vectorised through numpy datetime64."""
    yy, mm, dd, _ = _yymmddhh_parts(values)
    years = (2000 + yy - 1970).astype("datetime64[Y]")
    months = years.astype("datetime64[M]") + (mm - 1)
    days = months.astype("datetime64[D]") + (dd - 1)
    # 1970-01-01 was a Thursday (weekday 3).
    return (days.astype(np.int64) + 3) % 7


def valid_yymmddhh(values: np.ndarray) -> np.ndarray:
    """Boolean mask of values that are a real calendar date and hour in YYMMDDHH form."""
    yy, mm, dd, hh = _yymmddhh_parts(values)
    ok = (values >= 0) & (values <= 99_12_31_23) & (mm >= 1) & (mm <= 12) & (dd >= 1) & (hh <= 23)
    ok &= dd <= _days_in_month(2000 + yy, np.clip(mm, 1, 12))
    return ok


def _days_in_month(year: np.ndarray, month: np.ndarray) -> np.ndarray:
    first = (year - 1970).astype("datetime64[Y]").astype("datetime64[M]") + (month - 1)
    return ((first + 1).astype("datetime64[D]") - first.astype("datetime64[D]")).astype(np.int64)


#: Derivations a `time` column may declare; each maps an int64 array to small non-negative ints.
DERIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hour_of_day": hour_of_day,
    "weekday": weekday,
}


@dataclass(frozen=True)
class DatasetSchema:
    """A raw dataset's layout: delimiter, header, columns in file order."""

    name: str
    delimiter: str
    header: bool
    columns: tuple[Column, ...]
    description: str = ""
    click_rate: float = 0.2  # typical share of clicks; the synthetic generator's default
    _by_name: dict[str, Column] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise DeeplightError(f"schema {self.name!r}: duplicate column names")
        if sum(c.kind == "label" for c in self.columns) != 1:
            raise DeeplightError(f"schema {self.name!r}: exactly one label column is required")
        for c in self.columns:
            unknown = [d for d in c.derive if d not in DERIVATIONS]
            if unknown:
                raise DeeplightError(f"schema {self.name!r}: column {c.name!r} derives unknown {unknown}")
            if c.derive and c.kind != "time":
                raise DeeplightError(f"schema {self.name!r}: only time columns derive features ({c.name!r})")
        self._by_name.update({c.name: c for c in self.columns})

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def label(self) -> Column:
        return next(c for c in self.columns if c.kind == "label")

    def column(self, name: str) -> Column:
        try:
            return self._by_name[name]
        except KeyError:
            raise DeeplightError(f"schema {self.name!r} has no column {name!r}") from None

    @property
    def feature_fields(self) -> list[FeatureField]:
        """Model fields in a fixed order: derived time features first, then int and cat columns."""
        out: list[FeatureField] = []
        for c in self.columns:
            if c.kind == "time":
                out += [FeatureField(d, c.name, "derived") for d in c.derive]
        for c in self.columns:
            if c.kind in ("int", "cat"):
                out.append(FeatureField(c.name, c.name, c.kind))
        return out


# Criteo Kaggle train.txt. Cardinality hints are scaled-down versions of the real ones (the real C3 has ~10M
# values) so that a synthetic set of ~1M rows still has a learnable head and a long tail.
_CRITEO_CAT_CARD = [1400, 550, 100_000, 50_000, 300, 24, 12_000, 630, 3, 30_000, 5_600, 80_000, 3_200,
                    27, 15_000, 60_000, 10, 5_600, 2_200, 4, 70_000, 18, 15, 40_000, 105, 30_000]
_CRITEO_CAT_MISSING = [0, 0, .03, .03, 0, .12, 0, 0, 0, 0, 0, .03, 0, 0, 0, .03, 0, 0, .44, .44, .03, .76,
                       0, .03, .44, .44]
_CRITEO_INT_MISSING = [.45, 0, .21, .22, .03, .22, .04, 0, .04, .45, .04, .76, .22]

CRITEO = DatasetSchema(
    name="criteo",
    delimiter="\t",
    header=False,
    description="Criteo Kaggle display advertising (train.txt): label, I1..I13, C1..C26, tab-separated",
    click_rate=0.22,
    columns=(
        Column("label", "label"),
        *(Column(f"I{i + 1}", "int", missing=m) for i, m in enumerate(_CRITEO_INT_MISSING)),
        *(Column(f"C{i + 1}", "cat", cardinality=k, missing=m)
          for i, (k, m) in enumerate(zip(_CRITEO_CAT_CARD, _CRITEO_CAT_MISSING))),
    ),
)

AVAZU = DatasetSchema(
    name="avazu",
    delimiter=",",
    header=True,
    description="Avazu CTR (train.csv): id, click, hour (YYMMDDHH), 21 categorical columns, comma-separated",
    click_rate=0.17,
    columns=(
        Column("id", "id"),
        Column("click", "label"),
        Column("hour", "time", derive=("hour_of_day", "weekday")),
        Column("C1", "cat", cardinality=7, style="int"),
        Column("banner_pos", "cat", cardinality=7, style="int"),
        Column("site_id", "cat", cardinality=4_000),
        Column("site_domain", "cat", cardinality=5_000),
        Column("site_category", "cat", cardinality=26),
        Column("app_id", "cat", cardinality=8_000),
        Column("app_domain", "cat", cardinality=550),
        Column("app_category", "cat", cardinality=36),
        Column("device_id", "cat", cardinality=200_000),
        Column("device_ip", "cat", cardinality=300_000),
        Column("device_model", "cat", cardinality=8_000),
        Column("device_type", "cat", cardinality=5, style="int"),
        Column("device_conn_type", "cat", cardinality=4, style="int"),
        *(Column(f"C{i}", "cat", cardinality=k, style="int")
          for i, k in zip(range(14, 22), [2_600, 8, 9, 430, 4, 68, 170, 60])),
    ),
)

SCHEMAS: dict[str, DatasetSchema] = {s.name: s for s in (CRITEO, AVAZU)}


def get_schema(name: str) -> DatasetSchema:
    """The registered schema called `name`; a clear error lists the known ones."""
    try:
        return SCHEMAS[name]
    except KeyError:
        raise DeeplightError(f"unknown dataset {name!r}; known: {', '.join(sorted(SCHEMAS))}") from None

