"""Distillation from a LightGBM teacher: soft training targets for the TorchRec rankers (Hinton et al.
2015, "Distilling the Knowledge in a Neural Network"; Ke et al. 2019, DeepGBM, distils GBDTs into nets).

On tabular history features a GBDT is hard to beat, and a net trained on 0/1 labels alone learns less of
what the trees see. Here a LightGBM model per binary objective is fitted on the training rows' numeric
columns (the benchmark LightGBM's inputs, ``Dataset.dense_columns``), and each training row's target
becomes ``alpha * label + (1 - alpha) * p_teacher``. ``p_teacher`` is out-of-fold: each row is predicted
by trees fitted on the other ``folds - 1`` folds, never on itself (in-sample GBDT probabilities are
over-confident, and a net would learn to trust them more than they deserve on new rows). The teacher's
number of rounds is chosen by early stopping on the validation rows; validation and test rows keep their
true labels, so early stopping and every reported metric are on real labels.

Only training sees the teacher: the registered model, its feature spec and the online ranker are
unchanged (no extra serving cost).

``distill_from:`` distils a registered TorchRec ranker instead (a teacher of the same objectives, e.g. the
served MMoE with GBDT leaves, into a smaller student: fewer experts, narrower towers, smaller
embeddings, no leaves): each training row's binary targets become ``alpha * label + (1 - alpha) * p``,
``p`` the teacher's served probability of the row (the teacher was trained on these rows, so its
probabilities are in-sample; ``alpha`` keeps the labels in charge). Validation and test keep true labels::

    distill_from:
      model: kuairand_hybrid     # name (its current version) or name@version
      registry: registry         # default: the train config's registry
      alpha: 0.3
      objectives: [click, like]  # default: every binary objective the teacher also predicts

Train config section (``ranking.train``)::

    distill:
      objectives: [click, long_view, like]   # default: every binary objective of the config
      alpha: 0.5               # weight of the true label (1 = no distillation)
      folds: 5                 # out-of-fold teacher predictions on the training rows
      max_rounds: 1500         # per objective, early-stopped on the validation rows
      early_stopping_rounds: 100
      num_leaves: 31
      learning_rate: 0.03
      min_data_in_leaf: 50
      seed: 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .leaves import objective_section

DISTILL_KEYS = ("objectives", "alpha", "folds", "max_rounds", "early_stopping_rounds", "num_leaves",
                "learning_rate", "min_data_in_leaf", "seed")
DISTILL_FROM_KEYS = ("model", "registry", "alpha", "objectives")


@dataclass(frozen=True)
class DistillConfig:
    """The ``distill:`` section of a train config (see the module docstring)."""

    objectives: tuple[str, ...] | None = None   # None: every binary objective
    alpha: float = 0.5
    folds: int = 5
    max_rounds: int = 1500
    early_stopping_rounds: int = 100
    num_leaves: int = 31
    learning_rate: float = 0.03
    min_data_in_leaf: int = 50
    seed: int = 0


def distill_config_from_dict(errs, value, path: str = "distill", objectives: Sequence[str] | None = None):
    """Validate a ``distill:`` mapping into ``errs`` (``strategy.errors.Errors``); ``None`` when invalid.

    ``objectives``: the config's objective names (an unknown one names the allowed ones)."""
    before = len(errs.items)
    d, kw = objective_section(errs, value, path, DISTILL_KEYS, objectives, {
        "alpha": (0, 1, False, False), "folds": (2, 100, True, False), "max_rounds": (1, 100_000, True, False),
        "early_stopping_rounds": (1, 100_000, True, False), "num_leaves": (2, 131_072, True, False),
        "learning_rate": (0, 10, False, True), "min_data_in_leaf": (1, 10 ** 9, True, False),
        "seed": (0, 2 ** 31, True, False)})
    return DistillConfig(**kw) if d is not None and len(errs.items) == before else None


