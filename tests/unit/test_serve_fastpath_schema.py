"""The candidate fast path of ``parse_request`` accepts and builds exactly what the full checks do.

Every request is parsed twice, with the fast path and with it switched off: the same ``Request``,
or the same errors (paths, messages, codes) in the same order.
"""
import copy
import itertools
import math

import numpy as np
import pytest

from strategy import ValidationError, parse_request
from strategy import schema

GOOD = {"item_id": "i1", "source": "llm", "creator_id": "c1", "topic": "diy", "text": "hello world",
        "features": {"impressions": 0, "duration": 19.5, "creator_followers": 3792, "tags": ["a", 2], "s": "x"},
        "generator": {"model": "sim-llama-small", "prior_score": 0.941}}

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
        m.setattr(schema, "_fast_candidate", lambda obj: None)
        slow = run()
    assert fast == slow
    return fast


def test_each_edge_value_parses_as_the_full_checks_do(monkeypatch):
    seen = set()
    for key, values in EDGES.items():
        for value in values:
            cand = dict(GOOD, **{key: value})
            kind, _ = parse_both({"user_id": "u", "candidates": [GOOD, cand, GOOD]}, monkeypatch)
            seen.add(kind)
            without = {k: v for k, v in GOOD.items() if k != key}
            parse_both({"user_id": "u", "candidates": [without]}, monkeypatch)
    assert seen == {"ok", "error"}


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
