"""The joiner exactly once: a served stream (impressions with features, feedback, late, duplicate,
unattributed and invalid records) on the real bus, `stratarank join` SIGKILLed mid-stream several
times and restarted, and its examples compared — count and content — with a pandas recomputation
from the bus. Embedded log, and the real Kafka-compatible broker (3 partitions)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from online.bus import open_bus
from online.joiner import publish_synthetic, synthetic_served
from ranking.datasets import read_served

ROOT = Path(__file__).resolve().parents[2]
WINDOW, GRACE = 4.0, 0.5
READ_COUNTERS = ("impressions", "duplicate_impressions", "events", "duplicate_events", "rejected")
LABELS = {"click": ("click", False), "like": ("like", False), "share": ("share", False),
          "watch_time": ("watch", True), "report": ("report", False)}


# ---------------------------------------------------------------- the oracle


def read_bus(url: str) -> pd.DataFrame:
    """Every record of both topics with its partition, offset and publish time."""
    bus = open_bus(url)
    consumer = bus.consumer(f"oracle-{os.getpid()}-{time.monotonic_ns()}", ["impressions", "events"])
    rows, idle, deadline = [], 0, time.monotonic() + 60
    while idle < 3 and time.monotonic() < deadline:
        batch = consumer.poll(20_000, 1.0)
        idle = 0 if batch else idle + (1 if rows else 0)
        rows += [(r.topic, r.partition, r.offset, r.timestamp, r.value) for r in batch]
    consumer.close()
    bus.close()
    return pd.DataFrame(rows, columns=["topic", "partition", "offset", "published", "value"])


def recompute(records: pd.DataFrame, window: float, grace: float) -> dict:
    """The examples, late and unattributed event ids, and counts the joiner must produce."""
    records = records.sort_values(["topic", "partition", "offset"], kind="mergesort")
    imp = records[records["topic"] == "impressions"]
    ok = imp["value"].map(lambda v: all(isinstance(v.get(k), str) for k in ("request_id", "user_id", "item_id")))
    imp = imp[ok].assign(example_id=lambda x: x["value"].map(lambda v: f"{v['request_id']}:{v['item_id']}"))
    first_imp = imp.drop_duplicates("example_id")
    ev = records[records["topic"] == "events"]
    ok = ev["value"].map(lambda v: all(isinstance(v.get(k), str) for k in ("event_id", "type", "item_id")))
    rejected = int((~ok).sum()) + int(len(records[records["topic"] == "impressions"]) - len(imp))
    ev = ev[ok].assign(event_id=lambda x: x["value"].map(lambda v: v["event_id"]),
                       example_id=lambda x: x["value"].map(
                           lambda v: f"{v['request_id']}:{v['item_id']}" if v.get("request_id") else None))
    first_ev = ev.drop_duplicates("event_id")
    merged = first_ev.merge(first_imp[["example_id", "published"]].rename(columns={"published": "served"}),
                            on="example_id", how="left")
    joined = merged["served"].notna() & (merged["published"] >= merged["served"] - grace) & (
        merged["published"] <= merged["served"] + window)
    late = merged["served"].notna() & (merged["published"] > merged["served"] + window)
    examples = {}
    for xid, v in zip(first_imp["example_id"], first_imp["value"]):
        examples[xid] = {"labels": {k: 0.0 for k in LABELS}, "event_ids": set(), "position": v["position"] + 1,
                         "text": v["features"]["text"], "recent": list(v["features"]["user_recent_items"])}
    for xid, v in zip(merged.loc[joined, "example_id"], merged.loc[joined, "value"]):
        ex = examples[xid]
        ex["event_ids"].add(v["event_id"])
        for name, (etype, regression) in LABELS.items():
            if v["type"] == etype:
                ex["labels"][name] = ex["labels"][name] + (v["value"] or 0.0) if regression else 1.0
    return {"examples": examples, "late": set(merged.loc[late, "event_id"]),
            "unattributed": set(merged.loc[~joined & ~late, "event_id"]),
            "duplicate_events": len(ev) - len(first_ev), "duplicate_impressions": len(imp) - len(first_imp),
            "rejected": rejected}


# ---------------------------------------------------------------- running the joiner


def write_config(tmp: Path, bus_url: str, out: Path) -> Path:
    # a SIGKILLed member keeps its partitions until its session times out: keep that short
    bus = {"url": bus_url, "fsync": "always", **({"session_timeout_ms": 2000} if bus_url.startswith("kafka") else {})}
    config = {"bus": bus,
              "joiner": {"window_s": WINDOW, "grace_s": GRACE, "out": str(out), "topic": "joined",
                         "objectives": str(ROOT / "conf/objectives/feed.yaml"), "flush_interval_s": 0.05,
                         "flush_rows": 400, "batch_size": 500}}
    path = tmp / "service.yaml"
    path.write_text(json.dumps(config))
    return path


def join_cmd(config: Path, *extra) -> list:
    return [sys.executable, "-m", "stratarank.cli", "join", "--config", str(config), "--progress-interval", "60",
            *extra]


def checkpoint(out: Path) -> dict | None:
    try:
        return json.loads((out / "_checkpoint.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def kill_mid_stream(config: Path, out: Path, kills: int, total_records: int, env) -> int:
    """Start the joiner, SIGKILL it once it has checkpointed progress, ``kills`` times; returns how
    many kills landed before it had read everything."""
    mid = 0
    for k in range(kills):
        before = (checkpoint(out) or {}).get("seq", 0)
        proc = subprocess.Popen(join_cmd(config), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (checkpoint(out) or {}).get("seq", 0) < before + 2 + k:
            time.sleep(0.01)
        time.sleep(0.05 * k)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        ck = checkpoint(out)
        read = sum((ck or {}).get("counters", {}).get(k, 0) for k in READ_COUNTERS)
        if ck is not None and read < total_records:
            mid += 1
    return mid


def assert_matches(out: Path, expected: dict, stats: dict) -> None:
    frame = read_served(out)
    assert len(frame) == len(expected["examples"]) and frame["example_id"].is_unique
    assert set(frame["example_id"]) == set(expected["examples"])
    for row in frame.itertuples():
        want = expected["examples"][row.example_id]
        assert {k: getattr(row, k) for k in LABELS} == pytest.approx(want["labels"]), row.example_id
        assert set(row.event_ids) == want["event_ids"]
        assert row.position == want["position"] and row.text == want["text"]
        assert list(row.user_recent_items) == want["recent"]
    late = pd.concat([pd.read_parquet(p) for p in out.glob("late/**/*.parquet")]) if list(
        out.glob("late/**/*.parquet")) else pd.DataFrame({"event_id": []})
    unatt = pd.concat([pd.read_parquet(p) for p in out.glob("unattributed/**/*.parquet")])
    assert late["event_id"].is_unique and set(late["event_id"]) == expected["late"]
    assert unatt["event_id"].is_unique and set(unatt["event_id"]) == expected["unattributed"]
    rejected = sum(len(pd.read_parquet(p)) for p in out.glob("rejected/**/*.parquet"))
    assert rejected == expected["rejected"] == stats["rejected"]
    assert stats["examples"] == len(expected["examples"])
    assert stats["duplicate_events"] == expected["duplicate_events"]
    assert stats["late_events"] == len(expected["late"]) and stats["unattributed_events"] == len(
        expected["unattributed"])
    assert stats["joined_events"] == sum(len(e["event_ids"]) for e in expected["examples"].values())


def run_exactly_once(tmp_path: Path, bus_url: str, n_requests: int, kills: int, seed: int) -> None:
    bus = open_bus(bus_url)
    records = synthetic_served(n_requests, seed=seed, window_s=WINDOW, gap_s=0.004)
    publish_synthetic(bus, records)
    assert bus.flush(60)
    bus.close()
    expected = recompute(read_bus(bus_url), WINDOW, GRACE)
    assert expected["late"] and expected["unattributed"] and expected["duplicate_events"] and expected["rejected"]

    out = tmp_path / "joined"
    config = write_config(tmp_path, bus_url, out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    mid = kill_mid_stream(config, out, kills, len(records), env)
    assert mid >= 1, "no kill landed mid-stream"
    done = subprocess.run(join_cmd(config, "--max-idle", "6", "--drain"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["pending"] == 0 and stats["forced_emissions"] == 0
    assert_matches(out, expected, stats)

    # the `joined` topic holds every example (a flush re-published after a kill is deduped by example_id)
    joined = read_bus_topic(bus_url, "joined")
    assert set(joined) == set(expected["examples"])


def read_bus_topic(url: str, topic: str) -> list:
    bus = open_bus(url)
    consumer = bus.consumer(f"joined-reader-{time.monotonic_ns()}", [topic])
    ids, idle, deadline = [], 0, time.monotonic() + 60
    while idle < 3 and time.monotonic() < deadline:
        batch = consumer.poll(20_000, 1.0)
        idle = 0 if batch else idle + (1 if ids else 0)
        ids += [r.value["example_id"] for r in batch]
    consumer.close()
    bus.close()
    return ids


def test_joiner_killed_mid_stream_writes_each_example_once_embedded(tmp_path):
    run_exactly_once(tmp_path, f"embedded://{tmp_path / 'bus'}", n_requests=4000, kills=3, seed=1)


def test_joiner_killed_mid_stream_writes_each_example_once_kafka(tmp_path, kafka_brokers):
    port = kafka_brokers.free_port()
    kafka_brokers.start(port)
    run_exactly_once(tmp_path, f"kafka://127.0.0.1:{port}", n_requests=3000, kills=2, seed=2)


def test_a_fresh_joiner_over_the_same_bus_writes_the_same_examples(tmp_path):
    """Two uninterrupted runs into two folders: the same examples, labels and features."""
    url = f"embedded://{tmp_path / 'bus'}"
    bus = open_bus(url)
    publish_synthetic(bus, synthetic_served(800, seed=3, window_s=WINDOW, gap_s=0.004))
    bus.close()
    frames = []
    for name in ("a", "b"):
        out = tmp_path / name
        config = write_config(tmp_path, url, out)
        cfg = json.loads(config.read_text())
        cfg["joiner"]["consumer"] = f"joiner-{name}"
        config.write_text(json.dumps(cfg))
        done = subprocess.run(join_cmd(config, "--max-idle", "1", "--drain"), cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr
        frame = read_served(out).drop(columns=["joined_at"])
        for column in ("event_ids", "user_recent_items"):
            frame[column] = frame[column].map(lambda ids: tuple(sorted(ids)))
        frames.append(frame)
    pd.testing.assert_frame_equal(frames[0], frames[1])
    assert len(frames[0]) == 8000 and np.isfinite(frames[0]["served_at"]).all()
