"""experiments.stats against GrowthBook's gbstats (published cases and live), scipy and simulation."""
import math

import numpy as np
import pytest
import scipy.stats as st
from hypothesis import given, settings, strategies as hs

from experiments import stats as S

gb_tests = pytest.importorskip("gbstats.frequentist.tests")
gb_stats = pytest.importorskip("gbstats.models.statistics")
gb_utils = pytest.importorskip("gbstats.utils")

# the sufficient statistics of gbstats' own test suite (tests/frequentist/test_tests.py)
A = S.SampleStats(n=3407, sum=1396.87, sum_sq=52377.9767)
B = S.SampleStats(n=3461, sum=2422.7, sum_sq=134698.29)
A3000 = S.SampleStats(n=3000, sum=1396.87, sum_sq=52377.9767)


def r5(x):
    return round(float(x), 5)


# ------------------------------------------------------------------ published gbstats cases
def test_two_sided_ttest_published_relative_case():
    r = S.welch_test(A, B)
    assert r5(r.rel_lift) == 0.70732
    assert (r5(r.rel_ci_low), r5(r.rel_ci_high)) == (-0.03526, 1.44989)
    assert r5(r.rel_se) == 0.37879
    assert r5(r.p_value_rel) == 0.06191


def test_two_sided_ttest_published_absolute_case():
    r = S.welch_test(A, B)
    assert r5(r.abs_lift) == 0.29
    assert (r5(r.ci_low), r5(r.ci_high)) == (0.04538, 0.53462)
    assert r5(r.se) == 0.12478
    assert r5(r.p_value) == 0.02016


def test_two_sided_ttest_published_binomial_case():
    # gbstats' ProportionStatistic: variance p(1-p); any arm with n/mean/variance works here
    def prop(s, n):
        p = s / n
        return S.AdjustedStats(n, p, p * (1 - p), p)

    r = S.welch_test(prop(14, 28), prop(16, 30))
    assert (r5(r.rel_lift), r5(r.rel_ci_low), r5(r.rel_ci_high)) == (0.06667, -0.47767, 0.61101)
    assert (r5(r.rel_se), r5(r.p_value_rel)) == (0.2717, 0.80707)


def test_sequential_published_cases():
    r = S.sequential_test(A3000, B, tuning=1000)
    assert (r5(r.rel_lift), r5(r.rel_ci_low), r5(r.rel_ci_high)) == (0.50336, -0.55844, 1.56516)
    assert r5(r.rel_se) == 0.33341 and r.p_value_rel == 1.0

    def prop(s, n):
        p = s / n
        return S.AdjustedStats(n, p, p * (1 - p), p)

    r = S.sequential_test(prop(1396, 3000), prop(2422, 3461))
    assert (r5(r.rel_lift), r5(r.rel_ci_low), r5(r.rel_ci_high)) == (0.50386, 0.40098, 0.60675)
    assert r5(r.p_value_rel) == 0.0


def test_sequential_cuped_published_case_with_fixed_theta():
    pre_a, pre_b = S.SampleStats(3000, 16.87, 527.9767), S.SampleStats(3461, 22.7, 1348.29)
    a = S.CupedStats(3000, A3000, pre_a, 12525)
    b = S.CupedStats(3461, B, pre_b, 3333)
    r = S.sequential_test(S.cuped_adjust(a, 0.5), S.cuped_adjust(b, 0.5))
    assert (r5(r.rel_lift), r5(r.rel_ci_low), r5(r.rel_ci_high)) == (0.50236, -0.43745, 1.44217)
    assert r5(r.rel_se) == 0.3093 and r.p_value_rel == 1.0
    # with the pooled theta these inputs give a negative variance: gbstats 0.8.0 refuses too
    th = S.cuped_theta(a, b)
    res = S.sequential_test(S.cuped_adjust(a, th), S.cuped_adjust(b, th))
    assert res.error and math.isnan(res.p_value)
    gb = gb_tests.SequentialTwoSidedTTest(*_gb_ra(a, b)).compute_result()
    assert gb.error_message == "ZERO_NEGATIVE_VARIANCE"


def test_tuning_parameter_narrowest_near_sample_size():
    w = {m: (lambda r: r.rel_ci_high - r.rel_ci_low)(S.sequential_test(A3000, B, tuning=m))
         for m in (10, 6461, 10000)}
    assert w[6461] < w[10000] < w[10]
    # and always wider than the fixed-horizon CI
    fixed = S.welch_test(A3000, B)
    assert w[6461] > fixed.rel_ci_high - fixed.rel_ci_low


