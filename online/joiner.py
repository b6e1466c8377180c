"""The joiner: served impressions + their feedback -> labelled training examples, exactly once.

It consumes the bus topics ``impressions`` (what the scorer served, with the features the model saw)
and ``events`` (feedback) under one consumer name and emits one example per served impression: the
served features, the position (1-based rank), the strategy, model version, experiments, propensity
and predictions of the serve, and one label per objective of an objectives file (a binary objective
is 1 when an event of its type joined, a regression the sum of the joined events' values).

Join rule, on the bus's publish times (the arrival times, so the same bus always gives the same
examples, whatever the interleaving of topics and partitions a consumer happens to read):

- an event joins the impression with its ``request_id`` and ``item_id`` when it was published at
  most ``window_s`` after the impression (and not more than ``grace_s`` before it);
- the first impression of a ``(request_id, item_id)`` wins (a repeated one is counted, dropped);
  the first event of an ``event_id`` wins (duplicates are counted, dropped);
- an event published after its impression's window is **late**: it never changes an emitted
  example; it is counted and written to ``late/`` with its ``example_id`` (a batch job may re-join
  with a longer window). An event with no impression to join (no ``request_id``, an unknown
  one, or published more than ``grace_s`` before its impression) is **unattributed**: counted and
  written to ``unattributed/``. A record that is not a valid impression or event is counted and
  written, raw, to ``rejected/``. Nothing is dropped silently.

An impression is emitted once the events of its partition have been read past its window plus
``grace_s`` (publish times may be out of order by up to ``grace_s`` between producers); when the
consumer is at the end of every partition it reads (``Consumer.at_end``), the joiner's clock (wall
time minus ``grace_s``) stands in. One joiner process per consumer name: a Kafka rebalance between
two live joiners would have both emit the partitions that moved (scale-out by partition is future work). A
``(request_id, item_id)`` is read from the same partition number of both topics (the buses key both
by ``user_id``, with the same partition count).

Output (``out``)::

    examples/hour=2026-12-06T13/part-00000042.parquet   by the hour the impression was served (UTC)
    late/hour=.../part-....parquet, unattributed/..., rejected/...
    _checkpoint.json                                     the joiner's state (see below)

plus every example as a JSON record on the ``topic`` bus topic (default ``joined``, for the
streaming trainer; ``example_id`` dedupes it: a crash may publish a flush twice).

Exactly once: each flush writes its Parquet parts (numbered by the flush sequence), publishes them
to ``topic``, then atomically replaces ``_checkpoint.json`` — the labels and event ids gathered so
far for the impressions still open, the counters, the positions to resume from (the oldest record
still needed) — and only then commits those positions to the bus. A joiner killed at any point
restarts from its checkpoint: parts numbered after it are deleted, the ids of recent examples and
events are read back from the parts, the bus delivers again from the committed positions, and
records already accounted for are recognised by id and skipped, so the examples written are the
same, in count and content, as one uninterrupted run's.

Memory: every open impression is held (about 2 KB with its features) for ``window_s``; ids of
examples and events for ``dedupe_ttl_s`` (default ``window_s + grace_s + 300``): a duplicate or a
late event arriving later than that is counted as unattributed instead.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import orjson

from strategy.checks import as_dict, as_number, as_str, check_keys
from strategy.errors import Errors, FieldError, ValidationError, join_path

from .bus import CONSUMER_RE, TOPIC_RE, EventBus
from .bus.segments import fsync_dir
from .nearline import BusConfig, NearlineConfig

log = logging.getLogger("stratarank.joiner")

JOINER_KEYS = ("consumer", "window_s", "grace_s", "out", "topic", "objectives", "flush_interval_s", "flush_rows",
               "max_pending", "dedupe_ttl_s", "batch_size", "poll_timeout_s")
CHECKPOINT = "_checkpoint.json"
CHECKPOINT_VERSION = 1
OUTPUTS = ("examples", "late", "unattributed", "rejected")
DERIVED = ("event_ids", "n_events", "last_event_at", "served_at", "joined_at")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LabelSpec:
    """One label per objective: ``(name, event type, regression?)`` in the objectives' order."""

    objectives: tuple

    @classmethod
    def from_strategy(cls, path: str) -> "LabelSpec":
        from strategy import load_strategy

        strategy = load_strategy(path)
        return cls(tuple((o.name, o.event, o.type == "regression") for o in strategy.objectives))

    @cached_property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.objectives]

    @cached_property
    def reserved(self) -> frozenset:
        """Column names a served feature may not take (the labels and the derived columns)."""
        return frozenset(self.names) | frozenset(DERIVED)

    def by_event(self) -> dict[str, list[tuple[int, bool]]]:
        out: dict[str, list] = {}
        for k, (_, event, regression) in enumerate(self.objectives):
            out.setdefault(event, []).append((k, regression))
        return out


