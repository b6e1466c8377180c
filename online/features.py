"""The real-time feature store: what the near-line consumer learns from impressions and events.

Per user: the last ``recent_items`` (50) engaged item ids, most recent first, and topic
affinities (a decayed sum of engagement weights per topic). Per item and per creator: for
impressions and for every event type a raw total and a counter with exponential time decay
(``half_life_s``); events that carry a ``value`` (watch seconds) also feed ``<type>_sum``.

Applying is idempotent: an event is counted once per ``event_id`` and an impression once per
``(request_id, item_id)``, so a replay after a crash never double counts (the dedupe keys live
``dedupe_ttl_s``). Decayed counters are stored as ``(value, time of value)`` pairs, so the result
does not depend on the order in which events arrive (up to float rounding, ~1e-15 relative).

Backends (:func:`open_store`): ``memory://`` (default; ``memory://PATH`` snapshots to ``PATH``
and restores from it on open) and ``redis://HOST:PORT/DB`` (shared by several scorer replicas;
a batch is applied by one Lua script, atomically). :meth:`FeatureStore.lookup` reads everything
a request needs in one round trip.

Which creator and topic an event belongs to: the event's own ``creator_id`` / ``topic`` when it
carries them (the scorer may add them), otherwise what the impressions of its item said.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from strategy.errors import FieldError, ValidationError, did_you_mean

log = logging.getLogger("stratarank.features")

SCHEMES = ("memory", "redis")
DEFAULT_COUNTERS = ("impressions", "click", "like", "share", "comment", "follow", "report", "watch", "watch_sum")
DEFAULT_AFFINITY = {"click": 1.0, "like": 2.0, "share": 3.0, "comment": 2.0, "follow": 3.0, "long_view": 1.0,
                    "watch": 1.0, "report": -5.0}
IMPRESSIONS = "impressions"


class StoreUnavailable(RuntimeError):
    """The store's server cannot be reached: the scorer serves without real-time features, the
    near-line consumer retries the batch (nothing is committed meanwhile)."""


@dataclass(frozen=True)
class StoreOptions:
    """Behaviour shared by both backends (``store:`` in ``conf/service.yaml``)."""

    half_life_s: float = 3600.0
    recent_items: int = 50
    dedupe_ttl_s: int = 7 * 86400
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
    ts = ts if type(ts) is float and 0.0 <= ts < math.inf else _ts(ts)
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
    allowed = ("half_life_s", "recent_items", "dedupe_ttl_s", "affinity", "counters", "key_prefix")
    errs = []
    for k in options:
        if k not in allowed:
            errs.append(FieldError(f"store.{k}", f"unknown option '{k}'{did_you_mean(k, allowed)} "
                                                 f"(allowed: {', '.join(sorted(allowed))})", "unknown_key"))
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


def _decay(v: float, t: float, now: float, half_life: float) -> float:
    return v * 2.0 ** (-(now - t) / half_life) if now > t else v


# ---------------------------------------------------------------- memory


class MemoryStore(FeatureStore):
    """Dicts in this process, guarded by a lock (the near-line thread applies while request
    threads look up). ``snapshot()`` writes a JSON file atomically; opening restores it."""

    VERSION = 1

    def __init__(self, snapshot_path=None, options: StoreOptions | None = None):
        self.options = options or StoreOptions()
        self._half = float(self.options.half_life_s)
        self.snapshot_path = Path(snapshot_path) if snapshot_path else None
        self.url = f"memory://{snapshot_path or ''}"
        self._lock = threading.Lock()  # readers (lookup) vs the writer, held per chunk of 500 records
        self._write_lock = threading.Lock()  # writers (apply, snapshot) among themselves
        self.items: dict[str, dict[str, list]] = {}  # item -> name -> [total, decayed, t]
        self.creators: dict[str, dict[str, list]] = {}
        self.meta: dict[str, list] = {}  # item -> [creator, topic]
        self.recent: dict[str, dict[str, float]] = {}  # user -> item -> last engagement ts
        self.affinity: dict[str, dict[str, list]] = {}  # user -> topic -> [decayed, t]
        self.seen: dict[str, float] = {}  # dedupe key -> expiry (epoch s)
        self.stats = {"applied": 0, "duplicates": 0, "invalid": 0}
        if self.snapshot_path is not None and self.snapshot_path.exists():
            self._restore(self.snapshot_path)

    def _bump(self, table: dict, entity: str, name: str, ts: float, w: float) -> None:
        counters = table.get(entity)
        if counters is None:
            table[entity] = {name: [w, w, ts]}
            return
        c = counters.get(name)
        if c is None:
            counters[name] = [w, w, ts]
            return
        c[0] += w
        t = c[2]
        if ts >= t:
            c[1] = c[1] * 2.0 ** (-(ts - t) / self._half) + w
            c[2] = ts
        else:
            c[1] += w * 2.0 ** (-(t - ts) / self._half)

    def apply(self, batch: list[dict]) -> int:
        new = 0
        with self._write_lock:
            for start in range(0, len(batch), 500):  # short lock holds: lookups interleave
                with self._lock:
                    new += self._apply(batch[start:start + 500])
        return new

    def _apply(self, batch) -> int:
        opts = self.options
        seen, expiry = self.seen, time.time() + opts.dedupe_ttl_s
        aff_w, keep, half = opts.affinity, opts.recent_items, self._half
        bump = self._bump
        new = 0
        for raw in batch:
            rec = normalise(raw)
            if rec is None:
                self.stats["invalid"] += 1
                continue
            key, ts, user, item, creator, topic, etype, value = rec
            if key in seen:
                self.stats["duplicates"] += 1
                continue
            seen[key] = expiry
            new += 1
            meta = self.meta.get(item)
            if etype is None:
                if creator is not None or topic is not None:
                    if meta is None:
                        meta = self.meta[item] = [None, None]
                    if creator is not None:
                        meta[0] = creator
                    if topic is not None:
                        meta[1] = topic
                bump(self.items, item, IMPRESSIONS, ts, 1.0)
                if creator is None and meta is not None:
                    creator = meta[0]
                if creator is not None:
                    bump(self.creators, creator, IMPRESSIONS, ts, 1.0)
                continue
            if meta is not None:
                creator = creator if creator is not None else meta[0]
                topic = topic if topic is not None else meta[1]
            bump(self.items, item, etype, ts, 1.0)
            if value is not None:
                bump(self.items, item, etype + "_sum", ts, value)
            if creator is not None:
                bump(self.creators, creator, etype, ts, 1.0)
                if value is not None:
                    bump(self.creators, creator, etype + "_sum", ts, value)
            w = aff_w.get(etype)
            if w is None:
                continue
            if w > 0:
                recent = self.recent.get(user)
                if recent is None:
                    recent = self.recent[user] = {}
                old = recent.get(item)
                if old is None or ts > old:
                    recent[item] = ts
                    if len(recent) > keep:
                        worst = min(recent.items(), key=lambda kv: (kv[1], kv[0]))[0]
                        del recent[worst]
            if topic is not None:
                aff = self.affinity.get(user)
                if aff is None:
                    aff = self.affinity[user] = {}
                a = aff.get(topic)
                if a is None:
                    aff[topic] = [w, ts]
                elif ts >= a[1]:
                    a[0] = a[0] * 2.0 ** (-(ts - a[1]) / half) + w
                    a[1] = ts
                else:
                    a[0] += w * 2.0 ** (-(a[1] - ts) / half)
        self.stats["applied"] += new
        return new

    def lookup(self, user_id, item_ids, creator_ids=None, now=None) -> RealtimeFeatures:
        now = time.time() if now is None else float(now)
        half = self.options.half_life_s
        creator_ids = list(creator_ids) if creator_ids is not None else [None] * len(item_ids)
        with self._lock:
            recent = self.recent.get(user_id, {})
            recent_items = [i for i, _ in sorted(recent.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]
            affinity = {t: _decay(a[0], a[1], now, half) for t, a in self.affinity.get(user_id, {}).items()}
            item_rows = [self.items.get(i) for i in item_ids]
            creator_rows = [self.creators.get(c) if c is not None else None for c in creator_ids]
            items_dec, items_tot = _arrays(item_rows, self.options.counters, now, half)
            cre_dec, cre_tot = _arrays(creator_rows, self.options.counters, now, half)
        return RealtimeFeatures(user_id, now, recent_items, affinity, items_dec, cre_dec, items_tot, cre_tot,
                                len(item_ids), len(creator_ids))

    # ---- persistence

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
            state = {"version": self.VERSION, "written": now, "half_life_s": self.options.half_life_s,
                     "items": self.items, "creators": self.creators, "meta": self.meta, "recent": self.recent,
                     "affinity": self.affinity, "seen": self.seen, "stats": self.stats}
            text = json.dumps(state, separators=(",", ":"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # writers never share one
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
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
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _bad("store.snapshot_path", f"cannot restore snapshot {path}: {exc}", "io") from None
        if not isinstance(state, dict) or state.get("version") != self.VERSION:
            raise _bad("store.snapshot_path", f"{path} is not a version-{self.VERSION} feature store snapshot")
        if state.get("half_life_s") != self.options.half_life_s:
            log.warning("snapshot %s was written with half_life_s=%s, now %s", path, state.get("half_life_s"),
                        self.options.half_life_s)
        self.items, self.creators, self.meta = state["items"], state["creators"], state["meta"]
        self.recent, self.affinity, self.seen = state["recent"], state["affinity"], state["seen"]
        self.stats.update(state.get("stats", {}))

    def close(self) -> None:
        pass


def _arrays(rows, counters, now, half):
    """``({name: decayed}, {name: total})`` arrays over the configured counter names."""
    names = list(counters)
    zero = (0.0, 0.0, now)
    flat = [c for row in rows for c in ((row.get(name, zero) for name in names) if row else (zero,) * len(names))]
    grid = np.asarray(flat, dtype=float).reshape(len(rows), len(names), 3) if rows else np.zeros((0, len(names), 3))
    decayed = grid[:, :, 1] * np.exp2(-np.maximum(now - grid[:, :, 2], 0.0) / half)
    return ({name: decayed[:, j].copy() for j, name in enumerate(names)},
            {name: grid[:, j, 0].copy() for j, name in enumerate(names)})


# ---------------------------------------------------------------- redis

_APPLY_LUA = r"""
local p, H, ttl, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local recs = cjson.decode(ARGV[5])
local aff = cjson.decode(ARGV[6])
local function fmt(x) return string.format('%.17g', x) end
local function bump(key, name, ts, w)
  local nn, dn, tn = 'n:' .. name, 'd:' .. name, 't:' .. name
  local got = redis.call('HMGET', key, nn, dn, tn)
  local n, v, t = tonumber(got[1]), tonumber(got[2]), tonumber(got[3])
  if v == nil then n, v, t = w, w, ts
  else
    n = n + w
    if ts >= t then v = v * 2 ^ (-(ts - t) / H) + w; t = ts
    else v = v + w * 2 ^ (-(t - ts) / H) end
  end
  redis.call('HSET', key, nn, fmt(n), dn, fmt(v), tn, fmt(t))
