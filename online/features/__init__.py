"""The real-time feature store: what the near-line consumer learns from impressions and events.

Per user: the last ``recent_items`` (50) engaged item ids, most recent first, and topic
affinities (a decayed sum of engagement weights per topic). Per item and per creator: for
impressions and for every event type a raw total and a counter with exponential time decay
(``half_life_s``); events that carry a ``value`` (watch seconds) also feed ``<type>_sum``. Per item,
its co-engaged items (at most ``co_neighbours``, 50): engaging an item that is not among the user's
recent items adds 1 (decayed) to its pair with each of them (:meth:`FeatureStore.co_engaged`).

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

Modules: :mod:`.base` (the interface, options and the maths both backends share),
:mod:`.memory` (:class:`MemoryStore` and its snapshot file) and :mod:`.redis_store`
(:class:`RedisStore`; its Lua scripts are ``lua/*.lua``). Import from this package.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from strategy.errors import did_you_mean

from .base import (DEFAULT_AFFINITY, DEFAULT_COUNTERS, DEFAULT_DEDUPE_MAX_KEYS, IMPRESSIONS, MAX_CO_NEIGHBOURS,
                   MAX_DEDUPE_KEYS, FeatureStore, RealtimeFeatures, StoreOptions, StoreUnavailable, add_affinity, bump,
                   counters_by_entity, decay_add, dedupe_key, item_meta, normalise, parse_options, store_error)
from .memory import MemoryStore, newest_recent
from .redis_store import RedisStore

__all__ = [
    "DEFAULT_AFFINITY", "DEFAULT_COUNTERS", "DEFAULT_DEDUPE_MAX_KEYS", "IMPRESSIONS", "MAX_CO_NEIGHBOURS",
    "MAX_DEDUPE_KEYS", "SCHEMES",
    "FeatureStore", "MemoryStore", "RealtimeFeatures", "RedisStore", "StoreOptions", "StoreUnavailable",
    "add_affinity", "bump", "counters_by_entity", "decay_add", "dedupe_key", "item_meta", "newest_recent", "normalise",
    "open_store",
]

SCHEMES = ("memory", "redis")


def open_store(url: str = "memory://", **options) -> FeatureStore:
    """``memory://`` (no persistence), ``memory://PATH`` (snapshot file, restored on open) or
    ``redis://HOST:PORT/DB``. Options: see :class:`StoreOptions`."""
    opts = parse_options(options)
    if not isinstance(url, str) or "://" not in url:
        raise store_error("store.url", f"expected a URL (memory://[PATH] or redis://HOST:PORT/DB), got {url!r}")
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise store_error("store.url", f"unknown scheme '{scheme}'{did_you_mean(scheme, SCHEMES)} "
                                       f"(allowed schemes: {', '.join(SCHEMES)})", "choice")
    if scheme == "memory":
        return MemoryStore(rest or None, opts)
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        raise store_error("store.url", f"bad port in '{url}'") from None
    db = parts.path.strip("/") or "0"
    if not parts.hostname or not db.isdigit():
        raise store_error("store.url", f"expected redis://HOST:PORT/DB, got '{url}'")
    return RedisStore(parts.hostname, port, int(db), opts, password=parts.password)
