"""Offline benchmark: per-objective test AUC / GAUC of several rankers on one time-split data set.

A *ranker* is any object with ``name``, ``fit(train, valid) -> self`` and ``predict(test) -> (N, K)``
(columns in the data set's objective order, natural units). :func:`run_benchmark` fits each, predicts
the test rows, adds averages of chosen pairs, and scores everything; :func:`kuairand_benchmark` wires
the standard KuaiRand run (smoothed item popularity, LightGBM, and the TorchRec model when
``ranking.train`` offers one).

Heavy imports (lightgbm, torch) happen inside the rankers' ``fit``; importing this module is light.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd

from .datasets import Dataset
from .metrics import auc, gauc, ndcg_at_k

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TORCHREC_CONFIG = REPO_ROOT / "conf" / "train" / "kuairand_hybrid.yaml"


class Ranker(Protocol):
    name: str

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None) -> "Ranker": ...

    def predict(self, test: pd.DataFrame) -> np.ndarray: ...


# ----------------------------------------------------------------------------------------------------
# rankers
# ----------------------------------------------------------------------------------------------------
class LightGBMRanker:
    """:class:`ranking.lgbm.LGBMMultiObjective` with the number of rounds chosen per objective.

    ``fit(train, valid)``: without ``valid``, the last ``valid_periods`` distinct values of
    ``period_column`` of ``train`` (the last 10% of rows when that column is missing) are held out;
    each booster trains with early stopping on the held-out rows, then is refitted on all rows
    (train + valid) with ``round_scale`` x its best number of rounds (at least ``min_rounds``).
    """

    name = "LightGBM"

    def __init__(self, objectives, feature_columns: Sequence[str], params: Mapping | None = None,
                 max_rounds: int = 1500, early_stopping_rounds: int = 100, valid_periods: int = 2,
                 period_column: str = "date", round_scale: float = 1.1, min_rounds: int = 20):
        self.objectives = objectives
        self.feature_columns = list(feature_columns)
        self.params = dict(params or {})
        self.max_rounds = max_rounds
        self.early_stopping_rounds = early_stopping_rounds
        self.valid_periods = valid_periods
        self.period_column = period_column
        self.round_scale = round_scale
        self.min_rounds = min_rounds
        self.rounds: dict[str, int] = {}
        self.model = None

    def _holdout(self, train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        col = self.period_column
        if col in train.columns and train[col].nunique() > self.valid_periods:
            cut = np.sort(train[col].unique())[-self.valid_periods]
            return train[train[col] < cut], train[train[col] >= cut]
        order = np.argsort(train["ts"].to_numpy(), kind="mergesort") if "ts" in train else np.arange(len(train))
        n_valid = max(1, len(train) // 10)
        return train.iloc[order[:-n_valid]], train.iloc[order[-n_valid:]]

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "LightGBMRanker":
        from .lgbm import LGBMMultiObjective

        inner, held = (train, valid) if valid is not None else self._holdout(train)
        probe = LGBMMultiObjective(self.objectives, self.params, num_boost_round=self.max_rounds,
                                   early_stopping_rounds=self.early_stopping_rounds)
        probe.fit(inner, self.feature_columns, held)
        self.rounds = {k: max(self.min_rounds, int(math.ceil((b.best_iteration or self.max_rounds) * self.round_scale)))
                       for k, b in probe.boosters.items()}
        full = train if valid is None else pd.concat([train, valid], ignore_index=True)
        boosters = {}
        for name in probe.objectives:
            one = LGBMMultiObjective({name: probe.types[name]}, self.params, num_boost_round=self.rounds[name])
            boosters[name] = one.fit(full, self.feature_columns).boosters[name]
        probe.boosters = boosters
        self.model = probe
        return self

    def predict(self, test: pd.DataFrame) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("LightGBMRanker is not fitted")
        return self.model.predict(test)


class LambdaMARTRanker:
    """:class:`ranking.lgbm.LGBMLambdaRanker` on the blended utility; ``predict`` gives ``(N, 1)`` scores,
    scored only by the utility NDCG of the benchmark (its per-objective AUC would mean nothing)."""

    name = "LambdaMART (utility)"
    per_objective = False

    def __init__(self, weights: Mapping[str, float], feature_columns: Sequence[str],
                 group_columns: Sequence[str] = ("user_id", "date"), params: Mapping | None = None,
                 num_boost_round: int = 300):
        self.weights = dict(weights)
        self.feature_columns = list(feature_columns)
        self.group_columns = list(group_columns)
        self.params = dict(params or {})
        self.num_boost_round = num_boost_round
        self.model = None

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "LambdaMARTRanker":
        from .lgbm import LGBMLambdaRanker

        self.model = LGBMLambdaRanker(self.weights, self.group_columns, self.params, self.num_boost_round)
        self.model.fit(train, self.feature_columns, valid)
        return self

    def predict(self, test: pd.DataFrame) -> np.ndarray:
        return self.model.predict(test)[:, None]


class TorchRecRanker:
    """The TorchRec multi-task model of a train config (``conf/train/kuairand_hybrid.yaml``), fitted on the
    benchmark's frames through the public pieces of ``ranking.train`` (``load_train_config``,
    ``label_columns``, ``clean_labels``, ``Prepared``, ``fit``, ``predict_outputs``), ``ranking.features``
    and ``ranking.models``. Without ``valid``, the last ``valid_fraction`` of ``train`` by ``ts``
    validates (early stopping, best epoch kept). ``predict`` returns natural units (probabilities),
    columns in ``objectives`` order. ``optional``: a failure leaves its column out with a note.
    A config with a ``leaves:`` section first fits its GBDT leaf model (``ranking.train.fit_leaves``) on the
    training part only (``leaf_columns``: the trees' inputs, the data set's ``dense_columns``) and adds the
    leaf-id column to every frame it encodes. A ``distill:`` section softens the training part's targets
    with a LightGBM teacher's out-of-fold probabilities (``ranking.train.fit_teacher``, the same columns).
    """

    optional = True

    def __init__(self, config, objectives: Sequence[str], name: str | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, leaf_columns: Sequence[str] | None = None):
        from .train import load_train_config

        self.cfg = config if not isinstance(config, (str, Path)) else load_train_config(config)
        self.objectives = list(objectives)
        arch = getattr(self.cfg.model, "arch", None)
        self.name = name or (f"TorchRec {arch.upper()}" if arch else "TorchRec")
        if getattr(self.cfg, "leaves", None) is not None and not name:
            self.name += " + GBDT leaves"
        if getattr(self.cfg, "distill", None) is not None and not name:
            self.name += ", distilled"
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.model = None
        self.encoder = None
        self.leaves = None          # ranking.leaves.LeafFeatures when the config has a leaves section
        self.leaf_columns = list(leaf_columns) if leaf_columns is not None else None

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "TorchRecRanker":
        import torch

        from . import train as tr
        from .features import FeatureEncoder, load_feature_spec
        from .models import build_model, transform_labels

        cfg = self.cfg
        torch.set_num_threads(max(1, min(2, int(getattr(cfg.training, "threads", 1) or 1))))
        if valid is None:
            order = np.argsort(train["ts"].to_numpy(), kind="mergesort")
            n_valid = max(1, int(round(len(train) * cfg.data.valid_fraction)))
            train, valid = train.iloc[order[:-n_valid]], train.iloc[order[-n_valid:]]
        columns = tr.label_columns(cfg, train, cfg.source, cfg.lines, "benchmark frame")
        parts = []
        for frame in (train, valid):
            y, keep, _ = tr.clean_labels(frame, cfg.objectives, columns)
            parts.append((frame.loc[keep].reset_index(drop=True) if not keep.all() else frame.reset_index(drop=True),
                          y[keep]))
        spec = load_feature_spec(cfg.features)
        columns_in = self.leaf_columns or [f.column for f in spec.dense]   # the GBDTs' inputs
        if getattr(cfg, "leaves", None) is not None:
            # GBDT leaf ids (ranking/leaves.py), fitted on the training part only (never the validation rows)
            tr.leaves_feature_check(cfg, spec)
            self.leaves = tr.fit_leaves(cfg, parts[0][0], parts[0][1], columns_in, self.log)
            parts = [(self.leaves.add_column(f), y) for f, y in parts]
        if getattr(cfg, "distill", None) is not None:
            # soft targets from a LightGBM teacher (ranking/distill.py) for the training part only
            parts[0] = (parts[0][0], tr.fit_teacher(cfg, parts[0], parts[1], columns_in, self.log)[1])
        self.encoder = FeatureEncoder(spec).fit(parts[0][0])
        prep = tr.Prepared(self.encoder, cfg.objectives, self.encoder.transform(parts[0][0]),
                           transform_labels(parts[0][1], cfg.objectives), self.encoder.transform(parts[1][0]),
                           parts[1][1], None, None, {}, {})
        tr.seed_everything(cfg.training.seed)
        self.model = build_model(self.encoder, cfg.objectives, cfg.model)
        result = tr.fit(self.model, prep, cfg.training, log=self.log, progress=self.progress)
        self.best_epoch = result["best_epoch"]
        if getattr(cfg.training, "refit", False):
            # retrain on train + valid for the best number of epochs (the encoder stays fitted on train)
            import dataclasses

            full = pd.concat([parts[0][0], parts[1][0]], ignore_index=True)
            y_full = np.concatenate([parts[0][1], parts[1][1]])
            prep = tr.Prepared(self.encoder, cfg.objectives, self.encoder.transform(full),
                               transform_labels(y_full, cfg.objectives), prep.valid, prep.y_valid,
                               None, None, {}, {})
            tcfg = dataclasses.replace(cfg.training, epochs=result["best_epoch"], patience=10_000)
            tr.seed_everything(cfg.training.seed)
            self.model = build_model(self.encoder, cfg.objectives, cfg.model)
            tr.fit(self.model, prep, tcfg, log=self.log, progress=self.progress)   # keeps the last epoch's weights
        else:
            self.model.load_state_dict(result["best_state"])
        self.model.eval()
        return self

    def predict(self, test: pd.DataFrame) -> np.ndarray:
        import torch

        from .models import to_natural
        from .train import predict_outputs

        if self.leaves is not None:
            test = self.leaves.add_column(test)
        raw = predict_outputs(self.model, self.encoder.transform(test), self.cfg.training.eval_batch_size)
        nat = to_natural(torch.from_numpy(np.asarray(raw, dtype=np.float32)), self.cfg.objectives).numpy()
        index = {o.name: j for j, o in enumerate(self.cfg.objectives)}
        return nat[:, [index[k] for k in self.objectives]].astype(np.float64)


_TORCH_PIECES = {"ranking.train": ("load_train_config", "label_columns", "clean_labels", "Prepared", "fit",
                                   "predict_outputs", "seed_everything"),
                 "ranking.models": ("build_model", "transform_labels", "to_natural"),
                 "ranking.features": ("FeatureEncoder", "load_feature_spec")}


def torchrec_ranker(config: str | Path | None = None, objectives: Sequence[str] = (), progress: bool = True,
                    log: Callable[[str], None] | None = None,
                    leaf_columns: Sequence[str] | None = None) -> tuple[object | None, str]:
    """The TorchRec ranker if ``ranking.train`` offers what it takes, else ``(None, reason)``.

    Prefers ``ranking.train.make_ranker(config)`` (an object with ``name``, ``fit(train, valid)`` and
    ``predict(test) -> (N, K)``) when that module defines one; else builds a :class:`TorchRecRanker`
    from the public training functions. Importing torch is deferred to this call, so the benchmark never
    imports it unless asked for the TorchRec column.
    """
    import importlib

    # the best measured TorchRec config: MMoE + GBDT leaf ids (conf/train/kuairand_hybrid.yaml, 8 seeds: test AUC
    # click +0.005, long_view +0.001, like +0.001 over conf/train/kuairand_mmoe.yaml; see that file's comments)
    config = config or DEFAULT_TORCHREC_CONFIG
    try:
        mods = {name: importlib.import_module(name) for name in _TORCH_PIECES}
    except Exception as exc:  # torch/torchrec missing or broken: leave the column out, say why
        return None, f"TorchRec modules unavailable: {type(exc).__name__}: {exc}"
    factory = getattr(mods["ranking.train"], "make_ranker", None)
    if callable(factory):
        return factory(config), ""
    missing = [f"{m}.{a}" for m, attrs in _TORCH_PIECES.items() for a in attrs if not hasattr(mods[m], a)]
    if missing:
        return None, f"ranking.train offers no make_ranker(config) and lacks {', '.join(missing)}"
    if not Path(config).exists():
        return None, f"train config not found: {config}"
    return TorchRecRanker(config, objectives, progress=progress, log=log, leaf_columns=leaf_columns), ""


# ----------------------------------------------------------------------------------------------------
# running and scoring
# ----------------------------------------------------------------------------------------------------
@dataclass
class BenchmarkResult:
    """Scores of one benchmark run: ``metrics[model][objective] = {'auc', 'gauc'}``;
    ``ndcg[model]`` = utility NDCG@k (when utility weights were given); ``timings[model] =
    {'fit_s', 'predict_s'}``; ``notes``: models left out and why."""

    dataset: str
    objectives: list[str]
    models: list[str]
    metrics: dict[str, dict[str, dict[str, float]]]
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    ndcg: dict[str, float] = field(default_factory=dict)
    ndcg_k: int = 10
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """Objectives as rows, models as columns of ``AUC / GAUC``."""
        width = max(15, *(len(m) + 2 for m in self.models))
        head = f"{'objective':<14}" + "".join(f"{m:>{width}}" for m in self.models)
        lines = [f"{self.dataset}: test AUC / GAUC (GAUC = impression-weighted per-user AUC)"
                 + (f"; rows {', '.join(f'{k} {v:,}' for k, v in self.rows.items())}" if self.rows else ""),
                 head, "-" * len(head)]

        def cell(v: dict | None) -> str:
            if not v:
                return "-"
            return f"{v['auc']:.3f} / {v['gauc']:.3f}"

        for k in self.objectives:
            lines.append(f"{k:<14}" + "".join(f"{cell(self.metrics.get(m, {}).get(k)):>{width}}"
                                              for m in self.models))
        means = []
        for m in self.models:
            vals = [self.metrics.get(m, {}).get(k) for k in self.objectives]
            vals = [v for v in vals if v]
            means.append({"auc": float(np.mean([v["auc"] for v in vals])),
                          "gauc": float(np.mean([v["gauc"] for v in vals]))} if len(vals) == len(self.objectives) else None)
        lines.append(f"{'mean':<14}" + "".join(f"{cell(v):>{width}}" for v in means))
        if self.ndcg:
            lines.append(f"{'utility NDCG@' + str(self.ndcg_k):<14}" + "".join(
                f"{(format(self.ndcg[m], '.3f') if m in self.ndcg else '-'):>{width}}" for m in self.models))
        if self.timings:
            lines.append(f"{'fit+predict s':<14}" + "".join(
                f"{(format(sum(self.timings[m].values()), '.1f') if m in self.timings else '-'):>{width}}"
                for m in self.models))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "objectives": self.objectives, "models": self.models,
                "metrics": self.metrics, "ndcg": self.ndcg, "ndcg_k": self.ndcg_k, "timings": self.timings,
                "rows": self.rows, "notes": self.notes}


def score_predictions(test: pd.DataFrame, objectives: Sequence[str], predictions: np.ndarray,
                      group_column: str = "user_id") -> dict[str, dict[str, float]]:
    """``{objective: {'auc', 'gauc'}}`` of ``(N, K)`` predictions against the test labels."""
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.shape != (len(test), len(objectives)):
        raise ValueError(f"predictions of shape {predictions.shape}, expected {(len(test), len(objectives))}")
    groups = test[group_column].to_numpy()
    out = {}
    for j, k in enumerate(objectives):
        y = test[k].to_numpy()
        out[k] = {"auc": auc(y, predictions[:, j]), "gauc": gauc(y, predictions[:, j], groups)}
    return out


def run_benchmark(dataset: Dataset, rankers: Sequence[Ranker], averages: Sequence[tuple[str, str]] = (),
                  group_column: str = "user_id", utility_weights: Mapping[str, float] | None = None,
                  ndcg_groups: Sequence[str] = ("user_id", "date"), ndcg_k: int = 10,
                  notes: Sequence[str] = (), log: Callable[[str], None] | None = None,
                  progress: bool = True) -> BenchmarkResult:
    """Fit every ranker on ``dataset.train`` (and ``dataset.valid``), predict ``dataset.test`` and score.

    ``averages``: pairs of ranker names whose predictions are averaged into an extra column
    ``"avg(A, B)"`` (skipped when either is absent). With ``utility_weights``, each model also gets the
    NDCG@``ndcg_k`` of its blended score ``sum_k w_k p_k`` against the realised utility
    ``sum_k w_k y_k``, grouped by ``ndcg_groups`` (columns missing from the test frame are ignored).
    """
    from tqdm import tqdm

    test = dataset.test
    preds: dict[str, np.ndarray] = {}
    result = BenchmarkResult(dataset=dataset.name or "dataset", objectives=list(dataset.objectives), models=[],
                             metrics={}, ndcg_k=ndcg_k, notes=list(notes),
                             rows={"train": len(dataset.train), **({"valid": len(dataset.valid)}
                                                                   if dataset.valid is not None else {}),
                                   "test": len(test)})
    bar = tqdm(rankers, desc="benchmark", unit="model", disable=not progress)
    for ranker in bar:
        bar.set_postfix_str(ranker.name)
        t0 = time.perf_counter()
        try:
            ranker.fit(dataset.train, dataset.valid)
            t1 = time.perf_counter()
            p = np.asarray(ranker.predict(test), dtype=np.float64)
        except Exception as exc:
            if not getattr(ranker, "optional", False):
                raise
            result.notes.append(f"{ranker.name} left out: it failed with {type(exc).__name__}: {exc}")
            continue
        t2 = time.perf_counter()
        result.timings[ranker.name] = {"fit_s": round(t1 - t0, 2), "predict_s": round(t2 - t1, 2)}
        preds[ranker.name] = p
        result.models.append(ranker.name)
        if log:
            log(f"{ranker.name}: fit {t1 - t0:.1f}s, predict {t2 - t1:.1f}s")
    for a, b in averages:
        if a in preds and b in preds and preds[a].shape == preds[b].shape:
            name = f"avg({a}, {b})"
            preds[name] = (preds[a] + preds[b]) / 2.0
            result.models.append(name)
    k_count = len(dataset.objectives)
    for name, p in preds.items():
        if p.shape == (len(test), k_count):
            result.metrics[name] = score_predictions(test, dataset.objectives, p, group_column)
    if utility_weights:
        w = np.array([float(utility_weights.get(k, 0.0)) for k in dataset.objectives])
        realised = dataset.labels(test) @ w
        cols = [c for c in ndcg_groups if c in test.columns] or [group_column]
        keys = test.groupby(cols, sort=False).ngroup().to_numpy()
        for name, p in preds.items():
            score = p @ w if p.shape[1] == k_count else p[:, 0]
            result.ndcg[name] = ndcg_at_k(realised, score, keys, ndcg_k)
    return result


def kuairand_weights(path: str | Path | None = None) -> dict[str, float]:
    """Blend weights of ``conf/objectives/kuairand.yaml`` (the utility of the NDCG row)."""
    from strategy import load_strategy

    strategy = load_strategy(str(path or REPO_ROOT / "conf" / "objectives" / "kuairand.yaml"))
    return {o.name: float(o.weight) for o in strategy.objectives}


def kuairand_benchmark(data_dir: str | Path | None = None, models: Sequence[str] = ("popularity", "lightgbm", "torchrec"),
                       lgbm_params: Mapping | None = None, torchrec_config: str | Path | None = None,
                       history: str = "train", progress: bool = True,
                       log: Callable[[str], None] | None = None) -> BenchmarkResult:
    """The standard KuaiRand benchmark (train 20220408..18, test 20220419..21).

    ``models``: any of ``popularity``, ``lightgbm``, ``torchrec``, ``lambdarank``. The TorchRec column
    appears only when :func:`torchrec_ranker` finds ``ranking.train.make_ranker`` or the public
    training functions it adapts (and fits without error); otherwise a note says why. When both
    LightGBM and TorchRec ran, their average is a column too.
    """
    from .baselines import SmoothedItemPopularity
    from .datasets import load_kuairand

    t0 = time.perf_counter()
    ds = load_kuairand(data_dir, history=history)
    if log:
        log(f"{ds.summary()} ({time.perf_counter() - t0:.1f}s)")
    unknown = set(models) - {"popularity", "lightgbm", "torchrec", "lambdarank"}
    if unknown:
        raise ValueError(f"unknown models: {sorted(unknown)}")
    rankers: list = []
    notes: list[str] = []
    weights = kuairand_weights()
    if "popularity" in models:
        rankers.append(SmoothedItemPopularity(ds.objectives))
    if "lightgbm" in models:
        rankers.append(LightGBMRanker(ds.objectives, ds.dense_columns, lgbm_params))
    if "lambdarank" in models:
        rankers.append(LambdaMARTRanker(weights, ds.dense_columns, params=lgbm_params))
    if "torchrec" in models:
        ranker, why = torchrec_ranker(torchrec_config, ds.objectives, progress=progress, log=log,
                                      leaf_columns=ds.dense_columns)
        if ranker is None:
            notes.append(f"TorchRec column left out: {why}")
        else:
            rankers.append(ranker)
    averages = []
    names = [r.name for r in rankers]
    torch_names = [n for n in names if n not in (SmoothedItemPopularity.name, LightGBMRanker.name,
                                                 LambdaMARTRanker.name)]
    if LightGBMRanker.name in names:
        averages = [(t, LightGBMRanker.name) for t in torch_names]
    return run_benchmark(ds, rankers, averages=averages, utility_weights=weights, notes=notes, log=log,
                         progress=progress)
