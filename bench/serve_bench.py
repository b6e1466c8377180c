"""The real scorer under load: gunicorn with 2 workers on loopback, a load generator in another process.

Requests carry 500 candidates (20% LLM-generated) drawn from the simulated world. Prints req/s,
candidates/s and p50/p99 latency of a closed loop at a fixed concurrency (the most the server
does), p50/p99 of an open loop at a fixed rate (``--rate``, default the goal's 100 req/s;
latency from each request's due time, queueing included), and the ratio of the server's time per
request (median latency of sequential requests) to the bare model call for the same batch,
measured in this process: the ranker's predict on the scorer's request rows (serving encode +
forward; ``LoadedModel.predict`` on the same rows as a DataFrame, the pandas encode, for
reference) and the forward alone on a pre-encoded batch. Then the in-process time of each stage
of one ``POST /v1/rank`` through the app's test client (JSON decode, validation, real-time lookup,
model-input rows, encode, forward, blend + rerank, impression log, the response's JSON encode,
the rest), the scorer's own overhead (the request minus the model's encode + forward, medians
over ``--repeats`` requests) and the machine's load average (the machine may be shared: quote
figures with it). Never fails on time.

Against peers (``--peers mlflow litserve ray bentoml``, the default): the demo's LightGBM fallback served alone
by ``stratarank serve`` (``/v1/rank``: features, strategy, guardrails, re-rank, impression log; once with
``model.compile_trees``, its boosters compiled to native code, and once with LightGBM's own predict, which
is what the peers run) and by each peer: MLflow's model server (``mlflow models serve``: ``/invocations``),
LitServe (a ``LitAPI`` on ``/predict``), Ray Serve (a deployment of ``num_replicas`` replicas on
``/predict``) and BentoML (a ``bentoml.service`` on ``/predict``), all sent the same requests' feature
rows as ``dataframe_split`` JSON; the same number of workers, the same load generator and settings,
one server after the other: req/s, p50/p99 of each and Stratarank's ratios to each. Each peer is
installed by the bench into its own venv ``bench/.peers/NAME/`` (bench/peers.py); one that cannot be
is reported with the reason and the others go on. ``--peers none`` skips them.

    .venv/bin/python bench/serve_bench.py [--registry runs/bench/registry] [--seconds 15] [--peers mlflow|litserve|ray|bentoml|none]
    .venv/bin/python bench/serve_bench.py --stages-only [--repeats 100]   # stages + overhead alone (seconds)
    .venv/bin/python bench/serve_bench.py --feed [--feed-rate 50]         # POST /v1/feed over the living world
    .venv/bin/python bench/serve_bench.py --student --peers none          # the int8 distilled student served

``--feed``: ``POST /v1/feed`` instead (retrieval from the engine's own corpus, then ``/v1/rank``'s
path). The living world (conf/sim/living.yaml) is simulated for ``--feed-impressions``; a two-tower
model (conf/train/two_tower_living.yaml) is trained on those logs; the items alive at the logs' end
(~100k) go into the scorer's corpus and the logged feedback events through ``POST /v1/events``, all
times moved to now (the scorer runs on the wall clock). Once every worker has indexed the corpus,
the same closed and open loops (``--feed-rate``, default the goal's 50 req/s) run on requests of
users with a history, and the answers' own stage timings (retrieval sources, ranking) are reported.

``--student``: the served model is a student distilled from ``--model`` (conf/train/sim_student.yaml on the
bench's logs) with int8 tables (``--quantized``: any model's row-wise quantized variant, added to the
registry when missing), as the scorer serves a cheaper model; every figure above is then the student's.

Without a registered model it first simulates a small world and trains one (about a minute).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import signal
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


def service_config(registry: Path, name: str, tmp: Path, quantized: str = "none") -> dict:
    """The bench's scorer config: model ``name`` alone (its ``quantized`` serving variant), an embedded bus
    and a memory store in ``tmp``."""
    return {
        "strategies": {"files": [str(ROOT / "conf/objectives/feed.yaml")]},
        "model": {"registry": str(registry), "name": name, "quantized": quantized},
        "bus": {"url": f"embedded://{tmp}/bus", "fsync": "interval"},
        "store": {"url": "memory://"},
        "server": {"max_candidates": 2000},
    }


def ensure_model(registry: Path, name: str) -> None:
    from ranking.registry import current_version

    if current_version(registry, name):
        return
    print(f"no model '{name}' in {registry}: simulating a world and training one ...", flush=True)
    logs = simulate_logs(registry)
    from ranking.train import load_train_config, train_from_config

    cfg = load_train_config(ROOT / "conf/train/sim_mmoe.yaml")
    cfg = replace(cfg, name=name, data=replace(cfg.data, path=str(logs)), training=replace(cfg.training, epochs=2))
    train_from_config(cfg, registry=str(registry), progress=False)


def ensure_student(registry: Path, teacher: str) -> str:
    """The name of a student of ``teacher`` (``conf/train/sim_student.yaml``: distilled from it on the
    bench's simulated logs) in ``registry``, trained if missing."""
    from ranking.registry import current_version
    from ranking.train import load_train_config, train_from_config

    name = f"{teacher}_student"
    if not current_version(registry, name):
        print(f"no model '{name}' in {registry}: distilling one from {teacher} ...", flush=True)
        cfg = load_train_config(ROOT / "conf/train/sim_student.yaml")
        cfg = replace(cfg, name=name, data=replace(cfg.data, path=str(simulate_logs(registry))),
                      distill_from=replace(cfg.distill_from, model=teacher, registry=str(registry)))
        train_from_config(cfg, registry=str(registry), progress=False)
    return name


def ensure_variant(registry: Path, name: str, quantized: str) -> None:
    """Add the ``quantized`` serving variant of ``name``'s current version when it has none."""
    from ranking.artifacts import add_serving_variant
    from ranking.registry import resolve

    manifest = json.loads((resolve(registry, name) / "manifest.json").read_text(encoding="utf-8"))
    if quantized != "none" and quantized not in manifest.get("serving", {}):
        add_serving_variant(registry, name, quantized)


def ensure_lgbm(registry: Path) -> str:
    """The name of the demo's LightGBM fallback in ``registry`` (request-time features, one booster
    per objective of the feed strategy), trained on the bench's simulated logs if missing."""
    from ranking.registry import current_version
    from stratarank.demo import FALLBACK, train_fallback

    if not current_version(registry, FALLBACK):
        print(f"no model '{FALLBACK}' in {registry}: training the LightGBM one ...", flush=True)
        from ranking.train import load_train_config

        objectives = [o.name for o in load_train_config(ROOT / "conf/train/sim_mmoe.yaml").objectives]
        train_fallback(simulate_logs(registry), registry, objectives)
    return FALLBACK


def simulate_logs(registry: Path) -> Path:
    """The simulated logs next to ``registry`` (simulated once)."""
    logs = registry.parent / "sim"
    if (logs / "impressions.parquet").exists():
        return logs
    subprocess.run([sys.executable, "-m", "stratarank.cli", "simulate", "--config", str(ROOT / "conf/sim/default.yaml"),
                    "--out", str(logs), "--impressions", "100000"], check=True, cwd=ROOT)
    return logs


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


def post_json(conn, port: int, body: bytes, path: str = "/v1/rank"):
    """``(ok, connection)`` of one POST to ``path``; a failed call gets a fresh connection."""
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200, conn
    except OSError:
        conn.close()
        return False, http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def client_worker(port: int, bodies: list[bytes], seconds: float, concurrency: int, out: mp.Queue,
                  path: str = "/v1/rank") -> None:
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
            ok, conn = post_json(conn, port, body, path)
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
                 path: str = "/v1/rank", connections: int = 16) -> None:
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
            ok, conn = post_json(conn, port, bodies[i % len(bodies)], path)
            tally.add(ok, time.perf_counter() - due)
        conn.close()

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((tally.latencies, tally.errors, time.perf_counter() - t0))


