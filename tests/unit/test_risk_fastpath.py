"""``RiskRules.screen`` keeps and drops what its candidate-by-candidate loop did, with its no-op path
when no creator or text rule is configured (``max_per_creator`` alone screens nothing)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from online.risk import RiskRules, load_risk, risk_from_dict
from strategy import parse_request


def reference_screen(rules: RiskRules, candidates):
    """``screen`` as it was before (commit 9d95a60), verbatim."""
    keep, dropped = [], []
    for i, cand in enumerate(candidates):
        reason = rules._reason(cand)
        if reason is None:
            keep.append(i)
        else:
            dropped.append((cand.item_id, reason))
    return keep, dropped


CANDIDATE = st.fixed_dictionaries(
    {"item_id": st.sampled_from(["a", "b", "c", "d"]), "source": st.sampled_from(["llm", "retrieval"])},
    optional={"creator_id": st.sampled_from(["c_spam_1", "c1", "c2"]),
              "text": st.sampled_from(["", "a MIRACLE cure", "miracle cured", "call 555-123-4567", "see http://x.ru",
                                       "hello", "get rich quick!"])})
RULES = st.fixed_dictionaries({}, optional={
    "blocked_creators": st.lists(st.sampled_from(["c_spam_1", "c1"]), max_size=2),
    "blocked_terms": st.lists(st.sampled_from(["miracle cure", "get rich quick", " "]), max_size=2),
    "blocked_patterns": st.lists(st.sampled_from([r"\b\d{3}-\d{3}-\d{4}\b", r"https?://\S+\.(?:ru|tk)\b", "^hel"]),
                                 max_size=2),
    "max_per_creator": st.integers(1, 3)})


@settings(max_examples=300, deadline=None)
@given(RULES, st.lists(CANDIDATE, max_size=12))
def test_screen_is_the_candidate_by_candidate_loop(spec, raw):
    rules = risk_from_dict(spec)
    cands = parse_request({"user_id": "u", "candidates": raw}).candidates
    assert rules.screen(cands) == reference_screen(rules, cands)
    assert rules.screens == bool(spec.get("blocked_creators") or spec.get("blocked_patterns")
                                 or any(t.strip() for t in spec.get("blocked_terms", [])))


@pytest.mark.parametrize("rules", [RiskRules(), risk_from_dict({"max_per_creator": 2}),
                                   risk_from_dict({"blocked_terms": ["  "]})])
def test_no_rule_keeps_every_candidate(rules):
    cands = parse_request({"user_id": "u", "candidates": [
        {"item_id": "a", "source": "llm", "creator_id": "c_spam_1", "text": "a miracle cure"},
        {"item_id": "a", "source": "llm"}]}).candidates
    assert not rules.screens
    assert rules.screen(cands) == ([0, 1], []) == reference_screen(rules, cands)


def test_the_shipped_rules_screen(root):
    assert load_risk(root / "conf/risk.yaml").screens
