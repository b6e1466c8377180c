"""Ranking and calibration metrics in pure numpy (matplotlib only inside :func:`reliability_plot`).

Shapes: ``y`` and ``p`` are 1-d arrays of length ``N``; ``groups`` is a length-``N`` array of group keys
(user ids, request ids: any sortable dtype). Every function validates lengths and raises ``ValueError``
on a mismatch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _as_1d(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a).ravel() for a in arrays]
    n = {len(a) for a in out}
    if len(n) > 1:
        raise ValueError(f"arrays of different lengths: {[len(a) for a in out]}")
    return out


def _tie_average_ranks(block_start: np.ndarray) -> np.ndarray:
    """1-based ranks of the positions of a sorted array, ties averaged: ``block_start[i]`` is True where
    a new tie block begins. Returns ranks aligned with the sorted order."""
    n = len(block_start)
    pos = np.arange(1, n + 1, dtype=np.float64)
    block_id = np.cumsum(block_start) - 1
    first = np.flatnonzero(block_start)
    last = np.r_[first[1:], n] - 1
    return ((pos[first] + pos[last]) / 2.0)[block_id]


def auc(y, p) -> float:
    """ROC AUC from the Mann-Whitney rank statistic, tied scores counting one half (equals
    ``sklearn.metrics.roc_auc_score``). ``nan`` when ``y`` holds a single class."""
    y, p = _as_1d(y, p)
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r_pos = _midranks(p)[y].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` in its own order, ties averaged."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = _tie_average_ranks(np.r_[True, xs[1:] != xs[:-1]])
    return ranks


def auc_difference(y, p_a, p_b) -> tuple[float, float]:
    """``(AUC(p_a) - AUC(p_b), its standard error)`` of two scorings of the same rows, by DeLong et al.
    (Biometrics 1988) in the O(n log n) form of Sun & Xu (IEEE SPL 2014): the paired variance counts the
    two models' correlation, so a difference of 0.001 on the same test rows can be told from noise
    (or not) without a bootstrap. ``(nan, nan)`` when ``y`` holds a single class."""
    y, p_a, p_b = _as_1d(y, p_a, p_b)
    y = y.astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    v10, v01 = [], []   # per positive: share of negatives it outranks; per negative: share of positives above it
    for p in (np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)):
        tz, tx, ty = _midranks(p), _midranks(p[y]), _midranks(p[~y])
        v10.append((tz[y] - tx) / n)
        v01.append(1.0 - (tz[~y] - ty) / m)
    diff = float(v10[0].mean() - v10[1].mean())
    if m < 2 or n < 2:
        return diff, float("nan")
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return diff, float(np.sqrt(max(var, 0.0)))


def group_aucs(y, p, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group AUC: ``(keys, aucs, sizes)`` over every group (``nan`` AUC for single-class groups)."""
    y, p, groups = _as_1d(y, p, groups)
    y = y.astype(bool)
    keys, gidx = np.unique(groups, return_inverse=True)
    order = np.lexsort((p, gidx))
    gs, ps, ys = gidx[order], p[order], y[order]
    n = len(order)
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    start = new_group | np.r_[True, ps[1:] != ps[:-1]]
    ranks_global = _tie_average_ranks(start)
    # rank within the group = global rank - rows of the groups before
    group_first = np.flatnonzero(new_group)
    offset = np.repeat(group_first, np.diff(np.r_[group_first, n]))
    ranks = ranks_global - offset
    sizes = np.bincount(gs, minlength=len(keys)).astype(np.float64)
    n_pos = np.bincount(gs, weights=ys.astype(np.float64), minlength=len(keys))
    r_pos = np.bincount(gs, weights=np.where(ys, ranks, 0.0), minlength=len(keys))
    n_neg = sizes - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        aucs = (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    aucs[(n_pos == 0) | (n_neg == 0)] = np.nan
    return keys, aucs, sizes


def gauc(y, p, groups) -> float:
    """Group AUC: the per-group AUCs averaged with weights = group impressions, over the groups holding
    both classes. ``nan`` when no group has both."""
    _, aucs, sizes = group_aucs(y, p, groups)
    ok = ~np.isnan(aucs)
    if not ok.any():
        return float("nan")
    return float(np.sum(aucs[ok] * sizes[ok]) / np.sum(sizes[ok]))


def logloss(y, p, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy, probabilities clipped to ``[eps, 1 - eps]``."""
    y, p = _as_1d(y, p)
    p = np.clip(p.astype(np.float64), eps, 1 - eps)
    y = y.astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def reliability(y, p, bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability-diagram data over ``bins`` equal-width bins of ``[0, 1]``.

    Returns ``edges`` (bins + 1), and per bin ``count``, ``mean_pred``, ``frac_pos`` (``nan`` for an
    empty bin).
    """
    y, p = _as_1d(y, p)
    p = np.clip(p.astype(np.float64), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(count > 0, sum_p / count, np.nan)
        frac_pos = np.where(count > 0, sum_y / count, np.nan)
    return {"edges": edges, "count": count, "mean_pred": mean_pred, "frac_pos": frac_pos}


def ece(y, p, bins: int = 10) -> float:
    """Expected calibration error: ``sum_b n_b / N * |frac_pos_b - mean_pred_b|`` over equal-width bins."""
    r = reliability(y, p, bins)
    ok = r["count"] > 0
    total = r["count"].sum()
    if total == 0:
        return float("nan")
    return float(np.sum(r["count"][ok] * np.abs(r["frac_pos"][ok] - r["mean_pred"][ok])) / total)


def ndcg_at_k(relevance, scores, groups, k: int | None = 10) -> float:
    """Mean NDCG@k over groups (linear gain ``relevance``, discount ``1 / log2(rank + 1)``).

    Tied scores get the average gain of their tie block, as ``sklearn.metrics.ndcg_score`` does. Groups
    whose relevance is all zero (no ideal DCG) are left out of the mean; ``nan`` if every group is.
    """
    rel, s, groups = _as_1d(relevance, scores, groups)
    rel = rel.astype(np.float64)
    _, gidx = np.unique(groups, return_inverse=True)
    n = len(rel)
    if n == 0:
        return float("nan")
    n_groups = int(gidx.max()) + 1

    def discounts(sorted_groups: np.ndarray) -> np.ndarray:
        new = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
        first = np.flatnonzero(new)
        pos = np.arange(n) - np.repeat(first, np.diff(np.r_[first, n]))  # 0-based rank within group
        d = 1.0 / np.log2(pos + 2.0)
        if k is not None:
            d[pos >= k] = 0.0
        return d

    # DCG with tie-averaged gains
    order = np.lexsort((-s, gidx))
    gs, ss, rs = gidx[order], s[order], rel[order]
    block_start = np.r_[True, (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])]
    block_id = np.cumsum(block_start) - 1
    block_mean = np.bincount(block_id, weights=rs) / np.bincount(block_id)
    dcg = np.bincount(gs, weights=block_mean[block_id] * discounts(gs), minlength=n_groups)
    # ideal DCG
    order = np.lexsort((-rel, gidx))
    gi = gidx[order]
    idcg = np.bincount(gi, weights=rel[order] * discounts(gi), minlength=n_groups)
    ok = idcg > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(dcg[ok] / idcg[ok]))


def reliability_plot(path, curves: Mapping[str, tuple[Sequence, Sequence]], bins: int = 10,
                     title: str = "reliability") -> Path:
    """Write a reliability diagram PNG: one line per ``name -> (y, p)`` of ``curves`` (ECE in the legend),
    the diagonal, and a histogram of predictions below. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for name, (y, p) in curves.items():
        r = reliability(y, p, bins)
        ok = r["count"] > 0
        ax.plot(r["mean_pred"][ok], r["frac_pos"][ok], marker="o", label=f"{name} (ECE {ece(y, p, bins):.3f})")
        hx.hist(np.clip(np.asarray(p, dtype=np.float64), 0, 1), bins=r["edges"], histtype="step", label=name)
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    hx.set_xlabel("predicted probability")
    hx.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
