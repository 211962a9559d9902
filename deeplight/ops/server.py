"""`deeplight serve`: a KServe predictor (Open Inference Protocol v2 and v1) for a registered deeplight model.

    deeplight serve --model models:/deeplight-ctr@champion [--port 8080] [--host 127.0.0.1]
    deeplight serve --model out/registered_model_dir          # an MLflow model dir, or a dir with compact.npz

    POST /v2/models/deeplight/infer   {"inputs": [{"name": "I1", "shape": [2], "datatype": "BYTES", "data": ["5", ""]},
                                                  ... one tensor per raw column ...]}
        -> {"outputs": [{"name": "probability", "datatype": "FP64", "shape": [2], "data": [...]}]}
    POST /v1/models/deeplight:predict {"instances": [{"I1": "5", "C1": "68fd1e64", ...}, ...]}
        -> {"predictions": [...]}
    POST /v1/models/deeplight:predict   Content-Type: text/tab-separated-values (or text/csv)
        the rows as lines of the dataset's own files (train.txt / train.csv: with or without label and id,
        or under a header line) -> {"predictions": [...]}: parsed straight into the scorer's buffers, the
        fastest way in for large batches

The model is loaded once, at start-up, from its artifacts (compact.npz + feature_map.json) and scored by
`deeplight.serve.rows.RawRowScorer`: no torch, no pyfunc wrapper, the engine's BLAS pinned to `serve.threads`.
A bad request (a missing or unknown field, a bad value) is HTTP 400 naming the row and field.

`models:/NAME@ALIAS` is resolved to a version when the server starts (logged, and reported as the model's
version in /v2/models/NAME). A new champion is picked up by a restart (on a cluster: a new revision of the
InferenceService, which `deeplight promote` can trigger), never by a running server changing under its traffic.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from deeplight.base.errors import DeeplightError

log = logging.getLogger("deeplight.serve")


def resolve_model(uri: str) -> tuple[Path, str]:
    """A model URI -> (local directory holding compact.npz and feature_map.json, version label).

    models:/NAME@ALIAS and models:/NAME/VERSION go through the MLflow registry ($MLFLOW_TRACKING_URI); a local
    directory may be an MLflow model (artifacts/ inside) or hold the two files itself."""
    if uri.startswith("models:/"):
        import mlflow

        from deeplight.ops.tracking import client, redact, tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        name, _, ref = uri[len("models:/"):].partition("@")
        c = client()
        try:
            if ref:
                mv = c.get_model_version_by_alias(name, ref)
            else:
                name, _, number = name.partition("/")
                mv = c.get_model_version(name, number)
        except Exception as e:  # noqa: BLE001 - an unknown name/alias/version is the user's error
            raise DeeplightError(f"{uri}: not found in the registry at {redact(tracking_uri())} ({e})") from None
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}"))
        return _artifact_dir(local, uri), f"{name}/{mv.version}"
    path = Path(uri)
    if not path.exists():
        raise DeeplightError(f"{uri}: no such model directory (or use models:/NAME@ALIAS)")
    return _artifact_dir(path, uri), path.name


def _artifact_dir(path: Path, uri: str) -> Path:
    for d in (path, path / "artifacts"):
        if (d / "compact.npz").is_file() and (d / "feature_map.json").is_file():
            return d
    raise DeeplightError(f"{uri}: no compact.npz and feature_map.json (a deeplight registered model) in it")


def _columns_v2(request: Any) -> dict[str, np.ndarray]:
    """v2 InferRequest -> {column: 1-D values}: one tensor per raw column, shape [n] or [n, 1]; BYTES are UTF-8
    text (an undecodable value is an error naming row and field)."""
    cols: dict[str, np.ndarray] = {}
    n = None
    for inp in request.inputs:
        shape = list(inp.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise DeeplightError(f"field {inp.name!r}: shape {shape}, expected [n] or [n, 1]")
        if n is not None and shape[0] != n:
            raise DeeplightError(f"field {inp.name!r}: {shape[0]} rows, but the other inputs have {n}")
        n = shape[0]
        data = inp.data
        if inp.datatype == "BYTES" and inp._raw_data is None and type(data) is list and len(data) == n:
            # JSON text, already str: handed over as is (the scorer joins it into one buffer; a Python loop
            # over the values here cost more than scoring them)
            cols[inp.name] = data
            continue
        try:
            values = inp.as_numpy().reshape(-1)
        except Exception as e:  # noqa: BLE001 - data that does not match its shape or datatype
            raise DeeplightError(f"field {inp.name!r} ({inp.datatype}, shape {shape}): {e}") from None
        if inp.datatype == "BYTES":
            out = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                if isinstance(v, bytes):
                    try:
                        v = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise DeeplightError(f"row {i}, field {inp.name!r}: not UTF-8 text") from None
                out[i] = v
            values = out
        cols[inp.name] = values
    if not cols:
        raise DeeplightError("no input tensors: send one per raw column")
    return cols


TEXT_TYPES = {"text/tab-separated-values": "\t", "text/csv": ",", "text/plain": None}


def text_format(content_type: str, default_sep: str) -> tuple[str, bool | None]:
    """(separator, header) of a raw-lines request body from its Content-Type: text/tab-separated-values (tab),
    text/csv (comma), text/plain (the dataset's own); `; header=present|absent` (RFC 4180's parameter) says
    whether the first line names the columns, else a first line of column names is recognised as a header."""
    media, *params = [p.strip() for p in content_type.split(";")]
    media = media.lower()
    if media not in TEXT_TYPES:
        raise DeeplightError(f"content type {content_type!r}: send application/json (v1 instances), or raw lines "
                             f"as {', '.join(TEXT_TYPES)}")
    header = None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "header":
            value = value.strip().strip('"').lower()
            if value not in ("present", "absent"):
                raise DeeplightError(f"content type {content_type!r}: header={value!r}, want present or absent")
            header = value == "present"
    return TEXT_TYPES[media] or default_sep, header


def make_predictor(name: str, model_uri: str, threads: int | None = None) -> Any:
    """A kserve.Model that scores raw rows with the model at `model_uri` (loaded by `.load()`)."""
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.errors import InvalidInput

    from deeplight.serve.rows import RawRowScorer

    class DeeplightPredictor(kserve.Model):
        def __init__(self) -> None:
            super().__init__(name)
            self.scorer: RawRowScorer | None = None
            self.version = ""

        def load(self) -> bool:
            directory, self.version = resolve_model(model_uri)
            self.scorer = RawRowScorer.load(directory, threads=threads)
            log.info("loaded %s (%s) from %s", model_uri, self.version, directory)
            self.ready = True
            return self.ready

        def _score(self, rows: Any) -> np.ndarray:
            assert self.scorer is not None
            try:
                return self.scorer.score(rows)
            except DeeplightError as e:
                raise InvalidInput(f"bad input for a {self.scorer.schema.name} model: {e}") from None

        def predict(self, payload: Any, headers: dict[str, str] | None = None,
                    response_headers: dict[str, str] | None = None) -> Any:
            if isinstance(payload, InferRequest):
                try:
                    cols = _columns_v2(payload)
                except DeeplightError as e:
                    raise InvalidInput(f"bad input: {e}") from None
                p = self._score(cols)
                out = InferOutput(name="probability", shape=[len(p)], datatype="FP64")
                out.set_data_from_numpy(p, binary_data=False)
                return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                     infer_outputs=[out],
                                     model_version=self.version)
            if isinstance(payload, (bytes, bytearray)):  # v1 with a non-JSON content type: raw text lines
                assert self.scorer is not None
                try:
                    sep, header = text_format((headers or {}).get("content-type", ""), self.scorer.schema.delimiter)
                    p = self.scorer.score_lines(payload, sep, header)
                except DeeplightError as e:
                    raise InvalidInput(f"bad input for a {self.scorer.schema.name} model: {e}") from None
                return {"predictions": p.tolist()}
            if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
                raise InvalidInput('bad input: want {"instances": [{column: value, ...}, ...]} (v1) or a v2 '
                                   "inference request")
            return {"predictions": self._score(payload["instances"]).tolist()}

    return DeeplightPredictor()


def _loopback_rest_server(host: str, timings: bool = False) -> None:
    """kserve 0.21 binds its REST server to 0.0.0.0 with no setting for it; bind `host` instead (uvicorn reads
    config.host only when it binds). gRPC stays off. KServe's timing middleware is left out unless `timings`
    (--access-log): it names every request by trying each of KServe's ~40 routes in turn (a profile of one-row
    requests: ~40 route matches a request), and its only output is the kserve.trace log lines, which are off
    without --access-log."""
    import kserve.model_server as model_server
    import kserve.protocol.rest.multiprocess.server as multiprocess_server
    from kserve.protocol.rest.server import RESTServer

    class HostRESTServer(RESTServer):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.config.host = host

        def _add_middlewares(self, app: Any) -> None:
            if timings:
                super()._add_middlewares(app)

    model_server.RESTServer = HostRESTServer
    multiprocess_server.RESTServer = HostRESTServer


def serve(model_uri: str, name: str = "deeplight", host: str = "127.0.0.1", port: int = 8080,
          threads: int | None = None, access_log: bool = False) -> None:
    """Load the model, then serve it until stopped (SIGTERM/SIGINT). Blocks; call it from the main thread.

    `access_log`: a log line per request (uvicorn's access log and KServe's request timings). Off by default:
    at thousands of requests a second they cost more than scoring one row and fill the pod's log (on a cluster
    the ingress / Knative queue-proxy logs requests already)."""
    # kserve reads KSERVE_LOGLEVEL and parses sys.argv when imported: set the one, keep ours away from the other
    os.environ.setdefault("KSERVE_LOGLEVEL", "WARNING")
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
    finally:
        sys.argv = argv
    predictor = make_predictor(name, model_uri, threads)
    predictor.load()  # fail before binding the port: a bad model URI is an error, not an unready server
    _loopback_rest_server(host, timings=access_log)
    server = kserve.ModelServer(http_port=port, workers=1, enable_grpc=False, enable_latency_logging=False)
    per_request = logging.INFO if access_log else logging.WARNING
    for logger_name in ("uvicorn.access", "kserve.trace"):  # after ModelServer(), which configures logging
        logging.getLogger(logger_name).setLevel(per_request)
    server.start([predictor])
