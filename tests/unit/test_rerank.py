"""Blend formulas and re-ranking rules: hand computations and property-based invariants."""
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategy import blend, parse_request, rank, strategy_from_dict

OBJECTIVES = {
    "click": {"event": "click", "type": "binary", "weight": 1.0},
    "like": {"event": "like", "type": "binary", "weight": 4.0},
    "watch_time": {"event": "watch", "type": "regression", "transform": "log1p", "weight": 0.5},
    "report": {"event": "report", "type": "binary", "weight": -50.0},
}


def make_strategy(**extra):
    return strategy_from_dict({"strategy": "t", "objectives": OBJECTIVES, **extra})


def make_request(rows, request_id="r1", slate_size=None):
    cands = []
    for i, row in enumerate(rows):
        cand = {"item_id": row.get("item_id", f"i{i}"), "source": row.get("source", "retrieval"),
                "topic": row.get("topic"), "predictions": row["predictions"]}
        if "prior" in row:
            cand["generator"] = {"model": "g", "prior_score": row["prior"]}
            cand["features"] = {"impressions": row.get("impressions", 0)}
        cands.append(cand)
    body = {"user_id": "u", "request_id": request_id, "candidates": cands}
    if slate_size:
        body["slate_size"] = slate_size
    return parse_request(body)


def preds(click=0.1, like=0.05, watch_time=10.0, report=0.0):
    return {"click": click, "like": like, "watch_time": watch_time, "report": report}


# ------------------------------------------------------------------ blend


@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_weighted_sum_equals_the_hand_computation(n, seed):
    rng = np.random.default_rng(seed)
    P = np.column_stack([rng.random(n), rng.random(n), rng.random(n) * 100, rng.random(n)])
    got = blend(make_strategy(), P)
    for i in range(n):
        c, l, w, r = P[i]
        assert got[i] == pytest.approx(1.0 * c + 4.0 * l + 0.5 * math.log1p(w) - 50.0 * r, rel=1e-12, abs=1e-12)


def test_weighted_product_equals_the_hand_computation():
    s = make_strategy(blend={"formula": "weighted_product", "eps": 1e-3})
    P = np.array([[0.2, 0.1, 30.0, 0.01], [0.5, 0.0, 0.0, 0.2]])
    got = blend(s, P)
    for i, (c, l, w, r) in enumerate(P):
        hand = (c + 1e-3) ** 1.0 * (l + 1e-3) ** 4.0 * (math.log1p(w) + 1e-3) ** 0.5 * math.exp(-50.0 * r)
        assert got[i] == pytest.approx(hand, rel=1e-10)


def test_calibration_map_is_applied_before_the_blend():
    objectives = {"click": {"event": "click", "type": "binary", "weight": 1.0,
                            "calibration": {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.1, 0.3]}}}
    s = strategy_from_dict({"strategy": "c", "objectives": objectives})
    assert blend(s, np.array([[0.25], [0.75]])).tolist() == pytest.approx([0.05, 0.2])


def test_blend_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        blend(make_strategy(), np.zeros((3, 2)))


# ------------------------------------------------------------------ rules, by example


def test_order_by_score_dedupe_and_guardrail_drop():
    s = make_strategy(guardrails=[{"objective": "report", "max": 0.05}])
    req = make_request([
        {"item_id": "a", "predictions": preds(click=0.1)},
        {"item_id": "b", "predictions": preds(click=0.3)},
        {"item_id": "a", "predictions": preds(click=0.9)},
        {"item_id": "c", "predictions": preds(click=0.9, report=0.2)},
    ])
    out = rank(s, req)
    assert [i.item_id for i in out.items] == ["b", "a"]
    assert [i.rank for i in out.items] == [1, 2]
    assert {(d.item_id, d.reason) for d in out.dropped} == {("a", "duplicate"), ("c", "guardrail:report>0.05")}
    assert out.items[0].reasons == ["score"]


def test_guardrail_demote_puts_items_last_with_a_reason():
    s = make_strategy(guardrails=[{"objective": "click", "min": 0.05, "action": "demote"}])
    out = rank(s, make_request([{"predictions": preds(click=0.01, like=0.5)}, {"predictions": preds(click=0.2)}]))
    assert [i.item_id for i in out.items] == ["i1", "i0"]
    assert out.items[1].reasons == ["guardrail:demote(click<0.05)"]


