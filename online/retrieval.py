"""Retrieval: the candidates of ``POST /v1/feed`` found in the engine's own corpus, and ``POST /v1/retrieve``.

A :class:`Retriever` (one per scorer process) keeps the corpus's retrievable items in an
:class:`online.ann.AnnIndex` of two-tower item vectors (``ranking.two_tower``) and answers a
request's :class:`strategy.retrieval.RetrievalPlan` from six sources:

- ``ann``: the user's vector (user id, recent items, topic affinities from the near-line store);
- ``similar``: near the vectors of the items the user engaged with last (item to item);
- ``co_engaged``: the items other users engaged with together with those (``FeatureStore.co_engaged``);
- ``fresh``: the youngest items of the corpus, LLM-generated ones first, ordered by the user's vector;
- ``trending``: the items with the highest decayed near-line counter (``FeatureStore.top_items``);
- ``explore``: drawn uniformly from the index, so items nobody has engaged with yet get impressions.

The pool is filled one item per source in turn (each up to its ``count`` and its ``max_share`` of the
pool), so every source keeps its share; an item two sources found records both. Items the user
engaged with recently are left out. The pool is read back from the corpus (blocked and expired items
drop out there, whatever the index still holds) and becomes ``/v1/rank`` candidates.

Freshness: a background thread follows :meth:`online.corpus.Corpus.changes_since` every
``sync_interval_s`` (encodes new and updated items, removes blocked ones) and removes items when
their ``expires_at`` passes, so an item written to the corpus is retrievable about
``sync_interval_s`` plus an encode later. When the two-tower model's registry pointer moves, a second
thread builds a new index with the new item tower, catches up with the corpus and swaps encoder and
index as one (queries and item vectors always come from the same model). A model that scores
freshness (``ranking.two_tower``: item vectors carry ``2^((born - t0) / h)`` for the index's reference
time ``t0``) is re-based the same way, on a new ``t0``, every few learnt half-lives.

Configuration, ``retrieval:`` in ``conf/service.yaml``::

    retrieval: {model: two_tower, registry: null, index: {kind: auto, ef_search: 128},
                sync_interval_s: 0.5, trending_refresh_s: 5, follow_current: true, poll_s: 5, threads: 1}

Without ``model`` (or while it cannot load) the ``ann``, ``similar`` and ``explore`` sources are
unavailable and a feed is built from the others; ``/v1/retrieve`` answers 503.
"""
from __future__ import annotations

import gc
import heapq
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from strategy.checks import as_bool, as_dict, as_number, as_str, check_keys
from strategy.errors import Errors, join_path
from strategy.retrieval import RetrievalPlan
from strategy.schema import Candidate, Generator

from .ann import KINDS, AnnIndex
from .corpus import Corpus, Item
from .features import StoreUnavailable

log = logging.getLogger("stratarank.retrieval")

RETRIEVAL_KEYS = ("model", "registry", "index", "sync_interval_s", "trending_refresh_s", "follow_current", "poll_s",
                  "threads", "batch_size", "gc_freeze")
INDEX_KEYS = ("kind", "hnsw_m", "ef_construction", "ef_search", "nprobe", "flat_max_items", "hnsw_max_items")
TRENDING_DEPTH = 1000  # items kept per trending counter (the most any source count may ask for is 2000)


@dataclass(frozen=True)
class RetrievalConfig:
    model: str | None = None          # registry ref of the two-tower model ("two_tower", "two_tower@v3")
    registry: str | None = None       # None: the model registry of the service (model.registry)
    index: dict = field(default_factory=lambda: {"kind": "auto", "ef_search": 128})  # AnnIndex arguments
    sync_interval_s: float = 0.5      # how often the corpus's changes reach the index
    trending_refresh_s: float = 5.0   # how often the trending lists are re-read from the store
    follow_current: bool = True       # rebuild the index when the model's current version moves
    poll_s: float = 5.0
    threads: int = 1                  # faiss threads per searching thread
    batch_size: int = 2000            # items read and encoded at a time while syncing
    gc_freeze: bool = True            # after a bulk index, exempt the heap from garbage collection (gc.freeze)