end
local new = 0
for i = 1, #recs do
  local r = recs[i]
  local key, ts, user, item, creator, topic, etype, value = r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]
  if redis.call('SET', p .. key, '1', 'NX', 'EX', ttl) then
    new = new + 1
    local mkey = p .. 'm:' .. item
    if etype == '' then
      if creator ~= '' then redis.call('HSET', mkey, 'c', creator) end
      if topic ~= '' then redis.call('HSET', mkey, 't', topic) end
      if creator == '' then creator = redis.call('HGET', mkey, 'c') or '' end
      bump(p .. 'i:' .. item, 'impressions', ts, 1)
      if creator ~= '' then bump(p .. 'c:' .. creator, 'impressions', ts, 1) end
    else
      if creator == '' or topic == '' then
        local m = redis.call('HMGET', mkey, 'c', 't')
        if creator == '' then creator = m[1] or '' end
        if topic == '' then topic = m[2] or '' end
      end
      bump(p .. 'i:' .. item, etype, ts, 1)
      if value ~= false then bump(p .. 'i:' .. item, etype .. '_sum', ts, value) end
      if creator ~= '' then
        bump(p .. 'c:' .. creator, etype, ts, 1)
        if value ~= false then bump(p .. 'c:' .. creator, etype .. '_sum', ts, value) end
      end
      local w = aff[etype]
      if w ~= nil then
        if w > 0 then
          local rkey = p .. 'ur:' .. user
          redis.call('ZADD', rkey, 'GT', fmt(ts), item)
          redis.call('ZREMRANGEBYRANK', rkey, 0, -(keep + 1))
        end
        if topic ~= '' then
          local akey = p .. 'ua:' .. user
          local got = redis.call('HMGET', akey, 'd:' .. topic, 't:' .. topic)
          local v, t = tonumber(got[1]), tonumber(got[2])
          if v == nil then v, t = w, ts
          elseif ts >= t then v = v * 2 ^ (-(ts - t) / H) + w; t = ts
          else v = v + w * 2 ^ (-(t - ts) / H) end
          redis.call('HSET', akey, 'd:' .. topic, fmt(v), 't:' .. topic, fmt(t))
        end
      end
    end
  end
