"""experiments.analysis: tables → records, checked against a plain pandas reference + gbstats."""

import numpy as np
import pandas as pd
import pytest

from experiments import stats as S
from experiments.analysis import analyze, load_table
from strategy.errors import ValidationError

gb_tests = pytest.importorskip("gbstats.frequentist.tests")
gb_stats = pytest.importorskip("gbstats.models.statistics")

METRICS = {
    "clicks_per_user": {"type": "mean", "event": "click"},
    "watch_time": {"type": "mean", "event": "watch", "value": "sum"},
    "ctr": {"type": "ratio", "numerator": {"event": "click"}, "denominator": {"event": "impression"}},
    "reports": {"type": "mean", "event": "report"},
}
EXP = {"name": "rank_v2", "control": "control", "metrics": ["clicks_per_user", "watch_time", "ctr"],
       "guardrails": ["reports"]}


def world(seed=0, n_users=1500, n_events=30000, lift=0.0, variants=("control", "treatment")):
    """Exposures with repeats and a few multi-variant users; events with duplicates,
    pre-exposure events, events of never-exposed users and of other types."""
    rng = np.random.default_rng(seed)
    uid = np.arange(n_users)
    var = rng.choice(list(variants), n_users)
    first = rng.integers(1000, 2000, n_users)
    exp = pd.DataFrame({"user_id": uid, "layer": "rank", "experiment": "rank_v2", "variant": var, "ts": first})
    again = exp.sample(300, random_state=seed).assign(ts=lambda d: d.ts + rng.integers(1, 500, len(d)))
    multi = exp.iloc[:7].assign(variant=lambda d: np.where(d.variant == "control", variants[1], "control"), ts=lambda d: d.ts + 5)
    other = pd.DataFrame({"user_id": uid[:200], "layer": "ui", "experiment": "other", "variant": "x", "ts": 0})
    exposures = pd.concat([exp, again, multi, other], ignore_index=True).sample(frac=1.0, random_state=seed)

    u = rng.integers(0, n_users + 300, n_events)  # ids >= n_users never exposed
    treat = np.isin(u, uid[var != "control"])
    typ = rng.choice(["impression", "click", "watch", "report", "like"], n_events, p=[.45, .15, .2, .05, .15])
    click_boost = (typ == "impression") & treat & (rng.random(n_events) < lift)
    typ = np.where(click_boost, "click", typ)
    ev = pd.DataFrame({
        "event_id": np.arange(n_events), "ts": rng.integers(0, 3000, n_events), "type": typ, "user_id": u,
        "item_id": rng.integers(0, 100, n_events), "request_id": rng.integers(0, 10**6, n_events),
        "value": np.where(typ == "watch", rng.exponential(30, n_events), np.nan),
    })
    dupes = ev.sample(2000, random_state=seed)
    return exposures, pd.concat([ev, dupes], ignore_index=True)


def reference_per_user(exposures, events, experiment, pre_window=None):
    """Deliberately plain pandas: the analysis the module must reproduce."""
    ex = exposures[exposures.experiment == experiment]
    nvar = ex.groupby("user_id").variant.nunique()
    ex = ex[ex.user_id.isin(nvar[nvar == 1].index)]
    first = ex.sort_values("ts").groupby("user_id").agg(variant=("variant", "first"), t0=("ts", "min")).reset_index()
    ev = events.drop_duplicates("event_id").merge(first, on="user_id")
    post = ev[ev.ts >= ev.t0]
    pre = ev[ev.ts < ev.t0]
    if pre_window is not None:
        pre = pre[pre.ts >= pre.t0 - pre_window]

    def per_user(df, suffix):
        cnt = df.pivot_table(index="user_id", columns="type", values="event_id", aggfunc="count", fill_value=0)
        val = df[df.type == "watch"].groupby("user_id").value.sum().rename("watch_sum")
        out = first[["user_id"]].set_index("user_id").join(cnt).join(val).fillna(0)
        for c in ("click", "impression", "report", "watch_sum"):
            if c not in out:
                out[c] = 0.0
        return out.add_suffix(suffix)

    return first.set_index("user_id").join(per_user(post, "")).join(per_user(pre, "_pre"))


def _gb_mean(x):
    x = np.asarray(x, float)
    return gb_stats.SampleMeanStatistic(n=len(x), sum=x.sum(), sum_squares=x @ x)


