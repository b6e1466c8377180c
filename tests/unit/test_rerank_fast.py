"""``strategy.rerank.rank`` is bit-identical to the implementation it replaced (``rerank_reference.py``,
a verbatim copy of it): the same items in the same order with the same scores, predictions and
propensities to the last bit and of the same types, the same reasons, the same dropped list, or the
same error, over random slates, duplicates, sources with quotas and priors, guardrails that drop or
demote, every diversity setting (window on each key, mmr), exploration and both blend formulas."""
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategy import parse_request, strategy_from_dict
from strategy import rerank as fast

sys.path.insert(0, str(Path(__file__).parent))
import rerank_reference as reference  # noqa: E402

OBJECTIVES = {
    "click": {"event": "click", "type": "binary", "weight": 1.0},
    "like": {"event": "like", "type": "binary", "weight": 4.0},
    "watch_time": {"event": "watch", "type": "regression", "transform": "log1p", "weight": 0.5},
    "report": {"event": "report", "type": "binary", "weight": -50.0},
}
NAMES = tuple(OBJECTIVES)
SOURCES = ("llm", "retrieval", "fresh")
PROPS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def canonical(value):
    """``value`` with every float as its type and its 64 bits (NaN, -0.0 and the last bit count)."""
    if isinstance(value, float):
        return (type(value).__name__, struct.pack("<d", value))
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return (type(value).__name__, value)


def outcome(module, strategy, request, P, slate_size):
    try:
        return "ok", canonical(module.rank(strategy, request, P, slate_size).to_dict())
    except Exception as exc:  # noqa: BLE001 - the same error either way
        return "error", type(exc).__name__, str(exc)


def assert_same(strategy, request, P=None, slate_size=None):
    copy = None if P is None else np.array(P)
    old = outcome(reference, strategy, request, copy, slate_size)
    new = outcome(fast, strategy, request, None if P is None else np.array(P), slate_size)
    assert new == old
    return new


@st.composite
def strategies(draw):
    objectives = {k: dict(v) for k, v in OBJECTIVES.items()}
    if draw(st.booleans()):
        objectives["click"]["calibration"] = {"x": [0.0, 0.5, 1.0], "y": [0.0, draw(st.floats(0, 1)), 1.0]}
    if draw(st.integers(0, 4)) == 0:
        objectives["like"]["weight"] = draw(st.sampled_from([0.0, -2.0, 0.25]))
    slate = draw(st.integers(1, 25))
    spec = {"strategy": draw(st.sampled_from(["s", "feed_v1"])), "objectives": objectives, "slate_size": slate}
    if draw(st.booleans()):
        spec["blend"] = {"formula": "weighted_product", "eps": draw(st.sampled_from([1e-3, 0.1]))}
    guards = []
    for _ in range(draw(st.integers(0, 2))):
        g = {"objective": draw(st.sampled_from(NAMES)), "action": draw(st.sampled_from(["drop", "demote"]))}
        if draw(st.booleans()):
            g["max"] = draw(st.sampled_from([0.05, 0.2, 0.5, 3.0]))
        if "max" not in g or draw(st.booleans()):
            g["min"] = draw(st.sampled_from([m for m in (0.0, 0.01, 0.1) if m <= g.get("max", 1.0)]))
        guards.append(g)
    if guards:
        spec["guardrails"] = guards
    sources, slots = {}, 0
    for name in draw(st.lists(st.sampled_from(SOURCES), unique=True, max_size=3)):
        share = draw(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 1.0]))
        most = min(math.floor(share * slate + 1e-9), slate - slots)
        rule = {"max_share": share, "min_slots": draw(st.integers(0, max(0, most))),
                "prior_weight": draw(st.sampled_from([0, 0, 1, 20, 2.5]))}
        slots += rule["min_slots"]
        sources[name] = rule
    if sources:
        spec["sources"] = sources
    kind = draw(st.sampled_from(["none", "window", "mmr"]))
    if kind == "window":
        spec["rerank"] = {"diversity": {"key": draw(st.sampled_from(["topic", "creator_id", "source"])),
                                        "max_per_window": draw(st.integers(1, 3)), "window": draw(st.integers(1, 6))}}
    elif kind == "mmr":
        spec["rerank"] = {"diversity": {"key": draw(st.sampled_from(["topic", "creator_id", "source"])),
                                        "method": "mmr", "lambda": draw(st.sampled_from([0.1, 0.5, 0.7, 1.0]))}}
    spec["exploration"] = {"epsilon": draw(st.sampled_from([0.0, 0.0, 0.05, 0.3, 0.9]))}
    return strategy_from_dict(spec)


VALUES = st.one_of(st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.5, 1.0]), st.floats(0, 1))


