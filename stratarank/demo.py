"""``stratarank demo``: the whole engine in a closed loop, on embedded defaults, in a few minutes.

1. simulate the feed world's logs; 2. train the TorchRec multi-task ranker and the LightGBM
fallback and register them; 3. start the scorer (gunicorn, 2 workers; each worker follows the
bus with a near-line thread into its real-time feature store) on the embedded bus, or on the
Kafka-compatible broker with ``--kafka``; 4. run a closed-loop A/B test: simulated users request
feeds whose candidates mix retrieved and LLM-generated items, the world answers with feedback
posted to ``/v1/events``; 5. analyse it, write the dashboard and a report, print a summary.

Deterministic with ``--seed``: the loop runs in rounds (every user requests once, concurrently;
the world answers in user order; then it waits until both workers' near-line threads have applied
everything), so a request sees exactly the feedback of earlier rounds whichever worker serves it.
The summary prints a digest of all served slates to compare runs by; timestamps and latencies
are wall-clock and differ. Every process it starts is stopped on exit, Ctrl-C included.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from online.client import ApiError, Client

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "conf/sim/default.yaml"
TRAIN_CONFIG = ROOT / "conf/train/sim_mmoe.yaml"
STRATEGY = ROOT / "conf/objectives/feed.yaml"
EXPERIMENTS = ROOT / "conf/experiments/demo.yaml"
RISK = ROOT / "conf/risk.yaml"
MODEL, FALLBACK = "feed_mmoe", "feed_lgbm"
# LightGBM fallback features: only what a request carries, so it can score any candidate online
FALLBACK_COLUMNS = ("prior_score", "duration", "creator_followers", "text_len", "is_llm")


def say(step: str, text: str) -> None:
    print(f"\n[{step}] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The child processes of the demo; all are terminated on exit (and on Ctrl-C)."""

    def __init__(self):
        self.children: list[subprocess.Popen] = []

    def start(self, args, log_path: Path, env=None) -> subprocess.Popen:
        log = open(log_path, "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        self.children.append(proc)
        return proc

    def stop(self, only: subprocess.Popen | None = None) -> None:
        """Terminate ``only`` (or every child), newest first, and wait for them."""
        procs = [only] if only is not None else list(reversed(self.children))
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            self.children.remove(proc)


# ---------------------------------------------------------------- steps 1-2: data and models


def simulate(out: Path, seed: int, impressions: int | None, users: int, config: Path = SIM_CONFIG,
             until: float | None = None):
    """The world of ``config`` and its logs in ``out/logs``; ``until``: only what happened before that
    world time (a living world's items born later are the future the closed loop serves)."""
    from world import World

    world = World.from_yaml(config, seed=seed, n_users=users)
    t0 = time.perf_counter()
    imp, ev = world.simulate_logs(impressions, progress=True)
    if until is not None:
        imp, ev = imp[imp["ts"] < until].reset_index(drop=True), ev[ev["ts"] < until].reset_index(drop=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    imp.to_parquet(logs / "impressions.parquet")
    ev.to_parquet(logs / "events.parquet")
    print(f"    {len(imp):,} impressions, {len(ev):,} feedback events in {time.perf_counter() - t0:.1f} s -> {logs}")
    return world, logs


def frame_digest(frame) -> str:
    """sha256 of a data frame's columns as Arrow IPC without schema metadata (not of its Parquet file,
    whose bytes name the writer's version)."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def weights_digest(version_dir) -> str:
    """sha256 of a registered ranker's trained tensors (names, shapes, values), not of the file."""
    import torch

    state = torch.load(Path(version_dir) / "weights.pt", map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def train_models(logs: Path, registry: Path, epochs: int | None, features: Path | None = None,
                 threads: int | None = None) -> dict:
    """The TorchRec ranker (``features``: its feature spec; ``threads``: torch's; default the train
    config's) and the fallback."""
    import pandas as pd

    from ranking.train import load_train_config, train_from_config

    cfg = load_train_config(TRAIN_CONFIG)
    training = cfg.training if epochs is None else replace(cfg.training, epochs=epochs)
    training = training if threads is None else replace(training, threads=threads)
    cfg = replace(cfg, name=MODEL, data=replace(cfg.data, path=str(logs)), training=training)
    if features is not None:
        cfg = replace(cfg, features=str(features))
    summary = train_from_config(cfg, registry=str(registry), progress=True, log=lambda m: print("    " + m))
    fallback = train_fallback(logs, registry, [o.name for o in cfg.objectives])
    logs_digest = frame_digest(pd.read_parquet(logs / "impressions.parquet"))
    return {"mmoe": summary, "lightgbm": fallback, "logs_digest": logs_digest}


def train_fallback(logs: Path, registry: Path, objectives) -> dict:
    from ranking.datasets import load_sim_logs
    from ranking.artifacts import register_lgbm
    from ranking.lgbm import LGBMMultiObjective
    from ranking.metrics import auc

    data = load_sim_logs(logs)
    types = {name: data.objective_types.get(name, "binary") for name in objectives}
    train = data.train.sample(n=min(len(data.train), 200_000), random_state=0)  # a fallback: fast beats best
    model = LGBMMultiObjective(types, num_boost_round=150).fit(train, FALLBACK_COLUMNS, data.valid)
    pred = model.predict(data.test)
    metrics = {"test": {name: {"auc": float(auc(data.test[name].to_numpy() > 0, pred[:, k]))}
                        for k, name in enumerate(model.objectives) if types[name] == "binary"}}
    path = register_lgbm(registry, FALLBACK, model, metrics)
    print(f"    registered {FALLBACK}@{path.name} (LightGBM on request-time features; test AUC "
          + ", ".join(f"{k} {v['auc']:.3f}" for k, v in metrics["test"].items()) + ")")
    return {"version": path.name, "metrics": metrics}


# ---------------------------------------------------------------- step 3: services


def service_yaml(out: Path, registry: Path, bus_url: str, port: int, experiments: Path = EXPERIMENTS,
                 sections: dict | None = None) -> Path:
    """The scorer's config in ``out/service.yaml``; ``sections`` adds (or replaces) top-level sections."""
    config = {
        "server": {"host": "127.0.0.1", "port": port, "workers": 2},
        "strategies": {"files": [str(STRATEGY)]},
        "experiments": {"file": str(experiments)},
        "model": {"registry": str(registry), "name": MODEL, "fallback": FALLBACK},
        "risk": str(RISK),
        "bus": {"url": bus_url, "fsync": "interval"},
        "store": {"url": "memory://", "half_life_s": 3600},
        **(sections or {}),
    }
    path = out / "service.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the scorer exited ({proc.returncode}); see {log}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the scorer was not ready after {timeout_s:.0f} s; see {log}")


# ---------------------------------------------------------------- step 4: the closed loop


@dataclass
class LoopStats:
    latencies: list = field(default_factory=list)
    served: int = 0
    served_llm: int = 0
    errors: int = 0
    degraded: int = 0
    variant_of: dict = field(default_factory=dict)
    true_likes: dict = field(default_factory=dict)  # user -> expected likes under the world's truth
    true_clicks: dict = field(default_factory=dict)
    slates: dict = field(default_factory=dict)      # request_id -> served item ids (for the digest)

    def digest(self) -> str:
        """sha256 of every served slate: equal digests mean two runs served exactly the same feeds."""
        h = hashlib.sha256()
        for rid in sorted(self.slates):
            h.update(f"{rid}:{','.join(self.slates[rid])}\n".encode())
        return h.hexdigest()[:16]


def scorer_client(port: int) -> Client:
    """The typed client of the local scorer, one per thread (its connection is kept alive)."""
    return Client(f"http://127.0.0.1:{port}", timeout_s=30, retries=1)


def nearline_records(port: int, workers: int, timeout_s: float = 60.0, at_least: dict | None = None) -> dict:
    """``{worker pid: records its near-line thread has applied}`` for every scorer worker, read from
    ``/readyz`` over fresh connections (each may land on another worker). With ``at_least``, waits
    until every worker has reached its figure: the barrier that makes the closed loop deterministic."""
    seen: dict = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = scorer_client(port).call("GET", "/readyz")
        near = body.get("nearline") or {}
        if near.get("error"):
            raise SystemExit(f"the near-line thread of worker {body.get('worker')} failed: {near['error']}")
        if body.get("worker") is not None and near.get("records") is not None:
            seen[body["worker"]] = max(seen.get(body["worker"], 0), int(near["records"]))
        if len(seen) >= workers and all(seen[w] >= (at_least or {}).get(w, 0) for w in seen):
            return seen
        time.sleep(0.01)
    raise SystemExit(f"the scorer workers' near-line threads did not catch up within {timeout_s:.0f} s "
                     f"(records applied {seen}, waiting for {at_least})")


def post_events(client: Client, events: list) -> int:
    try:
        return client.events(events)
    except ApiError as exc:
        raise SystemExit(f"/v1/events answered {exc}") from None


def closed_loop(world, port: int, users: int, requests_per_user: int, candidates: int, seed: int,
                concurrency: int, workers: int = 2) -> LoopStats:
    """Rounds of one feed request per user (concurrent), then the world's feedback (posted in user
    order), then a barrier until every worker's near-line thread has applied all of it: each
    request sees exactly the feedback of the rounds before it, whichever worker serves it, so a
    seed gives the same slates run after run (``LoopStats.digest``)."""
    from tqdm import tqdm

    stats = LoopStats()
    user_ids = [f"u{k}" for k in range(min(users, world.config.n_users))]
    rngs = [np.random.default_rng([seed, k]) for k in range(len(user_ids))]
    bar = tqdm(total=len(user_ids) * requests_per_user, desc="    closed loop", unit="req", mininterval=0.5)
    baseline = nearline_records(port, workers)  # a reused broker may hold older records
    published = 0
    local = threading.local()  # one keep-alive connection per pool thread

    def rank(k: int, body: dict):
        if not hasattr(local, "client"):
            local.client = scorer_client(port)
        t0 = time.perf_counter()
        status, resp = local.client.call("POST", "/v1/rank", body)
        bar.update(1)
        return status, resp, time.perf_counter() - t0

    poster = scorer_client(port)
    with ThreadPoolExecutor(concurrency) as pool:
        for r in range(requests_per_user):
            # the world is read and advanced in user order (candidates carry its impression counts);
            # only the scorer calls run concurrently
            bodies = [{"request_id": f"demo-{seed}-{k}-{r}", "user_id": user,
                       "candidates": world.candidates(user, candidates, rngs[k])} for k, user in enumerate(user_ids)]
            answers = list(pool.map(rank, range(len(user_ids)), bodies))
            batch: list = []
            for k, (status, resp, latency) in enumerate(answers):
                if status != 200:
                    stats.errors += 1
                    continue
                user, request_id = user_ids[k], bodies[k]["request_id"]
                slate = [item["item_id"] for item in resp["items"]]
                batch += world.respond(user, slate, rngs[k], ts=time.time(), request_id=request_id)
                truth = world.true_probs([user] * len(slate), slate, np.arange(1, len(slate) + 1))
                stats.latencies.append(latency)
                stats.slates[request_id] = slate
                stats.served += len(slate)
                stats.served_llm += sum(item["source"] == "llm" for item in resp["items"])
                stats.degraded += bool(resp.get("degraded"))
                for exp in resp["experiments"]:
                    stats.variant_of[user] = exp["variant"]
                stats.true_likes[user] = stats.true_likes.get(user, 0.0) + float(truth["like"].sum())
                stats.true_clicks[user] = stats.true_clicks.get(user, 0.0) + float(truth["click"].sum())
                published += len(slate)  # the scorer logged one impression per served item
                if len(batch) >= 2000:
                    published += post_events(poster, batch)
                    batch = []
            published += post_events(poster, batch)
            nearline_records(port, workers, at_least={w: n + published for w, n in baseline.items()})
    bar.close()
    return stats


# ---------------------------------------------------------------- step 5: analysis


def read_bus(bus_url: str):
    """Exposures and events (impressions included, as ``impression`` events) from the bus."""
    import pandas as pd

    from online.bus import open_bus

    bus = open_bus(bus_url)
    consumer = bus.consumer(f"demo-analysis-{os.getpid()}", ["exposures", "events", "impressions"])
    rows = {"exposures": [], "events": [], "impressions": []}
    idle, seen, give_up = 0, 0, time.monotonic() + 60  # a Kafka group join alone takes ~5 s
    while idle < 3 and not (seen == 0 and time.monotonic() > give_up):
        batch = consumer.poll(50_000, 1.0)
        seen += len(batch)
        idle = idle + 1 if not batch and seen else 0
        for rec in batch:
            rows[rec.topic].append(rec.value)
    consumer.close()
    bus.close()
    exposures = pd.DataFrame(rows["exposures"], columns=["user_id", "layer", "experiment", "variant", "ts"])
    impressions = pd.DataFrame([{"event_id": f"imp:{r['request_id']}:{r['item_id']}", "ts": r["ts"],
                                 "type": "impression", "user_id": r["user_id"], "item_id": r["item_id"],
                                 "request_id": r["request_id"], "value": None} for r in rows["impressions"]])
    events = pd.DataFrame(rows["events"])
    columns = ["event_id", "ts", "type", "user_id", "item_id", "request_id", "value"]
    events = pd.concat([events.reindex(columns=columns), impressions.reindex(columns=columns)], ignore_index=True)
    events["value"] = pd.to_numeric(events["value"], errors="coerce")
    # the bus interleaves concurrent requests' records differently run to run: a canonical row order
    # makes the analysis' floating-point sums, and so its figures, identical for the same seed
    exposures = exposures.sort_values(["user_id", "experiment", "variant", "ts"], ignore_index=True, kind="stable")
    events = events.sort_values("event_id", ignore_index=True, kind="stable")
    return exposures, events, len(rows["impressions"])


def true_lift(variant_of: dict, values: dict, control: str, treatment: str) -> float | None:
    """Relative lift of the arms' expected values (``values``: user -> expected total under the world's
    true probabilities; ``variant_of``: user -> arm)."""
    arms = {control: [], treatment: []}
    for user, variant in variant_of.items():
        if variant in arms:
            arms[variant].append(values.get(user, 0.0))
    if not arms[control] or not arms[treatment] or np.mean(arms[control]) == 0:
        return None
    return float(np.mean(arms[treatment]) / np.mean(arms[control]) - 1.0)


def analyse(out: Path, bus_url: str, stats: LoopStats, experiments: Path = EXPERIMENTS) -> dict:
    """The experiment of ``experiments`` analysed on the bus's exposures and events, its dashboard
    written, with the true lifts of likes and clicks per user."""
    from experiments.config import load_experiments
    from experiments.dashboard import build_results, write_results, write_static_html

    exposures, events, n_impressions = read_bus(bus_url)
    config = load_experiments(experiments)
    bundle = build_results(config, exposures, events)
    results = out / "results"
    write_results(results, bundle)
    html = write_static_html(results, out / "dashboard.html")
    experiment = config.experiments[0]
    treatment = next(v.name for v in experiment.variants if v.name != experiment.control)
    truth = {"likes_per_user": true_lift(stats.variant_of, stats.true_likes, experiment.control, treatment),
             "clicks_per_user": true_lift(stats.variant_of, stats.true_clicks, experiment.control, treatment)}
    title = f"{experiment.name}: {treatment} vs {experiment.control} ({experiment.description})"
    return {"records": bundle["records"], "results": results, "html": html, "truth": truth, "title": title,
            "arms": (experiment.control, treatment),
            "exposures": len(exposures), "events": len(events) - n_impressions, "impressions": n_impressions}


def write_report(out: Path, text: str) -> Path:
    """Print the summary ``text`` and write it to ``out/report.txt``; returns that path."""
    report = out / "report.txt"
    report.write_text(text.lstrip() + "\n")
    print(text)
    return report


def pct(x) -> str:
    return "   n/a" if x is None else f"{x * 100:+6.2f}%"


def num(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def result_lines(records, truth: dict, control: str, treatment: str) -> list[str]:
    """The A/B table: a row per metric (means, relative lift with its CI, p-value, the world's true
    lift where known, a verdict and whether the CI covers the truth)."""
    wc, wt = max(10, len(control) + 2), max(11, len(treatment) + 2)   # the arms' columns fit their names
    lines = [f"{'metric':<18}{'role':<10}{control:>{wc}}{treatment:>{wt}}{'rel. lift':>11}{'95% CI (rel.)':>22}"
             f"{'p-value':>9}  {'true lift':>9}  verdict"]
    for r in records:
        ci = f"[{pct(r['rel_ci_low']).strip()}, {pct(r['rel_ci_high']).strip()}]" if r["rel_ci_low"] is not None else "n/a"
        true = truth.get(r["metric"])
        if r["role"] == "guardrail":
            verdict = (r.get("guardrail") or "n/a").upper()
        elif r.get("error"):
            verdict = f"n/a ({r['error']})"
        elif r["p_value"] is not None and r["p_value"] < 0.05:
            verdict = "better" if r["abs_lift"] > 0 else "worse"
        else:
            verdict = "not significant"
        if true is not None and r["rel_ci_low"] is not None:
            verdict += "; CI covers truth" if r["rel_ci_low"] <= true <= r["rel_ci_high"] else "; CI MISSES truth"
        lines.append(f"{r['metric']:<18}{r['role']:<10}{num(r['control_mean'], '.4g'):>{wc}}"
                     f"{num(r['treatment_mean'], '.4g'):>{wt}}{pct(r['rel_lift']):>11}{ci:>22}"
                     f"{num(r['p_value'], '.4f'):>9}  {pct(true):>9}  {verdict}")
    return lines


def experiment_lines(analysis: dict, control: str = "control", treatment: str = "treatment") -> list[str]:
    """The title, the A/B table and the users per arm with the sample-ratio test (column titles
    ``control`` and ``treatment``)."""
    first = analysis["records"][0] if analysis["records"] else {}
    srm = first.get("srm_p")
    return ["", "=" * 100, "Closed-loop A/B test " + analysis["title"], "=" * 100,
            *result_lines(analysis["records"], analysis["truth"], control, treatment), "",
            f"users: {control} {first.get('control_users')}, {treatment} {first.get('users')}; SRM p = "
            f"{num(srm, '.3f')}" + ("  ** SRM ALARM **" if first.get("srm_alarm") else " (no sample-ratio mismatch)")]


def summary_text(analysis: dict, stats: LoopStats, models: dict, wall: float) -> str:
    lines = experiment_lines(analysis)
    lat = np.array(stats.latencies) * 1e3
    lines += [
        f"served: {stats.served:,} items in {len(stats.latencies):,} requests; LLM-generated share "
        f"{stats.served_llm / max(stats.served, 1):.1%}; degraded responses {stats.degraded}; errors {stats.errors}",
        f"served slates digest: {stats.digest()} (the same seed serves the same slates: rerun to compare)",
        f"inputs of the slates: world logs digest {models['logs_digest']}, {MODEL} weights digest "
        f"{weights_digest(models['mmoe']['path'])} (equal inputs and unequal slates: the serving side differs)",
        f"latency /v1/rank (client side): p50 {np.percentile(lat, 50):.1f} ms, p95 {np.percentile(lat, 95):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms",
        f"bus: {analysis['impressions']:,} impressions, {analysis['events']:,} feedback events, "
        f"{analysis['exposures']:,} exposures",
        "models: " + ", ".join(
            f"{MODEL}@{models['mmoe']['version']} (test AUC click "
            f"{models['mmoe']['metrics'].get('test', {}).get('click', {}).get('auc', float('nan')):.3f})".split(", ")
        ) + f", {FALLBACK}@{models['lightgbm']['version']} (fallback)",
        f"wall time: {wall:.0f} s",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def run(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    registry = out / "registry"
    procs = Processes()
    t0 = time.perf_counter()
    try:
        say("1/5", "simulating the feed world (conf/sim/default.yaml)")
        world, logs = simulate(out, args.seed, args.impressions, args.users)
        say("2/5", "training the TorchRec MMoE ranker and the LightGBM fallback")
        models = train_models(logs, registry, args.epochs)

        if args.kafka is not None:
            from online.broker import start_broker

            address = args.kafka
            if not address:
                address = start_broker(procs, out / "broker.log")
                print(f"    started the Kafka-compatible broker (Tansu) at {address}")
            bus_url = f"kafka://{address}"
        else:
            shutil.rmtree(out / "bus", ignore_errors=True)  # a rerun into the same folder starts a fresh log
            bus_url = f"embedded://{out / 'bus'}"
        port = free_port()
        say("3/5", f"starting the scorer on http://127.0.0.1:{port} (2 workers, near-line threads) on {bus_url}")
        config = service_yaml(out, registry, bus_url, port)
        scorer_log = out / "scorer.log"
        scorer = procs.start([sys.executable, "-m", "stratarank.cli", "serve", "--config", str(config)], scorer_log)
        wait_ready(port, scorer, scorer_log)

        say("4/5", f"closed-loop A/B test: {args.users} users x {args.requests} requests, "
                   f"{args.candidates} candidates each (retrieved + LLM-generated)")
        stats = closed_loop(world, port, args.users, args.requests, args.candidates, args.seed, args.concurrency)
        procs.stop(only=scorer)  # its workers flush the bus on shutdown; a broker keeps running for step 5

        say("5/5", "analysing the experiment and writing the dashboard")
        analysis = analyse(out, bus_url, stats)
        report = write_report(out, summary_text(analysis, stats, models, time.perf_counter() - t0))
        print(f"\nwrote: dashboard {analysis['html']}\n       results {analysis['results']}/\n       report {report}"
              f"\n       models {registry}/  logs {logs}/  scorer log {scorer_log}")
        print(f"browse: .venv/bin/stratarank dashboard --results {analysis['results']}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the demo started", file=sys.stderr)
        return 130
    finally:
        procs.stop()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole engine in a closed loop and show what an experiment did")
    p.add_argument("--out", default="runs/demo", help="folder for logs, models, bus, results (default runs/demo)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--impressions", type=int, default=400_000,
                   help="simulated log size (default 400k: the demo trains in about a minute)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the train config's)")
    # users vary far more than one user's requests: power comes from many users, each seen a few times
    p.add_argument("--users", type=int, default=4000, help="simulated users (the world is built with as many)")
    p.add_argument("--requests", type=int, default=4, help="feed requests per user")
    p.add_argument("--candidates", type=int, default=100,
                   help="candidates per request (the retrieval scenario's generator gives as many as a feed's "
                        "pool, 400)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kafka", nargs="?", const="", default=None, metavar="HOST:PORT",
                   help="use the Kafka-compatible bus (starts a broker when no address is given)")
    p.add_argument("--scenario", choices=("ab", "streaming", "retrieval"), default="ab",
                   help="ab: the strategy A/B test (default); streaming: a static vs a streaming-updated model on a "
                        "living world (served -> joined -> trained -> published -> served; "
                        "stratarank/demo_streaming.py); retrieval: the world's candidate generator vs the engine's own "
                        "retrieval (POST /v1/feed) on a living world (stratarank/demo_retrieval.py)")
    s = p.add_argument_group("--scenario streaming")
    s.add_argument("--hours", type=int, default=12, help="simulated hours of the second day served (default 12)")
    s.add_argument("--window", type=float, default=3.0, help="the joiner's attribution window, seconds (default 3)")
    s.add_argument("--publish-interval", type=float, default=5.0,
                   help="the streaming trainer's publish interval, seconds (default 5)")
    r = p.add_argument_group("--scenario retrieval")
    r.add_argument("--world", default=str(ROOT / "conf/sim/living.yaml"),
                   help="the living world's config (default conf/sim/living.yaml; --users sets its users)")
    p.set_defaults(func=_run_scenario)


def _run_scenario(args) -> int:
    for flag, value in (("--users", args.users), ("--requests", args.requests), ("--candidates", args.candidates),
                        ("--hours", args.hours),
                        ("--concurrency", args.concurrency)):
        if value < 1:
            print(f"{flag}: must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.scenario == "streaming":
        if args.kafka is not None:
            print("--kafka: the streaming scenario runs on the embedded bus", file=sys.stderr)
            return 2
        from .demo_streaming import run as run_streaming

        return run_streaming(args)
    if args.scenario == "retrieval":
        if args.kafka is not None:
            print("--kafka: the retrieval scenario runs on the embedded bus", file=sys.stderr)
            return 2
        from .demo_retrieval import run as run_retrieval

        return run_retrieval(args)
    return run(args)
