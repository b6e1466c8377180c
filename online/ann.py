"""Approximate nearest-neighbour index of item vectors by string item id (faiss, inner product).

``AnnIndex`` keeps the retrievable corpus of the item tower: fresh items are added incrementally,
blocked or expired ones removed, and the whole index is rebuilt in a background thread (when the
item tower changes, or to compact it) and swapped in atomically. Searches, adds and removes may come
from several threads at once.

Shapes: vectors and queries are float32 ``(n, dim)`` arrays (any real dtype is converted); ids are
non-empty strings. Scores are inner products, higher is better.

Kinds (``kind=``):

- ``"flat"``: exact search (``IndexFlatIP``), a scan of every vector per query;
- ``"hnsw"``: a graph (``IndexHNSWFlat``): the fastest queries at a given recall, adds at the cost
  of a graph insertion each, about 2x the vectors' memory;
- ``"ivf"``: inverted lists over k-means centroids (``IndexIVFFlat``): the vectors' memory plus
  little, the fastest build and adds, slower queries than HNSW at the same recall;
- ``"auto"``: chosen by corpus size, at every (re)build: flat up to ``flat_max_items``, HNSW up to
  ``hnsw_max_items``, IVF above; the index also rebuilds itself in the background into the next kind
  when adds grow it past its kind's limit.

Why these limits (``bench/retrieval_bench.py``, one core, 64 dims, 2-core machine):
exact search costs ≈ 0.02 µs per vector per query (IndexFlatIP), so it stays under 1 ms per query
up to ≈ 50,000 items — and below that it is exact and needs no parameters, hence
``flat_max_items = 50_000``. At 1M items of the bench's hard synthetic data (noise larger than the
cluster centres), HNSW (M=32, efConstruction=80) gives recall@100 0.93 / 0.95 / 0.96 at efSearch
256 / 384 / 512 with a query p99 of 1.6 / 2.2-2.9 / 2.7-3.3 ms (one run on a shared machine), against
16-20 ms for exact search (IVF: `--kind ivf`). HNSW's cost is its build
(≈ 5 minutes for 1M items on one core, growing slightly faster than linear, and ≈ 2,500-2,800 items/s
added incrementally) and its graph memory (≈ 2x the vectors'); past ≈ 4M items a background rebuild
of the graph would take over 15 minutes of one core and the graph over 1.5 GB, so IVF (training on a
sample, adds at ≈ 10^6 items/s) takes over: ``hnsw_max_items = 4_000_000``.

Ids and labels: faiss labels are *slots*, the position of each vector in insertion order (faiss's
own sequential labels, so no ``IndexIDMap`` is needed); a side table maps slot -> id and id -> slot.
Re-adding an id appends its new vector in a new slot and kills the old one; ``remove`` kills slots.
Dead slots (tombstones) are excluded inside faiss's search by an ``IDSelectorBitmap`` of live slots,
for every kind (HNSW has no ``remove_ids``; graph nodes stay as waypoints, which keeps recall), and
HNSW's efSearch is scaled by 1 / (live share) so as many live candidates are examined as without
tombstones. Dead slots are dropped at the next rebuild: one starts by itself in the background when
they exceed ``compact_fraction`` of the slots.

Threads: searches share a read lock (faiss releases the GIL, so they run in parallel), adds, removes
and the swap take the write lock. faiss's OpenMP threads are limited to ``threads`` in every thread
that calls into it (``omp_set_num_threads`` is per calling thread), so the index does not fight the
scorer's own threads for the cores.

Persistence: ``save(path)`` writes a folder with ``index.faiss`` (faiss's ``write_index``) and
``ids.json`` (the slot table and the parameters); no pickle.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "hnsw", "ivf")
SAVE_FORMAT = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
# A rebuild replays the adds/removes that arrived while it built outside the lock until at most
# this many remain, then replays those under the write lock and swaps.
_SWAP_REPLAY_MAX = 10_000
# Compaction snapshots the live vectors this many slots at a time, each under its own read lock.
_SNAPSHOT_CHUNK = 65_536
# Tombstones below this count never trigger a compaction (a rebuild costs more than they do).
_MIN_COMPACT_DEAD = 1_000
# HNSW's efSearch is scaled up for tombstones by at most this factor.
_MAX_EF_SCALE = 4.0
_KIND_ORDER = {"flat": 0, "hnsw": 1, "ivf": 2}
_FAISS_TYPES = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat}


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers so adds never starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Generation:
    """One faiss index and its slot table: what a rebuild builds and the swap replaces."""

    def __init__(self, index: faiss.Index, kind: str) -> None:
        self.index = index
        self.kind = kind
        self.slot_ids: list[str | None] = []
        self.slot_of: dict[str, int] = {}
        self.live_bits = np.zeros(0, dtype=np.uint8)  # bit s set <=> slot s is live (faiss's bit order)
        self.dead = 0
        self.id_bytes = 0  # sys.getsizeof of the live and dead id strings held

    @property
    def slots(self) -> int:
        return len(self.slot_ids)

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        if not ids:
            return
        self._kill([self.slot_of[i] for i in ids if i in self.slot_of])
        start = self.slots
        self.index.add(vectors)
        self.slot_ids.extend(ids)
        self.slot_of.update(zip(ids, range(start, start + len(ids))))
        self.id_bytes += sum(sys.getsizeof(i) for i in ids)
        self.mark_live(np.arange(start, self.slots))

    def remove(self, ids: Sequence[str]) -> int:
        slots = [self.slot_of.pop(i) for i in ids if i in self.slot_of]
        self._kill(slots, popped=True)
        return len(slots)

    def _kill(self, slots: list[int], popped: bool = False) -> None:
        if not slots:
            return
        for s in slots:
            if not popped:
                del self.slot_of[self.slot_ids[s]]
            self.slot_ids[s] = None
        arr = np.asarray(slots, dtype=np.int64)
        np.bitwise_and.at(self.live_bits, arr >> 3, (~(1 << (arr & 7))).astype(np.uint8))
        self.dead += len(slots)

    def mark_live(self, slots: np.ndarray) -> None:
        """Set the live bits of ``slots`` (int64), growing the bitmap to cover every slot."""
        need = (self.slots + 7) // 8
        if need > self.live_bits.size:  # grow geometrically: adds stay amortised O(batch)
            grown = np.zeros(max(need, 2 * self.live_bits.size), dtype=np.uint8)
            grown[: self.live_bits.size] = self.live_bits
            self.live_bits = grown
        np.bitwise_or.at(self.live_bits, slots >> 3, (1 << (slots & 7)).astype(np.uint8))

    def live_vectors(self, start: int, stop: int) -> tuple[list[str], np.ndarray]:
        """The live ids and vectors of slots ``[start, stop)``."""
        slots = [s for s in range(start, stop) if self.slot_ids[s] is not None]
        if not slots:
            return [], np.zeros((0, self.index.d), dtype=np.float32)
        vectors = self.index.reconstruct_batch(np.asarray(slots, dtype=np.int64))
        return [self.slot_ids[s] for s in slots], vectors

    def memory_bytes(self) -> dict[str, int]:
        index, d = self.index, self.index.d
        if isinstance(index, _UntrainedIvf):
            faiss_bytes = 0
        elif self.kind == "flat":
            faiss_bytes = index.ntotal * d * 4
        elif self.kind == "hnsw":
            hnsw = index.hnsw
            faiss_bytes = (index.ntotal * d * 4 + hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8
                           + hnsw.levels.size() * 4)
        else:
            invlists = index.invlists
            listed = sum(invlists.list_size(i) for i in range(invlists.nlist))
            faiss_bytes = (listed * (index.code_size + 8) + index.quantizer.ntotal * d * 4
                           + index.ntotal * 8)  # codes + ids, centroids, the direct map
        table = (self.id_bytes + sys.getsizeof(self.slot_ids) + sys.getsizeof(self.slot_of)
                 + self.live_bits.nbytes)
        return {"faiss": int(faiss_bytes), "id_table": int(table)}


def _limit_threads(threads: int) -> None:
    faiss.omp_set_num_threads(threads)  # per calling thread: call it in every thread that uses faiss


def _positive_int(name: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class AnnIndex:
    """An inner-product nearest-neighbour index of vectors keyed by string ids.

    Args:
        dim: vector dimension.
        kind: ``"auto"`` (by corpus size), ``"flat"`` (exact), ``"hnsw"`` or ``"ivf"``.
        hnsw_m: HNSW links per node (M).
        ef_construction: HNSW candidate list size while inserting.
        ef_search: HNSW candidate list size while searching (raised to k when k is larger).
        nlist: IVF lists; ``None`` picks ``4 * sqrt(n)`` (at most 65536) from the corpus the index is
            trained on (the first add, or the rebuild).
        nprobe: IVF lists scanned per query.
        flat_max_items, hnsw_max_items: the corpus sizes where ``kind="auto"`` moves to HNSW, then IVF.
        compact_fraction: rebuild in the background when dead slots exceed this share of the slots
            (``None``: only on an explicit ``rebuild``).
        threads: OpenMP threads faiss may use per calling thread.
    """

    def __init__(self, dim: int, kind: str = "auto", *, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 96, nlist: int | None = None, nprobe: int = 48,
                 flat_max_items: int = 50_000, hnsw_max_items: int = 4_000_000,
                 compact_fraction: float | None = 0.3, threads: int = 1) -> None:
        self.dim = _positive_int("dim", dim)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.hnsw_m = _positive_int("hnsw_m", hnsw_m)
        self.ef_construction = _positive_int("ef_construction", ef_construction)
        self.ef_search = ef_search
        self.nlist = _positive_int("nlist", nlist, allow_none=True)
        self.nprobe = nprobe
        self.flat_max_items = _positive_int("flat_max_items", flat_max_items)
        self.hnsw_max_items = _positive_int("hnsw_max_items", hnsw_max_items)
        if self.hnsw_max_items < self.flat_max_items:
            raise ValueError(f"hnsw_max_items ({hnsw_max_items}) must be >= flat_max_items ({flat_max_items})")
        if compact_fraction is not None and not (isinstance(compact_fraction, (int, float))
                                                 and 0 < compact_fraction < 1):
            raise ValueError(f"compact_fraction must be in (0, 1) or None, got {compact_fraction!r}")
        self.compact_fraction = compact_fraction
        self.threads = _positive_int("threads", threads)
        self._lock = _ReadWriteLock()
        self._gen = self._new_generation(0)
        self._journal: list[tuple[str, list[str], np.ndarray | None]] | None = None  # set while rebuilding
        self._rebuild: Future | None = None

    # -- parameters that may change between searches -----------------------------------------
    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = _positive_int("ef_search", value)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = _positive_int("nprobe", value)

    # -- state -------------------------------------------------------------------------------
    @property
    def current_kind(self) -> str:
        """The kind of the index searches use now (``"auto"`` resolved)."""
        return self._gen.kind

    @property
    def trained_nlist(self) -> int | None:
        """The IVF lists of the index searches use now (None unless a trained IVF)."""
        return getattr(self._gen.index, "nlist", None)

    @property
    def tombstones(self) -> int:
        """Dead slots (removed or replaced vectors) still held until the next rebuild."""
        return self._gen.dead

    @property
    def rebuilding(self) -> bool:
        return self._journal is not None

    @property
    def rebuild_future(self) -> Future | None:
        """The ``Future`` of the latest rebuild (explicit or started by itself), or None."""
        return self._rebuild

    def __len__(self) -> int:
        return len(self._gen.slot_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._gen.slot_of

    def memory_bytes(self) -> int:
        """Bytes held by the faiss index plus the id table (not counting a rebuild in progress)."""
        return sum(self.memory_breakdown().values())

    def memory_breakdown(self) -> dict[str, int]:
        """``{"faiss": bytes of the faiss index, "id_table": bytes of the slot <-> id table}``."""
        with self._lock.reading():
            return self._gen.memory_bytes()

    def kind_for(self, n: int) -> str:
        """The kind a (re)build of ``n`` items uses."""
        if self.kind != "auto":
            return self.kind
        if n <= self.flat_max_items:
            return "flat"
        return "hnsw" if n <= self.hnsw_max_items else "ivf"

    # -- updates -----------------------------------------------------------------------------
    def add(self, ids: Sequence[str], vectors) -> None:
        """Add ``vectors`` (n, dim) under ``ids`` (n); an id already present gets the new vector."""
        ids, vectors = self._check_items(ids, vectors, "vectors")
        if not ids:
            return
        _limit_threads(self.threads)
        with self._lock.writing():
            if self._gen.kind == "ivf" and not self._gen.index.is_trained:
                self._train_ivf(self._gen, vectors)
            self._gen.add(ids, vectors)
            if self._journal is not None:
                self._journal.append(("add", ids, vectors))
        self._maybe_rebuild_by_itself()

    def remove(self, ids: Sequence[str]) -> int:
        """Remove ``ids`` (blocked or expired items); unknown ids are ignored. Returns how many were held."""
        ids = self._check_ids(ids)
        with self._lock.writing():
            removed = self._gen.remove(ids)
            if self._journal is not None:
                self._journal.append(("remove", ids, None))
        self._maybe_rebuild_by_itself()
        return removed

    # -- search ------------------------------------------------------------------------------
    def search(self, queries, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` ids of highest inner product for each query of ``queries`` (nq, dim).

        Returns ``(ids, scores)``: ``ids[i]`` lists at most ``k`` live ids, best first; ``scores`` is
        float32 (nq, k) with ``-inf`` where fewer than ``k`` ids were found.
        """
        k = _positive_int("k", k)
        queries = self._check_vectors(queries, "queries")
        _limit_threads(self.threads)
        with self._lock.reading():
            gen = self._gen
            if not gen.slot_of:
                return [[] for _ in range(len(queries))], np.full((len(queries), k), -np.inf, np.float32)
            params, selector = self._search_params(gen, k)  # the selector must outlive the call
            scores, labels = gen.index.search(queries, k, params=params)
            slot_ids = gen.slot_ids
            ids = [[slot_ids[s] for s in row if s >= 0] for row in labels.tolist()]
        scores[labels < 0] = -np.inf
        return ids, scores

    def vectors_of(self, ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The vectors of those ``ids`` the index holds: ``(found ids, float32 (n_found, dim))``, in the
        order given (unknown ids are left out)."""
        with self._lock.reading():
            gen = self._gen
            found = [i for i in dict.fromkeys(ids) if i in gen.slot_of]
            if not found:
                return [], np.zeros((0, self.dim), np.float32)
            slots = np.fromiter((gen.slot_of[i] for i in found), dtype=np.int64, count=len(found))
            return found, gen.index.reconstruct_batch(slots)

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """Up to ``n`` distinct live ids drawn uniformly (dead slots are redrawn a few times)."""
        with self._lock.reading():
            gen = self._gen
            live = len(gen.slot_of)
            if n <= 0 or not live:
                return []
            if n >= live:
                return list(gen.slot_of)
            out: dict[str, None] = {}
            for _ in range(8):   # each round draws what is missing, scaled up by the dead share
                want = n - len(out)
                draws = rng.integers(0, gen.slots, size=min(gen.slots, math.ceil(want * gen.slots / live) + 4))
                for s in draws.tolist():
                    item = gen.slot_ids[s]
                    if item is not None:
                        out[item] = None
                        if len(out) == n:
                            return list(out)
            return list(out)

    def _search_params(self, gen: _Generation, k: int):
        """faiss search parameters for ``gen`` and the live-slot selector they point to (or None)."""
        selector = None
        if gen.dead:
            selector = faiss.IDSelectorBitmap(gen.slots, faiss.swig_ptr(gen.live_bits))
        if gen.kind == "hnsw":
            live_share = len(gen.slot_of) / gen.slots
            ef = math.ceil(max(self._ef_search, k) * min(1.0 / live_share, _MAX_EF_SCALE))
            params = faiss.SearchParametersHNSW(efSearch=ef)
        elif gen.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=min(self._nprobe, gen.index.nlist))
        elif selector is None:
            return None, None
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params, selector

    # -- rebuild -----------------------------------------------------------------------------
    def rebuild(self, ids: Sequence[str] | None = None, vectors=None) -> Future:
        """Build a new index in a background thread and swap it in atomically.

        With ``ids`` (n) and ``vectors`` (n, dim), the new index holds exactly those items (e.g. the
        whole corpus through a new item tower); without them it compacts the current one (drops dead
        slots, re-picks the kind for ``"auto"``). Until the swap, searches use the current index; adds
        and removes are applied to it at once and to the new one before the swap, in order. Returns a
        ``Future`` whose result is the new index's size (its exception if the build failed: the
        current index then stays). One rebuild at a time: a second raises ``RuntimeError``.
        """
        if (ids is None) != (vectors is None):
            raise ValueError("rebuild takes both ids and vectors, or neither (compaction)")
        if ids is not None:
            ids, vectors = self._check_items(ids, vectors, "vectors")
        future = self._start_rebuild(ids, vectors)
        if future is None:
            raise RuntimeError("a rebuild is already running: wait for the Future of the first one")
        return future

    def _start_rebuild(self, ids, vectors) -> Future | None:
        with self._lock.writing():
            if self._journal is not None:
                return None
            self._journal = []
            future = self._rebuild = Future()
        threading.Thread(target=self._run_rebuild, args=(ids, vectors, future), name="ann-rebuild",
                         daemon=True).start()
        return future

    def _maybe_rebuild_by_itself(self) -> None:
        gen = self._gen
        grown = self.kind == "auto" and _KIND_ORDER[self.kind_for(len(gen.slot_of))] > _KIND_ORDER[gen.kind]
        bloated = (self.compact_fraction is not None and gen.dead >= _MIN_COMPACT_DEAD
                   and gen.dead > self.compact_fraction * gen.slots)
        if (grown or bloated) and self._journal is None and self._start_rebuild(None, None) is not None:
            log.info("ann: rebuilding by itself (%s): %d live, %d dead slots, %s",
                     "grown" if grown else "compaction", len(gen.slot_of), gen.dead, gen.kind)

    def _run_rebuild(self, ids, vectors, future: Future) -> None:
        _limit_threads(self.threads)
        try:
            if ids is None:
                ids, vectors = self._snapshot()
            gen = self._build(ids, vectors)
            while True:
                with self._lock.writing():
                    pending, self._journal = self._journal, []
                    if sum(len(entry[1]) for entry in pending) <= _SWAP_REPLAY_MAX:
                        self._replay(gen, pending)
                        self._gen, self._journal = gen, None
                        break
                self._replay(gen, pending)
        except BaseException as exc:  # the current index stays; the caller learns why from the Future
            log.exception("ann: rebuild failed; the current index stays")
            with self._lock.writing():
                self._journal = None
            future.set_exception(exc)
            return
        future.set_result(len(gen.slot_of))

    def _snapshot(self) -> tuple[list[str], np.ndarray]:
        """The live items of the current index, read a chunk at a time (adds may interleave: an id
        seen twice keeps its later slot, and the journal replays whatever changed meanwhile)."""
        with self._lock.reading():
            gen, stop = self._gen, self._gen.slots
        id_parts, vec_parts = [], []
        for start in range(0, stop, _SNAPSHOT_CHUNK):
            with self._lock.reading():
                ids, vectors = gen.live_vectors(start, min(start + _SNAPSHOT_CHUNK, stop))
            id_parts.extend(ids)
            vec_parts.append(vectors)
        vectors = np.concatenate(vec_parts) if vec_parts else np.zeros((0, self.dim), np.float32)
        latest = {item_id: row for row, item_id in enumerate(id_parts)}
        if len(latest) < len(id_parts):
            rows = np.fromiter(latest.values(), dtype=np.int64, count=len(latest))
            return list(latest), vectors[rows]
        return id_parts, vectors

    def _build(self, ids: list[str], vectors: np.ndarray) -> _Generation:
        gen = self._new_generation(len(ids))
        if gen.kind == "ivf" and len(ids):
            self._train_ivf(gen, vectors)
        gen.add(ids, vectors)
        return gen

    def _replay(self, gen: _Generation, entries) -> None:
        for op, ids, vectors in entries:
            if op == "add":
                if gen.kind == "ivf" and not gen.index.is_trained:
                    self._train_ivf(gen, vectors)
                gen.add(ids, vectors)
            else:
                gen.remove(ids)

    def _new_generation(self, n: int) -> _Generation:
        kind = self.kind_for(n)
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
        else:
            index = None  # IVF: created when trained, its nlist depends on the training set
        return _Generation(index if index is not None else _UntrainedIvf(self.dim), kind)

    def _train_ivf(self, gen: _Generation, vectors: np.ndarray) -> None:
        n = len(vectors)
        nlist = self.nlist if self.nlist is not None else max(1, min(65_536, int(4 * math.sqrt(n))))
        if n < nlist:
            raise ValueError(f"an IVF index with nlist={nlist} trains on its first batch: it needs at least "
                             f"{nlist} vectors, got {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = 64  # k-means on <= 64 points per list: minutes saved at 1M
        index.train(vectors)
        index.set_direct_map_type(faiss.DirectMap.Array)  # reconstruct for compaction
        gen.index = index

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to folder ``path`` (``index.faiss`` + ``ids.json``), replacing it whole."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with self._lock.reading():
            gen = self._gen
            if gen.slots:
                faiss.write_index(gen.index, str(tmp / INDEX_FILE))
            meta = {"format": SAVE_FORMAT, "dim": self.dim, "kind": self.kind, "current_kind": gen.kind,
                    "params": self._params(), "ids": gen.slot_ids}
        (tmp / IDS_FILE).write_text(json.dumps(meta))
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)

    def _params(self) -> dict:
        return {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                "nlist": self.nlist, "nprobe": self.nprobe, "flat_max_items": self.flat_max_items,
                "hnsw_max_items": self.hnsw_max_items, "compact_fraction": self.compact_fraction,
                "threads": self.threads}

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnnIndex:
        """An index written by ``save(path)``."""
        path = Path(path)
        meta_file = path / IDS_FILE
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{meta_file}: cannot read the index's id map: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != SAVE_FORMAT:
            raise ValueError(f"{meta_file}: not an AnnIndex id map of format {SAVE_FORMAT}")
        slot_ids, params = meta.get("ids"), meta.get("params")
        if not isinstance(slot_ids, list) or not all(i is None or (isinstance(i, str) and i) for i in slot_ids):
            raise ValueError(f"{meta_file}: 'ids' must be a list of non-empty strings or null")
        if not isinstance(params, dict):
            raise ValueError(f"{meta_file}: 'params' must be an object")
        current_kind = meta.get("current_kind")
        if current_kind not in _KIND_ORDER:
            raise ValueError(f"{meta_file}: 'current_kind' must be one of {', '.join(_KIND_ORDER)}, "
                             f"got {current_kind!r}")
        try:
            index = cls(meta.get("dim"), meta.get("kind"), **params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{meta_file}: {exc}") from exc
        live = [i for i in slot_ids if i is not None]
        if len(set(live)) != len(live):
            raise ValueError(f"{meta_file}: 'ids' holds a live id twice")
        gen = index._new_generation(0)
        gen.kind = current_kind
        if slot_ids:
            faiss_index = faiss.read_index(str(path / INDEX_FILE))
            if not isinstance(faiss_index, _FAISS_TYPES[current_kind]) or \
                    faiss_index.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise ValueError(f"{path / INDEX_FILE}: a {type(faiss_index).__name__}, not the inner-product "
                                 f"{_FAISS_TYPES[current_kind].__name__} {meta_file} names")
            if faiss_index.d != index.dim or faiss_index.ntotal != len(slot_ids):
                raise ValueError(f"{path / INDEX_FILE}: holds {faiss_index.ntotal} vectors of dim "
                                 f"{faiss_index.d}, {meta_file} {len(slot_ids)} of dim {index.dim}")
            gen.index = faiss_index
        elif current_kind == "ivf":
            gen.index = _UntrainedIvf(index.dim)
        gen.slot_ids = slot_ids
        gen.slot_of = {item_id: s for s, item_id in enumerate(slot_ids) if item_id is not None}
        gen.id_bytes = sum(sys.getsizeof(i) for i in live)
        gen.dead = len(slot_ids) - len(live)
        gen.mark_live(np.fromiter(gen.slot_of.values(), dtype=np.int64, count=len(gen.slot_of)))
        index._gen = gen
        return index

    # -- validation --------------------------------------------------------------------------
    def _check_ids(self, ids) -> list[str]:
        if isinstance(ids, str) or not isinstance(ids, (Sequence, np.ndarray)):
            raise ValueError(f"ids must be a sequence of strings, got {type(ids).__name__}")
        ids = list(ids)
        for pos, item_id in enumerate(ids):
            if not isinstance(item_id, str) or not item_id:
                raise ValueError(f"ids[{pos}] must be a non-empty string, got {item_id!r}")
        return ids

    def _check_vectors(self, vectors, name: str) -> np.ndarray:
        try:
            arr = np.asarray(vectors)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a numeric (n, {self.dim}) array: {exc}") from exc
        if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{name} must be a numeric (n, {self.dim}) array, got shape {arr.shape} "
                             f"of dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            raise ValueError(f"{name}[{int(np.argmin(finite))}] holds a NaN or infinite value")
        return arr

    def _check_items(self, ids, vectors, name: str) -> tuple[list[str], np.ndarray]:
        ids = self._check_ids(ids)
        vectors = self._check_vectors(vectors, name)
        if len(vectors) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(vectors)} {name}: one vector per id")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise ValueError(f"ids: {dup!r} is given twice in one batch")
        return ids, vectors


class _UntrainedIvf:
    """Stands in for an IVF index until its first batch of vectors trains it."""

    is_trained = False
    ntotal = 0

    def __init__(self, dim: int) -> None:
        self.d = dim