def _gb_ratio(x, y):
    return gb_stats.RatioStatistic(n=len(x), m_statistic=_gb_mean(x), d_statistic=_gb_mean(y),
                                   m_d_sum_of_products=float(np.dot(x, y)))


def _gb_ra(post, pre):
    return gb_stats.RegressionAdjustedStatistic(n=len(post), post_statistic=_gb_mean(post), pre_statistic=_gb_mean(pre),
                                                post_pre_sum_of_products=float(np.dot(post, pre)), theta=0)


def _gb(a, b, dtype="absolute", cls=None, **kw):
    cls = cls or gb_tests.TwoSidedTTest
    cfg = (gb_tests.SequentialConfig if cls is gb_tests.SequentialTwoSidedTTest else gb_tests.FrequentistConfig)(
        difference_type=dtype, **kw)
    return cls(a, b, cfg).compute_result()


def _close(x, y, tol=1e-6):
    assert x == pytest.approx(y, rel=tol, abs=tol)


@pytest.fixture(scope="module")
def small_world():
    return world(seed=0)


def test_records_agree_with_reference_and_gbstats(small_world):
    exposures, events = small_world
    recs = analyze(exposures, events, METRICS, [EXP], pre_period=300)
    ref = reference_per_user(exposures, events, "rank_v2", pre_window=300)
    c, t = ref[ref.variant == "control"], ref[ref.variant == "treatment"]
    assert [r["metric"] for r in recs] == ["clicks_per_user", "watch_time", "ctr", "reports"]
    cols = {"clicks_per_user": "click", "watch_time": "watch_sum", "reports": "report"}
    for r in recs:
        assert (r["experiment"], r["variant"]) == ("rank_v2", "treatment")
        assert (r["users"], r["control_users"]) == (len(t), len(c))
        assert r["multi_variant_users"] == 7
        if r["metric"] == "ctr":
            ga, gb = _gb_ratio(c.click, c.impression), _gb_ratio(t.click, t.impression)
            _close(r["control_mean"], c.click.sum() / c.impression.sum())
        else:
            col = cols[r["metric"]]
            ga, gb = _gb_mean(c[col]), _gb_mean(t[col])
            _close(r["control_mean"], c[col].mean())
            _close(r["treatment_mean"], t[col].mean())
            # CUPED against gbstats' regression adjustment (pooled theta)
            ra, rb = _gb_ra(c[col], c[col + "_pre"]), _gb_ra(t[col], t[col + "_pre"])
            g = _gb(ra, rb)
            _close(r["abs_lift_cuped"], g.expected)
            _close(r["ci_low_cuped"], g.ci[0])
            _close(r["ci_high_cuped"], g.ci[1])
            _close(r["p_value_cuped"], g.p_value)
            _close(r["cuped_theta"], ra.theta)
        g = _gb(ga, gb)
        _close(r["abs_lift"], g.expected)
        _close(r["ci_low"], g.ci[0])
        _close(r["ci_high"], g.ci[1])
        _close(r["p_value"], g.p_value)
        g = _gb(ga, gb, "relative")
        _close(r["rel_lift"], g.expected)
        _close(r["rel_ci_low"], g.ci[0])
        _close(r["rel_ci_high"], g.ci[1])
        g = _gb(ga, gb, cls=gb_tests.SequentialTwoSidedTTest)
        _close(r["seq_ci_low"], g.ci[0])
        _close(r["seq_ci_high"], g.ci[1])
        _close(r["p_value_sequential"], g.p_value)
        _close(r["srm_p"], S.srm_chi2([len(c), len(t)], [1, 1]))
    # adjusted p-values: the family is the experiment's metrics for this variant
    p = [r["p_value"] for r in recs]
    np.testing.assert_allclose([r["p_value_holm"] for r in recs], S.holm(p))
    np.testing.assert_allclose([r["p_value_bh"] for r in recs], S.benjamini_hochberg(p))
    assert [r["p_value_adjusted"] for r in recs] == [r["p_value_holm"] for r in recs]
    assert [r["role"] for r in recs] == ["goal"] * 3 + ["guardrail"]
    assert recs[3]["guardrail"] in ("pass", "fail") and recs[0]["guardrail"] is None
    assert all(r["p_value_cuped"] is None for r in recs if r["metric"] == "ctr")


