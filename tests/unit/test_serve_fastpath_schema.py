"""The candidate fast paths of ``parse_request`` accept and build exactly what the full checks do,
and so does the one-pass JSON decode of a ``/v1/rank`` body (``parse_request_json``).

Every request is parsed three times: with both fast paths (the whole list at once,
``_fast_candidates``, then candidate by candidate, ``_fast_candidate``), with the per-candidate one
alone, and with both switched off: the same ``Request``, or the same errors (paths, messages,
codes) in the same order.
"""
import copy
import itertools
import json
import math
from unittest.mock import ANY

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategy import ValidationError, parse_request
from strategy import schema

GOOD = {"item_id": "i1", "source": "llm", "creator_id": "c1", "topic": "diy", "text": "hello world",
        "features": {"impressions": 0, "duration": 19.5, "creator_followers": 3792, "tags": ["a", 2], "s": "x"},
        "generator": {"model": "sim-llama-small", "prior_score": 0.941}}
# what the whole-list path takes: no list feature (the bench's and the simulated world's candidates)
PLAIN = {"item_id": "i2", "source": "retrieval", "creator_id": "c2", "topic": "gaming", "text": "a b",
         "features": {"impressions": 3, "duration": 7.25, "creator_followers": 10, "s": "x"}}
BARE = {"item_id": "i3", "source": "llm"}

EDGES = {
    "item_id": [None, "", "x" * 256, "x" * 257, 0, -5, 2 ** 64 - 1, 2 ** 70, 10 ** 400, True, False, 1.0, -0.0,
                ["a"], {"a": 1}, "12", "\u00e9\U0001f600"],
    "source": [None, "", "LLM", "llm\n", "\nllm", "a" * 32, "a" * 33, "9x", 1, True, "retrieval"],
    "creator_id": [None, "", 7, 0, 2 ** 63, True, 1.5, "c" * 257, "ok", ["c"]],
    "topic": [None, "", 3, 1.0, False, [], "t" * 256, {"t": 1}],
    "text": [None, "", 5, "t" * 20_000, "t" * 20_001, ["a"], "ünïcode"],
    "features": [None, {}, [], "x", {"k" * 128: 1}, {"k" * 129: 1}, {"a": None}, {"a": True},
                 {"a": math.inf}, {"a": -math.inf}, {"a": math.nan}, {"a": 2 ** 63}, {"a": -(2 ** 63)},
                 {"a": 2 ** 63 - 1}, {"a": 2 ** 70}, {"a": "s" * 1000}, {"a": "s" * 1001},
                 {"a": list(range(1000))}, {"a": list(range(1001))}, {"a": [1, True]}, {"a": [1.5]},
                 {"a": [None]}, {"a": []}, {"a": {"b": 1}}, {"a": 1e308}, {"a": -0.0}, {"a": 10 ** 400},
                 {"a": -(10 ** 400)}, {"a": 2 ** 64 - 1}, {"a": -(2 ** 63) - 1}, {"a": [2 ** 70, "x"]},
                 {"a": [[1]]}, {"a": [{"b": 1}]}, {"a": [False]}, {"a": False}, {"a": [[[[["deep"]]]]]}],
    "generator": [None, {}, [], "g", {"model": "m"}, {"prior_score": 0.5}, {"model": "m", "prior_score": 0},
                  {"model": "m", "prior_score": 1}, {"model": "m", "prior_score": 2}, {"model": "m", "prior_score": -0.0},
                  {"model": "m", "prior_score": 1.0000001}, {"model": "m", "prior_score": math.nan},
                  {"model": "m", "prior_score": True}, {"model": "m", "prior_score": False},
                  {"model": "m", "prior_score": "0.5"}, {"model": "m", "prior_score": 10 ** 400},
                  {"model": None, "prior_score": 0.5}, {"model": "m" * 256, "prior_score": 0.5},
                  {"model": "m" * 257, "prior_score": 0.5}, {"model": 3, "prior_score": 0.5},
                  {"model": "m", "prior_score": 0.5, "extra": 1}, {"model": "m", "extra": 1}],
    "predictions": [None, {}, {"click": 0.5}, {"click": "x"}, [], {"click": math.inf}, {"click": True},
                    {"click": 10 ** 400}],
    "unknown_key": [1],
}


