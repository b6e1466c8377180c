"""``kafka://HOST:PORT``: the event bus on Kafka through kafka-python 2.3.x. Records are keyed by
``user_id`` and produced with ``acks=all``; a consumer name is a consumer group with manual
commits. Publishing never blocks on the broker: records are first appended to a local spool (an
embedded log) and a background thread ships them in order, so while the broker is unreachable
they wait on disk and arrive, in order, once it is back. Spool segments are deleted once shipped.
Consumers decode fetched records with :mod:`online.bus.kafka_decoder`."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from strategy.errors import ValidationError

from .base import (DEFAULT_SEGMENT_BYTES, TOPIC_RE, TOPICS, Consumer, EventBus, Record, _check_consumer_name,
                   _check_topic, _decode_values, _normalise_position, encode_records)
from .embedded import EmbeddedBus, EmbeddedConsumer
from .kafka_decoder import install_fast_decoder
from .segments import _seg_path, _segments

log = logging.getLogger("stratarank.bus")

class BusProducer:
    """Publishes to Kafka through a local spool (an embedded log), so ``publish`` never waits
    for the broker: a background thread ships spooled records in order (per topic), retrying
    while the broker is unreachable, and marks them shipped once the broker acknowledged them
    (``acks=all``). A crash re-ships at most the unacknowledged tail (consumers dedupe).

    Several processes (scorer workers) may share one spool folder: all of them append, one of
    them (whoever holds the spool's ``_shipper`` consumer lock) ships, and another takes over
    within a second when that process dies."""

    SHIPPER = "_shipper"

    def __init__(self, bootstrap: str, spool_dir, topics=TOPICS, fsync: str = "interval",
                 fsync_interval_s: float = 1.0, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 client_id: str = "stratarank", linger_ms: int = 5, partitions: int = 3,
                 request_timeout_ms: int = 10_000, retry_backoff_s: float = 0.5, batch: int = 5000):
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.client_id = client_id
        self.linger_ms = linger_ms
        self.partitions = partitions
        self.request_timeout_ms = request_timeout_ms
        self.retry_backoff_s = retry_backoff_s
        self.batch = batch
        # shipped segments are deleted: the spool keeps only what the broker has not acknowledged
        self.spool = EmbeddedBus(spool_dir, fsync=fsync, fsync_interval_s=fsync_interval_s,
                                 segment_bytes=segment_bytes, retention_bytes=0, retention_s=None,
                                 retention_required_consumers=(self.SHIPPER,))
        with self.spool._lock:  # recover torn tails a crash left in the spool before shipping
            for topic in os.listdir(self.spool.path / "topics"):
                if TOPIC_RE.match(topic):
                    self.spool._writer(topic)
        self._cursor: _SpoolCursor | None = None  # held by one process of those sharing the spool
        self._producer = None
        self._stop = threading.Event()
        self.shipped = 0
        self.last_error: str | None = None
        self._known_topics: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="bus-shipper", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._producer is not None

    def publish(self, topic: str, records: list[dict]) -> None:
        _check_topic(topic)
        encoded = encode_records(records)
        if encoded:
            self.spool.publish_encoded(topic, encoded)

    def pending(self) -> int:
        """Bytes spooled (by any process sharing the spool) and not yet acknowledged by the broker."""
        return _spool_lag(self.spool.path, self.SHIPPER)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything published so far was acknowledged by the broker."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.pending() > 0:
            if self._stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                return False
            time.sleep(0.01)
        return True

    def _connect(self):
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap, client_id=self.client_id, acks="all", linger_ms=self.linger_ms,
            retries=5, max_in_flight_requests_per_connection=1, request_timeout_ms=self.request_timeout_ms,
            batch_size=256 * 1024, reconnect_backoff_max_ms=2000)
        _ensure_topics(self.bootstrap, self.topics, self.partitions, self.client_id)
        self._known_topics = set(self.topics)
        return producer

    def _drop_producer(self):
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except Exception:  # noqa: BLE001 - closing a broken client
                pass
            self._producer = None

    def _run(self) -> None:
        backoff = self.retry_backoff_s
        while not self._stop.is_set():
            if self._cursor is None:
                try:  # several processes (scorer workers) may share one spool: one of them ships
                    self._cursor = _SpoolCursor(self.spool, self.SHIPPER, list(self.topics))
                except ValidationError:
                    self._stop.wait(1.0)
                    continue
            if self._producer is None:
                try:
                    self._producer = self._connect()
                    backoff = self.retry_backoff_s
                    log.info("bus: connected to kafka %s", self.bootstrap)
                except Exception as exc:  # noqa: BLE001 - broker down: keep spooling
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            frames = self._cursor.read(self.batch)
            if not frames:
                self._cursor.wait(0.05)
                continue
            try:
                fresh = {f[0] for f in frames} - self._known_topics
                if fresh:
                    _ensure_topics(self.bootstrap, sorted(fresh), self.partitions, self.client_id)
                    self._known_topics |= fresh
                futures = [self._producer.send(topic, key=key or None, value=value, timestamp_ms=int(ts * 1000))
                           for topic, ts, key, value, _ in frames]
                self._producer.flush(timeout=self.request_timeout_ms / 1000)
                for f in futures:
                    f.get(timeout=0)
            except Exception as exc:  # noqa: BLE001 - not acknowledged: re-ship from the spool
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("bus: kafka %s unavailable (%s); records stay spooled", self.bootstrap, self.last_error)
                self._cursor.rewind()
                self._drop_producer()
                self._stop.wait(backoff)
                continue
            self._cursor.commit(frames)
            self.shipped += len(frames)

    def close(self, timeout_s: float = 5.0) -> None:
        """Try to ship what is spooled (up to ``timeout_s``), then stop; the rest stays spooled
        and is shipped by the next producer on the same spool."""
        if not self._stop.is_set():
            self.flush(timeout_s)
            self._stop.set()
            self._thread.join(timeout_s + 2)
            self._drop_producer()
            if self._cursor is not None:
                self._cursor.close()
            self.spool.close()


class _SpoolCursor:
    """The shipper's read position on the spool log (committed only after broker acks)."""

    def __init__(self, spool: EmbeddedBus, name: str, topics: list[str]):
        self.spool = spool
        self.consumer = EmbeddedConsumer(spool, name, topics)
        self.topics = topics

    def _discover(self) -> None:
        for topic in sorted(os.listdir(self.spool.path / "topics")):
            if topic not in self.consumer.position and TOPIC_RE.match(topic):
                self.consumer.add_topic(topic)
        self.topics = self.consumer.topics

    def read(self, max_records: int):
        self._discover()
        out = []
        for topic in self.topics:
            reader = self.consumer._readers[topic]
            frames, pos = reader.read(self.consumer.position[topic], max_records - len(out))
            for fpos, fnext, ts, key, value in frames:
                out.append((topic, ts, key, value, fnext))
            self.consumer.position[topic] = pos
            if len(out) >= max_records:
                break
        return out

    def wait(self, timeout_s: float) -> None:
        self.spool.wait_for_data(self.spool._seq, timeout_s)

    def rewind(self) -> None:
        self.consumer.position.update({t: self.consumer.committed.get(t, 0) for t in self.topics})

    def commit(self, frames) -> None:
        pos = {}
        for topic, _ts, _k, _v, fnext in frames:
            pos[topic] = max(pos.get(topic, 0), fnext)
        self.consumer.commit(pos)

    def close(self) -> None:
        self.consumer.close()


def _spool_lag(path: Path, consumer: str) -> int:
    """Bytes of the log at ``path`` past the committed positions of ``consumer``."""
    try:
        committed = json.loads((path / "consumers" / f"{consumer}.json").read_text()).get("positions", {})
    except FileNotFoundError:
        committed = {}
    total = 0
    for topic in os.listdir(path / "topics"):
        folder = path / "topics" / topic
        segs = _segments(folder)
        if segs:
            end = segs[-1] + _seg_path(folder, segs[-1]).stat().st_size
            total += max(0, end - int(committed.get(topic, 0)))
    return total


def _ensure_topics(bootstrap: str, topics, partitions: int, client_id: str) -> None:
    """Create missing topics (``partitions`` each); an existing topic is left as it is."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id + "-admin")
    try:
        for topic in topics:
            try:
                admin.create_topics([NewTopic(topic, partitions, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class KafkaBus(EventBus):
    """``kafka://HOST:PORT``: publish through a :class:`BusProducer` (spool + shipper thread);
    consumers are consumer groups with manual commits."""

    def __init__(self, bootstrap: str, spool_dir=None, fsync: str = "interval", fsync_interval_s: float = 1.0,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, client_id: str = "stratarank", linger_ms: int = 5,
                 partitions: int = 3, request_timeout_ms: int = 10_000, retry_backoff_s: float = 0.5,
                 fetch_max_wait_ms: int = 100, session_timeout_ms: int = 10_000):
        self.bootstrap = bootstrap
        self.session_timeout_ms = session_timeout_ms
        self.url = f"kafka://{bootstrap}"
        self.spool_dir = Path(spool_dir or Path("var") / "spool" / f"kafka-{bootstrap.replace(':', '-')}")
        self._producer_opts = dict(fsync=fsync, fsync_interval_s=fsync_interval_s, segment_bytes=segment_bytes,
                                   client_id=client_id, linger_ms=linger_ms, partitions=partitions,
                                   request_timeout_ms=request_timeout_ms, retry_backoff_s=retry_backoff_s)
        self.client_id = client_id
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self._producer: BusProducer | None = None
        self._lock = threading.Lock()
        self._consumers: list[KafkaConsumerAdapter] = []

    @property
    def producer(self) -> BusProducer:
        with self._lock:
            if self._producer is None:
                self._producer = BusProducer(self.bootstrap, self.spool_dir, **self._producer_opts)
            return self._producer

    def publish(self, topic: str, records: list[dict]) -> None:
        self.producer.publish(topic, records)

    def flush(self, timeout_s: float | None = None) -> bool:
        return self._producer.flush(timeout_s) if self._producer is not None else True

    def consumer(self, name: str, topics: list[str]) -> "KafkaConsumerAdapter":
        _check_consumer_name(name)
        for t in topics:
            _check_topic(t)
        try:  # a subscription to a topic that does not exist yet would wait for a metadata refresh (5 min)
            _ensure_topics(self.bootstrap, topics, self._producer_opts["partitions"], self.client_id)
        except Exception as exc:  # noqa: BLE001 - the broker may be down: the consumer retries itself
            log.warning("bus: cannot create topics %s on %s (%s)", topics, self.bootstrap, exc)
        c = KafkaConsumerAdapter(self.bootstrap, name, list(topics), self.client_id, self.fetch_max_wait_ms,
                                 self.session_timeout_ms)
        self._consumers.append(c)
        return c

    def close(self) -> None:
        for c in self._consumers:
            c.close()
        self._consumers.clear()
        if self._producer is not None:
            self._producer.close()
            self._producer = None



class KafkaConsumerAdapter(Consumer):
    """A consumer group member (``group_id = name``), no auto-commit, from the earliest offset."""

    def __init__(self, bootstrap: str, name: str, topics: list[str], client_id: str, fetch_max_wait_ms: int,
                 session_timeout_ms: int = 10_000):
        from kafka import KafkaConsumer

        self.name = name
        self.topics = topics
        self._consumer = KafkaConsumer(
            *topics, bootstrap_servers=bootstrap, group_id=name, client_id=f"{client_id}-{name}",
            enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=fetch_max_wait_ms,
            max_poll_records=10_000, session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 3),
            # kafka-python's defaults let a fetch response (50 MB) outgrow the frame limit (1 MB): a
            # fetch of several topics then fails with "Invalid frame length" and is retried
            fetch_max_bytes=16 << 20, max_partition_fetch_bytes=8 << 20, receive_message_max_bytes=32 << 20)
        self._tuples = install_fast_decoder(self._consumer)   # records come as (offset, ts_ms, key, value)
        self._polled: dict[tuple[str, int], int] = {}
        self.invalid = 0

    def _poll_parts(self, max_records: int, timeout_s: float) -> list:
        """Parts (see :meth:`Consumer._poll_parts`) of ``(offset, timestamp ms, key, raw value)`` rows."""
        batches = self._consumer.poll(timeout_ms=int(max(0.0, timeout_s) * 1000), max_records=max_records)
        parts = []
        for tp, recs in batches.items():
            if not recs:
                continue
            if not self._tuples:
                recs = [(r.offset, r.timestamp, r.key, r.value) for r in recs]
            topic, partition = tp.topic, tp.partition
            values = _decode_values([r[3] or b"null" for r in recs])
            if None in values:
                for row, value in zip(recs, values):
                    if value is None:
                        self.invalid += 1
                        log.warning("kafka %s[%d]@%d: not a JSON object; skipped", topic, partition, row[0])
            after = self._polled[(topic, partition)] = recs[-1][0] + 1
            parts.append((topic, partition, recs, values, after))
        return parts

    def _records(self, parts: list) -> list[Record]:
        out: list[Record] = []
        append, new = out.append, tuple.__new__   # a Record without its Python-level __new__ (hot loop)
        for topic, partition, recs, values, _ in parts:
            for (offset, ts, key, _), value in zip(recs, values):
                if value is not None:
                    append(new(Record, (topic, partition, offset, offset + 1,
                                        key.decode("utf-8", "replace") if key else None, value, ts / 1000.0)))
        return out

    def commit(self, records_or_position=None) -> None:
        """Commit offsets synchronously (after the given records or :class:`Batch`, a
        ``{(topic, partition): offset}`` mapping, or everything polled so far)."""
        from kafka.structs import OffsetAndMetadata, TopicPartition

        from kafka.errors import CommitFailedError

        pos = _normalise_position(records_or_position, self._polled)
        if pos:
            try:
                self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                                       for (t, p), o in pos.items()})
            except CommitFailedError as exc:  # a rebalance: the records are delivered again
                log.warning("kafka consumer %s: commit failed (%s); records will be redelivered", self.name, exc)

    def at_end(self) -> bool:
        """Every assigned partition's position is at its high watermark (as the last fetch saw it);
        False before the group assigned anything, or while a watermark is unknown."""
        assigned = self._consumer.assignment()
        if not assigned:
            return False
        for tp in assigned:
            high = self._consumer.highwater(tp)
            if high is None or self._consumer.position(tp) < high:
                return False
        return True

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        except Exception:  # noqa: BLE001 - closing a broken client
            pass
