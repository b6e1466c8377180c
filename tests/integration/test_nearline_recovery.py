"""No event lost, none counted twice: 100k events through the real bus, the near-line consumer
killed mid-stream (SIGKILL) and restarted, and the final features compared with a pandas
recomputation from the raw events. Embedded log (with a torn write) + memory store with
snapshots; Kafka (real broker) + Redis store (real server)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from online.bus import _frame, _segments, open_bus
from online.features import DEFAULT_AFFINITY, open_store
from online.nearline import synthetic_stream

ROOT = Path(__file__).resolve().parents[2]
H = 1800.0
N_EVENTS = 50_000   # ~110k records with their impressions: dozens of batches before and after the kill


# ---------------------------------------------------------------- the oracle


def recompute(imps: list, evs: list, now: float, half_life: float = H, affinity=DEFAULT_AFFINITY, keep: int = 50):
    """What the store must hold, from the raw records, with pandas (dedupe, group, sum)."""
    imp = pd.DataFrame(imps).drop_duplicates(["request_id", "item_id"])
    ev = pd.DataFrame(evs).drop_duplicates("event_id")
    imp["d"] = np.exp2(-(now - imp["ts"]) / half_life)
    ev["d"] = np.exp2(-(now - ev["ts"]) / half_life)
    counters = {}  # (kind, id) -> {name: (total, decayed)}
    for kind, col in (("item", "item_id"), ("creator", "creator_id")):
        g = imp.groupby(col)["d"].agg(["size", "sum"])
        for key, row in g.iterrows():
            counters.setdefault((kind, key), {})["impressions"] = (float(row["size"]), row["sum"])
        g = ev.groupby([col, "type"])["d"].agg(["size", "sum"])
        for (key, etype), row in g.iterrows():
            counters.setdefault((kind, key), {})[etype] = (float(row["size"]), row["sum"])
        valued = ev[ev["value"].notna()].assign(vd=lambda x: x["value"] * x["d"])
        g = valued.groupby([col, "type"]).agg(total=("value", "sum"), dec=("vd", "sum"))
        for (key, etype), row in g.iterrows():
            counters.setdefault((kind, key), {})[etype + "_sum"] = (row["total"], row["dec"])
    engaged = ev[ev["type"].map(lambda t: affinity.get(t, 0) > 0)]
    last = engaged.groupby(["user_id", "item_id"])["ts"].max().reset_index()
    last = last.sort_values(["user_id", "ts", "item_id"], ascending=[True, False, False])
    recent = {u: list(g["item_id"][:keep]) for u, g in last.groupby("user_id", sort=False)}
    aff = ev[ev["type"].isin(list(affinity))].assign(w=lambda x: x["type"].map(affinity) * x["d"])
    topics = {}
    for (u, t), w in aff.groupby(["user_id", "topic"])["w"].sum().items():
        topics.setdefault(u, {})[t] = w
    return counters, recent, topics


def assert_store_matches(store, imps, evs, now):
    counters, recent, topics = recompute(imps, evs, now)
    items = sorted({k for kind, k in counters if kind == "item"})
    creators = sorted({k for kind, k in counters if kind == "creator"})
    f = store.lookup("nobody", items, creators, now=now)
    names = {n for c in counters.values() for n in c}
    for kind, ids, dec, tot in (("item", items, f.item_counters, f.item_totals),
                                ("creator", creators, f.creator_counters, f.creator_totals)):
        for name in names:
            want_tot = np.array([counters[(kind, i)].get(name, (0.0, 0.0))[0] for i in ids])
            want_dec = np.array([counters[(kind, i)].get(name, (0.0, 0.0))[1] for i in ids])
            got_tot = tot.get(name, np.zeros(len(ids)))
            if name.endswith("_sum"):  # sums of float values: summation order differs
                np.testing.assert_allclose(got_tot, want_tot, rtol=1e-9, err_msg=f"{kind} {name} total")
            else:  # counts are exact
                np.testing.assert_array_equal(got_tot, want_tot, err_msg=f"{kind} {name} total")
            np.testing.assert_allclose(dec.get(name, np.zeros(len(ids))), want_dec, rtol=1e-9,
                                       err_msg=f"{kind} {name} decayed")
    users = sorted({e["user_id"] for e in evs})
    for u in users:
        got = store.lookup(u, [], [], now=now)
        assert got.recent_items == recent.get(u, []), u
        want = topics.get(u, {})
        assert set(got.topic_affinity) == set(want), u
        for t, w in want.items():
            assert got.topic_affinity[t] == pytest.approx(w, rel=1e-9, abs=1e-12), (u, t)


# ---------------------------------------------------------------- helpers


_STARTED: list = []


@pytest.fixture(autouse=True)
def _no_leftover_consumers():
    yield
    while _STARTED:  # a failed test must not leave a consumer running
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class Nearline:
    """``stratarank nearline`` as a real process; progress lines are read from stderr."""

    def __init__(self, config: Path, *extra):
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stratarank.cli", "nearline", "--config", str(config),
             "--progress-interval", "0.05", *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _STARTED.append(self.proc)
        self.records = 0
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            if line.startswith('{"progress"'):
                obj, _ = json.JSONDecoder().raw_decode(line)
                self.records = obj["progress"]["records"]

    def kill_after(self, records: int, timeout_s: float = 90.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.records < records:
            assert self.proc.poll() is None, "".join(self.stderr)
            assert time.monotonic() < deadline, f"only {self.records} records after {timeout_s} s"
            time.sleep(0.005)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)
        return self.records

    def wait(self, timeout_s: float = 120.0) -> dict:
        out, _ = self.proc.communicate(timeout=timeout_s)
        self._reader.join(5)
        assert self.proc.returncode == 0, "".join(self.stderr)
        return json.loads(out.strip().splitlines()[-1])


def interleave(imps, evs, chunk=1000):
    """Publish order: impressions and events in chunks, roughly in time order."""
    i = j = 0
    while i < len(imps) or j < len(evs):
        if i < len(imps):
            yield "impressions", imps[i:i + chunk]
            i += chunk
        if j < len(evs):
            yield "events", evs[j:j + chunk]
            j += chunk


# ---------------------------------------------------------------- the tests


def test_embedded_log_with_a_torn_write_and_a_killed_consumer_loses_and_doubles_nothing(tmp_path):
    imps, evs = synthetic_stream(N_EVENTS, seed=11)
    bus_dir, snap = tmp_path / "bus", tmp_path / "features.json"
    cfg = tmp_path / "service.yaml"
    cfg.write_text(yaml.safe_dump({
        "bus": {"url": f"embedded://{bus_dir}", "fsync": "interval", "segment_bytes": 8 << 20},
        "store": {"url": "memory://", "snapshot_path": str(snap), "snapshot_interval_s": 0.3, "half_life_s": H},
        "nearline": {"batch_size": 2000, "poll_timeout_s": 0.05},
        "scorer": {"workers": 2},  # someone else's section: ignored by the near-line consumer
    }))
    chunks = list(interleave(imps, evs))
    half = len(chunks) // 2
    with open_bus(f"embedded://{bus_dir}", segment_bytes=8 << 20) as bus:
        for topic, batch in chunks[:half]:
            bus.publish(topic, batch)
    # the producer crashes in the middle of writing the next batch: a torn last record
    topic, batch = chunks[half]
    folder = bus_dir / "topics" / topic
    seg = folder / f"{_segments(folder)[-1]:020d}.log"
    frame = _frame(time.time(), batch[0]["user_id"].encode(), json.dumps(batch[0]).encode())
    with open(seg, "ab") as fh:
        fh.write(frame[: len(frame) // 2])

    first = Nearline(cfg)
    time.sleep(0.3)  # the consumer reads up to the torn record and waits there
    with open_bus(f"embedded://{bus_dir}", segment_bytes=8 << 20) as bus:  # the producer restarts...
        for topic, batch in chunks[half:]:  # ...and re-publishes what was never acknowledged
            bus.publish(topic, batch)
    total = len(imps) + len(evs)
    killed_at = first.kill_after(int(total * 0.4))
    assert killed_at < total, "the consumer finished before it could be killed"

    second = Nearline(cfg, "--max-idle", "1.0")
    stats = second.wait()
    assert stats["records"] > 0
    store = open_store(f"memory://{snap}", half_life_s=H)
    unique = len({(i["request_id"], i["item_id"]) for i in imps}) + len(evs)
    assert store.stats["applied"] == unique  # each record counted exactly once over both runs
    now = max(e["ts"] for e in evs) + 60.0
    assert_store_matches(store, imps, evs, now)
    print(f"\nembedded: killed after {killed_at} of {total} records; the restart read {stats['records']} "
          f"({stats['duplicates']} already applied) at {stats['records_per_s']:.0f} records/s")


def test_kafka_and_redis_with_a_killed_consumer_lose_and_double_nothing(kafka_broker, redis_server, tmp_path):
    imps, evs = synthetic_stream(N_EVENTS, seed=12)
    tag = uuid.uuid4().hex[:8]
    prefix = f"rec{tag}:"
    topics = [f"imp_{tag}", f"ev_{tag}"]
    cfg = tmp_path / "service.yaml"
    cfg.write_text(yaml.safe_dump({
        "bus": {"url": f"kafka://{kafka_broker}", "spool_dir": str(tmp_path / "spool"), "partitions": 3,
                "session_timeout_ms": 6000},
        "store": {"url": redis_server, "half_life_s": H, "key_prefix": prefix},
        "nearline": {"consumer": f"nearline_{tag}", "topics": topics, "batch_size": 2000, "poll_timeout_s": 0.1},
    }))
    t0 = time.monotonic()
    bus = open_bus(f"kafka://{kafka_broker}", spool_dir=str(tmp_path / "spool"), partitions=3)
    try:
        for topic, batch in interleave(imps, evs, chunk=5000):
            bus.publish(topics[0] if topic == "impressions" else topics[1], batch)
        assert bus.flush(120), bus.producer.last_error
    finally:
        bus.close()
    produce_s = time.monotonic() - t0
    t_first = time.monotonic()
    total = len(imps) + len(evs)
    first = Nearline(cfg)
    killed_at = first.kill_after(int(total * 0.4))
    first_s = time.monotonic() - t_first
    assert killed_at < total
    t1 = time.monotonic()
    second = Nearline(cfg)
    store = open_store(redis_server, half_life_s=H, key_prefix=prefix)
    unique = len({(i["request_id"], i["item_id"]) for i in imps}) + len(evs)
    try:
        deadline = time.monotonic() + 120
        while store.applied_total() < unique:  # a dead member's partitions wait for its session to expire
            assert second.proc.poll() is None, "".join(second.stderr)
            assert time.monotonic() < deadline, f"{store.applied_total()} of {unique} applied"
            time.sleep(0.05)
        catch_up_s = time.monotonic() - t1
        second.proc.send_signal(signal.SIGTERM)  # a clean stop: commits what it applied
        stats = second.wait(timeout_s=30)
        assert store.applied_total() == unique
        now = max(e["ts"] for e in evs) + 60.0
        assert_store_matches(store, imps, evs, now)
    finally:
        store.close()
    print(f"\nkafka+redis: produced {total} records in {produce_s:.1f} s; killed after {killed_at} "
          f"({first_s:.1f} s); "
          f"the restart read {stats['records']} ({stats['duplicates']} already applied) and caught up in "
          f"{catch_up_s:.1f} s")


def test_memory_and_redis_stores_agree_with_the_oracle(redis_server):
    imps, evs = synthetic_stream(20_000, seed=13, users=100, items=800, creators=40, topics=9)
    replay = evs[:3000] + imps[:3000]
    mem = open_store("memory://", half_life_s=H)
    red = open_store(redis_server, half_life_s=H, key_prefix=f"par{uuid.uuid4().hex[:8]}:")
    try:
        unique = len({(i["request_id"], i["item_id"]) for i in imps}) + len(evs)
        assert mem.apply(imps + evs + replay) == red.apply(imps + evs + replay) == unique
        now = max(e["ts"] for e in evs) + 60.0
        assert_store_matches(mem, imps, evs, now)
        assert_store_matches(red, imps, evs, now)
    finally:
        red.close()