def retrieval_config_from_dict(errs: Errors, value, path: str = "retrieval") -> RetrievalConfig:
    """The ``retrieval:`` section of the service YAML (absent or null: the defaults, no model)."""
    d = RetrievalConfig()
    if value is None:
        return d
    obj = as_dict(errs, value, path)
    if obj is None:
        return d
    before = len(errs.items)
    check_keys(errs, obj, path, RETRIEVAL_KEYS)
    p = lambda key: join_path(path, key)  # noqa: E731 - a local path helper
    out: dict = {}
    for key in ("model", "registry"):
        if obj.get(key) is not None:
            out[key] = as_str(errs, obj[key], p(key), max_len=1000)
    for key, lo, hi in (("sync_interval_s", 0.01, 60), ("trending_refresh_s", 0.1, 3600), ("poll_s", 0.1, 3600)):
        if key in obj:
            out[key] = as_number(errs, obj[key], p(key), lo=lo, hi=hi)
    for key, hi in (("threads", 64), ("batch_size", 100_000)):
        if key in obj:
            out[key] = as_number(errs, obj[key], p(key), lo=1, hi=hi, integer=True)
    for key in ("follow_current", "gc_freeze"):
        if key in obj:
            out[key] = as_bool(errs, obj[key], p(key))
    if obj.get("index") is not None:
        index = as_dict(errs, obj["index"], p("index"))
        if index is not None:
            check_keys(errs, index, p("index"), INDEX_KEYS)
            parsed = {}
            if "kind" in index:
                parsed["kind"] = as_str(errs, index["kind"], join_path(p("index"), "kind"), choices=KINDS)
            for key in INDEX_KEYS[1:]:
                if key in index:
                    parsed[key] = as_number(errs, index[key], join_path(p("index"), key), lo=1, hi=1e9, integer=True)
            out["index"] = parsed
    if len(errs.items) != before:
        return d
    return RetrievalConfig(**out)


# ---------------------------------------------------------------- what a request gets


@dataclass
class Pool:
    """A request's retrieved candidates: ``items`` in pool order with ``sources[i]``, the sources that
    found ``items[i]``; per-source counts (``found``: what each returned, ``credited``: pool slots it
    filled first), the sources that could not run and why, and timings in ms."""

    items: list
    sources: list
    found: dict
    credited: dict
    unavailable: dict
    timings_ms: dict

    def summary(self) -> dict:
        return {"candidates": len(self.items), "found": self.found, "credited": self.credited,
                "unavailable": self.unavailable, "timings_ms": self.timings_ms}


def item_payload(item: Item) -> dict:
    """What the two-tower item tower reads of a corpus item."""
    gen = item.generator
    return {"item_id": item.item_id, "source": item.source, "creator_id": item.creator_id, "topic": item.topic,
            "text": item.text, "generator": gen.model if gen is not None else None,
            "prior_score": gen.prior_score if gen is not None else None, "created_at": item.created_at}


def candidate_of(item: Item, now: float, sources: Sequence[str] = ()) -> Candidate:
    """A corpus item as a ``/v1/rank`` candidate (``source``: ``llm`` or ``retrieval``, like the
    training logs; features: ``age_hours``, ``text_len`` and ``retrieved_by``, the sources that found
    it, which the impression log keeps)."""
    gen = item.generator
    features = {"age_hours": round(max(0.0, now - item.created_at) / 3600.0, 3)}
    if sources:
        features["retrieved_by"] = list(sources)
    if item.text:
        features["text_len"] = len(item.text.split())
    return Candidate(item.item_id, "llm" if item.source == "llm" else "retrieval", item.creator_id, item.topic,
                     item.text, features,
                     Generator(gen.model, float(gen.prior_score) if gen.prior_score is not None else 0.5)
                     if gen is not None else None)


