"""The in-process feature store (``memory://[PATH]``) and its snapshot file: version 2 writes each
table by column; a version-1 snapshot (per-entity lists, the earlier layout) still restores."""
from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import orjson

from .base import (IMPRESSIONS, FeatureStore, RealtimeFeatures, StoreOptions, add_affinity, best_decayed, bump, co_add,
                   co_best, item_meta, log_time, normalise, store_error)

log = logging.getLogger("stratarank.features")


def _value_key(kv):
    return kv[1], kv[0]


def newest_recent(recent: dict, keep: int) -> list:
    """The ``keep`` newest ``(item, ts)`` of a user's ``{item: ts}``, newest first (ties: larger id first)."""
    return heapq.nlargest(keep, recent.items(), key=_value_key)


def _decay(v: float, t: float, now: float, half_life: float) -> float:
    return v * 2.0 ** (-(now - t) / half_life) if now > t else v


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
        # item -> co-engaged item -> log score (base.co_add), at most co_neighbours each after every chunk
        self.co: dict[str, dict[str, float]] = {}
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
        co, touched = self.co, set()
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
                window = newest_recent(recent, keep) if recent else ()
                if all(i != item for i, _ in window):  # a new item among the user's recent ones: co-engaged
                    x = log_time(ts, half)
                    for i, _ in window:
                        for a, b in ((i, item), (item, i)):
                            nb = co.get(a)
                            if nb is None:
                                nb = co[a] = {}
                            nb[b] = co_add(nb.get(b), x)
                            touched.add(a)
                old = recent.get(item)
                if old is None or ts > old:
                    recent[item] = ts
                    if len(recent) > 2 * keep:
                        recent = recents[user] = dict(newest_recent(recent, keep))
            if topic is not None:
                add_affinity(affinities, user, topic, w, ts, half)
        most = opts.co_neighbours
        for a in touched:  # the weakest neighbours beyond the bound go, ties by id (as a Redis ZSET ranks)
            nb = co[a]
            if len(nb) > most:
                co[a] = dict(heapq.nlargest(most, nb.items(), key=_value_key))
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

    def co_engaged(self, item_ids, n, now=None) -> list[tuple[str, float]]:
        now = time.time() if now is None else float(now)
        seeds = list(dict.fromkeys(item_ids))
        with self._lock:
            rows = [list(self.co.get(i, {}).items()) for i in seeds]
        return co_best(rows, seeds, int(n), now, self._half)

    def top_items(self, counter, n, now=None) -> list[tuple[str, float]]:
        now = time.time() if now is None else float(now)
        with self._lock:   # a copy of one dict: a few ms for 100k items, done every few seconds
            col = dict(self.item_decayed.get(counter, {}))
        packed = np.fromiter(col.values(), dtype=np.complex128, count=len(col))
        return best_decayed(list(col), packed.real, packed.imag, int(n), now, self._half)

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
                "affinity": _affinity_rows(self.affinity), "co": _co_rows(self.co), "seen": self.seen,
                "stats": self.stats})
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
            raise store_error("store.snapshot_path", f"cannot restore snapshot {path}: {exc}", "io") from None
        version = state.get("version") if isinstance(state, dict) else None
        if version not in (1, self.VERSION):
            raise store_error("store.snapshot_path", f"{path} is not a feature store snapshot of version 1 or "
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
            self.co = _from_co_rows(state["co"]) if "co" in state else {}  # absent: written before co-engagement
            self.recent, self.seen = dict(state["recent"]), dict(state["seen"])
            self.stats.update(state.get("stats", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise store_error("store.snapshot_path", f"cannot restore snapshot {path}: malformed "
                                                     f"version-{version} snapshot ({type(exc).__name__}: {exc})",
                              "io") from None
        self._evict_dedupe()  # dedupe_max_keys may have been lowered since

    def close(self) -> None:
        pass


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


def _co_rows(co: dict) -> list:
    """[items, neighbours, log scores], a row per co-engaged pair."""
    items, neighbours, scores = [], [], []
    for item, nb in co.items():
        for j, score in nb.items():
            items.append(item)
            neighbours.append(j)
            scores.append(score)
    return [items, neighbours, scores]


def _from_co_rows(rows: list) -> dict:
    """The inverse of :func:`_co_rows`: item -> neighbour -> log score."""
    items, neighbours, scores = rows
    if not len(items) == len(neighbours) == len(scores):
        raise ValueError("co: columns of different lengths")
    out: dict = {}
    for item, j, score in zip(items, neighbours, scores):
        nb = out.get(item)
        if nb is None:
            nb = out[item] = {}
        nb[j] = float(score)
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
