"""A/B test statistics over sufficient statistics: pure functions, numpy + scipy only.

Every test here works on per-arm *sufficient statistics* (n, sum, sum of squares, ...), never
on raw rows, so the same numbers come out of a 100-row unit test and a 10M-row analysis, and
they agree with GrowthBook's stats engine (``gbstats``) for the same inputs.

Conventions (the same as gbstats' frequentist engine):

* ``abs_lift = mean_t - mean_c``; its CI and the ``p_value`` come from Welch's unequal-variance
  t-test: ``se² = var_t/n_t + var_c/n_c``, Welch–Satterthwaite degrees of freedom.
* ``rel_lift = (mean_t - mean_c) / mean_c`` as a **fraction** (0.05 means +5 %), where
  ``mean_c`` is the control mean *before* any CUPED adjustment. Its standard error is the
  delta-method one, ``se_rel² = var_t/(mean_c² n_t) + var_c mean_t²/(mean_c⁴ n_c)``
  (unadjusted means), with the same Welch degrees of freedom as the absolute test.
* ``var`` is always the per-unit (per-user) sample variance with the ``n - 1`` denominator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from scipy import stats as _st

__all__ = [
    "SampleStats",
    "RatioStats",
    "CupedStats",
    "AdjustedStats",
    "TestResult",
    "welch_test",
    "sequential_test",
    "cuped_theta",
    "cuped_adjust",
    "ratio_variance",
    "srm_chi2",
    "holm",
    "benjamini_hochberg",
    "guardrail_verdict",
    "welch_power",
]


class Moments(Protocol):
    """What a test needs from one arm: n, the (possibly adjusted) mean, the per-unit variance."""

    n: int

    @property
    def mean(self) -> float: ...

    @property
    def variance(self) -> float: ...

    @property
    def unadjusted_mean(self) -> float: ...


@dataclass(frozen=True)
class SampleStats:
    """Sufficient statistics of one arm of a per-user metric: ``n``, ``Σx``, ``Σx²``.

    ``mean = Σx / n``; ``variance = (Σx² - (Σx)²/n) / (n - 1)`` (0 when ``n <= 1``).
    """

    n: int
    sum: float
    sum_sq: float

    @classmethod
    def from_values(cls, x) -> "SampleStats":
        x = np.asarray(x, dtype=float)
        return cls(int(x.size), float(x.sum()), float(np.dot(x, x)))

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        if self.n <= 1:
            return 0.0
        return max((self.sum_sq - self.sum * self.sum / self.n) / (self.n - 1), 0.0)

    @property
    def unadjusted_mean(self) -> float:
        return self.mean


def ratio_variance(mean_x: float, var_x: float, mean_y: float, var_y: float, cov_xy: float) -> float:
    """Delta-method per-unit variance of the ratio ``X̄ / Ȳ`` of two per-user means.

    ``Var ≈ var_x/μy² - 2 cov_xy μx/μy³ + μx² var_y/μy⁴``; divide by ``n`` for the variance of the
    ratio estimate itself. Users stay the randomisation unit, so clicks of one user that are
    correlated with that user's impressions are handled correctly (unlike a per-impression test).
    """
    if mean_y == 0:
        return 0.0
    v = var_x / mean_y**2 - 2.0 * cov_xy * mean_x / mean_y**3 + mean_x**2 * var_y / mean_y**4
    return max(v, 0.0)


@dataclass(frozen=True)
class RatioStats:
    """Sufficient statistics of one arm of a ratio metric (e.g. CTR = clicks / impressions).

    ``x`` is the per-user numerator, ``y`` the per-user denominator; ``mean = Σx / Σy`` and the
    per-unit variance is the delta-method one (:func:`ratio_variance`), as in gbstats'
    ``RatioStatistic``.
    """

    n: int
    sum_x: float
    sum_x2: float
    sum_y: float
    sum_y2: float
    sum_xy: float

    @property
    def numerator(self) -> SampleStats:
        return SampleStats(self.n, self.sum_x, self.sum_x2)

    @property
    def denominator(self) -> SampleStats:
        return SampleStats(self.n, self.sum_y, self.sum_y2)

    @property
    def covariance(self) -> float:
        if self.n <= 1:
            return 0.0
        return (self.sum_xy - self.sum_x * self.sum_y / self.n) / (self.n - 1)

    @property
    def mean(self) -> float:
        return self.sum_x / self.sum_y if self.sum_y else 0.0

    @property
    def variance(self) -> float:
        if self.n <= 1:
            return 0.0
        num, den = self.numerator, self.denominator
        return ratio_variance(num.mean, num.variance, den.mean, den.variance, self.covariance)

    @property
    def unadjusted_mean(self) -> float:
        return self.mean


@dataclass(frozen=True)
class CupedStats:
    """One arm of a metric with its pre-period covariate: post ``Y``, pre ``X``, ``Σ x y``."""

    n: int
    post: SampleStats
    pre: SampleStats
    sum_post_pre: float

    @property
    def covariance(self) -> float:
        if self.n <= 1:
            return 0.0
        return (self.sum_post_pre - self.post.sum * self.pre.sum / self.n) / (self.n - 1)


@dataclass(frozen=True)
class AdjustedStats:
    """An arm after CUPED: adjusted mean and variance, plus the raw mean (for relative lift)."""

    n: int
    mean: float
    variance: float
    unadjusted_mean: float


def cuped_theta(control: CupedStats, treatment: CupedStats) -> float:
    """CUPED coefficient ``θ = Cov(Y, X) / Var(X)`` estimated on both arms pooled.

    Pooling (as gbstats does) keeps θ identical in both arms, so the adjustment
    ``θ (X̄_t - X̄_c)`` has expectation 0 under randomisation and the lift stays unbiased.
    Returns 0 (no adjustment) when the pooled pre- or post-period variance is 0.
    """
    n = control.n + treatment.n
    post = SampleStats(n, control.post.sum + treatment.post.sum, control.post.sum_sq + treatment.post.sum_sq)
    pre = SampleStats(n, control.pre.sum + treatment.pre.sum, control.pre.sum_sq + treatment.pre.sum_sq)
    if pre.variance <= 0 or post.variance <= 0:
        return 0.0
    joint = CupedStats(n, post, pre, control.sum_post_pre + treatment.sum_post_pre)
    return joint.covariance / pre.variance


def cuped_adjust(arm: CupedStats, theta: float) -> AdjustedStats:
    """CUPED-adjusted arm: ``Ȳ - θ X̄`` with variance ``var_Y + θ² var_X - 2 θ cov(Y, X)``.

    (Deng et al. 2013.) The variance shrinks by the factor ``1 - ρ²`` at the optimal θ, which
    is where CUPED's extra power comes from.
    """
    if arm.n <= 1:
        var = 0.0
    else:
        var = arm.post.variance + theta**2 * arm.pre.variance - 2.0 * theta * arm.covariance
    # not clipped at 0 (a clearly negative value means inconsistent inputs and makes the test
    # refuse), except for rounding noise around a perfect correlation
    if var < 0 and var > -1e-9 * max(1.0, arm.post.variance):
        var = 0.0
    return AdjustedStats(arm.n, arm.post.mean - theta * arm.pre.mean, var, arm.post.mean)


@dataclass(frozen=True)
class TestResult:
    """Treatment-vs-control comparison: absolute lift with CI/p, and relative lift with CI/p.

    ``rel_*`` follow the convention of the module docstring (fraction of the unadjusted
    control mean). ``error`` says why a test could not be computed; then the CI and p-values
    are NaN.
    """

    control_mean: float
    treatment_mean: float
    abs_lift: float
    ci_low: float
    ci_high: float
    p_value: float
    se: float
    rel_lift: float
    rel_ci_low: float
    rel_ci_high: float
    p_value_rel: float
    rel_se: float
    dof: float
    error: str | None = field(default=None)


def _welch_dof(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch–Satterthwaite: ``(v_a/n_a + v_b/n_b)² / (v_a²/(n_a²(n_a-1)) + v_b²/(n_b²(n_b-1)))``."""
    den = var_a**2 / (n_a**2 * (n_a - 1)) + var_b**2 / (n_b**2 * (n_b - 1))
    if den <= 0:
        return math.inf
    return (var_a / n_a + var_b / n_b) ** 2 / den


