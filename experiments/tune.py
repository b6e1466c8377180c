"""Tune objective weights against online metrics: offline IPS pre-screening, then Bayesian optimisation.

A tuning file (``conf/tune/*.yaml``)::

    strategy: conf/objectives/feed.yaml
    strategy_overrides: {exploration.epsilon: 0.0}   # optional: applied to the base before tuning
    world: conf/sim/small.yaml                       # the simulated world the online phase runs in
    world_overrides: {candidates_per_request: 50}    # optional top-level world keys
    search:                                          # the weights searched, with their box
      - {key: objectives.like.weight, min: 0, max: 16}
      - {key: objectives.watch_time.weight, min: 0, max: 4}
    goal: {watch: 1.0}                               # maximise Σ weight x outcome per request
    guardrails:                                      # relative to the base strategy (control)
      - {metric: like, min_relative: -0.03}
      - {metric: report, max_relative: 0.02}
    offline: {requests: 1000, epsilon: 0.15, candidates: 16, keep: 4}
    online: {budget_requests: 2400000, batch_requests: 80000, control_batches: 4, min_feasible_prob: 0.9}
    grid: 9                                          # truth grid per dimension (simulation report only)
    contexts: 100                                    # request contexts of the simulated population
    seed: 7
    output: runs/tune/feed_weights.yaml              # the proposed strategy file (never applied)

Outcomes are the world's feedback events: ``click, like, share, report, watch`` (seconds).

1. **Offline pre-screening** (:func:`offline_screen`): the base strategy serves
   ``offline.requests`` requests with exploration ``offline.epsilon``; ``offline.candidates``
   weight vectors (a scrambled Sobol design in the box) are scored by SNIPS
   (:mod:`experiments.ope`) on every goal and guardrail outcome. An estimate is *reliable* when the
   effective sample size of its slot weights is at least 20% of the logged requests (far from the
   logging policy the weights are heavy-tailed and the CLT interval is too optimistic); reliable
   candidates whose guardrail CI lies entirely on the wrong side of its bound are dropped, and the
   ``keep`` best (reliable first, then by estimated goal) become the first online variants.
2. **Online Bayesian optimisation** (:func:`tune`): each evaluation is one experiment variant
   serving ``online.batch_requests`` simulated requests (control once, ``control_batches`` batches); one
   Gaussian process per metric (scikit-learn, Matérn 5/2, the batches' standard errors as noise)
   models the relative change against control (the base strategy's own weights enter as a point
   with change 0); the next variant maximises expected improvement of
   the goal times the probability that every guardrail holds (constrained EI, Gardner et al. 2014),
   until ``online.budget_requests`` are spent.
3. **Proposal**: the point with the best posterior goal among those whose guardrails hold with
   probability ``>= online.min_feasible_prob``; written as a strategy YAML to ``output`` with the
   evidence in its header. It is a proposal: nothing is applied.

In the simulated world a request's outcomes are Poisson draws around the exact expected values of
the variant's slate for a context drawn from a fixed pool (:func:`experiments.ope.true_values`);
the same world gives the truth, so :func:`grid_optimum` finds the true constrained optimum on a grid
and the report states the fraction of it the proposal reaches.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import yaml
from scipy import stats as _st

from strategy import Strategy, load_strategy
from strategy.checks import NAME_RE, as_dict, as_list, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, FieldError, ValidationError, did_you_mean, join_path

from . import ope
from .config import _resolve, load_referenced

__all__ = ["Param", "Guardrail", "TuneConfig", "load_tune", "tune_from_dict", "WorldOracle", "offline_screen",
           "tune", "grid_optimum", "write_proposal", "OUTCOMES"]

OUTCOMES = ("click", "like", "share", "report", "watch")
TOP_KEYS = ("strategy", "strategy_overrides", "world", "world_overrides", "search", "goal", "guardrails",
            "offline", "online", "grid", "contexts", "seed", "output")
OFFLINE_KEYS = ("requests", "epsilon", "candidates", "keep")
MIN_ESS_SHARE = 0.2     # an offline estimate counts as reliable when its slot ESS is >= 20% of the logs
ONLINE_KEYS = ("budget_requests", "batch_requests", "control_batches", "min_feasible_prob")


@dataclass(frozen=True)
class Param:
    key: str
    lo: float
    hi: float


@dataclass(frozen=True)
class Guardrail:
    metric: str
    min_relative: float | None = None
    max_relative: float | None = None

    def ok(self, rel: float) -> bool:
        return ((self.min_relative is None or rel >= self.min_relative)
                and (self.max_relative is None or rel <= self.max_relative))


@dataclass(frozen=True)
class TuneConfig:
    strategy: Strategy
    params: tuple[Param, ...]
    goal: Mapping[str, float]
    guardrails: tuple[Guardrail, ...]
    world_path: str | None = None
    world_overrides: Mapping = field(default_factory=dict)
    offline_requests: int = 1000
    offline_epsilon: float = 0.15
    offline_candidates: int = 16
    offline_keep: int = 4
    budget_requests: int = 200_000
    batch_requests: int = 10_000
    control_batches: int = 4
    min_feasible_prob: float = 0.9
    grid: int = 9
    contexts: int = 100
    seed: int = 0
    output: str | None = None
    source: str = "<dict>"

    @property
    def metrics(self) -> list[str]:
        """Outcomes measured: the goal's, then the guardrails' (no duplicates)."""
        out = list(self.goal)
        out += [g.metric for g in self.guardrails if g.metric not in out]
        return out


def load_tune(path: str | Path) -> TuneConfig:
    """Load and validate a tuning file (all errors at once, ``file:line: key.path``)."""
    data, lines = read_yaml(path)
    return tune_from_dict(data, source=str(path), lines=lines, base_dir=Path(path).resolve().parent)


def _find(name: str, base_dir) -> Path | None:
    return _resolve(name, Path(base_dir) if base_dir else None)


def tune_from_dict(data, source: str = "<dict>", lines: dict | None = None, base_dir=None,
                   strategy: Strategy | None = None) -> TuneConfig:
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    check_keys(errs, obj, "", TOP_KEYS, required=("search", "goal") + (() if strategy else ("strategy",)))
    if strategy is None:
        strategy, _ = load_referenced(errs, obj, "strategy", base_dir, load_strategy)
    if strategy is not None and obj.get("strategy_overrides") is not None:
        ov = as_dict(errs, obj["strategy_overrides"], "strategy_overrides")
        if ov is not None:
            try:
                strategy = strategy.with_overrides(ov)
            except ValidationError as exc:
                for e in exc.errors:
                    errs.add(join_path("strategy_overrides", e.path), e.message, e.code)
    world_path = None
    if obj.get("world") is not None and as_str(errs, obj["world"], "world") is not None:
        found = _find(obj["world"], base_dir)
        if found is None:
            errs.add("world", f"world file not found: {obj['world']}", "not_found")
        else:
            world_path = str(found)
    world_overrides = {}
    if obj.get("world_overrides") is not None:
        world_overrides = as_dict(errs, obj["world_overrides"], "world_overrides") or {}

    params = []
    items = as_list(errs, obj.get("search"), "search", max_len=8) if "search" in obj else None
    if items is not None and not items:
        errs.add("search", "list at least one weight to search", "required")
    seen = set()
    for i, spec in enumerate(items or ()):
        p = f"search[{i}]"
        spec = as_dict(errs, spec, p)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, p, ("key", "min", "max"), required=("key", "min", "max"))
        key = as_str(errs, spec.get("key"), join_path(p, "key")) if "key" in spec else None
        lo = as_number(errs, spec["min"], join_path(p, "min")) if "min" in spec else None
        hi = as_number(errs, spec["max"], join_path(p, "max")) if "max" in spec else None
        if lo is not None and hi is not None and hi <= lo:
            errs.add(p, f"empty box: max {hi:g} must be above min {lo:g}", "range")
        if key is not None:
            if key in seen:
                errs.add(join_path(p, "key"), f"duplicate key '{key}'", "duplicate")
            seen.add(key)
            if strategy is not None and lo is not None:
                try:
                    strategy.with_overrides({key: float(lo)})
                except ValidationError as exc:
                    errs.add(join_path(p, "key"), f"not a settable strategy key: {exc.errors[0].message}",
                             "unknown_key")
        if len(errs.items) == before:
            params.append(Param(key, float(lo), float(hi)))

    goal = {}
    g = as_dict(errs, obj.get("goal"), "goal") if "goal" in obj else None
    for k, w in (g or {}).items():
        if k not in OUTCOMES:
            errs.add(join_path("goal", str(k)), f"unknown outcome '{k}'{did_you_mean(k, OUTCOMES)} "
                     f"(allowed: {', '.join(OUTCOMES)})", "choice")
            continue
        w = as_number(errs, w, join_path("goal", k))
        if w is not None:
            goal[k] = float(w)
    if g is not None and not g:
        errs.add("goal", "name at least one outcome, e.g. {watch: 1.0}", "required")

    guards = []
    items = as_list(errs, obj.get("guardrails", []), "guardrails", max_len=20)
    for i, spec in enumerate(items or ()):
        p = f"guardrails[{i}]"
        spec = as_dict(errs, spec, p)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, p, ("metric", "min_relative", "max_relative"), required=("metric",))
        m = as_str(errs, spec.get("metric"), join_path(p, "metric"), choices=OUTCOMES) if "metric" in spec else None
        mn = as_number(errs, spec["min_relative"], join_path(p, "min_relative"), lo=-1, hi=10) \
            if spec.get("min_relative") is not None else None
        mx = as_number(errs, spec["max_relative"], join_path(p, "max_relative"), lo=-1, hi=10) \
            if spec.get("max_relative") is not None else None
        if mn is None and mx is None and len(errs.items) == before:
            errs.add(p, "a guardrail needs 'min_relative' or 'max_relative'", "required")
        if len(errs.items) == before:
            guards.append(Guardrail(m, None if mn is None else float(mn), None if mx is None else float(mx)))

    def section(name, keys, spec_of):
        out = {}
        if obj.get(name) is None:
            return out
        sec = as_dict(errs, obj[name], name)
        if sec is None:
            return out
        check_keys(errs, sec, name, keys)
        for k, (lo, hi, integer, lo_open) in spec_of.items():
            if k in sec:
                v = as_number(errs, sec[k], join_path(name, k), lo=lo, hi=hi, integer=integer, lo_open=lo_open)
                if v is not None:
                    out[k] = v
        return out

    off = section("offline", OFFLINE_KEYS, {"requests": (2, 10**7, True, False), "epsilon": (0, 1, False, True),
                                            "candidates": (0, 4096, True, False), "keep": (0, 4096, True, False)})
    on = section("online", ONLINE_KEYS, {"budget_requests": (1, 10**10, True, False),
                                         "batch_requests": (10, 10**9, True, False),
                                         "control_batches": (1, 1000, True, False),
                                         "min_feasible_prob": (0, 1, False, False)})
    top = {}
    for k, lo, hi in (("grid", 2, 101), ("contexts", 1, 10**6), ("seed", 0, 2**63 - 1)):
        if k in obj:
            v = as_number(errs, obj[k], k, lo=lo, hi=hi, integer=True)
            if v is not None:
                top[k] = v
    output = as_str(errs, obj["output"], "output", max_len=1000) if obj.get("output") is not None else None
    budget, batch = on.get("budget_requests", 200_000), on.get("batch_requests", 10_000)
    cb = on.get("control_batches", 4)
    if budget < (cb + 1) * batch:
        errs.add("online.budget_requests", f"{budget} leaves no room for a variant: control takes {cb} "
                 f"batches of {batch}", "range")
    errs.raise_if_any(source, lines)
    return TuneConfig(strategy, tuple(params), goal, tuple(guards), world_path, dict(world_overrides),
                      int(off.get("requests", 1000)), float(off.get("epsilon", 0.15)),
                      int(off.get("candidates", 16)), int(off.get("keep", 4)), int(budget), int(batch), int(cb),
                      float(on.get("min_feasible_prob", 0.9)), int(top.get("grid", 9)),
                      int(top.get("contexts", 100)), int(top.get("seed", 0)), output, source)


# ---------------------------------------------------------------- the world as an online oracle


def candidate(config: TuneConfig, x) -> Strategy:
    """The base strategy with the searched weights set to ``x`` (rounded to 4 decimals)."""
    return config.strategy.with_overrides({p.key: round(float(v), 4) for p, v in zip(config.params, x)})


class WorldOracle:
    """Serves variants to simulated requests and knows the truth.

    ``rates(x)``: ``(contexts, metrics)`` exact expected outcomes per request of the variant with
    weights ``x`` (cached); ``truth(x)``: their mean; ``serve(x, n, rng)``: mean and standard error
    of ``n`` simulated requests (a context drawn uniformly, Poisson outcomes).
    """

    def __init__(self, world, config: TuneConfig, rng: np.random.Generator):
        self.world, self.config = world, config
        self.metrics = config.metrics
        self.contexts = ope.make_contexts(world, config.strategy, config.contexts, rng)
        self._cache: dict = {}
        self.requests = 0

    def rates(self, x) -> np.ndarray:
        key = tuple(round(float(v), 4) for v in x)
        hit = self._cache.get(key)
        if hit is None:
            s = candidate(self.config, key)
            hit = np.array([ope.true_values(self.world, s, c, self.metrics, self.config.strategy.objective_names)
                            for c in self.contexts])
            self._cache[key] = hit
        return hit

    def base_rates(self) -> np.ndarray:
        key = ("base",)
        if key not in self._cache:
            s = self.config.strategy
            self._cache[key] = np.array([ope.true_values(self.world, s, c, self.metrics) for c in self.contexts])
        return self._cache[key]

    def truth(self, x=None) -> np.ndarray:
        return (self.base_rates() if x is None else self.rates(x)).mean(axis=0)

    def serve(self, x, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        R = self.base_rates() if x is None else self.rates(x)
        draws = rng.poisson(R[rng.integers(0, len(R), n)])
        self.requests += n
        return draws.mean(axis=0), draws.std(axis=0, ddof=1) / math.sqrt(n)


def _goal(config: TuneConfig, values: np.ndarray) -> float:
    idx = {m: i for i, m in enumerate(config.metrics)}
    return float(sum(w * values[idx[m]] for m, w in config.goal.items()))


def _feasible_truth(config: TuneConfig, values: np.ndarray, base: np.ndarray) -> bool:
    idx = {m: i for i, m in enumerate(config.metrics)}
    return all(g.ok(values[idx[g.metric]] / base[idx[g.metric]] - 1) for g in config.guardrails)


def grid_optimum(config: TuneConfig, oracle: WorldOracle) -> dict:
    """The true constrained optimum on a ``grid``-points-per-dimension grid (world truth)."""
    base = oracle.truth()
    axes = [np.linspace(p.lo, p.hi, config.grid) for p in config.params]
    best = None
    for x in itertools.product(*axes):
        v = oracle.truth(x)
        if _feasible_truth(config, v, base):
            g = _goal(config, v)
            if best is None or g > best["goal"]:
                best = {"x": [float(a) for a in x], "goal": g}
    return best or {"x": None, "goal": _goal(config, base)}


# ---------------------------------------------------------------- offline pre-screening


def _unit_to_box(config: TuneConfig, u: np.ndarray) -> np.ndarray:
    lo = np.array([p.lo for p in config.params])
    hi = np.array([p.hi for p in config.params])
    return lo + np.asarray(u) * (hi - lo)


def _box_to_unit(config: TuneConfig, x) -> np.ndarray:
    lo = np.array([p.lo for p in config.params])
    hi = np.array([p.hi for p in config.params])
    return (np.asarray(x, dtype=float) - lo) / (hi - lo)


def offline_screen(config: TuneConfig, world, oracle: WorldOracle, rng: np.random.Generator) -> list[dict]:
    """Score a Sobol design of weight vectors by SNIPS on logs of the exploring base strategy.

    Returns one record per candidate (``x``, per-metric estimates and CIs, ``screened_out``, ``rank``),
    best first; the logged requests count towards nothing online (they are past traffic).
    """
    if config.offline_candidates == 0:
        return []
    logging = config.strategy.with_overrides({"exploration.epsilon": config.offline_epsilon})
    logs = ope.log_requests(world, logging, config.offline_requests, rng, contexts=oracle.contexts,
                            prefix="tune-offline")
    metrics = config.metrics
    base_means = {m: float(np.mean([ope.reward_vector(lg, m).sum() for lg in logs])) for m in metrics}
    sob = _st.qmc.Sobol(len(config.params), scramble=True, seed=int(rng.integers(0, 2**31)))
    U = sob.random(2 ** math.ceil(math.log2(config.offline_candidates)))[:config.offline_candidates]
    out = []
    for u in U:
        x = _unit_to_box(config, u)
        ests = ope.estimate_metrics(logs, logging, candidate(config, x), metrics, "snips")
        by = dict(zip(metrics, ests))
        out_bad = False
        for g in config.guardrails:
            e, b = by[g.metric], base_means[g.metric]
            if b > 0:
                if g.min_relative is not None and e.ci_high / b - 1 < g.min_relative:
                    out_bad = True
                if g.max_relative is not None and e.ci_low / b - 1 > g.max_relative:
                    out_bad = True
        goal = sum(w * by[m].value for m, w in config.goal.items())
        ess = min(e.ess for e in ests)
        reliable = ess >= MIN_ESS_SHARE * len(logs)
        out.append({"x": [float(v) for v in x], "goal_estimate": float(goal), "screened_out": out_bad and reliable,
                    "reliable": bool(reliable), "ess": float(ess),
                    "estimates": {m: by[m].to_dict() for m in metrics}})
    # reliable estimates first (a target far from the logging policy has few matching slots: its
    # importance weights are heavy-tailed and its CI too optimistic), then by estimated goal
    out.sort(key=lambda r: (r["screened_out"], not r["reliable"], -r["goal_estimate"]))
    return out


# ---------------------------------------------------------------- online Bayesian optimisation


def _fit_gp(X: np.ndarray, y: np.ndarray, se: np.ndarray, seed: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern

    mu, sd = float(y.mean()), float(y.std()) or 1.0
    # weights act smoothly on slates: length scales below a fifth of the box are noise, not signal
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(length_scale=[0.5] * X.shape[1],
                                                        length_scale_bounds=(0.2, 20.0), nu=2.5)
    gp = GaussianProcessRegressor(kernel, alpha=np.maximum((se / sd) ** 2, 1e-8), normalize_y=False,
                                  n_restarts_optimizer=2, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(X, (y - mu) / sd)

    def predict(Z):
        m, s = gp.predict(Z, return_std=True)
        return m * sd + mu, s * sd
    return predict


def _models(config, X, Y, SE, seed):
    """One GP per metric (relative change vs control); returns ``predict(Z) -> {metric: (mean, sd)}``."""
    fits = [_fit_gp(X, Y[:, j], SE[:, j], seed + j) for j in range(len(config.metrics))]
    return lambda Z: {m: f(Z) for m, f in zip(config.metrics, fits)}


def _goal_post(config, post):
    mean = sum(w * post[m][0] for m, w in config.goal.items())
    var = sum((w * post[m][1]) ** 2 for m, w in config.goal.items())
    return mean, np.sqrt(var)


def _p_feasible(config, post, shared_se=None):
    """P(every guardrail holds); ``shared_se[metric]``: the control's relative standard error, an
    error shared by every variant's relative change (it does not average out over evaluations)."""
    p = 1.0
    for g in config.guardrails:
        m, s = post[g.metric]
        extra = 0.0 if shared_se is None else shared_se[g.metric]
        s = np.maximum(np.sqrt(s ** 2 + extra ** 2), 1e-12)
        if g.min_relative is not None:
            p = p * _st.norm.sf((g.min_relative - m) / s)
        if g.max_relative is not None:
            p = p * _st.norm.cdf((g.max_relative - m) / s)
    return p