def run_load(port, bodies, seconds, concurrency, rate: float | None = None, path: str = "/v1/rank"):
    """Closed loop with ``concurrency`` connections, or open loop at ``rate`` req/s, POSTing to ``path``."""
    q = mp.get_context("spawn").Queue()
    target, args = ((client_worker, (port, bodies, seconds, concurrency, q, path)) if rate is None
                    else (paced_worker, (port, bodies, seconds, rate, q, path)))
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    result = q.get()
    p.join()
    return result


def bare_model_times(registry: Path, name: str, body: bytes, repeats: int,
                     quantized: str = "none") -> tuple[float, float, float]:
    """Median seconds of the ranker's predict on the scorer's request rows (the serving encode +
    forward), of ``LoadedModel.predict`` on the same rows as a DataFrame (the pandas encode +
    forward), and of the forward alone (a fresh KJT of a pre-encoded batch)."""
    import torch

    from online.app import Scorer
    from online.predictor import load_ranker
    from strategy import parse_request

    torch.set_num_threads(1)
    ranker = load_ranker(str(registry), name, quantized)
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


class ServerNotReady(RuntimeError):
    """A server process exited, or did not answer its readiness path in time."""


def answers(port: int, path: str) -> bool:
    """Whether ``GET path`` on loopback ``port`` is a 200 now."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


def get_json(port: int, path: str) -> dict:
    """The JSON body of ``GET path`` on loopback ``port`` (whatever its status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read() or b"{}")
    finally:
        conn.close()


