"""deeplight.ops.server's JSON routes, in process: KServe's own REST app (a real DataPlane and model repository)
with the routes `deeplight serve` puts ahead of KServe's, driven by Starlette's test client.

A plain v1 JSON body is read straight into the scorer's buffers; every other request must reach KServe's route
and get the answer it gave before those routes existed. The real server process is tested in test_registry.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# Starlette's test client warns that it will move from httpx to httpx2; the client's requests are the same
pytestmark = [pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
              pytest.mark.filterwarnings("ignore:ORJSONResponse is deprecated")]  # KServe's own responses

from deeplight.data.feature_map import FeatureMap
from deeplight.data.hashing import hash_dataset
from deeplight.data.ingest import ingest
from deeplight.data.schema import get_schema
from deeplight.data.synth import synthesize


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A deeplight model directory (compact.npz + feature_map.json) for synthetic Criteo rows, and raw records."""
    from test_compact import make_model  # the compact tests' model with non-trivial random weights

    from deeplight.serve.engine import CompactModel

    d = tmp_path_factory.mktemp("served")
    synthesize("criteo", 500, 0, str(d / "raw.txt"))
    ingest("criteo", [str(d / "raw.txt")], str(d / "ingested"), split=(1.0, 0.0, 0.0), split_mode="sequential")
    hash_dataset(str(d / "ingested"), str(d / "hashed"), min_count=2)
    fmap = FeatureMap.load(d / "hashed" / "feature_map.json")
    model = make_model(dnn=(16, 8), sizes=tuple(fmap.field_sizes))
    CompactModel.from_model(model, field_names=fmap.field_names).save(d / "compact.npz")
    fmap.save(d / "feature_map.json")
    lines = (d / "raw.txt").read_text().splitlines()[:40]
    names = get_schema("criteo").names
    records = [{k: v for k, v in zip(names, line.split("\t")) if k != "label"} for line in lines]
    return d, records


@pytest.fixture
def client(model_dir, monkeypatch: pytest.MonkeyPatch):
    """(test client, the predictor, calls of its `predict`: what KServe's routes hand it)."""
    import fastapi
    import kserve.model_server as model_server
    import kserve.protocol.rest.multiprocess.server as multiprocess_server
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer
    from starlette.testclient import TestClient

    from deeplight.ops.server import _loopback_rest_server, make_predictor

    monkeypatch.setattr(model_server, "RESTServer", RESTServer)  # restored after the test
    monkeypatch.setattr(multiprocess_server, "RESTServer", RESTServer)
    _loopback_rest_server("127.0.0.1")
    predictor = make_predictor("deeplight", str(model_dir[0]))
    predictor.load()
    calls: list[type] = []
    kserve_predict = predictor.predict

    def predict(payload, headers=None, response_headers=None):
        calls.append(type(payload))
        return kserve_predict(payload, headers, response_headers)

    monkeypatch.setattr(predictor, "predict", predict)
    repo = ModelRepository()
    repo.update(predictor)
    server = model_server.RESTServer("kserve.model_server:app", DataPlane(model_registry=repo),
                                     ModelRepositoryExtension(model_registry=repo), http_port=0)
    app = fastapi.FastAPI()
    server._register_endpoints(app)
    server._add_exception_handlers(app)
    return TestClient(app, raise_server_exceptions=False), predictor, calls


V1, V2 = "/v1/models/deeplight:predict", "/v2/models/deeplight/infer"
JSON = {"content-type": "application/json"}


def test_plain_v1_json_is_read_without_kserve_and_the_rest_reaches_kserve(client, model_dir):
    c, predictor, calls = client
    records = model_dir[1]
    want = predictor.scorer.score([dict(r) for r in records])
    assert len(set(np.round(want, 6))) > 10  # the model tells the rows apart

    r = c.post(V1, content=json.dumps({"instances": records}).encode(), headers=JSON)
    assert r.status_code == 200 and calls == []  # read by our route: KServe's predict never ran
    np.testing.assert_allclose(r.json()["predictions"], want, rtol=0, atol=1e-12)
    r = c.post(V1, content=json.dumps({"instances": records[:1]}).encode(), headers=JSON)
    assert r.status_code == 200 and calls == []  # one row: the one-sample kernel (float rounding may differ)
    np.testing.assert_allclose(r.json()["predictions"], want[:1], rtol=0, atol=1e-6)

    bad = [dict(r) for r in records[:4]]
    bad[3]["I5"] = "1.5"
    r = c.post(V1, content=json.dumps({"instances": bad}).encode(), headers=JSON)
    assert r.status_code == 400 and "row 3, field 'I5': non-integer" in r.json()["error"] and calls == []

    # bodies it declines: KServe decodes them, and the answers are those of `score` on the decoded records
    numbers = [dict(r, I1=int(r["I1"])) if r["I1"] else dict(r) for r in records]
    misspelt = [dict(r) for r in records[:4]]
    misspelt[2]["C14x"] = misspelt[2].pop("C14")
    for body, status, check in (
            ({"instances": numbers}, 200, lambda got: np.testing.assert_allclose(got["predictions"], want, atol=1e-12)),
            ({"instances": misspelt}, 400, lambda got: "row 2, field 'C14x': unknown" in got["error"] or
             pytest.fail(got)),
            ({"rows": records}, 400, lambda got: "instances" in got["error"] or pytest.fail(got))):
        calls.clear()
        r = c.post(V1, content=json.dumps(body).encode(), headers=JSON)
        assert r.status_code == status and calls == [dict], (r.status_code, r.text[:300])
        check(r.json())
    # JSON with a charset is JSON (KServe hands such a body over undecoded: the predictor decodes it)
    calls.clear()
    for route_calls, body in (([], {"instances": records}), ([bytes], {"instances": numbers})):
        r = c.post(V1, content=json.dumps(body).encode(), headers={"content-type": "Application/JSON; charset=utf-8"})
        assert r.status_code == 200 and calls == route_calls, r.text[:300]
        np.testing.assert_allclose(r.json()["predictions"], want, atol=1e-12)
    # other content types never enter our route: raw text lines, a CloudEvent
    calls.clear()
    tsv = "\n".join("\t".join(r.values()) for r in records).encode()
    r = c.post(V1, content=tsv, headers={"content-type": "text/tab-separated-values; header=absent"})
    assert r.status_code == 200 and calls == [bytes]
    np.testing.assert_allclose(r.json()["predictions"], want, atol=1e-12)
    calls.clear()
    r = c.post(V1, content=json.dumps({"instances": records}).encode(),
               headers={**JSON, "ce-specversion": "1.0", "ce-source": "test", "ce-type": "t", "ce-id": "1"})
    assert calls and calls[0] is not bytes  # KServe's CloudEvent decoding ran
    assert c.post("/v1/models/other:predict", content=b'{"instances": []}', headers=JSON).status_code == 404