def _base_point(config: TuneConfig):
    """The base strategy's own values of the searched keys, when all are set and inside the box."""
    out = []
    for p in config.params:
        node = config.strategy.raw
        for part in p.key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, (int, float)) or isinstance(node, bool) or not p.lo <= node <= p.hi:
            return None
        out.append(float(node))
    return np.array(out)


def tune(config: TuneConfig, world=None, progress=None) -> dict:
    """Run the whole search in the simulated world; returns the report (see the module docstring)."""
    from world import World, WorldConfig

    t0 = time.perf_counter()
    if world is None:
        if config.world_path is None:
            raise ValidationError([FieldError("world", "a world file is needed to run online evaluations",
                                              "required", config.source)])
        world = World(WorldConfig.from_yaml(config.world_path, **dict(config.world_overrides)))
    rng = np.random.default_rng(config.seed)
    oracle = WorldOracle(world, config, np.random.default_rng([config.seed, 1]))
    screen = offline_screen(config, world, oracle, np.random.default_rng([config.seed, 2]))

    # control: two batches; the relative changes of every variant are measured against it
    c_mean, c_se = oracle.serve(None, config.control_batches * config.batch_requests, rng)
    shared = dict(zip(config.metrics, map(float, c_se / c_mean)))
    X, Y, SE, evals = [], [], [], []

    def evaluate(x, why):
        m, se = oracle.serve(x, config.batch_requests, rng)
        rel = m / c_mean - 1
        rel_se = se / c_mean        # the control's own error is shared by all points: see _p_feasible
        X.append(_box_to_unit(config, x))
        Y.append(rel)
        SE.append(rel_se)
        evals.append({"x": [float(v) for v in x], "why": why, "relative": dict(zip(config.metrics, map(float, rel))),
                      "requests": config.batch_requests})
        if progress:
            progress(evals[-1])

    # the control is a point of the search space too: relative change 0 by definition
    base_x = _base_point(config)
    if base_x is not None:
        X.append(_box_to_unit(config, base_x))
        Y.append(np.zeros(len(config.metrics)))
        SE.append(np.full(len(config.metrics), 1e-4))
    budget_left = lambda: config.budget_requests - oracle.requests  # noqa: E731
    init = [r["x"] for r in screen if not r["screened_out"]][:config.offline_keep]
    init.append(list(_unit_to_box(config, np.full(len(config.params), 0.5))))   # the centre of the box
    for x in init:
        if budget_left() < config.batch_requests:
            break
        evaluate(np.asarray(x), "offline" if len(evals) < len(init) - 1 else "centre")
    sob = _st.qmc.Sobol(len(config.params), scramble=True, seed=config.seed)
    Z = sob.random(1024)
    while budget_left() >= config.batch_requests:
        predict = _models(config, np.array(X), np.array(Y), np.array(SE), config.seed)
        post = predict(Z)
        gm, gs = _goal_post(config, post)
        pf = _p_feasible(config, post)
        post_x = predict(np.array(X))
        gx, _ = _goal_post(config, post_x)
        ok = _p_feasible(config, post_x) >= 0.5
        best = float(gx[ok].max()) if ok.any() else float(gx.min())
        gs = np.maximum(gs, 1e-12)
        zz = (gm - best) / gs
        ei = (gm - best) * _st.norm.cdf(zz) + gs * _st.norm.pdf(zz)
        k = int(np.argmax(ei * pf))
        evaluate(_unit_to_box(config, Z[k]), "bo")

    # proposal: best posterior goal among candidate points that are feasible with high probability
    Xa = np.array(X)
    cand = np.vstack([Xa, Z])
    post = _models(config, Xa, np.array(Y), np.array(SE), config.seed)(cand)
    gm, _ = _goal_post(config, post)
    pf = _p_feasible(config, post, shared)
    ok = pf >= config.min_feasible_prob
    if ok.any():
        k = int(np.flatnonzero(ok)[np.argmax(gm[ok])])
        pick = _unit_to_box(config, cand[k])
        predicted = {m: float(post[m][0][k]) for m in config.metrics}
    else:
        k, pick, predicted = None, None, None

    # the world's truth: how good is the proposal, and what is the grid optimum
    base_truth = oracle.truth()
    optimum = grid_optimum(config, oracle)
    report = {"strategy": config.strategy.name, "params": [p.key for p in config.params],
              "goal": dict(config.goal), "guardrails": [g.__dict__ for g in config.guardrails],
              "requests_used": int(oracle.requests), "budget_requests": config.budget_requests,
              "batch_requests": config.batch_requests, "evaluations": evals, "offline": screen,
              "base_goal_true": _goal(config, base_truth), "optimum": optimum}
    if pick is not None:
        vt = oracle.truth(pick)
        held = _feasible_truth(config, vt, base_truth)
        report.update({"pick": [round(float(v), 4) for v in pick], "pick_feasible_prob": float(pf[k]),
                       "pick_predicted_relative": predicted, "pick_goal_true": _goal(config, vt),
                       "pick_relative_true": {m: float(vt[i] / base_truth[i] - 1) for i, m in enumerate(config.metrics)},
                       "guardrails_held": bool(held),
                       "fraction_of_optimum": _goal(config, vt) / optimum["goal"] if optimum["goal"] else None})
    else:
        report.update({"pick": None, "guardrails_held": True, "fraction_of_optimum": None})
    report["seconds"] = time.perf_counter() - t0
    return report


