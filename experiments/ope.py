"""Off-policy estimation (OPE) of a candidate strategy from logged slates: IPS and SNIPS with CIs.

A slate served by :func:`strategy.rank` with ``exploration.epsilon = ε`` is filled slot by slot:
with probability ``1 - ε`` the slot takes the best remaining candidate of the strategy's
*preference order* (blend score, guardrails, priors), otherwise a uniformly drawn remaining one.
Each served item carries ``propensity``, the probability of that pick *given the items already
placed above it*.

Estimator (item-position model, Li et al. 2018 "Offline evaluation of ranking policies with click
models"; a per-slot, position-based IPS). Let ``r_{n,t}`` be the reward (likes, clicks, ...) of the
item shown in slot ``t`` of logged request ``n``, ``a_{n,t}`` that item, ``μ(i, t | x)`` the
logging policy's *marginal* probability of putting item ``i`` in slot ``t`` of request ``x`` and
``π(i, t | x)`` the target's::

    w_{n,t} = π(a_{n,t}, t | x_n) / μ(a_{n,t}, t | x_n)
    IPS     V = 1/N Σ_n Σ_t w_{n,t} r_{n,t}                       (per-request contribution y_n = Σ_t w r)
    SNIPS   V = Σ_t (Σ_n w_{n,t} r_{n,t}) / (Σ_n w_{n,t})         (per slot; E_μ[w_{n,t}] = 1)

Confidence intervals: CLT on per-request contributions (IPS: ``se = sd(y_n)/√N``; SNIPS: the
delta-method influence ``ψ_n = Σ_t w_{n,t} (r_{n,t} - V_t) / w̄_t``), normal quantile.

Assumptions (when the estimate is unbiased):

* the reward of an item depends only on the request, the item and its slot (a position-based
  model: no interactions between items of a slate) — true of :class:`world.World`;
* support: ``μ(i, t) > 0`` wherever ``π(i, t) > 0``: the logging policy explores (ε > 0) and
  does not drop (guardrail) an item the target would show; the estimate reports ``support``,
  the share of the target's slot mass the logging policy could show (1.0 = full support);
* the marginals are exact: :func:`slot_marginals` computes them for an ε-greedy fill over a fixed
  preference order of ``m`` eligible candidates (dynamic programming, no sampling). Source quotas
  and diversity windows change the eligible set slot by slot; then the marginals of the greedy
  *sequence* are an approximation (``exact = False`` in the estimate).

``propensity="logged"`` is the simpler estimator that uses the logged (conditional) propensities as
``μ`` and ``(1 - ε) 1[a_t = target's greedy item t] + ε / n_t`` as ``π``; it needs no replay of the
logging policy but is biased once an exploration pick has shifted the rest of a slate (reported for
comparison only).

The world knows the truth: :func:`true_value` is the exact expected reward of a strategy on a
request (its marginals times the world's true probabilities).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st

from strategy import Request, Strategy, parse_request, rank

__all__ = ["LoggedSlate", "OPEEstimate", "slot_marginals", "preference_order", "estimate", "true_value",
           "log_requests", "make_contexts", "estimate_metrics", "true_policy_value", "true_values", "slot_weights", "reward_vector", "METHODS", "PROPENSITIES"]

METHODS = ("ips", "snips")
PROPENSITIES = ("marginal", "logged")
WORLD_REWARDS = ("click", "like", "share", "report", "watch")


@dataclass(frozen=True)
class LoggedSlate:
    """One logged request: what the ranker saw, what it served, and what the user did.

    ``predictions`` is ``(N, K)`` in ``objective_names`` order (the serving model's output for every
    candidate); ``slate``/``propensities`` as served; ``rewards`` maps an outcome (``like``, ...) to a
    per-slot array of length ``len(slate)`` (counts, or seconds for ``watch``).
    """

    request: Request
    predictions: np.ndarray
    objective_names: tuple[str, ...]
    slate: tuple[str, ...]
    propensities: tuple[float, ...]
    rewards: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class OPEEstimate:
    """An off-policy estimate of a target strategy's expected reward per request."""

    value: float
    ci_low: float
    ci_high: float
    se: float
    n: int
    method: str
    propensity: str
    support: float          # mean share of the target's slot mass the logging policy can show
    ess: float              # effective sample size of the slot weights, (Σw)²/Σw², averaged over slots
    exact: bool             # False when quotas/diversity make the marginals approximate
    metric: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "method": self.method, "propensity": self.propensity,
                "value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "se": self.se,
                "n": self.n, "support": self.support, "ess": self.ess, "exact": self.exact}