def test_without_pre_period_there_is_no_cuped_and_bh_can_be_chosen(small_world):
    exposures, events = small_world
    recs = analyze(exposures, events, METRICS, [EXP], correction="bh")
    assert all(r["p_value_cuped"] is None for r in recs)
    assert [r["p_value_adjusted"] for r in recs] == [r["p_value_bh"] for r in recs]


def test_hand_computed_example_counts_from_first_exposure_and_dedupes():
    exposures = pd.DataFrame({
        "user_id": ["a", "b", "c", "d", "a"], "layer": "L", "experiment": "e",
        "variant": ["ctl", "ctl", "trt", "trt", "ctl"], "ts": [10, 10, 10, 10, 50]})
    events = pd.DataFrame({
        "event_id": [1, 2, 2, 3, 4, 5, 6, 7, 8], "ts": [20, 30, 30, 5, 20, 20, 20, 20, 20],
        "type": ["click", "click", "click", "click", "click", "click", "click", "click", "like"],
        "user_id": ["a", "a", "a", "a", "b", "c", "c", "zz", "d"],
        "item_id": 0, "request_id": 0, "value": 1.0})
    # per-user clicks after first exposure: a=2 (event 2 deduped, event 3 before exposure),
    # b=1, c=2, d=0; "zz" was never exposed
    (r,) = analyze(exposures, events, {"clicks": {"type": "mean", "event": "click"}},
                   [{"name": "e", "control": "ctl", "metrics": ["clicks"]}], pre_period="all")
    assert (r["users"], r["control_users"]) == (2, 2)
    assert r["control_mean"] == 1.5 and r["treatment_mean"] == 1.0
    assert r["abs_lift"] == -0.5 and r["rel_lift"] == pytest.approx(-1 / 3)
    sp = __import__("scipy.stats").stats.ttest_ind([2, 0], [2, 1], equal_var=False)
    _close(r["p_value"], sp.pvalue)


def test_datetime_timestamps_and_pre_period_window():
    t0 = pd.Timestamp("2026-01-10", tz="UTC")
    exposures = pd.DataFrame({"user_id": [1, 2, 3, 4], "layer": "L", "experiment": "e",
                              "variant": ["c", "c", "t", "t"], "ts": [t0] * 4})
    days = pd.to_timedelta([-20, -3, 1, -3, 2, 2, -1, 3, -30, 1, 1, 1], unit="D")
    events = pd.DataFrame({"event_id": range(12), "ts": t0 + days,
                           "type": "click", "user_id": [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4],
                           "item_id": 0, "request_id": 0, "value": 0.0})
    events["ts"] = events.ts.dt.strftime("%Y-%m-%dT%H:%M:%SZ")  # ISO strings parse too
    (r,) = analyze(exposures, events, {"clicks": {"type": "mean", "event": "click"}},
                   [{"name": "e", "control": "c", "metrics": ["clicks"]}], pre_period="7D")
    # post: u1=1, u2=2, u3=1, u4=3; pre within 7 days: u1=1, u2=1, u3=1, u4=0
    assert r["control_mean"] == 1.5 and r["treatment_mean"] == 2.0
    post, pre = np.array([1, 2, 1, 3.0]), np.array([1, 1, 1, 0.0])
    g = _gb(_gb_ra(post[:2], pre[:2]), _gb_ra(post[2:], pre[2:]))
    _close(r["p_value_cuped"], g.p_value)
    _close(r["abs_lift_cuped"], g.expected)


def test_srm_alarm_and_declared_weights():
    rng = np.random.default_rng(3)
    n = 20000
    var = np.where(rng.random(n) < 0.47, "t", "c")  # 53/47 split
    exposures = pd.DataFrame({"user_id": np.arange(n), "layer": "L", "experiment": "e", "variant": var, "ts": 0})
    events = pd.DataFrame({"event_id": np.arange(n), "ts": 1, "type": "click", "user_id": np.arange(n),
                           "item_id": 0, "request_id": 0, "value": 1.0})
    m = {"clicks": {"type": "mean", "event": "click"}}
    (r,) = analyze(exposures, events, m, [{"name": "e", "control": "c", "metrics": ["clicks"]}])
    assert r["srm_p"] < 0.001 and r["srm_alarm"] is True
    (r,) = analyze(exposures, events, m, [{"name": "e", "control": "c", "metrics": ["clicks"],
                                            "variants": ["c", "t"], "weights": {"c": 0.53, "t": 0.47}}])
    assert r["srm_p"] > 0.001 and r["srm_alarm"] is False
    # a declared variant with no traffic counts as 0 users in the SRM test, and gets its record
    recs = analyze(exposures, events, m, [{"name": "e", "control": "c", "metrics": ["clicks"],
                                          "variants": ["c", "t", "t2"]}])
    assert [r["variant"] for r in recs] == ["t", "t2"]
    assert recs[1]["users"] == 0 and recs[1]["error"] and recs[0]["srm_alarm"] is True