# ------------------------------------------------------------------ live agreement with gbstats
def _gb_mean(s):
    return gb_stats.SampleMeanStatistic(n=s.n, sum=s.sum, sum_squares=s.sum_sq)


def _gb_ratio(s):
    return gb_stats.RatioStatistic(
        n=s.n, m_statistic=gb_stats.SampleMeanStatistic(n=s.n, sum=s.sum_x, sum_squares=s.sum_x2),
        d_statistic=gb_stats.SampleMeanStatistic(n=s.n, sum=s.sum_y, sum_squares=s.sum_y2),
        m_d_sum_of_products=s.sum_xy)


def _gb_ra(a, b):
    return [gb_stats.RegressionAdjustedStatistic(
        n=c.n, post_statistic=_gb_mean(c.post), pre_statistic=_gb_mean(c.pre),
        post_pre_sum_of_products=c.sum_post_pre, theta=0) for c in (a, b)]


def _close(x, y, tol=1e-6):
    assert x == pytest.approx(y, rel=tol, abs=tol)


def _agree(ours, gb_cls, gb_a, gb_b, tuning=None):
    """Both difference types of gbstats vs our one result, to 1e-6."""
    for dtype, est, lo, hi, p in (("absolute", "abs_lift", "ci_low", "ci_high", "p_value"),
                                  ("relative", "rel_lift", "rel_ci_low", "rel_ci_high", "p_value_rel")):
        if tuning is None:
            cfg = gb_tests.FrequentistConfig(difference_type=dtype)
        else:
            cfg = gb_tests.SequentialConfig(difference_type=dtype, sequential_tuning_parameter=tuning)
        g = gb_cls(gb_a, gb_b, cfg).compute_result()
        assert g.error_message is None
        _close(getattr(ours, est), g.expected)
        _close(getattr(ours, lo), g.ci[0])
        _close(getattr(ours, hi), g.ci[1])
        _close(getattr(ours, p), g.p_value)


def _arm(rng, n, mu, sd):
    return rng.normal(mu, sd, n)


@settings(max_examples=25, deadline=None)
@given(seed=hs.integers(0, 2**31 - 1), n_a=hs.integers(20, 400), n_b=hs.integers(20, 400),
       shift=hs.floats(-0.5, 0.5), sd_b=hs.floats(0.5, 3.0))
def test_mean_metric_agrees_with_gbstats_and_scipy(seed, n_a, n_b, shift, sd_b):
    rng = np.random.default_rng(seed)
    xa, xb = _arm(rng, n_a, 2.0, 1.0), _arm(rng, n_b, 2.0 + shift, sd_b)
    a, b = S.SampleStats.from_values(xa), S.SampleStats.from_values(xb)
    r = S.welch_test(a, b)
    _agree(r, gb_tests.TwoSidedTTest, _gb_mean(a), _gb_mean(b))
    sp = st.ttest_ind(xb, xa, equal_var=False)
    _close(r.p_value, sp.pvalue)
    ci = sp.confidence_interval(0.95)
    _close(r.ci_low, ci.low)
    _close(r.ci_high, ci.high)
    _close(r.dof, sp.df)
    for m in (1000, 5000):
        _agree(S.sequential_test(a, b, tuning=m), gb_tests.SequentialTwoSidedTTest, _gb_mean(a), _gb_mean(b), m)


@settings(max_examples=25, deadline=None)
@given(seed=hs.integers(0, 2**31 - 1), n=hs.integers(30, 400), lift=hs.floats(-0.3, 0.3))
def test_ratio_metric_agrees_with_gbstats(seed, n, lift):
    rng = np.random.default_rng(seed)

    def arm(ctr):
        imp = rng.poisson(8, n).astype(float) + 1
        clk = rng.binomial(imp.astype(int), ctr).astype(float)
        return S.RatioStats(n, clk.sum(), clk @ clk, imp.sum(), imp @ imp, clk @ imp)

    a, b = arm(0.1), arm(0.1 * (1 + lift))
    _close(a.variance, _gb_ratio(a).variance)
    _agree(S.welch_test(a, b), gb_tests.TwoSidedTTest, _gb_ratio(a), _gb_ratio(b))
    _agree(S.sequential_test(a, b), gb_tests.SequentialTwoSidedTTest, _gb_ratio(a), _gb_ratio(b), 5000)


