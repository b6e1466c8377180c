"""The simulated feed world: determinism, calibrated truth, response structure, CLI and config errors."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from world import World, WorldConfig, auc, oracle_aucs
from strategy import ValidationError, parse_events, parse_request

IMPRESSION_COLUMNS = [
    "request_id", "ts", "user_id", "item_id", "position", "source", "creator_id", "topic", "text", "generator",
    "prior_score", "duration", "creator_followers", "text_len", "user_recent_items",
    "click", "like", "share", "watch_time", "report", "p_click", "p_like", "p_share", "p_report", "e_watch_time",
]
EVENT_COLUMNS = ["event_id", "ts", "type", "user_id", "item_id", "request_id", "value"]


@pytest.fixture(scope="module")
def small(root):
    return WorldConfig.from_yaml(root / "conf" / "sim" / "small.yaml")


@pytest.fixture(scope="module")
def world(small):
    return World(small)


@pytest.fixture(scope="module")
def logs(small):
    # a fresh world: respond() in other tests counts impressions on the shared one
    return World(small).simulate_logs(60_000, progress=False)


def test_same_seed_same_logs_other_seed_other_logs(small):
    a_imp, a_ev = World(small).simulate_logs(3_000, progress=False)
    b_imp, b_ev = World(small).simulate_logs(3_000, progress=False)
    pd.testing.assert_frame_equal(a_imp, b_imp)
    pd.testing.assert_frame_equal(a_ev, b_ev)
    c_imp, _ = World(small.replace(seed=small.seed + 1)).simulate_logs(3_000, progress=False)
    assert not a_imp["item_id"].equals(c_imp["item_id"])
    assert not np.allclose(a_imp["p_click"], c_imp["p_click"])


def test_columns_and_shapes(logs, small):
    imp, ev = logs
    assert list(imp.columns) == IMPRESSION_COLUMNS
    assert list(ev.columns) == EVENT_COLUMNS
    assert len(imp) == 60_000
    assert set(imp["position"]) == set(range(1, small.slate_size + 1))
    assert not imp.duplicated(["request_id", "item_id"]).any()
    assert set(imp["source"]) == {"llm", "retrieval"}
    llm = imp["source"] == "llm"
    assert imp.loc[llm, "generator"].notna().all() and imp.loc[~llm, "generator"].isna().all()
    assert imp.loc[llm, "prior_score"].between(0, 1).all() and imp.loc[~llm, "prior_score"].isna().all()
    assert imp["user_recent_items"].map(len).eq(small.history_length).all()
    assert set(ev["type"]) == {"click", "like", "share", "watch", "report"}
    assert ev["event_id"].is_unique
    assert ev["ts"].is_monotonic_increasing


def test_true_probabilities_in_range_and_label_rates_match(logs, world):
    imp, _ = logs
    for label, prob in (("click", "p_click"), ("like", "p_like"), ("share", "p_share"), ("report", "p_report")):
        p = imp[prob].to_numpy()
        assert ((p > 0) & (p < 1)).all(), prob
        sd = np.sqrt((p * (1 - p)).sum()) / len(p)
        assert abs(imp[label].mean() - p.mean()) < 5 * sd + 1e-4, (label, imp[label].mean(), p.mean())
    assert (imp["e_watch_time"] >= 0).all()
    assert imp["watch_time"].mean() == pytest.approx(imp["e_watch_time"].mean(), rel=0.05)
    # the logged truth is what the world answers for the same (user, item, position)
    sample = imp.iloc[:500]
    probs = world.true_probs(sample["user_id"], sample["item_id"], sample["position"])
    assert set(probs) == {"click", "like", "share", "watch", "report"}
    np.testing.assert_allclose(probs["click"], sample["p_click"])
    np.testing.assert_allclose(probs["watch"], sample["e_watch_time"])


def test_feedback_structure(logs):
    imp, ev = logs
    # like, share and watch need a click; reports mostly follow one
    for label in ("like", "share"):
        assert (imp.loc[imp[label] == 1, "click"] == 1).all()
    assert ((imp["watch_time"] > 0) == (imp["click"] == 1)).all()
    reported = imp[imp["report"] == 1]
    assert len(reported) > 20 and reported["click"].mean() > 0.5
    clicked = imp[imp["click"] == 1]
    assert clicked.loc[clicked["like"] == 1, "watch_time"].mean() > clicked.loc[clicked["like"] == 0, "watch_time"].mean()
    # events mirror the labels and come after their impression
    counts = ev["type"].value_counts()
    for label, etype in (("click", "click"), ("like", "like"), ("share", "share"), ("report", "report")):
        assert counts[etype] == imp[label].sum()
    assert counts["watch"] == imp["click"].sum()
    watch = ev[ev["type"] == "watch"]
    assert watch["value"].gt(0).all() and ev.loc[ev["type"] != "watch", "value"].isna().all()
    first = imp.groupby("request_id")["ts"].first()
    assert (ev["ts"].to_numpy() >= first.loc[ev["request_id"]].to_numpy()).all()


def test_position_bias_visible(logs, small):
    imp, _ = logs
    by_pos = imp.groupby("position")[["click", "p_click"]].mean()
    assert by_pos["p_click"].is_monotonic_decreasing
    assert by_pos.loc[1, "click"] > 1.5 * by_pos.loc[small.slate_size, "click"]
    # the same (user, item) is less likely clicked lower down
    p = World(small).true_probs(["u1"] * 3, ["i5"] * 3, [1, 2, 5])["click"]
    assert p[0] > p[1] > p[2]


def test_low_quality_llm_items_are_reported_more(world, logs):
    cat = world.catalog()
    llm = cat[cat["source"] == "llm"]
    low = llm["quality"] <= llm["quality"].quantile(1 / 3)
    high = llm["quality"] >= llm["quality"].quantile(2 / 3)
    assert llm.loc[low, "harmful"].mean() > llm.loc[high, "harmful"].mean()
    assert cat.loc[cat["source"] == "llm", "harmful"].mean() > cat.loc[cat["source"] == "retrieval", "harmful"].mean()
    imp, _ = logs
    q = cat.set_index("item_id")["quality"]
    shown = imp[imp["source"] == "llm"]
    iq = q.loc[shown["item_id"]].to_numpy()
    lo, hi = np.quantile(iq, [1 / 3, 2 / 3])
    assert shown.loc[iq <= lo, "p_report"].mean() > 2 * shown.loc[iq >= hi, "p_report"].mean()
    assert shown.loc[iq <= lo, "report"].mean() > shown.loc[iq >= hi, "report"].mean()
    # low-quality LLM texts carry more "slop" words: quality is visible through the tokens
    slop = cat["text"].str.count(r"\b(?:delve|tapestry|unlock|elevate|seamless|vibrant|realm|embark)\b")
    assert slop[cat.index.isin(llm.index[low])].mean() > slop[cat.index.isin(llm.index[high])].mean()


def test_oracle_auc_learnable_not_trivial(logs):
    aucs = oracle_aucs(logs[0])
    assert 0.6 < aucs["click"] < 0.95
    assert 0.6 < aucs["like"] < 0.97
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_candidates_fit_the_rank_request_and_respond_gives_schema_events(world):
    rng = np.random.default_rng(0)
    cands = world.candidates("u7", 40, rng)
    assert len(cands) == 40 and len({c["item_id"] for c in cands}) == 40
    request = parse_request({"user_id": "u7", "candidates": cands})
    assert len(request.candidates) == 40
    for c in cands:
        assert (c["source"] == "llm") == ("generator" in c)
        if "generator" in c:
            assert 0 <= c["generator"]["prior_score"] <= 1
    slate = [c["item_id"] for c in cands[:10]]
    events = []
    for k in range(30):
        events += world.respond("u7", slate, np.random.default_rng(k), ts=1_800_000_000.0, request_id=f"q{k}")
    parsed = parse_events(events)
    assert len(parsed) == len(events) > 0
    assert {e.type for e in parsed} <= {"click", "like", "share", "watch", "report"}
    assert all(e.ts >= 1_800_000_000.0 for e in parsed)
    clicks = {(e.request_id, e.item_id) for e in parsed if e.type == "click"}
    assert all((e.request_id, e.item_id) in clicks for e in parsed if e.type in ("like", "share", "watch"))
    assert world.item_impressions[world.item_index(slate)].min() >= 30
    again = world.respond("u7", slate, np.random.default_rng(3), ts=1_800_000_000.0, request_id="q3")
    assert again == world.respond("u7", slate, np.random.default_rng(3), ts=1_800_000_000.0, request_id="q3")
    value = world.slate_value("u7", slate)
    assert value["click"] == pytest.approx(world.true_probs("u7", slate, range(1, 11))["click"].sum())


def test_recent_items_are_point_in_time(logs):
    imp, _ = logs
    req = imp.groupby("request_id", sort=False).agg(
        user=("user_id", "first"), ts=("ts", "first"), recent=("user_recent_items", "first"),
        clicked=("item_id", lambda s: list(s[imp.loc[s.index, "click"] == 1])))
    req = req.sort_values("ts")
    checked = 0
    for _, rows in req.groupby("user"):
        rows = rows.to_dict("records")
        for before, after in zip(rows, rows[1:]):
            if 0 < len(before["clicked"]) <= len(after["recent"]):
                assert set(before["clicked"]) <= set(after["recent"])
                assert after["recent"][0] in before["clicked"]  # most recent first
                checked += 1
    assert checked > 100


def test_config_errors_name_the_key(tmp_path, small):
    with pytest.raises(ValidationError) as exc:
        WorldConfig.from_dict({"n_usres": 10})
    (err,) = exc.value.errors
    assert err.path == "n_usres" and "did you mean 'n_users'" in err.message and "allowed:" in err.message
    with pytest.raises(ValidationError) as exc:
        WorldConfig.from_dict({"n_users": "many", "llm_share": 1.5, "policy": "best", "effects": {"afinity": 1},
                               "generators": [{"name": "g", "quality_sd": -1}, {"share": 1}]})
    by_path = {e.path: e.message for e in exc.value.errors}
    assert "expected an integer" in by_path["n_users"]
    assert "out of range [0, 1]" in by_path["llm_share"]
    assert "allowed: random, popular" in by_path["policy"]
    assert "did you mean 'affinity'" in by_path["effects.afinity"]
    assert "out of range" in by_path["generators[0].quality_sd"]
    assert by_path["generators[1].name"] == "required"
    with pytest.raises(ValidationError) as exc:
        WorldConfig.from_dict({"slate_size": 20, "candidates_per_request": 5})
    assert exc.value.errors[0].path == "candidates_per_request"
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nn_users: 10\nwatch:\n  concentraton: 3\n")
    with pytest.raises(ValidationError) as exc:
        WorldConfig.from_yaml(bad)
    (err,) = exc.value.errors
    assert (err.path, err.line, err.file) == ("watch.concentraton", 4, str(bad))
    assert "did you mean 'concentration'" in str(err)
    assert WorldConfig.from_dict(small.to_dict()) == small


def test_cli_writes_parquet(tmp_path, root):
    out = tmp_path / "sim"
    cmd = [sys.executable, "-m", "stratarank.cli", "simulate", "--config", str(root / "conf" / "sim" / "small.yaml"),
           "--out", str(out), "--impressions", "4000", "--seed", "11", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "4000 impressions" in run.stdout and "seed 11" in run.stdout
    imp = pd.read_parquet(out / "impressions.parquet")
    ev = pd.read_parquet(out / "events.parquet")
    assert list(imp.columns) == IMPRESSION_COLUMNS and len(imp) == 4000
    assert list(ev.columns) == EVENT_COLUMNS and len(ev) > 0
    assert imp["user_recent_items"].iloc[0][0].startswith("i")
    same, _ = World(WorldConfig.from_yaml(root / "conf" / "sim" / "small.yaml", seed=11)).simulate_logs(
        4000, progress=False)
    np.testing.assert_array_equal(imp["p_click"].to_numpy(), same["p_click"].to_numpy())
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_usres: 10\n")
    run = subprocess.run([sys.executable, "-m", "stratarank.cli", "simulate", "--config", str(bad), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, cwd=root, timeout=60)
    assert run.returncode == 1 and "n_usres" in run.stderr and "n_users" in run.stderr


def test_popular_policy_serves_better_items_first(small):
    world = World(small)
    quality = world.catalog().set_index("item_id")["quality"]
    popular, _ = world.simulate_logs(10_000, policy="popular", progress=False)
    random, _ = world.simulate_logs(10_000, policy="random", progress=False)
    top = quality.loc[popular.loc[popular["position"] == 1, "item_id"]].mean()
    bottom = quality.loc[popular.loc[popular["position"] == small.slate_size, "item_id"]].mean()
    assert top > bottom + 0.1
    assert top > quality.loc[random.loc[random["position"] == 1, "item_id"]].mean() + 0.1
    with pytest.raises(ValueError, match="policy"):
        world.simulate_logs(100, policy="best", progress=False)