@contextlib.contextmanager
def server_process(cmd: list[str], env: dict, port: int, ready_path: str, what: str, seconds: float = 120.0):
    """A server started in a session of its own, ready once ``ready_path`` answers 200; on exit its
    whole process group (master and workers) is stopped."""
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + seconds
        while not answers(port, ready_path):
            if server.poll() is not None:
                raise ServerNotReady(f"{what} exited with {server.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise ServerNotReady(f"{what} did not answer {ready_path} within {seconds:g} s")
            time.sleep(0.1)
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@contextlib.contextmanager
def stratarank_server(registry: Path, model: str, workers: int, tmp: Path, sections: dict | None = None,
                      gc_freeze: bool = True, quantized: str = "none"):
    """``stratarank serve`` of ``model`` alone (its ``quantized`` variant) with ``workers`` gunicorn workers
    (``sections``: more service config sections; ``gc_freeze`` False: ``--no-gc-freeze``); yields its port."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / f"{model}.yaml"
    config.write_text(json.dumps({**service_config(registry, model, tmp / model, quantized), **(sections or {})}))
    port = free_port()
    cmd = [sys.executable, "-m", "stratarank.cli", "serve", "--config", str(config), "--port", str(port),
           "--workers", str(workers)] + ([] if gc_freeze else ["--no-gc-freeze"])
    try:
        with server_process(cmd, dict(os.environ, OMP_NUM_THREADS="1"), port, "/readyz", "the scorer"):
            yield port
    except ServerNotReady as exc:
        raise SystemExit(f"{exc} (is a model registered?)") from None


def feed_world(registry: Path, tmp: Path, impressions: int,
               n_users: int) -> tuple[dict, list[bytes], int, list[dict]]:
    """(the ``retrieval`` and ``corpus`` service sections, ``/v1/feed`` bodies, items in the corpus, the
    logged feedback events) of the living world at the end of ``impressions`` logged impressions, moved to now."""
    from feed_recall_bench import corpus_items, train_model

    from online.corpus import Corpus, CorpusConfig
    from strategy.items import MAX_ITEMS, parse_items
    from world import World

    world = World.from_yaml(ROOT / "conf/sim/living.yaml")
    imp, ev = world.simulate_logs(impressions, progress=False)
    end = float(imp["ts"].max())
    shift = time.time() - end
    folder = tmp / "feed"
    folder.mkdir()
    args = argparse.Namespace(train_config=str(ROOT / "conf/train/two_tower_living.yaml"))
    tt_registry, tt_name = train_model(args, imp, folder)
    writes = corpus_items(world, end)
    for w in writes:
        w["created_at"] += shift
        w["expires_at"] += shift
    corpus = Corpus(CorpusConfig(path=str(folder / "corpus.db"), synchronous="normal"))
    for start in range(0, len(writes), MAX_ITEMS):
        corpus.upsert(parse_items({"items": writes[start:start + MAX_ITEMS]}))
    corpus.close()
    events = [{k: (v + shift if k == "ts" else v) for k, v in rec.items() if v == v}
              for rec in ev[ev["type"] != "impression"].to_dict("records")]
    users = sorted(set(ev["user_id"]))
    rng = np.random.default_rng(0)
    bodies = [json.dumps({"user_id": u}).encode() for u in rng.choice(users, size=min(n_users, len(users)),
                                                                    replace=False)]
    sections = {"retrieval": {"model": tt_name, "registry": tt_registry},
                "corpus": {"path": str(folder / "corpus.db"), "synchronous": "normal"}}
    return sections, bodies, len(writes), events


def post_events(port: int, events: list[dict], batch: int = 5000) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for start in range(0, len(events), batch):
        conn.request("POST", "/v1/events", body=json.dumps({"events": events[start:start + batch]}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status >= 300:
            raise SystemExit(f"POST /v1/events answered {resp.status}: {body[:300]!r}")
    conn.close()


def wait_indexed(port: int, items: int, workers: int, seconds: float = 600.0) -> float:
    """Seconds until ``/readyz`` shows each of ``workers`` workers' retrieval index holding at least 99%
    of ``items`` (items expiring meanwhile leave it) and not growing any more."""
    t0 = time.perf_counter()
    seen: dict[int, list[int]] = {}
    while time.perf_counter() - t0 < seconds:
        body = get_json(port, "/readyz")
        status = body.get("retrieval") or {}
        if status.get("error"):
            raise SystemExit(f"worker {body.get('worker')}: retrieval failed: {status['error']}")
        history = seen.setdefault(body.get("worker"), [])
        history.append(status.get("indexed", 0))
        if len(seen) >= workers and all(len(h) >= 2 and h[-1] >= 0.99 * items and h[-1] == h[-2]
                                        for h in seen.values()):
            return time.perf_counter() - t0
        time.sleep(0.5)
    raise SystemExit(f"the workers did not index {items} items in {seconds:.0f} s: "
                     f"{ {w: h[-1] for w, h in seen.items()} }")


def feed_stage_medians(port: int, bodies: list[bytes]) -> dict[str, float]:
    """Median of each ``timings_ms`` stage the ``/v1/feed`` answers report, over one pass of ``bodies``."""
    stages: dict[str, list[float]] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for body in bodies:
        conn.request("POST", "/v1/feed", body=body, headers={"Content-Type": "application/json"})
        answer = json.loads(conn.getresponse().read())
        for stage, ms in answer["retrieval"]["timings_ms"].items():
            stages.setdefault(stage, []).append(ms)
        for source, n in answer["retrieval"]["found"].items():
            stages.setdefault(f"found {source}", []).append(n)
    conn.close()
    return {k: statistics.median(v) for k, v in stages.items()}


def run_feed(registry: Path, args) -> None:
    """``--feed``: the scorer's ``/v1/feed`` under load over the living world's corpus."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        sections, bodies, n_items, events = feed_world(registry, tmp, args.feed_impressions, 200)
        sections["retrieval"]["gc_freeze"] = not args.no_gc_freeze
        print(f"living world: {n_items:,} items in the corpus, {len(events):,} feedback events, "
              f"{len(bodies)} users (set up in {time.perf_counter() - t:.0f} s)", flush=True)
        with stratarank_server(registry, args.model, args.workers, tmp, sections, not args.no_gc_freeze) as port:
            post_events(port, events)
            indexed_s = wait_indexed(port, n_items, args.workers)
            print(f"every worker indexed the corpus {indexed_s:.0f} s after the events were posted", flush=True)
            load_before = os.getloadavg()
            stages = feed_stage_medians(port, bodies)
            feed_args = argparse.Namespace(**{**vars(args), "peer_rate": args.feed_rate})
            result = measure(port, bodies, feed_args, path="/v1/feed")
    print(f"/v1/feed: {n_items:,} items, {args.workers} gunicorn workers, the default retrieval section "
          f"(400 candidates), load from another process, gc_freeze {not args.no_gc_freeze}")
    print(f"closed loop     : {result['rps']:8.1f} req/s   p50 {result['p50']:6.1f} ms   p99 {result['p99']:6.1f} ms"
          f"   (concurrency {args.concurrency})")
    print(f"open loop       : p50 {result['rate_p50']:6.1f} ms   p99 {result['rate_p99']:6.1f} ms at "
          f"{args.feed_rate:g} req/s (errors {result['errors']})   goal p99 <= 40 ms at 50 req/s")
    print("answers' stages : " + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items() if not k.startswith("found"))
          + " (medians, one request at a time)")
    print("found per source: " + ", ".join(f"{k[6:]} {v:.0f}" for k, v in stages.items() if k.startswith("found")))
    print(f"load average    : before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min; {os.cpu_count()} CPUs)")


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.array(latencies) * 1e3, q)) if latencies else float("nan")


