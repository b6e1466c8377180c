"""Fuzz the real HTTP server from its own OpenAPI document: >= 500 generated requests, zero 5xx.

Bodies come from the document's JSON schemas (so most reach deep validation), the same with a
wrong type in any field, arbitrary JSON, and hostile bytes: nesting thousands of levels deep,
sizes around the body limit, number literals JSON has no room for (NaN, Infinity, 1e400, 400
digits), bytes that are not UTF-8, NUL, lone surrogates, duplicated keys, truncation. Every answer
is a 2xx or a 4xx with the error envelope, and the server still answers ``/healthz`` after.
"""
import http.client
import json
import threading
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from online.app import create_app
from online.config import ServiceConfig
from online.corpus import CorpusConfig
from online.nearline import BusConfig, NearlineConfig
from online.retrieval import RetrievalConfig
from strategy.schema import MAX_DEPTH

MAX_BODY = 256 * 1024
JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20)
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)


class Raw(bytes):
    """Bytes written into a body as they are: what ``json.dumps`` would refuse or rewrite. ``kind``
    names the shape, so the test can check that the generator reached every one of them."""

    def __new__(cls, data: bytes, kind: str):
        raw = super().__new__(cls, data)
        raw.kind = kind
        return raw


class Pairs(list):
    """An object written from ``(key, value)`` pairs: a key may come twice."""


def nested(levels: int, inner: bytes = b"0", objects: bool = False) -> Raw:
    """``levels`` arrays (or objects, each under the key "k") inside one another around ``inner``."""
    opening, closing = (b'{"k": ', b"}") if objects else (b"[", b"]")
    return Raw(opening * levels + inner + closing * levels, "deep")


RAW_NUMBERS = [Raw(b, "number") for b in (b"NaN", b"Infinity", b"-Infinity", b"-NaN", b"1e400", b"-1e400", b"-0",
                                          b"-0.0", b"1e-400", b"9" * 400, b"-" + b"1" * 5000, b"18446744073709551616",
                                          b"0.1e1", b"1E+2")]
RAW_STRINGS = [Raw(b'"%s"' % b, kind) for b, kind in (
    (b"\\ud800", "surrogate"), (b"x\\udfff", "surrogate"), (b"\\ude00\\ud83d", "surrogate"),
    (b"\xed\xa0\x80", "surrogate"), (b"caf\xe9", "not_utf8"), (b"\xff\xfe", "not_utf8"), (b"\xc0\xaf", "not_utf8"),
    (b"a\\u0000b", "nul"), (b"\x00", "nul"), (b"\\\\u0000", "nul"), (b"\\ud83d\\ude00", "string"))]
DEEP = st.sampled_from([2, 7, 8, 9, 50, 1023, 1024, 1025, 3000, 20_000]).flatmap(
    lambda n: st.sampled_from([nested(n), nested(n, b'"x"', objects=True), nested(n, b"{}")]))
# anything in place of a field's value: another type, a literal JSON lacks, or a deep nest
WRONG = st.one_of(JSON_SCALARS, st.sampled_from(RAW_NUMBERS + RAW_STRINGS), DEEP, ANY_JSON)


def encode(value) -> bytes:
    """``value`` as a JSON body, with :class:`Raw` parts as they are and :class:`Pairs` as objects."""
    if isinstance(value, Raw):
        SENT[value.kind] += 1
        return bytes(value)
    if isinstance(value, (dict, Pairs)):
        pairs = value.items() if isinstance(value, dict) else value
        return b"{" + b", ".join(encode(k) + b": " + encode(v) for k, v in pairs) + b"}"
    if isinstance(value, list):
        return b"[" + b", ".join(encode(v) for v in value) + b"]"
    return json.dumps(value).encode()


def mostly(good, bad, one_in: int = 8):
    """``good``, and ``bad`` once in ``one_in`` draws."""
    return st.integers(0, one_in - 1).flatmap(lambda k: bad if k == 0 else good)


