"""Retention of the embedded log (online/bus/embedded.py): whole closed segments are deleted once the
policy allows it and every registered consumer committed past them; real files, real readers."""
import json
import logging
import os
import time
from pathlib import Path

import pytest

from online.bus import EmbeddedBus, EmbeddedConsumer, _frame, _segments, open_bus
from online.nearline import NearlineConfig
from strategy.errors import ValidationError

SEG = 4096


def records(n, start=0):
    return [{"event_id": f"e{i}", "ts": 1.7e9 + i, "type": "click", "user_id": f"u{i % 3}", "item_id": f"i{i}",
             "pad": "x" * 60} for i in range(start, start + n)]


def drain(consumer, max_records=1000):
    out = []
    while True:
        got = consumer.poll(max_records, 0.02)
        if not got:
            return out
        out.extend(got)


def bases(path, topic="events"):
    return _segments(Path(path) / "topics" / topic)


def ids(recs):
    return [r.value["event_id"] for r in recs]


def fill(bus, n=400, topic="events"):
    for i in range(0, n, 20):
        bus.publish(topic, records(20, start=i))


def test_size_retention_deletes_only_segments_every_consumer_committed_past(tmp_path):
    # retention_bytes=0: every closed segment may go -- but only once both consumers are past it
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG, retention_bytes=0, retention_s=None) as bus:
        with bus.consumer("slow", ["events"]) as slow, bus.consumer("fast", ["events"]) as fast:
            slow.commit({"events": 0})  # registered: it protects the log from its position on
            fill(bus)
            segs = bases(tmp_path)
            assert len(segs) >= 8
            assert bus.deleted_segments == 0  # rolls ran retention, but "slow" is still at 0
            got_fast = drain(fast)
            fast.commit(got_fast)
            got_slow = slow.poll(150, 0.1)
            slow.commit(got_slow)  # the slow one applied 150 records
            pos = got_slow[-1].next_offset
            deleted = bus.enforce_retention()
            assert deleted["events"] == [b for b in segs[:-1] if _next(segs, b) <= pos]
            left = bases(tmp_path)
            assert left[0] <= pos < _next(left, left[0])  # the segment holding the slow consumer's position stays
            assert left[-1] == segs[-1]  # the active segment is never deleted
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG) as bus:  # a restart: both read on from their commits
        with bus.consumer("slow", ["events"]) as slow:
            rest = drain(slow)
            assert ids(rest) == [f"e{i}" for i in range(150, 400)] and slow.retention_skipped_bytes == 0
        with bus.consumer("fast", ["events"]) as fast:
            assert drain(fast) == []


def _next(segs, base):
    i = segs.index(base)
    return segs[i + 1] if i + 1 < len(segs) else float("inf")


def test_age_retention_uses_the_time_of_the_last_append(tmp_path):
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG, retention_s=3600) as bus:
        fill(bus)
        with bus.consumer("a", ["events"]) as c:
            c.commit(drain(c))
        segs = bases(tmp_path)
        folder = tmp_path / "topics" / "events"
        old = time.time() - 7200
        for b in segs[:3]:  # three old segments, the rest written just now
            os.utime(folder / f"{b:020d}.log", (old, old))
        assert bus.enforce_retention() == {"events": segs[:3]}
        assert bus.enforce_retention() == {}  # the others are younger than an hour
        assert bus.enforce_retention(now=time.time() + 3601) == {"events": segs[3:-1]}
        assert bases(tmp_path) == segs[-1:]


def test_a_new_consumer_starts_at_the_earliest_retained_record(tmp_path):
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG, retention_bytes=0, retention_s=None) as bus:
        with bus.consumer("a", ["events"]) as c:
            c.commit({"events": 0})
            fill(bus)
            got = drain(c)
            assert len(got) == 400
            c.commit(got[:200])
        bus.enforce_retention()
        first = bases(tmp_path)[0]
        with bus.consumer("newcomer", ["events"]) as c:
            fresh = drain(c)
        assert 0 < first <= got[200].offset
        assert fresh[0].offset == first and c.retention_skipped_bytes == 0
        assert ids(fresh) == ids(got)[-len(fresh):]  # a suffix of the log, in order, nothing torn


