"""Guarded ramps: advance an experiment's traffic step by step, stop it automatically on harm.

A ramp file (``conf/control/*.yaml``)::

    experiments: conf/experiments/like_up.yaml   # the experiments file that declares the experiment
    experiment: like_up
    alpha: 0.05                 # family-wise, split over guardrails x treatments (Bonferroni)
    tuning: 5000                # confidence-sequence tuning (total users where it is tightest)
    srm_p: 0.001                # advance only when the SRM p-value is at least this
    state: runs/control/like_up.state.json       # the range the scorer should use (written here)
    log: runs/control/like_up.decisions.jsonl    # one JSON record per decision, with its evidence
    steps:                      # share of the layer's hash space, from the experiment's range start
      - {share: 0.01, min_minutes: 60,   min_users: 200}
      - {share: 0.05, min_minutes: 240,  min_users: 2000}
      - {share: 0.5,  min_minutes: 1440, min_users: 20000}
    guardrails:                 # margin: relative change tolerated in the harmful direction
      - {metric: reports_per_user, margin: 0.05, harmful: increase}

Decision rule (:func:`decide`, pure): for every treatment variant and guardrail the always-valid
confidence sequence of the *relative* lift (:func:`experiments.stats.sequential_test`, level
``alpha / (guardrails x treatments)``) is checked against the margin ``m``:

* **stop** as soon as the whole sequence lies beyond the margin on the harmful side
  (``harmful: increase``: lower bound > ``m``; ``decrease``: upper bound < ``-m``) — all traffic
  goes back to control;
* **advance** (or **complete** on the last step) when the step's ``min_minutes`` and ``min_users``
  are met, SRM ``p >= srm_p`` and every guardrail is non-inferior: the sequence lies inside the
  margin (``increase``: upper bound < ``m``; ``decrease``: lower bound > ``-m``);
* **hold** otherwise (each reason is recorded).

Confidence sequences stay valid under continuous monitoring, so running the controller every few
minutes does not inflate the false-stop rate (the A/A check in ``tests/unit/test_control.py``).
Caveat: the sequence assumes i.i.d. users; per-user metrics that keep accumulating after a user's
exposure, and the population change as a ramp grows, make it approximate.

Growing the range ``[lo, lo + share)`` never moves an assigned user (``experiments.assignment``);
:func:`apply_state` turns the state file into the experiments config the scorer should load.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from strategy.checks import as_dict, as_list, as_number, as_str, check_keys
from strategy.config import read_yaml
from strategy.errors import Errors, did_you_mean, join_path

from . import stats as S
from .config import ExperimentsConfig, load_experiments, load_referenced

__all__ = ["Step", "GuardrailSpec", "ControlConfig", "State", "Evidence", "Decision", "load_control",
           "control_from_dict", "initial_state", "decide", "evidence_from_tables", "apply_state", "run_once",
           "read_state", "state_file", "log_file", "served_experiments", "ACTIONS"]

ACTIONS = ("advance", "hold", "stop", "complete")
TOP_KEYS = ("experiments", "experiment", "steps", "guardrails", "alpha", "tuning", "srm_p", "state", "log")
STEP_KEYS = ("share", "min_minutes", "min_users")
GUARD_KEYS = ("metric", "margin", "harmful")
HARMFUL = ("increase", "decrease")


@dataclass(frozen=True)
class Step:
    share: float
    min_minutes: float = 0.0
    min_users: int = 0


@dataclass(frozen=True)
class GuardrailSpec:
    metric: str
    margin: float
    harmful: str = "increase"


@dataclass(frozen=True)
class ControlConfig:
    experiment: str
    steps: tuple[Step, ...]
    guardrails: tuple[GuardrailSpec, ...]
    experiments: ExperimentsConfig | None = None
    experiments_path: str | None = None
    alpha: float = 0.05
    tuning: float = 5000.0
    srm_p: float = 0.001
    state_path: str | None = None
    log_path: str | None = None
    source: str = "<dict>"

    @property
    def exp(self):
        return self.experiments.experiment(self.experiment) if self.experiments is not None else None


def load_control(path: str | Path) -> ControlConfig:
    """Load and validate a ramp file; every problem at once, with ``file:line: key.path``."""
    data, lines = read_yaml(path)
    return control_from_dict(data, source=str(path), lines=lines, base_dir=Path(path).resolve().parent)


def control_from_dict(data, source: str = "<dict>", lines: dict | None = None, base_dir=None,
                      experiments: ExperimentsConfig | None = None) -> ControlConfig:
    errs = Errors()
    obj = as_dict(errs, data, "")
    if obj is None:
        errs.raise_if_any(source, lines)
    required = ("experiment", "steps", "guardrails") + (() if experiments is not None else ("experiments",))
    check_keys(errs, obj, "", TOP_KEYS, required=required)
    exps_path = None
    if experiments is None:
        experiments, exps_path = load_referenced(errs, obj, "experiments", base_dir, load_experiments)
    name = as_str(errs, obj["experiment"], "experiment") if "experiment" in obj else None
    exp = None
    if name is not None and experiments is not None:
        names = [e.name for e in experiments.experiments]
        if name not in names:
            errs.add("experiment", f"unknown experiment '{name}'{did_you_mean(name, names)} "
                     f"(experiments: {', '.join(names)})", "unknown_experiment")
        else:
            exp = experiments.experiment(name)
    alpha = as_number(errs, obj.get("alpha", 0.05), "alpha", lo=0, hi=0.5, lo_open=True)
    tuning = as_number(errs, obj.get("tuning", 5000), "tuning", lo=1, hi=1e9)
    srm_p = as_number(errs, obj.get("srm_p", 0.001), "srm_p", lo=0, hi=0.5)
    paths = {}
    for key in ("state", "log"):
        if obj.get(key) is not None:
            paths[key] = as_str(errs, obj[key], key, max_len=1000)

    steps: list[Step] = []
    items = as_list(errs, obj.get("steps"), "steps", max_len=100) if "steps" in obj else None
    if items is not None and not items:
        errs.add("steps", "list at least one step", "required")
    hi_limit = _max_hi(experiments, exp) if exp is not None else 1.0
    lo = exp.range[0] if exp is not None else 0.0
    prev = 0.0
    for i, spec in enumerate(items or ()):
        p = f"steps[{i}]"
        spec = as_dict(errs, spec, p)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, p, STEP_KEYS, required=("share",))
        share = as_number(errs, spec.get("share"), join_path(p, "share"), lo=0, hi=1, lo_open=True)
        mins = as_number(errs, spec.get("min_minutes", 0), join_path(p, "min_minutes"), lo=0, hi=1e7)
        users = as_number(errs, spec.get("min_users", 0), join_path(p, "min_users"), lo=0, hi=1e12, integer=True)
        if share is not None:
            if share <= prev:
                errs.add(join_path(p, "share"), f"shares must increase step by step ({share:g} <= {prev:g})", "range")
            if lo + share > hi_limit + 1e-12:
                errs.add(join_path(p, "share"), f"range [{lo:g}, {lo + share:g}) would overlap the next experiment of "
                         f"layer '{exp.layer}' or leave [0, 1] (at most {hi_limit - lo:g})", "overlap")
            prev = max(prev, share)
        if len(errs.items) == before:
            steps.append(Step(float(share), float(mins), int(users)))

    guards: list[GuardrailSpec] = []
    items = as_list(errs, obj.get("guardrails"), "guardrails", max_len=100) if "guardrails" in obj else None
    if items is not None and not items:
        errs.add("guardrails", "list at least one guardrail metric", "required")
    known = list(experiments.metrics) if experiments is not None else None
    for i, spec in enumerate(items or ()):
        p = f"guardrails[{i}]"
        spec = as_dict(errs, spec, p)
        if spec is None:
            continue
        before = len(errs.items)
        check_keys(errs, spec, p, GUARD_KEYS, required=("metric", "margin"))
        metric = as_str(errs, spec["metric"], join_path(p, "metric")) if "metric" in spec else None
        if metric is not None and known is not None and metric not in known:
            errs.add(join_path(p, "metric"), f"unknown metric '{metric}'{did_you_mean(metric, known)} "
                     f"(metrics: {', '.join(known)})", "unknown_metric")
        margin = as_number(errs, spec.get("margin"), join_path(p, "margin"), lo=0, hi=10) if "margin" in spec else None
        harmful = as_str(errs, spec.get("harmful", "increase"), join_path(p, "harmful"), choices=HARMFUL)
        if len(errs.items) == before:
            guards.append(GuardrailSpec(metric, float(margin), harmful))
    errs.raise_if_any(source, lines)
    return ControlConfig(name, tuple(steps), tuple(guards), experiments, exps_path, float(alpha), float(tuning),
                         float(srm_p), paths.get("state"), paths.get("log"), source)


def _max_hi(experiments: ExperimentsConfig, exp) -> float:
    """The largest ``hi`` the experiment's range may grow to: the next experiment's start in its layer."""
    layer = next(layer for layer in experiments.layers if layer.name == exp.layer)
    starts = [e.range[0] for e in layer.experiments if e.name != exp.name and e.range[0] >= exp.range[1] - 1e-12]
    return min(starts, default=1.0)


# ---------------------------------------------------------------- state and evidence


@dataclass(frozen=True)
class State:
    """What the controller has done: ``status`` running|stopped|completed, the ``step`` index, the
    ``range`` the scorer should use and when the ramp and the current step started (epoch seconds)."""

    experiment: str
    status: str
    step: int
    range: tuple[float, float]
    started_at: float
    step_started_at: float

    def to_dict(self) -> dict:
        return {"experiment": self.experiment, "status": self.status, "step": self.step,
                "range": list(self.range), "started_at": self.started_at, "step_started_at": self.step_started_at}

    @classmethod
    def from_dict(cls, d: Mapping) -> "State":
        return cls(str(d["experiment"]), str(d["status"]), int(d["step"]), tuple(map(float, d["range"])),
                   float(d["started_at"]), float(d["step_started_at"]))


def initial_state(config: ControlConfig, now: float, lo: float | None = None) -> State:
    lo = (config.exp.range[0] if config.exp is not None else 0.0) if lo is None else lo
    return State(config.experiment, "running", 0, (lo, lo + config.steps[0].share), float(now), float(now))


@dataclass(frozen=True)
class Evidence:
    """What a decision looks at: the time, users per variant (and planned weights), and per
    (treatment variant, guardrail metric) the two arms' sufficient statistics."""

    now: float
    users: Mapping[str, int]
    weights: Mapping[str, float]
    control: str
    arms: Mapping[tuple, tuple]          # (variant, metric) -> (control Moments, treatment Moments)


