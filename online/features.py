"""The real-time feature store: what the near-line consumer learns from impressions and events.

Per user: the last ``recent_items`` (50) engaged item ids, most recent first, and topic
affinities (a decayed sum of engagement weights per topic). Per item and per creator: for
impressions and for every event type a raw total and a counter with exponential time decay
(``half_life_s``); events that carry a ``value`` (watch seconds) also feed ``<type>_sum``.

Applying is idempotent: an event is counted once per ``event_id`` and an impression once per
``(request_id, item_id)``, so a replay after a crash never double counts. The dedupe keys are
bounded twice: each lives ``dedupe_ttl_s`` (7 days), and at most ``dedupe_max_keys`` (2M) are
kept -- when a new key would exceed that, the oldest keys (first seen longest ago) are forgotten
first. So a record is deduplicated when it comes again within ``dedupe_ttl_s`` and fewer than
``dedupe_max_keys`` new keys later; a replay of the uncommitted tail (at most one batch for
Redis, what arrived since the last snapshot for the memory store) always is, as long as
``dedupe_max_keys`` exceeds that tail (the near-line config checks it against the batch size).
Decayed counters are stored as (value, time of value) pairs, so the result does not depend on
the order in which events arrive (up to float rounding, ~1e-15 relative); the memory store keeps
a pair as one complex number, ``value + time*1j`` (:func:`decay_add`).

Backends (:func:`open_store`): ``memory://`` (default; ``memory://PATH`` snapshots to ``PATH``
and restores from it on open) and ``redis://HOST:PORT/DB`` (shared by several scorer replicas;
a batch is applied in pipelined chunks of pre-aggregated updates, each an atomic Lua script).
:meth:`FeatureStore.lookup` reads everything a request needs in one round trip.

Which creator and topic an event belongs to: the event's own ``creator_id`` / ``topic`` when it
carries them (the scorer may add them), otherwise what the impressions of its item said.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson

from strategy.errors import FieldError, ValidationError, did_you_mean

log = logging.getLogger("stratarank.features")

SCHEMES = ("memory", "redis")
DEFAULT_DEDUPE_MAX_KEYS = 2_000_000  # ~150-250 bytes each in the memory store
DEFAULT_COUNTERS = ("impressions", "click", "like", "share", "comment", "follow", "report", "watch", "watch_sum")
DEFAULT_AFFINITY = {"click": 1.0, "like": 2.0, "share": 3.0, "comment": 2.0, "follow": 3.0, "long_view": 1.0,
                    "watch": 1.0, "report": -5.0}
IMPRESSIONS = "impressions"
MAX_DEDUPE_KEYS = 1_000_000_000
_ROW_ITEMS = 500


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

    def snapshot(self) -> Path | None:
        """Persist the state (memory backend); a no-op where the backend is durable itself."""
        return None

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


def _bad(path, message, code="invalid"):
    return ValidationError([FieldError(path, message, code)])


def _options(options: dict) -> StoreOptions:
    allowed = ("half_life_s", "recent_items", "dedupe_ttl_s", "dedupe_max_keys", "affinity", "counters",
               "key_prefix")
    errs = []
    for k in options:
        if k not in allowed:
            errs.append(FieldError(f"store.{k}", f"unknown option '{k}'{did_you_mean(k, allowed)} "
                                                 f"(allowed: {', '.join(sorted(allowed))})", "unknown_key"))
    mk = options.get("dedupe_max_keys", DEFAULT_DEDUPE_MAX_KEYS)
    if isinstance(mk, bool) or not isinstance(mk, int) or not 1 <= mk <= MAX_DEDUPE_KEYS:
        errs.append(FieldError("store.dedupe_max_keys", f"expected an integer in [1, {MAX_DEDUPE_KEYS}], got {mk!r}",
                               "range"))
    if errs:
        raise ValidationError(errs)
    opts = dict(options)
    if "counters" in opts:
        opts["counters"] = tuple(opts["counters"])
    return StoreOptions(**opts)


def open_store(url: str = "memory://", **options) -> FeatureStore:
    """``memory://`` (no persistence), ``memory://PATH`` (snapshot file, restored on open) or
    ``redis://HOST:PORT/DB``. Options: see :class:`StoreOptions`."""
    opts = _options(options)
    if not isinstance(url, str) or "://" not in url:
        raise _bad("store.url", f"expected a URL (memory://[PATH] or redis://HOST:PORT/DB), got {url!r}")
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise _bad("store.url", f"unknown scheme '{scheme}'{did_you_mean(scheme, SCHEMES)} "
                                f"(allowed schemes: {', '.join(SCHEMES)})", "choice")
    if scheme == "memory":
        return MemoryStore(rest or None, opts)
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        raise _bad("store.url", f"bad port in '{url}'") from None
    db = parts.path.strip("/") or "0"
    if not parts.hostname or not db.isdigit():
        raise _bad("store.url", f"expected redis://HOST:PORT/DB, got '{url}'")
    return RedisStore(parts.hostname, port, int(db), opts, password=parts.password)


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