def test_llm_prior_shrinks_towards_the_prior_quantile():
    s = make_strategy(sources={"llm": {"prior_weight": 20}})
    rows = [{"predictions": preds(click=c)} for c in (0.1, 0.2, 0.3, 0.4)]
    rows.append({"source": "llm", "prior": 1.0, "impressions": 5, "predictions": preds(click=0.0)})
    out = rank(s, make_request(rows))
    base = blend(s, np.array([[r["predictions"][k] for k in s.objective_names] for r in rows]))
    q = np.quantile(base, 1.0)
    llm = next(i for i in out.items if i.source == "llm")
    assert llm.score == pytest.approx((20 * q + 5 * base[-1]) / 25)
    assert llm.reasons == ["llm_prior(k=20,n=5)"]
    # with many observed impressions the model's own score dominates
    rows[-1]["impressions"] = 1e9
    llm = next(i for i in rank(s, make_request(rows)).items if i.source == "llm")
    assert llm.score == pytest.approx(base[-1], abs=1e-6)


def test_min_slots_promotes_the_best_llm_item():
    s = make_strategy(sources={"llm": {"min_slots": 1, "max_share": 0.5}}, slate_size=3)
    rows = [{"predictions": preds(click=0.5 + i / 100)} for i in range(5)]
    rows.append({"source": "llm", "predictions": preds(click=0.0)})
    out = rank(s, make_request(rows))
    assert [i.source for i in out.items].count("llm") == 1
    assert "quota:min_slots(llm)" in out.items[-1].reasons


def test_max_share_leaves_a_short_slate_and_says_why():
    s = make_strategy(sources={"llm": {"max_share": 0.5}}, slate_size=4)
    rows = [{"source": "llm", "predictions": preds(click=0.1 * i)} for i in range(4)]
    out = rank(s, make_request(rows))
    assert len(out.items) == 2
    assert [d.reason for d in out.dropped] == ["quota:llm.max_share"] * 2


def test_diversity_window_moves_a_third_same_topic_item_down():
    s = make_strategy(rerank={"diversity": {"key": "topic", "max_per_window": 2, "window": 3}})
    rows = [{"topic": "a", "predictions": preds(click=0.9 - i / 10)} for i in range(3)]
    rows.append({"topic": "b", "predictions": preds(click=0.1)})
    out = rank(s, make_request(rows))
    assert [i.item_id for i in out.items] == ["i0", "i1", "i3", "i2"]
    assert "diversity:topic" in out.items[3].reasons


def test_mmr_prefers_a_new_topic_when_scores_are_close():
    s = make_strategy(rerank={"diversity": {"key": "topic", "method": "mmr", "lambda": 0.5}})
    rows = [{"topic": "a", "predictions": preds(click=0.50)}, {"topic": "a", "predictions": preds(click=0.49)},
            {"topic": "b", "predictions": preds(click=0.45)}]
    assert [i.item_id for i in rank(s, make_request(rows)).items] == ["i0", "i2", "i1"]


def test_exploration_is_seeded_by_request_id_and_reports_propensities():
    s = make_strategy(exploration={"epsilon": 0.5})
    rows = [{"predictions": preds(click=i / 100)} for i in range(50)]
    first = [i.item_id for i in rank(s, make_request(rows, "req-A")).items]
    assert first == [i.item_id for i in rank(s, make_request(rows, "req-A")).items]
    slates = {tuple(i.item_id for i in rank(s, make_request(rows, f"req-{k}")).items) for k in range(5)}
    assert len(slates) > 1
    out = rank(s, make_request(rows, "req-A"))
    assert all(0 < i.propensity <= 1 for i in out.items)
    assert any("exploration" in i.reasons for i in out.items)


def test_request_slate_size_wins_over_the_strategy():
    rows = [{"predictions": preds(click=i / 100)} for i in range(30)]
    assert len(rank(make_strategy(slate_size=20), make_request(rows, slate_size=5)).items) == 5


def test_missing_prediction_names_the_field():
    from strategy import ValidationError

    req = make_request([{"predictions": {"click": 0.1}}])
    with pytest.raises(ValidationError, match=r"candidates\[0\]\.predictions\.like: required"):
        rank(make_strategy(), req)


# ------------------------------------------------------------------ invariants, property-based

SOURCES = ("retrieval", "llm", "ads")
TOPICS = ("a", "b", "c", "d", None)