@dataclass(frozen=True)
class Decision:
    action: str
    reasons: tuple[str, ...]
    evidence: tuple[dict, ...]
    state: State                          # the state after the decision
    previous: State
    time: float

    def to_dict(self) -> dict:
        return {"time": self.time, "experiment": self.state.experiment, "action": self.action,
                "reasons": list(self.reasons), "step_before": self.previous.step, "step_after": self.state.step,
                "range_before": list(self.previous.range), "range_after": list(self.state.range),
                "status": self.state.status, "evidence": list(self.evidence)}


def _fin(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def decide(config: ControlConfig, state: State, evidence: Evidence) -> Decision:
    """The controller's pure decision function (see the module docstring for the rule)."""
    now = float(evidence.now)
    if state.status != "running":
        return Decision("hold", (f"experiment is {state.status}",), (), state, state, now)
    treatments = sorted({v for v, _ in evidence.arms})
    k = max(1, len(config.guardrails) * max(1, len(treatments)))
    level = config.alpha / k
    records, harms, unproven = [], [], []
    for variant in treatments:
        for g in config.guardrails:
            c, t = evidence.arms[(variant, g.metric)]
            res = S.sequential_test(c, t, level, config.tuning)
            lo, hi = res.rel_ci_low, res.rel_ci_high
            if res.error or lo is None or math.isnan(lo):
                harm = ok = False
            elif g.harmful == "increase":
                harm, ok = lo > g.margin, hi < g.margin
            else:
                harm, ok = hi < -g.margin, lo > -g.margin
            verdict = "harm" if harm else "non_inferior" if ok else "inconclusive"
            bound = hi if g.harmful == "increase" else lo       # the bound checked for non-inferiority
            records.append({"metric": g.metric, "variant": variant, "harmful": g.harmful, "margin": g.margin,
                            "estimate": _fin(res.rel_lift), "ci_low": _fin(lo), "ci_high": _fin(hi),
                            "bound": _fin(bound), "alpha": level, "control_mean": _fin(res.control_mean),
                            "treatment_mean": _fin(res.treatment_mean), "users_control": int(c.n),
                            "users_treatment": int(t.n), "p_value": _fin(res.p_value), "verdict": verdict,
                            "error": res.error, "time": now})
            if harm:
                harms.append(f"{g.metric} ({variant}) {'+' if g.harmful == 'increase' else ''}"
                             f"{res.rel_lift:.2%}, always-valid CI [{lo:.2%}, {hi:.2%}] beyond margin "
                             f"{g.margin:.2%}")
            elif not ok:
                unproven.append(f"{g.metric} ({variant}) not yet non-inferior: CI [{_pct(lo)}, {_pct(hi)}] vs "
                                f"margin {g.margin:.2%}")
    names = list(evidence.weights)
    srm = S.srm_chi2([evidence.users.get(v, 0) for v in names], [evidence.weights[v] for v in names])
    records.append({"metric": "srm", "estimate": srm, "bound": config.srm_p,
                    "users": {v: int(evidence.users.get(v, 0)) for v in names}, "time": now})
    if harms:
        new = dataclasses.replace(state, status="stopped")
        return Decision("stop", tuple(harms), tuple(records), new, state, now)
    step = config.steps[state.step]
    reasons = []
    minutes = (now - state.step_started_at) / 60.0
    users = int(sum(evidence.users.values()))
    if minutes < step.min_minutes:
        reasons.append(f"step {state.step + 1} has run {minutes:.1f} of {step.min_minutes:g} minutes")
    if users < step.min_users:
        reasons.append(f"{users} of {step.min_users} users")
    if srm < config.srm_p:
        reasons.append(f"SRM p={srm:.2g} < {config.srm_p:g}: assignment or logging is broken")
    reasons.extend(unproven)
    if reasons:
        return Decision("hold", tuple(reasons), tuple(records), state, state, now)
    lo = state.range[0]
    if state.step + 1 >= len(config.steps):
        new = dataclasses.replace(state, status="completed")
        return Decision("complete", (f"last step ({step.share:.0%} of the layer) passed its guardrails",),
                        tuple(records), new, state, now)
    nxt = config.steps[state.step + 1]
    new = dataclasses.replace(state, step=state.step + 1, range=(lo, lo + nxt.share), step_started_at=now)
    return Decision("advance", (f"step {state.step + 1} passed: {step.share:.0%} -> {nxt.share:.0%} of the layer",),
                    tuple(records), new, state, now)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2%}"


