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

KServe's REST app serves every route, with two of ours ahead of its v1 predict and v2 infer routes for JSON
bodies (`_json_v1_route`, `_json_v2_route`): a v1 body of string values, or a v2 body of one BYTES tensor per
column, is read in one compiled pass from its bytes; any other v2 JSON body is parsed and answered by pydantic;
every other request reaches KServe's route unchanged.

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


def _is_json(content_type: str) -> bool:
    """application/json, with or without parameters (`; charset=utf-8`)."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def make_predictor(name: str, model_uri: str, threads: int | None = None) -> Any:
    """A kserve.Model that scores raw rows with the model at `model_uri` (loaded by `.load()`)."""
    import kserve
    import orjson
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

        def predict_json_records(self, body: bytes) -> dict | None:
            """{"predictions": [...]} of a v1 JSON body read without decoding it, or None when the body is not in
            the plain form that reading takes (`RowsToIds.transform_json_records`): `_json_v1_route`."""
            assert self.scorer is not None
            try:
                p = self.scorer.score_json_records(body)
            except DeeplightError as e:
                raise InvalidInput(f"bad input for a {self.scorer.schema.name} model: {e}") from None
            return None if p is None else {"predictions": p.tolist()}

        def infer_json_tensors(self, body: bytes) -> dict | None:
            """The v2 answer to a JSON inference request read without parsing it into Python objects, or None when
            the body is not in the plain form that reading takes (`RowsToIds.transform_v2_json`): `_json_v2_route`.
            The answer is the one KServe's route gives (tests/test_server.py compares them)."""
            assert self.scorer is not None
            try:
                read = self.scorer.score_v2_json(body)
            except DeeplightError as e:
                raise InvalidInput(f"bad input for a {self.scorer.schema.name} model: {e}") from None
            if read is None:
                return None
            p, request_id = read
            return {"model_name": self.name, "model_version": self.version or None,
                    "id": request_id if request_id is not None else str(uuid.uuid4()), "parameters": None,
                    "outputs": [{"name": "probability", "shape": [len(p)], "datatype": "FP64", "parameters": None,
                                 "data": p.tolist()}]}

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
            content_type = (headers or {}).get("content-type", "")
            if isinstance(payload, (bytes, bytearray)) and _is_json(content_type):
                # KServe decodes only an exact "application/json"; JSON is UTF-8 whatever the charset says
                try:
                    payload = orjson.loads(payload)
                except orjson.JSONDecodeError as e:
                    raise InvalidInput(f"Unrecognized request format: {e}") from None
            if isinstance(payload, (bytes, bytearray)):  # v1 with a non-JSON content type: raw text lines
                assert self.scorer is not None
                try:
                    sep, header = text_format(content_type, self.scorer.schema.delimiter)
                    p = self.scorer.score_lines(payload, sep, header)
                except DeeplightError as e:
                    raise InvalidInput(f"bad input for a {self.scorer.schema.name} model: {e}") from None
                return {"predictions": p.tolist()}
            if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
                raise InvalidInput('bad input: want {"instances": [{column: value, ...}, ...]} (v1) or a v2 '
                                   "inference request")
            return {"predictions": self._score(payload["instances"]).tolist()}

    return DeeplightPredictor()


def _json_v1_route(app: Any, dataplane: Any, repository: Any) -> None:
    """A v1 predict route ahead of KServe's own. A request whose body is `application/json` for a deeplight model
    is read straight into the scorer's buffers when it is in the plain form (`predict_json_records`): decoding a
    1,000-record body into Python objects (orjson) alone took longer than scoring it. Any other request (another
    content type, a CloudEvent, another model, a body in another form, or one with a malformed record) goes on to
    KServe's route unchanged, which decodes it and gives the usual answer or error."""
    import orjson
    from fastapi import APIRouter, Request, Response
    from kserve.constants.constants import V1_ROUTE_PREFIX
    from kserve.errors import ModelNotReady
    from kserve.protocol.rest.v1_endpoints import V1Endpoints

    kserve_v1 = V1Endpoints(dataplane, repository)

    async def predict(model_name: str, request: Request) -> Any:
        read = getattr(dataplane.model_registry.get_model(model_name), "predict_json_records", None)
        if read is not None:
            if not await dataplane.model_ready(model_name, True):
                raise ModelNotReady(model_name)
            answer = read(await request.body())  # Starlette keeps the body: KServe's route can read it again
            if answer is not None:
                return Response(orjson.dumps(answer), media_type="application/json")
        return await kserve_v1.predict(model_name, request)

    # this module's annotations are strings (PEP 563), which FastAPI resolves in module globals: give it types
    predict.__annotations__ = {"model_name": str, "request": Request, "return": Any}
    router = APIRouter(prefix=V1_ROUTE_PREFIX, route_class=_json_route_class())
    router.add_api_route(r"/models/{model_name}:predict", predict, response_model=None, methods=["POST"],
                         include_in_schema=False)
    app.include_router(router)


