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
    "item_id": [None, "", "x" * 256, "x" * 257, 0, -5, 2 ** 70, True, 1.0, ["a"], {"a": 1}],
    "source": [None, "", "LLM", "llm\n", "a" * 32, "a" * 33, "9x", 1, True, "retrieval"],
    "creator_id": [None, "", 7, True, 1.5, "c" * 257, "ok"],
    "topic": [None, "", 3, False, [], "t" * 256],
    "text": [None, "", 5, "t" * 20_000, "t" * 20_001, ["a"], "ünïcode"],
    "features": [None, {}, [], "x", {"k" * 128: 1}, {"k" * 129: 1}, {"a": None}, {"a": True},
                 {"a": math.inf}, {"a": -math.inf}, {"a": math.nan}, {"a": 2 ** 63}, {"a": -(2 ** 63)},
                 {"a": 2 ** 63 - 1}, {"a": 2 ** 70}, {"a": "s" * 1000}, {"a": "s" * 1001},
                 {"a": list(range(1000))}, {"a": list(range(1001))}, {"a": [1, True]}, {"a": [1.5]},
                 {"a": [None]}, {"a": []}, {"a": {"b": 1}}, {"a": 1e308}, {"a": -0.0}],
    "generator": [None, {}, [], "g", {"model": "m"}, {"prior_score": 0.5}, {"model": "m", "prior_score": 0},
                  {"model": "m", "prior_score": 1}, {"model": "m", "prior_score": 2}, {"model": "m", "prior_score": -0.0},
                  {"model": "m", "prior_score": 1.0000001}, {"model": "m", "prior_score": math.nan},
                  {"model": "m", "prior_score": True}, {"model": "m", "prior_score": "0.5"},
                  {"model": None, "prior_score": 0.5}, {"model": "m" * 256, "prior_score": 0.5},
                  {"model": "m" * 257, "prior_score": 0.5}, {"model": 3, "prior_score": 0.5},
                  {"model": "m", "prior_score": 0.5, "extra": 1}, {"model": "m", "extra": 1}],
    "predictions": [None, {}, {"click": 0.5}, {"click": "x"}, [], {"click": math.inf}],
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
    assert schema._fast_candidate(dict(GOOD, item_id=12)).item_id == "12"
    assert isinstance(schema._fast_candidate(dict(GOOD, generator={"model": "m", "prior_score": 1})).generator
                      .prior_score, float)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_whole_requests_alike(monkeypatch, n):
    cands = [dict(GOOD, item_id=f"i{i}") for i in range(n)]
    parse_both({"user_id": "u", "request_id": "r", "slate_size": 3, "candidates": cands}, monkeypatch)
    parse_both({"user_id": "u", "candidates": cands}, monkeypatch)
    for a, b in itertools.combinations(range(n), 2):
        bad = copy.deepcopy(cands)
        bad[a]["source"], bad[b]["features"] = "BAD", {"x": None}
        parse_both({"user_id": "u", "candidates": bad}, monkeypatch)