def test_v2_json_is_read_in_one_pass_else_parsed_by_pydantic_and_the_rest_reaches_kserve(
        client, model_dir, monkeypatch: pytest.MonkeyPatch):
    """A plain v2 body (one BYTES tensor per column, string values) is read straight into the scorer's buffers
    and answered exactly as KServe's route answers it; other JSON bodies are parsed by pydantic and go through
    KServe's handler; the binary tensor extension goes to KServe's route."""
    from kserve.protocol.rest.v2_datamodels import InferenceRequest

    c, predictor, calls = client
    records = model_dir[1]
    want = predictor.scorer.score([dict(r) for r in records])
    parsed: list[int] = []
    validate_json = InferenceRequest.model_validate_json

    def spy(body, *a, **kw):
        parsed.append(len(body))
        return validate_json(body, *a, **kw)

    monkeypatch.setattr(InferenceRequest, "model_validate_json", spy)
    tensors = [{"name": k, "shape": [len(records)], "datatype": "BYTES", "data": [r[k] for r in records]}
               for k in records[0]]
    body = json.dumps({"id": "req-1", "inputs": tensors}).encode()
    r = c.post(V2, content=body, headers=JSON)
    assert r.status_code == 200 and parsed == [] and calls == [], r.text[:300]  # neither pydantic nor KServe
    got = r.json()
    assert got["id"] == "req-1" and got["model_name"] == "deeplight" and got["outputs"][0]["name"] == "probability"
    assert got["outputs"][0]["shape"] == [len(records)] and got["outputs"][0]["datatype"] == "FP64"
    np.testing.assert_allclose(got["outputs"][0]["data"], want, rtol=0, atol=1e-12)
    # the same body through KServe's route (the binary tensor extension's header sends it there): same answer
    r = c.post(V2, content=body, headers={**JSON, "inference-header-content-length": str(len(body))})
    assert r.status_code == 200 and parsed == [] and calls, r.text[:300]
    assert r.json() == got
    # members in another order, [n, 1] shapes, no id (then a fresh one, as KServe gives), compact spacing
    calls.clear()
    other = [{"data": t["data"], "datatype": "BYTES", "shape": [len(records), 1], "name": t["name"]}
             for t in reversed(tensors)]
    r = c.post(V2, content=json.dumps({"inputs": other}, separators=(",", ":")).encode(), headers=JSON)
    assert r.status_code == 200 and parsed == [] and calls == [], r.text[:300]
    assert len(r.json()["id"]) == 36 and r.json()["id"] != got["id"]
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], want, rtol=0, atol=1e-12)
    # a bad value: the row and field, as the general route names them
    bad = json.loads(body)
    i5 = next(t for t in bad["inputs"] if t["name"] == "I5")
    i5["data"][3] = "1.5"
    r = c.post(V2, content=json.dumps(bad).encode(), headers=JSON)
    assert r.status_code == 400 and "row 3, field 'I5': non-integer" in r.json()["error"] and parsed == []

    # bodies it declines are parsed by pydantic and answered by KServe's handler, as before
    numbers = json.loads(body)
    numbers["inputs"][0] = {**numbers["inputs"][0], "data": [int(v) if v else None for v in tensors[0]["data"]]}
    with_parameters = {"inputs": tensors, "parameters": {"note": "x"}}
    for what, request in (("a number among the values", numbers), ("a parameters member", with_parameters)):
        parsed.clear()
        calls.clear()
        r = c.post(V2, content=json.dumps(request).encode(), headers=JSON)
        assert parsed and calls and r.status_code in (200, 400), (what, r.text[:300])
        if r.status_code == 200:
            np.testing.assert_allclose(r.json()["outputs"][0]["data"], want, rtol=0, atol=1e-12)
    parsed.clear()
    r = c.post(V2, content=json.dumps({"inputs": tensors[:-1]}).encode(), headers=JSON)
    assert r.status_code == 400 and "field 'C26': missing" in r.json()["error"] and parsed
    short = json.loads(body)
    short["inputs"][2]["data"].pop()
    r = c.post(V2, content=json.dumps(short).encode(), headers=JSON)
    assert r.status_code == 400, r.text[:300]
    for broken in (body[:-5], b'{"inputz": []}', b"[]"):  # not an inference request: 422, as FastAPI says it
        r = c.post(V2, content=broken, headers=JSON)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body", r.text[:300]
