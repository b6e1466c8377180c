"""The Kafka producer's disk spool keeps only what the broker has not acknowledged: shipped
segments are deleted (real broker, real files)."""
import time
import uuid

import online.bus.embedded as busmod
from online.bus import BusProducer, _segments, open_bus


def test_shipped_spool_segments_are_deleted_and_everything_arrives(kafka_broker, tmp_path, monkeypatch):
    monkeypatch.setattr(busmod, "RETENTION_CHECK_S", 0.0)  # every shipper commit runs retention
    topic = f"spool_{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool"
    producer = BusProducer(kafka_broker, spool, segment_bytes=4096, topics=[topic])
    try:
        for i in range(0, 2000, 100):
            producer.publish(topic, [{"event_id": f"s{j}", "user_id": f"u{j % 5}", "pad": "x" * 40}
                                     for j in range(i, i + 100)])
        last = producer.spool._writers[topic]._base  # the active segment: > 20 were written
        assert producer.flush(60), producer.last_error
        deadline = time.monotonic() + 10
        while len(_segments(spool / "topics" / topic)) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the shipper's last commit runs retention right after the flush sees it
        assert _segments(spool / "topics" / topic) == [last] > [20 * 4096]  # only the active segment is left
        assert producer.pending() == 0
    finally:
        producer.close(timeout_s=2)
    bus = open_bus(f"kafka://{kafka_broker}", spool_dir=str(tmp_path / "unused"))
    try:
        c = bus.consumer(f"g_{uuid.uuid4().hex[:8]}", [topic])
        got, deadline = [], time.monotonic() + 60
        while len(got) < 2000 and time.monotonic() < deadline:
            got.extend(c.poll(5000, 0.5))
        assert sorted(int(r.value["event_id"][1:]) for r in got) == list(range(2000))
    finally:
        bus.close()
