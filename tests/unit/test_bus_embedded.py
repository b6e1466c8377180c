"""The embedded event bus: a durable segment log on local disk (online/bus/segments.py, online/bus/embedded.py)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from online.bus import MAGIC, Record, _frame, _segments, open_bus
from strategy.errors import ValidationError

ROOT = Path(__file__).resolve().parents[2]


def records(n, start=0, user="u1"):
    return [{"event_id": f"e{i}", "ts": 1.7e9 + i, "type": "click", "user_id": user, "item_id": f"i{i % 7}"}
            for i in range(start, start + n)]


def drain(consumer, max_records=1000, timeout_s=0.05):
    out = []
    while True:
        got = consumer.poll(max_records, timeout_s)
        if not got:
            return out
        out.extend(got)


def segment_files(path, topic="events"):
    folder = Path(path) / "topics" / topic
    return [folder / f"{b:020d}.log" for b in _segments(folder)]


def test_publish_then_consume_in_order_with_record_fields(tmp_path):
    with open_bus(f"embedded://{tmp_path}") as bus:
        bus.publish("events", records(10))
        bus.publish("impressions", [{"request_id": "r1", "user_id": "u9", "item_id": "i1", "ts": 1.0}])
        with bus.consumer("nearline", ["events", "impressions"]) as c:
            got = drain(c)
    ev = [r for r in got if r.topic == "events"]
    assert [r.value["event_id"] for r in ev] == [f"e{i}" for i in range(10)]
    assert all(isinstance(r, Record) and r.key == "u1" and r.partition == 0 for r in ev)
    assert all(a.next_offset == b.offset for a, b in zip(ev, ev[1:]))  # contiguous byte positions
    imp = [r for r in got if r.topic == "impressions"]
    assert len(imp) == 1 and imp[0].key == "u9" and abs(imp[0].timestamp - time.time()) < 60


def test_commit_survives_reopen_and_uncommitted_records_come_again(tmp_path):
    url = f"embedded://{tmp_path}"
    with open_bus(url) as bus:
        bus.publish("events", records(100))
        with bus.consumer("a", ["events"]) as c:
            first = c.poll(30, 0.1)
            assert len(first) == 30
            c.commit(first[:20])  # applied only 20 of them
            c.poll(30, 0.1)  # polled, never committed: a crash here
    with open_bus(url) as bus:
        with bus.consumer("a", ["events"]) as c:
            again = drain(c)
        assert [r.value["event_id"] for r in again] == [f"e{i}" for i in range(20, 100)]
        with bus.consumer("b", ["events"]) as c:  # another name: its own positions, from the start
            assert len(drain(c)) == 100


def test_commit_accepts_a_position_mapping_and_none(tmp_path):
    with open_bus(f"embedded://{tmp_path}") as bus:
        bus.publish("events", records(5))
        with bus.consumer("a", ["events"]) as c:
            got = drain(c)
            c.commit({"events": got[2].next_offset})
        with bus.consumer("a", ["events"]) as c:
            rest = drain(c)
            assert [r.value["event_id"] for r in rest] == ["e3", "e4"]
            c.commit()  # everything polled
        with bus.consumer("a", ["events"]) as c:
            assert drain(c) == []


def test_segments_roll_and_reads_cross_them(tmp_path):
    with open_bus(f"embedded://{tmp_path}", segment_bytes=4096, fsync="always") as bus:
        for i in range(0, 600, 50):
            bus.publish("events", records(50, start=i))
        assert len(segment_files(tmp_path)) > 3
        with bus.consumer("a", ["events"]) as c:
            got = drain(c, max_records=37)
    assert [r.value["event_id"] for r in got] == [f"e{i}" for i in range(600)]


def test_a_torn_last_record_is_never_misread_and_the_next_writer_truncates_it(tmp_path):
    url = f"embedded://{tmp_path}"
    with open_bus(url, fsync="always") as bus:
        bus.publish("events", records(10))
    seg = segment_files(tmp_path)[-1]
    whole = _frame(time.time(), b"u1", json.dumps(records(1, start=10)[0]).encode())
    for cut in (3, 11, len(whole) // 2, len(whole) - 1):  # header torn, body torn
        with open(seg, "ab") as fh:  # what a crash mid-write leaves
            fh.write(whole[:cut])
        with open_bus(url) as bus, bus.consumer(f"reader{cut}", ["events"]) as c:
            got = drain(c)
            assert [r.value["event_id"] for r in got] == [f"e{i}" for i in range(10)]  # stops before it
            c.commit()
        with open_bus(url) as bus:  # a restarted producer: truncates the tail, appends again
            bus.publish("events", records(1, start=10))
            with bus.consumer(f"reader{cut}", ["events"]) as c:
                got = drain(c)
            assert [r.value["event_id"] for r in got] == ["e10"]
        with open(seg, "r+b") as fh:  # remove e10 again for the next cut
            fh.truncate(got[0].offset)


def test_a_corrupt_record_followed_by_valid_ones_is_skipped(tmp_path):
    url = f"embedded://{tmp_path}"
    with open_bus(url) as bus:
        bus.publish("events", records(5))
    seg = segment_files(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    starts = [i for i in range(len(data)) if data.startswith(MAGIC, i)]
    data[starts[2] + 20] ^= 0xFF  # flip a bit inside record e2's body: its CRC fails
    seg.write_bytes(bytes(data))
    with open_bus(url) as bus, bus.consumer("a", ["events"]) as c:
        got = drain(c)
        assert [r.value["event_id"] for r in got] == ["e0", "e1", "e3", "e4"]
        assert c.skipped_bytes == starts[3] - starts[2]


def test_a_torn_tail_of_a_closed_segment_is_skipped(tmp_path):
    url = f"embedded://{tmp_path}"
    with open_bus(url, segment_bytes=4096) as bus:
        bus.publish("events", records(40))
    first = segment_files(tmp_path)[0]
    with open(first, "ab") as fh:
        fh.write(MAGIC + b"\x50\x00")  # torn header at the end of a segment that is not the last
    with open_bus(url) as bus, bus.consumer("a", ["events"]) as c:
        assert [r.value["event_id"] for r in drain(c)] == [f"e{i}" for i in range(40)]


def test_a_producer_killed_mid_stream_leaves_a_readable_log(tmp_path):
    """A real process kill (SIGKILL) while publishing: the log holds a gap-free prefix."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from online.bus import open_bus
        bus = open_bus("embedded://{tmp_path}", fsync="never", segment_bytes=65536)
        i = 0
        while True:
            bus.publish("events", [{{"event_id": f"e{{j}}", "user_id": "u", "pad": "x" * 300}} for j in range(i, i + 50)])
            i += 50
            if i == 2000:
                print("running", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"running"
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_bus(f"embedded://{tmp_path}") as bus:
        bus.publish("events", [{"event_id": "after", "user_id": "u"}])
        with bus.consumer("a", ["events"]) as c:
            ids = [r.value["event_id"] for r in drain(c, 5000)]
    assert ids[-1] == "after" and len(ids) > 2000
    assert ids[:-1] == [f"e{j}" for j in range(len(ids) - 1)]


def test_two_writer_processes_interleave_whole_records(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from online.bus import open_bus
        name = sys.argv[1]
        with open_bus("embedded://{tmp_path}", segment_bytes=32768) as bus:
            for i in range(0, 3000, 30):
                bus.publish("events", [{{"event_id": f"{{name}}{{j}}", "user_id": name}} for j in range(i, i + 30)])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, n]) for n in ("a", "b")]
    assert [p.wait(60) for p in procs] == [0, 0]
    with open_bus(f"embedded://{tmp_path}") as bus, bus.consumer("r", ["events"]) as c:
        got = drain(c, 5000)
    for name in ("a", "b"):
        assert [r.value["event_id"] for r in got if r.key == name] == [f"{name}{j}" for j in range(3000)]


