"""From candidates and per-objective predictions to a slate, rule by rule.

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
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from operator import attrgetter, is_not

import numpy as np

from .blend import blend_utilities, calibrate, utilities
from .config import Strategy
from .errors import Errors
from .schema import Request


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

    ids = list(map(_ITEM_ID, cands))
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1)))   # item_id -> its first position
    if len(first) == len(ids):   # no duplicate: every candidate is kept
        keep, kept = np.arange(len(ids)), list(cands)
    else:
        firsts = np.zeros(len(ids), dtype=bool)
        firsts[list(first.values())] = True
        keep = np.flatnonzero(firsts)
        result.dropped += [DroppedItem(ids[i], "duplicate") for i in np.flatnonzero(~firsts).tolist()]
        kept = list(map(cands.__getitem__, keep.tolist()))
    srcs = list(map(_SOURCE, kept))
    n = len(kept)
    if n == 0:
        return result
    reasons: dict[int, list[str]] = {}

    calibrated = calibrate(strategy, P[keep])
    scores = blend_utilities(strategy, utilities(strategy, calibrated))
    priors = _apply_priors(strategy, kept, srcs, scores)

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
        if bad.any():
            if g.action == "drop":
                why = f"guardrail:{g.describe()}"
                result.dropped += [DroppedItem(kept[j].item_id, why) for j in np.flatnonzero(bad).tolist()]
            else:
                why = f"guardrail:demote({g.describe()})"
                for j in np.flatnonzero(bad).tolist():
                    reasons.setdefault(j, []).append(why)
        if g.action == "drop":
            alive &= ~bad
        else:
            demoted |= bad

    size = slate_size or request.slate_size or strategy.slate_size
    rng = None
    if strategy.epsilon > 0:
        seed = hashlib.sha256(f"{strategy.name}|{request_id}".encode()).digest()[:8]
        rng = np.random.default_rng(int.from_bytes(seed, "little"))
    picks, props, leftover = _fill_slate(strategy, kept, srcs, scores, demoted, alive, size, reasons, rng)

    if picks:
        picked_scores = scores[picks].tolist()
        picked_preds = calibrated[picks].tolist()
        for rank_pos, (j, prop, score, row) in enumerate(zip(picks, props, picked_scores, picked_preds), start=1):
            cand = kept[j]
            why = reasons.get(j)
            if j in priors:   # the prior came first (rule 3), before the guardrails' and the slate's reasons
                why = [priors[j]] + (why or [])
            result.items.append(RankedItem(cand.item_id, rank_pos, score, cand.source, dict(zip(names, row)),
                                           why or ["score"], float(prop)))
    for j, why in leftover:
        result.dropped.append(DroppedItem(kept[j].item_id, why))
    return result


_ITEM_ID, _SOURCE, _GENERATOR, _IMPRESSIONS = (attrgetter("item_id"), attrgetter("source"), attrgetter("generator"),
                                               attrgetter("impressions"))


def _apply_priors(strategy: Strategy, kept, srcs: list, scores: np.ndarray) -> dict:
    """Shrink generator-scored candidates towards their prior quantile (rule 3), in place; returns
    ``{j: reason}`` of the candidates it moved (``srcs``: their sources)."""
    weight = {name: rule.prior_weight for name, rule in strategy.sources.items() if rule.prior_weight > 0}
    if not weight:
        return {}
    gens = list(map(_GENERATOR, kept))
    idx = [j for j in compress(range(len(gens)), map(is_not, gens, repeat(None))) if srcs[j] in weight]
    if not idx:
        return {}
    priors = [gens[j].prior_score for j in idx]
    weights = [weight[srcs[j]] for j in idx]
    seen = list(map(_IMPRESSIONS, map(kept.__getitem__, idx)))
    k, nobs = np.array(weights), np.maximum(np.array(seen), 0.0)
    q = np.quantile(scores, np.array(priors))
    scores[idx] = (k * q + nobs * scores[idx]) / (k + nobs)
    return _PriorReasons(idx, k, nobs)


class _PriorReasons(dict):
    """``{j: "llm_prior(k=..,n=..)"}`` of the candidates rule 3 moved, each text made when first read
    (only the slate's items are)."""

    def __init__(self, idx, k, nobs):
        super().__init__(zip(idx, range(len(idx))))
        self._k, self._n = k, nobs

    def __getitem__(self, j):
        i = dict.__getitem__(self, j)
        return f"llm_prior(k={self._k[i]:g},n={self._n[i]:g})"


def _fill_slate(strategy, kept, kept_srcs, scores, demoted, alive, size, reasons, rng):
    """Slot-by-slot greedy fill under quotas, diversity and exploration (rule 5).

    Works on candidates permuted into preference order (non-demoted first, then by score), so the
    best eligible candidate of a slot is the first eligible one in that order. ``method: mmr`` goes
    through :func:`_fill_slate_mmr`; the rest walks the remaining candidates in order and stops at
    the first eligible one, keeping per-source and per-key counts so that how many candidates are
    eligible (the exploration's draw and propensity) needs no pass over them.
    """
    cand_idx = np.flatnonzero(alive)
    order = cand_idx[np.lexsort((cand_idx, -scores[cand_idx], demoted[cand_idx]))]
    m = len(order)
    S = min(size, m)
    if S == 0:
        return [], [], []
    div = strategy.diversity
    if div is not None and div.method == "mmr":
        return _fill_slate_mmr(strategy, kept, scores, demoted, order, S, reasons, rng)
    order = order.tolist()
    chosen = list(map(kept.__getitem__, order))
    srcs = list(map(kept_srcs.__getitem__, order))
    src_names = sorted(set(srcs))
    src_code = {s: c for c, s in enumerate(src_names)}
    src = list(map(src_code.__getitem__, srcs))
    n_src = len(src_names)
    left = [srcs.count(s) for s in src_names]   # remaining candidates per source
    caps, need = [S] * n_src, [0] * n_src
    for s, c in src_code.items():
        rule = strategy.sources.get(s)
        if rule is not None:
            caps[c] = math.floor(rule.max_share * S + 1e-9)
            need[c] = min(rule.min_slots, left[c], caps[c])
    counts = [0] * n_src

    window = div is not None   # method: window (mmr went its own way above)
    if window:
        key = _key_codes(list(map(attrgetter(div.key), chosen)))
        key_count = [0] * (max(key) + 1)
        per_window, span = div.max_per_window, div.window
        left_by = Counter(zip(src, key))   # (source, key) -> remaining candidates
        full: set = set()   # keys at max_per_window in the current window
        history = []

    remaining = list(range(m))   # positions in preference order not yet in the slate
    picks, props = [], []
    eps = strategy.epsilon
    for t in range(S):
        open_src = [counts[c] < caps[c] for c in range(n_src)]
        short = [max(need[c] - counts[c], 0) for c in range(n_src)]
        reserved = sum(short) >= S - t
        if reserved:
            open_src = [o and sh > 0 for o, sh in zip(open_src, short)]
        eligible = sum(left[c] for c in range(n_src) if open_src[c])   # quota-eligible
        if not eligible:
            break
        relaxed = False
        blocked = False   # some quota-eligible candidates are not diversity-eligible
        if window and full:
            fits = eligible - sum(left_by.get((c, k), 0) for c in range(n_src) if open_src[c] for k in full)
            if fits:
                blocked = fits != eligible
                eligible = fits
            else:
                relaxed = True

        # the greedy pick: the first eligible candidate; what it passes over, in order
        ahead = []
        for i, p in enumerate(remaining):
            if open_src[src[p]] and not (blocked and key[p] in full):
                break
            ahead.append(p)
        greedy, at = p, i

        pick, prop, explore = greedy, 1.0, False
        if rng is not None:
            explore = rng.random() < eps
            if explore:
                rem = np.array(remaining)
                fits = np.array(open_src)[np.array(src)[rem]]
                if blocked:
                    fits &= ~np.isin(np.array(key)[rem], list(full))
                at = int(np.flatnonzero(fits)[rng.integers(eligible)])
                pick = remaining[at]
                _note(reasons, order[pick], "exploration")
            prop = (1 - eps) * (pick == greedy) + eps / eligible
        if not explore:
            for q in ahead:
                if not open_src[src[q]]:
                    _note(reasons, order[q], f"quota:{src_names[src[q]]}.{'min_slots_reserved' if reserved else 'max_share'}")
                else:
                    _note(reasons, order[q], f"diversity:{div.key}")
        if relaxed:
            _note(reasons, order[pick], f"diversity:relaxed({div.key})")
        if reserved and any(not open_src[src[q]] for q in remaining[:at]):
            _note(reasons, order[pick], f"quota:min_slots({src_names[src[pick]]})")

        del remaining[at]
        picks.append(order[pick])
        props.append(prop)
        c = src[pick]
        counts[c] += 1
        left[c] -= 1
        if window:
            k = key[pick]
            left_by[(c, k)] -= 1
            key_count[k] += 1
            if key_count[k] >= per_window:
                full.add(k)
            history.append(k)
            if len(history) >= span:
                k = history[-span]
                key_count[k] -= 1
                if key_count[k] < per_window:
                    full.discard(k)

    leftover = []
    if len(picks) < S:
        for p in remaining:
            leftover.append((order[p], f"quota:{src_names[src[p]]}.max_share"))
    return picks, props, leftover


def _key_codes(values: list) -> list[int]:
    """Integer codes of hashable values, each ``None`` a code of its own (as :func:`_codes`)."""
    table = {v: c for c, v in enumerate(dict.fromkeys(values))}
    if None not in table:
        return list(map(table.__getitem__, values))
    del table[None]   # missing keys never collide with each other nor with real keys
    fresh = count(len(table) + 1)
    return [table[v] if v is not None else next(fresh) for v in values]


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


def _fill_slate_mmr(strategy, kept, scores, demoted, order, S, reasons, rng):
    """:func:`_fill_slate` under ``method: mmr``: the whole remaining list scored per slot, on arrays."""
    m = len(order)
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
    key = _codes([getattr(kept[j], div.key) for j in order])
    key_count = np.zeros(int(key.max()) + 1, dtype=np.int64)
    s = scores[order]
    span = float(s.max() - s.min()) or 1.0
    relevance = (s - s.min()) / span - 2.0 * demoted[order]

    remaining = np.ones(m, dtype=bool)
    picks, props = [], []
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
        ok = quota_ok   # relevance minus similarity to what the slate already holds
        mmr = div.mmr_lambda * relevance - (1 - div.mmr_lambda) * (key_count[key] > 0)
        greedy = int(np.argmax(np.where(ok, mmr, -np.inf)))

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
        if reserved and (remaining[:pick] & ~open_src[src[:pick]]).any():
            _note(reasons, order[pick], f"quota:min_slots({src_names[src[pick]]})")

        remaining[pick] = False
        picks.append(int(order[pick]))
        props.append(prop)
        counts[src[pick]] += 1
        key_count[key[pick]] += 1

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