def from_schema(schema, depth=0, noisy=False):
    """A hypothesis strategy for (a practical subset of) JSON schema, with some off-schema noise;
    ``noisy`` puts a wrong value (:data:`WRONG`) in any field now and then, and a key twice."""
    strategy = _from_schema(schema, depth, noisy)
    if schema.get("nullable"):
        strategy = st.none() | strategy
    return mostly(strategy, WRONG) if noisy and depth else strategy


def _from_schema(schema, depth, noisy):
    if "oneOf" in schema:
        return st.one_of([from_schema(s, depth, noisy) for s in schema["oneOf"]])
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from([*schema["enum"], "Human", "", "llm "])
    if kind == "object":
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(st.text(max_size=8), JSON_SCALARS, max_size=3)
        required = schema.get("required", [])
        optional = [k for k in props if k not in required]
        body = st.builds(
            lambda req, opt: {**req, **opt},
            st.fixed_dictionaries({k: from_schema(props[k], depth + 1, noisy) for k in required}),
            st.fixed_dictionaries({}, optional={k: from_schema(props[k], depth + 1, noisy) for k in optional}),
        )
        if not noisy:
            return body
        twice = st.tuples(body, st.sampled_from(list(props)), WRONG).map(
            lambda t: Pairs([*t[0].items(), (t[1], t[2])]))   # the key again, with another value
        return mostly(body, twice)
    if kind == "array":
        return st.lists(from_schema(schema["items"], depth + 1, noisy), max_size=6 if depth < 2 else 2)
    if kind == "string":
        if "pattern" in schema:
            return st.sampled_from(["llm", "retrieval", "click", "a_1", "Bad Name", "", "llm\n"])
        longest = schema.get("maxLength", 30)
        edges = st.sampled_from(["x" * longest, "x" * (longest + 1)]) if "maxLength" in schema else st.nothing()
        return st.text(max_size=min(longest, 30)) | edges | st.sampled_from(RAW_STRINGS)
    if kind == "integer":
        return (st.integers(schema.get("minimum", -10) - 2, schema.get("maximum", 2000) + 2)
                | st.sampled_from([2**63, 2**64 - 1, 2**64, -2**63 - 1, 10**30]) | st.sampled_from(RAW_NUMBERS))
    if kind == "number":
        return (st.floats(allow_nan=False, allow_infinity=False)
                | st.floats(schema.get("minimum", -1.0) - 1, schema.get("maximum", 2.0) + 1)
                | st.sampled_from([0, -0.0, 1, 2**64, 1e308, 5e-324]) | st.sampled_from(RAW_NUMBERS))
    return JSON_SCALARS


def mutated(raw: bytes, how: str, at: int, junk: bytes) -> Raw:
    """``raw`` damaged: a byte replaced or inserted, cut short, re-encoded, behind a BOM."""
    at = at % (len(raw) + 1)
    return Raw({"replace": raw[:at] + junk + raw[at + 1:], "insert": raw[:at] + junk + raw[at:], "truncate": raw[:at],
                "utf16": raw.decode("utf-8", "replace").encode("utf-16"), "bom": b"\xef\xbb\xbf" + raw}[how],
               f"mutated_{how}")


def sized(target: int) -> Raw:
    """A valid /v1/rank body of exactly ``target`` bytes (``context.pad`` fills it)."""
    pad = b'{"user_id": "u", "candidates": [], "context": {"pad": ""}}'
    return Raw(pad.replace(b'""', b'"' + b"x" * (target - len(pad)) + b'"'), "size")