def measure(port: int, bodies: list[bytes], args, path: str = "/v1/rank") -> dict:
    """A 2 s warm-up, the closed loop at ``args.concurrency`` (req/s, p50/p99) and the open loop at
    ``args.peer_rate`` (p50/p99 from each request's due time), POSTing ``bodies`` to ``path``."""
    run_load(port, bodies, 2.0, 2, path=path)
    lat, errors, wall = run_load(port, bodies, args.seconds, args.concurrency, path=path)
    paced, paced_err, _ = run_load(port, bodies, args.seconds, 0, rate=args.peer_rate, path=path)
    return {"rps": len(lat) / wall, "p50": percentile_ms(lat, 50), "p99": percentile_ms(lat, 99),
            "rate_p50": percentile_ms(paced, 50), "rate_p99": percentile_ms(paced, 99),
            "errors": errors + paced_err}


def predict_lines(ranker, frame, tmp: Path) -> str:
    """LightGBM's own predict vs the compiled trees on ``frame``'s feature rows (medians, alternating)."""
    import pandas as pd

    from ranking.compiled_trees import CompileError
    from ranking.lgbm import LGBMMultiObjective

    columns = ranker.model.feature_columns
    compiled = LGBMMultiObjective(ranker.model.types)
    compiled.boosters, compiled.feature_columns = ranker.model.boosters, columns
    try:
        t0 = time.perf_counter()
        compiled.compile(tmp / "trees")
        compile_s = time.perf_counter() - t0
    except CompileError as exc:
        return f"trees not compiled: {exc}"
    rows = frame[columns].apply(pd.to_numeric, errors="coerce")
    times = {"lightgbm": [], "compiled": []}
    for _ in range(30):
        for label, model in (("lightgbm", ranker.model), ("compiled", compiled)):
            t0 = time.perf_counter()
            model.predict(rows)
            times[label].append(time.perf_counter() - t0)
    diff = float(np.abs(compiled.predict(rows) - ranker.model.predict(rows)).max())
    lg, co = (statistics.median(times[k]) * 1e3 for k in ("lightgbm", "compiled"))
    return (f"LightGBM {lg:.2f} ms, compiled trees {co:.2f} ms ({lg / co:.1f}x; max |diff| {diff:.1e}; "
            f"compiled or loaded in {compile_s:.1f} s)")