@dataclass(frozen=True)
class JoinerConfig:
    """The ``bus`` and ``joiner`` sections of ``conf/service.yaml``."""

    bus: BusConfig = field(default_factory=BusConfig)
    consumer: str = "joiner"
    window_s: float = 300.0           # attribution window on publish times
    grace_s: float = 5.0              # tolerated disorder of publish times (clock skew between producers)
    out: str = "var/joined"
    topic: str | None = "joined"      # bus topic of the joined examples (null: none)
    objectives: str = "conf/objectives/feed.yaml"   # the labels: one per objective
    flush_interval_s: float = 5.0
    flush_rows: int = 50_000
    max_pending: int = 2_000_000      # open impressions (~2 KB each); beyond, the oldest are emitted early (counted)
    dedupe_ttl_s: float | None = None  # ids of examples/events remembered; default window + grace + 300 s
    batch_size: int = 5000
    poll_timeout_s: float = 0.2
    source: str | None = None

    @property
    def ttl_s(self) -> float:
        return self.dedupe_ttl_s if self.dedupe_ttl_s is not None else self.window_s + self.grace_s + 300.0

    @classmethod
    def from_dict(cls, data, source: str | None = None, lines: dict | None = None) -> "JoinerConfig":
        """Validate a service config mapping (only ``bus`` and ``joiner`` are read; the objectives
        default to the first of ``strategies.files``). Every problem at once, by key path."""
        errs = Errors()
        root = as_dict(errs, data if data is not None else {}, "")
        if root is None:
            errs.raise_if_any(source, lines)
        try:
            bus = NearlineConfig.from_dict({"bus": root.get("bus", {})}).bus
        except ValidationError as exc:
            errs.items.extend(exc.errors)
            bus = BusConfig()
        kw: dict = {"bus": bus, "source": source}
        files = (root.get("strategies") or {}).get("files") if isinstance(root.get("strategies"), dict) else None
        if isinstance(files, list) and files and isinstance(files[0], str):
            kw["objectives"] = files[0]
        obj = as_dict(errs, root.get("joiner") or {}, "joiner") or {}
        check_keys(errs, obj, "joiner", JOINER_KEYS)
        p = lambda k: join_path("joiner", k)  # noqa: E731 - a local path helper
        if "consumer" in obj:
            kw["consumer"] = as_str(errs, obj["consumer"], p("consumer"), pattern=CONSUMER_RE)
        for key, lo, hi, integer in (("window_s", 0.001, 30 * 86400, False), ("grace_s", 0, 3600, False),
                                     ("flush_interval_s", 0.01, 3600, False), ("flush_rows", 1, 10_000_000, True),
                                     ("max_pending", 1000, 100_000_000, True), ("batch_size", 1, 1_000_000, True),
                                     ("poll_timeout_s", 0.001, 60, False)):
            if key in obj:
                kw[key] = as_number(errs, obj[key], p(key), lo=lo, hi=hi, integer=integer)
        if obj.get("dedupe_ttl_s") is not None:
            kw["dedupe_ttl_s"] = as_number(errs, obj["dedupe_ttl_s"], p("dedupe_ttl_s"), lo=1, hi=365 * 86400)
        for key in ("out", "objectives"):
            if key in obj:
                kw[key] = as_str(errs, obj[key], p(key), max_len=4096)
        if "topic" in obj:
            kw["topic"] = None if obj["topic"] is None else as_str(errs, obj["topic"], p("topic"), pattern=TOPIC_RE)
            if kw["topic"] in ("impressions", "events"):
                errs.add(p("topic"), f"'{kw['topic']}' is an input of the joiner; name another topic", "invalid")
        cfg = cls(**{k: v for k, v in kw.items() if v is not None or k == "topic"})
        if cfg.dedupe_ttl_s is not None and cfg.dedupe_ttl_s < cfg.window_s + cfg.grace_s:
            errs.add(p("dedupe_ttl_s"), f"{cfg.dedupe_ttl_s:g} is below window_s + grace_s "
                                        f"({cfg.window_s + cfg.grace_s:g}): a replay could count records twice", "range")
        errs.raise_if_any(source, lines)
        return cfg

    @classmethod
    def load(cls, path) -> "JoinerConfig":
        from strategy.config import read_yaml

        data, lines = read_yaml(path)
        return cls.from_dict(data, source=str(path), lines=lines)


# ---------------------------------------------------------------- records


def _bad_record(topic: str, value, why: str) -> dict:
    return {"topic": topic, "reason": why, "value": orjson.dumps(value).decode()}


def _impression_problem(v: dict) -> str | None:
    for key in ("request_id", "user_id", "item_id"):
        if not isinstance(v.get(key), str) or not v[key]:
            return f"{key} must be a non-empty string"
    ts = v.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return "ts must be a finite number"
    pos = v.get("position")
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
        return "position must be an integer >= 0"
    if not isinstance(v.get("features", {}), dict) or not isinstance(v.get("predictions", {}), dict):
        return "features and predictions must be objects"
    return None