@settings(max_examples=25, deadline=None)
@given(seed=hs.integers(0, 2**31 - 1), n=hs.integers(30, 400), rho=hs.floats(0.1, 0.95))
def test_cuped_agrees_with_gbstats_regression_adjustment(seed, n, rho):
    rng = np.random.default_rng(seed)

    def arm(shift):
        pre = rng.normal(5, 2, n)
        post = 5 + shift + rho * (pre - 5) + math.sqrt(1 - rho**2) * rng.normal(0, 2, n)
        return S.CupedStats(n, S.SampleStats.from_values(post), S.SampleStats.from_values(pre), float(post @ pre))

    a, b = arm(0.0), arm(0.3)
    th = S.cuped_theta(a, b)
    ra, rb = S.cuped_adjust(a, th), S.cuped_adjust(b, th)
    gb_a, gb_b = _gb_ra(a, b)
    _agree(S.welch_test(ra, rb), gb_tests.TwoSidedTTest, gb_a, gb_b)
    _close(th, gb_a.theta)  # gbstats sets the pooled theta on the statistics it tested


def test_cuped_shrinks_the_standard_error_by_sqrt_one_minus_rho_squared():
    rng = np.random.default_rng(8)
    n, rho = 5000, 0.8

    def arm(shift):
        pre = rng.normal(5, 2, n)
        post = 5 + shift + rho * (pre - 5) + math.sqrt(1 - rho**2) * rng.normal(0, 2, n)
        return S.CupedStats(n, S.SampleStats.from_values(post), S.SampleStats.from_values(pre), float(post @ pre))

    a, b = arm(0.0), arm(0.1)
    th = S.cuped_theta(a, b)
    adj = S.welch_test(S.cuped_adjust(a, th), S.cuped_adjust(b, th))
    raw = S.welch_test(a.post, b.post)
    assert adj.se / raw.se == pytest.approx(math.sqrt(1 - rho**2), abs=0.03)
    assert abs(adj.abs_lift - 0.1) < 3 * adj.se


def test_cuped_theta_is_the_pooled_regression_slope():
    rng = np.random.default_rng(1)
    pre = rng.normal(0, 1, 500)
    post = 2.0 * pre + rng.normal(0, 1, 500)
    a = S.CupedStats(250, S.SampleStats.from_values(post[:250]), S.SampleStats.from_values(pre[:250]), float(post[:250] @ pre[:250]))
    b = S.CupedStats(250, S.SampleStats.from_values(post[250:]), S.SampleStats.from_values(pre[250:]), float(post[250:] @ pre[250:]))
    _close(S.cuped_theta(a, b), np.polyfit(pre, post, 1)[0])


# ------------------------------------------------------------------ SRM, multiple testing, guardrails
@pytest.mark.parametrize("users,weights", [
    ([1000, 1000], [0.5, 0.5]), ([1000, 1100], [0.5, 0.5]), ([500, 1530, 990], [1, 3, 2]),
    ([5000, 5210, 4990, 5030], [1, 1, 1, 1]),
])
def test_srm_matches_gbstats_and_scipy(users, weights):
    p = S.srm_chi2(users, weights)
    _close(p, gb_utils.check_srm(users, weights))
    w = np.asarray(weights, float)
    _close(p, st.chisquare(users, w / w.sum() * sum(users)).pvalue)


def test_srm_alarm_threshold_and_edge_cases():
    assert S.srm_chi2([10000, 10000], [1, 1]) == 1.0
    assert S.srm_chi2([10000, 10500], [1, 1]) < 0.001  # 2.5% imbalance on 20k users: alarm
    assert S.srm_chi2([0, 0], [1, 1]) == 1.0
    assert S.srm_chi2([100, 100, 3], [1, 1, 0]) == 0.0  # users in a variant that should get none
    with pytest.raises(ValueError):
        S.srm_chi2([1, 2, 3], [1, 1])


