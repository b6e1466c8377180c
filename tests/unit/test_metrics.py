"""ranking.metrics against scikit-learn and hand-computed values."""
import numpy as np
import pytest
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from ranking import metrics as M
from ranking.metrics import auc, ece, gauc, group_aucs, logloss, ndcg_at_k, reliability, reliability_plot


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    n = 3000
    groups = rng.integers(0, 80, n)
    y = (rng.random(n) < 0.3 + 0.4 * (groups % 2)).astype(int)
    # rounded scores: many ties, which is where rank-based AUC implementations go wrong
    p = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 1)
    return y, p, groups


def test_auc_equals_sklearn_with_ties(data):
    y, p, _ = data
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auc(y, -p) == pytest.approx(1 - roc_auc_score(y, p), abs=1e-12)


def test_auc_small_hand_case():
    # pairs (pos, neg): (0.8, 0.1) win, (0.8, 0.4) win, (0.4, 0.1) win, (0.4, 0.4) tie -> 3.5 / 4
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert np.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_gauc_is_impression_weighted_mean_of_sklearn_per_group(data):
    y, p, g = data
    g = g.copy()
    g[:40] = 999  # a group ...
    y = y.copy()
    y[:40] = 1    # ... with a single class: left out
    aucs, weights = [], []
    for key in np.unique(g):
        m = g == key
        if len(np.unique(y[m])) == 2:
            aucs.append(roc_auc_score(y[m], p[m]))
            weights.append(m.sum())
    assert gauc(y, p, g) == pytest.approx(np.average(aucs, weights=weights), abs=1e-12)
    keys, per_group, sizes = group_aucs(y, p, g)
    assert np.isnan(per_group[keys == 999]).all()
    assert sizes.sum() == len(y)


def test_gauc_accepts_string_groups():
    y = np.array([1, 0, 1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.5])
    g = np.array(["a", "a", "b", "b", "c", "c"])
    # a: 1.0, b: 0.0, c: 0.5 (tie), equal sizes
    assert gauc(y, p, g) == pytest.approx(0.5)


def test_logloss_equals_sklearn(data):
    y, p, _ = data
    q = np.clip(p, 0.01, 0.99)
    assert logloss(y, q) == pytest.approx(log_loss(y, q), rel=1e-12)


def test_ndcg_equals_sklearn_per_group_with_ties():
    rng = np.random.default_rng(3)
    n = 1200
    g = rng.integers(0, 60, n)
    rel = rng.integers(0, 4, n) * (rng.random(n) < 0.5)
    s = np.round(rng.random(n) + 0.1 * rel, 1)
    for k in (3, 10, None):
        expected = [ndcg_score([rel[g == key]], [s[g == key]], k=k)
                    for key in np.unique(g) if rel[g == key].sum() > 0 and (g == key).sum() > 1]
        assert ndcg_at_k(rel, s, g, k=k) == pytest.approx(np.mean(expected), abs=1e-12)


def test_ndcg_perfect_and_reversed():
    rel = np.array([3, 2, 1, 0, 2, 0])
    g = np.array([0, 0, 0, 0, 1, 1])
    assert ndcg_at_k(rel, rel.astype(float), g, k=10) == pytest.approx(1.0)
    assert ndcg_at_k(rel, -rel.astype(float), g, k=10) < 0.8


def test_reliability_and_ece_hand_case():
    # bin [0.0,0.5): preds 0.2, 0.2 with labels 0, 1 -> |0.5 - 0.2| = 0.3 over 2 rows
    # bin [0.5,1.0]: preds 0.9, 1.0 with labels 1, 1 -> |1.0 - 0.95| = 0.05 over 2 rows
    y = np.array([0, 1, 1, 1])
    p = np.array([0.2, 0.2, 0.9, 1.0])
    r = reliability(y, p, bins=2)
    np.testing.assert_allclose(r["count"], [2, 2])
    np.testing.assert_allclose(r["mean_pred"], [0.2, 0.95])
    np.testing.assert_allclose(r["frac_pos"], [0.5, 1.0])
    assert ece(y, p, bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.05)


def test_ece_small_for_calibrated_large_for_shifted():
    rng = np.random.default_rng(0)
    p = rng.random(50_000)
    y = (rng.random(50_000) < p).astype(int)
    assert ece(y, p) < 0.01
    assert ece(y, np.clip(p + 0.2, 0, 1)) > 0.1


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError):
        gauc([0, 1], [0.1, 0.2], [1, 1, 2])


def test_reliability_plot_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(int)
    out = reliability_plot(tmp_path / "plots" / "rel.png", {"model": (y, p), "shifted": (y, p ** 2)})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _delong_by_definition(y, a, b):
    """DeLong's paired variance straight from its definition: the kernel psi over every (positive, negative) pair."""
    y = np.asarray(y, bool)
    v10, v01 = [], []
    for p in (a, b):
        psi = (p[y][:, None] > p[~y][None, :]) + 0.5 * (p[y][:, None] == p[~y][None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / y.sum() + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / (~y).sum()
    return v10[0].mean() - v10[1].mean(), np.sqrt(var)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_difference_matches_delong_by_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(400) < 0.25
    a = np.round(y * 0.7 + rng.normal(0, 1, 400), 1)        # rounded: many tied scores
    b = np.round(a + rng.normal(0, 0.8, 400), 1)
    diff, se = M.auc_difference(y, a, b)
    want_diff, want_se = _delong_by_definition(y, a, b)
    assert diff == pytest.approx(M.auc(y, a) - M.auc(y, b), abs=1e-12)
    assert diff == pytest.approx(want_diff, abs=1e-12)
    assert se == pytest.approx(want_se, rel=1e-9)


def test_auc_difference_se_agrees_with_a_paired_bootstrap():
    rng = np.random.default_rng(7)
    n = 4000
    y = rng.random(n) < 0.1
    a = y * 1.0 + rng.normal(0, 1, n)
    b = a + rng.normal(0, 0.5, n)   # correlated with a: the paired se is well below the unpaired one
    _, se = M.auc_difference(y, a, b)
    boot = []
    for _ in range(300):
        i = rng.integers(0, n, n)
        boot.append(M.auc(y[i], a[i]) - M.auc(y[i], b[i]))
    assert se == pytest.approx(np.std(boot), rel=0.15)
    unpaired = np.hypot(*(np.std([M.auc(y[i], p[i]) for i in (rng.integers(0, n, n) for _ in range(100))])
                          for p in (a, b)))
    assert se < 0.8 * unpaired


def test_auc_difference_of_a_single_class_is_nan():
    d, se = M.auc_difference([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert np.isnan(d) and np.isnan(se)
