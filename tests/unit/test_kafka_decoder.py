"""The fast Kafka record decoder (online.bus.kafka_decoder) against kafka-python's own
PartitionRecords on the same v2 record batches: uncompressed and gzip, keys and values absent,
records with headers, several batches, a fetch offset in the middle of a batch, and corruption."""
import pytest

pytest.importorskip("kafka")

from kafka.consumer.fetcher import Fetcher  # noqa: E402
from kafka.errors import CorruptRecordError  # noqa: E402
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder  # noqa: E402
from kafka.structs import TopicPartition  # noqa: E402

from online.bus import _fast_partition_records  # noqa: E402

FAST = _fast_partition_records()
pytestmark = pytest.mark.skipif(FAST is None, reason="the fast decoder is for kafka-python 2.3.x")
TP = TopicPartition("events", 3)


def batches(specs) -> bytes:
    """Concatenated v2 batches; ``specs``: [(base_offset, compression, [(key, value, headers), ...])]."""
    out = b""
    for base, compression, records in specs:
        builder = MemoryRecordsBuilder(magic=2, compression_type=compression, batch_size=1 << 20, offset=base)
        for i, (key, value, headers) in enumerate(records):
            builder.append(timestamp=1_700_000_000_000 + 7 * i, key=key, value=value, headers=headers)
        builder.close()
        out += bytes(builder.buffer())
    return out


def decode(cls, data: bytes, fetch_offset: int = 0):
    part = cls(fetch_offset, TP, MemoryRecords(data))
    got = part.take()
    return got, part.next_fetch_offset, part.records_read


def stock(data: bytes, fetch_offset: int = 0):
    got, nxt, n = decode(Fetcher.PartitionRecords, data, fetch_offset)
    return [(r.offset, r.timestamp, r.key, r.value) for r in got], nxt, n


RECORDS = [(b"u1", b'{"a": 1}', []), (None, b'{"b": "x"}', []), (b"u2", None, []),
           (b"u3", b'{"c": 3}', [("trace", b"abc"), ("empty", None)]),
           (b"k" * 300, b"v" * 70_000, [])]   # multi-byte varint lengths


@pytest.mark.parametrize("compression", [0, 1])   # none, gzip
def test_fast_decoder_yields_what_kafka_python_decodes(compression):
    data = batches([(0, compression, RECORDS), (5, compression, RECORDS[:2]), (40, compression, RECORDS[3:])])
    fast = decode(FAST, data)
    assert fast == stock(data)
    assert [r[0] for r in fast[0]] == [0, 1, 2, 3, 4, 5, 6, 40, 41] and fast[1] == 42


def test_a_fetch_offset_inside_a_batch_skips_the_records_before_it():
    data = batches([(10, 1, RECORDS)])
    got, nxt, _ = decode(FAST, data, fetch_offset=12)
    assert [r[0] for r in got] == [12, 13, 14] and nxt == 15
    assert (got, nxt) == stock(data, 12)[:2]


def test_a_corrupt_batch_is_refused_like_kafka_python_refuses_it():
    data = bytearray(batches([(0, 0, RECORDS[:2])]))
    data[-3] ^= 0xFF   # a byte of the last record: the batch CRC no longer matches
    with pytest.raises(CorruptRecordError):
        decode(FAST, bytes(data))
    with pytest.raises(CorruptRecordError):
        stock(bytes(data))


def test_each_value_is_parsed_on_its_own():
    """Values that only form valid JSON when joined (a string opened in one record and closed in the
    next) must not shift the other records' values; non-objects and NaN literals are not objects."""
    from online.bus import _decode_values

    assert _decode_values([b'{"a":"}', b'{"}', b'{"b":1},{"c":2}']) == [None, None, None]
    raw = [bytearray(b'{"ok": true}'), b"[1]", b'{"x": NaN}', b"", b"{", b'{"u": "\xc3\xa9"}']
    assert _decode_values(raw) == [{"ok": True}, None, None, None, None, {"u": "\u00e9"}]