# ---------------------------------------------------------------- from exposure and event tables


def _numeric_ts(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.astype("datetime64[ns]").to_numpy().view("i8") / 1e9
    return s.to_numpy(dtype=np.float64)


def evidence_from_tables(config: ControlConfig, exposures: pd.DataFrame, events: pd.DataFrame,
                         now: float) -> Evidence:
    """Per-user guardrail metrics after each user's first exposure to the experiment, reduced to per-
    arm sufficient statistics (mean metrics: ``SampleStats``; ratio metrics: ``RatioStats``). Users
    seen in two variants are dropped, as in :func:`experiments.analysis.analyze`."""
    from .analysis import normalize_metrics

    exp = config.exp
    mdefs = normalize_metrics({g.metric: dict(config.experiments.metrics[g.metric]) for g in config.guardrails})
    ex = exposures[exposures["experiment"] == exp.name]
    ex = ex.assign(_ts=_numeric_ts(ex["ts"]))
    ex = ex[ex["_ts"] <= now]
    first = ex.sort_values("_ts", kind="stable").groupby("user_id", sort=False).agg(
        variant=("variant", "first"), nvar=("variant", "nunique"), t0=("_ts", "first"))
    first = first[first["nvar"] == 1]
    variants = [v.name for v in exp.variants]
    users = {v: int((first["variant"] == v).sum()) for v in variants}
    ev = events[events["user_id"].isin(first.index)]
    ev = ev.assign(_ts=_numeric_ts(ev["ts"]))
    ev = ev[(ev["_ts"] <= now)].drop_duplicates("event_id")
    ev = ev[ev["_ts"].to_numpy() >= first["t0"].reindex(ev["user_id"]).to_numpy()]

    def per_user(ref):
        event, agg = ref
        sel = ev[ev["type"] == event]
        if agg == "sum":
            s = sel.groupby("user_id")["value"].sum()
        else:
            s = sel.groupby("user_id").size()
        return s.reindex(first.index, fill_value=0).astype(float)

    arms = {}
    for g in config.guardrails:
        md = mdefs[g.metric]
        x = per_user(md["x"])
        y = per_user(md["y"]) if md["y"] else None
        stats = {}
        for v in variants:
            mask = (first["variant"] == v).to_numpy()
            xv = x.to_numpy()[mask]
            if y is None:
                stats[v] = S.SampleStats.from_values(xv)
            else:
                yv = y.to_numpy()[mask]
                stats[v] = S.RatioStats(int(mask.sum()), float(xv.sum()), float(xv @ xv), float(yv.sum()),
                                        float(yv @ yv), float(xv @ yv))
        for v in variants:
            if v != exp.control:
                arms[(v, g.metric)] = (stats[exp.control], stats[v])
    return Evidence(float(now), users, dict(exp.weights), exp.control, arms)


# ---------------------------------------------------------------- state file, log, scorer config


def state_file(config: ControlConfig) -> Path:
    """Where the controller writes, and the scorer reads, the ramp's state (relative to the working dir)."""
    return Path(config.state_path or f"runs/control/{config.experiment}.state.json")


def log_file(config: ControlConfig) -> Path:
    """The ramp's decision log (JSON lines), which the dashboard shows as a timeline."""
    return Path(config.log_path or f"runs/control/{config.experiment}.decisions.jsonl")


def read_state(path: str | Path) -> State | None:
    p = Path(path)
    if not p.exists():
        return None
    return State.from_dict(json.loads(p.read_text(encoding="utf-8")))


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_once(config: ControlConfig, exposures: pd.DataFrame, events: pd.DataFrame, now: float | None = None,
             state_path: str | Path | None = None, log_path: str | Path | None = None) -> Decision:
    """One controller step: read the state (or start the ramp), decide, write the new state
    atomically and append the decision to the JSONL log."""
    now = time.time() if now is None else float(now)
    state_path = Path(state_path) if state_path else state_file(config)
    log_path = Path(log_path) if log_path else log_file(config)
    state = read_state(state_path) or initial_state(config, now)
    decision = decide(config, state, evidence_from_tables(config, exposures, events, now))
    _write_json_atomic(state_path, decision.state.to_dict())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(decision.to_dict()) + "\n")
    return decision


