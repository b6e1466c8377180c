"""The scorer's Prometheus metrics, with ``prometheus_client``.

One process (the Flask dev server, ``app.test_client()``): each :class:`Metrics` has its own
registry, and ``/metrics`` renders it. Under ``stratarank serve`` (gunicorn, several workers) the
client library runs in multiprocess mode: ``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
folder before anything imports it, every worker writes its values there, gunicorn's
``child_exit`` hook marks a dead worker's gauges dead, and any worker's ``/metrics`` renders the
whole server (counters summed over workers, dead ones included; gauges as each says below).

Gauges of state outside a request (near-line lag, spool backlog, the Kafka decoder's fallbacks)
are read by callbacks registered with :meth:`Metrics.watch`: at every scrape in one process,
and every ``sample_s`` by a daemon thread in multiprocess mode (a scrape reaches one worker).
"""
from __future__ import annotations

import logging
import os
import threading
from functools import cached_property

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import multiprocess

from .bus.kafka_decoder import fallbacks as kafka_decoder_fallbacks

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger("stratarank.scorer")


def multiprocess_dir() -> str | None:
    """The folder of multiprocess mode, when this process runs in it."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    def __init__(self, sample_s: float = 1.0):
        disable_created_metrics()  # no *_created series: multiprocess mode has none either
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir()
        r = self.registry
        self.requests = Counter("stratarank_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("stratarank_request_seconds", "Request latency.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Counter("stratarank_candidates_scored", "Candidates scored by /v1/rank.", registry=r)
        self.events = Counter("stratarank_events_accepted", "Feedback events accepted by /v1/events.", registry=r)
        self.degraded = Counter("stratarank_degraded_responses",
                                "Responses served without the primary model, by cause.", ["reason"], registry=r)
        self.reloads = Counter("stratarank_model_reloads",
                               "New current versions a worker loaded (or failed to).", ["outcome"], registry=r)
        self.store_errors = Counter("stratarank_feature_store_errors",
                                    "Feature-store calls that failed (the request ranked without real-time "
                                    "features), by operation.", ["op"], registry=r)
        self.rate_limited = Counter("stratarank_rate_limited", "Requests refused with 429.", registry=r)
        self.rate_limit_errors = Counter("stratarank_rate_limit_storage_errors",
                                         "Rate-limit checks that could not reach the shared storage (Redis) and "
                                         "used this worker's own buckets.", registry=r)
        self.model_info = Gauge("stratarank_model_info", "The model versions live workers serve (1).", ["version"],
                                multiprocess_mode="livemax", registry=r)
        self.decoder_fallbacks = Counter(
            "stratarank_kafka_decoder_fallbacks",
            "Kafka consumers reading with kafka-python's stock record decoder (about 3x slower) instead of the fast "
            "one, by cause: version (kafka-python is not 2.3.x), private_api (something the fast one relies on is "
            "missing).", ["reason"], registry=r)
        self._fallbacks_seen: dict = {}
        self._version = None
        self._watchers = [self._sample_decoder]
        self._sample_s = sample_s
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------- gauges that exist only where the part they watch does

    @cached_property
    def nearline_lag(self) -> Gauge:
        return Gauge("stratarank_nearline_lag_seconds",
                     "How far the near-line consumer feeding the feature store is behind: 0 while caught up, else "
                     "the age of the newest event it applied.", multiprocess_mode="livemax", registry=self.registry)

    @cached_property
    def nearline_records(self) -> Gauge:
        return Gauge("stratarank_nearline_records", "Records the workers' own near-line threads consumed "
                     "(memory store).", multiprocess_mode="livesum", registry=self.registry)

    @cached_property
    def spool_backlog(self) -> Gauge:
        return Gauge("stratarank_bus_spool_backlog_bytes", "Bytes spooled for Kafka and not yet acknowledged by "
                     "the broker.", multiprocess_mode="livemax", registry=self.registry)

    @cached_property
    def corpus_items(self) -> Gauge:
        return Gauge("stratarank_corpus_items", "Items in the corpus that can become candidates (neither blocked "
                     "nor expired).", multiprocess_mode="livemax", registry=self.registry)

    @cached_property
    def items_written(self) -> Counter:
        return Counter("stratarank_corpus_writes", "Item writes accepted by /v1/items, by outcome (created, "
                       "updated, expired).", ["outcome"], registry=self.registry)

    @cached_property
    def feed_stage(self) -> Histogram:
        return Histogram("stratarank_feed_stage_seconds", "Time of each stage of /v1/feed: retrieval (all of it), "
                         "its parts (user_tower, each source, corpus) and ranking.", ["stage"],
                         buckets=LATENCY_BUCKETS, registry=self.registry)

    @cached_property
    def feed_candidates(self) -> Counter:
        return Counter("stratarank_feed_candidates", "Candidates /v1/feed pooled, by the source that brought "
                       "each in first.", ["source"], registry=self.registry)

    @cached_property
    def retrieval_indexed(self) -> Gauge:
        return Gauge("stratarank_retrieval_indexed_items", "Items in the two-tower index of /v1/feed.",
                     multiprocess_mode="livemax", registry=self.registry)

    # ------------------------------------------------------------ updates

    def observe_feed(self, summary: dict) -> None:
        """One /v1/feed answer's ``retrieval`` summary: its stage timings and per-source credits."""
        for stage, ms in summary["timings_ms"].items():
            if stage != "total":
                self.feed_stage.labels(stage).observe(ms / 1e3)
        for source, n in summary["credited"].items():
            if n:
                self.feed_candidates.labels(source).inc(n)

    @property
    def model_version(self) -> str | None:
        return self._version

    @model_version.setter
    def model_version(self, version: str) -> None:
        if version == self._version:
            return
        if self._version is not None:
            self.model_info.labels(self._version).set(0)
        self.model_info.labels(version).set(1)
        self._version = version

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def add(self, *, candidates: int = 0, events: int = 0, degraded: str | None = None,
            model_reloaded: bool = False, model_reload_failed: bool = False) -> None:
        if candidates:
            self.candidates.inc(candidates)
        if events:
            self.events.inc(events)
        if degraded:
            self.degraded.labels(degraded).inc()
        if model_reloaded:
            self.reloads.labels("loaded").inc()
        if model_reload_failed:
            self.reloads.labels("failed").inc()

    def watch(self, sample) -> None:
        """Call ``sample(self)`` to refresh gauges before each scrape (one process) or every
        ``sample_s`` (multiprocess mode, from a daemon thread that starts with the first watcher)."""
        self._watchers.append(sample)
        if self.multiprocess and self._sampler is None:
            self._sampler = threading.Thread(target=self._sample_loop, name="metrics-sampler", daemon=True)
            self._sampler.start()

    def _sample_decoder(self, _) -> None:
        """The decoder counts fallbacks per process (``online.bus.kafka_decoder``); add what is new."""
        for reason, n in kafka_decoder_fallbacks().items():
            new = n - self._fallbacks_seen.get(reason, 0)
            if new > 0:
                self.decoder_fallbacks.labels(reason).inc(new)
                self._fallbacks_seen[reason] = n

    def sample(self) -> None:
        for watcher in self._watchers:
            try:
                watcher(self)
            except Exception:  # noqa: BLE001 - a gauge that cannot be read must not fail the scrape
                log.exception("metrics: a sampler failed")

    def _sample_loop(self) -> None:
        while not self._stop.wait(self._sample_s):
            self.sample()

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------ export

    def render(self) -> str:
        """The Prometheus text exposition: of this process, or of every worker in multiprocess mode."""
        self.sample()
        if self.multiprocess is None:
            return generate_latest(self.registry).decode()
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess)
        return generate_latest(merged).decode()


def mark_worker_dead(pid: int) -> None:
    """gunicorn ``child_exit``: drop a dead worker's live gauges (its counters stay in the sums)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid)