def fill_pool(plan: RetrievalPlan, lists: dict[str, list[str]]) -> tuple[list[str], list[list[str]], dict]:
    """Round robin over the sources in plan order: each turn a source adds its next item not in the
    pool yet, until it ran out, reached its ``max_share`` of ``plan.max_candidates`` or the pool is
    full. An item a source returns that is already pooled records that source too (all its list is
    read for that, not only the turns it took). Returns (ids, sources per id, credited per source)."""
    order = [s for s in plan.sources if lists.get(s.name)]
    caps = {s.name: max(1, math.floor(s.max_share * plan.max_candidates + 1e-9)) for s in order}
    ids: list[str] = []
    where: dict[str, int] = {}
    sources: list[list[str]] = []
    credited = {s.name: 0 for s in order}
    cursor = {s.name: 0 for s in order}
    active = [s.name for s in order]
    while active and len(ids) < plan.max_candidates:
        still = []
        for name in active:
            lst, i = lists[name], cursor[name]
            while i < len(lst) and lst[i] in where:
                i += 1
            if i < len(lst) and len(ids) < plan.max_candidates:
                where[lst[i]] = len(ids)
                ids.append(lst[i])
                sources.append([name])
                credited[name] += 1
                i += 1
            cursor[name] = i
            if i < len(lst) and credited[name] < caps[name]:
                still.append(name)
        active = still
    for s in order:   # credit every source with the pooled items it found, in plan order
        for item in lists[s.name]:
            k = where.get(item)
            if k is not None and s.name not in sources[k]:
                sources[k].append(s.name)
    return ids, sources, credited


# ---------------------------------------------------------------- the index state


class _State:
    """One encoder and the index of its item vectors, with the corpus change they are synced to."""

    def __init__(self, encoder, index: AnnIndex | None, reference_ts: float) -> None:
        self.encoder, self.index = encoder, index
        self.reference_ts = reference_ts                # t0 of the item vectors (freshness models)
        self.seq = 0
        self.expiry: list[tuple[float, str]] = []   # heap of (expires_at, item_id)
        self.expires_at: dict[str, float] = {}      # the live expiry of each indexed item
        # the fresh source's memory of the live items by age: id -> (created_at, "llm" | "human"), and per
        # kind the (created_at, id) pairs sorted by time. Lists are replaced, never changed in place
        # (requests read them without a lock); pairs of items since updated or gone are skipped, and
        # dropped once they outnumber the live items
        self.created: dict[str, tuple[float, str]] = {}
        self.items: dict[str, Item] = {}            # the live items as of the last sync (the pool's content)
        self.born: dict[str, list[tuple[float, str]]] = {"llm": [], "human": []}
        self.stale = 0
        self.synced_at = 0.0

    @property
    def version(self) -> str | None:
        return getattr(self.encoder, "version", None)