end
if new > 0 then redis.call('INCRBY', p .. 'applied', new) end
return new
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
    ``e:<event_id>`` / ``p:...`` dedupe keys with a TTL, ``applied`` (records applied, ever).
    A batch is one atomic Lua script."""

    def __init__(self, host: str, port: int, db: int, options: StoreOptions | None = None, password=None,
                 chunk: int = 2000):
        try:
            import redis
        except ImportError:
            raise _bad("store.url", "redis:// needs the 'redis' Python package (pip install redis==5.2.1)",
                       "missing") from None
        self.options = options or StoreOptions()
        self.url = f"redis://{host}:{port}/{db}"
        self.chunk = chunk
        self.client = redis.Redis(host=host, port=port, db=db, password=password, socket_timeout=10,
                                  socket_connect_timeout=5, decode_responses=False)
        self._script = self.client.register_script(_APPLY_LUA)
        self._lookup = self.client.register_script(_LOOKUP_LUA)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        self._aff = json.dumps(self.options.affinity)
        self.stats = {"applied": 0, "duplicates": 0, "invalid": 0}

    @property
    def durable(self) -> bool:
        return True

    def apply(self, batch: list[dict]) -> int:
        o = self.options
        rows = []
        for raw in batch:
            rec = normalise(raw)
            if rec is None:
                self.stats["invalid"] += 1
                continue
            key, ts, user, item, creator, topic, etype, value = rec
            rows.append([key, ts, user, item, creator or "", topic or "", etype or "",
                         False if value is None else value])
        new = 0
        for start in range(0, len(rows), self.chunk):
            part = rows[start:start + self.chunk]
            try:  # a chunk is applied whole or not at all; a retry of the batch dedupes
                n = int(self._script(args=[o.key_prefix, repr(float(o.half_life_s)), int(o.dedupe_ttl_s),
                                           int(o.recent_items), json.dumps(part), self._aff]))
            except self._errors as exc:
                raise StoreUnavailable(f"redis {self.url}: {exc}") from exc
            new += n
            self.stats["duplicates"] += len(part) - n
        self.stats["applied"] += new
        return new

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