def test_one_process_per_consumer_name(tmp_path):
    with open_bus(f"embedded://{tmp_path}") as bus:
        with bus.consumer("a", ["events"]):
            with pytest.raises(ValidationError, match="in use"):
                bus.consumer("a", ["events"])


def test_foreign_frames_are_skipped_or_decoded_never_fatal(tmp_path):
    """Frames another writer put in the log: a value that is not a JSON object is skipped, a key that
    is not UTF-8 is decoded with replacement characters."""
    with open_bus(f"embedded://{tmp_path}") as bus:
        bus.publish_encoded("events", [(b"u1", b'{"n": 1}'), (b"\xffu", b'{"n": 2}'), (b"u1", b"[1]"),
                                       (b"u1", b'{"n": NaN}'), (b"", b'{"n": 3}')])
        with bus.consumer("c", ["events"]) as c:
            assert [(r.key, r.value["n"]) for r in drain(c)] == [("u1", 1), ("\ufffdu", 2), (None, 3)]


def test_poll_batch_holds_poll_s_values_and_commits_past_skipped_frames(tmp_path):
    """A Batch is what poll returns by column: the same values in order, and the position after the
    last frame read (a skipped frame at the end is not read again)."""
    with open_bus(f"embedded://{tmp_path}") as bus:
        bus.publish_encoded("events", [(b"u1", b'{"n": 1}'), (b"u1", b"[1]"), (b"u2", b'{"n": 2}'), (b"u1", b"nope")])
        bus.publish("other", [{"n": 3}])
        with bus.consumer("rows", ["events", "other"]) as c:
            rows = drain(c)
        with bus.consumer("cols", ["events", "other"]) as c:
            batch = c.poll_batch(100, 0.05)
            assert len(batch) == 3 and sorted(v["n"] for v in batch.values) == [1, 2, 3]
            assert [v["n"] for v in batch.values if v["n"] < 3] == [1, 2]
            c.commit(batch)
            empty = c.poll_batch(100, 0.05)
            assert not empty and empty.values == [] and empty.positions == {}
        assert sorted(r.value["n"] for r in rows) == [1, 2, 3]
        after = {r.value["n"]: r.next_offset for r in rows}
        assert batch.positions[("other", 0)] == after[3]
        assert batch.positions[("events", 0)] > after[2]  # past the frame that is not an object
        with bus.consumer("cols", ["events", "other"]) as c:
            assert c.poll_batch(100, 0.05).values == []  # committed past everything, skipped frames too


