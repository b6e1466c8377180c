"""GBDT leaf features for the TorchRec rankers (He et al. 2014, "Practical Lessons from Predicting Clicks
on Ads at Facebook"; Ke et al. 2019, DeepGBM).

A small LightGBM model per objective is fitted on training rows; each row's leaf in each tree becomes an
id (``"click:t12:l5"``: objective, tree, leaf) and all of a row's leaf ids form ONE ``id_list`` column
(``gbdt_leaves`` by default) that the feature spec declares like any other id list: the encoder learns its
vocabulary (unseen leaves go to the OOV row) and the model pools its embeddings next to the dense inputs.

The trees read the same dense columns as the LightGBM ranker of the benchmark (``Dataset.dense_columns``,
passed in by the caller) through :class:`ranking.lgbm.LGBMMultiObjective`, and are saved in LightGBM's
own text format (``LGBMMultiObjective.save``) plus ``leaves.json``: never pickle. A registered TorchRec
model carries them in ``<version>/leaves/`` and ``LoadedModel.predict`` / the online ranker compute the
same leaves as training did.

Train config section (``ranking.train``)::

    leaves:
      objectives: [click, long_view, like]   # default: every binary objective of the config
      n_trees: 30          # trees per objective
      num_leaves: 31
      learning_rate: 0.1
      min_data_in_leaf: 50
      seed: 0
      column: gbdt_leaves  # the id_list column the feature spec reads
      fit_fraction: 1.0    # the GBDT fits on the earliest fraction of the training rows (by time);
                           # 1.0 = all of them (never validation or test rows)
      per_objective: false # true: one id_list column per objective, ``<column>_<objective>`` (each its
                           # own feature / table / pooled vector) instead of all ids in ``<column>``
      scores: false        # true: also each objective's raw GBDT score (logit) as a dense column
                           # ``gbdt_score_<objective>`` (stacking; the spec declares them as dense features)

:meth:`LeafFeatures.compute` gives every column the leaves add (:attr:`LeafFeatures.columns`), for a DataFrame
(training, ``LoadedModel.predict``) and for plain request columns (the online ranker) alike.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

MANIFEST = "leaves.json"
FORMAT = "stratarank-leaves/1"
MODEL_SUBDIR = "trees"
LEAVES_KEYS = ("objectives", "n_trees", "num_leaves", "learning_rate", "min_data_in_leaf", "seed", "column",
               "fit_fraction", "per_objective", "scores")
SCORE_PREFIX = "gbdt_score"


@dataclass(frozen=True)
class LeavesConfig:
    """The ``leaves:`` section of a train config (see the module docstring)."""

    objectives: tuple[str, ...] | None = None   # None: every binary objective
    n_trees: int = 30
    num_leaves: int = 31
    learning_rate: float = 0.1
    min_data_in_leaf: int = 50
    seed: int = 0
    column: str = "gbdt_leaves"
    fit_fraction: float = 1.0
    per_objective: bool = False
    scores: bool = False


def objective_section(errs, value, path: str, keys, objectives: Sequence[str] | None, ranges: dict):
    """The checked head of a GBDT config section (``leaves:``, ``distill:``): ``(mapping, values)``
    with its allowed ``keys``, its ``objectives`` list (each one of the config's ``objectives``) and
    the numbers of ``ranges`` (``strategy.checks.as_numbers``); ``(None, None)`` when not a mapping."""
    from strategy.checks import as_dict, as_names, as_numbers, check_keys

    d = as_dict(errs, value, path)
    if d is None:
        return None, None
    check_keys(errs, d, path, keys)
    kw: dict = {}
    if d.get("objectives") is not None:
        names = as_names(errs, d["objectives"], f"{path}.objectives", objectives, "objective")
        if names is not None:
            kw["objectives"] = names
    kw.update(as_numbers(errs, d, path, ranges))
    return d, kw


def leaves_config_from_dict(errs, value, path: str = "leaves", objectives: Sequence[str] | None = None):
    """Validate a ``leaves:`` mapping into ``errs`` (``strategy.errors.Errors``); ``None`` when invalid.

    ``objectives``: the config's objective names (an unknown one names the allowed ones)."""
    from strategy.checks import NAME_RE, as_bool, as_str

    before = len(errs.items)
    d, kw = objective_section(errs, value, path, LEAVES_KEYS, objectives, {
        "n_trees": (1, 10_000, True, False), "num_leaves": (2, 131_072, True, False),
        "learning_rate": (0, 10, False, True), "min_data_in_leaf": (1, 10 ** 9, True, False),
        "seed": (0, 2 ** 31, True, False), "fit_fraction": (0, 1, False, True)})
    if d is None:
        return None
    if d.get("column") is not None:
        col = as_str(errs, d["column"], f"{path}.column", pattern=NAME_RE)
        if col:
            kw["column"] = col
    for key in ("per_objective", "scores"):
        if d.get(key) is not None and as_bool(errs, d[key], f"{path}.{key}") is not None:
            kw[key] = d[key]
    return LeavesConfig(**kw) if len(errs.items) == before else None


class LeafFeatures:
    """A LightGBM model per objective whose leaf indices become ids.

    ``feature_columns``: the numeric columns the trees read (the benchmark's LightGBM inputs,
    ``Dataset.dense_columns``); a column absent from the rows given to :meth:`transform` is missing
    (NaN) in every row, which LightGBM routes like a missing value in training.
    """

    def __init__(self, objectives: Sequence[str], feature_columns: Sequence[str], n_trees: int = 30,
                 num_leaves: int = 31, learning_rate: float = 0.1, min_data_in_leaf: int = 50, seed: int = 0,
                 column: str = "gbdt_leaves", params: Mapping | None = None, per_objective: bool = False,
                 scores: bool = False):
        if not objectives:
            raise ValueError("LeafFeatures needs at least one objective")
        if not feature_columns:
            raise ValueError("LeafFeatures needs at least one feature column")
        self.objectives = [str(o) for o in objectives]
        self.feature_columns = [str(c) for c in feature_columns]
        self.n_trees = int(n_trees)
        self.num_leaves = int(num_leaves)
        self.learning_rate = float(learning_rate)
        self.min_data_in_leaf = int(min_data_in_leaf)
        self.seed = int(seed)
        self.column = str(column)
        self.params = dict(params or {})
        self.per_objective = bool(per_objective)
        self.scores = bool(scores)
        # never the leaves' own output columns (a spec's dense features may list the score columns)
        self.feature_columns = [c for c in self.feature_columns if c not in set(self.columns)]
        if not self.feature_columns:
            raise ValueError("LeafFeatures needs at least one feature column besides its own outputs")
        self.model = None   # ranking.lgbm.LGBMMultiObjective
        self.fit_rows: int | None = None

    @classmethod
    def from_config(cls, cfg: LeavesConfig, objectives: Sequence[str], feature_columns: Sequence[str]) -> "LeafFeatures":
        return cls(cfg.objectives or objectives, feature_columns, cfg.n_trees, cfg.num_leaves, cfg.learning_rate,
                   cfg.min_data_in_leaf, cfg.seed, cfg.column, per_objective=cfg.per_objective, scores=cfg.scores)

    def _lgbm_params(self) -> dict:
        return {"num_leaves": self.num_leaves, "learning_rate": self.learning_rate,
                "min_data_in_leaf": self.min_data_in_leaf, "seed": self.seed, **self.params}

    @property
    def max_len(self) -> int:
        """Leaf ids per row (one per tree) of all objectives together."""
        return self.n_trees * len(self.objectives)

    @property
    def leaf_columns(self) -> dict[str, tuple[str, ...]]:
        """``{id_list column: objectives whose leaf ids it holds}``."""
        if self.per_objective:
            return {f"{self.column}_{k}": (k,) for k in self.objectives}
        return {self.column: tuple(self.objectives)}

    @property
    def score_columns(self) -> dict[str, str]:
        """``{dense column: objective}`` of the raw GBDT scores (empty unless ``scores``)."""
        return {f"{SCORE_PREFIX}_{k}": k for k in self.objectives} if self.scores else {}

    @property
    def columns(self) -> list[str]:
        """Every column :meth:`compute` adds (leaf-id lists, then scores)."""
        return list(self.leaf_columns) + list(self.score_columns)

    def fit(self, frame: pd.DataFrame, labels=None) -> "LeafFeatures":
        """Fit ``n_trees`` trees per objective on ``frame``'s feature columns.

        ``labels``: ``{objective: values}``, a DataFrame with a column per objective, or an ``(N, K)``
        array in ``objectives`` order; ``None`` reads the label columns of ``frame``."""
        from .lgbm import LGBMMultiObjective

        if labels is None:
            missing = [k for k in self.objectives if k not in frame.columns]
            if missing:
                raise KeyError(f"label columns missing from the frame: {missing}")
            y = {k: frame[k].to_numpy(dtype=np.float64) for k in self.objectives}
        elif isinstance(labels, (Mapping, pd.DataFrame)):
            y = {k: np.asarray(labels[k], dtype=np.float64) for k in self.objectives}
        else:
            arr = np.asarray(labels, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != len(self.objectives):
                raise ValueError(f"labels of shape {arr.shape}, expected (N, {len(self.objectives)})")
            y = {k: arr[:, j] for j, k in enumerate(self.objectives)}
        data = self._features(frame).assign(**{f"__label_{j}": y[k] for j, k in enumerate(self.objectives)})
        model = LGBMMultiObjective({f"__label_{j}": "binary" for j in range(len(self.objectives))},
                                   self._lgbm_params(), num_boost_round=self.n_trees)
        model.fit(data, self.feature_columns)
        model.types = {k: "binary" for k in self.objectives}
        model.boosters = {k: model.boosters[f"__label_{j}"] for j, k in enumerate(self.objectives)}
        model.objectives = list(self.objectives)
        self.model = model
        return self

    def _features(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The feature columns of ``frame`` as float64, NaN where absent or not numeric."""
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"expected a DataFrame, not {type(frame).__name__}")
        n = len(frame)
        cols = {c: (pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                    if c in frame.columns else np.full(n, np.nan)) for c in self.feature_columns}
        return pd.DataFrame(cols, index=frame.index)

    def _matrix(self, rows, n: int | None = None) -> np.ndarray:
        """``(N, F)`` float64 inputs of a DataFrame or of plain columns ``{column: list of n values}``
        (the serving rows; the same values as the DataFrame path: absent or non-numeric -> NaN)."""
        if isinstance(rows, pd.DataFrame):
            return self._features(rows).to_numpy(dtype=np.float64)
        if n is None:
            raise ValueError("plain columns need the row count n")
        x = np.full((n, len(self.feature_columns)), np.nan)
        for j, c in enumerate(self.feature_columns):
            col = rows.get(c)
            if col is None:
                continue
            try:
                v = np.asarray(col, dtype=np.float64)   # ints, floats, None (-> NaN), bools
                if v.shape != (n,):
                    raise ValueError(c)
            except (TypeError, ValueError):           # strings, odd values: pandas' coercion
                v = pd.to_numeric(pd.Series(list(col), dtype=object), errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan)
            x[:, j] = v
        return x

    def leaf_matrix(self, rows, n: int | None = None) -> np.ndarray:
        """``(N, n_trees * len(objectives))`` int32 leaf indices, objective-major, of a DataFrame or of
        plain columns ``{column: list of n values}``."""
        if self.model is None:
            raise RuntimeError("LeafFeatures is not fitted")
        x = self._matrix(rows, n)
        if not len(x):
            return np.zeros((0, self.max_len), dtype=np.int32)
        parts = []
        for k in self.objectives:
            leaf = np.asarray(self.model.boosters[k].predict(x, pred_leaf=True), dtype=np.int32)
            parts.append(leaf.reshape(len(x), -1))
        return np.concatenate(parts, axis=1)

    def _prefixes(self) -> list[str]:
        prefixes = getattr(self, "_prefix_cache", None)
        if prefixes is None:
            prefixes = []
            for k in self.objectives:
                trees = self.model.boosters[k].num_trees()
                prefixes += [f"{k}:t{t}:l" for t in range(trees)]
            self._prefix_cache = prefixes
        return prefixes

    def transform(self, rows, n: int | None = None) -> list[list[str]]:
        """Each row's leaf ids (``"click:t12:l5"``), one per tree, objectives in order; ``rows`` is a
        DataFrame or plain columns ``{column: list of n values}`` (the serving path)."""
        leaves = self.leaf_matrix(rows, n)
        prefixes = self._prefixes()
        if leaves.shape[1] != len(prefixes):
            raise RuntimeError(f"{leaves.shape[1]} leaves per row for {len(prefixes)} trees")
        return [[p + str(v) for p, v in zip(prefixes, row)] for row in leaves.tolist()]

    def raw_scores(self, rows, n: int | None = None) -> np.ndarray:
        """``(N, len(objectives))`` float64 raw scores (logits) of the boosters, objectives in order."""
        if self.model is None:
            raise RuntimeError("LeafFeatures is not fitted")
        x = self._matrix(rows, n)
        if not len(x):
            return np.zeros((0, len(self.objectives)))
        return np.stack([np.asarray(self.model.boosters[k].predict(x, raw_score=True), dtype=np.float64)
                         for k in self.objectives], axis=1)

    def compute(self, rows, n: int | None = None) -> dict:
        """Every column the leaves add (:attr:`columns`): ``{id_list column: per-row lists of leaf ids}`` and,
        with ``scores``, ``{gbdt_score_<objective>: float64 array}``; ``rows`` is a DataFrame or plain
        columns ``{column: list of n values}`` (the serving path), which give the same values."""
        ids = self.transform(rows, n)
        out: dict = {}
        start = 0
        for col, objs in self.leaf_columns.items():
            width = sum(self.model.boosters[k].num_trees() for k in objs)
            out[col] = ids if len(self.leaf_columns) == 1 else [r[start:start + width] for r in ids]
            start += width
        if self.scores:
            raw = self.raw_scores(rows, n)
            for j, col in enumerate(self.score_columns):
                out[col] = raw[:, j].copy()
        return out

    def add_column(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with every column of :meth:`compute` added (a new frame; ``frame`` is not modified)."""
        cols = self.compute(frame)
        return frame.assign(**{c: (pd.Series(v, index=frame.index, dtype=object) if c in self.leaf_columns
                                   else pd.Series(v, index=frame.index, dtype=np.float64))
                               for c, v in cols.items()})

    # ---- persistence (LightGBM text format + JSON)
    def to_dict(self) -> dict:
        return {"format": FORMAT, "objectives": self.objectives, "feature_columns": self.feature_columns,
                "n_trees": self.n_trees, "num_leaves": self.num_leaves, "learning_rate": self.learning_rate,
                "min_data_in_leaf": self.min_data_in_leaf, "seed": self.seed, "column": self.column,
                "params": self.params, "trees": MODEL_SUBDIR, "fit_rows": self.fit_rows,
                "per_objective": self.per_objective, "scores": self.scores}

    def save(self, directory) -> Path:
        if self.model is None:
            raise RuntimeError("LeafFeatures is not fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save(directory / MODEL_SUBDIR)
        (directory / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory) -> "LeafFeatures":
        from .lgbm import LGBMMultiObjective

        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: no leaves manifest")
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} model (format {m.get('format')!r})")
        out = cls(m["objectives"], m["feature_columns"], m["n_trees"], m["num_leaves"], m["learning_rate"],
                  m["min_data_in_leaf"], m["seed"], m["column"], m.get("params"),
                  per_objective=m.get("per_objective", False), scores=m.get("scores", False))
        out.model = LGBMMultiObjective.load(directory / m.get("trees", MODEL_SUBDIR))
        out.fit_rows = m.get("fit_rows")
        missing = [k for k in out.objectives if k not in out.model.boosters]
        if missing:
            raise ValueError(f"{directory}: no trees for objectives {missing}")
        return out


def earliest(frame: pd.DataFrame, fraction: float, time_column: str = "ts") -> np.ndarray:
    """Boolean mask of the earliest ``fraction`` of ``frame``'s rows by ``time_column`` (row order when
    the column is missing); all rows when ``fraction >= 1``."""
    n = len(frame)
    if fraction >= 1 or n == 0:
        return np.ones(n, dtype=bool)
    order = np.argsort(frame[time_column].to_numpy(), kind="mergesort") if time_column in frame else np.arange(n)
    keep = np.zeros(n, dtype=bool)
    keep[order[: max(1, int(round(n * fraction)))]] = True
    return keep