def test_a_consumer_whose_position_was_deleted_continues_at_the_earliest_with_a_warning(tmp_path, caplog):
    url = f"embedded://{tmp_path}"
    with open_bus(url, segment_bytes=SEG) as bus:
        fill(bus)
        with bus.consumer("laggard", ["events"]) as c:
            c.commit(c.poll(10, 0.1))
        with bus.consumer("reader", ["events"]) as c:
            c.commit(drain(c))
    # an operator turns the protection off: the laggard's position is deleted
    with open_bus(url, segment_bytes=SEG, retention_bytes=0, retention_s=None,
                  retention_wait_for_consumers=False) as bus:
        deleted = bus.enforce_retention()["events"]
        first = bases(tmp_path)[0]
        with caplog.at_level(logging.WARNING, logger="stratarank.bus"), bus.consumer("laggard", ["events"]) as c:
            got = drain(c)
            assert got[0].offset == first
            committed = json.loads((tmp_path / "consumers" / "laggard.json").read_text())["positions"]["events"]
            assert c.retention_skipped_bytes == first - committed > 0
        assert len(deleted) >= 7
        assert any("deleted by retention" in r.getMessage() for r in caplog.records)


def test_retention_runs_on_roll_and_a_blocked_consumer_is_named_once(tmp_path, caplog):
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG, retention_bytes=3 * SEG, retention_s=None) as bus:
        with bus.consumer("stuck", ["events"]) as c:
            c.commit({"events": 0})  # registered at the very start
            with caplog.at_level(logging.WARNING, logger="stratarank.bus"):
                fill(bus)
            assert bases(tmp_path)[0] == 0 and bus.deleted_segments == 0
            warned = [r for r in caplog.records if "waits for consumer 'stuck'" in r.getMessage()]
            assert len(warned) == 1
            c.commit(drain(c))
        fill(bus, 40)  # the next roll deletes down to ~3 segments
        segs = bases(tmp_path)
        size = sum((tmp_path / "topics" / "events" / f"{b:020d}.log").stat().st_size for b in segs)
        assert bus.deleted_segments > 0 and size <= 3 * SEG + SEG


def test_committing_consumers_run_retention_themselves(tmp_path, monkeypatch):
    import online.bus.embedded as busmod

    monkeypatch.setattr(busmod, "RETENTION_CHECK_S", 0.0)
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG, retention_bytes=0, retention_s=None) as bus:
        fill(bus)
        with bus.consumer("a", ["events"]) as c:
            c.commit(drain(c))  # the commit deletes what it released
        assert len(bases(tmp_path)) == 1