def test_poll_reads_on_past_frames_it_skips(tmp_path):
    with open_bus(f"embedded://{tmp_path}") as bus:
        bus.publish_encoded("events", [(b"u1", b"[1]")] * 3 + [(b"u1", b'{"n": 1}')])
        with bus.consumer("c", ["events"]) as c:
            t0 = time.monotonic()
            assert [r.value for r in c.poll(2, 5.0)] == [{"n": 1}]  # not [] after two skipped frames
            assert time.monotonic() - t0 < 2.0


def test_a_consumer_that_never_committed_leaves_no_file_behind(tmp_path):
    """Scorer workers follow the log under a name per pid and never commit: nothing may pile up."""
    cdir = tmp_path / "consumers"
    with open_bus(f"embedded://{tmp_path}") as bus:
        bus.publish("events", records(3))
        before = set(os.listdir(cdir))
        with bus.consumer("scorer-101", ["events"]) as c:
            assert len(drain(c)) == 3 and (cdir / "scorer-101.lock").exists()
        assert set(os.listdir(cdir)) == before
        with bus.consumer("nearline", ["events"]) as c:
            c.commit(drain(c))
        assert {"nearline.json", "nearline.lock"} <= set(os.listdir(cdir))   # a committed name stays
        held = bus.consumer("scorer-101", ["events"])                          # a removed name is taken anew,
        with pytest.raises(ValidationError, match="in use"):                  # exclusively
            bus.consumer("scorer-101", ["events"])
        held.close()


@pytest.mark.parametrize("url, needle", [
    ("kafak://127.0.0.1:9092", "unknown scheme 'kafak'; did you mean 'kafka'?"),
    ("redis://x:1", "allowed schemes: embedded, kafka"),
    ("embedded://", "needs a folder path"),
    ("kafka://nohostport", "kafka:// needs HOST:PORT"),
    ("var/bus", "expected a URL"),
])
def test_bad_urls_name_the_field_and_the_allowed_schemes(url, needle):
    with pytest.raises(ValidationError) as exc:
        open_bus(url)
    assert exc.value.errors[0].path == "bus.url"
    assert needle in str(exc.value)


def test_bad_options_and_records_are_reported_before_anything_is_written(tmp_path):
    with pytest.raises(ValidationError) as exc:
        open_bus(f"embedded://{tmp_path}", fsnyc="always", segment_bytes=10, fsync="sometimes")
    text = str(exc.value)
    assert "bus.fsnyc: unknown option 'fsnyc'; did you mean 'fsync'?" in text
    assert "bus.segment_bytes: 10 is out of range" in text and "'sometimes' is not allowed" in text
    with open_bus(f"embedded://{tmp_path}") as bus:
        with pytest.raises(ValidationError) as exc:
            bus.publish("events", [{"ok": 1}, {"bad": object()}, "nope"])
        assert [e.path for e in exc.value.errors] == ["records[1]", "records[2]"]
        with pytest.raises(ValidationError):
            bus.publish("Bad Topic", [{"a": 1}])
        with bus.consumer("a", ["events"]) as c:
            assert drain(c) == []


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_every_fsync_policy_round_trips(tmp_path, fsync):
    with open_bus(f"embedded://{tmp_path}", fsync=fsync, fsync_interval_s=0.01) as bus:
        bus.publish("exposures", records(20))
        time.sleep(0.03)
        assert bus.flush()
        with bus.consumer("a", ["exposures"]) as c:
            assert len(drain(c)) == 20


def test_poll_wakes_on_a_publish_of_the_same_process(tmp_path):
    import threading

    with open_bus(f"embedded://{tmp_path}") as bus, bus.consumer("a", ["events"]) as c:
        threading.Timer(0.05, lambda: bus.publish("events", records(1))).start()
        t0 = time.monotonic()
        got = c.poll(10, timeout_s=5.0)
        assert len(got) == 1 and time.monotonic() - t0 < 2.0


def test_at_end_is_true_only_once_every_topic_was_read(tmp_path):
    bus = open_bus(f"embedded://{tmp_path}")
    bus.publish("events", [{"event_id": "e1"}])
    consumer = bus.consumer("c", ["events", "impressions"])
    assert not consumer.at_end()
    assert len(consumer.poll(10, 0.1)) == 1 and consumer.at_end()
    bus.publish("impressions", [{"request_id": "r"}])
    assert not consumer.at_end()
    consumer.poll(10, 0.1)
    assert consumer.at_end()
    consumer.close()
    bus.close()