# ---------------------------------------------------------------- marginals of an epsilon-greedy fill


@functools.lru_cache(maxsize=4096)
def _marginals_cached(m: int, S: int, eps: float) -> np.ndarray:
    P = np.zeros((m, S))
    if m == 0 or S == 0:
        return P
    # state (c, s): items 0..c-1 of the order all taken, item c free, s taken among items c+1..m-1
    states = {(0, 0): 1.0}
    for t in range(S):
        left = m - t                       # free items at slot t
        nxt: dict = {}
        for (c, s), pr in states.items():
            L = m - c - 1
            p_greedy = (1.0 - eps) + eps / left
            P[c, t] += pr * p_greedy
            if L > 0 and left > 1:
                # each other free item: eps / left times P(item free) = 1 - s / L
                P[c + 1:, t] += pr * (eps / left) * (1.0 - s / L)
                key = (c, s + 1)
                nxt[key] = nxt.get(key, 0.0) + pr * eps * (left - 1) / left
            # greedy: take item c; the prefix then extends over the run of taken items after it
            # (given (c, s) the taken set beyond c is a uniform s-subset of the L positions)
            if L == 0 or s == L:
                continue
            total = math.comb(L, s)
            for j in range(0, s + 1):
                ways = math.comb(L - 1 - j, s - j) if L - 1 - j >= s - j else 0
                if ways:
                    key = (c + 1 + j, s - j)
                    nxt[key] = nxt.get(key, 0.0) + pr * p_greedy * ways / total
        states = nxt
    P.setflags(write=False)
    return P


def slot_marginals(m: int, slate_size: int, epsilon: float) -> np.ndarray:
    """``(m, S)`` matrix: probability that the item ranked ``r`` (0-based) in the preference order
    lands in slot ``t`` (0-based) of an ε-greedy fill of ``S = min(slate_size, m)`` slots.

    Exact for a fill without quotas/diversity (each slot: best free item with prob ``1 - ε``, else a
    uniform free item). Columns sum to 1; rows sum to P(item shown).
    """
    if m < 0 or slate_size < 0 or not 0 <= epsilon < 1:
        raise ValueError("need m >= 0, slate_size >= 0 and 0 <= epsilon < 1")
    return _marginals_cached(int(m), int(min(slate_size, m)), round(float(epsilon), 12))


_GREEDY: dict = {}


def _entry(strategy: Strategy) -> tuple:
    """``(strategy, its epsilon-0 twin, a content fingerprint)``, memoised per strategy object."""
    key = id(strategy)
    hit = _GREEDY.get(key)
    if hit is None or hit[0] is not strategy:
        g = strategy if strategy.epsilon == 0 else strategy.with_overrides({"exploration.epsilon": 0.0})
        fp = json.dumps(strategy.raw, sort_keys=True, default=str)
        if len(_GREEDY) > 256:
            _GREEDY.clear()
        _GREEDY[key] = hit = (strategy, g, fp)
    return hit


def _greedy(strategy: Strategy) -> Strategy:
    return _entry(strategy)[1]


def _align(strategy: Strategy, predictions: np.ndarray, names: Sequence[str]) -> np.ndarray:
    names = list(names)
    missing = [o for o in strategy.objective_names if o not in names]
    if missing:
        raise ValueError(f"strategy {strategy.name} needs predictions of {missing}; the log has {names}")
    return np.asarray(predictions, dtype=np.float64)[:, [names.index(o) for o in strategy.objective_names]]


def preference_order(strategy: Strategy, request: Request, predictions: np.ndarray,
                     names: Sequence[str] | None = None) -> list[str]:
    """The strategy's greedy slot order over all eligible candidates (item ids, best first); for an
    ``epsilon = 0`` strategy just its slate (no other item can be shown).

    With quotas/diversity the first ``slate_size`` entries are the strategy's greedy slate (so an
    ``epsilon = 0`` strategy is exact), followed by the rest of the full-length greedy fill."""
    P = predictions if names is None else _align(strategy, predictions, names)
    g = _greedy(strategy)
    if strategy.epsilon == 0:   # a greedy strategy shows its slate and nothing else
        return [it.item_id for it in rank(g, request, P).items]
    res = rank(g, request, P, slate_size=max(1, len(request.candidates)))
    order = [it.item_id for it in res.items]
    if _constrained(strategy):
        # quotas depend on the slate size: the real greedy slate first, then the remaining order
        top = [it.item_id for it in rank(g, request, P).items]
        seen = set(top)
        order = top + [i for i in order if i not in seen]
    return order