def test_holm_by_definition_and_example():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x, running max
    np.testing.assert_allclose(S.holm(p), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(3)
    for _ in range(50):
        q = rng.random(rng.integers(1, 12)) ** 3
        adj = S.holm(q)
        m = len(q)
        order = np.argsort(q)
        for alpha in (0.01, 0.05, 0.2):
            # step-down procedure: reject in order while p_(i) <= alpha / (m - i)
            rejected = set()
            for i, k in enumerate(order):
                if q[k] <= alpha / (m - i):
                    rejected.add(k)
                else:
                    break
            assert rejected == set(np.flatnonzero(adj <= alpha))


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(4)
    for _ in range(50):
        q = rng.random(rng.integers(1, 15)) ** 2
        np.testing.assert_allclose(S.benjamini_hochberg(q), st.false_discovery_control(q, method="bh"), rtol=1e-12)


def test_adjustments_keep_nan_out_of_the_family():
    p = [0.01, float("nan"), 0.04]
    h, b = S.holm(p), S.benjamini_hochberg(p)
    assert math.isnan(h[1]) and math.isnan(b[1])
    np.testing.assert_allclose(h[[0, 2]], [0.02, 0.04])
    np.testing.assert_allclose(b[[0, 2]], [0.02, 0.04])
    assert S.holm([]).size == 0


def test_guardrail_verdicts():
    rng = np.random.default_rng(5)
    c = S.SampleStats.from_values(rng.normal(1.0, 1, 2000))
    up = S.welch_test(c, S.SampleStats.from_values(rng.normal(1.3, 1, 2000)))
    down = S.welch_test(c, S.SampleStats.from_values(rng.normal(0.7, 1, 2000)))
    flat = S.welch_test(c, S.SampleStats.from_values(rng.normal(1.0, 1, 2000)))
    assert S.guardrail_verdict(up) == "fail"
    assert S.guardrail_verdict(up, harmful="decrease") == "pass"
    assert S.guardrail_verdict(down) == "pass"
    assert S.guardrail_verdict(down, harmful="decrease") == "fail"
    assert flat.p_value > 0.05 and S.guardrail_verdict(flat) == "pass"
    with pytest.raises(ValueError):
        S.guardrail_verdict(up, harmful="up")


def test_degenerate_inputs_give_an_error_not_an_exception():
    one = S.SampleStats(1, 1.0, 1.0)
    r = S.welch_test(one, B)
    assert r.error and math.isnan(r.p_value)
    const = S.SampleStats(10, 10.0, 10.0)
    r = S.welch_test(const, const)
    assert r.error == "zero variance in both arms"
    zero_ctrl = S.SampleStats(100, 0.0, 0.0)
    r = S.welch_test(zero_ctrl, B)  # absolute test fine, relative lift undefined
    assert r.error is None and math.isnan(r.rel_lift) and r.p_value < 1e-10
    assert S.RatioStats(10, 1, 1, 0, 0, 0).mean == 0.0


# ------------------------------------------------------------------ simulation: A/A, power, peeking
def _sim_pvalues(rng, n_sims, n, effect, sd=1.0):
    xa = rng.exponential(sd, (n_sims, n))
    xb = rng.exponential(sd, (n_sims, n)) + effect
    out = []
    for i in range(n_sims):
        out.append(S.welch_test(S.SampleStats.from_values(xa[i]), S.SampleStats.from_values(xb[i])).p_value)
    return np.array(out)


def test_aa_false_positive_rate():
    p = _sim_pvalues(np.random.default_rng(2024), 200, 500, 0.0)
    fpr = float(np.mean(p < 0.05))
    assert 0.02 <= fpr <= 0.08, fpr
    # p-values of an A/A test are uniform
    assert st.kstest(p, "uniform").pvalue > 0.01


def test_power_matches_prediction():
    n, effect = 500, 0.15  # exponential(1): sd 1
    predicted = S.welch_power(effect, 1.0, 1.0, n, n)
    assert 0.6 < predicted < 0.9
    p = _sim_pvalues(np.random.default_rng(7), 200, n, effect)
    power = float(np.mean(p < 0.05))
    assert abs(power - predicted) < 0.1, (power, predicted)


def test_sequential_is_peeking_safe_where_welch_is_not():
    rng = np.random.default_rng(11)
    sims, looks, step = 200, 10, 100
    xa = rng.normal(0, 1, (sims, looks * step))
    xb = rng.normal(0, 1, (sims, looks * step))
    welch_hit = seq_hit = 0
    for i in range(sims):
        w = s = False
        for k in range(1, looks + 1):
            a = S.SampleStats.from_values(xa[i, : k * step])
            b = S.SampleStats.from_values(xb[i, : k * step])
            w |= S.welch_test(a, b).p_value < 0.05
            s |= S.sequential_test(a, b, tuning=2000).p_value < 0.05
        welch_hit += w
        seq_hit += s
    assert welch_hit / sims > 0.1  # peeking at a fixed-horizon test inflates alpha
    assert seq_hit / sims <= 0.05