def _event_problem(v: dict) -> str | None:
    for key in ("event_id", "type", "item_id"):
        if not isinstance(v.get(key), str) or not v[key]:
            return f"{key} must be a non-empty string"
    rid = v.get("request_id")
    if rid is not None and not isinstance(rid, str):
        return "request_id must be a string or null"
    value = v.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        return "value must be a finite number or null"
    return None


class _Expiring:
    """A set of keys with a time each, forgetting keys older than ``ttl_s`` (by the time given to
    ``expire``), oldest first."""

    def __init__(self, ttl_s: float, items=()):
        self.ttl_s = ttl_s
        self.times: dict[str, float] = {}
        self.order: deque = deque()
        for key, ts in items:
            self.add(key, ts)

    def __contains__(self, key) -> bool:
        return key in self.times

    def __len__(self) -> int:
        return len(self.times)

    def get(self, key):
        return self.times.get(key)

    def add(self, key: str, ts: float) -> None:
        if key not in self.times:
            self.times[key] = ts
            self.order.append((ts, key))

    def expire(self, now: float) -> None:
        cutoff, order, times = now - self.ttl_s, self.order, self.times
        while order and order[0][0] < cutoff:
            _, key = order.popleft()
            times.pop(key, None)


# ---------------------------------------------------------------- the join