def _slate_size(strategy: Strategy, request: Request) -> int:
    return int(request.slate_size or strategy.slate_size)


def _constrained(strategy: Strategy) -> bool:
    return bool(strategy.sources) or strategy.diversity is not None


_TABLES: dict = {}


_REQUEST_KEYS: dict = {}


def _request_key(request: Request) -> tuple:
    """What of a request the greedy order depends on (not its id); computed once per request object
    (estimates of several targets on the same logs ask again and again)."""
    hit = _REQUEST_KEYS.get(id(request))
    if hit is not None and hit[0] is request:
        return hit[1]
    key = (request.user_id, request.slate_size,
           tuple((c.item_id, c.source, c.impressions) for c in request.candidates))
    if len(_REQUEST_KEYS) > 50_000:
        _REQUEST_KEYS.clear()
    _REQUEST_KEYS[id(request)] = (request, key)   # the request is held, so its id is not reused
    return key


def _policy_table(strategy: Strategy, request: Request, P: np.ndarray) -> tuple[dict, np.ndarray, list[str]]:
    """``(rank of item, marginals, order)``; cached on the strategy and the request's content (the
    greedy order does not depend on the request id), so re-estimating the same logs is cheap."""
    key = (_entry(strategy)[2], _request_key(request), P.tobytes())
    hit = _TABLES.get(key)
    if hit is None:
        order = preference_order(strategy, request, P)
        M = slot_marginals(len(order), _slate_size(strategy, request), strategy.epsilon)
        if len(_TABLES) > 50_000:
            _TABLES.clear()
        _TABLES[key] = hit = ({item: r for r, item in enumerate(order)}, M, order)
    return hit


# ---------------------------------------------------------------- rewards


def reward_vector(logged: LoggedSlate, metric) -> np.ndarray:
    """Per-slot reward: one outcome (``"like"``) or a weighted sum (``{"like": 1, "share": 2}``)."""
    if isinstance(metric, str):
        return np.asarray(logged.rewards[metric], dtype=np.float64)
    out = np.zeros(len(logged.slate))
    for k, w in metric.items():
        out = out + float(w) * np.asarray(logged.rewards[k], dtype=np.float64)
    return out


def _metric_name(metric) -> str:
    return metric if isinstance(metric, str) else "+".join(f"{w:g}*{k}" for k, w in metric.items())


# ---------------------------------------------------------------- the estimators


def slot_weights(logged: LoggedSlate, logging: Strategy, target: Strategy,
                 propensity: str = "marginal") -> tuple[np.ndarray, float]:
    """``(w, support)``: per-slot importance weights ``π(a_t, t) / μ(a_t, t)`` of one logged slate and
    the share of the target's slot mass on items the logging policy could show."""
    S = len(logged.slate)
    if S == 0:
        return np.zeros(0), 1.0
    P_log = _align(logging, logged.predictions, logged.objective_names)
    P_tgt = _align(target, logged.predictions, logged.objective_names)
    t_rank, t_M, t_order = _policy_table(target, logged.request, P_tgt)
    w = np.zeros(S)
    if propensity == "marginal":
        l_rank, l_M, _ = _policy_table(logging, logged.request, P_log)
        for t, item in enumerate(logged.slate):
            r = l_rank.get(item)
            mu = l_M[r, t] if r is not None and t < l_M.shape[1] else 0.0
            rt = t_rank.get(item)
            pi = t_M[rt, t] if rt is not None and t < t_M.shape[1] else 0.0
            w[t] = pi / mu if mu > 0 else 0.0
        shown = set(l_rank)
        cols = min(t_M.shape[1], l_M.shape[1])
        mass = t_M.sum()
        rows = [r for item, r in t_rank.items() if item in shown]
        ok = t_M[rows, :cols].sum() if rows else 0.0
        support = float(ok / mass) if mass > 0 else 1.0
    elif propensity == "logged":
        eps = target.epsilon
        m = len(t_order)
        for t, item in enumerate(logged.slate):
            mu = float(logged.propensities[t])
            if t >= min(m, _slate_size(target, logged.request)) or item not in t_rank:
                pi = 0.0
            else:
                pi = (1 - eps) * (t_order[t] == item) + eps / (m - t)
            w[t] = pi / mu if mu > 0 else 0.0
        support = 1.0
    else:
        raise ValueError(f"propensity must be one of {', '.join(PROPENSITIES)}, got {propensity!r}")
    return w, support