@dataclass(frozen=True)
class DistillFromConfig:
    """The ``distill_from:`` section of a train config: a registered TorchRec teacher."""

    model: str
    registry: str | None = None
    alpha: float = 0.5
    objectives: tuple[str, ...] | None = None


def distill_from_config_from_dict(errs, value, path: str = "distill_from", objectives: Sequence[str] | None = None):
    """Validate a ``distill_from:`` mapping into ``errs``; ``None`` when invalid."""
    from strategy.checks import as_str

    before = len(errs.items)
    d, kw = objective_section(errs, value, path, DISTILL_FROM_KEYS, objectives, {"alpha": (0, 1, False, False)})
    if d is None:
        return None
    if "model" not in d:
        errs.add(f"{path}.model", "required (a registered model: name or name@version)", "required")
    for key in ("model", "registry"):
        if d.get(key) is not None:
            kw[key] = as_str(errs, d[key], f"{path}.{key}", max_len=4096)
    return DistillFromConfig(**kw) if len(errs.items) == before else None


def registered_teacher_targets(cfg, frame: pd.DataFrame, y: np.ndarray, registry: str, log=print):
    """``(soft targets, description)``: ``y`` (raw labels in ``cfg.objectives`` order) with each chosen
    binary objective mixed with the registered teacher's probability of the row."""
    from strategy.errors import FieldError, ValidationError

    from .artifacts import load_model

    d = cfg.distill_from
    teacher = load_model(d.registry or registry, d.model)
    names = [o.name for o in cfg.objectives]
    missing = [k for k in d.objectives if k not in teacher.objectives]
    if missing:
        raise ValidationError([cfg.error("distill_from.objectives", f"{teacher.name}@{teacher.version} predicts "
                                         f"{', '.join(teacher.objectives)}, not {', '.join(missing)}", "invalid")])
    absent = [c for c in teacher.columns if c not in frame.columns and c not in teacher.encoder.fillable_columns()]
    if absent:
        raise ValidationError([FieldError("distill_from.model", f"{teacher.name}@{teacher.version} reads columns the "
                                          f"training rows lack: {', '.join(absent)}", "unknown_column", cfg.source)])
    p = teacher.predict(frame, allow_missing=True)
    out = np.asarray(y, dtype=np.float64).copy()
    for k in d.objectives:
        i, j = names.index(k), teacher.objectives.index(k)
        out[:, i] = d.alpha * out[:, i] + (1.0 - d.alpha) * p[:, j]
    log(f"distill_from {teacher.name}@{teacher.version}: soft targets for {', '.join(d.objectives)} "
        f"(alpha {d.alpha:g}) on {len(frame):,} training rows")
    return out, {"model": f"{teacher.name}@{teacher.version}", "alpha": d.alpha, "objectives": list(d.objectives)}