def test_after_retention_a_torn_last_record_is_still_skipped_then_truncated(tmp_path):
    url = f"embedded://{tmp_path}"
    with open_bus(url, segment_bytes=SEG, retention_bytes=0, retention_s=None, fsync="always") as bus:
        with bus.consumer("a", ["events"]) as c:
            c.commit({"events": 0})
            fill(bus)
            got = drain(c)
            c.commit(got[:300])
        bus.enforce_retention()
    seg = tmp_path / "topics" / "events" / f"{bases(tmp_path)[-1]:020d}.log"
    whole = _frame(time.time(), b"u1", json.dumps(records(1, start=400)[0]).encode())
    with open(seg, "ab") as fh:  # a producer crashed mid-write
        fh.write(whole[: len(whole) // 2])
    with open_bus(url, segment_bytes=SEG, retention_bytes=0, retention_s=None) as bus:
        with bus.consumer("a", ["events"]) as c:
            assert ids(drain(c)) == [f"e{i}" for i in range(300, 400)]  # from its commit, stops before the tear
        bus.publish("events", records(1, start=400))  # a restarted producer truncates the tail first
        with bus.consumer("a", ["events"]) as c:
            assert ids(drain(c)) == [f"e{i}" for i in range(300, 401)]


def test_a_reader_in_a_deleted_segment_finishes_it(tmp_path):
    """A reader that opened a segment keeps reading it when another process deletes the file."""
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG) as bus:
        fill(bus)
    with open_bus(f"embedded://{tmp_path}", segment_bytes=SEG, retention_bytes=0, retention_s=None,
                  retention_wait_for_consumers=False) as bus:
        with bus.consumer("a", ["events"]) as c:
            first = c.poll(3, 0.1)
            bus.enforce_retention()  # deletes the segment the reader is in
            rest = drain(c)
        assert ids(first + rest)[:3] == ["e0", "e1", "e2"]
        assert c.retention_skipped_bytes > 0  # the later deleted segments were skipped, loudly
        assert ids(rest)[-1] == "e399"


def test_no_retention_keeps_everything_and_the_spool_keeps_only_unshipped(tmp_path):
    with open_bus(f"embedded://{tmp_path / 'a'}", segment_bytes=SEG, retention_s=None) as bus:
        fill(bus)
        with bus.consumer("a", ["events"]) as c:
            c.commit(drain(c))
        assert bus.enforce_retention(now=time.time() + 10 * 365 * 86400) == {}
    spool = EmbeddedBus(tmp_path / "spool", segment_bytes=SEG, retention_bytes=0, retention_s=None,
                        retention_required_consumers=("_shipper",))
    try:  # the Kafka producer's spool policy: what the shipper committed goes, nothing before its first commit
        fill(spool)
        fill(spool, topic="late")  # a topic the shipper has not seen yet
        assert spool.enforce_retention() == {} and bases(tmp_path / "spool")[0] == 0
        with EmbeddedConsumer(spool, "_shipper", ["events"]) as c:
            c.commit(c.poll(200, 0.1))
        assert list(spool.enforce_retention()) == ["events"]
        assert 0 < bases(tmp_path / "spool")[0] and bases(tmp_path / "spool", "late")[0] == 0
    finally:
        spool.close()


@pytest.mark.parametrize("bus, needle", [
    ({"retention_s": 0}, "bus.retention_s: 0 is out of range"),
    ({"retention_bytes": -1}, "bus.retention_bytes: -1 is out of range"),
    ({"retention_bytes": 1.5}, "bus.retention_bytes: expected an integer"),
    ({"retention_wait_for_consumers": "yes"}, "bus.retention_wait_for_consumers: expected true or false"),
    ({"retension_s": 5}, "did you mean 'retention_s'"),
])
def test_retention_config_is_validated(bus, needle):
    with pytest.raises(ValidationError) as exc:
        NearlineConfig.from_dict({"bus": bus})
    assert needle in str(exc.value)


def test_retention_config_defaults_nulls_and_options():
    cfg = NearlineConfig.from_dict({})
    assert (cfg.bus.retention_s, cfg.bus.retention_bytes, cfg.bus.retention_wait_for_consumers) == \
        (7 * 86400, None, True)
    cfg = NearlineConfig.from_dict({"bus": {"retention_s": None, "retention_bytes": 1 << 30,
                                            "retention_wait_for_consumers": False}})
    opts = cfg.bus.options()
    assert opts["retention_s"] is None and opts["retention_bytes"] == 1 << 30
    assert opts["retention_wait_for_consumers"] is False
    kafka = cfg.with_urls(bus_url="kafka://127.0.0.1:9092").bus.options()
    assert not any(k.startswith("retention") for k in kafka)  # the broker's business
    with pytest.raises(ValidationError, match="bus.retention_s"):
        open_bus("embedded:///tmp/x", retention_s=-5)
    with pytest.raises(ValidationError, match="unknown option 'retention_s'"):
        open_bus("kafka://127.0.0.1:9", retention_s=5)