class JoinState:
    """The join's state and rules, without I/O (``run_joiner`` feeds it records and writes what
    ``take_outputs`` returns). Pending impressions are kept per partition in arrival order, so the
    emitted ones are always a prefix of each partition and the oldest record still needed is the
    head of a queue."""

    def __init__(self, labels: LabelSpec, window_s: float, grace_s: float, ttl_s: float, max_pending: int):
        self.labels, self.window_s, self.grace_s, self.max_pending = labels, window_s, grace_s, max_pending
        self._by_event = labels.by_event()
        self._n_labels = len(labels.objectives)
        # example_id -> [value, publish ts, labels|None, partition, offset, joined event ids|None]
        self.pending: dict[str, list] = {}
        self.queues: dict[int, deque] = {}      # impressions partition -> example ids in arrival order
        self.orphans: dict[int, deque] = {}     # events partition -> [publish ts, offset, value] waiting for impressions
        self.emitted = _Expiring(ttl_s)         # example_id -> its impression's publish ts
        self.events = _Expiring(ttl_s)          # event_id -> publish ts (dedupe)
        self.imp_clock: dict[int, float] = {}   # partition -> latest publish ts read (impressions)
        self.ev_clock: dict[int, float] = {}    # same, events
        self.consumed: dict[str, int] = {}      # "topic:partition" -> next offset
        self.replay_until: dict[str, int] = {}  # records before these were accounted for before a restart
        self.restored: dict[str, list] = {}     # [labels, event ids] of open impressions, from the checkpoint
        self.counters = {k: 0 for k in ("impressions", "events", "examples", "joined_events", "late_events",
                                        "unattributed_events", "duplicate_impressions", "duplicate_events",
                                        "rejected", "forced_emissions", "replayed")}
        self._out = {k: [] for k in OUTPUTS}

    # ---- input

    def add(self, topic: str, partition: int, offset: int, next_offset: int, published: float, value: dict,
            now: float) -> None:
        key = f"{topic}:{partition}"
        replayed = offset < self.replay_until.get(key, -1)
        if next_offset > self.consumed.get(key, -1):
            self.consumed[key] = next_offset
        if topic == "impressions":
            self._impression(partition, offset, published, value, replayed, now)
        elif topic == "events":
            self._event(partition, offset, published, value, replayed, now)

    def _impression(self, p: int, offset: int, published: float, v: dict, replayed: bool, now: float) -> None:
        if published > self.imp_clock.get(p, -math.inf):
            self.imp_clock[p] = published
        problem = _impression_problem(v)
        if problem is not None:
            if not replayed:
                self._reject("impressions", v, problem)
            return
        xid = f"{v['request_id']}:{v['item_id']}"
        if xid in self.pending or xid in self.emitted:
            if replayed:
                self.counters["replayed"] += 1
            else:
                self.counters["duplicate_impressions"] += 1
            return
        if replayed:
            self.counters["replayed"] += 1
        else:
            self.counters["impressions"] += 1
        labels, ids = self.restored.pop(xid, (None, None))
        self.pending[xid] = [v, published, labels, p, offset, ids]
        self.queues.setdefault(p, deque()).append(xid)
        if len(self.pending) > self.max_pending:
            self._force_oldest(now)

    def _event(self, p: int, offset: int, published: float, v: dict, replayed: bool, now: float) -> None:
        if published > self.ev_clock.get(p, -math.inf):
            self.ev_clock[p] = published
        problem = _event_problem(v)
        if problem is not None:
            if not replayed:
                self._reject("events", v, problem)
            return
        if v["event_id"] in self.events:
            self.counters["replayed" if replayed else "duplicate_events"] += 1
            return
        if replayed:
            self.counters["replayed"] += 1
        else:
            self.counters["events"] += 1
        # seen from now on, resolved or not (a duplicate of a waiting orphan is a duplicate too); after a
        # restart the ids of resolved events come back from the outputs and the open labels, while a
        # waiting orphan is read again from the bus (the resume position is at or before it)
        self.events.add(v["event_id"], published)
        if not self._resolve(v, published, final=False):
            self.orphans.setdefault(p, deque()).append([published, offset, v])

    def _resolve(self, v: dict, published: float, final: bool) -> bool:
        """Join, or file as late / unattributed; False: not decidable yet (its impression may still
        be unread), unless ``final``."""
        rid = v.get("request_id")
        xid = f"{rid}:{v['item_id']}" if rid else None
        entry = self.pending.get(xid) if xid else None
        if entry is not None:
            served = entry[1]
            if published < served - self.grace_s:
                self._unattributed(v, published, "published before its impression")
            elif published > served + self.window_s:
                self._late(v, published, xid, served)
            else:
                self._join(entry, v, published)
            return True
        served = self.emitted.get(xid) if xid else None
        if served is not None:
            if published < served - self.grace_s:
                self._unattributed(v, published, "published before its impression")
            else:
                self._late(v, published, xid, served)
            return True
        if xid is None:
            self._unattributed(v, published, "no request_id")
            return True
        if not final:
            return False
        self._unattributed(v, published, "no impression")
        return True

    def _join(self, entry: list, v: dict, published: float) -> None:
        labels = entry[2]
        if labels is None:
            labels = entry[2] = [0.0] * (self._n_labels + 2)   # the labels, events joined, last event's time
            entry[5] = []
        entry[5].append(v["event_id"])
        for k, regression in self._by_event.get(v["type"], ()):
            if regression:
                value = v.get("value")
                labels[k] += float(value) if value is not None else 0.0
            else:
                labels[k] = 1.0
        labels[-2] += 1.0
        labels[-1] = max(labels[-1], published)
        self.counters["joined_events"] += 1

    def _late(self, v: dict, published: float, xid: str, served: float) -> None:
        self.counters["late_events"] += 1
        self._out["late"].append({**_event_row(v, published), "example_id": xid,
                                  "after_window_s": round(published - served - self.window_s, 3)})

    def _unattributed(self, v: dict, published: float, why: str) -> None:
        self.counters["unattributed_events"] += 1
        self._out["unattributed"].append({**_event_row(v, published), "reason": why})

    def _reject(self, topic: str, v: dict, why: str) -> None:
        self.counters["rejected"] += 1
        self._out["rejected"].append(_bad_record(topic, v, why))

    # ---- time

    def advance(self, now: float, idle: bool, drain: bool = False) -> None:
        """Resolve the orphan events whose impressions must have been read by now and emit the
        impressions whose window has closed. ``idle``: the bus had nothing more to read, so every
        partition's clock may move to ``now - grace_s``. ``drain``: emit everything (the end of a
        bounded run: every record has been read)."""
        g = self.grace_s
        if idle:
            for clock in (self.imp_clock, self.ev_clock):
                for p in set(clock) | set(self.queues) | set(self.orphans):
                    clock[p] = max(clock.get(p, -math.inf), now - g)
        for p, orphans in self.orphans.items():
            clock = self.imp_clock.get(p, -math.inf)
            while orphans and (drain or orphans[0][0] + g < clock):
                published, _, v = orphans.popleft()
                self._resolve(v, published, final=True)
        for p, queue in self.queues.items():
            clock = self.ev_clock.get(p, -math.inf)
            orphans = self.orphans.get(p)
            while queue:
                entry = self.pending[queue[0]]
                closes = entry[1] + self.window_s
                if not drain and (closes + g >= clock or (orphans and orphans[0][0] <= closes)):
                    break
                self._emit(queue.popleft(), now)
        horizon = self.clock()   # data time: a replay of an old backlog must not forget what it just read
        self.emitted.expire(horizon)
        self.events.expire(horizon)

    def clock(self) -> float:
        """The latest publish time read (or stood in for by an idle bus), on any partition."""
        return max([-math.inf, *self.imp_clock.values(), *self.ev_clock.values()])

    def _force_oldest(self, now: float) -> None:
        p = min((q for q in self.queues if self.queues[q]), key=lambda q: self.pending[self.queues[q][0]][1])
        self.counters["forced_emissions"] += 1
        self._emit(self.queues[p].popleft(), now)

    def _emit(self, xid: str, now: float) -> None:
        v, published, labels, _, _, ids = self.pending.pop(xid)
        self.emitted.add(xid, published)
        self.counters["examples"] += 1
        self._out["examples"].append(example_row(xid, v, published, labels, ids, self.labels, now))

    # ---- checkpoints

    def take_outputs(self) -> dict[str, list]:
        out, self._out = self._out, {k: [] for k in OUTPUTS}
        return out

    def buffered(self) -> int:
        return sum(len(v) for v in self._out.values())

    def resume_positions(self) -> dict[str, int]:
        """Per ``topic:partition``, the oldest record still needed: the head of the open impressions
        or of the orphan events, else everything consumed."""
        out = dict(self.consumed)
        for p, queue in self.queues.items():
            if queue:
                out[f"impressions:{p}"] = self.pending[queue[0]][4]
        for p, orphans in self.orphans.items():
            if orphans:
                out[f"events:{p}"] = orphans[0][1]
        return out

    def checkpoint(self, seq: int) -> dict:
        """What a restart needs beside the outputs already written: the labels and event ids of
        the open impressions, the positions, the counters (the ids of emitted examples and of
        late / unattributed events are read back from the outputs, see :meth:`restore`)."""
        return {"version": CHECKPOINT_VERSION, "seq": seq, "positions": self.resume_positions(),
                "consumed": dict(self.consumed), "counters": dict(self.counters), "clock": self.clock(),
                "open": {xid: [e[2], e[5]] for xid, e in self.pending.items() if e[2] is not None}}

    def restore(self, state: dict, outputs: Path) -> None:
        """Continue from ``state`` (a :meth:`checkpoint`); the recent examples and events of the
        Parquet outputs under ``outputs`` (within the id TTL of the checkpoint's clock) are known again."""
        self.counters.update(state["counters"])
        self.replay_until = dict(state["consumed"])
        self.consumed = dict(state["consumed"])
        self.restored = {xid: (labels, ids) for xid, (labels, ids) in state["open"].items()}
        clock = state.get("clock")
        since = -math.inf if clock is None or not math.isfinite(clock) else clock - self.emitted.ttl_s
        for xid, served, ids in _read_ids(outputs / "examples", since, ("example_id", "served_at", "event_ids")):
            self.emitted.add(xid, served)
            for event_id in ids if ids is not None else ():
                self.events.add(event_id, served)
        for kind in ("late", "unattributed"):
            for event_id, published in _read_ids(outputs / kind, since, ("event_id", "published")):
                self.events.add(event_id, published)
        for labels, ids in self.restored.values():
            for event_id in ids or ():
                self.events.add(event_id, clock)