def _ts_item(kv):
    return kv[1], kv[0]


def newest_recent(recent: dict, keep: int) -> list:
    """The ``keep`` newest ``(item, ts)`` of a user's ``{item: ts}``, newest first (ties: larger id first)."""
    return heapq.nlargest(keep, recent.items(), key=_ts_item)


def _decay(v: float, t: float, now: float, half_life: float) -> float:
    return v * 2.0 ** (-(now - t) / half_life) if now > t else v


# ---------------------------------------------------------------- memory


class MemoryStore(FeatureStore):
    """Dicts in this process, guarded by a lock (the near-line thread applies while request
    threads look up). ``snapshot()`` writes a JSON file atomically; opening restores it.

    Counters are kept by name, then entity (``item_totals["click"]["i7"]``), and a decayed sum is
    one complex number, so below a handful of outer dicts every container holds only strings and
    numbers. Python's cyclic garbage collector does not track such containers: a full collection
    never walks the counters, only the two per-user dicts (``bench/nearline_bench.py``: 19-31 ms with
    709k items and 194k users, against 2.3-2.4 s with the same counters held as lists, a list each)."""

    VERSION = 2  # of the snapshot file; version 1 (the earlier layout) still restores

    def __init__(self, snapshot_path=None, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        self._half = float(self.options.half_life_s)
        self.snapshot_path = Path(snapshot_path) if snapshot_path else None
        self.url = f"memory://{snapshot_path or ''}"
        self._lock = threading.Lock()  # readers (lookup) vs the writer, held per chunk of 500 records
        self._write_lock = threading.Lock()  # writers (apply, snapshot) among themselves
        self.item_totals: dict[str, dict[str, float]] = {}  # counter name -> item -> raw total
        self.item_decayed: dict[str, dict[str, complex]] = {}  # counter name -> item -> decayed + time*1j
        self.creator_totals: dict[str, dict[str, float]] = {}
        self.creator_decayed: dict[str, dict[str, complex]] = {}
        self.creator_of: dict[str, str] = {}  # item -> creator, as its impressions said
        self.topic_of: dict[str, str] = {}  # item -> topic
        # user -> item -> last engagement ts: the newest ``recent_items`` by (ts, item) and up to as many
        # older ones, trimmed only when twice full (amortised O(log n) per engagement, not O(n)); readers
        # take the newest ``recent_items`` (newest_recent), which is order-independent like an eager trim
        self.recent: dict[str, dict[str, float]] = {}
        self.affinity: dict[str, dict[str, complex]] = {}  # user -> topic -> decayed + time*1j
        self.seen: dict[str, float] = {}  # dedupe key -> expiry (epoch s), oldest first (insertion order)
        self.stats = {"applied": 0, "duplicates": 0, "invalid": 0, "dedupe_evicted": 0}
        if self.snapshot_path is not None and self.snapshot_path.exists():
            self._restore(self.snapshot_path)

    def apply(self, batch: list[dict]) -> int:
        new = 0
        with self._write_lock:
            for start in range(0, len(batch), 500):  # short lock holds: lookups interleave
                with self._lock:
                    new += self._apply(batch[start:start + 500])
                    if len(self.seen) > self.options.dedupe_max_keys:
                        self._evict_dedupe()
        return new

    def _evict_dedupe(self) -> None:
        """Forget the oldest dedupe keys (first seen longest ago) down to ``dedupe_max_keys``."""
        seen = self.seen
        excess = len(seen) - self.options.dedupe_max_keys
        if excess > 0:
            for key in list(islice(seen, excess)):
                del seen[key]
            self.stats["dedupe_evicted"] = self.stats.get("dedupe_evicted", 0) + excess

    def _apply(self, batch) -> int:
        opts = self.options
        seen, expiry = self.seen, time.time() + opts.dedupe_ttl_s
        aff_w, keep, half = opts.affinity, opts.recent_items, self._half
        item_tot, item_dec, cre_tot, cre_dec = self.item_totals, self.item_decayed, self.creator_totals, self.creator_decayed
        creator_of, topic_of, recents, affinities = self.creator_of, self.topic_of, self.recent, self.affinity
        new = invalid = dups = 0
        for raw in batch:
            rec = normalise(raw)
            if rec is None:
                invalid += 1
                continue
            key, ts, user, item, creator, topic, etype, value = rec
            if key in seen:
                dups += 1
                continue
            seen[key] = expiry
            new += 1
            name, creator, topic = item_meta(creator_of, topic_of, item, creator, topic, etype)
            # bump(item_tot, item_dec, item, name, ts, 1.0, half), inlined: every record takes this path
            dec = item_dec.get(name)
            if dec is None:
                item_tot[name] = {item: 1.0}
                item_dec[name] = {item: complex(1.0, ts)}
            else:
                c = dec.get(item)
                if c is None:
                    item_tot[name][item] = 1.0
                    dec[item] = complex(1.0, ts)
                else:
                    item_tot[name][item] += 1.0
                    t = c.imag
                    if ts >= t:
                        dec[item] = complex(c.real * 2.0 ** (-(ts - t) / half) + 1.0, ts)
                    else:
                        dec[item] = complex(c.real + 2.0 ** (-(t - ts) / half), t)
            if etype is None:
                if creator is not None:
                    bump(cre_tot, cre_dec, creator, IMPRESSIONS, ts, 1.0, half)
                continue
            if value is not None:
                bump(item_tot, item_dec, item, etype + "_sum", ts, value, half)
            if creator is not None:
                bump(cre_tot, cre_dec, creator, etype, ts, 1.0, half)
                if value is not None:
                    bump(cre_tot, cre_dec, creator, etype + "_sum", ts, value, half)
            w = aff_w.get(etype)
            if w is None:
                continue
            if w > 0:
                recent = recents.get(user)
                if recent is None:
                    recent = recents[user] = {}
                old = recent.get(item)
                if old is None or ts > old:
                    recent[item] = ts
                    if len(recent) > 2 * keep:
                        recent = recents[user] = dict(newest_recent(recent, keep))
            if topic is not None:
                add_affinity(affinities, user, topic, w, ts, half)
        stats = self.stats
        stats["applied"] += new
        stats["invalid"] += invalid
        stats["duplicates"] += dups
        return new

    def lookup(self, user_id, item_ids, creator_ids=None, now=None) -> RealtimeFeatures:
        now = time.time() if now is None else float(now)
        half = self.options.half_life_s
        creator_ids = list(creator_ids) if creator_ids is not None else [None] * len(item_ids)
        with self._lock:
            recent_items = [i for i, _ in newest_recent(self.recent.get(user_id, {}), self.options.recent_items)]
            affinity = {t: _decay(a.real, a.imag, now, half) for t, a in self.affinity.get(user_id, {}).items()}
            items_dec, items_tot = _arrays(self.item_totals, self.item_decayed, item_ids, self.options.counters,
                                           now, half)
            cre_dec, cre_tot = _arrays(self.creator_totals, self.creator_decayed, creator_ids, self.options.counters,
                                       now, half)
        return RealtimeFeatures(user_id, now, recent_items, affinity, items_dec, cre_dec, items_tot, cre_tot,
                                len(item_ids), len(creator_ids))

    # ---- persistence: version 2 writes each table by column (ids, totals, decayed values, times); a
    # version-1 snapshot (per entity [total, decayed, time] lists, the earlier layout) still restores

    def snapshot(self, path=None) -> Path | None:
        """Write the state to ``path`` (default: the URL's path) atomically; expired dedupe keys
        are dropped first. Returns the path, or None when the store has none."""
        path = Path(path) if path else self.snapshot_path
        if path is None:
            return None
        with self._write_lock:  # no apply meanwhile; lookups go on (they only read)
            now = time.time()
            seen = {k: e for k, e in self.seen.items() if e > now}
            with self._lock:
                self.seen = seen
            data = orjson.dumps({
                "version": self.VERSION, "written": now, "half_life_s": self.options.half_life_s,
                "items": _columns(self.item_totals, self.item_decayed),
                "creators": _columns(self.creator_totals, self.creator_decayed),
                "creator_of": self.creator_of, "topic_of": self.topic_of, "recent": self.recent,
                "affinity": _affinity_rows(self.affinity), "seen": self.seen, "stats": self.stats})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # writers never share one
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def _restore(self, path: Path) -> None:
        try:
            state = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise _bad("store.snapshot_path", f"cannot restore snapshot {path}: {exc}", "io") from None
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, self.VERSION):
            raise _bad("store.snapshot_path", f"{path} is not a feature store snapshot of version 1 or "
                                              f"{self.VERSION} (version: {version!r})")
        if state.get("half_life_s") != self.options.half_life_s:
            log.warning("snapshot %s was written with half_life_s=%s, now %s", path, state.get("half_life_s"),
                        self.options.half_life_s)
        try:
            if version == 1:
                self.item_totals, self.item_decayed = _counters_by_name(state["items"])
                self.creator_totals, self.creator_decayed = _counters_by_name(state["creators"])
                meta = state["meta"]
                self.creator_of = {i: m[0] for i, m in meta.items() if m[0] is not None}
                self.topic_of = {i: m[1] for i, m in meta.items() if m[1] is not None}
                self.affinity = {u: {t: complex(a[0], a[1]) for t, a in topics.items()}
                                 for u, topics in state["affinity"].items()}
            else:
                self.item_totals, self.item_decayed = _from_columns(state["items"])
                self.creator_totals, self.creator_decayed = _from_columns(state["creators"])
                self.creator_of, self.topic_of = dict(state["creator_of"]), dict(state["topic_of"])
                self.affinity = _from_affinity_rows(state["affinity"])
            self.recent, self.seen = dict(state["recent"]), dict(state["seen"])
            self.stats.update(state.get("stats", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _bad("store.snapshot_path", f"cannot restore snapshot {path}: malformed "
                                              f"version-{version} snapshot ({type(exc).__name__}: {exc})",
                       "io") from None
        self._evict_dedupe()  # dedupe_max_keys may have been lowered since

    def close(self) -> None:
        pass


def counters_by_entity(totals: dict, decayed: dict) -> dict:
    """entity -> name -> [total, decayed, time] of by-name tables (a version-1 snapshot's layout)."""
    out: dict = {}
    for name, col in decayed.items():
        tot = totals[name]
        for entity, c in col.items():
            row = out.get(entity)
            if row is None:
                row = out[entity] = {}
            row[name] = [tot[entity], c.real, c.imag]
    return out


def _counters_by_name(by_entity: dict) -> tuple[dict, dict]:
    """The inverse of :func:`counters_by_entity`: ``(totals, decayed)``."""
    totals: dict = {}
    decayed: dict = {}
    for entity, names in by_entity.items():
        for name, c in names.items():
            if name not in decayed:
                totals[name], decayed[name] = {}, {}
            totals[name][entity] = float(c[0])
            decayed[name][entity] = complex(c[1], c[2])
    return totals, decayed


def _columns(totals: dict, decayed: dict) -> dict:
    """name -> [ids, totals, decayed values, times]: a snapshot's counter table."""
    out = {}
    for name, col in decayed.items():
        tot, ids = totals[name], list(col)
        out[name] = [ids, [tot[e] for e in ids], [c.real for c in col.values()], [c.imag for c in col.values()]]
    return out


def _from_columns(columns: dict) -> tuple[dict, dict]:
    """The inverse of :func:`_columns`: ``(totals, decayed)``."""
    totals, decayed = {}, {}
    for name, (ids, tot, dec, times) in columns.items():
        if not len(ids) == len(tot) == len(dec) == len(times):
            raise ValueError(f"counter '{name}': columns of different lengths")
        totals[name] = dict(zip(ids, map(float, tot)))
        decayed[name] = dict(zip(ids, map(complex, dec, times)))
    return totals, decayed


def _affinity_rows(affinity: dict) -> list:
    """[users, topics, decayed values, times], a row per (user, topic)."""
    users, topics, values, times = [], [], [], []
    for user, by_topic in affinity.items():
        for topic, a in by_topic.items():
            users.append(user)
            topics.append(topic)
            values.append(a.real)
            times.append(a.imag)
    return [users, topics, values, times]


def _from_affinity_rows(rows: list) -> dict:
    """The inverse of :func:`_affinity_rows`: user -> topic -> decayed value + time*1j."""
    users, topics, values, times = rows
    if not len(users) == len(topics) == len(values) == len(times):
        raise ValueError("affinity: columns of different lengths")
    out: dict = {}
    for user, topic, v, t in zip(users, topics, values, times):
        by_topic = out.get(user)
        if by_topic is None:
            by_topic = out[user] = {}
        by_topic[topic] = complex(v, t)
    return out


def _arrays(totals: dict, decayed: dict, ids: list, counters, now, half):
    """``({name: decayed}, {name: total})`` arrays over the configured counter names, one element per
    id (zeros for an unknown or None id)."""
    gone, none_c = {}, complex(0.0, now)
    dec, tot = {}, {}
    for name in counters:
        d, t = decayed.get(name, gone), totals.get(name, gone)
        grid = np.array([d.get(i, none_c) for i in ids], dtype=complex)
        dec[name] = grid.real * np.exp2(-np.maximum(now - grid.imag, 0.0) / half)
        tot[name] = np.array([t.get(i, 0.0) for i in ids], dtype=float)
    return dec, tot


# ---------------------------------------------------------------- redis

_APPLY_LUA = r"""
-- One chunk, pre-aggregated by RedisStore._payload, applied atomically. ARGV: prefix, half-life, dedupe TTL,
-- recent items kept, dedupe max keys, now, chain key, previous token, this token, payload JSON {k, c, r, a, u}.
-- Numbers go to redis.call as Lua numbers: Redis writes them with 17 significant digits (exact).
local p, H, ttl, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local maxkeys, now, chain, prev, token = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
-- 0. chunks are pipelined: this one applies only after the one sent before it did (else: resend it)
if prev ~= '' and redis.call('GET', chain) ~= prev then return {-2} end
local P = cjson.decode(ARGV[10])
local K = P.k
local SLICE = 1000  -- unpack() takes at most ~8000 values
-- 1. dedupe: one sorted set of keys scored by when they were first applied; expired ones go first. The chunk
-- was aggregated assuming every key is new: if one is not (a replay), say which and apply nothing
local dq = p .. 'dedupe'
redis.call('ZREMRANGEBYSCORE', dq, '-inf', '(' .. (now - ttl))
local old = {-1}
for s = 1, #K, SLICE do
  local part = {unpack(K, s, math.min(s + SLICE - 1, #K))}
  local got = redis.call('ZMSCORE', dq, unpack(part))
  for i = 1, #part do if got[i] then old[#old + 1] = s + i - 1 end end
end
-- dedupe keys of the earlier layout (a string key each, with a TTL) live on for one TTL after an upgrade
local legacy = tonumber(redis.call('GET', p .. 'dedupe:legacy_until') or '-1')
if legacy < 0 then
  legacy = (redis.call('EXISTS', p .. 'applied') == 1) and (now + ttl) or 0
  redis.call('SET', p .. 'dedupe:legacy_until', legacy)
end
if now < legacy then
  for i = 1, #K do if redis.call('EXISTS', p .. K[i]) == 1 then old[#old + 1] = i end end
end
if #old > 1 then return old end
for s = 1, #K, SLICE do
  local args = {}
  for i = s, math.min(s + SLICE - 1, #K) do args[#args + 1] = now; args[#args + 1] = K[i] end
  redis.call('ZADD', dq, unpack(args))
end
local function merge(v0, t0, v, t)  -- two decayed (value, time) pairs -> one
  if t >= t0 then return v0 * 2 ^ (-(t - t0) / H) + v, t end
  return v0 + v * 2 ^ (-(t0 - t) / H), t0
end
-- 2. records whose creator / topic only the item's earlier impressions know: read them before this chunk's
local U = P.u
for i = 1, #U do
  local u = U[i]
  if u[6] == '' or u[7] == '' then
    local m = redis.call('HMGET', p .. 'i:' .. u[1], 'c', 't')
    if not m[1] and not m[2] then m = redis.call('HMGET', p .. 'm:' .. u[1], 'c', 't') end  -- earlier layout
    if u[6] == '' then u[6] = m[1] or '' end
    if u[7] == '' then u[7] = m[2] or '' end
  end
end
-- 3. counters: per hash one HMGET and one HSET of the merged (total, decayed, time) triples; item hashes also
-- take the item's creator ('c') and topic ('t') as the chunk's impressions leave them
local NDT = {}  -- counter name -> its three field names, built once per script run
local function merge_hash(key, row, first, mc, mt)
  local fields = {}
  for j = first, #row, 4 do
    local name = row[j]
    local f = NDT[name]
    if f == nil then f = {'n:' .. name, 'd:' .. name, 't:' .. name}; NDT[name] = f end
    fields[#fields + 1] = f[1]
    fields[#fields + 1] = f[2]
    fields[#fields + 1] = f[3]
  end
  local got = redis.call('HMGET', key, unpack(fields))
  local out, g = {}, 0
  for j = first, #row, 4 do
    local n, v, t = row[j + 1], row[j + 2], row[j + 3]
    local n0, v0, t0 = tonumber(got[g + 1]), tonumber(got[g + 2]), tonumber(got[g + 3])
    if v0 ~= nil then n = n0 + n; v, t = merge(v0, t0, v, t) end
    out[#out + 1] = fields[g + 1]; out[#out + 1] = n
    out[#out + 1] = fields[g + 2]; out[#out + 1] = v
    out[#out + 1] = fields[g + 3]; out[#out + 1] = t
    g = g + 3
  end
  if mc ~= '' then out[#out + 1] = 'c'; out[#out + 1] = mc end
  if mt ~= '' then out[#out + 1] = 't'; out[#out + 1] = mt end
  redis.call('HSET', key, unpack(out))
end
local C = P.c
for i = 1, #C do local row = C[i]; merge_hash(p .. row[1], row, 4, row[2], row[3]) end
-- 4. per user: engaged items (sorted set by time, the last `keep`) and topic affinities
local R = P.r
for i = 1, #R do
  local row, rkey = R[i], p .. 'ur:' .. R[i][1]
  local args = {}
  for j = 2, #row, 2 do args[#args + 1] = row[j]; args[#args + 1] = row[j + 1] end
  redis.call('ZADD', rkey, 'GT', unpack(args))
  redis.call('ZREMRANGEBYRANK', rkey, 0, -(keep + 1))
end
local DT = {}  -- topic -> its two field names
local function merge_affinity(akey, row)  -- row: [user, topic, value, time, topic, ...]
  local fields = {}
  for j = 2, #row, 3 do
    local f = DT[row[j]]
    if f == nil then f = {'d:' .. row[j], 't:' .. row[j]}; DT[row[j]] = f end
    fields[#fields + 1] = f[1]; fields[#fields + 1] = f[2]
  end
  local got = redis.call('HMGET', akey, unpack(fields))
  local out, g = {}, -2
  for j = 2, #row, 3 do
    g = g + 2
    local v, t = row[j + 1], row[j + 2]
    local v0, t0 = tonumber(got[g + 1]), tonumber(got[g + 2])
    if v0 ~= nil then v, t = merge(v0, t0, v, t) end
    out[#out + 1] = fields[g + 1]; out[#out + 1] = v
    out[#out + 1] = fields[g + 2]; out[#out + 1] = t
  end
  redis.call('HSET', akey, unpack(out))
end
local A = P.a
for i = 1, #A do merge_affinity(p .. 'ua:' .. A[i][1], A[i]) end
-- 5. the records of step 2: [item, user, type, ts, value|false, creator, topic, affinity weight|false]
for i = 1, #U do
  local u = U[i]
  local etype, ts, value, creator, topic, w = u[3], u[4], u[5], u[6], u[7], u[8]
  if creator ~= '' then
    local row = {'', etype, 1, 1, ts}
    if value ~= false then row[6] = etype .. '_sum'; row[7] = value; row[8] = value; row[9] = ts end
    merge_hash(p .. 'c:' .. creator, row, 2, '', '')
  end
  if w ~= false and topic ~= '' then merge_affinity(p .. 'ua:' .. u[2], {u[2], topic, w, ts}) end
end
-- 6. the hard bound on dedupe keys: forget the oldest beyond `maxkeys` (their TTL would, later)
local n = redis.call('ZCARD', dq)
if n > maxkeys then redis.call('ZREMRANGEBYRANK', dq, 0, n - maxkeys - 1) end
if #K > 0 then redis.call('INCRBY', p .. 'applied', #K) end
redis.call('SET', chain, token, 'EX', 600)
return #K
"""


_LOOKUP_LUA = r"""
-- KEYS: recent set, affinity hash, then item / creator hashes. ARGV: keep, now, half-life, counter names.
local keep, now, H = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local fields = {}
for j = 4, #ARGV do
  local name = ARGV[j]
  fields[#fields + 1] = 'n:' .. name
  fields[#fields + 1] = 'd:' .. name
  fields[#fields + 1] = 't:' .. name
end
local function decayed(v, t)
  if now > t then return v * 2 ^ (-(now - t) / H) end
  return v
end
local aff = {}
local h = redis.call('HGETALL', KEYS[2])
local byname = {}
for i = 1, #h, 2 do byname[h[i]] = h[i + 1] end
for k, v in pairs(byname) do
  if string.sub(k, 1, 2) == 'd:' then
    local t = byname['t:' .. string.sub(k, 3)]
    if t then aff[#aff + 1] = string.sub(k, 3); aff[#aff + 1] = decayed(tonumber(v), tonumber(t)) end
  end
end
local flat = {}
for i = 3, #KEYS do
  local vals = redis.call('HMGET', KEYS[i], unpack(fields))
  for j = 1, #fields, 3 do
    local n, d, t = tonumber(vals[j]), tonumber(vals[j + 1]), tonumber(vals[j + 2])
    flat[#flat + 1] = n or 0
    if d and t then flat[#flat + 1] = decayed(d, t) else flat[#flat + 1] = 0 end
  end
end
return cjson.encode({redis.call('ZREVRANGE', KEYS[1], 0, keep - 1), aff, flat})
"""


class RedisStore(FeatureStore):
    """Keys under ``key_prefix``: ``i:<item>`` / ``c:<creator>`` hashes of ``n:``/``d:``/``t:``
    fields per counter (total, decayed value, its time), ``m:<item>`` (creator, topic),
    ``ur:<user>`` (sorted set of engaged items by time), ``ua:<user>`` (topic affinities),
    ``dedupe`` (a sorted set of the dedupe keys ``e:<event_id>`` / ``p:...`` scored by when they
    were applied: older than ``dedupe_ttl_s`` or beyond ``dedupe_max_keys`` they are dropped,
    oldest first), ``applied`` (records applied, ever).

    A chunk of a batch (``chunk`` records) is one atomic Lua script and one round trip: the
    records are aggregated here first -- per counter hash one merged (total, decayed value, time)
    triple per counter name, per user the newest ``recent_items`` engaged items and one merged
    pair per topic -- so the script does one ``HMGET`` + ``HSET`` per hash instead of several
    calls per record. Decayed pairs merge commutatively, so this equals applying the records
    one by one (up to float rounding, ~1e-15 relative). The aggregate assumes every record is
    new; the script checks all dedupe keys first and, if some exist already (a replay), applies
    nothing and names them, and the chunk is aggregated again without them."""

    def __init__(self, host: str, port: int, db: int, options: StoreOptions | None = None, password=None,
                 chunk: int = 2000):
        try:
            import redis
        except ImportError:
            raise _bad("store.url", "redis:// needs the 'redis' Python package (pip install redis==5.2.1)",
                       "missing") from None
        self.options = options or StoreOptions()
        self.url = f"redis://{host}:{port}/{db}"
        self.chunk = max(1, min(int(chunk), 3000))  # Lua's unpack() takes at most ~8000 values
        self._half = float(self.options.half_life_s)
        self.client = redis.Redis(host=host, port=port, db=db, password=password, socket_timeout=10,
                                  socket_connect_timeout=5, decode_responses=False)
        self._sha = hashlib.sha1(_APPLY_LUA.encode()).hexdigest()  # loaded on the first NOSCRIPT reply
        self._chain_id = uuid.uuid4().hex[:12]
        self._chain = f"{self.options.key_prefix}chain:{self._chain_id}"
        self._seq = 0
        self._lookup = self.client.register_script(_LOOKUP_LUA)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self.stats = {"applied": 0, "duplicates": 0, "invalid": 0, "replayed_chunks": 0}

    @property
    def durable(self) -> bool:
        return True

    def apply(self, batch: list[dict]) -> int:
        rows = []
        invalid = 0
        for raw in batch:
            rec = normalise(raw)
            if rec is None:
                invalid += 1
            else:
                rows.append(rec)
        self.stats["invalid"] += invalid
        new = self._apply_rows(rows) if rows else 0
        self.stats["applied"] += new
        return new

    IN_FLIGHT = 2  # chunks sent ahead: Redis runs one while this process aggregates the next

    def _apply_rows(self, rows: list) -> int:
        """Apply normalised rows chunk by chunk; each chunk whole or not at all (a retry of the
        batch dedupes). Chunks are pipelined on one connection: each script applies only if the
        one sent before it did (a chain token), so a chunk that turns out to be a partial replay
        is re-aggregated without its duplicates and everything after it is resent, in order --
        the result is the same as applying the chunks one after the other."""
        from redis.exceptions import NoScriptError, ResponseError

        o = self.options
        chunks = []
        dups = 0
        for start in range(0, len(rows), self.chunk):
            keys, uniq = set(), []
            for rec in rows[start:start + self.chunk]:  # a key twice in one chunk: the second is a duplicate
                if rec[0] not in keys:
                    keys.add(rec[0])
                    uniq.append(rec)
                else:
                    dups += 1
            if uniq:
                chunks.append(uniq)
        head = [o.key_prefix, repr(self._half), int(o.dedupe_ttl_s), int(o.recent_items), int(o.dedupe_max_keys),
                repr(time.time()), self._chain]
        new = 0
        nxt, prev = 0, ""  # next chunk to send; token of the last chunk sent (in flight or applied)
        flight: list = []  # [(chunk index, token)] sent, replies not read yet
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection("EVALSHA")
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc
        try:
            while nxt < len(chunks) or flight:
                if nxt < len(chunks) and len(flight) < self.IN_FLIGHT:
                    self._seq += 1
                    token = f"{self._chain_id}:{self._seq}"
                    conn.send_command("EVALSHA", self._sha, 0, *head, prev, token, self._payload(chunks[nxt]))
                    flight.append((nxt, token))
                    prev, nxt = token, nxt + 1
                    continue
                idx, _ = flight.pop(0)
                try:
                    got = conn.read_response()
                except NoScriptError:  # a restarted server: load the script, resend from here
                    for _ in flight:
                        try:
                            conn.read_response()
                        except ResponseError:
                            pass
                    self._sha = self.client.script_load(_APPLY_LUA)
                    flight, nxt, prev = [], idx, ""
                    continue
                if not isinstance(got, list):
                    new += int(got)
                    continue
                for _ in flight:  # the chunks sent after this one did not apply (their chain broke)
                    conn.read_response()
                flight, nxt, prev = [], idx, ""
                if int(got[0]) == -1:  # some keys were applied before (a replay): aggregate the rest again
                    seen = {int(i) - 1 for i in got[1:]}
                    self.stats["replayed_chunks"] += 1
                    dups += len(seen)
                    chunks[idx] = [rec for i, rec in enumerate(chunks[idx]) if i not in seen]
                    if not chunks[idx]:
                        nxt = idx + 1
        except self._errors as exc:
            conn.disconnect()
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc
        except BaseException:
            conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(conn)
            self.stats["duplicates"] += dups
        return new

    def _payload(self, recs: list) -> str:
        """The JSON the apply script reads: ``k`` dedupe keys; ``c`` [hash, creator, topic, name,
        total, decayed, time, name, ...] per counter hash (creator / topic: of an item hash, as the
        chunk's impressions leave them, else "");
        ``r`` [user, ts, item, ...] (the newest ``recent_items`` per user); ``a`` [user, topic,
        decayed, time, ...]; ``u`` events (and impressions) whose creator or topic only Redis
        knows: [item, user, type, ts, value|false, creator|"", topic|"", weight|false]."""
        half = self._half
        aff_w = self.options.affinity
        item_tot: dict = {}  # counter name -> item -> total
        item_dec: dict = {}  # counter name -> item -> decayed + time*1j
        creator_tot: dict = {}
        creator_dec: dict = {}
        creator_of: dict = {}
        topic_of: dict = {}
        recent: dict = {}
        affinity: dict = {}
        unresolved = []

        for key, ts, user, item, creator, topic, etype, value in recs:
            name, creator, topic = item_meta(creator_of, topic_of, item, creator, topic, etype)
            bump(item_tot, item_dec, item, name, ts, 1.0, half)
            if etype is None:
                if creator is not None:
                    bump(creator_tot, creator_dec, creator, IMPRESSIONS, ts, 1.0, half)
                else:
                    unresolved.append([item, user, IMPRESSIONS, ts, False, "", "", False])
                continue
            if value is not None:
                bump(item_tot, item_dec, item, etype + "_sum", ts, value, half)
            w = aff_w.get(etype)
            if w is not None and w > 0:
                r = recent.get(user)
                if r is None:
                    recent[user] = {item: ts}
                elif ts > r.get(item, -1.0):
                    r[item] = ts
            if creator is None or (w is not None and topic is None):
                unresolved.append([item, user, etype, ts, False if value is None else value, creator or "",
                                   topic or "", False if w is None else w])
                continue
            bump(creator_tot, creator_dec, creator, etype, ts, 1.0, half)
            if value is not None:
                bump(creator_tot, creator_dec, creator, etype + "_sum", ts, value, half)
            if w is not None:
                add_affinity(affinity, user, topic, w, ts, half)
        keep = int(self.options.recent_items)
        most = _ROW_ITEMS  # per row: Lua's unpack() takes at most ~8000 values; a longer row is split
        r_rows = []
        for user, items in recent.items():
            pairs = items.items()
            if len(items) > keep:  # only the newest can survive the trim (ties: by item, as ZSET ranks)
                pairs = sorted(pairs, key=lambda kv: (kv[1], kv[0]))[-keep:]
            row = [user]
            for item, ts in pairs:
                if len(row) > 2 * most:
                    r_rows.append(row)
                    row = [user]
                row += (ts, item)
            r_rows.append(row)
        c_rows = []
        for kind, totals, decayed in (("i:", item_tot, item_dec), ("c:", creator_tot, creator_dec)):
            for entity, names in counters_by_entity(totals, decayed).items():
                hkey = kind + entity
                row = ([hkey, creator_of.get(entity) or "", topic_of.get(entity) or ""] if kind == "i:" else
                       [hkey, "", ""])
                for name, c in names.items():
                    if len(row) > 4 * most:
                        c_rows.append(row)
                        row = [hkey, "", ""]
                    row += (name, *c)
                c_rows.append(row)
        a_rows = []
        for user, topics in affinity.items():
            row = [user]
            for topic, pair in topics.items():
                if len(row) > 3 * most:
                    a_rows.append(row)
                    row = [user]
                row += (topic, pair.real, pair.imag)
            a_rows.append(row)
        return json.dumps({"k": [rec[0] for rec in recs], "c": c_rows, "r": r_rows, "a": a_rows, "u": unresolved},
                          separators=(",", ":"), ensure_ascii=False)

    def lookup(self, user_id, item_ids, creator_ids=None, now=None) -> RealtimeFeatures:
        now = time.time() if now is None else float(now)
        p, half = self.options.key_prefix, self.options.half_life_s
        creator_ids = list(creator_ids) if creator_ids is not None else [None] * len(item_ids)
        uniq_creators = sorted({c for c in creator_ids if c is not None})
        keys = [f"{p}ur:{user_id}", f"{p}ua:{user_id}"]
        keys += [f"{p}i:{i}" for i in item_ids]
        keys += [f"{p}c:{c}" for c in uniq_creators]
        names = list(self.options.counters)
        try:
            raw = self._lookup(keys=keys, args=[int(self.options.recent_items), repr(now), repr(float(half)), *names])
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc
        recent, aff, flat = (x if isinstance(x, list) else [] for x in json.loads(raw))  # cjson: [] -> {}
        affinity = dict(zip(aff[::2], (float(v) for v in aff[1::2])))
        n_c = len(names)
        grid = np.asarray(flat, dtype=float).reshape(len(keys) - 2, n_c, 2) if flat else np.zeros((len(keys) - 2, n_c, 2))
        n_i = len(item_ids)
        pos = {c: n_i + k for k, c in enumerate(uniq_creators)}
        rows = np.array([pos[c] if c is not None else -1 for c in creator_ids], dtype=int)
        cgrid = np.where((rows >= 0)[:, None, None], grid[rows], 0.0) if len(rows) else np.zeros((0, n_c, 2))
        items_tot = {name: grid[:n_i, j, 0].copy() for j, name in enumerate(names)}
        items_dec = {name: grid[:n_i, j, 1].copy() for j, name in enumerate(names)}
        cre_tot = {name: cgrid[:, j, 0].copy() for j, name in enumerate(names)}
        cre_dec = {name: cgrid[:, j, 1].copy() for j, name in enumerate(names)}
        return RealtimeFeatures(user_id, now, list(recent), affinity, items_dec, cre_dec, items_tot, cre_tot,
                                len(item_ids), len(creator_ids))

    def applied_total(self) -> int:
        """Records applied (new, not duplicates) by every writer of this prefix, ever."""
        try:
            return int(self.client.get(self.options.key_prefix + "applied") or 0)
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc

    def close(self) -> None:
        self.client.close()