@st.composite
def requests(draw, with_predictions: bool):
    n = draw(st.integers(0, 60))
    pool = draw(st.integers(1, 80))   # a small pool of ids: duplicates
    cands = []
    for _ in range(n):
        c = {"item_id": f"i{draw(st.integers(0, pool))}", "source": draw(st.sampled_from(SOURCES))}
        if draw(st.integers(0, 5)):
            c["topic"] = f"t{draw(st.integers(0, 4))}"
        if draw(st.integers(0, 3)):
            c["creator_id"] = f"c{draw(st.integers(0, 6))}"
        if draw(st.booleans()):
            c["generator"] = {"model": "g", "prior_score": draw(st.floats(0, 1))}
            if draw(st.booleans()):
                c["features"] = {"impressions": draw(st.one_of(st.integers(-3, 200), st.floats(0, 50), st.just("x")))}
        if with_predictions:
            c["predictions"] = {"click": draw(VALUES), "like": draw(VALUES),
                                "watch_time": draw(st.floats(0, 300)), "report": draw(VALUES)}
        cands.append(c)
    body = {"user_id": "u", "candidates": cands}
    if draw(st.booleans()):
        body["request_id"] = f"r{draw(st.integers(0, 20))}"
    if draw(st.integers(0, 3)) == 0:
        body["slate_size"] = draw(st.integers(1, 30))
    return parse_request(body)


@st.composite
def matrices(draw, n):
    cells = st.one_of(VALUES, st.floats(0, 400), st.just(math.nan)) if draw(st.integers(0, 9)) == 0 else \
        st.one_of(VALUES, st.floats(0, 400))
    return np.array([[draw(cells) for _ in NAMES] for _ in range(n)], dtype=np.float64).reshape(n, len(NAMES))


@PROPS
@given(strategies(), requests(with_predictions=False), st.data())
def test_rank_is_bit_identical_to_the_reference(strategy, request, data):
    P = data.draw(matrices(len(request.candidates)))
    slate_size = data.draw(st.one_of(st.none(), st.integers(1, 30)))
    with np.errstate(all="ignore"):
        assert_same(strategy, request, P, slate_size)


@PROPS
@given(strategies(), requests(with_predictions=True))
def test_dry_run_is_bit_identical_to_the_reference(strategy, request):
    assert_same(strategy, request)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["none", "window", "mmr"]), st.sampled_from([0.0, 0.05]))
def test_large_requests_are_bit_identical(seed, kind, eps):
    """500 candidates as the scorer ranks them (20% LLM with priors), a few duplicates."""
    rng = np.random.default_rng(seed)
    n = 500
    cands = []
    for i in range(n):
        llm = i % 5 == 0
        c = {"item_id": f"i{rng.integers(0, 480)}", "source": "llm" if llm else "retrieval",
             "topic": f"t{rng.integers(0, 16)}", "creator_id": f"c{rng.integers(0, 100)}"}
        if llm:
            c["generator"] = {"model": "g", "prior_score": float(rng.random())}
            c["features"] = {"impressions": int(rng.integers(0, 5))}
        cands.append(c)
    spec = {"strategy": "feed_v1", "objectives": OBJECTIVES, "slate_size": 20,
            "guardrails": [{"objective": "report", "max": 0.05, "action": "drop"}],
            "sources": {"llm": {"max_share": 0.3, "min_slots": 1, "prior_weight": 20}},
            "exploration": {"epsilon": eps}}
    if kind == "window":
        spec["rerank"] = {"diversity": {"key": "topic", "max_per_window": 2, "window": 5}}
    elif kind == "mmr":
        spec["rerank"] = {"diversity": {"key": "topic", "method": "mmr", "lambda": 0.7}}
    P = np.column_stack([rng.random(n) * 0.3, rng.random(n) * 0.1, rng.random(n) * 60, rng.random(n) * 0.08])
    got = assert_same(strategy_from_dict(spec), parse_request({"user_id": "u", "request_id": f"r{seed}",
                                                                "candidates": cands}), P)
    assert got[0] == "ok" and len(got[1]["items"]) == 20


def test_the_reference_is_the_replaced_implementation():
    """The oracle differs from the file it was copied from in its imports alone (git's copy of 9d95a60)."""
    text = (Path(__file__).parent / "rerank_reference.py").read_text(encoding="utf-8")
    assert "from strategy.blend import blend_utilities, calibrate, utilities" in text
    assert "def _fill_slate(strategy, kept, scores, demoted, alive, size, reasons, rng):" in text
    assert hasattr(reference, "rank") and reference.rank is not fast.rank


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_requests(n):
    s = strategy_from_dict({"strategy": "s", "objectives": OBJECTIVES, "exploration": {"epsilon": 0.5}})
    req = parse_request({"user_id": "u", "candidates": [{"item_id": f"i{k}", "source": "llm"} for k in range(n)]})
    assert_same(s, req, np.full((n, len(NAMES)), 0.01))