def hostile(valid):
    """Bodies built to break the decoder rather than the validator."""
    sizes = st.sampled_from([MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, MAX_BODY + 4096, 3 * MAX_BODY])
    return st.one_of(
        DEEP,
        st.tuples(valid, st.sampled_from(["replace", "insert", "truncate", "utf16", "bom"]), st.integers(0, 2**16),
                  st.sampled_from([b"\x00", b"\xff", b"\x80", b"\xed\xa0\x80", b"[", b"NaN", b'"', b"\\"])).map(
            lambda t: mutated(encode(t[0]), *t[1:])),
        sizes.map(sized),
        st.sampled_from(RAW_NUMBERS + RAW_STRINGS),
        st.binary(max_size=64).map(lambda b: Raw(b, "binary")),
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, two_tower):
    bus = BusConfig(url=f"embedded://{tmp_path_factory.mktemp('fuzz') / 'bus'}")
    corpus = CorpusConfig(path=str(tmp_path_factory.mktemp("fuzz-corpus") / "corpus.db"))
    retrieval = RetrievalConfig(model=two_tower["name"], registry=two_tower["registry"], sync_interval_s=0.05)
    app = create_app(ServiceConfig(nearline=NearlineConfig(bus=bus), risk_file="conf/risk.yaml",
                                   max_body_bytes=MAX_BODY, corpus=corpus, retrieval=retrieval))
    doc = app.test_client().get("/openapi.json").get_json()
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_port, doc
    srv.shutdown()


COUNT = {"requests": 0, "5xx": [], "statuses": Counter(), "items_written": 0, "feeds_with_items": 0,
         "retrieved": 0}
SENT: Counter = Counter()   # kind of Raw part -> times it went into a body


