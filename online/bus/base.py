"""The interface both buses implement (:class:`EventBus`, :class:`Consumer`, :class:`Record`,
:class:`Batch`) and the checks of what callers hand them: the bus URL and its options, topic and
consumer names, and the records to publish (JSON objects, keyed by ``user_id``, else ``item_id``)."""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import orjson

from strategy.errors import FieldError, ValidationError, did_you_mean

from .segments import _BODY, MAX_RECORD

TOPICS = ("impressions", "events", "exposures", "items")   # items: corpus writes (online/corpus.py)
FSYNC_POLICIES = ("always", "interval", "never")
SCHEMES = ("embedded", "kafka")
TOPIC_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
CONSUMER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DEFAULT_SEGMENT_BYTES = 64 << 20
MIN_SEGMENT_BYTES = 4096
DEFAULT_RETENTION_S = 7 * 86400.0  # the feature store's default dedupe TTL: older records would count again
MAX_RETENTION_S = 10 * 365 * 86400.0


class Record(NamedTuple):
    """One consumed record (immutable). ``offset`` is its position in ``(topic, partition)`` and
    ``next_offset`` the position just after it (what a commit stores). For the embedded log both
    are byte positions in the topic; for Kafka they are Kafka offsets (``next = offset + 1``).
    A named tuple: ~8x cheaper to create than a frozen dataclass, which was ~10% of consuming."""

    topic: str
    partition: int
    offset: int
    next_offset: int
    key: str | None
    value: dict
    timestamp: float  # publish time, epoch seconds


@dataclass(frozen=True, slots=True)
class Batch:
    """What :meth:`Consumer.poll_batch` returned, by column: ``values``, the records' JSON objects
    in order, and ``positions``, ``{(topic, partition): position after them}`` (what ``commit``
    takes). For bulk consumers such as the near-line loop: no object per record, so a batch held
    across garbage collections gives the collector nothing to promote (a batch of Records does, and
    that made full collections ~15% of consuming)."""

    values: list
    positions: dict

    def __len__(self) -> int:  # records, not fields
        return len(self.values)