def _event_row(v: dict, published: float) -> dict:
    return {"event_id": v["event_id"], "type": v["type"], "user_id": v.get("user_id"), "item_id": v["item_id"],
            "request_id": v.get("request_id"), "ts": v.get("ts"), "value": v.get("value"), "published": published}


def example_row(xid: str, v: dict, published: float, labels: list | None, event_ids: list | None, spec: LabelSpec,
                now: float) -> dict:
    """One training example: the impression's fields, its served features flattened into columns
    (a feature whose name is taken by another column is kept as ``f_<name>``), ``pred_<objective>``
    for the served predictions, one label column per objective, the joined ``event_ids``,
    ``n_events`` and timing (``served_at``: the impression's publish time; ``last_event_at``: the
    publish time of its last joined event; ``joined_at``: when the example was emitted)."""
    row = {"example_id": xid, "request_id": v["request_id"], "user_id": v["user_id"], "item_id": v["item_id"],
           "ts": v["ts"], "source": v.get("source"), "strategy": v.get("strategy"),
           "model_version": v.get("model_version"), "score": v.get("score"), "propensity": v.get("propensity"),
           "position": v["position"] + 1,   # the served rank (1 = top), as in the simulated world's logs
           "experiments": orjson.dumps(v.get("experiments") or []).decode()}
    for key, value in (v.get("predictions") or {}).items():
        row[f"pred_{key}"] = value
    features = v.get("features") or {}
    taken = row.keys() | spec.reserved
    if features.keys() & taken:
        features = {f"f_{k}" if k in taken else k: value for k, value in features.items()}
    row.update(features)
    if labels is None:
        row.update(dict.fromkeys(spec.names, 0.0))
        row["event_ids"], row["n_events"], row["last_event_at"] = [], 0, None
    else:
        row.update(zip(spec.names, labels))
        row["event_ids"], row["n_events"], row["last_event_at"] = event_ids, int(labels[-2]), labels[-1]
    row["served_at"] = published
    row["joined_at"] = now
    return row


# ---------------------------------------------------------------- Parquet output


def _hour(ts) -> str:
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return "unknown"
    return time.strftime("%Y-%m-%dT%H", time.gmtime(ts))