def parse_both(body, monkeypatch):
    def run():
        try:
            return "ok", parse_request(copy.deepcopy(body))
        except ValidationError as exc:
            return "error", [(e.path, e.message, e.code) for e in exc.errors]

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(schema, "_fast_candidates", lambda raw: None)
        one_by_one = run()
        m.setattr(schema, "_fast_candidate", lambda obj: None)
        slow = run()
    assert fast == one_by_one == slow
    cands = body.get("candidates") if isinstance(body, dict) else None
    if isinstance(cands, list) and cands:
        batch = schema._fast_candidates(copy.deepcopy(cands))
        if batch is not None:   # it vouches only for lists the per-candidate path takes whole
            assert fast[0] == "ok" and batch == list(fast[1].candidates)
            assert batch == [schema._fast_candidate(c) for c in cands]
    return fast


@pytest.mark.parametrize("base", [GOOD, PLAIN, BARE], ids=["good", "plain", "bare"])
def test_each_edge_value_parses_as_the_full_checks_do(monkeypatch, base):
    seen = set()
    for key, values in EDGES.items():
        for value in values:
            cand = dict(base, **{key: value})
            kind, _ = parse_both({"user_id": "u", "candidates": [base, cand, base]}, monkeypatch)
            seen.add(kind)
            without = {k: v for k, v in base.items() if k != key}
            parse_both({"user_id": "u", "candidates": [without]}, monkeypatch)
            parse_both({"user_id": "u", "candidates": [cand] * 3}, monkeypatch)
    assert seen == {"ok", "error"}


def test_the_whole_list_path_takes_common_candidates():
    cands = [dict(PLAIN, item_id=f"i{i}") for i in range(5)] + [BARE, dict(BARE, generator=None, text=None)]
    cands.append(dict(PLAIN, generator={"model": "m", "prior_score": 1}, features={}))
    batch = schema._fast_candidates(cands)
    assert batch is not None and batch == [schema._fast_candidate(c) for c in cands]
    assert all(b.features is c["features"] for b, c in zip(batch, cands) if "features" in c)
    assert batch[5].features == {} and batch[5].features is not batch[6].features
    assert type(batch[-1].generator.prior_score) is float
    assert schema._fast_candidates([GOOD]) is None                  # a list feature: one by one
    assert schema._fast_candidates([PLAIN, dict(PLAIN, item_id=7)]) is None


# JSON-like values for every field of a candidate, edge cases first
FEATURE_VALUES = st.one_of(
    st.integers(-(2 ** 64), 2 ** 64), st.sampled_from([2 ** 63, 2 ** 63 - 1, -(2 ** 63), -(2 ** 63) - 1, 10 ** 400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 5e-324, -0.0]),
    st.text(max_size=3), st.sampled_from(["s" * 1000, "s" * 1001]), st.booleans(), st.none(),
    st.lists(st.one_of(st.integers(), st.text(max_size=2)), max_size=3))
IDS = st.one_of(st.sampled_from(["", "x" * 256, "x" * 257, "c1", "diy", "\u00e9"]), st.text(max_size=4),
                st.integers(), st.none(), st.booleans(), st.floats())
GENERATORS = st.one_of(
    st.none(), st.fixed_dictionaries({"model": st.one_of(st.text(max_size=3), st.sampled_from(["m" * 257]),
                                                         st.integers()),
                                      "prior_score": st.one_of(st.floats(), st.integers(-1, 2), st.booleans(),
                                                               st.sampled_from([0.0, 1.0, -0.0, 1.0000001]))}),
    st.sampled_from([{}, {"model": "m"}, {"model": "m", "prior_score": 0.5, "x": 1}, [], "g"]))
FIELDS = {
    "item_id": IDS, "source": st.one_of(st.sampled_from(["llm", "retrieval", "LLM", "a" * 33, "x\n"]), IDS),
    "creator_id": IDS, "topic": IDS, "text": st.one_of(st.none(), st.text(max_size=5), st.integers()),
    "features": st.one_of(st.dictionaries(st.sampled_from(["impressions", "duration", "k" * 129, "s"]),
                                          FEATURE_VALUES, max_size=4), st.none(), st.lists(st.integers(), max_size=1)),
    "generator": GENERATORS, "predictions": st.sampled_from([None, {}, {"click": 0.5}]),
    "unknown": st.just(1),
}


