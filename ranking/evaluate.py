"""Is this model good enough to ship? Per-objective quality of a registered model on held-out data.

Binary objectives: AUC, GAUC (impression-weighted per-user AUC), logloss, ECE; on simulated data
also the oracle AUC (AUC of the world's true probabilities on the same rows) and the ratio.
Regression objectives: RMSE in the transformed space, MAE in natural units. The strategy's blended
score is judged by NDCG@10 against the realised utility (the same blend applied to the labels,
clipped at 0) per request. A reliability plot (PNG) shows calibration.

JSON shape: ``{"model", "data", "split", "rows", "objectives": {NAME: {"auc", "gauc", "logloss",
"ece", "oracle_auc"?, "oracle_ratio"?} | {"rmse", "mae"}}, "ndcg@10", "plot"?}``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from strategy.errors import FieldError, ValidationError

from . import metrics as M

ORACLE_COLUMNS = {"click": "p_click", "like": "p_like", "share": "p_share", "report": "p_report"}


def held_out_rows(data: str, split: str = "test"):
    """``(frame, description)``: the ``split`` rows of simulated logs (a folder or parquet file) or of
    ``kuairand`` (the data set's standard test split)."""
    from .datasets import load_kuairand, load_sim_logs

    if split not in ("test", "valid"):
        raise ValidationError([FieldError("split", f"'{split}' is not allowed (allowed: test, valid)", "choice")])
    if data == "kuairand":
        ds = load_kuairand()
        if split == "valid":
            raise ValidationError([FieldError("split", "KuaiRand has no validation split (allowed: test)", "choice")])
    else:
        if not Path(data).exists():
            raise ValidationError([FieldError("data", f"no such file or folder: {data} "
                                              "(a simulated log folder / impressions.parquet, or 'kuairand')",
                                              "missing_file")])
        ds = load_sim_logs(data)
    frame = ds.test if split == "test" else ds.valid
    return frame.reset_index(drop=True), {"source": data, "split": split}


def evaluate_model(model, frame, strategy=None, plot: str | Path | None = None) -> dict:
    """Metrics of ``model`` (``.objectives``, ``.predict(rows)``) on labelled ``frame``."""
    missing = [name for name in model.objectives if name not in frame.columns]
    if missing:
        raise ValidationError([FieldError(name, f"label column '{name}' missing from the evaluation data",
                                          "missing_column") for name in missing])
    p = np.asarray(model.predict(frame), dtype=np.float64)
    groups = frame["user_id"].to_numpy() if "user_id" in frame.columns else None
    out: dict = {}
    curves = {}
    for k, name in enumerate(model.objectives):
        y = frame[name].to_numpy(dtype=np.float64)
        binary = set(np.unique(y)) <= {0.0, 1.0}
        if binary:
            m = {"auc": M.auc(y, p[:, k]), "logloss": M.logloss(y, p[:, k]), "ece": M.ece(y, p[:, k])}
            if groups is not None:
                m["gauc"] = M.gauc(y, p[:, k], groups)
            oracle = ORACLE_COLUMNS.get(name)
            if oracle in frame.columns:
                m["oracle_auc"] = M.auc(y, frame[oracle].to_numpy(dtype=np.float64))
                m["oracle_ratio"] = m["auc"] / m["oracle_auc"]
            curves[name] = (y, p[:, k])
        else:
            m = {"rmse": float(np.sqrt(np.mean((np.log1p(np.clip(p[:, k], 0, None)) - np.log1p(np.clip(y, 0, None))) ** 2))),
                 "mae": float(np.mean(np.abs(p[:, k] - y))), "mean_pred": float(p[:, k].mean()),
                 "mean_label": float(y.mean())}
        out[name] = {key: float(v) for key, v in m.items()}
    result = {"rows": int(len(frame)), "objectives": out}
    if strategy is not None:
        result["ndcg@10"] = blended_ndcg(strategy, model.objectives, p, frame)
    if plot is not None and curves:
        result["plot"] = str(M.reliability_plot(plot, curves, title="reliability (test)"))
    return result


def blended_ndcg(strategy, objectives, predictions, frame, k: int = 10) -> float | None:
    """NDCG@k of the strategy's blended score against the same blend of the labels, per request
    (or per user when the rows carry no request id). ``None`` if the model lacks an objective."""
    from strategy.blend import blend

    if any(name not in objectives for name in strategy.objective_names):
        return None
    cols = [objectives.index(name) for name in strategy.objective_names]
    scores = blend(strategy, predictions[:, cols])
    labels = frame[list(strategy.objective_names)].to_numpy(dtype=np.float64)
    utility = np.maximum(blend(strategy, labels), 0.0)  # gains: realised utility, harmful outcomes count 0
    group_col = "request_id" if "request_id" in frame.columns else "user_id"
    return float(M.ndcg_at_k(utility, scores, frame[group_col].to_numpy(), k=k))