class EventBus:
    """The interface both buses implement."""

    url: str

    def publish(self, topic: str, records: list[dict]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def consumer(self, name: str, topics: list[str]) -> "Consumer":  # pragma: no cover - interface
        raise NotImplementedError

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until published records are durable / delivered; True when they are."""
        return True

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Consumer:
    """Reads records of some topics under a consumer name; ``commit`` stores positions."""

    def poll(self, max_records: int = 1000, timeout_s: float = 0.1) -> list[Record]:
        """Up to ``max_records`` records, waiting up to ``timeout_s`` for the first one; a record
        whose value is not a JSON object is skipped (logged and counted)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            out = self._records(self._poll_parts(max_records, deadline - time.monotonic()))
            if out or time.monotonic() >= deadline:  # parts of skipped records only: read on
                return out

    def poll_batch(self, max_records: int = 1000, timeout_s: float = 0.1) -> Batch:
        """:meth:`poll` as a :class:`Batch`: the same records' values, and the positions after them."""
        values, positions = [], {}
        for topic, partition, _, vals, after in self._poll_parts(max_records, timeout_s):
            values += [v for v in vals if v is not None]
            positions[(topic, partition)] = after
        return Batch(values, positions)

    def _poll_parts(self, max_records: int, timeout_s: float) -> list:  # pragma: no cover - interface
        """``[(topic, partition, rows, values, position after)]``, the rows in the bus's own
        layout and ``values`` their decoded JSON objects (None where not one, already logged)."""
        raise NotImplementedError

    def _records(self, parts: list) -> list[Record]:  # pragma: no cover - interface
        """The Records of ``parts`` whose value is a JSON object."""
        raise NotImplementedError

    def commit(self, records_or_position=None) -> None:  # pragma: no cover
        raise NotImplementedError

    def at_end(self) -> bool:  # pragma: no cover - interface
        """True when this consumer has read everything its topics hold right now (every partition it
        is assigned, at least one of them): an empty poll alone does not say so for Kafka."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def positions_of(records) -> dict[tuple[str, int], int]:
    """``{(topic, partition): next position}`` after the given records (max per partition)."""
    out: dict[tuple[str, int], int] = {}
    for r in records:
        k = (r.topic, r.partition)
        if r.next_offset > out.get(k, -1):
            out[k] = r.next_offset
    return out


def _normalise_position(records_or_position, polled: dict) -> dict[tuple[str, int], int]:
    if records_or_position is None:
        return dict(polled)
    if isinstance(records_or_position, Batch):
        return dict(records_or_position.positions)
    if isinstance(records_or_position, dict):
        out = {}
        for k, v in records_or_position.items():
            out[k if isinstance(k, tuple) else (k, 0)] = int(v)
        return out
    return positions_of(records_or_position)


def _decode_values(raw: list) -> list:
    """JSON objects of ``raw`` values (None where one is not a JSON object), each parsed on its own
    (orjson: strict RFC 8259, so ``NaN`` literals, which the producers never write, are not objects)."""
    out = []
    append, loads = out.append, orjson.loads
    for value in raw:
        try:
            v = loads(value)
        except orjson.JSONDecodeError:
            v = None
        append(v if type(v) is dict else None)
    return out


# ---------------------------------------------------------------- options and URLs


def _bad(path: str, message: str, code: str = "invalid"):
    return ValidationError([FieldError(path, message, code)])


_OPTION_TYPES = {
    "fsync": str, "fsync_interval_s": (int, float), "segment_bytes": int, "spool_dir": (str, os.PathLike),
    "client_id": str, "linger_ms": int, "partitions": int, "request_timeout_ms": int,
    "retry_backoff_s": (int, float), "fetch_max_wait_ms": int, "session_timeout_ms": int,
    "retention_bytes": int, "retention_s": (int, float), "retention_wait_for_consumers": bool,
}
_NULLABLE = ("retention_bytes", "retention_s")  # None: no limit
_EMBEDDED_OPTIONS = ("fsync", "fsync_interval_s", "segment_bytes", "retention_bytes", "retention_s",
                     "retention_wait_for_consumers")
_KAFKA_OPTIONS = tuple(k for k in _OPTION_TYPES if not k.startswith("retention_"))


def _check_options(options: dict, allowed) -> None:
    errs = []
    for key, val in options.items():
        if key not in allowed:
            errs.append(FieldError(f"bus.{key}", f"unknown option '{key}'{did_you_mean(key, allowed)} "
                                                 f"(allowed: {', '.join(sorted(allowed))})", "unknown_key"))
            continue
        typ = _OPTION_TYPES[key]
        if val is None and key in _NULLABLE:
            continue
        if typ is bool:
            if not isinstance(val, bool):
                errs.append(FieldError(f"bus.{key}", f"expected true or false, got {val!r}", "type"))
        elif isinstance(val, bool) or not isinstance(val, typ):
            errs.append(FieldError(f"bus.{key}", f"expected {getattr(typ, '__name__', 'a number')}, got {val!r}", "type"))
    fsync = options.get("fsync")
    if isinstance(fsync, str) and fsync not in FSYNC_POLICIES:
        errs.append(FieldError("bus.fsync", f"'{fsync}' is not allowed{did_you_mean(fsync, FSYNC_POLICIES)} "
                                            f"(allowed: {', '.join(FSYNC_POLICIES)})", "choice"))
    seg = options.get("segment_bytes")
    if isinstance(seg, int) and not isinstance(seg, bool) and not MIN_SEGMENT_BYTES <= seg <= 1 << 40:
        errs.append(FieldError("bus.segment_bytes", f"{seg} is out of range [{MIN_SEGMENT_BYTES}, {1 << 40}]", "range"))
    ival = options.get("fsync_interval_s")
    if isinstance(ival, (int, float)) and not isinstance(ival, bool) and not 0.001 <= ival <= 3600:
        errs.append(FieldError("bus.fsync_interval_s", f"{ival} is out of range [0.001, 3600]", "range"))
    rb = options.get("retention_bytes")
    if isinstance(rb, int) and not isinstance(rb, bool) and not 0 <= rb <= 1 << 50:
        errs.append(FieldError("bus.retention_bytes", f"{rb} is out of range [0, {1 << 50}]", "range"))
    rs = options.get("retention_s")
    if isinstance(rs, (int, float)) and not isinstance(rs, bool) and not 1 <= rs <= MAX_RETENTION_S:
        errs.append(FieldError("bus.retention_s", f"{rs} is out of range [1, {MAX_RETENTION_S:.0f}]", "range"))
    if errs:
        raise ValidationError(errs)


def parse_bus_url(url) -> tuple[str, str]:
    """``('embedded', PATH)`` or ``('kafka', 'HOST:PORT')``; ValidationError naming ``bus.url``."""
    allowed = "embedded://PATH or kafka://HOST:PORT"
    if not isinstance(url, str) or "://" not in url:
        raise _bad("bus.url", f"expected a URL ({allowed}), got {url!r}", "type" if not isinstance(url, str) else "invalid")
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise _bad("bus.url", f"unknown scheme '{scheme}'{did_you_mean(scheme, SCHEMES)} "
                              f"(allowed schemes: {', '.join(SCHEMES)}; {allowed})", "choice")
    if scheme == "embedded":
        if not rest:
            raise _bad("bus.url", f"embedded:// needs a folder path ({allowed})")
        return scheme, rest
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise _bad("bus.url", f"kafka:// needs HOST:PORT, got '{url}' ({allowed})")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return scheme, f"{host}:{port}"


def _check_topic(topic) -> str:
    if not isinstance(topic, str) or not TOPIC_RE.match(topic):
        raise _bad("topic", f"topic must match {TOPIC_RE.pattern}, got {topic!r}")
    return topic


def _check_consumer_name(name) -> str:
    if not isinstance(name, str) or not CONSUMER_RE.match(name):
        raise _bad("consumer", f"consumer name must match {CONSUMER_RE.pattern}, got {name!r}")
    return name


_PLAIN = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def _not_plain(value):
    raise TypeError(f"{type(value).__name__} is not a plain JSON value")


def _plain_values(records) -> list[bytes] | None:
    """The records' JSON values by orjson, when they say what the stdlib encoder of
    :func:`encode_records` says: every record a dict that orjson writes (plain values only: no
    subclass, date, dataclass or numpy scalar; integers within 64 bits, str keys, no lone surrogate)
    and that reads back equal to itself, which a NaN or an infinity (written ``null``) does not.
    None otherwise: then the stdlib encodes them and names each bad record."""
    if set(map(type, records)) != {dict}:
        return None
    dumps = orjson.dumps
    try:
        values = [dumps(rec, _not_plain, _PLAIN) for rec in records]
    except TypeError:
        return None
    if orjson.loads(b"[" + b",".join(values) + b"]") != list(records):
        return None
    return values


def encode_records(records) -> list[tuple[bytes, bytes]]:
    """``[(key, json value)]``; every unserialisable record is reported by its index.

    Values are compact UTF-8 JSON. orjson writes them where it says what the stdlib encoder says
    (:func:`_plain_values`: the same JSON once read, its floats in orjson's shortest round-trip
    spelling), the stdlib encoder everything else, with its errors."""
    if not isinstance(records, (list, tuple)):
        raise _bad("records", f"expected a list of objects, got {type(records).__name__}", "type")
    values = _plain_values(records) if records else None
    if values is not None:
        out = []
        for rec, value in zip(records, values):
            uid = rec.get("user_id")
            if uid is None:
                uid = rec.get("item_id")
            key = b"" if uid is None else str(uid).encode()
            if len(key) > 0xFFFF or len(value) + len(key) + _BODY.size > MAX_RECORD:
                break   # the full path reports it (and any other)
            out.append((key, value))
        else:
            return out
    out, errs = [], []
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            errs.append(FieldError(f"records[{i}]", f"expected an object, got {type(rec).__name__}", "type"))
            continue
        try:
            value = dumps(rec).encode()
        except (TypeError, ValueError) as exc:
            errs.append(FieldError(f"records[{i}]", f"not JSON-serialisable: {exc}", "type"))
            continue
        uid = rec.get("user_id")
        if uid is None:   # an item write has no user: its id keys it, so one item's writes keep their order
            uid = rec.get("item_id")
        key = b"" if uid is None else str(uid).encode()
        if len(key) > 0xFFFF or len(value) + len(key) + _BODY.size > MAX_RECORD:
            errs.append(FieldError(f"records[{i}]", f"record larger than {MAX_RECORD} bytes", "too_long"))
            continue
        out.append((key, value))
    if errs:
        raise ValidationError(errs)
    return out

