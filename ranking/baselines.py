"""Baseline rankers: smoothed item popularity."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


class SmoothedItemPopularity:
    """Each item's rate of every objective over the logs it was fitted on, smoothed toward the global
    rate: ``(positives + strength * prior) / (impressions + strength)``; an unseen item gets the prior.

    Fitted on train (+ valid) and applied to later rows, it is the point-in-time item rate of a row that
    sees the whole training period (the ``item_{objective}_rate`` column of
    :func:`ranking.datasets.load_kuairand` for test rows). ``predict`` returns ``(N, K)`` rates in
    ``objectives`` order.
    """

    name = "item popularity"

    def __init__(self, objectives: Sequence[str], strength: float = 20.0, item_column: str = "item_id",
                 use_valid: bool = True):
        self.objectives = list(objectives)
        self.strength = float(strength)
        self.item_column = item_column
        self.use_valid = use_valid
        self.prior: np.ndarray | None = None
        self.table: pd.DataFrame | None = None

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "SmoothedItemPopularity":
        missing = [c for c in (self.item_column, *self.objectives) if c not in train.columns]
        if missing:
            raise KeyError(f"columns missing from the training frame: {missing}")
        self.prior = train[self.objectives].to_numpy(dtype=np.float64).mean(axis=0)
        logs = pd.concat([train, valid]) if (valid is not None and self.use_valid) else train
        grouped = logs.groupby(self.item_column, sort=False)[self.objectives]
        sums = grouped.sum().astype(np.float64)
        n = grouped.size().astype(np.float64)
        self.table = (sums + self.strength * self.prior).div(n + self.strength, axis=0)
        return self

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        if self.table is None:
            raise RuntimeError("SmoothedItemPopularity is not fitted")
        rates = self.table.reindex(df[self.item_column].to_numpy()).to_numpy(dtype=np.float64)
        missing = np.isnan(rates)
        if missing.any():
            rates = np.where(missing, self.prior[None, :], rates)
        return rates