class Teacher:
    """LightGBM per objective that turns 0/1 training labels into soft targets.

    ``fit(train, y_train, valid, y_valid)``: ``y_*`` are ``(N, len(objectives))`` 0/1 arrays in
    ``objectives`` order; the frames hold ``feature_columns``. After fitting, ``rounds_`` holds each
    objective's early-stopped number of rounds, ``oof_`` the ``(N, K)`` out-of-fold probabilities of the
    training rows and ``oof_auc_`` their AUC per objective. :meth:`soft_targets` mixes them into labels.
    """

    def __init__(self, objectives: Sequence[str], feature_columns: Sequence[str], alpha: float = 0.5,
                 folds: int = 5, max_rounds: int = 1500, early_stopping_rounds: int = 100, num_leaves: int = 31,
                 learning_rate: float = 0.03, min_data_in_leaf: int = 50, seed: int = 0):
        if not objectives:
            raise ValueError("Teacher needs at least one objective")
        if not feature_columns:
            raise ValueError("Teacher needs at least one feature column")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        self.objectives = [str(o) for o in objectives]
        self.feature_columns = [str(c) for c in feature_columns]
        self.alpha = float(alpha)
        self.folds = int(folds)
        self.max_rounds = int(max_rounds)
        self.early_stopping_rounds = int(early_stopping_rounds)
        self.params = {"num_leaves": int(num_leaves), "learning_rate": float(learning_rate),
                       "min_data_in_leaf": int(min_data_in_leaf), "seed": int(seed)}
        self.seed = int(seed)
        self.rounds_: dict[str, int] = {}
        self.oof_: np.ndarray | None = None
        self.oof_auc_: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: DistillConfig, objectives: Sequence[str], feature_columns: Sequence[str]) -> "Teacher":
        return cls(cfg.objectives or objectives, feature_columns, cfg.alpha, cfg.folds, cfg.max_rounds,
                   cfg.early_stopping_rounds, cfg.num_leaves, cfg.learning_rate, cfg.min_data_in_leaf, cfg.seed)

    def _frame(self, frame: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
        """The feature columns (float64; absent or non-numeric -> NaN) plus one label column per objective."""
        n = len(frame)
        y = np.asarray(y, dtype=np.float64)
        if y.shape != (n, len(self.objectives)):
            raise ValueError(f"labels of shape {y.shape}, expected ({n}, {len(self.objectives)})")
        cols = {c: (pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                    if c in frame.columns else np.full(n, np.nan)) for c in self.feature_columns}
        cols.update({f"__label_{j}": y[:, j] for j in range(len(self.objectives))})
        return pd.DataFrame(cols)

    def fit(self, train: pd.DataFrame, y_train, valid: pd.DataFrame, y_valid) -> "Teacher":
        from .lgbm import LGBMMultiObjective
        from .metrics import auc

        labels = {f"__label_{j}": "binary" for j in range(len(self.objectives))}
        data, held = self._frame(train, y_train), self._frame(valid, y_valid)
        probe = LGBMMultiObjective(labels, self.params, num_boost_round=self.max_rounds,
                                   early_stopping_rounds=self.early_stopping_rounds)
        probe.fit(data, self.feature_columns, held)
        rounds = {k: max(1, int(b.best_iteration or self.max_rounds)) for k, b in probe.boosters.items()}
        self.rounds_ = {name: rounds[f"__label_{j}"] for j, name in enumerate(self.objectives)}
        fold = np.random.default_rng(self.seed).integers(0, self.folds, len(data))
        oof = np.zeros((len(data), len(self.objectives)))
        for f in range(self.folds):
            inside, out = fold != f, fold == f
            if not out.any():
                continue
            for j in range(len(self.objectives)):
                label = f"__label_{j}"
                one = LGBMMultiObjective({label: "binary"}, self.params, num_boost_round=rounds[label])
                one.fit(data.loc[inside], self.feature_columns)
                oof[out, j] = one.predict(data.loc[out])[:, 0]
        self.oof_ = oof
        y = np.asarray(y_train, dtype=np.float64)
        self.oof_auc_ = {name: auc(y[:, j], oof[:, j]) for j, name in enumerate(self.objectives)}
        return self

    def soft_targets(self, y_train) -> np.ndarray:
        """``alpha * y + (1 - alpha) * oof_`` (``(N, len(objectives))``) for the rows :meth:`fit` saw."""
        if self.oof_ is None:
            raise RuntimeError("Teacher is not fitted")
        y = np.asarray(y_train, dtype=np.float64)
        if y.shape != self.oof_.shape:
            raise ValueError(f"labels of shape {y.shape}, the teacher saw {self.oof_.shape}")
        return self.alpha * y + (1.0 - self.alpha) * self.oof_

    def describe(self) -> dict:
        """What a registry entry records of the teacher (it is not saved: serving never needs it)."""
        return {"objectives": self.objectives, "alpha": self.alpha, "folds": self.folds, "rounds": self.rounds_,
                "params": self.params, "oof_auc": {k: (None if math.isnan(v) else round(float(v), 5))
                                                   for k, v in self.oof_auc_.items()}}