def call(port, method, path, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def post(port, path, raw: bytes):
    """POST ``raw``; any 4xx must carry the error envelope (code, message and path, all strings)."""
    status, body = call(port, "POST", path, raw)
    COUNT["requests"] += 1
    COUNT["statuses"][status] += 1
    if status >= 500:
        COUNT["5xx"].append((path, raw[:300], status, body[:300]))
    assert status < 500, (raw[:300], body[:300])
    answer = json.loads(body)
    if status >= 400:
        assert {k: type(v) for k, v in answer["error"].items() if k != "details"} == dict.fromkeys(
            ("code", "message", "path"), str), answer
    return status, answer


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


FUZZED_POSTS = ("/v1/rank", "/v1/events", "/v1/items", "/v1/feed", "/v1/retrieve")


def test_fuzz_every_post_endpoint(server):
    port, doc = server
    posted = {p for p, ops in doc["paths"].items() if "requestBody" in ops.get("post", {})}
    assert posted == set(FUZZED_POSTS), "a POST endpoint of the OpenAPI document is not fuzzed"
    body_of = {p: doc["paths"][p]["post"]["requestBody"] for p in FUZZED_POSTS}
    schemas = {p: b["content"]["application/json"]["schema"] for p, b in body_of.items()}
    assert {b["x-max-depth"] for b in body_of.values()} == {MAX_DEPTH}

    def bodies(path):
        return st.one_of(from_schema(schemas[path]), from_schema(schemas[path], noisy=True), ANY_JSON)

    @FUZZ
    @given(bodies("/v1/rank"))
    def fuzz_rank(body):
        status, answer = post(port, "/v1/rank", encode(body))
        if status == 200:
            assert isinstance(answer["items"], list) and isinstance(answer["dropped"], list)

    @FUZZ
    @given(st.one_of(bodies("/v1/events"), st.binary(max_size=64).map(lambda b: Raw(b, "binary"))))
    def fuzz_events(body):
        status, answer = post(port, "/v1/events", encode(body))
        if status == 202:
            assert isinstance(answer["accepted"], int)

    @FUZZ
    @given(bodies("/v1/items"))
    def fuzz_items(body):
        raw = encode(body)
        status, answer = post(port, "/v1/items", raw)
        if status == 200:
            assert answer["accepted"] == answer["created"] + answer["updated"] + answer["expired"] >= 1
            COUNT["items_written"] += answer["created"] + answer["updated"]
            items = json.loads(raw)["items"]   # what the server read (a key given twice keeps its last value)
            mortal = any(i.get("expires_at") is not None or i.get("ttl_s") is not None for i in items)
            for item in items:   # every write that was stored is readable, by the id it was given
                got_status, got = get_item(port, item["item_id"])
                if not mortal:   # none of them can have expired since: all of them are stored
                    assert got_status == 200 and got["item_id"] == item["item_id"], got
                else:
                    assert got_status == 200 or (got_status == 404 and got["error"]["code"] == "unknown_item"), got

    @FUZZ
    @given(bodies("/v1/feed"))
    def fuzz_feed(body):   # after fuzz_items: the corpus holds what it wrote
        status, answer = post(port, "/v1/feed", encode(body))
        if status == 200:
            assert all(item["retrieved_by"] for item in answer["items"])
            COUNT["feeds_with_items"] += bool(answer["items"])

    @FUZZ
    @given(bodies("/v1/retrieve"))
    def fuzz_retrieve(body):
        status, answer = post(port, "/v1/retrieve", encode(body))
        if status == 200:
            COUNT["retrieved"] += len(answer["items"])
        else:
            assert status in (400, 404, 413, 415), (status, answer)

    @HOSTILE
    @given(st.sampled_from(list(FUZZED_POSTS)).flatmap(
        lambda path: st.tuples(st.just(path), hostile(from_schema(schemas[path])))))
    def fuzz_hostile(case):
        path, raw = case
        status, answer = post(port, path, encode(raw))
        if raw.kind == "size" and len(raw) > MAX_BODY:
            assert status == 413 and answer["error"]["code"] == "body_too_large"

    fuzz_rank()
    fuzz_events()
    fuzz_items()
    fuzz_feed()
    fuzz_retrieve()
    fuzz_hostile()
    assert COUNT["requests"] >= 1400, COUNT["requests"]
    assert COUNT["items_written"], "no generated /v1/items body was valid"
    assert COUNT["feeds_with_items"] and COUNT["retrieved"], "no feed or retrieve answered from the corpus"
    assert COUNT["5xx"] == []
    reached = {"number", "surrogate", "not_utf8", "nul", "deep", "size", "binary", "mutated_replace"}
    assert reached <= set(SENT), SENT   # the generator really sent every hostile shape
    assert COUNT["statuses"][200] and COUNT["statuses"][202] and COUNT["statuses"][400] and COUNT["statuses"][413]
    assert call(port, "GET", "/healthz") == (200, b'{"status":"ok"}\n')


def get_item(port, item_id: str):
    """GET /v1/items/<item_id> (its UTF-8 bytes percent-encoded, a lone surrogate's too: not UTF-8); any
    4xx carries the error envelope."""
    from urllib.parse import quote

    status, body = call(port, "GET", "/v1/items/" + quote(item_id.encode("utf-8", "surrogatepass"), safe=""))
    COUNT["requests"] += 1
    assert status < 500, (item_id, body[:300])
    answer = json.loads(body)
    if status >= 400:
        assert {k: type(v) for k, v in answer["error"].items() if k != "details"} == dict.fromkeys(
            ("code", "message", "path"), str), answer
    return status, answer


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=300) | st.sampled_from(["/", "a/b", "..", ".", "a%2F", "x?y#z", "é", "\ud800", "a/", "//x", "a//b", " ", "0\n", "\n", "a\r\nb"]))
def test_fuzz_get_item(server, item_id):
    port, doc = server
    assert "/v1/items/{item_id}" in doc["paths"]
    status, answer = get_item(port, item_id)
    assert status in (200, 404), (status, answer)
    if status == 200:
        assert answer["item_id"] == item_id
    elif item_id:   # any id reaches the corpus (not the router's own 404)
        assert answer["error"]["code"] == "unknown_item", (item_id, answer)


@pytest.mark.parametrize("path", list(FUZZED_POSTS))
def test_limits_at_their_edges(server, path):
    """The boundaries a random draw may miss: nesting around orjson's 1024 levels and bodies at the size limit."""
    port, _ = server
    for levels in (1022, 1023, 1024, 1025, 1026, 30_000):   # 30,000 objects: 210 kB, within the limit
        assert post(port, path, nested(levels))[0] == 400
        assert post(port, path, nested(levels, objects=True))[0] == 400
    assert post(port, "/v1/rank", sized(MAX_BODY))[0] == 200
    assert post(port, path, sized(MAX_BODY + 1))[0] == 413
    assert call(port, "GET", "/healthz")[0] == 200
