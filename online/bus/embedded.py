"""``embedded://PATH``: the event bus as a durable append-only log on local disk -- the segment
log of :mod:`online.bus.segments`, a folder per topic under ``PATH/topics/``. Every consumer name
keeps its own committed position per topic (``PATH/consumers/<name>.json``). Several processes
may publish to one log; one process at a time may consume under a given name.

Retention (``retention_s``, default 7 days; ``retention_bytes``, default unlimited) deletes
whole closed segments, oldest first, once they are older than ``retention_s`` (by the time
of their last append) or while the topic's files exceed ``retention_bytes`` -- and, unless
``retention_wait_for_consumers`` is false, only once every registered consumer (a name
with a committed position for the topic: ``consumers/<name>.json``) has committed past
them, so nothing unconsumed is lost. A consumer registers with its first commit (one that
never commits, like a scorer worker's private memory store, blocks nothing and rebuilds
from what is retained); one gone for good is released by deleting its ``.json`` (a warning
names a consumer that holds retention back). The active (last) segment is never deleted. It runs
when a segment rolls and, at most every few seconds, when a consumer commits
(:meth:`EmbeddedBus.enforce_retention` runs it at once). A consumer without a committed
position starts at the earliest retained record; one whose committed position was deleted
(with ``retention_wait_for_consumers: false``) continues at the earliest retained record
with a warning, and counts the bytes it lost in ``retention_skipped_bytes`` (Kafka's
``auto_offset_reset=earliest``, made loud).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path

from .base import (DEFAULT_RETENTION_S, DEFAULT_SEGMENT_BYTES, TOPIC_RE, Consumer, EventBus, Record, _bad,
                   _check_consumer_name, _check_topic, _decode_values, _normalise_position, encode_records)
from .segments import fsync_dir, _frames, _seg_path, _segments, _TopicReader, _TopicWriter

log = logging.getLogger("stratarank.bus")

RETENTION_CHECK_S = 5.0  # a committing consumer runs retention at most this often


class EmbeddedBus(EventBus):
    """``embedded://PATH``: a segment log per topic under ``PATH/topics/<topic>/``, committed
    positions under ``PATH/consumers/<name>.json``; retention as in the module docstring."""

    def __init__(self, path, fsync: str = "interval", fsync_interval_s: float = 1.0,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, retention_bytes: int | None = None,
                 retention_s: float | None = DEFAULT_RETENTION_S, retention_wait_for_consumers: bool = True,
                 retention_required_consumers: tuple = ()):
        self.path = Path(path)
        self.url = f"embedded://{path}"
        self.fsync = fsync
        self.fsync_interval_s = float(fsync_interval_s)
        self.segment_bytes = int(segment_bytes)
        self.retention_bytes = None if retention_bytes is None else int(retention_bytes)
        self.retention_s = None if retention_s is None else float(retention_s)
        self.retention_wait_for_consumers = bool(retention_wait_for_consumers)
        # consumers that protect every topic, also before their first commit on it (the spool's shipper)
        self.retention_required_consumers = tuple(retention_required_consumers)
        self.deleted_segments = 0  # by this process's retention runs
        self._blocked_warned: set = set()
        (self.path / "topics").mkdir(parents=True, exist_ok=True)
        (self.path / "consumers").mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, _TopicWriter] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._seq = 0
        self._closed = False
        self._syncer = None
        if fsync == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, name="bus-fsync", daemon=True)
            self._syncer.start()

    def _writer(self, topic: str) -> _TopicWriter:
        w = self._writers.get(topic)
        if w is None:
            w = self._writers[topic] = _TopicWriter(self.path / "topics" / topic, self.segment_bytes, self.fsync)
        return w

    def publish(self, topic: str, records: list[dict]) -> None:
        """Append ``records`` to ``topic`` (one write; fsync per policy). Raises ValidationError
        for a bad topic or a record that is not a JSON object, before writing anything."""
        _check_topic(topic)
        encoded = encode_records(records)
        if not encoded:
            return
        self.publish_encoded(topic, encoded)

    def publish_encoded(self, topic: str, encoded: list[tuple[bytes, bytes]], ts: float | None = None) -> None:
        now = time.time() if ts is None else ts
        data = _frames(now, encoded)
        with self._cond:
            if self._closed:
                raise RuntimeError("bus is closed")
            w = self._writer(topic)
            w.append(data)
            self._seq += 1
            self._cond.notify_all()
            if w.rolled:
                w.rolled = False
                self._retain_locked([topic], time.time())

    # ---- retention

    @property
    def retains_everything(self) -> bool:
        return self.retention_bytes is None and self.retention_s is None

    def enforce_retention(self, topics=None, now: float | None = None) -> dict[str, list[int]]:
        """Delete the closed segments the retention policy allows (see the module docstring);
        returns ``{topic: [base offsets of the deleted segments]}``. Safe while other processes
        publish and consume (each topic's deletions hold its writer ``flock``)."""
        with self._lock:
            if self._closed:
                return {}
            return self._retain_locked(topics, time.time() if now is None else now)

    def earliest_offset(self, topic: str) -> int:
        """The position of the oldest retained record of ``topic`` (0 when it has none)."""
        segs = _segments(self.path / "topics" / topic)
        return segs[0] if segs else 0

    def _consumer_floors(self, topics) -> dict[str, tuple[int, str]]:
        """``{topic: (lowest committed position, consumer name)}`` over registered consumers; a
        required consumer without a position on a topic holds all of it (position 0)."""
        floors: dict[str, tuple[int, str]] = {}
        committed: dict[str, dict] = {}
        folder = self.path / "consumers"
        for name in os.listdir(folder):
            if not name.endswith(".json"):
                continue
            try:
                positions = json.loads((folder / name).read_text()).get("positions", {})
            except FileNotFoundError:
                continue
            except (OSError, ValueError, AttributeError) as exc:  # an unreadable commit file protects everything
                log.warning("embedded log %s: cannot read %s (%s); retention waits", self.path, name, exc)
                return {"*": (0, name[:-5])}
            committed[name[:-5]] = positions
            for topic, pos in positions.items():
                if topic not in floors or int(pos) < floors[topic][0]:
                    floors[topic] = (int(pos), name[:-5])
        for name in self.retention_required_consumers:
            for topic in topics:
                if topic not in committed.get(name, {}):
                    floors[topic] = (0, name)
        return floors

    def _retain_locked(self, topics, now: float) -> dict[str, list[int]]:
        if self.retains_everything:
            return {}
        if topics is None:
            topics = [t for t in os.listdir(self.path / "topics") if TOPIC_RE.match(t)]
        floors = self._consumer_floors(topics) if self.retention_wait_for_consumers else {}
        out = {}
        for topic in topics:
            folder = self.path / "topics" / topic
            if not folder.is_dir():
                continue
            w = self._writers.get(topic)
            if w is not None:
                with w._locked():
                    deleted = self._retain_topic(folder, topic, now, floors)
            else:
                lock_fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)
                    deleted = self._retain_topic(folder, topic, now, floors)
                finally:
                    os.close(lock_fd)  # releases the flock
            if deleted:
                out[topic] = deleted
        return out

    def _retain_topic(self, folder: Path, topic: str, now: float, floors: dict) -> list[int]:
        segs = _segments(folder)
        if len(segs) < 2:
            return []
        stats = []
        for base in segs:
            try:
                st = os.stat(_seg_path(folder, base))
            except FileNotFoundError:  # deleted by another process meanwhile
                return []
            stats.append(st)
        total = sum(st.st_size for st in stats)
        floor = floors.get("*") or floors.get(topic)
        deleted = []
        for i in range(len(segs) - 1):  # never the active (last) segment
            end = segs[i + 1]
            expired = self.retention_s is not None and now - stats[i].st_mtime >= self.retention_s
            oversize = self.retention_bytes is not None and total > self.retention_bytes
            if not (expired or oversize):
                break
            if floor is not None and floor[0] < end:
                if (topic, floor[1]) not in self._blocked_warned:
                    self._blocked_warned.add((topic, floor[1]))
                    log.warning("embedded log %s: retention waits for consumer '%s' (committed at %d of topic %s); "
                                "delete consumers/%s.json if that consumer is gone for good",
                                self.path, floor[1], floor[0], topic, floor[1])
                break
            os.unlink(_seg_path(folder, segs[i]))
            total -= stats[i].st_size
            deleted.append(segs[i])
        if deleted:
            if self.fsync != "never":
                fsync_dir(folder)
            self.deleted_segments += len(deleted)
            log.info("embedded log %s: retention deleted %d segment(s) of %s before %d", self.path, len(deleted),
                     topic, segs[len(deleted)])
        return deleted

    def wait_for_data(self, seq: int, timeout_s: float) -> int:
        """Block until a publish of this process after ``seq`` or the timeout; returns the seq."""
        with self._cond:
            if self._seq == seq and timeout_s > 0:
                self._cond.wait(timeout_s)
            return self._seq

    def _sync_loop(self) -> None:
        while True:
            time.sleep(self.fsync_interval_s)
            with self._lock:
                if self._closed:
                    return
                writers = [w for w in self._writers.values() if w.dirty]
                for w in writers:
                    w.sync()

    def flush(self, timeout_s: float | None = None) -> bool:
        with self._lock:
            for w in self._writers.values():
                if w.dirty:
                    w.sync()
        return True

    def consumer(self, name: str, topics: list[str]) -> "EmbeddedConsumer":
        _check_consumer_name(name)
        for t in topics:
            _check_topic(t)
        return EmbeddedConsumer(self, name, list(topics))

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for w in self._writers.values():
                w.close()
            self._writers.clear()
            self._cond.notify_all()