def write_proposal(config: TuneConfig, report: dict, path: str | Path) -> Path:
    """Write the proposed strategy (base + tuned weights) as YAML with the evidence in its header.
    It is a proposal for review (validate it, ramp it with ``experiments control``): never applied."""
    if report.get("pick") is None:
        raise ValueError("no weight vector was feasible with enough confidence: nothing to propose")
    s = candidate(config, report["pick"])
    raw = dict(s.raw)
    name = f"{config.strategy.name}_tuned"
    raw["strategy"] = name[:64] if NAME_RE.match(name[:64]) else config.strategy.name
    header = [f"# Proposed by `stratarank tune --config {config.source}`; NOT applied. Review, then ramp it",
              "# as an experiment variant (stratarank experiments control).",
              "# searched: " + ", ".join(f"{p.key}=[{p.lo:g}, {p.hi:g}]" for p in config.params),
              "# picked:   " + ", ".join(f"{p.key}={v:g}" for p, v in zip(config.params, report["pick"])),
              f"# online requests used: {report['requests_used']} of {report['budget_requests']}",
              "# predicted change vs the base strategy: " + ", ".join(
                  f"{m} {v:+.2%}" for m, v in (report.get("pick_predicted_relative") or {}).items())]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_strategy(path)  # the proposal must itself be a valid strategy file
    return path