@st.composite
def candidate_lists(draw):
    """Mostly common candidates with a few fields drawn from every kind of value."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        cand = dict(draw(st.sampled_from([PLAIN, BARE, GOOD])))
        for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
            if draw(st.booleans()):
                cand[key] = draw(FIELDS[key])
            else:
                cand.pop(key, None)
        out.append(cand)
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(candidate_lists())
def test_any_candidates_parse_alike_on_every_path(monkeypatch, cands):
    parse_both({"user_id": "u", "candidates": cands}, monkeypatch)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["impressions", "duration", "s", "t"]), FEATURE_VALUES,
                                max_size=4), min_size=1, max_size=6))
def test_feature_values_parse_alike_on_every_path(monkeypatch, features):
    """Numbers of every size next to each other (the whole-list path checks them all at once)."""
    cands = [dict(PLAIN, item_id=f"i{i}", features=f) for i, f in enumerate(features)]
    parse_both({"user_id": "u", "candidates": cands}, monkeypatch)


def test_random_mixtures_parse_alike(monkeypatch):
    rng = np.random.default_rng(0)
    keys = list(EDGES)
    for _ in range(300):
        cands = []
        for _ in range(int(rng.integers(1, 6))):
            cand = dict(GOOD)
            for key in rng.choice(keys, size=int(rng.integers(0, 3)), replace=False):
                values = EDGES[key]
                cand[key] = values[int(rng.integers(len(values)))]
            cands.append(cand)
        parse_both({"user_id": "u", "candidates": cands}, monkeypatch)
    for junk in (None, 1, "c", [GOOD], True):
        parse_both({"user_id": "u", "candidates": [GOOD, junk]}, monkeypatch)


def test_fast_candidate_builds_the_same_candidate():
    kind, req = "ok", parse_request({"user_id": "u", "candidates": [GOOD, dict(GOOD, generator=None, text=None)]})
    assert kind == "ok"
    c = req.candidates[0]
    assert schema._fast_candidate(GOOD) == c and c.features is GOOD["features"]
    assert c.generator == schema.Generator("sim-llama-small", 0.941)
    assert req.candidates[1].generator is None and req.candidates[1].text is None
    assert schema._fast_candidate(dict(GOOD, item_id=12)) is None   # not an id: the full checks name it
    assert isinstance(schema._fast_candidate(dict(GOOD, generator={"model": "m", "prior_score": 1})).generator
                      .prior_score, float)


REQUEST_EDGES = {
    "user_id": [None, "", "u", "u" * 257, 7, 0, True, 1.5, 2 ** 64, ["u"], {"u": 1}],
    "request_id": [None, "", "r", 5, False, 2.0, "r" * 257],
    "slate_size": [None, 0, 1, 3, 3.0, 3.5, True, 1000, 1001, 2 ** 64, 10 ** 400, "3", -0.0],
    "strategy": [None, "", "feed_v1", "feed_v1\n", 1, True],
    "context": [None, {}, [], "c", {"a": [[["b"]]]}, {"a": [[[[[[["b"]]]]]]]}, {"a": True}],
}


def test_request_fields_parse_alike_with_any_candidates(monkeypatch):
    """The request-level checks do not depend on which path built the candidates."""
    for key, values in REQUEST_EDGES.items():
        for value in values:
            for cands in ([GOOD], [GOOD, dict(GOOD, item_id=3)], []):
                parse_both({"user_id": "u", "candidates": cands, key: value}, monkeypatch)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_whole_requests_alike(monkeypatch, n):
    cands = [dict(GOOD, item_id=f"i{i}") for i in range(n)]
    parse_both({"user_id": "u", "request_id": "r", "slate_size": 3, "candidates": cands}, monkeypatch)
    parse_both({"user_id": "u", "candidates": cands}, monkeypatch)
    for a, b in itertools.combinations(range(n), 2):
        bad = copy.deepcopy(cands)
        bad[a]["source"], bad[b]["features"] = "BAD", {"x": None}
        parse_both({"user_id": "u", "candidates": bad}, monkeypatch)


# --- the one-pass JSON path: parse_request_json(raw) -----------------------------------------------

def parse_json_both(raw: bytes, max_candidates: int = schema.DEFAULT_MAX_CANDIDATES):
    """The body's bytes through msgspec's one pass and through orjson + ``parse_request``: the one
    pass declines (None) or builds the very Request (same types: compared by repr), and declines
    whatever the full path refuses."""
    from online.app import ApiError, decode_json

    fast = schema.parse_request_json(raw, max_candidates)
    try:
        slow = "ok", parse_request(decode_json(raw), max_candidates)
    except (ValidationError, ApiError) as exc:
        slow = "error", str(exc)
    if fast is not None:
        assert slow[0] == "ok", (raw[:300], slow)
        assert repr(fast) == repr(slow[1]) and fast == slow[1]
    return fast, slow


def to_json(body) -> bytes:
    """JSON as any client may write it: Python's json, huge integers and NaN/Infinity included."""
    return json.dumps(body).encode()