def test_guardrail_fails_on_a_harmful_move_in_the_caller_direction():
    exposures, events = world(seed=5, n_users=3000, n_events=60000, lift=0.5)
    m = {"ctr": METRICS["ctr"], "clicks_per_user": METRICS["clicks_per_user"]}
    recs = analyze(exposures, events, m, [{"name": "rank_v2", "control": "control", "metrics": ["ctr"],
                                          "guardrails": ["clicks_per_user"]}])
    by = {r["metric"]: r for r in recs}
    assert by["ctr"]["p_value"] < 1e-6 and by["ctr"]["rel_lift"] > 0.3  # the simulated effect is found
    assert by["clicks_per_user"]["guardrail"] == "fail"  # increase harmful by default
    recs = analyze(exposures, events, m, [{"name": "rank_v2", "control": "control", "metrics": ["ctr"],
                                          "guardrails": [{"metric": "clicks_per_user", "harmful": "decrease"}]}])
    assert recs[1]["guardrail"] == "pass" and recs[1]["harmful"] == "decrease"
    recs = analyze(exposures, events, m, [{"name": "rank_v2", "control": "control", "metrics": ["ctr"],
                                          "guardrails": ["clicks_per_user"]}], guardrail_harmful="decrease")
    assert recs[1]["guardrail"] == "pass"


def test_aa_false_positive_rate_through_the_whole_pipeline():
    rng = np.random.default_rng(42)
    n_exp, n_per = 200, 400
    uid = np.arange(n_exp * n_per)
    exposures = pd.DataFrame({"user_id": uid, "layer": "L", "experiment": uid // n_per,
                              "variant": np.where(rng.random(uid.size) < 0.5, "a", "b"), "ts": 0})
    exposures["experiment"] = "aa" + exposures.experiment.astype(str)
    ne = uid.size * 3
    events = pd.DataFrame({"event_id": np.arange(ne), "ts": 1, "type": "watch",
                           "user_id": rng.integers(0, uid.size, ne), "item_id": 0, "request_id": 0,
                           "value": rng.exponential(10, ne)})
    exps = [{"name": f"aa{i}", "control": "a", "metrics": ["watch_time"]} for i in range(n_exp)]
    recs = analyze(exposures, events, {"watch_time": METRICS["watch_time"]}, exps)
    assert len(recs) == n_exp
    fpr = np.mean([r["p_value"] < 0.05 for r in recs])
    assert 0.02 <= fpr <= 0.08, fpr
    ci_miss = np.mean([not (r["ci_low"] <= 0 <= r["ci_high"]) for r in recs])
    assert ci_miss == fpr  # CI and p-value are the same test


# ------------------------------------------------------------------ bad input
def _errs(excinfo):
    return {e.path: e.message for e in excinfo.value.errors}


def test_missing_columns_are_named(small_world):
    exposures, events = small_world
    with pytest.raises(ValidationError) as ei:
        analyze(exposures.drop(columns=["variant"]), events, METRICS, [EXP])
    assert "exposures.variant" in _errs(ei)
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events.drop(columns=["value", "event_id"]), METRICS, [EXP])
    assert {"events.value", "events.event_id"} <= set(_errs(ei))


def test_bad_metric_declarations_name_the_field_and_allowed_values(small_world):
    exposures, events = small_world
    bad = {"a": {"type": "rate", "event": "click"}, "b": {"type": "mean"},
           "c": {"type": "ratio", "numerator": {"event": "click"}},
           "d": {"type": "mean", "event": "watch", "value": "summ"}}
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events, bad, [EXP])
    errs = _errs(ei)
    assert "allowed: mean, ratio" in errs["metrics.a.type"]
    assert "metrics.b.event" in errs and "metrics.c.denominator" in errs
    assert "allowed: count, sum" in errs["metrics.d.value"] and "did you mean 'sum'" in errs["metrics.d.value"]


