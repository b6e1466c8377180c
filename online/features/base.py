"""The feature store's interface and the maths both backends share: options, the lookup result,
record validation (:func:`normalise`), decayed sums (:func:`decay_add`) and the counter and
affinity updates (:func:`bump`, :func:`add_affinity`, :func:`item_meta`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from strategy.errors import FieldError, ValidationError, did_you_mean

DEFAULT_DEDUPE_MAX_KEYS = 2_000_000  # ~150-250 bytes each in the memory store
DEFAULT_COUNTERS = ("impressions", "click", "like", "share", "comment", "follow", "report", "watch", "watch_sum")
DEFAULT_AFFINITY = {"click": 1.0, "like": 2.0, "share": 3.0, "comment": 2.0, "follow": 3.0, "long_view": 1.0,
                    "watch": 1.0, "report": -5.0}
IMPRESSIONS = "impressions"
MAX_DEDUPE_KEYS = 1_000_000_000
SCORE_EPOCH = 1.6e9  # time origin of the time-invariant log scores (keeps (t - epoch) / half small and exact)
TOP_KEEP = 10_000  # items a shared store ranks per counter: top_items is exact up to this n
MAX_CO_NEIGHBOURS = 1000
LN2 = math.log(2.0)


class StoreUnavailable(RuntimeError):
    """The store's server cannot be reached: the scorer serves without real-time features, the
    near-line consumer retries the batch (nothing is committed meanwhile)."""


@dataclass(frozen=True)
class StoreOptions:
    """Behaviour shared by both backends (``store:`` in ``conf/service.yaml``)."""

    half_life_s: float = 3600.0
    recent_items: int = 50
    dedupe_ttl_s: int = 7 * 86400
    dedupe_max_keys: int = DEFAULT_DEDUPE_MAX_KEYS  # hard bound; the oldest keys are forgotten first
    affinity: dict = field(default_factory=lambda: dict(DEFAULT_AFFINITY))  # event type -> weight; > 0 engages
    counters: tuple = DEFAULT_COUNTERS  # always present in lookups (zeros when never seen)
    key_prefix: str = "sr:"
    co_neighbours: int = 50  # co-engaged items kept per item, the weakest dropped first


@dataclass
class RealtimeFeatures:
    """The real-time features of one request. Counter arrays are aligned with the ``item_ids``
    and ``creator_ids`` given to :meth:`FeatureStore.lookup` (a ``None`` creator reads zeros)."""

    user_id: str
    now: float
    recent_items: list  # engaged item ids, most recent first, at most ``recent_items``
    topic_affinity: dict  # topic -> decayed engagement weight
    item_counters: dict  # name -> float64 array, decayed to ``now``
    creator_counters: dict
    item_totals: dict  # name -> float64 array, raw totals (no decay): impressions seen, clicks, ...
    creator_totals: dict
    n_items: int = 0
    n_creators: int = 0

    def item(self, name: str) -> np.ndarray:
        """Decayed counter ``name`` per item (zeros when never seen)."""
        got = self.item_counters.get(name)
        return got if got is not None else np.zeros(self.n_items)

    def creator(self, name: str) -> np.ndarray:
        got = self.creator_counters.get(name)
        return got if got is not None else np.zeros(self.n_creators)


# ---------------------------------------------------------------- input records


def _ts(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed.timestamp() if parsed.tzinfo is not None else None
    return None


def _id(value) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= 256:
        return value
    return None


def dedupe_key(rec: dict) -> str | None:
    """``e:<event_id>`` for an event, ``p:<len>:<request_id>:<item_id>`` for an impression."""
    if "type" in rec:
        eid = _id(rec.get("event_id"))
        return None if eid is None else "e:" + eid
    req, item = _id(rec.get("request_id")), _id(rec.get("item_id"))
    return None if req is None or item is None else f"p:{len(req)}:{req}:{item}"


_MISSING = object()
_INF = math.inf


def _fast_id(value):
    return value if type(value) is str and 0 < len(value) <= 256 else _id(value)


def normalise(rec) -> tuple | None:
    """``(key, ts, user, item, creator, topic, type, value)`` with ``type`` None for an impression;
    None for a record that is neither a valid event nor a valid impression. A record with a
    ``type`` key is an event; ``creator_id`` / ``topic`` may sit at the top or in ``features``."""
    if type(rec) is not dict:
        return None
    get = rec.get
    ts = get("ts")
    ts = ts if type(ts) is float and 0.0 <= ts < _INF else _ts(ts)
    user = get("user_id")
    if type(user) is not str or not 0 < len(user) <= 256:
        user = _id(user)
    item = get("item_id")
    if type(item) is not str or not 0 < len(item) <= 256:
        item = _id(item)
    etype = get("type", _MISSING)
    value = None
    if etype is _MISSING:
        etype = None
        req = _fast_id(get("request_id"))
        key = None if req is None or item is None else f"p:{len(req)}:{req}:{item}"
    else:
        eid = _fast_id(get("event_id"))
        key = None if eid is None else "e:" + eid
        if type(etype) is not str or not 0 < len(etype) <= 64 or etype == IMPRESSIONS or ":" in etype:
            return None
        v = get("value")
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return None
            value = float(v)
    if key is None or ts is None or user is None or item is None:
        return None
    creator, topic = get("creator_id"), get("topic")
    if creator is None or topic is None:
        feats = get("features")
        if type(feats) is dict:
            creator = feats.get("creator_id") if creator is None else creator
            topic = feats.get("topic") if topic is None else topic
    if creator is not None and (type(creator) is not str or not 0 < len(creator) <= 256):
        creator = _id(creator)
    if topic is not None and (type(topic) is not str or not 0 < len(topic) <= 256):
        topic = _id(topic)
    return key, ts, user, item, creator, topic, etype, value


# ---------------------------------------------------------------- the interface


class FeatureStore:
    options: StoreOptions
    url: str

    def apply(self, batch: list[dict]) -> int:  # pragma: no cover - interface
        """Apply impressions and events; returns how many were new (not seen before)."""
        raise NotImplementedError

    def lookup(self, user_id: str, item_ids: list[str], creator_ids: list | None = None,
               now: float | None = None) -> RealtimeFeatures:  # pragma: no cover - interface
        raise NotImplementedError

    def top_items(self, counter: str, n: int, now: float | None = None) -> list[tuple[str, float]] | None:
        """The ``n`` items with the highest ``counter`` decayed to ``now``, ``[(item_id, value)]`` best
        first, equal values by descending id (the trending candidate source); items whose value is not
        positive are left out. None where the backend cannot rank its items."""
        return None

    def co_engaged(self, item_ids: list[str], n: int, now: float | None = None) -> list[tuple[str, float]] | None:
        """The ``n`` items most co-engaged with the seeds ``item_ids`` (the seeds left out), ``[(item_id,
        summed decayed co-engagement at now)]`` best first, equal sums by descending id; None where the
        backend keeps no co-engagement. Engaging item j (an event of positive affinity weight) when j is not
        among the user's ``recent_items`` adds 1 at the event's time to the pair of j and each of them."""
        return None

    def snapshot(self) -> Path | None:
        """Persist the state (memory backend); a no-op where the backend is durable itself."""
        return None

    def record_progress(self, consumer: str, newest_ts: float | None, caught_up: bool) -> None:
        """Where near-line ``consumer`` stands, for readers in other processes (a shared store
        keeps it; a memory store has no other reader: its near-line thread's stats say it)."""

    def nearline_progress(self) -> list[dict]:
        """What :meth:`record_progress` kept: ``[{consumer, newest_ts, caught_up, updated_at}]``."""
        return []

    @property
    def durable(self) -> bool:
        """True when an applied batch survives this process (so offsets may be committed at once)."""
        return False

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def store_error(path, message, code="invalid") -> ValidationError:
    """A one-field :class:`ValidationError` of the store's configuration (``store.url``, ...)."""
    return ValidationError([FieldError(path, message, code)])


def parse_options(options: dict) -> StoreOptions:
    """Validated :class:`StoreOptions` from the ``store:`` options (unknown keys and a bad
    ``dedupe_max_keys`` or ``co_neighbours`` are named)."""
    allowed = ("half_life_s", "recent_items", "dedupe_ttl_s", "dedupe_max_keys", "affinity", "counters",
               "key_prefix", "co_neighbours")
    errs = []
    for k in options:
        if k not in allowed:
            errs.append(FieldError(f"store.{k}", f"unknown option '{k}'{did_you_mean(k, allowed)} "
                                                 f"(allowed: {', '.join(sorted(allowed))})", "unknown_key"))
    mk = options.get("dedupe_max_keys", DEFAULT_DEDUPE_MAX_KEYS)
    if isinstance(mk, bool) or not isinstance(mk, int) or not 1 <= mk <= MAX_DEDUPE_KEYS:
        errs.append(FieldError("store.dedupe_max_keys", f"expected an integer in [1, {MAX_DEDUPE_KEYS}], got {mk!r}",
                               "range"))
    cn = options.get("co_neighbours", StoreOptions.co_neighbours)
    if isinstance(cn, bool) or not isinstance(cn, int) or not 1 <= cn <= MAX_CO_NEIGHBOURS:
        errs.append(FieldError("store.co_neighbours", f"expected an integer in [1, {MAX_CO_NEIGHBOURS}], got {cn!r}",
                               "range"))
    if errs:
        raise ValidationError(errs)
    opts = dict(options)
    if "counters" in opts:
        opts["counters"] = tuple(opts["counters"])
    return StoreOptions(**opts)


# ---------------------------------------------------------------- updates both stores share


def item_meta(creator_of: dict, topic_of: dict, item, creator, topic, etype):
    """``(counter name, creator, topic)`` of a normalised record: an impression (``etype`` None)
    records the item's creator and topic (``creator_of`` / ``topic_of``: item -> id); feedback
    events, which may lack them, take them from there."""
    if etype is None:
        if creator is not None:
            creator_of[item] = creator
        else:
            creator = creator_of.get(item)
        if topic is not None:
            topic_of[item] = topic
        return IMPRESSIONS, creator, topic
    if creator is None:
        creator = creator_of.get(item)
    if topic is None:
        topic = topic_of.get(item)
    return etype, creator, topic


def decay_add(c: complex, w: float, ts: float, half: float) -> complex:
    """A decayed sum stored as ``value + time*1j`` plus ``w`` at time ``ts`` (half-life ``half``): the
    result keeps the later time, so a late record decays itself to the sum's time (order-independent)."""
    t = c.imag
    if ts >= t:
        return complex(c.real * 2.0 ** (-(ts - t) / half) + w, ts)
    return complex(c.real + w * 2.0 ** (-(t - ts) / half), t)


def bump(totals: dict, decayed: dict, entity: str, name: str, ts: float, w: float, half: float) -> None:
    """Add ``w`` at time ``ts`` to counter ``name`` of ``entity``: ``totals[name][entity]`` (raw sum) and
    ``decayed[name][entity]`` (``value + time*1j``, see :func:`decay_add`). The one counter update of both
    stores (the memory store inlines it for items). Tables are by counter name, then entity: a few
    small outer dicts and, inside, only strings and numbers (see :class:`MemoryStore`)."""
    dec = decayed.get(name)
    if dec is None:
        totals[name] = {entity: w}
        decayed[name] = {entity: complex(w, ts)}
        return
    c = dec.get(entity)
    if c is None:
        totals[name][entity] = w
        dec[entity] = complex(w, ts)
    else:
        totals[name][entity] += w
        dec[entity] = decay_add(c, w, ts, half)


def add_affinity(affinity: dict, user: str, topic: str, w: float, ts: float, half: float) -> None:
    """Add engagement weight ``w`` at time ``ts`` to ``affinity[user][topic]`` (``value + time*1j``):
    the one affinity update of both stores."""
    by_topic = affinity.get(user)
    if by_topic is None:
        affinity[user] = {topic: complex(w, ts)}
        return
    a = by_topic.get(topic)
    by_topic[topic] = complex(w, ts) if a is None else decay_add(a, w, ts, half)


def best_decayed(ids: list, values, times, n: int, now: float, half: float) -> list[tuple[str, float]]:
    """The ``n`` best ``(id, value decayed to now)`` of stored (value, time) pairs with a positive value,
    best first, equal values by descending id: :meth:`FeatureStore.top_items` of both backends."""
    v, t = np.asarray(values, dtype=float), np.asarray(times, dtype=float)
    keep = np.flatnonzero(v > 0)
    if n <= 0 or not len(keep):
        return []
    dec = v[keep] * np.exp2(-(now - t[keep]) / half)  # not clamped at now < t: the order stays time-invariant
    if len(dec) > n:  # everything tied with the n-th value, then exactly n by (value, id)
        sel = np.flatnonzero(dec >= np.partition(dec, len(dec) - n)[len(dec) - n])
    else:
        sel = np.arange(len(dec))
    best = sorted(((float(dec[k]), ids[keep[k]]) for k in sel.tolist()), reverse=True)[:n]
    return [(i, val) for val, i in best]


def log_time(ts: float, half: float) -> float:
    """``(ts - SCORE_EPOCH) / half``: a time in half-lives, the time part of a log score."""
    return (ts - SCORE_EPOCH) / half


def co_add(score: float | None, x: float) -> float:
    """A co-engagement log score ``log2(value) + log_time(t)`` (the same at every t) plus 1 at log time
    ``x``; the apply script of :class:`RedisStore` does the same operations (bit-identical results)."""
    if score is None:
        return x
    hi, lo = (score, x) if score >= x else (x, score)
    return hi + math.log(1.0 + 2.0 ** (lo - hi)) / LN2


def co_best(neighbours: list, seeds: list, n: int, now: float, half: float) -> list[tuple[str, float]]:
    """:meth:`FeatureStore.co_engaged` from each seed's ``[(item, log score)]`` (aligned with ``seeds``)."""
    x = log_time(now, half)
    held = set(seeds)
    acc: dict = {}
    for rows in neighbours:  # one term per seed, in seed order: the same sums whatever the backend
        for j, s in rows:
            if j not in held:
                acc[j] = acc.get(j, 0.0) + 2.0 ** (s - x)
    best = sorted(((v, j) for j, v in acc.items()), reverse=True)[:max(0, n)]
    return [(j, v) for v, j in best]


def counters_by_entity(totals: dict, decayed: dict) -> dict:
    """entity -> name -> [total, decayed, time] of by-name tables (a version-1 snapshot's layout, and how
    :class:`RedisStore` groups a chunk's counters into hashes)."""
    out: dict = {}
    for name, col in decayed.items():
        tot = totals[name]
        for entity, c in col.items():
            row = out.get(entity)
            if row is None:
                row = out[entity] = {}
            row[name] = [tot[entity], c.real, c.imag]
    return out