def _hold_name(path: Path, name: str) -> int:
    """An fd holding an exclusive ``flock`` on ``path`` (created if missing). The lock file of a
    consumer that never committed is removed when it closes, so after locking, the path must still
    be the locked file; if its last holder removed it meanwhile, lock the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _bad("consumer", f"consumer '{name}' is in use by another process", "in_use") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


class EmbeddedConsumer(Consumer):
    """Reads the topics round-robin from the committed positions of ``name``. One process at a
    time may hold a name (an ``flock`` on ``consumers/<name>.lock``). A consumer that never
    committed leaves nothing behind (scorer workers follow the log under a name per pid)."""

    def __init__(self, bus: EmbeddedBus, name: str, topics: list[str], poll_interval_s: float = 0.005):
        self.bus = bus
        self.name = name
        self.topics = topics
        self.poll_interval_s = poll_interval_s
        cdir = bus.path / "consumers"
        self._lock_path = cdir / f"{name}.lock"
        self._lock_fd = _hold_name(self._lock_path, name)
        self._offsets_path = cdir / f"{name}.json"
        self.committed = self._load()
        self.position = {t: self._start(t) for t in topics}
        self._readers = {t: _TopicReader(bus.path / "topics" / t) for t in topics}
        self._next_topic = 0
        self._polled: dict[tuple[str, int], int] = {}
        self._last_retention = time.monotonic()

    def _start(self, topic: str) -> int:
        """The committed position, else the earliest retained one (a new name starts there)."""
        if topic in self.committed:
            return self.committed[topic]  # below the earliest retained: the reader warns and skips
        return self.bus.earliest_offset(topic)

    def add_topic(self, topic: str) -> None:
        _check_topic(topic)
        if topic not in self.position:
            self.topics.append(topic)
            self.position[topic] = self._start(topic)
            self._readers[topic] = _TopicReader(self.bus.path / "topics" / topic)

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self._offsets_path.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): int(v) for k, v in data.get("positions", {}).items()}

    @property
    def skipped_bytes(self) -> int:
        return sum(r.skipped_bytes for r in self._readers.values())

    @property
    def retention_skipped_bytes(self) -> int:
        """Bytes this consumer never read because retention had deleted them (see the module doc)."""
        return sum(r.retention_skipped_bytes for r in self._readers.values())

    def _read_some(self, max_records: int) -> list:
        """Parts (see :meth:`Consumer._poll_parts`) of up to ``max_records`` frames ``(position,
        next position, publish time, key, raw value)``, starting at a topic that rotates per call."""
        parts, n_read = [], 0
        n = len(self.topics)
        for i in range(n):
            if n_read >= max_records:
                break
            topic = self.topics[(self._next_topic + i) % n]
            frames, pos = self._readers[topic].read(self.position[topic], max_records - n_read)
            self.position[topic] = pos
            if not frames:
                continue
            values = _decode_values([f[4] for f in frames])
            if None in values:
                for frame, obj in zip(frames, values):
                    if obj is None:
                        log.warning("embedded log %s: record at %d is not a JSON object; skipped", topic, frame[0])
            parts.append((topic, 0, frames, values, pos))
            self._polled[(topic, 0)] = pos
            n_read += len(frames)
        self._next_topic = (self._next_topic + 1) % max(n, 1)
        return parts

    def _poll_parts(self, max_records: int, timeout_s: float) -> list:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            seq = self.bus._seq
            parts = self._read_some(max_records)
            if parts:
                return parts
            left = deadline - time.monotonic()
            if left <= 0:
                return parts
            # woken at once by a publish of this process; other processes are seen by polling
            self.bus.wait_for_data(seq, min(left, self.poll_interval_s))

    def _records(self, parts: list) -> list[Record]:
        out: list[Record] = []
        append, new = out.append, tuple.__new__   # a Record without its Python-level __new__ (hot loop)
        for topic, _, frames, values, _ in parts:
            for (fpos, fnext, ts, key, _), obj in zip(frames, values):
                if obj is not None:
                    append(new(Record, (topic, 0, fpos, fnext, key.decode("utf-8", "replace") if key else None,
                                        obj, ts)))
        return out

    def seek(self, positions: dict[str, int]) -> None:
        for t, p in positions.items():
            self.position[t] = int(p)

    def commit(self, records_or_position=None) -> None:
        """Store positions: after the given records or :class:`Batch`, a ``{topic: position}``
        mapping, or (None) everything polled so far. Atomic (temp file + rename), fsynced unless
        ``fsync: never``."""
        pos = _normalise_position(records_or_position, self._polled)
        changed = False
        for (topic, _part), p in pos.items():
            if topic in self.position and p > self.committed.get(topic, -1):
                self.committed[topic] = p
                changed = True
        if not changed:
            return
        tmp = self._offsets_path.with_suffix(".json.tmp")
        with open(tmp, "w") as fh:
            json.dump({"consumer": self.name, "positions": self.committed}, fh)
            fh.flush()
            if self.bus.fsync != "never":
                os.fsync(fh.fileno())
        os.replace(tmp, self._offsets_path)
        if self.bus.fsync == "always":
            fsync_dir(self._offsets_path.parent)
        if not self.bus.retains_everything and time.monotonic() - self._last_retention >= RETENTION_CHECK_S:
            self._last_retention = time.monotonic()
            self.bus.enforce_retention(self.topics)

    def lag(self) -> dict[str, int]:
        """Bytes not yet consumed per topic (by this consumer's current position)."""
        out = {}
        for t in self.topics:
            segs = _segments(self.bus.path / "topics" / t)
            end = segs[-1] + _seg_path(self.bus.path / "topics" / t, segs[-1]).stat().st_size if segs else 0
            out[t] = max(0, end - self.position[t])
        return out

    def at_end(self) -> bool:
        return not any(self.lag().values())

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        if self._lock_fd >= 0:
            if not self._offsets_path.exists():   # nothing committed under this name: no trace left
                with contextlib.suppress(FileNotFoundError):
                    self._lock_path.unlink()
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