def _sqrt(v: float) -> float:
    return math.sqrt(v) if v >= 0 else math.nan


def _lifts(control: Moments, treatment: Moments):
    """Point estimates and standard errors of the absolute and relative lifts."""
    ma, mb = control.mean, treatment.mean
    ua, ub = control.unadjusted_mean, treatment.unadjusted_mean
    va, vb = control.variance, treatment.variance
    na, nb = control.n, treatment.n
    abs_lift = mb - ma
    se = _sqrt(va / na + vb / nb) if na > 0 and nb > 0 else math.nan
    if ua != 0 and na > 0 and nb > 0:
        rel_lift = abs_lift / ua
        rel_se = _sqrt(vb / (ua**2 * nb) + va * ub**2 / (ua**4 * na))
    else:
        rel_lift = rel_se = math.nan
    return ma, mb, abs_lift, se, rel_lift, rel_se


def _invalid(control: Moments, treatment: Moments) -> str | None:
    if control.n < 2 or treatment.n < 2:
        return "fewer than 2 users in an arm"
    if control.variance < -1e-12 or treatment.variance < -1e-12:
        return "negative variance: inconsistent sufficient statistics"
    if control.variance <= 0 and treatment.variance <= 0:
        return "zero variance in both arms"
    return None


def welch_test(control: Moments, treatment: Moments, alpha: float = 0.05) -> TestResult:
    """Two-sided Welch t-test of ``treatment - control`` with a ``1 - alpha`` CI.

    ``t = Δ / se``, ``p = 2 P(T_ν > |t|)``, ``CI = Δ ± t_{1-α/2, ν} se`` with Welch's ν (see
    :func:`_welch_dof`); the relative lift uses the delta-method ``se_rel`` and the same ν.
    Works on any arm with ``n``, ``mean``, ``variance``, ``unadjusted_mean``:
    :class:`SampleStats`, :class:`RatioStats` (delta method), :class:`AdjustedStats` (CUPED).
    Equals ``scipy.stats.ttest_ind(..., equal_var=False)`` on raw data and gbstats'
    ``TwoSidedTTest`` (absolute and relative) on the same sufficient statistics. Unlike
    gbstats, which returns an empty result when *either* arm has zero variance, the test is
    computed when one arm has variance (e.g. a rare event seen in one arm only); it refuses
    (``error`` set, NaN CI/p) with fewer than 2 users in an arm, zero variance in both arms
    or a negative variance (inconsistent sufficient statistics).
    """
    ma, mb, abs_lift, se, rel_lift, rel_se = _lifts(control, treatment)
    err = _invalid(control, treatment)
    if err:
        nan = math.nan
        return TestResult(ma, mb, abs_lift, nan, nan, nan, se, rel_lift, nan, nan, nan, rel_se, nan, err)
    dof = _welch_dof(control.variance, control.n, treatment.variance, treatment.n)
    q = float(_st.t.ppf(1 - alpha / 2, dof))
    p = float(2 * _st.t.sf(abs(abs_lift) / se, dof))
    if math.isnan(rel_se) or rel_se == 0:
        rel_lo = rel_hi = p_rel = math.nan
    else:
        rel_lo, rel_hi = rel_lift - q * rel_se, rel_lift + q * rel_se
        p_rel = float(2 * _st.t.sf(abs(rel_lift) / rel_se, dof))
    return TestResult(ma, mb, abs_lift, abs_lift - q * se, abs_lift + q * se, p, se,
                      rel_lift, rel_lo, rel_hi, p_rel, rel_se, dof)