def _json_v2_route(app: Any, dataplane: Any, repository: Any) -> None:
    """A v2 infer route ahead of KServe's own, for `application/json` bodies. A body of one BYTES tensor per raw
    column with string values is read straight into the scorer's buffers (`infer_json_tensors`) and answered as
    KServe answers it. Any other body goes to the same handler as KServe's, but parsed and validated in one
    compiled pass (pydantic's `model_validate_json`) instead of `json.loads` and then pydantic, and the answer is
    serialised by pydantic instead of FastAPI's `jsonable_encoder`, which walks each of its 1,000 numbers in
    Python. Other requests (the binary tensor extension, other content types) go to KServe's route unchanged; a
    body that is not a valid inference request is HTTP 422 as there."""
    import orjson
    import pydantic
    from fastapi import APIRouter, Request, Response
    from fastapi.exceptions import RequestValidationError
    from kserve.constants.constants import V2_ROUTE_PREFIX
    from kserve.errors import ModelNotReady
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from kserve.protocol.rest.v2_endpoints import V2Endpoints

    kserve_v2 = V2Endpoints(dataplane, repository)

    async def infer(model_name: str, request: Request, response: Response) -> Any:
        body = await request.body()
        read = getattr(dataplane.model_registry.get_model(model_name), "infer_json_tensors", None)
        if read is not None:
            if not await dataplane.model_ready(model_name, True):
                raise ModelNotReady(model_name)
            answer = read(body)
            if answer is not None:
                return Response(orjson.dumps(answer), media_type="application/json")
        try:
            parsed = InferenceRequest.model_validate_json(body)
        except pydantic.ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in
                                          e.errors(include_url=False)], body=body) from None
        answer = await kserve_v2.infer(request, response, model_name, parsed)
        if isinstance(answer, Response):
            return answer
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return Response(answer.model_dump_json(by_alias=True), media_type="application/json", headers=headers)

    infer.__annotations__ = {"model_name": str, "request": Request, "response": Response, "return": Any}
    router = APIRouter(prefix=V2_ROUTE_PREFIX, route_class=_json_route_class())
    router.add_api_route(r"/models/{model_name}/infer", infer, response_model=None, methods=["POST"],
                         include_in_schema=False)
    app.include_router(router)


def _json_route_class() -> Any:
    """An APIRoute that matches only plain JSON requests (Content-Type application/json, with or without a
    charset; no CloudEvent binary headers, no binary tensor extension): any other request skips it for the next
    route, KServe's own."""
    from fastapi.routing import APIRoute
    from starlette.routing import Match

    class PlainJsonRoute(APIRoute):
        def matches(self, scope: Any) -> Any:
            headers = scope.get("headers") or ()
            content_type = next((v for k, v in headers if k == b"content-type"), b"")
            if not _is_json(content_type.decode("latin-1")) or \
                    any(k.startswith(b"ce-") or k == b"inference-header-content-length" for k, _ in headers):
                return Match.NONE, {}
            return super().matches(scope)

    return PlainJsonRoute


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

        def _register_endpoints(self, app: Any) -> None:
            _json_v1_route(app, self.dataplane, self.model_repository_extension)  # first: matched first
            _json_v2_route(app, self.dataplane, self.model_repository_extension)
            super()._register_endpoints(app)

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
