"""Joiner speed: impressions joined per second, and the lag from a feedback event to its joined example.

Throughput: a served stream (``online.joiner.synthetic_served``: impressions shaped as the scorer
logs them, with features and predictions, ~0.4 feedback events each, late / duplicate /
unattributed / invalid records) is published to an embedded bus first; then ``run_joiner`` (one
thread: poll -> join -> Parquet parts + the ``joined`` topic + checkpoint -> commit) drains it. The
clock runs from the joiner's start to its last flush; impressions per wall second and per CPU
second of the process are printed (the CPU figure depends much less on what else the machine does).
Baseline, same process and bus: reading the same records with ``Consumer.poll`` and nothing else —
the least any joiner on this bus must do.

Lag: a publisher process sends a served stream in real time at ``--rate`` impressions per second
while the joiner runs (window ``--lag-window`` s); for every joined event, the time from its publish
to the emission of its example is measured. An example cannot be emitted before its window closes,
so that lag is at least the time left in the window; the joiner's own delay (emission minus window
close, the part it controls) is printed beside it. Goal: >= 50k impressions/s on one core. Never
fails on time; medians of ``--repeats`` runs.

    .venv/bin/python bench/join_bench.py [--requests 20000] [--repeats 3] [--rate 5000] [--lag-seconds 10]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet  # noqa: E402,F401 - imported before any clock starts

from online.bus import open_bus  # noqa: E402
from online.joiner import JoinerConfig, publish_synthetic, run_joiner, synthetic_served  # noqa: E402
from ranking.datasets import read_served  # noqa: E402
from online.nearline import BusConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = str(ROOT / "conf" / "objectives" / "feed.yaml")


def throughput(requests: int, folder: Path, seed: int) -> dict:
    url = f"embedded://{folder / 'bus'}"
    bus = open_bus(url, fsync="never")
    records = synthetic_served(requests, seed=seed, window_s=60.0, gap_s=0.01)
    publish_synthetic(bus, records)
    bus.close()
    n_imp = sum(r[0] == "impressions" for r in records)

    bus = open_bus(url, fsync="never")
    consumer = bus.consumer("baseline", ["impressions", "events"])
    t0, c0, read = time.perf_counter(), time.process_time(), 0
    while read < len(records):
        read += len(consumer.poll(5000, 0.05))
    base_wall, base_cpu = time.perf_counter() - t0, time.process_time() - c0
    consumer.close()

    cfg = JoinerConfig(bus=BusConfig(url=url, fsync="never"), out=str(folder / "out"), window_s=60.0, grace_s=2.0,
                       objectives=OBJECTIVES, batch_size=5000)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = run_joiner(cfg, bus=bus, max_idle_s=0.2, drain=True)
    wall, cpu = time.perf_counter() - t0 - 0.2, time.process_time() - c0   # minus the idle wait at the end
    bus.close()
    n_imp = stats.state.counters["impressions"]
    assert stats.state.counters["examples"] == n_imp, stats.to_dict()
    return {"impressions": n_imp, "records": len(records), "wall": wall, "cpu": cpu, "base_wall": base_wall,
            "base_cpu": base_cpu, "flushes": stats.flushes}


def _publish_live(url: str, requests: int, rate: float, window: float, seed: int) -> None:
    """Publish a served stream in real time: each record when its (scaled) publish time comes."""
    bus = open_bus(url, fsync="never")
    gap = 10.0 / rate   # slates of 10
    records = synthetic_served(requests, seed=seed, window_s=window, gap_s=gap, late=0.0, duplicates=0.0,
                               unattributed=0.0, invalid=0.0)
    first = records[0][1]
    t0 = time.time()
    batch, topic = [], None
    for k, (rec_topic, published, value) in enumerate(records):
        delay = (published - first) - (time.time() - t0)
        if delay > 0.005 or (topic is not None and rec_topic != topic):
            if batch:
                bus.publish(topic, batch)
                batch = []
            if delay > 0.005:
                time.sleep(delay)
        topic = rec_topic
        value["ts"] = time.time()
        batch.append(value)
    if batch:
        bus.publish(topic, batch)
    bus.close()


def lag(seconds: float, rate: float, window: float, folder: Path, seed: int) -> dict:
    url = f"embedded://{folder / 'bus'}"
    open_bus(url).close()
    requests = int(seconds * rate / 10)
    pub = mp.get_context("spawn").Process(target=_publish_live, args=(url, requests, rate, window, seed))
    cfg = JoinerConfig(bus=BusConfig(url=url, fsync="never"), out=str(folder / "out"), window_s=window, grace_s=0.5,
                       objectives=OBJECTIVES, flush_interval_s=0.5, poll_timeout_s=0.05)
    pub.start()
    stats = run_joiner(cfg, max_idle_s=window + 3.0)
    pub.join()
    published = {}
    bus = open_bus(url)
    consumer = bus.consumer("lag-reader", ["events"])
    while True:
        batch = consumer.poll(20_000, 0.5)
        if not batch:
            break
        for r in batch:
            published[r.value["event_id"]] = r.timestamp
    consumer.close()
    bus.close()
    examples = read_served(folder / "out")
    lags, own = [], []
    for joined_at, served, ids in zip(examples["joined_at"], examples["served_at"], examples["event_ids"]):
        own.append(joined_at - (served + window))
        lags += [joined_at - published[e] for e in ids]
    return {"examples": len(examples), "events": len(lags), "lag": np.array(lags), "own": np.array(own),
            "impressions_per_s": stats.state.counters["impressions"] / max(seconds, 1e-9)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000, help="served requests of 10 impressions (throughput)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=5000.0, help="impressions/s of the live publisher (lag run)")
    ap.add_argument("--lag-seconds", type=float, default=10.0, help="length of the live stream (0: no lag run)")
    ap.add_argument("--lag-window", type=float, default=2.0, help="attribution window of the lag run, seconds")
    args = ap.parse_args(argv)

    runs = []
    for k in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix="join-bench-"))
        try:
            runs.append(throughput(args.requests, folder, seed=k))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    n = runs[0]["impressions"]
    wall = statistics.median(n / r["wall"] for r in runs)
    cpu = statistics.median(n / r["cpu"] for r in runs)
    base = statistics.median(n / r["base_wall"] for r in runs)
    base_cpu = statistics.median(n / r["base_cpu"] for r in runs)
    print(f"join: {n:,} impressions + {runs[0]['records'] - n:,} feedback/other records, embedded bus, "
          f"median of {args.repeats}")
    print(f"  joiner:   {wall:,.0f} impressions/s wall, {cpu:,.0f} per CPU second "
          f"({runs[0]['flushes']} flushes: Parquet parts + joined topic + checkpoint)  [goal >= 50,000/s on one core]")
    print(f"  baseline: {base:,.0f} impressions/s wall, {base_cpu:,.0f} per CPU second (Consumer.poll of the same "
          f"records, nothing else); the joiner takes {base / wall:.1f}x the bare read's time")
    if args.lag_seconds > 0:
        folder = Path(tempfile.mkdtemp(prefix="join-lag-"))
        try:
            res = lag(args.lag_seconds, args.rate, args.lag_window, folder, seed=7)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        p = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
        print(f"lag: {res['examples']:,} examples, {res['events']:,} joined events, live at {args.rate:,.0f} "
              f"impressions/s, window {args.lag_window:g} s")
        print(f"  feedback -> joined example: p50 {p(res['lag'], 50):.2f} s, p99 {p(res['lag'], 99):.2f} s "
              f"(at least the window's remainder)")
        print(f"  the joiner's own delay (emission - window close): p50 {p(res['own'], 50):.3f} s, "
              f"p99 {p(res['own'], 99):.3f} s (grace 0.5 s + flush interval 0.5 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