@st.composite
def scenario(draw):
    n = draw(st.integers(0, 60))
    rows = []
    for i in range(n):
        row = {
            "item_id": f"i{draw(st.integers(0, n + 3))}",  # duplicates happen
            "source": draw(st.sampled_from(SOURCES)),
            "topic": draw(st.sampled_from(TOPICS)),
            "predictions": preds(
                click=draw(st.floats(0, 1)), like=draw(st.floats(0, 1)),
                watch_time=draw(st.floats(0, 500)), report=draw(st.floats(0, 0.2)),
            ),
        }
        if row["source"] == "llm" and draw(st.booleans()):
            row["prior"] = draw(st.floats(0, 1))
            row["impressions"] = draw(st.integers(0, 100))
        rows.append(row)
    slate = draw(st.integers(1, 25))
    share = draw(st.sampled_from([0.2, 0.3, 0.5, 1.0]))
    min_slots = draw(st.integers(0, math.floor(share * slate)))
    extra = {
        "slate_size": slate,
        "guardrails": [{"objective": "report", "max": draw(st.sampled_from([0.05, 0.1, 0.3]))}],
        "sources": {"llm": {"max_share": share, "min_slots": min_slots, "prior_weight": 10}},
        "exploration": {"epsilon": draw(st.sampled_from([0.0, 0.1, 0.5]))},
    }
    if draw(st.booleans()):
        extra["rerank"] = {"diversity": {"key": "topic", "max_per_window": draw(st.integers(1, 3)),
                                         "window": draw(st.integers(2, 6))}}
    return make_strategy(**extra), make_request(rows, request_id=f"r{draw(st.integers(0, 9))}")


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(scenario())
def test_invariants_hold(case):
    s, req = case
    out = rank(s, req)
    ids = [i.item_id for i in out.items]
    # the slate never exceeds slate_size and never repeats an item
    assert len(ids) <= s.slate_size and len(ids) == len(set(ids))
    # a guardrail-dropped item never appears
    dropped_by_guardrail = {d.item_id for d in out.dropped if d.reason.startswith("guardrail:")}
    first_seen = {}
    for c in req.candidates:
        first_seen.setdefault(c.item_id, c)
    assert not dropped_by_guardrail & set(ids)
    assert all(first_seen[i].predictions["report"] <= s.guardrails[0].max for i in ids)
    # quotas hold whenever feasible
    rule = s.sources["llm"]
    eligible = [c for c in first_seen.values() if c.predictions["report"] <= s.guardrails[0].max]
    size = min(s.slate_size, len(eligible))
    n_llm = sum(1 for i in out.items if i.source == "llm")
    assert n_llm <= math.floor(rule.max_share * size + 1e-9)
    llm_available = sum(1 for c in eligible if c.source == "llm")
    assert n_llm >= min(rule.min_slots, llm_available, math.floor(rule.max_share * size + 1e-9))
    # the slate is as full as the quotas allow
    non_llm_available = len(eligible) - llm_available
    assert len(ids) == min(size, non_llm_available + math.floor(rule.max_share * size + 1e-9))
    # the same request gives the same slate
    assert [i.item_id for i in rank(s, req).items] == ids
    # diversity holds in every window unless the rule had to be relaxed for lack of candidates
    if s.diversity is not None:
        topics = [first_seen[i].topic for i in ids]
        relaxed = [any(r.startswith("diversity:relaxed") for r in it.reasons) for it in out.items]
        for end in range(len(topics)):
            window = range(max(0, end - s.diversity.window + 1), end + 1)
            if topics[end] is not None and not relaxed[end]:
                same = sum(1 for k in window if topics[k] == topics[end])
                assert same <= s.diversity.max_per_window
    assert all(it.reasons for it in out.items)


@PROPS
@given(st.integers(1, 3), st.integers(2, 6), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_diversity_holds_whenever_candidates_allow_it(per, window, slate, seed):
    """With every topic plentiful, the window rule is never relaxed and always holds."""
    rng = np.random.default_rng(seed)
    topics = [f"t{k}" for k in range(window)]
    rows = [{"topic": topics[k % window], "predictions": preds(click=float(rng.random()))} for k in range(window * slate)]
    s = make_strategy(slate_size=slate, rerank={"diversity": {"key": "topic", "max_per_window": per, "window": window}})
    out = rank(s, make_request(rows))
    assert len(out.items) == slate
    seq = [rows[int(i.item_id[1:])]["topic"] for i in out.items]
    for end in range(len(seq)):
        win = seq[max(0, end - window + 1): end + 1]
        assert Counter(win).most_common(1)[0][1] <= per


@PROPS
@given(st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_without_rules_the_slate_is_the_top_scores(n, seed):
    rng = np.random.default_rng(seed)
    rows = [{"predictions": preds(click=float(rng.random()), like=float(rng.random()))} for _ in range(n)]
    s = make_strategy(slate_size=10)
    out = rank(s, make_request(rows))
    scores = blend(s, np.array([[r["predictions"][k] for k in s.objective_names] for r in rows]))
    assert [i.score for i in out.items] == pytest.approx(sorted(scores, reverse=True)[:10])
    assert all(i.propensity == 1.0 and i.reasons == ["score"] for i in out.items)