def rows_table(rows: list[dict]):
    """A pyarrow Table of dict rows: numbers (and nulls) as float64 (``position`` and ``n_events``
    as integers), strings as strings, lists as lists of strings; a column of mixed kinds holds JSON
    text. Converted in one pass by pyarrow (a struct array) when the rows' types agree, else by column."""
    import pyarrow as pa

    try:
        table = pa.Table.from_struct_array(pa.array(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        table = None
    columns = {}
    for name in (table.column_names if table is not None else dict.fromkeys(k for r in rows for k in r)):
        arr = table.column(name) if table is not None else _column(pa, [r.get(name) for r in rows])
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.float64())
        elif pa.types.is_list(arr.type) and pa.types.is_null(arr.type.value_type):
            arr = arr.cast(pa.list_(pa.string()))
        elif pa.types.is_integer(arr.type) and name not in ("position", "n_events"):
            arr = arr.cast(pa.float64())
        columns[name] = arr
    return pa.table(columns)


def _column(pa, values: list):
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if x is None else orjson.dumps(x).decode() for x in values], type=pa.string())


def _read_ids(folder: Path, since: float, columns: tuple):
    """Rows (tuples of ``columns``) of the Parquet parts under ``folder`` in hours from ``since`` on,
    whose time column (the second) is at least ``since``."""
    import pyarrow.parquet as pq

    first = _hour(since) if math.isfinite(since) else ""
    for part in sorted(folder.glob("hour=*/part-*.parquet")):
        hour = part.parent.name[len("hour="):]
        if hour != "unknown" and hour < first:
            continue
        table = pq.read_table(part, columns=[c for c in columns])
        for row in zip(*(table.column(c).to_pylist() for c in columns)):
            if row[1] is not None and row[1] >= since:
                yield row


def _write_part(folder: Path, rows: list[dict], seq: int, hour_of) -> list[Path]:
    import pyarrow.parquet as pq

    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(hour_of(r), []).append(r)
    written = []
    for hour, part in sorted(groups.items()):
        target = folder / f"hour={hour}"
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"part-{seq:08d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(rows_table(part), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(target)
        written.append(path)
    return written


def _part_seq(path: Path) -> int | None:
    name = path.name
    if name.startswith("part-") and name.endswith(".parquet"):
        try:
            return int(name[5:-8])
        except ValueError:
            return None
    return None


def discard_parts_after(out: Path, seq: int) -> int:
    """Delete Parquet parts numbered after ``seq`` (written by a flush whose checkpoint never
    landed: the restarted joiner writes them again). Returns how many were deleted."""
    n = 0
    for kind in OUTPUTS:
        for path in (out / kind).glob("**/part-*.parquet*"):
            s = _part_seq(path) if not path.name.endswith(".tmp") else None
            if s is None or s > seq:
                path.unlink()
                n += 1
    return n


# ---------------------------------------------------------------- the loop


@dataclass
class JoinerStats:
    records: int = 0
    flushes: int = 0
    started: float = field(default_factory=time.time)
    state: JoinState | None = None

    def to_dict(self) -> dict:
        counters = dict(self.state.counters) if self.state is not None else {}
        elapsed = max(time.time() - self.started, 1e-9)
        return {"records": self.records, "flushes": self.flushes,
                "pending": len(self.state.pending) if self.state is not None else 0, **counters,
                "elapsed_s": round(elapsed, 3), "records_per_s": round(self.records / elapsed, 1)}


