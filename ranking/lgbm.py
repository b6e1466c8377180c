"""LightGBM rankers: one booster per objective, and a LambdaMART ranker on the blended utility.

Models are saved in LightGBM's own text format (``booster.save_model``) next to a JSON manifest, and
loaded with ``lgb.Booster(model_file=...)``: never pickle. A model registered as the scorer's fallback:
:func:`ranking.artifacts.register_lgbm`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import lightgbm as lgb
import numpy as np
import pandas as pd

MANIFEST = "manifest.json"
FORMAT = "stratarank-lgbm/1"

DEFAULT_PARAMS: dict = {
    "learning_rate": 0.03,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    # one thread: on the shared 2-core machines, 2 threads under contention ran 10x slower (measured)
    "num_threads": 1,
    "force_col_wise": True,
    "seed": 0,
    "verbosity": -1,
}
OBJECTIVE_TYPES = {"binary": "binary", "regression": "regression"}


def _objective_map(objectives) -> dict[str, str]:
    if isinstance(objectives, Mapping):
        types = {str(k): str(v) for k, v in objectives.items()}
    else:
        types = {str(k): "binary" for k in objectives}
    bad = {k: t for k, t in types.items() if t not in OBJECTIVE_TYPES}
    if bad:
        raise ValueError(f"objective types must be 'binary' or 'regression': {bad}")
    if not types:
        raise ValueError("no objectives")
    return types


def _matrix(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"feature columns missing from the frame: {missing}")
    return df[list(columns)].to_numpy(dtype=np.float64)


class LGBMMultiObjective:
    """One LightGBM booster per objective, scikit-learn style.

    ``objectives``: names (all binary) or a mapping ``name -> 'binary' | 'regression'``; each name is a
    label column of the frames given to :meth:`fit`. ``params``: LightGBM parameters overriding
    :data:`DEFAULT_PARAMS` (``num_threads`` defaults to 1; keep it <= 2 here). With ``valid_df``, each booster stops early
    after ``early_stopping_rounds`` rounds without improvement on it.

    :meth:`predict` returns an ``(N, K)`` array in natural units: probabilities for binary objectives,
    the label's own unit for regression ones; columns in ``objectives`` order.
    """

    def __init__(self, objectives, params: Mapping | None = None, num_boost_round: int = 400,
                 early_stopping_rounds: int = 50, per_objective_params: Mapping[str, Mapping] | None = None):
        self.types = _objective_map(objectives)
        self.objectives = list(self.types)
        self.params = {**DEFAULT_PARAMS, **dict(params or {})}
        self.per_objective_params = {k: dict(v) for k, v in (per_objective_params or {}).items()}
        self.num_boost_round = int(num_boost_round)
        self.early_stopping_rounds = int(early_stopping_rounds)
        self.boosters: dict[str, lgb.Booster] = {}
        self.forests: dict = {}   # name -> CompiledForest once compile() ran
        self.feature_columns: list[str] = []

    def _params_for(self, name: str) -> dict:
        kind = self.types[name]
        base = {"objective": kind, "metric": "auc" if kind == "binary" else "l2"}
        return {**base, **self.params, **self.per_objective_params.get(name, {})}

    def fit(self, train_df: pd.DataFrame, feature_columns: Sequence[str],
            valid_df: pd.DataFrame | None = None, weight_column: str | None = None) -> "LGBMMultiObjective":
        """Fit one booster per objective on ``feature_columns``; ``weight_column`` names per-row
        training weights (e.g. the inverse-propensity ``weight`` of served logs)."""
        missing = [k for k in self.objectives if k not in train_df.columns]
        if missing:
            raise KeyError(f"label columns missing from the training frame: {missing}")
        self.feature_columns = list(feature_columns)
        x = _matrix(train_df, self.feature_columns)
        xv = _matrix(valid_df, self.feature_columns) if valid_df is not None else None
        weight = train_df[weight_column].to_numpy(dtype=np.float64) if weight_column else None
        self.boosters, self.forests = {}, {}
        for name in self.objectives:
            y = train_df[name].to_numpy(dtype=np.float64)
            dtrain = lgb.Dataset(x, y, weight=weight, feature_name=self.feature_columns, free_raw_data=True)
            kwargs = {}
            if xv is not None:
                dvalid = lgb.Dataset(xv, valid_df[name].to_numpy(dtype=np.float64), reference=dtrain)
                kwargs = {"valid_sets": [dvalid], "valid_names": ["valid"],
                          "callbacks": [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]}
            self.boosters[name] = lgb.train(self._params_for(name), dtrain,
                                            num_boost_round=self.num_boost_round, **kwargs)
        return self

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        if not self.boosters:
            raise RuntimeError("LGBMMultiObjective is not fitted")
        x = _matrix(df, self.feature_columns)
        if self.forests:   # the compiled forests read C-ordered rows: one copy for all of them
            x = np.ascontiguousarray(x)
        out = np.empty((len(df), len(self.objectives)), dtype=np.float64)
        for j, name in enumerate(self.objectives):
            if name in self.forests:
                out[:, j] = self.forests[name].predict(x)
                continue
            booster = self.boosters[name]
            out[:, j] = booster.predict(x, num_iteration=_best(booster))
        return out

    def compile(self, cache_dir=None) -> "LGBMMultiObjective":
        """Predict from here on with each booster compiled to native code (:mod:`ranking.compiled_trees`:
        the same values, ≈ 4x faster on one thread), cached in ``cache_dir``. Raises
        :class:`ranking.compiled_trees.CompileError` (and keeps LightGBM's predict) when it cannot."""
        from .compiled_trees import DEFAULT_CACHE, CompiledForest

        if not self.boosters:
            raise RuntimeError("LGBMMultiObjective is not fitted")
        self.forests = {name: CompiledForest.compile(b.model_to_string(num_iteration=_best(b)),
                                                     cache_dir or DEFAULT_CACHE)
                        for name, b in self.boosters.items()}
        return self

    def save(self, directory) -> Path:
        """Write ``<name>.txt`` per objective (LightGBM text format) and ``manifest.json``."""
        if not self.boosters:
            raise RuntimeError("LGBMMultiObjective is not fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, booster in self.boosters.items():
            files[name] = f"{name}.txt"
            booster.save_model(str(directory / files[name]), num_iteration=booster.best_iteration or None)
        manifest = {
            "format": FORMAT, "kind": "multi_objective", "lightgbm": lgb.__version__,
            "objectives": self.types, "feature_columns": self.feature_columns, "files": files,
            "params": self.params, "num_boost_round": self.num_boost_round,
            "best_iteration": {k: int(b.best_iteration or b.current_iteration()) for k, b in self.boosters.items()},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory) -> "LGBMMultiObjective":
        directory = Path(directory)
        manifest = _read_manifest(directory, "multi_objective")
        model = cls(manifest["objectives"], manifest.get("params"), manifest.get("num_boost_round", 400))
        model.feature_columns = list(manifest["feature_columns"])
        model.boosters = {name: lgb.Booster(model_file=str(directory / fname))
                          for name, fname in manifest["files"].items()}
        return model


def _best(booster: lgb.Booster) -> int | None:
    return booster.best_iteration if booster.best_iteration and booster.best_iteration > 0 else None


def _read_manifest(directory: Path, kind: str) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("kind") != kind:
        raise ValueError(f"{path}: not a {FORMAT} {kind} model (format {manifest.get('format')!r}, "
                         f"kind {manifest.get('kind')!r})")
    return manifest


def utility_grades(utility: np.ndarray, max_grade: int = 30) -> np.ndarray:
    """Integer relevance grades ``0..max_grade`` for LambdaMART from a real-valued utility: the rank of
    each distinct value when there are few of them, else its quantile bucket. Monotone in ``utility``."""
    utility = np.asarray(utility, dtype=np.float64)
    values = np.unique(utility)
    if len(values) <= max_grade + 1:
        return np.searchsorted(values, utility).astype(np.int32)
    qs = np.quantile(utility, np.linspace(0, 1, max_grade + 2)[1:-1])
    return np.searchsorted(np.unique(qs), utility, side="right").astype(np.int32)


class LGBMLambdaRanker:
    """LambdaMART (LightGBM ``lambdarank``) on the blended utility ``sum_k weight_k * label_k``.

    Rows are grouped by ``group_columns`` (a user, a user-day, a request); the utility is turned into
    integer grades by :func:`utility_grades`. :meth:`predict` returns a ``(N,)`` ranking score (only its
    order within a group means anything).
    """

    def __init__(self, weights: Mapping[str, float], group_columns: Sequence[str] = ("user_id",),
                 params: Mapping | None = None, num_boost_round: int = 300, early_stopping_rounds: int = 50,
                 eval_at: int = 10):
        if not weights:
            raise ValueError("no objective weights")
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.group_columns = list(group_columns)
        self.params = {**DEFAULT_PARAMS, "objective": "lambdarank", "metric": "ndcg", "eval_at": [eval_at],
                       **dict(params or {})}
        self.num_boost_round = int(num_boost_round)
        self.early_stopping_rounds = int(early_stopping_rounds)
        self.booster: lgb.Booster | None = None
        self.feature_columns: list[str] = []

    def utility(self, df: pd.DataFrame) -> np.ndarray:
        missing = [k for k in self.weights if k not in df.columns]
        if missing:
            raise KeyError(f"label columns missing from the frame: {missing}")
        return sum(w * df[k].to_numpy(dtype=np.float64) for k, w in self.weights.items())

    def _grouped(self, df: pd.DataFrame):
        order = np.lexsort([df[c].to_numpy() for c in reversed(self.group_columns)])
        sorted_df = df.iloc[order]
        keys = sorted_df[self.group_columns].to_numpy()
        change = np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)] if len(keys) else np.array([], bool)
        sizes = np.diff(np.r_[np.flatnonzero(change), len(keys)])
        return sorted_df, sizes

    def fit(self, train_df: pd.DataFrame, feature_columns: Sequence[str],
            valid_df: pd.DataFrame | None = None) -> "LGBMLambdaRanker":
        self.feature_columns = list(feature_columns)
        tr, sizes = self._grouped(train_df)
        grades = utility_grades(self.utility(tr))
        self._max_grade = int(grades.max()) if len(grades) else 0
        params = {**self.params, "label_gain": [float(i) for i in range(max(self._max_grade, 30) + 1)]}
        dtrain = lgb.Dataset(_matrix(tr, self.feature_columns), grades, group=sizes,
                             feature_name=self.feature_columns)
        kwargs = {}
        if valid_df is not None:
            va, vsizes = self._grouped(valid_df)
            vgrades = np.clip(utility_grades(self.utility(va)), 0, self._max_grade)
            dvalid = lgb.Dataset(_matrix(va, self.feature_columns), vgrades, group=vsizes, reference=dtrain)
            kwargs = {"valid_sets": [dvalid], "valid_names": ["valid"],
                      "callbacks": [lgb.early_stopping(self.early_stopping_rounds, verbose=False)]}
        self.booster = lgb.train(params, dtrain, num_boost_round=self.num_boost_round, **kwargs)
        return self

    def predict(self, df: pd.DataFrame) -> np.ndarray:
        if self.booster is None:
            raise RuntimeError("LGBMLambdaRanker is not fitted")
        best = self.booster.best_iteration or None
        return self.booster.predict(_matrix(df, self.feature_columns), num_iteration=best)

    def save(self, directory) -> Path:
        if self.booster is None:
            raise RuntimeError("LGBMLambdaRanker is not fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(directory / "ranker.txt"), num_iteration=self.booster.best_iteration or None)
        manifest = {"format": FORMAT, "kind": "lambdarank", "lightgbm": lgb.__version__,
                    "weights": self.weights, "group_columns": self.group_columns,
                    "feature_columns": self.feature_columns, "files": {"ranker": "ranker.txt"},
                    "params": self.params, "num_boost_round": self.num_boost_round}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory) -> "LGBMLambdaRanker":
        directory = Path(directory)
        manifest = _read_manifest(directory, "lambdarank")
        model = cls(manifest["weights"], manifest["group_columns"], manifest.get("params"),
                    manifest.get("num_boost_round", 300))
        model.feature_columns = list(manifest["feature_columns"])
        model.booster = lgb.Booster(model_file=str(directory / manifest["files"]["ranker"]))
        return model