def estimate(logs: Sequence[LoggedSlate], logging: Strategy, target: Strategy, metric="like",
             method: str = "snips", propensity: str = "marginal", alpha: float = 0.05) -> OPEEstimate:
    """Estimate ``target``'s expected ``metric`` per request from slates ``logging`` served.

    ``metric``: an outcome name or ``{outcome: weight}``. ``method``: ``"ips"`` or ``"snips"``.
    Returns the estimate with a ``1 - alpha`` normal CI over requests (see the module docstring).
    """
    return estimate_metrics(logs, logging, target, [metric], method, propensity, alpha)[0]


def estimate_metrics(logs: Sequence[LoggedSlate], logging: Strategy, target: Strategy, metrics: Sequence,
                     method: str = "snips", propensity: str = "marginal", alpha: float = 0.05) -> list[OPEEstimate]:
    """:func:`estimate` of several metrics from one computation of the importance weights."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    n = len(logs)
    if n < 2:
        raise ValueError("need at least 2 logged requests")
    S = max(len(x.slate) for x in logs)
    W = np.zeros((n, S))
    supports = np.zeros(n)
    for k, lg in enumerate(logs):
        w, sup = slot_weights(lg, logging, target, propensity)
        W[k, :len(w)] = w
        supports[k] = sup
    out = []
    for metric in metrics:
        R = np.zeros((n, S))
        for k, lg in enumerate(logs):
            R[k, :len(lg.slate)] = reward_vector(lg, metric)
        out.append(_estimate_from(W, R, supports, logging, target, metric, method, propensity, alpha))
    return out


def _estimate_from(W, R, supports, logging, target, metric, method, propensity, alpha) -> OPEEstimate:
    n = W.shape[0]
    z = float(_st.norm.ppf(1 - alpha / 2))
    WR = W * R
    if method == "ips":
        y = WR.sum(axis=1)
        value = float(y.mean())
        se = float(y.std(ddof=1) / math.sqrt(n))
    else:
        wbar = W.mean(axis=0)
        safe = np.where(wbar > 0, wbar, 1.0)
        v_t = np.where(wbar > 0, WR.mean(axis=0) / safe, 0.0)
        value = float(v_t.sum())
        psi = ((WR - W * v_t) / safe * (wbar > 0)).sum(axis=1)
        se = float(psi.std(ddof=1) / math.sqrt(n))
    sw, sw2 = W.sum(axis=0), (W ** 2).sum(axis=0)
    ess = float(np.mean(np.where(sw2 > 0, sw ** 2 / np.where(sw2 > 0, sw2, 1), 0.0)))
    return OPEEstimate(value, value - z * se, value + z * se, se, n, method, propensity,
                       float(supports.mean()), ess,
                       propensity == "marginal" and not (_constrained(logging) or _constrained(target)),
                       _metric_name(metric))


# ---------------------------------------------------------------- the simulated world


def _world_key(outcome: str) -> str:
    return "watch" if outcome in ("watch", "watch_time") else outcome


def _predictions(world, user_id: str, item_ids: Sequence[str], strategy: Strategy, noise: float,
                 rng: np.random.Generator | None) -> np.ndarray:
    """Model predictions: the world's true position-1 marginals of each objective's event,
    optionally with multiplicative log-normal noise (a model that is ``noise`` off)."""
    truth = world.true_probs(user_id, list(item_ids), 1)
    cols = []
    for o in strategy.objectives:
        key = _world_key(o.event)
        if key not in truth:
            raise ValueError(f"objective {o.name}: the world has no event {o.event!r} (it has {sorted(truth)})")
        v = np.asarray(truth[key], dtype=np.float64)
        if noise > 0 and rng is not None:
            v = v * np.exp(rng.normal(0.0, noise, v.shape))
            if o.type == "binary":
                v = np.clip(v, 0.0, 1.0)
        cols.append(v)
    return np.column_stack(cols)


def log_requests(world, strategy: Strategy, n_requests: int, rng: np.random.Generator,
                 n_candidates: int | None = None, prediction_noise: float = 0.0, prefix: str = "ope",
                 contexts: Sequence[tuple] | None = None) -> list[LoggedSlate]:
    """Serve ``n_requests`` simulated requests with ``strategy`` and log them (rewards from
    :meth:`World.respond`). ``contexts`` (``[(user_id, candidates, predictions), ...]``) reuses
    fixed requests so that repeated runs differ only in exploration and user responses."""
    n_cand = int(n_candidates or world.config.candidates_per_request)
    out = []
    names = strategy.objective_names
    for k in range(n_requests):
        if contexts is not None:
            uid, base, P = contexts[k % len(contexts)]
        else:
            uid, base, P = make_contexts(world, strategy, 1, rng, n_cand, prediction_noise)[0]
        rid = f"{prefix}-{k}-{int(rng.integers(0, 2**62)):x}"
        request = dataclasses.replace(_as_request(uid, base), request_id=rid)
        res = rank(strategy, request, P)
        slate = tuple(it.item_id for it in res.items)
        events = world.respond(uid, slate, rng, request_id=rid)
        pos = {item: j for j, item in enumerate(slate)}
        rewards = {key: np.zeros(len(slate)) for key in WORLD_REWARDS}
        for ev in events:
            j = pos[ev["item_id"]]
            rewards[ev["type"]][j] += ev["value"] if ev["type"] == "watch" else 1.0
        out.append(LoggedSlate(request, P, names, slate, tuple(it.propensity for it in res.items), rewards))
    return out


def make_contexts(world, strategy: Strategy, n: int, rng: np.random.Generator, n_candidates: int | None = None,
                  prediction_noise: float = 0.0) -> list[tuple]:
    """``n`` fixed ``(user_id, request, predictions)`` request contexts for :func:`log_requests`
    (``request`` is a parsed :class:`Request` without a request id; predictions in the strategy's
    objective order)."""
    cfg = world.config
    n_cand = int(n_candidates or cfg.candidates_per_request)
    act = world.user_activity / world.user_activity.sum()
    out = []
    for _ in range(n):
        uid = str(world.user_ids[rng.choice(cfg.n_users, p=act)])
        cands = world.candidates(uid, n_cand, rng)
        P = _predictions(world, uid, [c["item_id"] for c in cands], strategy, prediction_noise, rng)
        out.append((uid, parse_request({"user_id": uid, "candidates": cands}), P))
    return out


def _as_request(user_id: str, request_or_candidates) -> Request:
    if isinstance(request_or_candidates, Request):
        return request_or_candidates
    return parse_request({"user_id": user_id, "candidates": list(request_or_candidates)})


def true_value(world, strategy: Strategy, logged_or_context, metric="like",
               names: Sequence[str] | None = None) -> float:
    """Exact expected ``metric`` of one request under ``strategy`` (its exploration included):
    ``Σ_t Σ_r M[r, t] · truth(item_r, slot t)`` with the world's true marginals.

    ``logged_or_context``: a :class:`LoggedSlate` or a ``(user_id, request or candidates, predictions)`` tuple
    (then ``names`` are the prediction columns, default the strategy's objectives).
    """
    weights = {metric: 1.0} if isinstance(metric, str) else dict(metric)
    values = true_values(world, strategy, logged_or_context, list(weights), names)
    return float(sum(w * v for w, v in zip(weights.values(), values)))


def true_values(world, strategy: Strategy, context, metrics: Sequence[str],
                names: Sequence[str] | None = None) -> np.ndarray:
    """:func:`true_value` of several outcomes at once (one ranking, one truth lookup)."""
    if isinstance(context, LoggedSlate):
        request, P, names = context.request, context.predictions, context.objective_names
    else:
        uid, cands, P = context
        request = _as_request(uid, cands)
        names = names or strategy.objective_names
    _, M, order = _policy_table(strategy, request, _align(strategy, P, names))
    if not order:
        return np.zeros(len(metrics))
    S = M.shape[1]
    truth = world.true_probs(request.user_id, np.array(order)[:, None], np.arange(1, S + 1)[None, :])
    return np.array([float((M * truth[_world_key(m)].reshape(len(order), S)).sum()) for m in metrics])


def true_policy_value(world, strategy: Strategy, contexts: Sequence, metric="like",
                      names: Sequence[str] | None = None) -> float:
    """Mean of :func:`true_value` over request contexts (or logged slates)."""
    return float(np.mean([true_value(world, strategy, c, metric, names) for c in contexts]))
