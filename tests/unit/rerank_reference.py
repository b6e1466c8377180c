"""A verbatim copy of ``strategy/rerank.py`` as it was before its fast implementation (commit 9d95a60),
kept as the oracle the fast one is proven bit-identical against (tests/unit/test_rerank_fast.py).
Only the imports differ (absolute instead of relative). Never edit it to follow the new code.

The original docstring: from candidates and per-objective predictions to a slate, rule by rule.

The rules run in this fixed order (each one's name appears in ``reasons`` / ``dropped``):

1. ``duplicate`` — dedupe by ``item_id``, the first occurrence wins.
2. ``blend`` — calibrate, transform and blend predictions into one score (``strategy.blend``).
3. ``llm_prior`` — a candidate with ``generator.prior_score`` from a source with ``prior_weight``
   k > 0 and n observed impressions (``features.impressions``) scores
   ``(k * q + n * s) / (k + n)``: s is its blended score and q the ``prior_score`` quantile of
   this request's blended scores (the generator's belief of where it stands among them).
4. ``guardrail`` — a calibrated prediction outside [min, max] drops the candidate, or demotes it
   below every non-demoted one.
5. Slate filling, slot by slot, taking the best remaining candidate that satisfies
   - ``quota``: per source at most ``floor(max_share * S)`` items, and ``min_slots`` reserved
     while the source has candidates left (S = min(slate_size, candidates left));
   - ``diversity``: at most ``max_per_window`` items with the same key in any ``window``
     consecutive slots (``method: window``, relaxed only when no candidate fits), or
     maximal marginal relevance (``method: mmr``) with weight ``lambda`` on the score;
   - ``exploration``: with probability epsilon the slot goes to a uniformly drawn eligible
     candidate instead. The generator is seeded by the strategy name and request id, so the
     same request always gets the same slate; each item carries the ``propensity`` with
     which this policy put it in its slot (for off-policy evaluation).
6. ``slate_size`` — the request's ``slate_size`` or the strategy's.

An item in the slate lists every rule that moved it (``score`` when none did). Candidates that
quotas kept out of a slate that could not be filled are listed in ``dropped``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from strategy.blend import blend_utilities, calibrate, utilities
from strategy.config import Strategy
from strategy.errors import Errors
from strategy.schema import Request


@dataclass
class RankedItem:
    item_id: str
    rank: int
    score: float
    source: str
    predictions: dict
    reasons: list[str]
    propensity: float = 1.0

    def to_dict(self) -> dict:
        return {
            "item_id": self.item_id,
            "rank": self.rank,
            "score": self.score,
            "source": self.source,
            "predictions": self.predictions,
            "reasons": self.reasons,
            "propensity": self.propensity,
        }


@dataclass
class DroppedItem:
    item_id: str
    reason: str

    def to_dict(self) -> dict:
        return {"item_id": self.item_id, "reason": self.reason}


@dataclass
class RankResult:
    request_id: str
    strategy: str
    items: list[RankedItem] = field(default_factory=list)
    dropped: list[DroppedItem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "strategy": self.strategy,
            "items": [i.to_dict() for i in self.items],
            "dropped": [d.to_dict() for d in self.dropped],
        }


def prediction_matrix(strategy: Strategy, request: Request) -> np.ndarray:
    """``(N, K)`` predictions carried by the candidates themselves (the dry-run input)."""
    errs = Errors()
    names = strategy.objective_names
    binary = {o.name for o in strategy.objectives if o.type == "binary"}
    out = np.zeros((len(request.candidates), len(names)))
    for i, cand in enumerate(request.candidates):
        preds = cand.predictions
        if preds is None:
            errs.add(f"candidates[{i}].predictions", f"required: one value per objective ({', '.join(names)})", "required")
            continue
        for k, name in enumerate(names):
            value = preds.get(name)
            path = f"candidates[{i}].predictions.{name}"
            if value is None:
                errs.add(path, "required", "required")
            elif name in binary and not 0.0 <= value <= 1.0:
                errs.add(path, f"{value} is out of range [0, 1] for a binary objective", "range")
            else:
                out[i, k] = value
    errs.raise_if_any()
    return out


def rank(
    strategy: Strategy,
    request: Request,
    predictions: np.ndarray | None = None,
    slate_size: int | None = None,
) -> RankResult:
    """Rank ``request.candidates``; ``predictions`` is ``(N, K)`` in objective order.

    Without ``predictions`` the candidates' own ``predictions`` are used (dry run).
    """
    cands = request.candidates
    P = prediction_matrix(strategy, request) if predictions is None else np.asarray(predictions, np.float64)
    if P.shape != (len(cands), len(strategy.objectives)):
        raise ValueError(f"predictions must be ({len(cands)}, {len(strategy.objectives)}), got {P.shape}")
    request_id = request.stable_id()
    result = RankResult(request_id, strategy.name)

    keep, seen = [], set()
    for i, cand in enumerate(cands):
        if cand.item_id in seen:
            result.dropped.append(DroppedItem(cand.item_id, "duplicate"))
        else:
            seen.add(cand.item_id)
            keep.append(i)
    kept = [cands[i] for i in keep]
    n = len(kept)
    if n == 0:
        return result
    reasons: dict[int, list[str]] = {}

    calibrated = calibrate(strategy, P[keep])
    scores = blend_utilities(strategy, utilities(strategy, calibrated))
    _apply_priors(strategy, kept, scores, reasons)

    alive = np.ones(n, dtype=bool)
    demoted = np.zeros(n, dtype=bool)
    names = strategy.objective_names
    for g in strategy.guardrails:
        col = calibrated[:, names.index(g.objective)]
        bad = np.zeros(n, dtype=bool)
        if g.max is not None:
            bad |= col > g.max
        if g.min is not None:
            bad |= col < g.min
        bad &= alive
        for j in np.flatnonzero(bad):
            if g.action == "drop":
                result.dropped.append(DroppedItem(kept[j].item_id, f"guardrail:{g.describe()}"))
            else:
                reasons.setdefault(j, []).append(f"guardrail:demote({g.describe()})")
        if g.action == "drop":
            alive &= ~bad
        else:
            demoted |= bad

    size = slate_size or request.slate_size or strategy.slate_size
    rng = None
    if strategy.epsilon > 0:
        seed = hashlib.sha256(f"{strategy.name}|{request_id}".encode()).digest()[:8]
        rng = np.random.default_rng(int.from_bytes(seed, "little"))
    picks, props, leftover = _fill_slate(strategy, kept, scores, demoted, alive, size, reasons, rng)

    for rank_pos, (j, prop) in enumerate(zip(picks, props), start=1):
        cand = kept[j]
        result.items.append(RankedItem(
            cand.item_id, rank_pos, float(scores[j]), cand.source,
            {name: float(calibrated[j, k]) for k, name in enumerate(names)},
            reasons.get(j) or ["score"], float(prop),
        ))
    for j, why in leftover:
        result.dropped.append(DroppedItem(kept[j].item_id, why))
    return result


def _apply_priors(strategy: Strategy, kept, scores: np.ndarray, reasons: dict) -> None:
    """Shrink generator-scored candidates towards their prior quantile (rule 3), in place."""
    idx, priors, weights, seen = [], [], [], []
    for j, cand in enumerate(kept):
        rule = strategy.sources.get(cand.source)
        if rule is not None and rule.prior_weight > 0 and cand.generator is not None:
            idx.append(j)
            priors.append(cand.generator.prior_score)
            weights.append(rule.prior_weight)
            seen.append(cand.impressions)
    if not idx:
        return
    k, nobs = np.array(weights), np.maximum(np.array(seen), 0.0)
    q = np.quantile(scores, np.array(priors))
    scores[idx] = (k * q + nobs * scores[idx]) / (k + nobs)
    for j, kk, nn in zip(idx, k, nobs):
        reasons.setdefault(j, []).append(f"llm_prior(k={kk:g},n={nn:g})")


def _codes(values) -> np.ndarray:
    """Integer codes of hashable values; ``None`` gets a code of its own each time."""
    table: dict = {}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        out[i] = table.setdefault(v, len(table)) if v is not None else -1 - i
    # missing keys never collide with each other nor with real keys
    missing = out < 0
    out[missing] = len(table) + np.arange(int(missing.sum()))
    return out


def _fill_slate(strategy, kept, scores, demoted, alive, size, reasons, rng):
    """Slot-by-slot greedy fill under quotas, diversity and exploration (rule 5).

    Works on arrays permuted into preference order (non-demoted first, then by score), so the
    best eligible candidate of a slot is the first True of a boolean mask.
    """
    cand_idx = np.flatnonzero(alive)
    order = cand_idx[np.lexsort((cand_idx, -scores[cand_idx], demoted[cand_idx]))]
    m = len(order)
    S = min(size, m)
    if S == 0:
        return [], [], []
    src_names = sorted({kept[j].source for j in order})
    src_code = {s: c for c, s in enumerate(src_names)}
    src = np.array([src_code[kept[j].source] for j in order], dtype=np.int64)
    caps = np.full(len(src_names), S, dtype=np.int64)
    need = np.zeros(len(src_names), dtype=np.int64)
    avail = np.bincount(src, minlength=len(src_names))
    for s, c in src_code.items():
        rule = strategy.sources.get(s)
        if rule is not None:
            caps[c] = math.floor(rule.max_share * S + 1e-9)
            need[c] = min(rule.min_slots, avail[c], caps[c])
    counts = np.zeros(len(src_names), dtype=np.int64)

    div = strategy.diversity
    key = None
    if div is not None:
        key = _codes([getattr(kept[j], div.key) for j in order])
        key_count = np.zeros(int(key.max()) + 1, dtype=np.int64)
        if div.method == "mmr":
            s = scores[order]
            span = float(s.max() - s.min()) or 1.0
            relevance = (s - s.min()) / span - 2.0 * demoted[order]

    remaining = np.ones(m, dtype=bool)
    picks, props, history = [], [], []
    eps = strategy.epsilon
    for t in range(S):
        open_src = counts < caps
        short = np.maximum(need - counts, 0)
        reserved = short.sum() >= S - t
        if reserved:
            open_src &= short > 0
        quota_ok = remaining & open_src[src]
        if not quota_ok.any():
            break
        relaxed = False
        if key is not None and div.method == "window":
            ok = quota_ok & (key_count[key] < div.max_per_window)
            if not ok.any():
                ok, relaxed = quota_ok, True
            greedy = int(np.argmax(ok))
        elif key is not None:  # mmr: relevance minus similarity to what the slate already holds
            ok = quota_ok
            mmr = div.mmr_lambda * relevance - (1 - div.mmr_lambda) * (key_count[key] > 0)
            greedy = int(np.argmax(np.where(ok, mmr, -np.inf)))
        else:
            ok = quota_ok
            greedy = int(np.argmax(ok))

        pick, prop, explore = greedy, 1.0, False
        if rng is not None:
            eligible = np.flatnonzero(ok)
            explore = rng.random() < eps
            if explore:
                pick = int(eligible[rng.integers(len(eligible))])
                _note(reasons, order[pick], "exploration")
            prop = (1 - eps) * (pick == greedy) + eps / len(eligible)
        if not explore:
            _explain_skips(reasons, order, remaining, quota_ok, ok, pick, src, src_names, reserved, div)
        if relaxed:
            _note(reasons, order[pick], f"diversity:relaxed({div.key})")
        if reserved and (remaining[:pick] & ~open_src[src[:pick]]).any():
            _note(reasons, order[pick], f"quota:min_slots({src_names[src[pick]]})")

        remaining[pick] = False
        picks.append(int(order[pick]))
        props.append(prop)
        counts[src[pick]] += 1
        if key is not None:
            key_count[key[pick]] += 1
            history.append(int(key[pick]))
            if div.method == "window" and len(history) >= div.window:
                key_count[history[-div.window]] -= 1

    leftover = []
    if len(picks) < S:
        for p in np.flatnonzero(remaining):
            leftover.append((int(order[p]), f"quota:{src_names[src[p]]}.max_share"))
    return picks, props, leftover


def _note(reasons: dict, j, text: str) -> None:
    bucket = reasons.setdefault(int(j), [])
    if text not in bucket:
        bucket.append(text)


def _explain_skips(reasons, order, remaining, quota_ok, ok, pick, src, src_names, reserved, div):
    """Record why better-ranked candidates ahead of ``pick`` were passed over in this slot."""
    ahead = np.flatnonzero(remaining[:pick])
    for p in ahead:
        if not quota_ok[p]:
            name = src_names[src[p]]
            why = "min_slots_reserved" if reserved else "max_share"
            _note(reasons, order[p], f"quota:{name}.{why}")
        elif not ok[p] and div is not None:
            _note(reasons, order[p], f"diversity:{div.key}")
        elif div is not None and div.method == "mmr":
            _note(reasons, order[p], f"diversity:mmr({div.key})")
