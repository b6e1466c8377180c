"""The Redis feature store (``redis://HOST:PORT/DB``), shared by several scorer replicas; its two Lua
scripts live in ``lua/`` next to this module."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from importlib.resources import files

import numpy as np

from .base import (IMPRESSIONS, SCORE_EPOCH, TOP_KEEP, FeatureStore, RealtimeFeatures, StoreOptions, StoreUnavailable,
                   add_affinity, best_decayed, bump, co_best, counters_by_entity, item_meta, normalise, store_error)

_ROW_ITEMS = 500
_LUA = files(__package__).joinpath("lua")
APPLY_LUA = _LUA.joinpath("apply.lua").read_text(encoding="utf-8")  # one chunk of a batch, atomically
LOOKUP_LUA = _LUA.joinpath("lookup.lua").read_text(encoding="utf-8")  # everything a request reads
TOP_LUA = _LUA.joinpath("top.lua").read_text(encoding="utf-8")  # the best items of a counter


class RedisStore(FeatureStore):
    """Keys under ``key_prefix``: ``i:<item>`` / ``c:<creator>`` hashes of ``n:``/``d:``/``t:``
    fields per counter (total, decayed value, its time), ``m:<item>`` (creator, topic),
    ``ur:<user>`` (sorted set of engaged items by time), ``ua:<user>`` (topic affinities),
    ``top:<counter>`` (sorted set of items by ``log2(value) + (time - SCORE_EPOCH) / half_life_s``,
    the order of their decayed values at any time, the best ``TOP_KEEP``; items whose value is not
    positive are removed), ``co:<item>`` (sorted set of its co-engaged items by the same kind of log
    score, :func:`base.co_add`, the best ``co_neighbours``), ``dedupe`` (a sorted set of the dedupe
    keys ``e:<event_id>`` / ``p:...`` scored by when they were applied: older than ``dedupe_ttl_s`` or beyond ``dedupe_max_keys`` they are dropped,
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
            raise store_error("store.url", "redis:// needs the 'redis' Python package (pip install redis==5.2.1)",
                              "missing") from None
        self.options = options or StoreOptions()
        self.url = f"redis://{host}:{port}/{db}"
        self.chunk = max(1, min(int(chunk), 3000))  # Lua's unpack() takes at most ~8000 values
        self._half = float(self.options.half_life_s)
        self.client = redis.Redis(host=host, port=port, db=db, password=password, socket_timeout=10,
                                  socket_connect_timeout=5, decode_responses=False)
        self._sha = hashlib.sha1(APPLY_LUA.encode()).hexdigest()  # loaded on the first NOSCRIPT reply
        self._chain_id = uuid.uuid4().hex[:12]
        self._chain = f"{self.options.key_prefix}chain:{self._chain_id}"
        self._seq = 0
        self._lookup = self.client.register_script(LOOKUP_LUA)
        self._top = self.client.register_script(TOP_LUA)
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
                    conn.send_command("EVALSHA", self._sha, 0, *head, prev, token, self._payload(chunks[nxt]),
                                      repr(SCORE_EPOCH), TOP_KEEP, int(o.co_neighbours))
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
                    self._sha = self.client.script_load(APPLY_LUA)
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
        decayed, time, ...]; ``e`` [user, ts, item, ...] every engagement in record order; ``u`` events
        (and impressions) whose creator or topic only Redis knows: [item, user, type, ts, value|false, creator|"", topic|"", weight|false]."""
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
        engaged: list = []  # user, ts, item of every engagement, in record order (co-engagement)

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
                engaged += (user, ts, item)
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
        return json.dumps({"k": [rec[0] for rec in recs], "c": c_rows, "r": r_rows, "a": a_rows, "u": unresolved,
                           "e": engaged},
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

    def co_engaged(self, item_ids, n, now=None) -> list[tuple[str, float]]:
        now = time.time() if now is None else float(now)
        seeds = list(dict.fromkeys(item_ids))
        p = self.options.key_prefix
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for item in seeds:
                    pipe.zrange(f"{p}co:{item}", 0, -1, withscores=True)
                rows = pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc
        return co_best([[(j.decode(), s) for j, s in row] for row in rows], seeds, int(n), now, self._half)

    def top_items(self, counter, n, now=None) -> list[tuple[str, float]]:
        """Exact for ``n`` up to ``TOP_KEEP`` (at most that many are returned)."""
        now = time.time() if now is None else float(now)
        n = min(int(n), TOP_KEEP)
        if n <= 0:
            return []
        p = self.options.key_prefix
        try:
            flat = self._top(keys=[f"{p}top:{counter}"], args=[p, counter, n])
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc
        ids = [i.decode() for i in flat[::3]]
        return best_decayed(ids, [float(v) for v in flat[1::3]], [float(t) for t in flat[2::3]], n, now, self._half)

    def record_progress(self, consumer: str, newest_ts: float | None, caught_up: bool) -> None:
        prefix = self.options.key_prefix
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.sadd(prefix + "nearline", consumer)
                pipe.hset(prefix + "nearline:" + consumer, mapping={
                    "newest_ts": "" if newest_ts is None else repr(float(newest_ts)),
                    "caught_up": int(bool(caught_up)), "updated_at": repr(time.time())})
                pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc

    def nearline_progress(self) -> list[dict]:
        prefix = self.options.key_prefix
        try:
            names = sorted(n.decode() for n in self.client.smembers(prefix + "nearline"))
            with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(prefix + "nearline:" + name)
                rows = pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc
        out = []
        for name, row in zip(names, rows):
            newest = row.get(b"newest_ts", b"")
            out.append({"consumer": name, "newest_ts": float(newest) if newest else None,
                        "caught_up": row.get(b"caught_up") == b"1",
                        "updated_at": float(row.get(b"updated_at", b"0") or 0)})
        return out

    def applied_total(self) -> int:
        """Records applied (new, not duplicates) by every writer of this prefix, ever."""
        try:
            return int(self.client.get(self.options.key_prefix + "applied") or 0)
        except self._errors as exc:
            raise StoreUnavailable(f"redis {self.url}: {exc}") from exc

    def close(self) -> None:
        self.client.close()
