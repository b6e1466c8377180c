"""The real scorer under load: gunicorn with 2 workers on loopback, a load generator in another process.

Requests carry 500 candidates (20% LLM-generated) drawn from the simulated world. Prints req/s,
candidates/s and p50/p99 latency of a closed loop at a fixed concurrency (the most the server
does), p50/p99 of an open loop at a fixed rate (``--rate``, default the goal's 100 req/s;
latency from each request's due time, queueing included), and the ratio of the server's time per
request (median latency of sequential requests) to the bare model call for the same batch,
measured in this process: the ranker's predict on the scorer's request rows (serving encode +
forward; ``LoadedModel.predict`` on the same rows as a DataFrame, the pandas encode, for
reference) and the forward alone on a pre-encoded batch. Then the in-process time of each stage
of ``Scorer.rank`` (validation, real-time lookup, model-input rows, encode, forward, blend +
rerank, impression log, JSON encode of the response) and the machine's load average (the
machine may be shared: quote figures with it). Never fails on time.

    .venv/bin/python bench/serve_bench.py [--registry runs/bench/registry] [--seconds 15]
    .venv/bin/python bench/serve_bench.py --stages-only      # the stage breakdown alone (seconds)

Without a registered model it first simulates a small world and trains one (about a minute).
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bodies(n_requests: int, n_candidates: int, llm_share: float, seed: int = 0) -> list[bytes]:
    from world import World

    world = World.from_yaml(ROOT / "conf/sim/default.yaml")
    rng = np.random.default_rng(seed)
    bodies = []
    for r in range(n_requests):
        user = f"u{rng.integers(world.config.n_users)}"
        pool = world.candidates(user, n_candidates * 3, rng)
        llm = [c for c in pool if c["source"] == "llm"]
        human = [c for c in pool if c["source"] != "llm"]
        n_llm = int(round(llm_share * n_candidates))
        cands = llm[:n_llm] + human[: n_candidates - min(n_llm, len(llm))]
        bodies.append(json.dumps({"request_id": f"bench-{r}", "user_id": user, "candidates": cands}).encode())
    return bodies


def ensure_model(registry: Path, name: str) -> None:
    from ranking.registry import current_version

    if current_version(registry, name):
        return
    print(f"no model '{name}' in {registry}: simulating a world and training one ...", flush=True)
    logs = registry.parent / "sim"
    subprocess.run([sys.executable, "-m", "stratarank.cli", "simulate", "--config", str(ROOT / "conf/sim/default.yaml"),
                    "--out", str(logs), "--impressions", "100000"], check=True, cwd=ROOT)
    from ranking.train import load_train_config, train_from_config

    cfg = load_train_config(ROOT / "conf/train/sim_mmoe.yaml")
    cfg = replace(cfg, name=name, data=replace(cfg.data, path=str(logs)), training=replace(cfg.training, epochs=2))
    train_from_config(cfg, registry=str(registry), progress=False)


class Tally:
    """Latencies of successful calls and a count of failed ones, shared by a load generator's threads."""

    def __init__(self):
        self.latencies, self.errors, self._lock = [], 0, threading.Lock()

    def add(self, ok: bool, seconds: float) -> None:
        with self._lock:
            if ok:
                self.latencies.append(seconds)
            else:
                self.errors += 1