def compare_with_peers(registry: Path, args, bodies: list[bytes], tmp: Path, names: list[str]) -> list[str]:
    """The report lines of Stratarank against the peers ``names`` (bench/peers.py) on the same LightGBM model.

    Every peer is installed (its own venv) and prepared first, so no install runs while a server is
    measured; then ``/v1/rank`` of the LightGBM model and each peer's predict path of the same
    requests' feature rows, one server after the other, with the same load generator and settings.
    A peer that cannot be installed, prepared, started or that predicts otherwise than the booster
    is reported with the reason, and the others' figures stand."""
    import peers
    from online.predictor import load_ranker
    from ranking.artifacts import LGBM_DIR
    from ranking.registry import resolve

    name = ensure_lgbm(registry)
    ranker = load_ranker(str(registry), name)
    lgbm_dir = resolve(registry, name) / LGBM_DIR
    frames = peers.feature_frames(bodies, ranker)
    peer_bodies = [peers.invocation_body(frame) for frame in frames]
    lines = [f"peers           : the same LightGBM model ({name}@{ranker.version}: {len(ranker.objectives)} "
             f"objectives, {len(ranker.model.feature_columns)} features), {args.workers} workers each, "
             f"{args.candidates} rows per request, one server after the other"]
    lines.append("  predict of one request's rows, this process, one thread: " + predict_lines(ranker, frames[0], tmp))
    ready = []
    for peer in map(peers.named, names):
        try:
            requirements = peer.ensure_venv()
            peer.prepare(lgbm_dir, tmp)
            ready.append((peer, requirements))
        except peers.PeerUnavailable as exc:
            lines.append(f"  {peer.name} peer not installed: {exc}")
    rows = []
    for compiled in (True, False):   # the serving choice, then LightGBM's own predict (what the peers run)
        model = {"model": {**service_config(registry, name, tmp)["model"], "compile_trees": compiled,
                           "trees_cache": str(tmp / "trees")}}
        with stratarank_server(registry, name, args.workers, tmp / f"compiled-{compiled}", model) as port:
            status = get_json(port, "/readyz")
            if compiled and not status.get("compiled_trees", {}).get(f"{name}@{ranker.version}"):
                lines.append(f"  trees did not compile: {status.get('load_errors')}")
            rows.append(("stratarank" if compiled else "lightgbm-predict",
                         "stratarank compiled" if compiled else "stratarank lgbm predict", measure(port, bodies, args)))
    ours = rows[0][2]
    for peer, requirements in ready:
        port = free_port()
        try:
            with server_process(peer.serve_command(lgbm_dir, tmp, port, args.workers), peer.env(),
                                port, peer.ready_path, f"the {peer.name} peer"):
                diff = peers.check_predictions(port, peer.predict_path, peer_bodies[0], frames[0], ranker)
                rows.append((peer.name, peer.label, measure(port, peer_bodies, args, peer.predict_path)))
            lines.append(f"  {requirements[0]} in {peer.venv.relative_to(ROOT)} ({peer.how}): predictions "
                         f"{'equal' if diff < 1e-9 else 'DIFFER FROM'} the booster's own (max |diff| {diff:.1e} "
                         f"on {len(frames[0])} rows)")
        except (peers.PeerUnavailable, ServerNotReady) as exc:
            lines.append(f"  {peer.name} peer not measured: {exc}")
    if len(rows) == 2:
        lines.append("  no peer measured -- Stratarank alone")
    lines.append(f"  {'':24s} {'closed loop, concurrency ' + str(args.concurrency):>28s}   "
                 f"{'open loop at ' + format(args.peer_rate, 'g') + ' req/s':>19s}")
    lines.append(f"  {'server':24s} {'req/s':>8s} {'p50 ms':>9s} {'p99 ms':>9s}   {'p50 ms':>9s} {'p99 ms':>9s}"
                 "   errors")
    for _, label, m in rows:
        lines.append(f"  {label:24s} {m['rps']:8.1f} {m['p50']:9.1f} {m['p99']:9.1f}   {m['rate_p50']:9.1f} "
                     f"{m['rate_p99']:9.1f}   {m['errors']}")
    for peer_name, _, theirs in rows[1:]:   # the compiled trees against each
        r = {k: ours[k] / theirs[k] for k in ("rps", "p50", "p99", "rate_p50", "rate_p99")}
        lines.append(f"  {'stratarank / ' + peer_name:24s} {r['rps']:7.2f}x {r['p50']:8.2f}x {r['p99']:8.2f}x   "
                     f"{r['rate_p50']:8.2f}x {r['rate_p99']:8.2f}x   goal: req/s >= 1.5x, p99 < 1x")
    return lines