class Retriever:
    """Candidate sources over a corpus (see the module docstring).

    Args:
        config: the service's ``retrieval:`` section.
        corpus: the item corpus (:class:`online.corpus.Corpus`).
        encoder: a two-tower encoder (``ranking.two_tower.TwoTowerEncoder``: ``dim``, ``version``,
            ``encode_items``, ``encode_users``, ``encode_text``), or None (no vector sources).
        store: the real-time feature store (trending), or None.
        load_encoder: ``() -> encoder`` for a moved registry pointer (``follow_current``), or None.
        pointer: ``() -> str | None``, the model's current registry version (what ``load_encoder`` loads).
    """

    def __init__(self, config: RetrievalConfig, corpus: Corpus, encoder=None, store=None, *, load_encoder=None,
                 pointer=None, clock=time.time, seed: int = 0) -> None:
        self.config, self.corpus, self.store = config, corpus, store
        self.clock = clock
        self._state = _State(encoder, self._new_index(encoder), clock())
        self._load_encoder, self._pointer = load_encoder, pointer
        self._followed = pointer() if pointer is not None and encoder is not None else None  # loaded version
        self._sync_lock = threading.Lock()   # one writer of the live state at a time (sync, swap)
        self._trending_lists: dict[str, list[str]] = {}
        self._trending_at = -math.inf
        self._counters = {"click"}
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rebuilding: threading.Thread | None = None
        self.error: BaseException | None = None
        self.rebuilds = 0

    def _new_index(self, encoder) -> AnnIndex | None:
        if encoder is None:
            return None
        return AnnIndex(encoder.dim, threads=self.config.threads, **self.config.index)

    # -- state -------------------------------------------------------------------------------
    @property
    def model_version(self) -> str | None:
        return self._state.version

    @property
    def has_vectors(self) -> bool:
        return self._state.index is not None

    def status(self) -> dict:
        s = self._state
        return {"model_version": s.version, "indexed": len(s.index) if s.index is not None else 0,
                "kind": s.index.current_kind if s.index is not None else None, "seq": s.seq,
                "synced_age_s": round(max(0.0, self.clock() - s.synced_at), 3) if s.synced_at else None,
                "rebuilding": self._rebuilding is not None and self._rebuilding.is_alive(),
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}"}

    # -- background --------------------------------------------------------------------------
    def start(self) -> "Retriever":
        self._thread = threading.Thread(target=self._run, name="retrieval-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in (self._thread, self._rebuilding):
            if t is not None:
                t.join(timeout)

    def _run(self) -> None:
        next_poll = time.monotonic() + self.config.poll_s
        frozen = False
        while not self._stop.is_set():
            try:
                self.sync()
                if not frozen:   # the first sync indexed the whole corpus
                    self._freeze_heap()
                    frozen = True
                self.refresh_trending()
                if self.config.follow_current and self._pointer is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.config.poll_s
                    self.follow_model()
                self.rebase()
                self.error = None
            except Exception as exc:  # noqa: BLE001 - a corpus or store hiccup: log, keep the index, retry
                if self.error is None or str(exc) != str(self.error):
                    log.warning("retrieval sync failed (the index serves as it is; retrying): %s", exc)
                self.error = exc
            self._stop.wait(self.config.sync_interval_s)

    def sync(self) -> int:
        """Apply the corpus's changes since the last sync, and the expiries due; returns items changed."""
        with self._sync_lock:
            return self._sync(self._state)

    def _sync(self, state: _State) -> int:
        changed = 0
        now = self.clock()
        if not Path(self.corpus.config.path).exists():   # nothing written yet (reading would create the file)
            return 0
        while True:
            batch = self.corpus.changes_since(state.seq, limit=self.config.batch_size)
            if not batch:
                break
            changed += self._apply(state, batch, now)
            state.seq = batch[-1].seq
        changed += self._expire(state, now)
        state.synced_at = now
        return changed

    def _apply(self, state: _State, items: list[Item], now: float) -> int:
        live = [it for it in items if not it.blocked and (it.expires_at is None or it.expires_at > now)]
        dead = [it.item_id for it in items if it.blocked or (it.expires_at is not None and it.expires_at <= now)]
        if state.index is not None:
            if live:
                state.index.add([it.item_id for it in live],
                                state.encoder.encode_items([item_payload(it) for it in live], state.reference_ts))
            if dead:
                state.index.remove(dead)
        for item_id in dead:
            state.expires_at.pop(item_id, None)
        self._track_items(state, live, dead)
        for it in live:
            if it.expires_at is not None:
                state.expires_at[it.item_id] = it.expires_at
                heapq.heappush(state.expiry, (it.expires_at, it.item_id))
            else:
                state.expires_at.pop(it.item_id, None)
        return len(items)

    def _expire(self, state: _State, now: float) -> int:
        due = []
        while state.expiry and state.expiry[0][0] <= now:
            at, item_id = heapq.heappop(state.expiry)
            if state.expires_at.get(item_id) == at:   # not re-written with another expiry since
                del state.expires_at[item_id]
                due.append(item_id)
        if due and state.index is not None:
            state.index.remove(due)
        if due:
            self._track_items(state, [], due)
        return len(due)

    @staticmethod
    def _track_items(state: _State, live: list[Item], dead: list[str]) -> None:
        added: dict[str, list[tuple[float, str]]] = {"llm": [], "human": []}
        for it in live:
            state.items[it.item_id] = it
            entry = (float(it.created_at), "llm" if it.source == "llm" else "human")
            before = state.created.get(it.item_id)
            if before == entry:
                continue
            state.stale += before is not None
            state.created[it.item_id] = entry
            added[entry[1]].append((entry[0], it.item_id))
        for item_id in dead:
            state.items.pop(item_id, None)
            state.stale += state.created.pop(item_id, None) is not None
        if state.stale > max(1000, len(state.created)):   # compact: rebuild from the live items
            for kind in added:
                added[kind] = [(c, i) for i, (c, k) in state.created.items() if k == kind]
                state.born[kind] = []
            state.stale = 0
        for kind, pairs in added.items():
            if pairs:
                state.born[kind] = sorted(state.born[kind] + pairs)

    def refresh_trending(self, force: bool = False) -> None:
        """Re-read the trending lists from the store, at most every ``trending_refresh_s``."""
        if self.store is None or (not force and time.monotonic() - self._trending_at < self.config.trending_refresh_s):
            return
        self._trending_at = time.monotonic()
        lists = {}
        for counter in sorted(self._counters):
            top = self.store.top_items(counter, TRENDING_DEPTH, now=self.clock())
            if top is not None:
                lists[counter] = [item_id for item_id, value in top if value > 0]
        self._trending_lists = lists

    def _freeze_heap(self) -> None:
        """``gc.freeze()`` (with ``gc_freeze``): the corpus's items, the index's maps and the model
        are long-lived; a full collection over them took 40-60 ms per 100k items, the tail of a
        feed request that ran into it. Frozen objects are still freed by reference counting."""
        if self.config.gc_freeze:
            gc.collect()
            gc.freeze()

    def follow_model(self) -> bool:
        """Start a background rebuild when the model's registry pointer moved; True when one started."""
        pointer = self._pointer()
        if pointer == self._followed or self._busy():
            return False
        self._followed = pointer
        self._start_rebuild(self._load_encoder)
        return True

    def rebase(self) -> bool:
        """Start re-encoding the corpus on a new reference time when the serving model's freshness
        factors have grown past :meth:`TwoTowerEncoder.rebase_due`; True when one started."""
        state = self._state
        rebase_due = getattr(state.encoder, "rebase_due", None)
        if rebase_due is None or self._busy() or not rebase_due(state.reference_ts, self.clock()):
            return False
        encoder = state.encoder
        self._start_rebuild(lambda: encoder)
        return True

    def _busy(self) -> bool:
        return self._rebuilding is not None and self._rebuilding.is_alive()

    def _start_rebuild(self, load) -> None:
        self._rebuilding = threading.Thread(target=self._rebuild, args=(load,), name="retrieval-rebuild",
                                            daemon=True)
        self._rebuilding.start()

    def _rebuild(self, load) -> None:
        try:
            encoder = load()
            self.swap_encoder(encoder)
        except Exception as exc:  # noqa: BLE001 - the serving model and index stay
            log.error("retrieval: the new two-tower version did not load or index, still serving %s: %s",
                      self.model_version, exc)
            self.error = exc

    def swap_encoder(self, encoder) -> None:
        """Index the whole corpus with ``encoder`` into a new index, catch up, and swap both in at once
        (searches meanwhile use the old pair)."""
        state = _State(encoder, self._new_index(encoder), self.clock())
        self._sync(state)                    # the bulk, while the live state keeps syncing
        with self._sync_lock:
            self._sync(state)                # what changed meanwhile
            self._state = state
        self.rebuilds += 1
        self._freeze_heap()
        log.info("retrieval: serving %s (%d items indexed)", state.version, len(state.index) if state.index else 0)

    # -- requests ----------------------------------------------------------------------------
    def retrieve(self, plan: RetrievalPlan, user: Mapping, now: float | None = None) -> Pool:
        """The pool of one feed request. ``user``: ``user_id``, ``recent_items`` (most recent first),
        ``topic_affinity`` (topic -> weight), as the near-line store gives them."""
        now = self.clock() if now is None else now
        state = self._state
        timings: dict[str, float] = {}
        unavailable: dict[str, str] = {}
        exclude = set(user.get("recent_items") or ())
        t0 = time.perf_counter()
        query = None
        needs_query = any(s.count and s.name in ("ann", "fresh") for s in plan.sources)
        if state.index is not None and needs_query:
            query = state.encoder.encode_users([user], now, state.reference_ts)
            timings["user_tower"] = (time.perf_counter() - t0) * 1e3
        lists: dict[str, list[str]] = {}
        for src in plan.sources:
            if src.count == 0:
                continue
            t = time.perf_counter()
            got = getattr(self, f"_{src.name}")(state, src, query, user, exclude, now)
            timings[src.name] = (time.perf_counter() - t) * 1e3
            if isinstance(got, str):
                unavailable[src.name] = got
            else:
                lists[src.name] = got
        ids, sources, credited = fill_pool(plan, lists)
        t = time.perf_counter()
        stored = self._servable(state, ids, now)
        timings["corpus"] = (time.perf_counter() - t) * 1e3
        items, kept = [], []
        for item_id, srcs in zip(ids, sources):
            item = stored.get(item_id)
            if item is not None:
                items.append(item)
                kept.append(srcs)
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return Pool(items, kept, {k: len(v) for k, v in lists.items()}, credited, unavailable,
                    {k: round(v, 3) for k, v in timings.items()})

    def _servable(self, state: _State, ids: list[str], now: float) -> dict[str, Item]:
        """The items of ``ids`` that the corpus holds unblocked and unexpired right now (a block since the
        last sync counts at once), with their content as of the last sync; ids the sync has not seen
        yet are read whole from the corpus."""
        allowed = self.corpus.servable_ids(ids, now=now)
        out = {i: state.items[i] for i in ids if i in allowed and i in state.items}
        unseen = [i for i in ids if i in allowed and i not in out]
        if unseen:
            out.update(self.corpus.get_many(unseen, include_blocked=False, now=now))
        return out

    def _search(self, state: _State, queries: np.ndarray, k: int, exclude: set) -> list[list[str]]:
        ids, _ = state.index.search(queries, min(k + len(exclude), max(k, 4 * k)))
        return [[i for i in row if i not in exclude] for row in ids]

    def _ann(self, state, src, query, user, exclude, now):
        if query is None:
            return "no two-tower model loaded"
        return self._search(state, query, src.count, exclude)[0][: src.count]

    def _similar(self, state, src, query, user, exclude, now):
        if state.index is None:
            return "no two-tower model loaded"
        seeds, vectors = state.index.vectors_of(list(user.get("recent_items") or ())[: src.seeds])
        if not seeds:
            return []
        per_seed = math.ceil(src.count / len(seeds))
        rows = self._search(state, state.encoder.item_queries(vectors, now, state.reference_ts), per_seed + 1,
                            exclude)
        return interleave(rows)[: src.count]

    def _fresh(self, state, src, query, user, exclude, now):
        since = now - src.max_age_h * 3600.0
        scan = min(2000, 4 * src.count)
        llm, human = (self._youngest(state, kind, since, scan, exclude) for kind in ("llm", "human"))
        if query is not None:
            llm, human = self._by_score(state, query, llm), self._by_score(state, query, human)
        n_llm = min(len(llm), round(src.count * src.llm_share))
        picked = llm[:n_llm] + human[: src.count - n_llm]
        if len(picked) < src.count:   # one side ran short: the other fills in
            picked += llm[n_llm: n_llm + src.count - len(picked)]
        return picked

    @staticmethod
    def _youngest(state: _State, kind: str, since: float, n: int, exclude: set) -> list[str]:
        """Up to ``n`` live items of ``kind`` created after ``since``, newest first (blocked and expired
        ones are gone since the last sync; the pool's corpus read drops any blocked meanwhile)."""
        out: list[str] = []
        created = state.created
        for at, item_id in reversed(state.born[kind]):
            if at <= since or len(out) >= n:
                break
            if created.get(item_id, (None, None))[0] == at and item_id not in exclude:
                out.append(item_id)
        return out

    @staticmethod
    def _by_score(state: _State, query: np.ndarray, ids: list[str]) -> list[str]:
        found, vectors = state.index.vectors_of(ids)
        if not found:
            return ids
        order = np.argsort(-(vectors @ query[0]), kind="stable")
        ranked = [found[i] for i in order.tolist()]
        held = set(found)
        return ranked + [i for i in ids if i not in held]   # not indexed yet: after the scored ones, newest first

    def _trending(self, state, src, query, user, exclude, now):
        if self.store is None:
            return "no feature store"
        if src.counter not in self._trending_lists:   # first asked: read it now, then in the background
            self._counters.add(src.counter)
            self.refresh_trending(force=True)
        top = self._trending_lists.get(src.counter)
        if top is None:
            return f"the store ({type(self.store).__name__}) cannot rank items by a counter"
        return [i for i in top if i not in exclude][: src.count]

    def _co_engaged(self, state, src, query, user, exclude, now):
        if self.store is None:
            return "no feature store"
        seeds = list(user.get("recent_items") or ())[: src.seeds]
        if not seeds:
            return []
        try:
            got = self.store.co_engaged(seeds, src.count + len(exclude), now=now)
        except StoreUnavailable as exc:   # the feed is built from the other sources
            return f"the store is unavailable: {exc}"
        if got is None:
            return f"the store ({type(self.store).__name__}) keeps no co-engagement"
        return [i for i, _ in got if i not in exclude][: src.count]

    def _explore(self, state, src, query, user, exclude, now):
        if state.index is None:
            return "no two-tower model loaded"
        with self._rng_lock:
            drawn = state.index.sample(src.count + len(exclude), self._rng)
        return [i for i in drawn if i not in exclude][: src.count]

    # -- the prompt engine's memory ----------------------------------------------------------
    def similar(self, *, user: Mapping | None = None, text: str | None = None, item_id: str | None = None,
                k: int = 20, now: float | None = None) -> tuple[list[Item], list[float]] | None:
        """Corpus items nearest a user, a text or an item (exactly one), with their scores; None when
        ``item_id`` is not indexed."""
        state = self._state
        if state.index is None:
            raise LookupError("no two-tower model loaded")
        exclude: set = set()
        now = self.clock() if now is None else now
        if user is not None:
            query = state.encoder.encode_users([user], now, state.reference_ts)
        elif text is not None:
            query = state.encoder.encode_text(text, now, state.reference_ts)[None, :]
        else:
            found, vectors = state.index.vectors_of([item_id])
            if not found:
                return None
            query = state.encoder.item_queries(vectors, now, state.reference_ts)
            exclude = {item_id}
        ids, scores = state.index.search(query, k + len(exclude))
        pairs = [(i, float(s)) for i, s in zip(ids[0], scores[0].tolist()) if i not in exclude]
        stored = self.corpus.get_many([i for i, _ in pairs], include_blocked=False, now=now)
        kept = [(stored[i], s) for i, s in pairs if i in stored][:k]
        return [it for it, _ in kept], [s for _, s in kept]


def open_retriever(config, corpus: Corpus, store=None) -> Retriever:
    """The retriever of a scorer process (``config``: the ServiceConfig), its sync thread started.
    A configured two-tower model that does not load is logged; the retriever then serves the
    sources that need no vectors until a version that loads becomes current (``follow_current``)."""
    rc = config.retrieval
    registry = rc.registry or config.registry
    encoder, load, pointer = None, None, None
    if rc.model:
        from ranking.registry import resolve
        from ranking.two_tower import load_two_tower

        def load():
            return load_two_tower(registry, rc.model)

        def pointer():
            try:
                return str(resolve(registry, rc.model))
            except Exception:  # noqa: BLE001 - no version yet: nothing to follow
                return None

        try:
            encoder = load()
        except Exception as exc:  # noqa: BLE001 - serve the other sources; follow_model retries
            log.error("retrieval: two-tower model %s did not load (feeds use fresh, trending, co_engaged only): %s",
                      rc.model, exc)
    return Retriever(rc, corpus, encoder, store, load_encoder=load, pointer=pointer).start()


def interleave(rows: Sequence[Sequence[str]]) -> list[str]:
    """The first of each row, then the second of each, ...; each id once."""
    out: dict[str, None] = {}
    for rank in range(max((len(r) for r in rows), default=0)):
        for row in rows:
            if rank < len(row):
                out.setdefault(row[rank], None)
    return list(out)


__all__ = ["Pool", "RetrievalConfig", "Retriever", "candidate_of", "fill_pool", "interleave", "item_payload",
           "open_retriever", "retrieval_config_from_dict"]