def _cs_halfwidth(se: float, n_total: int, alpha: float, tuning: float) -> float:
    """Half-width of the asymptotic confidence sequence (Waudby-Smith et al. 2023, eq. 9).

    With ``N = n_c + n_t``, ``s² = se² N`` and ``ρ² = (-2 ln α + ln(-2 ln α + 1)) / M``
    (``M`` = tuning, the sample size where the sequence is tightest):
    ``w = s √( 2 (Nρ² + 1) ln(√(Nρ² + 1)/α) / (Nρ)² )``.
    """
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning
    nr = n_total * rho2 + 1
    s = se * math.sqrt(n_total)
    return s * math.sqrt(2 * nr * math.log(math.sqrt(nr) / alpha) / (n_total**2 * rho2))


def _cs_pvalue(est: float, se: float, n_total: int, alpha: float, tuning: float) -> float:
    """Always-valid p-value ``min(1, 1/E)`` from the mixture e-value (eq. 155, same paper):
    ``E = exp(ρ² S / (2 (Nρ² + 1))) / √(Nρ² + 1)`` with ``S = N (est / se)²``."""
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning
    nr = n_total * rho2 + 1
    st2 = (est / se) ** 2 * n_total
    log_e = rho2 * st2 / (2 * nr) - 0.5 * math.log(nr)
    return float(min(1.0, math.exp(-log_e)))


