"""Blend formulas over an N candidates x K objectives prediction matrix (vectorised).

Shapes: ``predictions`` is ``(N, K)`` float, columns in ``strategy.objective_names`` order,
in natural units (probabilities for binary objectives, e.g. seconds for watch time).

- ``calibrate``: per-objective calibration maps, values stay in natural units.
- ``utilities``: calibrated values after each objective's transform (``log1p``/``identity``).
- ``weighted_sum``: ``score = U @ w``.
- ``weighted_product``: ``score = prod_{w_i>0} (u_i + eps)^w_i * exp(sum_{w_i<0} w_i u_i)``, computed
  in log space. Positive weights multiply; a negative-weight objective is a penalty factor
  ``exp(w_i u_i)`` in (0, 1] (in log space: the same additive penalty as in ``weighted_sum``).
"""
from __future__ import annotations

import numpy as np

from .config import Strategy


def calibrate(strategy: Strategy, predictions: np.ndarray) -> np.ndarray:
    """Apply each objective's calibration map; returns a new ``(N, K)`` array."""
    out = np.array(predictions, dtype=np.float64, copy=True)
    for k, objective in enumerate(strategy.objectives):
        if objective.calibration is not None:
            out[:, k] = objective.calibration(out[:, k])
    return out


def utilities(strategy: Strategy, calibrated: np.ndarray) -> np.ndarray:
    """Transform calibrated predictions into per-objective utilities ``(N, K)``."""
    out = calibrated
    log_cols = [k for k, o in enumerate(strategy.objectives) if o.transform == "log1p"]
    if log_cols:
        out = calibrated.copy()
        out[:, log_cols] = np.log1p(np.maximum(calibrated[:, log_cols], 0.0))
    return out


def blend_utilities(strategy: Strategy, utils: np.ndarray) -> np.ndarray:
    """Blend ``(N, K)`` utilities into ``(N,)`` scores with the strategy's formula."""
    w = strategy.weights
    if strategy.blend.formula == "weighted_sum":
        return utils @ w
    pos, neg = w > 0, w < 0
    log_score = np.log(np.maximum(utils[:, pos], 0.0) + strategy.blend.eps) @ w[pos]
    if neg.any():
        log_score = log_score + utils[:, neg] @ w[neg]
    return np.exp(log_score)


def blend(strategy: Strategy, predictions: np.ndarray) -> np.ndarray:
    """Scores ``(N,)`` of a raw prediction matrix ``(N, K)``: calibrate, transform, blend."""
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.ndim != 2 or predictions.shape[1] != len(strategy.objectives):
        raise ValueError(
            f"predictions must be (N, {len(strategy.objectives)}) for objectives "
            f"{list(strategy.objective_names)}, got {predictions.shape}"
        )
    return blend_utilities(strategy, utilities(strategy, calibrate(strategy, predictions)))