def test_experiment_referencing_unknown_metric(small_world):
    exposures, events = small_world
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events, METRICS, [{"name": "rank_v2", "control": "control", "metrics": ["ctrr"],
                                             "guardrails": [{"metric": "reports", "harmful": "up"}]}])
    errs = _errs(ei)
    assert "did you mean 'ctr'" in errs["experiments[0].metrics[0]"]
    assert "allowed: increase, decrease" in errs["experiments[0].guardrails[0].harmful"]
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events, METRICS, [EXP], correction="bonferroni")
    assert "allowed: holm, bh" in _errs(ei)["correction"]
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events, METRICS, [dict(EXP, variants=["a", "b"])])
    assert "experiments[0].control" in _errs(ei)


def test_loader_reads_parquet_csv_and_folders_and_names_the_file(tmp_path, small_world):
    exposures, events = small_world
    events.iloc[:1000].to_parquet(tmp_path / "ev1.parquet")
    events.iloc[1000:].to_csv(tmp_path / "ev2.csv", index=False)
    got = load_table(tmp_path, "events")
    assert len(got) == len(events) and list(got.event_id) == list(events.event_id)
    exposures.drop(columns=["ts"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValidationError) as ei:
        load_table(tmp_path / "bad.csv", "exposures")
    (e,) = ei.value.errors
    assert e.path == "exposures.ts" and e.file.endswith("bad.csv") and "bad.csv" in str(ei.value)
    with pytest.raises(ValidationError):
        load_table(tmp_path / "nope", "events")


def test_no_torch_or_pandas_in_stats_module():
    import subprocess
    import sys
    code = "import sys, experiments.stats, experiments.analysis; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    src = open(S.__file__).read()
    assert "import pandas" not in src


def test_experiment_without_exposures_and_mismatched_kinds(small_world):
    exposures, events = small_world
    recs = analyze(exposures, events, METRICS, [dict(EXP, name="rank_v3")])
    assert len(recs) == 4 and all(r["users"] == 0 and r["p_value"] is None for r in recs)
    assert "did you mean 'rank_v2'" in recs[0]["error"]
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events.assign(user_id=events.user_id.astype(str)), METRICS, [EXP])
    assert "events.user_id" in _errs(ei)
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events.assign(ts=pd.Timestamp("2026-01-01") + pd.to_timedelta(events.ts, unit="s")),
                METRICS, [EXP])
    assert "events.ts" in _errs(ei)
    with pytest.raises(ValidationError) as ei:
        analyze(exposures, events, METRICS, [EXP], pre_period="14D")  # numeric ts: a number is needed
    assert "pre_period" in _errs(ei)


def test_known_effect_detected_with_predicted_power_through_the_pipeline():
    rng = np.random.default_rng(9)
    n_exp, n_per, sd, delta = 200, 400, 4.0, 1.0
    uid = np.arange(n_exp * n_per)
    var = np.where(rng.random(uid.size) < 0.5, "a", "b")
    exposures = pd.DataFrame({"user_id": uid, "layer": "L", "experiment": "p" + (uid // n_per).astype(str),
                              "variant": var, "ts": 0})
    # one watch event per user: per-user metric ~ N(10, sd), + delta in the treatment
    events = pd.DataFrame({"event_id": uid, "ts": 1, "type": "watch", "user_id": uid, "item_id": 0,
                           "request_id": 0, "value": rng.normal(10, sd, uid.size) + delta * (var == "b")})
    exps = [{"name": f"p{i}", "control": "a", "metrics": ["watch_time"]} for i in range(n_exp)]
    recs = analyze(exposures, events, {"watch_time": METRICS["watch_time"]}, exps)
    predicted = S.welch_power(delta, sd, sd, n_per // 2, n_per // 2)
    power = np.mean([r["p_value"] < 0.05 for r in recs])
    assert 0.6 < predicted < 0.85
    assert abs(power - predicted) < 0.1, (power, predicted)
    coverage = np.mean([r["ci_low"] <= delta <= r["ci_high"] for r in recs])
    assert 0.91 <= coverage <= 0.99  # 95 % ± 2.6 binomial sd at 200 runs
