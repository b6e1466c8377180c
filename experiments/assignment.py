"""Layered, deterministic assignment of users to experiment variants.

Algorithm (stable across processes, machines and Python versions; no state)::

    unit(salt, key)  = (int.from_bytes(sha256(f"{salt}:{key}".encode())[:8], "big") >> 11) / 2**53   # [0, 1)

    holdout:   in_holdout = unit(holdout.salt, user_id) < holdout.share      (top-level, optional)
    per layer: position   = unit(layer.salt, user_id)
               the experiment with range lo <= position < hi (ranges are disjoint) takes the user
               variant    = first v with unit(f"{layer.salt}:{experiment.name}", user_id) < cumulative weight

``user_id`` is used as ``str(user_id)``. Consequences:

* layers are independent: each has its own salt, so positions in two layers are unrelated;
* growing an experiment's range (``[0, 0.1]`` -> ``[0, 0.5]``) never moves a user who was already
  in: their position does not change and their variant hash does not depend on the range.
  (Changing the variant *weights* does move users; start a new experiment name instead.)
* holdout users (``share`` of everyone, own salt) are in no experiment of any layer and get the
  base strategy; QA users in an experiment's ``allowlist`` get their forced variant in that
  experiment whatever the holdout, their position and the experiment's status.
* ``status: stopped`` experiments assign nobody (except allowlisted users).
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from .config import Experiment, ExperimentsConfig

__all__ = ["Assignment", "Assigner", "unit_hash", "merge_assignments"]

_EMPTY = MappingProxyType({})
_SCALE = 2.0 ** -53


def unit_hash(salt: str, key) -> float:
    """``sha256(f"{salt}:{key}")`` -> first 8 bytes big-endian -> top 53 bits / 2**53, in [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) * _SCALE


@dataclass(frozen=True, slots=True)
class Assignment:
    layer: str
    experiment: str
    variant: str
    overrides: Mapping = field(default_factory=lambda: _EMPTY)  # dotted strategy key -> value (read-only)
    model: str | None = None        # "name@version" or None (the current model)
    forced: bool = False            # True when the allowlist chose the variant

    def to_dict(self) -> dict:
        """The ``experiments`` entry of a ``/v1/rank`` answer."""
        return {"layer": self.layer, "experiment": self.experiment, "variant": self.variant}


class _CompiledLayer:
    __slots__ = ("name", "prefix", "starts", "exps")

    def __init__(self, layer):
        running = sorted((e for e in layer.experiments if e.status == "running"), key=lambda e: e.range)
        self.name = layer.name
        self.prefix = f"{layer.salt}:".encode()
        self.starts = [e.range[0] for e in running]
        # per experiment: (hi, variant-hash prefix, cumulative weights, assignments by variant index)
        self.exps = [(e.range[1], f"{layer.salt}:{e.name}:".encode(), *_variant_table(layer.name, e))
                     for e in running]


def _variant_table(layer: str, e: Experiment):
    cum, acc = [], 0.0
    for v in e.variants:
        acc += v.weight
        cum.append(acc)
    cum[-1] = 1.0 + 1e-12  # weights sum to 1 within tolerance: the last variant closes [0, 1)
    made = tuple(Assignment(layer, e.name, v.name, v.overrides, v.model) for v in e.variants)
    return cum, made


class Assigner:
    """Assigns a user to at most one experiment per layer; the scorer calls it per request.

    >>> assigner = Assigner(load_experiments("conf/experiments/like_up.yaml"))
    >>> [a.to_dict() for a in assigner.assign("u17")]          # doctest: +SKIP
    [{'layer': 'ranking_weights', 'experiment': 'like_up', 'variant': 'treatment'}]
    """

    def __init__(self, config: ExperimentsConfig):
        self.config = config
        self._layers = [_CompiledLayer(layer) for layer in config.layers]
        h = config.holdout
        self._holdout = (f"{h.salt}:".encode(), h.share) if h is not None and h.share > 0 else None
        # allowlist: user -> {layer: forced Assignment}
        forced: dict[str, dict[str, Assignment]] = {}
        for layer in config.layers:
            for e in layer.experiments:
                for uid, vname in e.allowlist.items():
                    v = e.variant(vname)
                    forced.setdefault(uid, {})[layer.name] = Assignment(layer.name, e.name, v.name, v.overrides,
                                                                        v.model, True)
        self._forced = forced

    def in_holdout(self, user_id) -> bool:
        if self._holdout is None:
            return False
        prefix, share = self._holdout
        d = hashlib.sha256(prefix + str(user_id).encode()).digest()
        return (int.from_bytes(d[:8], "big") >> 11) * _SCALE < share

    def assign(self, user_id) -> list[Assignment]:
        """The user's assignments, one per layer whose experiments cover them (layer order)."""
        uid = str(user_id)
        ub = uid.encode()
        forced = self._forced.get(uid) if self._forced else None
        if self._holdout is not None:
            prefix, share = self._holdout
            if (int.from_bytes(hashlib.sha256(prefix + ub).digest()[:8], "big") >> 11) * _SCALE < share:
                return [forced[l.name] for l in self._layers if l.name in forced] if forced else []
        out = []
        sha = hashlib.sha256
        for layer in self._layers:
            if forced and layer.name in forced:
                out.append(forced[layer.name])
                continue
            if not layer.starts:
                continue
            pos = (int.from_bytes(sha(layer.prefix + ub).digest()[:8], "big") >> 11) * _SCALE
            i = bisect.bisect_right(layer.starts, pos) - 1
            if i < 0:
                continue
            hi, vprefix, cum, made = layer.exps[i]
            if pos >= hi:
                continue
            u = (int.from_bytes(sha(vprefix + ub).digest()[:8], "big") >> 11) * _SCALE
            out.append(made[bisect.bisect_right(cum, u)])
        return out

    def assign_many(self, user_ids: Iterable) -> list[dict]:
        """Rows ``{user_id, layer, experiment, variant}`` for a batch of users (simulations, tests)."""
        return [{"user_id": uid, "layer": a.layer, "experiment": a.experiment, "variant": a.variant}
                for uid in user_ids for a in self.assign(uid)]


def merge_assignments(assignments: Iterable[Assignment]) -> tuple[dict, str | None]:
    """``(overrides, model)`` for a user: the union of their variants' overrides (layers own disjoint
    keys, checked when the config loads) and the model picked by one of them, if any.

    Apply with ``strategy.with_overrides(overrides)`` when ``overrides`` is not empty.
    """
    overrides: dict = {}
    model = None
    for a in assignments:
        overrides.update(a.overrides)
        model = a.model or model
    return overrides, model
