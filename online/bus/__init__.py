"""The event bus: publish batches of JSON records, consume them by consumer name, at least once.

One interface (:mod:`online.bus.base`), two implementations chosen by URL (:func:`open_bus`):

``embedded://PATH`` (:mod:`online.bus.embedded`)
    A durable append-only log on local disk (:mod:`online.bus.segments`): a write torn by a crash
    is detected and skipped, never misread. Every consumer name keeps its own committed position
    per topic. Retention deletes whole closed segments, by default only once every registered
    consumer has committed past them.

``kafka://HOST:PORT`` (:mod:`online.bus.kafka`)
    Kafka through kafka-python 2.3.x; a consumer name is a consumer group with manual commits.
    Publishing never blocks on the broker: records wait in a local spool until it acknowledged
    them. Consumers decode fetched records with :mod:`online.bus.kafka_decoder` (on another
    kafka-python, with the stock decoder: warned and counted in the scorer's ``/metrics``).

Delivery is at least once: a consumer commits after it has applied a batch, so after a crash the
uncommitted tail is delivered again; consumers dedupe (the feature store does, by ``event_id``).
"""
from __future__ import annotations

from .base import (CONSUMER_RE, DEFAULT_RETENTION_S, DEFAULT_SEGMENT_BYTES, FSYNC_POLICIES, MAX_RETENTION_S,
                   MIN_SEGMENT_BYTES, SCHEMES, TOPIC_RE, TOPICS, Batch, Consumer, EventBus, Record, _check_options,
                   _decode_values, _EMBEDDED_OPTIONS, _KAFKA_OPTIONS, encode_records, parse_bus_url, positions_of)
from .embedded import EmbeddedBus, EmbeddedConsumer
from .kafka import BusProducer, KafkaBus, KafkaConsumerAdapter
from .kafka_decoder import _fast_partition_records
from .segments import MAGIC, MAX_RECORD, _frame, _segments

__all__ = [
    "open_bus", "parse_bus_url", "encode_records", "positions_of",
    "EventBus", "Consumer", "Record", "Batch",
    "EmbeddedBus", "EmbeddedConsumer", "BusProducer", "KafkaBus", "KafkaConsumerAdapter",
    "TOPICS", "FSYNC_POLICIES", "SCHEMES", "TOPIC_RE", "CONSUMER_RE", "DEFAULT_RETENTION_S", "MAX_RETENTION_S",
    "DEFAULT_SEGMENT_BYTES", "MIN_SEGMENT_BYTES", "MAX_RECORD", "MAGIC",
    # internals the tests reach through the package
    "_decode_values", "_fast_partition_records", "_frame", "_segments",
]


def open_bus(url: str, **options) -> EventBus:
    """Open the bus of ``url``: ``embedded://PATH`` (default in ``conf/service.yaml``) or
    ``kafka://HOST:PORT``.

    Options: ``fsync`` (``always`` | ``interval`` | ``never``, default ``interval``),
    ``fsync_interval_s`` (1.0), ``segment_bytes`` (64 MiB); embedded only: ``retention_s``
    (7 days; None keeps everything), ``retention_bytes`` (None: no size limit) and
    ``retention_wait_for_consumers`` (True) -- see :mod:`online.bus.embedded`; Kafka also takes ``spool_dir``
    (default ``var/spool/kafka-HOST-PORT``), ``client_id``, ``linger_ms``, ``partitions`` (for
    topics it creates), ``request_timeout_ms``, ``retry_backoff_s``, ``fetch_max_wait_ms``,
    ``session_timeout_ms`` (how soon a dead consumer's partitions move to a live one).
    """
    scheme, where = parse_bus_url(url)
    if scheme == "embedded":
        _check_options(options, _EMBEDDED_OPTIONS)
        return EmbeddedBus(where, **options)
    _check_options(options, _KAFKA_OPTIONS)
    return KafkaBus(where, **options)