STAGES = ("parse", "lookup", "frame", "encode", "forward", "blend+rerank", "log", "response")


def stage_times(registry: Path, name: str, bodies: list[bytes], repeats: int,
                quantized: str = "none") -> dict[str, float]:
    """Median in-process seconds per stage of one ``POST /v1/rank`` through the app's test client.

    Runs the real Flask app (``create_app``: embedded bus, memory store, one torch thread) with
    timers wrapped around its parts: the JSON decode and validation of the body (``parse``:
    msgspec's one pass ``parse_request_json``, or ``decode_json`` + ``parse_request`` where it
    declines), real-time lookup, model-input rows (``Scorer._frame``), encode (the ranker's
    predict minus the forward), the forward (``module.forward``), blend + guardrails + rerank
    (``strategy.rank`` and ``blend``), the impression log and the response (its JSON encode);
    ``other`` is the rest (Flask and werkzeug, assignment, risk rules, metrics), ``total`` the whole
    request and ``overhead`` the request minus encode + forward: the scorer's own time (each a median
    over requests). One untimed pass over ``bodies`` first: steady state, as in a server that has
    seen these items (the encoder's text-token cache warm).
    """
    import torch

    import online.app as app_mod
    from online.app import build_serving, create_app
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

    # the response encode: the rank path's own helper where there is one, else Flask's jsonify
    response_fn = "json_response" if hasattr(app_mod, "json_response") else "jsonify"
    with tempfile.TemporaryDirectory() as tmp:
        config = service_config_from_dict(service_config(registry, name, Path(tmp), quantized))
        serving = build_serving(config)
        app = create_app(config, serving=serving, bus=config.nearline.bus.open(), store=config.nearline.store.open())
        scorer = app.extensions["stratarank"]
        client = app.test_client()
        ranker = serving.chain.models[0]
        module = ranker.loaded.module
        parsers = ("parse_request_json", "decode_json", "parse_request")
        saved = {k: getattr(app_mod, k) for k in parsers + ("rank", "blend", response_fn)}
        try:
            for k in parsers:
                setattr(app_mod, k, timed("parse", saved[k]))
            app_mod.rank = timed("blend+rerank", saved["rank"])
            app_mod.blend = timed("blend+rerank", saved["blend"])
            setattr(app_mod, response_fn, timed("response", saved[response_fn]))
            scorer._lookup = timed("lookup", scorer._lookup)
            scorer._frame = timed("frame", scorer._frame)
            scorer._log_impressions = timed("log", scorer._log_impressions)
            ranker.predict = timed("encode", ranker.predict)       # forward subtracted below
            module.forward = timed("forward", module.forward)
            per: dict[str, list[float]] = {s: [] for s in STAGES + ("other", "total", "overhead")}
            warm = len(bodies)
            for r in range(repeats + warm):
                body = bodies[r % len(bodies)]
                acc.clear()
                t0 = time.perf_counter()
                resp = client.post("/v1/rank", data=body, content_type="application/json")
                total = time.perf_counter() - t0
                if resp.status_code != 200:
                    raise RuntimeError(f"/v1/rank answered {resp.status_code}: {resp.get_data(as_text=True)[:300]}")
                if r < warm:
                    continue   # warm-up
                acc["encode"] = acc.get("encode", 0.0) - acc.get("forward", 0.0)
                for s in STAGES:
                    per[s].append(acc.get(s, 0.0))
                per["total"].append(total)
                per["other"].append(total - sum(acc.get(s, 0.0) for s in STAGES))
                per["overhead"].append(total - acc.get("encode", 0.0) - acc.get("forward", 0.0))
        finally:
            for k, v in saved.items():
                setattr(app_mod, k, v)
            scorer.close()
    return {s: statistics.median(v) for s, v in per.items()}