class Joiner:
    """The joiner's state, outputs and checkpoints for one ``out`` folder (see the module docstring)."""

    def __init__(self, config: JoinerConfig, bus: EventBus, labels: LabelSpec | None = None):
        self.config, self.bus = config, bus
        self.labels = labels or LabelSpec.from_strategy(config.objectives)
        self.out = Path(config.out)
        self.state = JoinState(self.labels, config.window_s, config.grace_s, config.ttl_s, config.max_pending)
        self.seq = 0
        self.last_flush = time.monotonic()
        self._load_checkpoint()

    def _load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        try:
            state = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            state = None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ValidationError([FieldError("joiner.out", f"cannot read the checkpoint: {exc}", "io",
                                              str(path))]) from None
        if state is not None:
            if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "seq" not in state:
                raise ValidationError([FieldError("joiner.out", f"not a version-{CHECKPOINT_VERSION} joiner "
                                                  "checkpoint (delete the folder to start over)", "invalid",
                                                  str(path))])
            names = state.get("labels_spec")
            if names is not None and names != self.labels.names:
                raise ValidationError([FieldError("joiner.objectives", f"the checkpoint in {self.out} was written "
                                                  f"for labels {names}, not {self.labels.names}: use another "
                                                  "joiner.out and consumer", "conflict", self.config.source)])
            self.seq = int(state["seq"])
        self.out.mkdir(parents=True, exist_ok=True)
        dropped = discard_parts_after(self.out, self.seq)
        if dropped:
            log.info("joiner: deleted %d part(s) written after checkpoint %d; they are written again", dropped,
                     self.seq)
        if state is not None:
            self.state.restore(state, self.out)
        self._checkpointed = dict(self.state.consumed)

    def due(self) -> bool:
        return (self.state.buffered() >= self.config.flush_rows
                or time.monotonic() - self.last_flush >= self.config.flush_interval_s)

    def flush(self, consumer) -> bool:
        """Write the buffered outputs, publish the examples, checkpoint, then commit positions;
        False (nothing done) when nothing was read or produced since the last checkpoint."""
        self.last_flush = time.monotonic()
        if not self.state.buffered() and self.state.consumed == self._checkpointed:
            return False
        outputs = self.state.take_outputs()
        self.seq += 1
        for kind, rows in outputs.items():
            if rows:
                hour_of = (lambda r: _hour(r.get("ts"))) if kind == "examples" else (
                    lambda r: _hour(r.get("published")))
                _write_part(self.out / kind, rows, self.seq, hour_of)
        if self.config.topic and outputs["examples"]:
            # orjson: the examples hold JSON values only (read from the bus) and finite floats
            encoded = [(r["user_id"].encode(), orjson.dumps(r)) for r in outputs["examples"]]
            _spool_of(self.bus).publish_encoded(self.config.topic, encoded)
            self.bus.flush(30.0)
        state = self.state.checkpoint(self.seq)
        state["labels_spec"] = self.labels.names
        tmp = self.out / (CHECKPOINT + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.out / CHECKPOINT)
        fsync_dir(self.out)
        positions = {}
        for key, offset in state["positions"].items():
            topic, _, part = key.rpartition(":")
            positions[(topic, int(part))] = offset
        if positions:
            consumer.commit(positions)
        self._checkpointed = dict(state["consumed"])
        return True


def run_joiner(config: JoinerConfig, *, bus: EventBus | None = None, stop: threading.Event | None = None,
               max_idle_s: float | None = None, drain: bool = False, on_progress=None,
               progress_interval_s: float = 10.0, stats: JoinerStats | None = None,
               startup_grace_s: float = 15.0) -> JoinerStats:
    """Join until ``stop`` is set (or, with ``max_idle_s``, until nothing arrived for that long;
    before the first record at least ``startup_grace_s``, a Kafka group join takes ~5 s). A clean
    stop flushes and checkpoints; with ``drain`` it first emits every open impression (a bounded
    run over a bus whose feedback is complete)."""
    own_bus = bus is None
    bus = bus or config.bus.open()
    stop = stop or threading.Event()
    joiner = Joiner(config, bus)
    stats = stats or JoinerStats()
    stats.state = joiner.state
    consumer = bus.consumer(config.consumer, ["impressions", "events"])
    last_data = last_progress = time.monotonic()
    state = joiner.state
    try:
        while not stop.is_set():
            records = consumer.poll(config.batch_size, config.poll_timeout_s)
            now = time.time()
            for r in records:
                state.add(r.topic, r.partition, r.offset, r.next_offset, r.timestamp, r.value, now)
            stats.records += len(records)
            # the bus had nothing more: the joiner's clock may stand in for the partitions' (see advance)
            state.advance(now, idle=not records and consumer.at_end())
            mono = time.monotonic()
            if records:
                last_data = mono
            if joiner.due():
                stats.flushes += joiner.flush(consumer)
            if on_progress is not None and mono - last_progress >= progress_interval_s:
                last_progress = mono
                on_progress(stats)
            if max_idle_s is not None and mono - last_data >= (max_idle_s if stats.records
                                                               else max(max_idle_s, startup_grace_s)):
                break
        if drain:
            if consumer.at_end():
                state.advance(time.time(), idle=True, drain=True)
            else:
                log.warning("joiner: not drained — the consumer has not read all of its partitions; %d open "
                            "impressions stay in the checkpoint", len(state.pending))
        stats.flushes += joiner.flush(consumer)
    finally:
        consumer.close()
        if own_bus:
            bus.close()
    return stats