def apply_state(experiments: ExperimentsConfig, state: State) -> ExperimentsConfig:
    """The experiments config the scorer should serve: the experiment's range from the state; a
    stopped experiment sends everyone to control (``status: stopped`` when control is the base
    strategy, else control weight 1)."""
    layers = []
    for layer in experiments.layers:
        exps = []
        for e in layer.experiments:
            if e.name == state.experiment:
                e = dataclasses.replace(e, range=tuple(state.range))
                if state.status == "stopped":
                    ctl = e.variant(e.control)
                    if not ctl.overrides and ctl.model is None:
                        e = dataclasses.replace(e, status="stopped")
                    else:
                        e = dataclasses.replace(e, variants=tuple(
                            dataclasses.replace(v, weight=1.0 if v.name == e.control else 0.0) for v in e.variants))
            exps.append(e)
        layers.append(dataclasses.replace(layer, experiments=tuple(exps)))
    return dataclasses.replace(experiments, layers=tuple(layers))


def served_experiments(experiments: ExperimentsConfig, ramps: Sequence[ControlConfig],
                       now: float | None = None) -> ExperimentsConfig:
    """What the scorer serves under guarded ramps: each ramped experiment with the range (and stop)
    of its controller state file, or the ramp's first step while the controller has not run yet.

    Raises ``ValueError`` naming the state file when it is unreadable, belongs to another
    experiment, or holds a range the layer cannot take; the scorer then keeps what it served."""
    now = time.time() if now is None else float(now)
    for ramp in ramps:
        path = state_file(ramp)
        try:
            state = read_state(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable ramp state ({type(exc).__name__}: {exc})") from exc
        exp = next((e for e in experiments.experiments if e.name == ramp.experiment), None)
        if exp is None:
            raise ValueError(f"{ramp.source}: experiment '{ramp.experiment}' is not in the served experiments "
                             f"({', '.join(e.name for e in experiments.experiments)})")
        if state is None:
            state = initial_state(ramp, now, lo=exp.range[0])
        if state.experiment != ramp.experiment:
            raise ValueError(f"{path}: state of experiment '{state.experiment}', expected '{ramp.experiment}'")
        lo, hi = state.range
        if state.status not in ("running", "stopped", "completed") or not (
                abs(lo - exp.range[0]) < 1e-12 and lo < hi <= _max_hi(experiments, exp) + 1e-12):
            raise ValueError(f"{path}: status '{state.status}' range [{lo:g}, {hi:g}) is not servable: the range must "
                             f"start at {exp.range[0]:g} and end by {_max_hi(experiments, exp):g} "
                             f"(status running, stopped or completed)")
        experiments = apply_state(experiments, state)
    return experiments


# ---------------------------------------------------------------- closed-loop simulation (cheap)


@dataclass
class RampRun:
    stopped_at: int | None          # requests served by the experiment when it stopped (None: never)
    total_requests: int
    decisions: list = field(default_factory=list)
    final: State | None = None


@lru_cache(maxsize=8)
def _user_hashes(salt: str, n_users: int) -> np.ndarray:
    """``unit_hash(salt, "u<k>")`` of users 0..n-1 (read-only; simulations of one set-up reuse it)."""
    from .assignment import unit_hash

    out = np.array([unit_hash(salt, f"u{k}") for k in range(n_users)])
    out.flags.writeable = False
    return out


def simulate_ramp(config: ControlConfig, rates: Mapping[str, np.ndarray], metrics: Sequence[str],
                  n_users: int, max_requests: int, check_every: int, rng: np.random.Generator,
                  seconds_per_request: float = 1.0, salt: str = "sim", activity: np.ndarray | None = None) -> RampRun:
    """Run the controller against per-user outcome draws from known rates (fast, vectorised).

    ``rates[variant]`` is ``(n_contexts, len(metrics))``: expected outcomes of one request in each of
    a pool of request contexts (e.g. :func:`experiments.ope.true_value` of the variant's strategy);
    a request draws a context uniformly and Poisson outcomes. Users keep their layer position and
    variant (hash-based, as in ``experiments.assignment``) while the range grows.
    """
    exp = config.exp
    variants = [v.name for v in exp.variants]
    cum = np.cumsum([v.weight for v in exp.variants])
    pos = _user_hashes(salt, n_users)
    vh = _user_hashes(f"{salt}:{exp.name}", n_users)
    var_of = np.minimum(np.searchsorted(cum, vh, side="right"), len(variants) - 1)
    p_user = None if activity is None else activity / activity.sum()
    state = initial_state(config, 0.0)
    sums = np.zeros((n_users, len(metrics)))
    seen = np.zeros(n_users, dtype=bool)
    served = 0
    run = RampRun(None, 0)
    t = 0.0
    mi = {m: j for j, m in enumerate(metrics)}
    for start in range(0, max_requests, check_every):
        n = min(check_every, max_requests - start)
        u = rng.choice(n_users, n, p=p_user)
        lo, hi = state.range
        inside = (pos[u] >= lo) & (pos[u] < hi)
        u = u[inside]
        served += len(u)
        for j, v in enumerate(variants):
            uv = u[var_of[u] == j]
            if len(uv):
                R = rates[v]
                ctx = rng.integers(0, len(R), len(uv))
                np.add.at(sums, uv, rng.poisson(R[ctx]))
        seen[u] = True
        t += n * seconds_per_request
        users = {v: int((seen & (var_of == j)).sum()) for j, v in enumerate(variants)}
        arms = {}
        stats = {}
        for j, v in enumerate(variants):
            mask = seen & (var_of == j)
            stats[v] = {g.metric: S.SampleStats.from_values(sums[mask, mi[g.metric]]) for g in config.guardrails}
        for v in variants:
            if v != exp.control:
                for g in config.guardrails:
                    arms[(v, g.metric)] = (stats[exp.control][g.metric], stats[v][g.metric])
        d = decide(config, state, Evidence(t, users, dict(exp.weights), exp.control, arms))
        run.decisions.append(d)
        state = d.state
        if d.action == "stop":
            run.stopped_at = served
            break
        if d.action == "complete":
            break
    run.total_requests = served
    run.final = state
    return run
