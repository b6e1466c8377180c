"""Fuzz the real HTTP server from its own OpenAPI document: >= 500 generated requests, zero 5xx.

Bodies come from the document's JSON schemas (so most reach deep validation) and from
arbitrary JSON and bytes (type confusion, truncation), sent over a real socket.
"""
import http.client
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from online.app import create_app
from online.config import ServiceConfig
from online.nearline import BusConfig, NearlineConfig

JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20)
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)


def from_schema(schema, depth=0):
    """A hypothesis strategy for (a practical subset of) JSON schema, with some off-schema noise."""
    if "oneOf" in schema:
        return st.one_of([from_schema(s, depth) for s in schema["oneOf"]])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=3)
        required = schema.get("required", [])
        optional = [k for k in props if k not in required]
        return st.builds(
            lambda req, opt: {**req, **opt},
            st.fixed_dictionaries({k: from_schema(props[k], depth + 1) for k in required}),
            st.fixed_dictionaries({}, optional={k: from_schema(props[k], depth + 1) for k in optional}),
        )
    if kind == "array":
        return st.lists(from_schema(schema["items"], depth + 1), max_size=6 if depth < 2 else 2)
    if kind == "string":
        if "pattern" in schema:
            return st.sampled_from(["llm", "retrieval", "click", "a_1", "Bad Name", ""])
        return st.text(max_size=schema.get("maxLength", 30) if schema.get("maxLength", 30) < 30 else 30)
    if kind == "integer":
        return st.integers(schema.get("minimum", -10) - 2, schema.get("maximum", 2000) + 2)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False) | st.floats(schema.get("minimum", -1.0) - 1,
                                                                          schema.get("maximum", 2.0) + 1)
    return JSON_SCALARS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bus = BusConfig(url=f"embedded://{tmp_path_factory.mktemp('fuzz') / 'bus'}")
    app = create_app(ServiceConfig(nearline=NearlineConfig(bus=bus), risk_file="conf/risk.yaml",
                                   max_body_bytes=256 * 1024))
    doc = app.test_client().get("/openapi.json").get_json()
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_port, doc
    srv.shutdown()


COUNT = {"requests": 0, "5xx": []}


def post(port, path, raw: bytes, content_type="application/json"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=raw, headers={"Content-Type": content_type})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    COUNT["requests"] += 1
    if resp.status >= 500:
        COUNT["5xx"].append((path, raw[:300], resp.status, body[:300]))
    return resp.status, body


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))


def test_fuzz_rank_and_events(server):
    port, doc = server
    rank_schema = doc["paths"]["/v1/rank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    events_schema = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    @FUZZ
    @given(st.one_of(from_schema(rank_schema), ANY_JSON))
    def fuzz_rank(body):
        status, raw = post(port, "/v1/rank", json.dumps(body).encode())
        assert status < 500
        if status >= 400:
            err = json.loads(raw)["error"]
            assert set(err) >= {"code", "message", "path"}

    @FUZZ
    @given(st.one_of(from_schema(events_schema), ANY_JSON, st.binary(max_size=64)))
    def fuzz_events(body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _ = post(port, "/v1/events", raw)
        assert status < 500

    fuzz_rank()
    fuzz_events()
    assert COUNT["requests"] >= 500, COUNT["requests"]
    assert COUNT["5xx"] == []
