"""A tracking URI with `user:password@` (issue 18, item 2): deeplight hands MLflow the URI without them (moved to
MLFLOW_TRACKING_USERNAME / _PASSWORD, the same basic auth), so nothing MLflow prints can show them; errors are
redacted. The end-to-end check against a real `mlflow server` is test_registry.py's
test_no_credential_in_the_tracking_uri_is_ever_printed."""

from __future__ import annotations

import os

import pytest

from deeplight.cli.main import main
from deeplight.ops.tracking import tracking_uri

VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the variables set; whatever the test or deeplight sets is undone afterwards."""
    for var in VARS:
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    return monkeypatch


def test_credentials_move_out_of_the_uri(env: pytest.MonkeyPatch):
    env.setenv("MLFLOW_TRACKING_URI", "https://al%40ice:p%3Ass@mlflow.example.com:8443/prefix")
    assert tracking_uri() == "https://mlflow.example.com:8443/prefix"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com:8443/prefix"  # the steps inherit it
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("al@ice", "p:ss")


def test_credentials_in_the_environment_win_and_a_lone_user_is_not_printed(env: pytest.MonkeyPatch):
    env.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    env.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    env.setenv("MLFLOW_TRACKING_URI", "http://alice:pw@127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-env"
    env.delenv("MLFLOW_TRACKING_USERNAME")
    env.delenv("MLFLOW_TRACKING_PASSWORD")
    env.setenv("MLFLOW_TRACKING_URI", "http://token-only@127.0.0.1:5000")  # nothing to move it to: kept, quiet
    assert tracking_uri() == "http://token-only@127.0.0.1:5000"
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    env.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x/mlflow.db")
    assert tracking_uri() == "sqlite:////tmp/x/mlflow.db"


def test_errors_and_help_show_no_credentials(env: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture):
    raw = tmp_path / "x.txt"
    raw.write_text("")
    # A DeeplightError quoting a URI with credentials (an s3-style URL in an input name) is printed redacted.
    assert main(["ingest", "--input", "http://alice:hunter22@host/data.tsv", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "hunter22" not in err and "http://***@host/data.tsv" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in " ".join(capsys.readouterr().out.split())
