"""Per-objective predictions for a request's candidates, with a fallback chain that never goes dark.

Order of preference: the registry's ``current`` TorchRec model → the LightGBM fallback → a
prior/popularity order built from real-time counters and generator priors. A model that is
missing, corrupt, lacks one of the strategy's objectives, raises or returns non-finite values
is skipped, and the response is marked ``degraded`` with the cause.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("stratarank.predictor")

DEFAULT_BINARY_RATE = 0.02
DEFAULT_REGRESSION_VALUE = 10.0
PRIOR_STRENGTH = 50.0  # pseudo-impressions behind the base rate in the popularity order


class RequestRows:
    """One request's model-input rows as plain columns (``{column: list of n values}``).

    The TorchRec ranker encodes them directly (``FeatureEncoder.transform_columns``, no DataFrame);
    ``frame()`` gives the same rows as a pandas DataFrame (built once) to models that read frames.
    """

    __slots__ = ("columns", "n", "_frame")

    def __init__(self, columns: dict, n: int):
        self.columns, self.n, self._frame = columns, n, None

    def __len__(self) -> int:
        return self.n

    def frame(self):
        if self._frame is None:
            import pandas as pd

            self._frame = pd.DataFrame(self.columns)
        return self._frame


def _model_input(model, rows):
    """What ``model.predict`` reads: request rows as they are where it takes them, else a frame."""
    if isinstance(rows, RequestRows) and not getattr(model, "reads_request_rows", False):
        return rows.frame()
    return rows


@dataclass
class Prediction:
    matrix: np.ndarray  # (N, K) in strategy objective order, natural units
    served_by: str  # model name@version, or "prior"
    degraded: str | None  # None, or why the primary model did not serve


class PriorPredictor:
    """The last resort: smoothed real-time rates per event, tilted by generator priors.

    ``p_k = (count_k + m * base_k) / (impressions + m)`` for binary objectives and the smoothed
    mean value for regressions; LLM candidates scale their binary rates by ``0.5 + prior_score``.
    """

    name = "prior"

    def predict(self, strategy, candidates, counters: dict | None = None) -> np.ndarray:
        n = len(candidates)
        counters = counters or {}
        shown = np.asarray(counters.get("impressions", np.zeros(n)), dtype=np.float64)
        prior = np.array([c.generator.prior_score if c.generator else 0.5 for c in candidates], dtype=np.float64)
        out = np.empty((n, len(strategy.objectives)))
        for k, obj in enumerate(strategy.objectives):
            name = obj.event if obj.type == "binary" else f"{obj.event}_sum"  # regressions: summed values
            count = np.asarray(counters.get(name, np.zeros(n)), dtype=np.float64)
            if obj.type == "binary":
                rate = (count + PRIOR_STRENGTH * DEFAULT_BINARY_RATE) / (shown + PRIOR_STRENGTH)
                out[:, k] = np.clip(rate * (0.5 + prior) if obj.weight > 0 else rate, 0.0, 1.0)
            else:
                out[:, k] = (count + PRIOR_STRENGTH * DEFAULT_REGRESSION_VALUE) / (shown + PRIOR_STRENGTH)
        return out


class RankerChain:
    """Holds the loaded models; ``predict`` walks them in order of preference."""

    def __init__(self, models=(), load_errors=(), primary_loaded: bool = True):
        self.models = list(models)  # objects with .name, .version, .objectives, .predict(frame)
        self.load_errors = list(load_errors)
        self.primary_loaded = primary_loaded  # False: models[0] is already a fallback
        self.prior = PriorPredictor()

    @property
    def version(self) -> str:
        return f"{self.models[0].name}@{self.models[0].version}" if self.models else "prior"

    @property
    def ready(self) -> bool:
        return bool(self.models)

    @classmethod
    def load(cls, registry: str, primary: str | None, fallback: str | None = None,
             quantized: str = "none", compile_trees: bool = False, trees_cache=None) -> "RankerChain":
        """Load the primary ranker and its fallback (TorchRec or LightGBM, told apart by the manifest;
        ``quantized``: the TorchRec rankers' serving variant, ``compile_trees``/``trees_cache``: the
        LightGBM ones' native predict, see :func:`load_ranker`); load failures, and variants that did not
        load, are kept in ``load_errors`` and the service starts anyway."""
        models, errors, primary_loaded = [], [], primary is None
        for ref, is_primary in ((primary, True), (fallback, False)):
            if not ref:
                continue
            try:
                model = load_ranker(registry, ref, quantized, compile_trees, trees_cache)
                models.append(model)
                primary_loaded = primary_loaded or is_primary
                if getattr(model, "load_warning", None):
                    errors.append(f"{ref}: {model.load_warning}")
            except Exception as exc:  # a missing or corrupt model must not stop the service
                errors.append(f"{ref}: {type(exc).__name__}: {exc}")
                log.warning("model %s not loaded: %s", ref, exc)
        return cls(models, errors, primary_loaded)

    def predict(self, strategy, candidates, frame_fn, counters=None) -> Prediction:
        """``frame_fn()`` builds the model input rows lazily (only when a model is there);
        ``counters`` (real-time item counters for the prior) may be a callable, called only when
        the prior serves."""
        degraded = "no_model" if not self.models else None if self.primary_loaded else "primary_unavailable"
        frame = None
        for rank_pos, model in enumerate(self.models):
            columns = [model.objectives.index(o) if o in model.objectives else -1 for o in strategy.objective_names]
            if -1 in columns:
                degraded = degraded or "objectives_missing"
                continue
            try:
                frame = frame_fn() if frame is None else frame
                out = np.asarray(model.predict(_model_input(model, frame)), dtype=np.float64)[:, columns]
            except Exception as exc:  # the service keeps answering on the next ranker
                log.warning("model %s@%s failed: %s", model.name, model.version, exc)
                degraded = degraded or "model_error"
                continue
            if out.shape != (len(candidates), len(columns)) or not np.isfinite(out).all():
                degraded = degraded or "model_output_invalid"
                continue
            return Prediction(out, f"{model.name}@{model.version}", degraded if rank_pos or degraded else None)
        if callable(counters):
            counters = counters()
        return Prediction(self.prior.predict(strategy, candidates, counters), "prior", degraded or "no_model")


def load_ranker(registry: str, ref: str, quantized: str = "none", compile_trees: bool = False, trees_cache=None):
    """A registered ranker: TorchRec (``ranking.artifacts.load_model``) or LightGBM (manifest ``kind``).

    ``quantized`` (int8 | int4): a TorchRec ranker serves that row-wise quantized variant of its tables
    (LightGBM has none and ignores it). A variant that is missing, corrupt or does not load is logged
    and the version's fp32 weights serve instead; the ranker's ``load_warning`` says why.
    ``compile_trees``: a LightGBM ranker predicts from its boosters compiled to native code, cached in
    ``trees_cache`` (``ranking.compiled_trees``; TorchRec ignores it); one that does not compile serves
    LightGBM's own predict, with a ``load_warning``."""
    import json

    from ranking.artifacts import load_model
    from ranking.registry import resolve

    vdir = resolve(registry, ref)
    manifest = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("kind") == "lightgbm":
        from ranking.artifacts import load_registered_lgbm

        return load_registered_lgbm(vdir, compile_trees, trees_cache)
    if quantized != "none":
        try:
            return TorchRecRanker(load_model(registry, str(vdir), quantized))
        except Exception as exc:   # the fp32 weights of the same version serve: never dark for a variant
            warning = f"{quantized} variant not loaded, serving the fp32 weights: {type(exc).__name__}: {exc}"
            log.error("model %s: %s", ref, warning)
            ranker = TorchRecRanker(load_model(registry, str(vdir)))
            ranker.load_warning = warning
            return ranker
    return TorchRecRanker(load_model(registry, str(vdir)))


class TorchRecRanker:
    """A registered TorchRec model scoring request rows; columns a request lacks (say, a user
    with no history yet) are encoded as missing: out-of-vocabulary ids, empty lists, mean dense.
    A model with GBDT leaves (``loaded.leaves``) computes its leaf-id column from the rows first."""

    reads_request_rows = True

    def __init__(self, loaded):
        self.loaded = loaded
        self.name, self.version, self.objectives = loaded.name, loaded.version, loaded.objectives
        self.quantized = loaded.quantized   # the tables it serves: int8 | int4 | none (fp32)
        self.load_warning: str | None = None   # why a requested quantized variant did not load
        loaded.encoder.prepare_serving()

    def predict(self, rows) -> np.ndarray:
        """(N, K) natural-unit predictions of a DataFrame or of :class:`RequestRows` (the serving
        path: the same tensors as ``LoadedModel.predict(rows.frame(), allow_missing=True)``)."""
        if not isinstance(rows, RequestRows):
            return self.loaded.predict(rows, allow_missing=True)
        loaded = self.loaded
        if len(rows) == 0:
            return np.zeros((0, len(self.objectives)))
        import torch

        from ranking.models import to_natural

        columns = rows.columns
        leaves = getattr(loaded, "leaves", None)
        if leaves is not None:   # the GBDT leaf ids, computed as training computed them
            columns = {**columns, **leaves.compute(columns, len(rows))}
        batch = loaded.encoder.transform_columns(columns, len(rows))
        with torch.inference_mode():
            out = to_natural(loaded.module(batch.dense, batch.kjt), loaded.objective_configs)
        return out.double().numpy()