def post_rank(conn, port: int, body: bytes):
    """``(ok, connection)`` of one ``/v1/rank`` call; a failed call gets a fresh connection."""
    try:
        conn.request("POST", "/v1/rank", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200, conn
    except OSError:
        conn.close()
        return False, http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def client_worker(port: int, bodies: list[bytes], seconds: float, concurrency: int, out: mp.Queue) -> None:
    """Runs in its own process: ``concurrency`` keep-alive connections for ``seconds``."""
    tally = Tally()
    stop = time.perf_counter() + seconds

    def loop(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = k
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            ok, conn = post_rank(conn, port, body)
            tally.add(ok, time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((tally.latencies, tally.errors, time.perf_counter() - t0))


def paced_worker(port: int, bodies: list[bytes], seconds: float, rate: float, out: mp.Queue,
                 connections: int = 16) -> None:
    """Runs in its own process: an open-loop load at ``rate`` req/s (request ``i`` is due at
    ``t0 + i / rate``) over ``connections`` keep-alive connections. Each latency counts from the
    request's due time, so time spent waiting for a free connection or a busy server is included
    (no coordinated omission, as in wrk2)."""
    tally = Tally()
    n = int(seconds * rate)
    nxt = [0]
    lock = threading.Lock()  # hands out request indices
    t0 = time.perf_counter() + 0.05

    def loop() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= n:
                break
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ok, conn = post_rank(conn, port, bodies[i % len(bodies)])
            tally.add(ok, time.perf_counter() - due)
        conn.close()

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((tally.latencies, tally.errors, time.perf_counter() - t0))


def run_load(port, bodies, seconds, concurrency, rate: float | None = None):
    """Closed loop with ``concurrency`` connections, or open loop at ``rate`` req/s."""
    q = mp.get_context("spawn").Queue()
    target, args = ((client_worker, (port, bodies, seconds, concurrency, q)) if rate is None
                    else (paced_worker, (port, bodies, seconds, rate, q)))
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    result = q.get()
    p.join()
    return result


def bare_model_times(registry: Path, name: str, body: bytes, repeats: int) -> tuple[float, float, float]:
    """Median seconds of the ranker's predict on the scorer's request rows (the serving encode +
    forward), of ``LoadedModel.predict`` on the same rows as a DataFrame (the pandas encode +
    forward), and of the forward alone (a fresh KJT of a pre-encoded batch)."""
    import torch

    from online.app import Scorer
    from online.predictor import load_ranker
    from strategy import parse_request

    torch.set_num_threads(1)
    ranker = load_ranker(str(registry), name)
    model = ranker.loaded
    req = parse_request(json.loads(body))
    rows = Scorer._frame(req, list(req.candidates), {})
    frame = rows.frame()
    batch = model.encoder.transform(frame, allow_missing=True)

    def med(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def forward():
        with torch.inference_mode():
            model.module(batch.dense, batch.kjt)

    return med(lambda: ranker.predict(rows)), med(lambda: model.predict(frame, allow_missing=True)), med(forward)


STAGES = ("validation", "lookup", "frame", "encode", "forward", "blend+rerank", "log", "json")


def stage_times(registry: Path, name: str, bodies: list[bytes], repeats: int) -> dict[str, float]:
    """Median in-process seconds per stage of ``Scorer.rank`` + the JSON encode of its response.

    Runs the real ``Scorer.rank`` (embedded bus, memory store, one torch thread) with timers
    wrapped around its parts: validation (``parse_request``), real-time lookup, model-input rows
    (``Scorer._frame``), encode (the ranker's predict minus the forward), the forward
    (``module.forward``), blend + guardrails + rerank (``strategy.rank`` and ``blend``), the
    impression log and ``json.dumps`` of the response; ``other`` is the rest, ``total`` the sum.
    One untimed pass over ``bodies`` first: steady state, as in a server that has seen these
    items (the encoder's text-token cache warm).
    """
    import torch

    import online.app as app_mod
    from online.app import Scorer, build_serving
    from online.config import service_config_from_dict

    torch.set_num_threads(1)
    acc: dict[str, float] = {}

    def timed(stage, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[stage] = acc.get(stage, 0.0) + time.perf_counter() - t0
        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        config = service_config_from_dict({
            "strategies": {"files": [str(ROOT / "conf/objectives/feed.yaml")]},
            "model": {"registry": str(registry), "name": name},
            "bus": {"url": f"embedded://{tmp}/bus", "fsync": "interval"},
            "store": {"url": "memory://"},
            "server": {"max_candidates": 2000},
        })
        serving = build_serving(config)
        scorer = Scorer(config, serving, config.nearline.bus.open(), config.nearline.store.open())
        ranker = serving.chain.models[0]
        module = ranker.loaded.module
        saved = {k: getattr(app_mod, k) for k in ("parse_request", "rank", "blend")}
        try:
            app_mod.parse_request = timed("validation", saved["parse_request"])
            app_mod.rank = timed("blend+rerank", saved["rank"])
            app_mod.blend = timed("blend+rerank", saved["blend"])
            scorer._lookup = timed("lookup", scorer._lookup)
            scorer._frame = timed("frame", scorer._frame)
            scorer._log_impressions = timed("log", scorer._log_impressions)
            ranker.predict = timed("encode", ranker.predict)       # forward subtracted below
            module.forward = timed("forward", module.forward)
            per: dict[str, list[float]] = {s: [] for s in STAGES + ("other", "total")}
            warm = len(bodies)
            for r in range(repeats + warm):
                body = json.loads(bodies[r % len(bodies)])
                acc.clear()
                t0 = time.perf_counter()
                out = scorer.rank(body)
                t1 = time.perf_counter()
                json.dumps(out)
                t2 = time.perf_counter()
                if r < warm:
                    continue   # warm-up
                acc["encode"] = acc.get("encode", 0.0) - acc.get("forward", 0.0)
                acc["json"] = t2 - t1
                for s in STAGES:
                    per[s].append(acc.get(s, 0.0))
                per["total"].append(t2 - t0)
                per["other"].append(t2 - t0 - sum(acc.get(s, 0.0) for s in STAGES))
        finally:
            for k, v in saved.items():
                setattr(app_mod, k, v)
            scorer.close()
    return {s: statistics.median(v) for s, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", default=str(ROOT / "runs/bench/registry"))
    ap.add_argument("--model", default="feed_mmoe")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--llm-share", type=float, default=0.2)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=100.0, help="open-loop request rate for the latency SLO (req/s)")
    ap.add_argument("--stages-only", action="store_true", help="only the in-process per-stage timing (no server)")
    args = ap.parse_args()
    load_before = os.getloadavg()   # the machine is shared: report what else was running
    registry = Path(args.registry)
    ensure_model(registry, args.model)
    bodies = make_bodies(50, args.candidates, args.llm_share)
    if args.stages_only:
        stages = stage_times(registry, args.model, bodies, 100)
        print("in-process stages (median ms per request, Scorer.rank + json.dumps, 1 thread): "
              + "  ".join(f"{s} {stages[s] * 1e3:.2f}" for s in STAGES + ("other", "total")))
        print(f"load average    : before {' '.join(f'{x:.2f}' for x in load_before)}, after "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min; {os.cpu_count()} CPUs)")
        return

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "service.yaml"
        config.write_text(json.dumps({
            "strategies": {"files": [str(ROOT / "conf/objectives/feed.yaml")]},
            "model": {"registry": str(registry), "name": args.model},
            "bus": {"url": f"embedded://{tmp}/bus", "fsync": "interval"},
            "store": {"url": "memory://"},
            "server": {"max_candidates": 2000},
        }))
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        server = subprocess.Popen([sys.executable, "-m", "stratarank.cli", "serve", "--config", str(config),
                                   "--port", str(port), "--workers", str(args.workers)], cwd=ROOT, env=env)
        try:
            for _ in range(600):
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/readyz")
                    ready = conn.getresponse().status == 200
                    conn.close()
                    if ready:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            else:
                raise SystemExit("the scorer did not become ready (is a model registered?)")
            run_load(port, bodies, 2.0, 2)  # warm-up: both workers loaded and JIT-free paths hot
            seq, seq_err, _ = run_load(port, bodies, args.seconds / 3, 1)
            lat, errors, wall = run_load(port, bodies, args.seconds, args.concurrency)
            paced, paced_err, _ = run_load(port, bodies, args.seconds, 0, rate=args.rate)
        finally:
            server.terminate()
            server.wait(timeout=30)

    predict_s, pandas_s, forward_s = bare_model_times(registry, args.model, bodies[0], 30)
    stages = stage_times(registry, args.model, bodies, 60)
    lat_ms = np.array(lat) * 1e3
    server_s = statistics.median(seq)
    print(f"requests: {args.candidates} candidates ({args.llm_share:.0%} LLM), {args.workers} gunicorn workers, "
          f"load generator in another process, concurrency {args.concurrency}, {wall:.1f} s")
    print(f"throughput      : {len(lat) / wall:8.1f} req/s   {len(lat) * args.candidates / wall:10.0f} candidates/s"
          f"   (errors: {errors + seq_err})   goal >= 100 req/s")
    paced_ms = np.array(paced) * 1e3
    print(f"latency         : p50 {np.percentile(lat_ms, 50):6.1f} ms   p99 {np.percentile(lat_ms, 99):6.1f} ms"
          f"   (closed loop at full throughput, concurrency {args.concurrency})")
    print(f"latency at rate : p50 {np.percentile(paced_ms, 50):6.1f} ms   p99 {np.percentile(paced_ms, 99):6.1f} ms"
          f"   (open loop at {args.rate:g} req/s, from each request's due time; errors {paced_err})"
          f"   goal p99 <= 30 ms at >= 100 req/s")
    print(f"sequential      : median {server_s * 1e3:6.1f} ms per request (server time, no queueing)")
    print(f"bare model      : predict (serving encode + forward) {predict_s * 1e3:6.1f} ms, forward only "
          f"{forward_s * 1e3:6.1f} ms   (pandas encode + forward {pandas_s * 1e3:6.1f} ms)")
    print(f"ratio server / predict: {server_s / predict_s:5.2f}   server / forward: {server_s / forward_s:5.2f}"
          f"   goal <= 1.5")
    print("in-process stages (median ms per request, Scorer.rank + json.dumps, 1 thread): "
          + "  ".join(f"{s} {stages[s] * 1e3:.2f}" for s in STAGES + ("other", "total")))
    print(f"load average    : before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