@pytest.mark.parametrize("base", [GOOD, PLAIN, BARE], ids=["good", "plain", "bare"])
def test_each_edge_value_decodes_in_one_pass_as_the_full_path_does(base):
    kinds = set()
    for key, values in EDGES.items():
        for value in values:
            cand = dict(base, **{key: value})
            for cands in ([base, cand, base], [{k: v for k, v in base.items() if k != key}], [cand] * 3):
                fast, slow = parse_json_both(to_json({"user_id": "u", "candidates": cands}))
                kinds.add((fast is not None, slow[0]))
    assert kinds == {(True, "ok"), (False, "ok"), (False, "error")}
    if base is not GOOD:   # the common candidates (no list feature) take the one pass
        assert parse_json_both(to_json({"user_id": "u", "candidates": [base] * 3}))[0] is not None


@settings(max_examples=400, deadline=None)
@given(candidate_lists())
def test_any_candidates_decode_alike_in_one_pass(cands):
    parse_json_both(to_json({"user_id": "u", "candidates": cands}))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["impressions", "duration", "s", "t"]), FEATURE_VALUES,
                                max_size=4), min_size=1, max_size=6))
def test_feature_values_decode_alike_in_one_pass(features):
    parse_json_both(to_json({"user_id": "u", "candidates": [dict(PLAIN, item_id=f"i{i}", features=f)
                                                            for i, f in enumerate(features)]}))


def test_request_fields_decode_alike_in_one_pass():
    accepted = 0
    for key, values in REQUEST_EDGES.items():
        for value in values:
            for cands in ([PLAIN], [PLAIN, dict(PLAIN, item_id=3)], []):
                fast, _ = parse_json_both(to_json({"user_id": "u", "candidates": cands, key: value}))
                accepted += fast is not None
    assert accepted > 0
    cands = [dict(PLAIN, item_id=f"i{i}") for i in range(4)]
    assert parse_json_both(to_json({"user_id": "u", "candidates": cands}), max_candidates=4)[0] is not None
    assert parse_json_both(to_json({"user_id": "u", "candidates": cands}), max_candidates=3) == (None, ("error", ANY))


# bodies as bytes: what json.dumps never writes
RAW_EDGES = [
    b'{"user_id":"u","candidates":[{"item_id":"i\x01","source":"llm"}]}',        # a raw control character
    b'{"user_id":"u","candidates":[{"item_id":"i\\u0000","source":"llm"}]}',      # an escaped NUL
    b'{"user_id":"u","candidates":[{"item_id":"\\ud800","source":"llm"}]}',       # a lone surrogate
    b'{"user_id":"u","candidates":[{"item_id":"\xff","source":"llm"}]}',           # not UTF-8
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm"},]}',             # a trailing comma
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm"}]} x',            # trailing junk
    b' \n{"user_id":"u","candidates":[{"item_id":"i","source":"llm"}]}\r\n\t',     # whitespace around
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","features":{"a":01}}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","features":{"a":1.}}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","features":{"a":1e400}}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","features":{"a":-1e-400}}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","features":{"a":1E2,"b":-0}}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","features":{"a":9223372036854775808}}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","item_id":"j"}]}',  # duplicate keys
    b'{"user_id":"u","candidates":[],"candidates":[{"item_id":"i","source":"llm"}]}',
    b'{"user_id":"u","user_id":7,"candidates":[]}',
    b'{"user_id":"u","candidates":[{"item_id":"\\u00e9\\/","source":"llm","text":"\\ud83d\\ude00"}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","generator":{"model":"m","prior_score":1}}]}',
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","generator":null,"features":null}]}',
    b'{"user_id":"u","context":' + b'[' * 40 + b']' * 40 + b',"candidates":[]}',  # too deep for the schema
    b'{"user_id":"u","candidates":[{"item_id":"i","source":"llm","predictions":' + b'[' * 2000 + b']' * 2000 + b'}]}',
    b'{"user_id":"u","candidates":' + b'[' * 5000 + b']' * 5000 + b'}',
    b'[]', b'null', b'"u"', b'', b'{', b'{"user_id":"u"}', b'{"candidates":[]}', b'{"user_id":"u","candidates":{}}',
]


@pytest.mark.parametrize("raw", RAW_EDGES, ids=range(len(RAW_EDGES)))
def test_raw_bodies_decode_alike_in_one_pass(raw):
    parse_json_both(raw)
