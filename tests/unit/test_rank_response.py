"""``/v1/rank`` answers through ``online.app.json_response`` (orjson) what it answered through Flask's
``jsonify``: the same status, the same ``Content-Type``, the same JSON once parsed (NaN, -0.0 and the
last bit of every float included), for any value the helper is given and for every body the endpoint
is sent, valid or not (its 4xx errors too)."""
import json
import math
import struct

import numpy as np
import pytest
from flask import Flask, Response, jsonify
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import online.app as app_mod
from online.app import create_app, json_response
from online.config import ServiceConfig
from online.nearline import BusConfig, NearlineConfig

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])


def canonical(value):
    """A parsed JSON value with floats as their 64 bits, so NaN equals NaN and -0.0 is not 0.0."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return (type(value).__name__, value)


def parsed(response):
    """Status, content type and body of a response, the body parsed by the stdlib (which reads
    the ``NaN`` Flask writes)."""
    return response.status_code, response.headers["Content-Type"], canonical(json.loads(response.get_data()))


class Sub(int):
    pass


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1), st.integers(), st.floats(),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.1, 1e-05, 1e16, -0.0, 5e-324, 1.7e308]),
    st.text(), st.sampled_from(["null", "\ud800", "é\u2028", "\x00", "a\"b\\c"]),
    st.floats(0, 1).map(np.float64), st.integers(0, 9).map(Sub),
)
KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["item_id", "null", "Z", "a", "é"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(KEYS, inner, max_size=5),
    st.dictionaries(st.one_of(st.integers(0, 3), KEYS), inner, max_size=3)), max_leaves=30)


@pytest.fixture(scope="module")
def flask_app():
    return Flask("t")


@PROPS
@given(VALUES, st.sampled_from([200, 201, 202, 400, 404]))
def test_json_response_is_jsonify(flask_app, value, status):
    with flask_app.app_context():
        try:
            old = jsonify(value)
        except TypeError:   # Flask cannot write it (a non-str key next to a str one): neither may the helper
            with pytest.raises(TypeError):
                json_response(value, status)
            return
        old.status_code = status
        new = json_response(value, status)
    assert parsed(new) == parsed(old)
    assert new.headers["Content-Type"] == "application/json"
    assert new.get_data().endswith(b"\n")


def test_the_fast_path_is_taken_for_a_plain_body(flask_app):
    body = {"items": [{"item_id": "é", "score": 0.1, "rank": 1, "ok": True}], "b": [1.5e-07, -0.0]}
    with flask_app.app_context():
        new = json_response(body)
        old = jsonify(body)
    assert new.get_data() != old.get_data()   # orjson's bytes (UTF-8, shortest floats) ...
    assert parsed(new) == parsed(old)         # ... the same JSON
    assert new.get_data() == b'{"b":[1.5e-7,-0.0],"items":[{"item_id":"\xc3\xa9","ok":true,"rank":1,"score":0.1}]}\n'


@pytest.mark.parametrize("value", [{"x": math.nan}, {"x": math.inf}, [-math.inf], {"x": "null"}, {"x": None},
                                   {"x": 2 ** 64}, {1: "a"}, {"x": np.float64(0.5)}, {"x": "\udc00"}, [Sub(3)]])
def test_what_orjson_would_write_otherwise_goes_through_jsonify(flask_app, value):
    with flask_app.app_context():
        assert json_response(value, 202).get_data() == jsonify(value).get_data()
        assert json_response(value, 202).status_code == 202


# ---------------------------------------------------------------- the endpoint, old helper vs new


@pytest.fixture
def clients(tmp_path, monkeypatch, root):
    """``post(body) -> (new, old)``: the same POST /v1/rank to two apps of the same config, one as
    served (orjson) and one with Flask's jsonify as the response helper (the code before)."""
    def app(name):
        made = create_app(ServiceConfig(risk_file=str(root / "conf/risk.yaml"), max_candidates=50,
                                        nearline=NearlineConfig(bus=BusConfig(url=f"embedded://{tmp_path / name}"))))
        scorer = made.extensions["stratarank"]
        scorer.follower.stop()   # no real-time features: what an app logged never changes its next answer
        scorer.follower, scorer.store = None, None
        return made

    new, old = app("new").test_client(), app("old").test_client()

    def jsonify_response(body, status=200):
        response = jsonify(body)
        response.status_code = status
        return response

    def post(data: bytes):
        got = new.post("/v1/rank", data=data, content_type="application/json")
        with monkeypatch.context() as m:
            m.setattr(app_mod, "json_response", jsonify_response)
            want = old.post("/v1/rank", data=data, content_type="application/json")
        return got, want

    return post


IDS = st.one_of(st.sampled_from(["a", "b", "null", "é", "i\u2028", "x" * 256]), st.text(min_size=1, max_size=6))
CANDIDATE = st.fixed_dictionaries(
    {"item_id": IDS, "source": st.sampled_from(["llm", "retrieval", "fresh"] * 10 + ["Bad"])},
    optional={"topic": st.one_of(st.none(), IDS), "creator_id": st.one_of(st.none(), IDS, IDS, IDS, st.just(7)),
              "text": st.sampled_from(["a miracle cure", "call 555-123-4567", "hello", "nul\x00l"]),
              "features": st.dictionaries(st.sampled_from(["impressions", "duration", "x"]),
                                          st.one_of(st.integers(-5, 10), st.floats(0, 100), st.text(max_size=3)),
                                          max_size=3),
              "generator": st.fixed_dictionaries({"model": st.just("g"), "prior_score": st.floats(0, 1.01)})})
BODY = st.fixed_dictionaries(
    {"user_id": IDS, "candidates": st.lists(CANDIDATE, max_size=30)},
    optional={"request_id": IDS, "slate_size": st.integers(0, 40), "strategy": st.sampled_from(["feed_v1", "nope"]),
              "context": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)})


@PROPS
@given(BODY)
def test_rank_answers_as_it_did_with_jsonify(clients, body):
    got, want = clients(json.dumps(body).encode())
    assert parsed(got) == parsed(want)
    assert got.headers["Content-Type"] == want.headers["Content-Type"]
    STATUSES.append(got.status_code)


STATUSES: list = []


def test_most_generated_bodies_were_ranked():
    """The property above ran on answers, not on errors alone (this file's tests run in order)."""
    if len(STATUSES) >= 100:
        assert STATUSES.count(200) >= len(STATUSES) / 4


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"user_id": "u"}', b'{"user_id": "u", "candidates": 3}',
                                 b'{"user_id": "u", "candidates": [{"item_id": "a", "source": "x"}], "strategy": "z"}',
                                 b'{"user_id": "u", "candidates": [{"item_id": NaN, "source": "x"}]}'])
def test_rank_errors_are_unchanged(clients, raw):
    got, want = clients(raw)
    assert 400 <= got.status_code < 500
    assert parsed(got) == parsed(want) and got.get_data() == want.get_data()


def test_the_example_request(clients, root, monkeypatch):
    body = json.loads((root / "conf/examples/request.json").read_text())
    for cand in body["candidates"]:
        cand.pop("predictions")
    served = []
    monkeypatch.setattr(app_mod, "Response", lambda *a, **kw: served.append(a[0]) or Response(*a, **kw))
    got, want = clients(json.dumps(body).encode())
    assert served and served[0] == got.get_data()   # orjson wrote it, no fallback
    assert got.status_code == 200 and parsed(got) == parsed(want)
    assert got.get_data() == want.get_data()   # ASCII, plain floats: even the bytes are Flask's