def stage_lines(stages: dict[str, float], candidates: int, repeats: int) -> list[str]:
    """The stage breakdown and the overhead line of :func:`stage_times`."""
    return [f"in-process stages (median ms per POST /v1/rank through the test client, {candidates} candidates, "
            f"{repeats} requests, 1 thread): " + "  ".join(f"{s} {stages[s] * 1e3:.2f}"
                                                         for s in STAGES + ("other", "total")),
            f"overhead        : {stages['overhead'] * 1e3:6.2f} ms per request (in-process request minus the model's "
            f"encode + forward, median over {repeats} requests at {candidates} candidates)   goal <= 3 ms"]


def main() -> None:
    from peers import NAMES as PEER_NAMES

    from ranking.quantize import QUANTIZE

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
    ap.add_argument("--repeats", type=int, default=100, help="requests timed in-process (stages and overhead)")
    ap.add_argument("--peers", nargs="+", choices=(*PEER_NAMES, "none"), default=list(PEER_NAMES),
                    help="also serve the LightGBM model with these model servers and compare: MLflow, LitServe, "
                         "Ray Serve, BentoML, each in its own venv bench/.peers/NAME (none: skip)")
    ap.add_argument("--peer-rate", type=float, default=30.0,
                    help="open-loop rate of the peer comparison (req/s; below every server's LightGBM capacity)")
    ap.add_argument("--feed", action="store_true", help="POST /v1/feed over the living world's corpus instead")
    ap.add_argument("--feed-rate", type=float, default=50.0, help="--feed: the open-loop rate (req/s)")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="serve --no-gc-freeze (and with --feed retrieval.gc_freeze false): the heap is not frozen "
                         "once the app is built and the corpus indexed (the comparison)")
    ap.add_argument("--student", action="store_true",
                    help="serve a student distilled from --model (conf/train/sim_student.yaml, trained into the "
                         "registry if missing) instead of --model itself; with --quantized int8 unless given")
    ap.add_argument("--quantized", choices=QUANTIZE, default=None,
                    help="serve the model's row-wise quantized tables (the variant is added to the registry if "
                         "missing; default none, int8 with --student)")
    ap.add_argument("--feed-impressions", type=int, default=300_000,
                    help="--feed: impressions of the living world simulated (the corpus: the items alive at the end)")
    args = ap.parse_args()
    for name in ("seconds", "rate", "peer_rate", "feed_rate"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("candidates", "concurrency", "workers", "repeats", "feed_impressions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if "none" in args.peers and len(args.peers) > 1:
        ap.error(f"--peers: none stands alone, got {' '.join(args.peers)}")
    args.peers = list(dict.fromkeys(p for p in args.peers if p != "none"))
    load_before = os.getloadavg()   # the machine is shared: report what else was running
    registry = Path(args.registry)
    ensure_model(registry, args.model)
    if args.student:
        args.model = ensure_student(registry, args.model)
    quantized = args.quantized or ("int8" if args.student else "none")
    ensure_variant(registry, args.model, quantized)
    if args.feed:
        run_feed(registry, args)
        return
    bodies = make_bodies(50, args.candidates, args.llm_share)
    if args.stages_only:
        for line in stage_lines(stage_times(registry, args.model, bodies, args.repeats, quantized), args.candidates,
                                args.repeats):
            print(line)
        print(f"load average    : before {' '.join(f'{x:.2f}' for x in load_before)}, after "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min; {os.cpu_count()} CPUs)")
        return

    with tempfile.TemporaryDirectory() as tmp:
        with stratarank_server(registry, args.model, args.workers, Path(tmp), gc_freeze=not args.no_gc_freeze,
                               quantized=quantized) as port:
            run_load(port, bodies, 2.0, 2)  # warm-up: both workers loaded and JIT-free paths hot
            seq, seq_err, _ = run_load(port, bodies, args.seconds / 3, 1)
            lat, errors, wall = run_load(port, bodies, args.seconds, args.concurrency)
            paced, paced_err, _ = run_load(port, bodies, args.seconds, 0, rate=args.rate)
        peers = compare_with_peers(registry, args, bodies, Path(tmp), args.peers) if args.peers else []

    predict_s, pandas_s, forward_s = bare_model_times(registry, args.model, bodies[0], 30, quantized)
    stages = stage_times(registry, args.model, bodies, args.repeats, quantized)
    lat_ms = np.array(lat) * 1e3
    server_s = statistics.median(seq)
    print(f"model: {args.model} ({'fp32' if quantized == 'none' else quantized + ' tables'})")
    print(f"requests: {args.candidates} candidates ({args.llm_share:.0%} LLM), {args.workers} gunicorn workers "
          f"(gc_freeze {not args.no_gc_freeze}), "
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
    for line in stage_lines(stages, args.candidates, args.repeats):
        print(line)
    for line in peers:
        print(line)
    print(f"load average    : before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
