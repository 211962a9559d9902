"""Schemas: every column declared with type and role; derived time features; bad declarations refused."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from deeplight.base.errors import DeeplightError
from deeplight.data.schema import AVAZU, CRITEO, Column, DatasetSchema, get_schema, valid_yymmddhh, weekday


def test_criteo_layout():
    assert CRITEO.names == ["label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]]
    assert CRITEO.delimiter == "\t" and not CRITEO.header
    fields = CRITEO.feature_fields
    assert len(fields) == 39 and len(fields) * (len(fields) - 1) // 2 == 741
    assert {f.kind for f in fields[:13]} == {"int"} and {f.kind for f in fields[13:]} == {"cat"}


def test_avazu_layout():
    assert AVAZU.names[:4] == ["id", "click", "hour", "C1"] and len(AVAZU.names) == 24
    assert AVAZU.label.name == "click" and AVAZU.header and AVAZU.delimiter == ","
    names = [f.name for f in AVAZU.feature_fields]
    assert names[:2] == ["hour_of_day", "weekday"] and "id" not in names and "hour" not in names
    assert len(names) == 23


def test_time_derivations_match_the_calendar():
    days = [dt.datetime(2014, 10, 21, 0) + dt.timedelta(hours=7 * k) for k in range(200)]
    raw = np.array([int(d.strftime("%y%m%d%H")) for d in days])
    assert weekday(raw).tolist() == [d.weekday() for d in days]
    assert valid_yymmddhh(raw).all()
    assert valid_yymmddhh(np.array([14023100, 14130100, 14102124, 15022900, 16022900])).tolist() == [
        False, False, False, False, True]


def test_get_schema_and_bad_declarations():
    assert get_schema("avazu") is AVAZU
    with pytest.raises(DeeplightError, match="unknown dataset 'kdd'.*avazu, criteo"):
        get_schema("kdd")
    with pytest.raises(DeeplightError, match="exactly one label"):
        DatasetSchema("x", ",", False, (Column("a", "cat"),))
    with pytest.raises(DeeplightError, match="derives unknown"):
        DatasetSchema("x", ",", False, (Column("y", "label"), Column("t", "time", derive=("minute",))))
