"""The fast decoder of fetched Kafka record batches, for :class:`online.bus.kafka.KafkaConsumerAdapter`.

It subclasses kafka-python 2.3.x's private ``Fetcher.PartitionRecords`` and reads a v2 batch's
private ``_buffer``, ``_pos`` and ``_header_data`` (the header's fields by position), so it is used
only where those are as in 2.3.x (:func:`_unsupported`). Elsewhere a consumer keeps kafka-python's
stock decoder (about 3x slower): that is logged once per reason and counted (:func:`fallbacks`),
and the scorer's ``/metrics`` shows it as ``stratarank_kafka_decoder_fallbacks_total``."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("stratarank.bus")

# the private API of kafka-python 2.3.x the decoder relies on, besides the version
_PARTITION_RECORDS_API = ("_unpack_records", "_maybe_skip_record", "take", "drain",
                          "_consume_aborted_transactions_up_to", "_is_batch_aborted", "_contains_abort_marker")
_BATCH_API = ("_buffer", "_pos", "_header_data", "_maybe_uncompress")
_BATCH_HEADER = ">qiibIhiqqqhii"  # the v2 batch header that ``_header_data`` holds, read by position

_FAST_RECORDS = None  # the decoder class once built, or ``(reason, detail)`` once refused
_fallbacks: dict[str, int] = {}  # reason -> consumers of this process left on the stock decoder
_fallbacks_lock = threading.Lock()


def fallbacks() -> dict[str, int]:
    """``{reason: Kafka consumers of this process that read with kafka-python's stock decoder}``;
    the reasons: ``version`` (kafka-python is not 2.3.x) and ``private_api`` (something the fast
    decoder relies on is missing)."""
    with _fallbacks_lock:
        return dict(_fallbacks)


def install_fast_decoder(consumer) -> bool:
    """Give one ``KafkaConsumer`` the fast decoder: True when it yields ``(offset, timestamp_ms,
    key, value)`` tuples from now on; False when it keeps the stock decoder's ``ConsumerRecord``s,
    which is warned once per reason and counted in :func:`fallbacks`."""
    fast = _fast_partition_records()
    fetcher = getattr(consumer, "_fetcher", None)
    if fast is not None and fetcher is not None:
        fetcher.PartitionRecords = fast  # this consumer only
        return True
    reason, detail = _FAST_RECORDS if fast is None else ("private_api", "KafkaConsumer has no _fetcher")
    with _fallbacks_lock:
        first = reason not in _fallbacks
        _fallbacks[reason] = _fallbacks.get(reason, 0) + 1
    if first:
        log.warning("kafka consumer: %s, so kafka-python's stock record decoder is used (about 3x slower than the "
                    "fast one; counted in /metrics as stratarank_kafka_decoder_fallbacks_total)", detail)
    return False


def _unsupported() -> tuple[str, str] | None:
    """``(reason, detail)`` where the installed kafka-python lacks what the fast decoder relies on, else None."""
    import kafka

    version = kafka.__version__
    if not version.startswith("2.3."):
        return "version", f"kafka-python {version} is not 2.3.x"
    try:
        from kafka.consumer import fetcher
        from kafka.record import util
        from kafka.record.default_records import DefaultRecordBatch
    except ImportError as exc:
        return "private_api", f"kafka-python {version}: {exc}"
    records = getattr(fetcher.Fetcher, "PartitionRecords", None)
    missing = (["Fetcher.PartitionRecords"] if records is None else
               [f"Fetcher.PartitionRecords.{a}" for a in _PARTITION_RECORDS_API if not hasattr(records, a)])
    missing += [f"kafka.consumer.fetcher.{a}" for a in ("Errors", "READ_COMMITTED") if not hasattr(fetcher, a)]
    missing += [] if hasattr(util, "decode_varint") else ["kafka.record.util.decode_varint"]
    missing += [f"DefaultRecordBatch.{a}" for a in _BATCH_API if not hasattr(DefaultRecordBatch, a)]
    if getattr(getattr(DefaultRecordBatch, "HEADER_STRUCT", None), "format", None) != _BATCH_HEADER:
        missing.append(f"DefaultRecordBatch.HEADER_STRUCT {_BATCH_HEADER}")
    if missing:
        return "private_api", f"kafka-python {version} lacks {', '.join(missing)}"
    return None


def _fast_partition_records():
    """kafka-python 2.3.x's ``Fetcher.PartitionRecords`` with a faster decoder of uncompressed
    or compressed v2 record batches (the format of every broker since Kafka 0.11): the same
    checks (batch CRC, record lengths, header structure, trailing bytes, control and aborted batches),
    with the per-record varint decoding inlined -- about 3x faster than the stock generator, which was
    half of the Kafka consumer's time. It yields plain ``(offset, timestamp_ms, key, value)`` tuples,
    not 13-field ``ConsumerRecord``s (a tenth of the cost; only the Kafka bus's consumer adapter reads
    them; headers are checked and dropped). Installed per consumer by :func:`install_fast_decoder`;
    None where :func:`_unsupported` refuses it (the stock one is used)."""
    global _FAST_RECORDS
    if _FAST_RECORDS is None:
        _FAST_RECORDS = _unsupported() or _build()
    return None if isinstance(_FAST_RECORDS, tuple) else _FAST_RECORDS


def _build():
    """The decoder class of :func:`_fast_partition_records`."""
    from kafka.consumer import fetcher as _fetcher

    Errors = _fetcher.Errors
    from kafka.record.util import decode_varint

    base_cls = _fetcher.Fetcher.PartitionRecords
    READ_COMMITTED = _fetcher.READ_COMMITTED

    class FastPartitionRecords(base_cls):
        def _maybe_skip_record(self, record):
            return record[0] < self.fetch_offset   # records before the fetch offset (mid-batch fetch)

        def take(self, n=None):
            # the position after the last record handed out, set once per take, not once per record
            records = super().take(n)
            if records and records[-1][0] + 1 > self.next_fetch_offset:
                self.next_fetch_offset = records[-1][0] + 1
            return records

        def _unpack_records(self, tp, records, key_deserializer, value_deserializer):
            if key_deserializer is not None or value_deserializer is not None:
                for r in super()._unpack_records(tp, records, key_deserializer, value_deserializer):
                    yield r.offset, r.timestamp, r.key, r.value
                return
            varint = decode_varint
            try:
                batch = records.next_batch()
                last_batch = None
                while batch is not None:
                    last_batch = batch
                    if self.check_crcs and not batch.validate_crc():
                        raise Errors.CorruptRecordError("Record batch for partition %s at offset %s failed crc check"
                                                        % (self.topic_partition, batch.base_offset))
                    if batch.magic != 2:  # legacy message sets: the stock per-record path
                        for record in batch:
                            if self.check_crcs and not record.validate_crc():
                                raise Errors.CorruptRecordError("Record for partition %s at offset %s failed crc "
                                                                "check" % (self.topic_partition, record.offset))
                            key, value = record.key, record.value
                            self.records_read += 1
                            self.bytes_read += record.size_in_bytes
                            self.next_fetch_offset = record.offset + 1
                            yield record.offset, record.timestamp, key, value
                        batch = records.next_batch()
                        continue
                    self.leader_epoch = batch.leader_epoch
                    if self.isolation_level == READ_COMMITTED and batch.has_producer_id():
                        self._consume_aborted_transactions_up_to(batch.last_offset)
                        producer_id = batch.producer_id
                        if self._contains_abort_marker(batch):
                            self.aborted_producer_ids.discard(producer_id)
                        elif self._is_batch_aborted(batch):
                            self.next_fetch_offset = batch.next_offset
                            batch = records.next_batch()
                            continue
                    if batch.is_control_batch:
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                    batch._maybe_uncompress()
                    buf, pos = batch._buffer, batch._pos
                    head = batch._header_data
                    base_offset, first_ts, max_ts = head[0], head[7], head[8]
                    ts_type = 1 if head[5] & 0x08 else 0
                    end = len(buf)
                    self.records_read += head[12]   # fetch metrics, counted per batch
                    self.bytes_read += end - pos
                    try:
                        for _ in range(head[12]):
                            b = buf[pos]  # record length
                            if b < 0x80:
                                length, pos = (b >> 1) ^ -(b & 1), pos + 1
                            elif buf[pos + 1] < 0x80:
                                b = (b & 0x7f) | (buf[pos + 1] << 7)
                                length, pos = (b >> 1) ^ -(b & 1), pos + 2
                            else:
                                length, pos = varint(buf, pos)
                            start = pos
                            pos += 1  # attributes (int8, unused)
                            b = buf[pos]
                            if b < 0x80:
                                ts_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
                            elif buf[pos + 1] < 0x80:
                                b = (b & 0x7f) | (buf[pos + 1] << 7)
                                ts_delta, pos = (b >> 1) ^ -(b & 1), pos + 2
                            else:
                                ts_delta, pos = varint(buf, pos)
                            b = buf[pos]
                            if b < 0x80:
                                off_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
                            elif buf[pos + 1] < 0x80:
                                b = (b & 0x7f) | (buf[pos + 1] << 7)
                                off_delta, pos = (b >> 1) ^ -(b & 1), pos + 2
                            else:
                                off_delta, pos = varint(buf, pos)
                            b = buf[pos]
                            if b < 0x80:
                                klen, pos = (b >> 1) ^ -(b & 1), pos + 1
                            elif buf[pos + 1] < 0x80:
                                b = (b & 0x7f) | (buf[pos + 1] << 7)
                                klen, pos = (b >> 1) ^ -(b & 1), pos + 2
                            else:
                                klen, pos = varint(buf, pos)
                            if klen >= 0:
                                key = buf[pos:pos + klen]   # a bytearray slice: one copy
                                pos += klen
                            else:
                                key = None
                            b = buf[pos]
                            if b < 0x80:
                                vlen, pos = (b >> 1) ^ -(b & 1), pos + 1
                            elif buf[pos + 1] < 0x80:
                                b = (b & 0x7f) | (buf[pos + 1] << 7)
                                vlen, pos = (b >> 1) ^ -(b & 1), pos + 2
                            else:
                                vlen, pos = varint(buf, pos)
                            if vlen >= 0:
                                value = buf[pos:pos + vlen]
                                pos += vlen
                            else:
                                value = None
                            if buf[pos] == 0:  # no headers
                                nh, pos = 0, pos + 1
                            else:
                                nh, pos = varint(buf, pos)
                            if nh:
                                if nh < 0:
                                    raise Errors.CorruptRecordError(f"Found invalid number of record headers {nh}")
                                for _h in range(nh):
                                    hk, pos = varint(buf, pos)
                                    if hk < 0:
                                        raise Errors.CorruptRecordError(f"Invalid negative header key size {hk}")
                                    buf[pos:pos + hk].decode("utf-8")   # a header key must be UTF-8
                                    pos += hk
                                    hv, pos = varint(buf, pos)
                                    pos += max(hv, 0)
                            if pos - start != length or pos > end:
                                raise Errors.CorruptRecordError(
                                    f"Invalid record size: expected to read {length} bytes in record payload, "
                                    f"but instead read {pos - start}")
                            offset = base_offset + off_delta
                            yield offset, max_ts if ts_type else first_ts + ts_delta, key, value
                    except (ValueError, IndexError) as err:
                        raise Errors.CorruptRecordError(f"Found invalid record structure: {err!r}") from None
                    if pos != end:
                        raise Errors.CorruptRecordError(f"{end - pos} unconsumed bytes after all records consumed")
                    batch = records.next_batch()
                else:
                    if last_batch and last_batch.magic == 2:
                        self.next_fetch_offset = last_batch.next_offset
                    self.drain()
            except StopIteration:
                raise RuntimeError("StopIteration raised unpacking messageset") from None

    return FastPartitionRecords
