"""The near-line consumer: events and impressions from the bus into the real-time feature store.

Loop: poll a batch -> ``store.apply`` (idempotent, dedupe by ``event_id``) -> commit offsets.
Offsets are committed only once the batch is safe: at once for a durable store (Redis); for the
memory store only after a snapshot that contains the batch (``memory://`` without a snapshot
file never commits, so each start rebuilds the state from the whole log). A crash therefore
replays at most the uncommitted tail, which the store's dedupe absorbs: nothing is lost and
nothing is counted twice.

Configuration is the ``bus:``, ``store:`` and ``nearline:`` sections of ``conf/service.yaml``
(other sections belong to the scorer and are not read here)::

    bus:      {url: embedded://var/bus, fsync: interval, fsync_interval_s: 1.0, segment_bytes: 67108864,
               retention_s: 604800, retention_bytes: null, retention_wait_for_consumers: true}
    store:    {url: memory://, snapshot_path: var/features.json, snapshot_interval_s: 5, half_life_s: 3600,
               dedupe_ttl_s: 604800, dedupe_max_keys: 2000000, co_neighbours: 50}
    nearline: {consumer: nearline, topics: [impressions, events], batch_size: 5000, poll_timeout_s: 0.1}

Retention (embedded bus only; see online/bus/embedded.py): closed segments older than ``retention_s`` (7 days;
null: no age limit), or the oldest while a topic exceeds ``retention_bytes`` (null: no size limit),
are deleted once every consumer that committed a position on the topic is past them
(``retention_wait_for_consumers: false`` deletes regardless). The dedupe bound (see
online/features/): at most ``dedupe_max_keys`` keys, the oldest forgotten first; it must be at
least twice ``nearline.batch_size``, since a batch applied but not committed is delivered again.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

from strategy.checks import as_bool, as_dict, as_list, as_number, as_str, check_keys
from strategy.errors import Errors, ValidationError, join_path

from .bus import (CONSUMER_RE, DEFAULT_RETENTION_S, FSYNC_POLICIES, MAX_RETENTION_S, TOPIC_RE, EventBus, open_bus,
                  parse_bus_url)
from .features import (DEFAULT_AFFINITY, DEFAULT_COUNTERS, DEFAULT_DEDUPE_MAX_KEYS, MAX_CO_NEIGHBOURS, MAX_DEDUPE_KEYS,
                       FeatureStore, StoreUnavailable, open_store)

log = logging.getLogger("stratarank.nearline")

BUS_KEYS = ("url", "fsync", "fsync_interval_s", "segment_bytes", "spool_dir", "partitions", "linger_ms",
            "session_timeout_ms", "retention_s", "retention_bytes", "retention_wait_for_consumers")
STORE_KEYS = ("url", "half_life_s", "snapshot_path", "snapshot_interval_s", "recent_items", "dedupe_ttl_s",
              "dedupe_max_keys", "affinity", "counters", "key_prefix", "co_neighbours")
STARTUP_GRACE_S = 15.0
PROGRESS_REPORT_S = 1.0   # how often the loop tells the store where it stands (record_progress)
NEARLINE_KEYS = ("consumer", "topics", "batch_size", "poll_timeout_s", "progress_interval_s")


@dataclass(frozen=True)
class BusConfig:
    url: str = "embedded://var/bus"
    fsync: str = "interval"
    fsync_interval_s: float = 1.0
    segment_bytes: int = 64 << 20
    spool_dir: str | None = None  # kafka only: where records wait while the broker is unreachable
    partitions: int = 3  # kafka only: partitions of the topics the bus creates
    linger_ms: int = 5  # kafka only
    session_timeout_ms: int = 10_000  # kafka only: a dead consumer's partitions move after this
    # embedded only (Kafka's retention is the broker's; its spool deletes what was shipped):
    retention_s: float | None = DEFAULT_RETENTION_S  # closed segments older than this go; None: no age limit
    retention_bytes: int | None = None  # oldest closed segments go while a topic is larger; None: no limit
    retention_wait_for_consumers: bool = True  # ...and only once every registered consumer committed past them

    def options(self) -> dict:
        opts = {"fsync": self.fsync, "fsync_interval_s": self.fsync_interval_s, "segment_bytes": self.segment_bytes}
        if self.url.startswith("embedded://"):
            opts.update(retention_s=self.retention_s, retention_bytes=self.retention_bytes,
                        retention_wait_for_consumers=self.retention_wait_for_consumers)
        if self.url.startswith("kafka://"):
            opts.update(partitions=self.partitions, linger_ms=self.linger_ms,
                        session_timeout_ms=self.session_timeout_ms)
            if self.spool_dir:
                opts["spool_dir"] = self.spool_dir
        return opts

    def open(self) -> EventBus:
        return open_bus(self.url, **self.options())


@dataclass(frozen=True)
class StoreConfig:
    url: str = "memory://"
    half_life_s: float = 3600.0
    snapshot_path: str | None = None  # memory store: snapshot file (same as memory://PATH)
    snapshot_interval_s: float = 5.0
    recent_items: int = 50
    dedupe_ttl_s: int = 7 * 86400
    dedupe_max_keys: int = DEFAULT_DEDUPE_MAX_KEYS  # hard bound on remembered dedupe keys, oldest forgotten first
    affinity: dict = field(default_factory=lambda: dict(DEFAULT_AFFINITY))
    counters: tuple = DEFAULT_COUNTERS
    key_prefix: str = "sr:"
    co_neighbours: int = 50  # co-engaged items kept per item

    @property
    def effective_url(self) -> str:
        if self.url.startswith("memory://") and self.snapshot_path and self.url == "memory://":
            return f"memory://{self.snapshot_path}"
        return self.url

    def open(self) -> FeatureStore:
        return open_store(self.effective_url, half_life_s=self.half_life_s, recent_items=self.recent_items,
                          dedupe_ttl_s=self.dedupe_ttl_s, dedupe_max_keys=self.dedupe_max_keys,
                          affinity=dict(self.affinity),
                          counters=tuple(self.counters), key_prefix=self.key_prefix, co_neighbours=self.co_neighbours)


@dataclass(frozen=True)
class NearlineSettings:
    consumer: str = "nearline"
    topics: tuple = ("impressions", "events")
    batch_size: int = 5000
    poll_timeout_s: float = 0.1
    progress_interval_s: float = 10.0


@dataclass(frozen=True)
class NearlineConfig:
    bus: BusConfig = field(default_factory=BusConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    nearline: NearlineSettings = field(default_factory=NearlineSettings)
    source: str | None = None

    @classmethod
    def from_dict(cls, data, source: str | None = None, lines: dict | None = None) -> "NearlineConfig":
        """Validate the ``bus``/``store``/``nearline`` sections (others are ignored: they belong
        to the scorer). Every problem is reported at once, by key path (and line with ``lines``)."""
        errs = Errors()
        root = as_dict(errs, data if data is not None else {}, "")
        if root is None:
            errs.raise_if_any(source, lines)
        bus = _bus(errs, root.get("bus", {}), "bus")
        store = _store(errs, root.get("store", {}), "store")
        near = _nearline(errs, root.get("nearline", {}), "nearline")
        if store.dedupe_max_keys < 2 * near.batch_size:  # a batch applied but not committed comes back whole
            errs.add("store.dedupe_max_keys", f"{store.dedupe_max_keys} is below twice nearline.batch_size "
                                              f"({near.batch_size}): a replayed batch could count again", "range")
        errs.raise_if_any(source, lines)
        return cls(bus, store, near, source)

    @classmethod
    def load(cls, path) -> "NearlineConfig":
        from strategy.config import read_yaml

        data, lines = read_yaml(path)
        return cls.from_dict(data, source=str(path), lines=lines)

    def with_urls(self, bus_url: str | None = None, store_url: str | None = None) -> "NearlineConfig":
        """The config with ``--bus`` / ``--store`` overrides (validated like the file)."""
        errs = Errors()
        cfg = self
        if bus_url is not None:
            _bus_url(errs, bus_url, "bus.url")
            cfg = replace(cfg, bus=replace(cfg.bus, url=bus_url))
        if store_url is not None:
            _store_url(errs, store_url, "store.url")
            cfg = replace(cfg, store=replace(cfg.store, url=store_url))
        errs.raise_if_any()
        return cfg


def _bus_url(errs: Errors, value, path: str):
    url = as_str(errs, value, path, max_len=4096)
    if url is None:
        return None
    try:
        parse_bus_url(url)
    except ValidationError as exc:
        for e in exc.errors:
            errs.add(path, e.message, e.code)
        return None
    return url


def _store_url(errs: Errors, value, path: str):
    url = as_str(errs, value, path, max_len=4096)
    if url is None:
        return None
    scheme = url.partition("://")[0] if "://" in url else None
    if scheme not in ("memory", "redis"):
        from strategy.errors import did_you_mean

        errs.add(path, f"expected memory://[PATH] or redis://HOST:PORT/DB, got '{url}'"
                       + (did_you_mean(scheme, ("memory", "redis")) if scheme else ""), "choice")
        return None
    return url


def _bus(errs: Errors, value, path: str) -> BusConfig:
    d = BusConfig()
    obj = as_dict(errs, value, path)
    if obj is None:
        return d
    check_keys(errs, obj, path, BUS_KEYS)
    p = lambda k: join_path(path, k)  # noqa: E731 - a local path helper
    kw = {}
    if "url" in obj:
        kw["url"] = _bus_url(errs, obj["url"], p("url"))
    if "fsync" in obj:
        kw["fsync"] = as_str(errs, obj["fsync"], p("fsync"), choices=FSYNC_POLICIES)
    if "fsync_interval_s" in obj:
        kw["fsync_interval_s"] = as_number(errs, obj["fsync_interval_s"], p("fsync_interval_s"), lo=0.001, hi=3600)
    if "segment_bytes" in obj:
        kw["segment_bytes"] = as_number(errs, obj["segment_bytes"], p("segment_bytes"), lo=4096, hi=1 << 40,
                                        integer=True)
    if obj.get("spool_dir") is not None:
        kw["spool_dir"] = as_str(errs, obj["spool_dir"], p("spool_dir"), max_len=4096)
    if "partitions" in obj:
        kw["partitions"] = as_number(errs, obj["partitions"], p("partitions"), lo=1, hi=1024, integer=True)
    if "linger_ms" in obj:
        kw["linger_ms"] = as_number(errs, obj["linger_ms"], p("linger_ms"), lo=0, hi=10_000, integer=True)
    if "session_timeout_ms" in obj:
        kw["session_timeout_ms"] = as_number(errs, obj["session_timeout_ms"], p("session_timeout_ms"), lo=1000,
                                             hi=3_600_000, integer=True)
    unlimited = {}  # retention limits given as null: no limit
    if "retention_s" in obj:
        if obj["retention_s"] is None:
            unlimited["retention_s"] = None
        else:
            kw["retention_s"] = as_number(errs, obj["retention_s"], p("retention_s"), lo=1, hi=MAX_RETENTION_S)
    if "retention_bytes" in obj:
        if obj["retention_bytes"] is None:
            unlimited["retention_bytes"] = None
        else:
            kw["retention_bytes"] = as_number(errs, obj["retention_bytes"], p("retention_bytes"), lo=0, hi=1 << 50,
                                              integer=True)
    if "retention_wait_for_consumers" in obj:
        kw["retention_wait_for_consumers"] = as_bool(errs, obj["retention_wait_for_consumers"],
                                                     p("retention_wait_for_consumers"))
    kw = {k: v for k, v in kw.items() if v is not None}
    return replace(d, **kw, **unlimited)


def _store(errs: Errors, value, path: str) -> StoreConfig:
    d = StoreConfig()
    obj = as_dict(errs, value, path)
    if obj is None:
        return d
    check_keys(errs, obj, path, STORE_KEYS)
    p = lambda k: join_path(path, k)  # noqa: E731
    kw = {}
    if "url" in obj:
        kw["url"] = _store_url(errs, obj["url"], p("url"))
    if "half_life_s" in obj:
        kw["half_life_s"] = as_number(errs, obj["half_life_s"], p("half_life_s"), lo=1, hi=10 * 365 * 86400)
    if obj.get("snapshot_path") is not None:
        kw["snapshot_path"] = as_str(errs, obj["snapshot_path"], p("snapshot_path"), max_len=4096)
    if "snapshot_interval_s" in obj:
        kw["snapshot_interval_s"] = as_number(errs, obj["snapshot_interval_s"], p("snapshot_interval_s"),
                                              lo=0.05, hi=86400)
    if "recent_items" in obj:
        kw["recent_items"] = as_number(errs, obj["recent_items"], p("recent_items"), lo=1, hi=10_000, integer=True)
    if "dedupe_ttl_s" in obj:
        kw["dedupe_ttl_s"] = as_number(errs, obj["dedupe_ttl_s"], p("dedupe_ttl_s"), lo=60, hi=365 * 86400,
                                       integer=True)
    if "dedupe_max_keys" in obj:
        kw["dedupe_max_keys"] = as_number(errs, obj["dedupe_max_keys"], p("dedupe_max_keys"), lo=1000,
                                          hi=MAX_DEDUPE_KEYS, integer=True)
    if "co_neighbours" in obj:
        kw["co_neighbours"] = as_number(errs, obj["co_neighbours"], p("co_neighbours"), lo=1, hi=MAX_CO_NEIGHBOURS,
                                        integer=True)
    if "affinity" in obj:
        aff = as_dict(errs, obj["affinity"], p("affinity"))
        if aff is not None:
            out = {}
            for k, v in aff.items():
                num = as_number(errs, v, join_path(p("affinity"), k), lo=-1000, hi=1000)
                if num is not None:
                    out[str(k)] = float(num)
            kw["affinity"] = out
    if "counters" in obj:
        names = as_list(errs, obj["counters"], p("counters"), max_len=256)
        if names is not None:
            good = [as_str(errs, n, f"{p('counters')}[{i}]", max_len=64) for i, n in enumerate(names)]
            kw["counters"] = tuple(n for n in good if n is not None)
    if "key_prefix" in obj:
        kw["key_prefix"] = as_str(errs, obj["key_prefix"], p("key_prefix"), max_len=64)
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = replace(d, **kw)
    if cfg.url.startswith("memory://") and cfg.url != "memory://" and cfg.snapshot_path \
            and cfg.url[len("memory://"):] != cfg.snapshot_path:
        errs.add(p("snapshot_path"), f"'{cfg.snapshot_path}' disagrees with the path of url '{cfg.url}'; "
                                     "give one of them", "conflict")
    return cfg


def _nearline(errs: Errors, value, path: str) -> NearlineSettings:
    d = NearlineSettings()
    obj = as_dict(errs, value, path)
    if obj is None:
        return d
    check_keys(errs, obj, path, NEARLINE_KEYS)
    p = lambda k: join_path(path, k)  # noqa: E731
    kw = {}
    if "consumer" in obj:
        kw["consumer"] = as_str(errs, obj["consumer"], p("consumer"), pattern=CONSUMER_RE)
    if "topics" in obj:
        topics = as_list(errs, obj["topics"], p("topics"), max_len=16)
        if topics is not None:
            if not topics:
                errs.add(p("topics"), "at least one topic", "range")
            good = [as_str(errs, t, f"{p('topics')}[{i}]", pattern=TOPIC_RE) for i, t in enumerate(topics)]
            kw["topics"] = tuple(t for t in good if t is not None)
    if "batch_size" in obj:
        kw["batch_size"] = as_number(errs, obj["batch_size"], p("batch_size"), lo=1, hi=1_000_000, integer=True)
    if "poll_timeout_s" in obj:
        kw["poll_timeout_s"] = as_number(errs, obj["poll_timeout_s"], p("poll_timeout_s"), lo=0.001, hi=60)
    if "progress_interval_s" in obj:
        kw["progress_interval_s"] = as_number(errs, obj["progress_interval_s"], p("progress_interval_s"),
                                              lo=0.01, hi=86400)
    kw = {k: v for k, v in kw.items() if v is not None}
    return replace(d, **kw)


# ---------------------------------------------------------------- the loop


@dataclass
class NearlineStats:
    records: int = 0  # records consumed
    applied: int = 0  # new (not duplicates)
    batches: int = 0
    commits: int = 0
    snapshots: int = 0
    store_errors: int = 0
    newest_ts: float | None = None  # event time of the newest record applied
    caught_up: bool = False         # the last poll found nothing more to read
    started: float = field(default_factory=time.time)

    def lag_s(self, now: float | None = None) -> float:
        """0 while caught up, else how old the newest applied record is (the whole backlog's age
        is at least that); 0 before anything arrived."""
        if self.caught_up or self.newest_ts is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.newest_ts)

    def to_dict(self) -> dict:
        elapsed = max(time.time() - self.started, 1e-9)
        return {"records": self.records, "applied": self.applied, "duplicates": self.records - self.applied,
                "batches": self.batches, "commits": self.commits, "snapshots": self.snapshots,
                "store_errors": self.store_errors,
                "elapsed_s": round(elapsed, 3), "records_per_s": round(self.records / elapsed, 1)}


def run_nearline(config: NearlineConfig, *, bus: EventBus | None = None, store: FeatureStore | None = None,
                 stop: threading.Event | None = None, max_idle_s: float | None = None,
                 on_progress=None, startup_grace_s: float = STARTUP_GRACE_S,
                 stats: NearlineStats | None = None) -> NearlineStats:
    """Consume ``nearline.topics`` under ``nearline.consumer`` into the store until ``stop`` is
    set (or, with ``max_idle_s``, until nothing arrived for that long since the last record;
    before the first record at least ``startup_grace_s``). A bus or store not given
    is opened from the config and closed at the end. ``on_progress(stats)`` is called every
    ``progress_interval_s``. A clean stop snapshots (memory store) and commits what it applied."""
    settings = config.nearline
    own_bus, own_store = bus is None, store is None
    bus = bus or config.bus.open()
    store = store or config.store.open()
    stop = stop or threading.Event()
    stats = NearlineStats() if stats is None else stats  # a caller's object shows live progress
    can_snapshot = store.durable or getattr(store, "snapshot_path", None) is not None
    consumer = bus.consumer(settings.consumer, list(settings.topics))
    pending: dict = {}
    last_snapshot = last_progress = last_data = last_report = time.monotonic()

    def checkpoint() -> None:
        nonlocal pending, last_snapshot
        if not pending:
            return
        if not store.durable:
            store.snapshot()
            stats.snapshots += 1
        consumer.commit(pending)
        stats.commits += 1
        pending = {}
        last_snapshot = time.monotonic()

    try:
        while not stop.is_set():
            batch = consumer.poll_batch(settings.batch_size, settings.poll_timeout_s)
            now = time.monotonic()
            if batch.positions:
                if not _apply_with_retry(store, batch.values, stats, stop):
                    break  # stopped while the store was down: nothing of this batch is committed
                stats.records += len(batch)
                stats.batches += 1
                stats.newest_ts = _event_ts(batch.values[-1]) or stats.newest_ts
                last_data = now
                if store.durable:
                    consumer.commit(batch)
                    stats.commits += 1
                elif can_snapshot:
                    for k, v in batch.positions.items():
                        if v > pending.get(k, -1):
                            pending[k] = v
            stats.caught_up = not batch.positions
            if pending and (now - last_snapshot >= config.store.snapshot_interval_s or not batch.positions):
                checkpoint()
            if now - last_report >= PROGRESS_REPORT_S:
                last_report = now
                _report_progress(store, settings.consumer, stats)
            if on_progress is not None and now - last_progress >= settings.progress_interval_s:
                last_progress = now
                on_progress(stats)
            if max_idle_s is not None:
                if stats.records and now - last_data >= max_idle_s:
                    break
                if not stats.records and now - last_data >= max(max_idle_s, startup_grace_s):
                    break  # nothing at all (a Kafka group join alone takes ~5 s)
        checkpoint()
        _report_progress(store, settings.consumer, stats)
    finally:
        consumer.close()
        if own_store:
            store.close()
        if own_bus:
            bus.close()
    return stats


def _event_ts(value) -> float | None:
    ts = value.get("ts") if isinstance(value, dict) else None
    return float(ts) if type(ts) in (int, float) and ts == ts else None


def _report_progress(store: FeatureStore, consumer: str, stats: NearlineStats) -> None:
    """Tell the store's other readers (the scorer's /metrics) how far this consumer is; an
    unreachable store is the apply loop's business, not this report's."""
    try:
        store.record_progress(consumer, stats.newest_ts, stats.caught_up)
    except StoreUnavailable:
        pass


def _apply_with_retry(store: FeatureStore, values: list, stats: NearlineStats, stop: threading.Event) -> bool:
    """Apply a batch, retrying with backoff while the store is unreachable; False if stopped."""
    backoff = 0.2
    while True:
        try:
            stats.applied += store.apply(values)
            return True
        except StoreUnavailable as exc:
            stats.store_errors += 1
            log.warning("near-line: %s; retrying in %.1f s", exc, backoff)
            if stop.wait(backoff):
                return False
            backoff = min(backoff * 2, 5.0)


class NearlineThread:
    """Runs :func:`run_nearline` in a daemon thread of this process (e.g. next to the scorer,
    sharing its memory store): ``start()``, ``stop()``."""

    def __init__(self, config: NearlineConfig, bus: EventBus | None = None, store: FeatureStore | None = None):
        self.config, self.bus, self.store = config, bus, store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = NearlineStats()  # updated as batches are applied
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            run_nearline(self.config, bus=self.bus, store=self.store, stop=self._stop, stats=self.stats)
        except BaseException as exc:  # noqa: BLE001 - reported through .error
            self.error = exc
            log.exception("near-line consumer stopped")

    def start(self) -> "NearlineThread":
        self._thread = threading.Thread(target=self._run, name="nearline", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


__all__ = ["BusConfig", "StoreConfig", "NearlineSettings", "NearlineConfig", "NearlineStats", "run_nearline",
           "NearlineThread"]


# ---------------------------------------------------------------- synthetic traffic (bench, tests, demo)

EVENT_RATES = (("click", 0.30), ("watch", 0.40), ("like", 0.06), ("share", 0.02), ("comment", 0.02),
               ("report", 0.01))


def synthetic_stream(n_events: int, seed: int = 0, start_ts: float = 1.7e9, users: int = 2000, items: int = 5000,
                     creators: int = 300, topics: int = 20, per_request: int = 5) -> tuple[list, list]:
    """``(impressions, events)`` of a simulated feed, in time order: requests show
    ``per_request`` items each; feedback follows with the rates of :data:`EVENT_RATES` until
    ``n_events`` events exist. Items have a fixed creator and topic, carried by both kinds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    types = [t for t, _ in EVENT_RATES]
    rates = np.array([r for _, r in EVENT_RATES])
    n_req = int(n_events / (per_request * rates.sum()) * 1.2) + 10
    req_ts = start_ts + np.cumsum(rng.exponential(0.05, size=n_req))
    req_user = rng.integers(users, size=n_req)
    shown = np.argsort(rng.random((n_req, items)), axis=1)[:, :per_request] if items <= 64 else \
        rng.integers(items, size=(n_req, per_request))
    fire = rng.random((n_req, per_request, len(types))) < rates
    delays = rng.exponential(20.0, size=(n_req, per_request, len(types)))
    watch = rng.exponential(15.0, size=(n_req, per_request))
    impressions, events = [], []
    for r in range(n_req):
        ts = round(float(req_ts[r]), 3)
        user, rid = f"u{int(req_user[r])}", f"r{r + 1}"
        for pos in range(per_request):
            item = int(shown[r, pos])
            iid, cid, top = f"i{item}", f"c{item % creators}", f"t{item % topics}"
            impressions.append({"request_id": rid, "ts": ts, "user_id": user, "item_id": iid, "position": pos,
                                "source": "retrieval", "strategy": "feed_v1", "model_version": "v1",
                                "score": 0.5, "creator_id": cid, "topic": top})
            for k in np.flatnonzero(fire[r, pos]):
                ev = {"event_id": f"e{len(events)}", "ts": round(ts + float(delays[r, pos, k]), 3),
                      "type": types[k], "user_id": user, "item_id": iid, "request_id": rid, "creator_id": cid,
                      "topic": top}
                if types[k] == "watch":
                    ev["value"] = round(float(watch[r, pos]), 2)
                events.append(ev)
                if len(events) >= n_events:
                    return impressions, events
    return impressions, events