def sequential_test(control: Moments, treatment: Moments, alpha: float = 0.05,
                    tuning: float = 5000) -> TestResult:
    """Peeking-safe test: always-valid confidence sequence and p-value for the lift.

    The CI (see :func:`_cs_halfwidth`) covers the true lift with probability ``1 - alpha``
    *simultaneously at every sample size*, so looking at the dashboard every day and stopping
    at the first significant result does not inflate the false-positive rate (a fixed-horizon
    Welch test does). ``tuning`` (gbstats' ``sequential_tuning_parameter``, default 5000) is the
    total sample size at which the sequence is narrowest. It is wider than the Welch CI at
    any fixed n: that is the price of peeking. Same numbers as gbstats'
    ``SequentialTwoSidedTTest`` (absolute and relative); ``dof`` is reported as ``inf``
    because the sequence is asymptotic (normal).
    """
    ma, mb, abs_lift, se, rel_lift, rel_se = _lifts(control, treatment)
    err = _invalid(control, treatment)
    nan = math.nan
    if err:
        return TestResult(ma, mb, abs_lift, nan, nan, nan, se, rel_lift, nan, nan, nan, rel_se, nan, err)
    n_total = control.n + treatment.n
    w = _cs_halfwidth(se, n_total, alpha, tuning)
    p = _cs_pvalue(abs_lift, se, n_total, alpha, tuning)
    if math.isnan(rel_se) or rel_se == 0:
        rel_lo = rel_hi = p_rel = nan
    else:
        wr = _cs_halfwidth(rel_se, n_total, alpha, tuning)
        rel_lo, rel_hi = rel_lift - wr, rel_lift + wr
        p_rel = _cs_pvalue(rel_lift, rel_se, n_total, alpha, tuning)
    return TestResult(ma, mb, abs_lift, abs_lift - w, abs_lift + w, p, se,
                      rel_lift, rel_lo, rel_hi, p_rel, rel_se, math.inf)


def srm_chi2(observed_counts: Sequence[float], expected_weights: Sequence[float]) -> float:
    """Sample-ratio-mismatch p-value: Pearson χ² of users per variant vs. the planned split.

    ``χ² = Σ (o_i - e_i)² / e_i`` with ``e_i = w_i / Σw · Σo``, ``k - 1`` degrees of freedom
    (``k`` variants with a positive weight). A p-value below 0.001 means the assignment or
    the logging is broken and the experiment's lifts cannot be trusted. Users observed in a
    variant with weight 0 are an SRM by definition (p = 0). Same value as gbstats'
    ``check_srm`` and ``scipy.stats.chisquare``.
    """
    o = np.asarray(observed_counts, dtype=float)
    w = np.asarray(expected_weights, dtype=float)
    if o.shape != w.shape:
        raise ValueError(f"observed_counts has {o.size} entries but expected_weights has {w.size}")
    total = o.sum()
    if total <= 0:
        return 1.0
    pos = w > 0
    if np.any(o[~pos] > 0):
        return 0.0
    if pos.sum() < 2:
        return 1.0
    e = w[pos] / w[pos].sum() * total
    x2 = float(np.sum((o[pos] - e) ** 2 / e))
    return float(_st.chi2.sf(x2, int(pos.sum()) - 1))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (family-wise error control, any dependence).

    Sorted ascending ``p_(1) ≤ … ≤ p_(m)``: ``adj_(i) = max_{j ≤ i} min(1, (m - j + 1) p_(j))``.
    Reject ``H_i`` when ``adj_i ≤ alpha``. NaN inputs stay NaN and do not count in ``m``.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="mergesort")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false-discovery-rate control).

    Sorted ascending: ``adj_(i) = min_{j ≥ i} min(1, m p_(j) / j)``. Same as
    ``scipy.stats.false_discovery_control(p, method='bh')``. NaN inputs stay NaN.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="mergesort")
    scaled = q[order] * m / np.arange(1, m + 1)
    adj = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def guardrail_verdict(result: TestResult, harmful: str = "increase", alpha: float = 0.05) -> str:
    """``"fail"`` when the metric moved significantly (``p < alpha``) in the harmful direction.

    ``harmful`` is ``"increase"`` (default: e.g. reports, latency) or ``"decrease"`` (e.g.
    retention). Everything else, including a test that could not be computed, is ``"pass"``.
    Uses the two-sided test's p-value, i.e. the CI lies entirely on the harmful side of 0.
    """
    if harmful not in ("increase", "decrease"):
        raise ValueError(f"harmful must be 'increase' or 'decrease', got {harmful!r}")
    p = result.p_value
    if p is None or math.isnan(p) or p >= alpha:
        return "pass"
    worse = result.abs_lift > 0 if harmful == "increase" else result.abs_lift < 0
    return "fail" if worse else "pass"


def welch_power(effect: float, sd_control: float, sd_treatment: float, n_control: int,
                n_treatment: int, alpha: float = 0.05) -> float:
    """Power of the two-sided test to detect an absolute ``effect`` (normal approximation).

    ``se = √(sd_c²/n_c + sd_t²/n_t)``, ``z = z_{1-α/2}``:
    ``power = Φ(|effect|/se - z) + Φ(-|effect|/se - z)``.
    """
    se = math.sqrt(sd_control**2 / n_control + sd_treatment**2 / n_treatment)
    z = _st.norm.ppf(1 - alpha / 2)
    d = abs(effect) / se
    return float(_st.norm.cdf(d - z) + _st.norm.cdf(-d - z))