class JoinerThread:
    """Runs :func:`run_joiner` in a daemon thread (the demo runs one beside the scorer)."""

    def __init__(self, config: JoinerConfig, bus: EventBus | None = None):
        self.config, self.bus = config, bus
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = JoinerStats()
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            run_joiner(self.config, bus=self.bus, stop=self._stop, stats=self.stats)
        except BaseException as exc:  # noqa: BLE001 - reported through .error
            self.error = exc
            log.exception("joiner stopped")

    def start(self) -> "JoinerThread":
        self._thread = threading.Thread(target=self._run, name="joiner", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


# ---------------------------------------------------------------- synthetic traffic (tests, bench)


def synthetic_served(n_requests: int, seed: int = 0, slate: int = 10, users: int = 500, items: int = 5000,
                     start_ts: float = 1.7e9, gap_s: float = 0.01, window_s: float = 60.0, late: float = 0.02,
                     duplicates: float = 0.01, unattributed: float = 0.01, invalid: float = 0.002) -> list[tuple]:
    """``[(topic, publish time, record)]`` in publish order: impressions shaped as the scorer logs
    them (features, predictions, experiments, propensity) every ``gap_s``, and their feedback
    (click, like, share, watch with seconds, report) published inside ``window_s``, with a share of
    ``late`` events (after the window), ``duplicates`` (an event sent twice), ``unattributed`` ones
    (unknown or missing request_id) and ``invalid`` records."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    words = "news cats music travel code food art sport game film".split()
    for r in range(n_requests):
        pub = start_ts + r * gap_s
        user = f"u{int(rng.integers(users))}"
        rid = f"req-{seed}-{r}"
        variant = "treatment" if int(user[1:]) % 2 else "control"
        recent = [f"i{int(x)}" for x in rng.integers(items, size=10)]
        for pos, item in enumerate(rng.choice(items, size=slate, replace=False)):
            iid = f"i{int(item)}"
            llm = bool(item % 3 == 0)
            out.append(("impressions", pub, {
                "request_id": rid, "ts": pub, "user_id": user, "item_id": iid, "position": pos,
                "source": "llm" if llm else "retrieval", "strategy": "feed_v1", "model_version": "feed_mmoe@v1",
                "score": round(float(rng.normal()), 4), "propensity": 1.0 if pos < slate - 1 else 0.05,
                "experiments": [{"layer": "ranking", "experiment": "exp1", "variant": variant}],
                "predictions": {"click": 0.1, "like": 0.02, "share": 0.01, "watch_time": 12.5, "report": 0.001},
                "features": {"creator_id": f"c{int(item) % 97}", "topic": words[int(item) % 10],
                             "text": " ".join(words[int(x)] for x in rng.integers(10, size=8)),
                             "generator": "sim-llm" if llm else None, "prior_score": 0.6 if llm else None,
                             "user_recent_items": recent, "impressions": int(rng.integers(1000)),
                             "duration": round(float(rng.gamma(2, 10)), 1), "creator_followers": int(rng.integers(9999)),
                             "text_len": 8}}))
            if rng.random() >= 0.15:
                continue
            delays = {"click": rng.exponential(window_s / 8)}
            if rng.random() < 0.3:
                delays["like"] = delays["click"] + rng.exponential(window_s / 10)
            if rng.random() < 0.1:
                delays["share"] = delays["click"] + rng.exponential(window_s / 10)
            if rng.random() < 0.02:
                delays["report"] = delays["click"] + rng.exponential(window_s / 10)
            delays["watch"] = delays["click"] + rng.exponential(window_s / 6)
            for etype, delay in delays.items():
                if rng.random() < late:
                    delay = window_s + 1.0 + rng.exponential(window_s / 4)
                event = {"event_id": f"{rid}-{pos}-{etype}", "ts": round(pub + delay, 3), "type": etype,
                         "user_id": user, "item_id": iid, "request_id": rid,
                         "value": round(float(rng.gamma(2, 8)), 1) if etype == "watch" else None}
                out.append(("events", pub + delay, event))
                if rng.random() < duplicates:
                    out.append(("events", pub + delay + rng.exponential(window_s / 10), dict(event)))
        if rng.random() < unattributed * slate:
            kind = rng.integers(2)
            out.append(("events", pub + 0.5, {"event_id": f"stray-{seed}-{r}", "ts": pub, "type": "click",
                                              "user_id": user, "item_id": "i1",
                                              "request_id": None if kind else f"nope-{r}", "value": None}))
        if rng.random() < invalid * slate:
            out.append(("events" if r % 2 else "impressions", pub + 0.1, {"bad": r, "user_id": user}))
    out.sort(key=lambda rec: rec[1])   # stable: a request's impressions stay in rank order
    return out


def _spool_of(bus: EventBus):
    """Where records are appended already encoded: the embedded log itself, or a Kafka bus's local
    spool (its shipper sends them to the broker in order, with their publish times)."""
    return bus.producer.spool if hasattr(bus, "producer") else bus


def publish_synthetic(bus: EventBus, records: list[tuple]) -> None:
    """Publish ``synthetic_served`` records with their publish times, batching runs of one topic and time."""
    from .bus import encode_records

    target = _spool_of(bus)
    run: list = []
    for k, (topic, published, value) in enumerate(records):
        run.append(value)
        nxt = records[k + 1] if k + 1 < len(records) else None
        if nxt is None or nxt[0] != topic or nxt[1] != published:
            target.publish_encoded(topic, encode_records(run), ts=published)
            run = []


__all__ = ["JoinerConfig", "LabelSpec", "JoinState", "Joiner", "JoinerStats", "JoinerThread", "run_joiner",
           "example_row", "rows_table", "discard_parts_after", "synthetic_served", "publish_synthetic"]
