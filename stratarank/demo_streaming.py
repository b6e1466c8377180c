"""``stratarank demo --scenario streaming``: the loop served -> joined -> trained -> published -> served,
as a closed-loop A/B test on a living world.

1. simulate a living world (``conf/sim/living_stream.yaml``: new human and LLM items every simulated hour,
   items expiring after ~2 days, young items more interesting, drifting interests, trending topics);
2. train the TorchRec ranker on its first day's logs and register it twice: ``feed_mmoe`` (static) and
   ``feed_stream`` (the streaming trainer's starting point), plus the LightGBM fallback;
3. start the scorer (gunicorn, 2 workers, following the registry's ``current`` pointers), the joiner
   (``stratarank join``) and the streaming trainer (``stratarank train-stream``, republishing ``feed_stream``
   every few seconds) on the embedded bus;
4. serve the second simulated day, one round per simulated hour: every user requests a feed of the world's
   candidates at that hour; half the users (``conf/experiments/streaming.yaml``) are served by the static
   model, half by the streaming one; the world answers with feedback posted to ``/v1/events``; before the
   next hour, the joiner joins the hour and the trainer publishes a version that has trained on it;
5. analyse the experiment (likes and clicks per user with CIs against the world's true lift), the share of
   impressions on fresh LLM items per arm, and the freshness: from a feedback event to a serving version
   that has trained on it.

It is not deterministic (the trainer runs beside the loop, on wall-clock time); the A/B figures are.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from .demo import (FALLBACK, RISK, ROOT, Processes, free_port, post_events, read_bus, result_lines, say,
                   scorer_client, train_fallback, true_lift, wait_ready)

WORLD = ROOT / "conf/sim/living_stream.yaml"
FEATURES = ROOT / "conf/features/living.yaml"
TRAIN = ROOT / "conf/train/sim_mmoe.yaml"
STRATEGY = ROOT / "conf/objectives/feed.yaml"
EXPERIMENTS = ROOT / "conf/experiments/streaming.yaml"
STATIC, STREAM = "feed_mmoe", "feed_stream"
DAY = 86_400.0


def prepare(out: Path, args):
    """Steps 1-2: the world, its first day's logs, the day-1 ranker under both names, the fallback."""
    from ranking.artifacts import load_model, save_model
    from ranking.train import load_train_config, train_from_config
    from world import World

    world = World.from_yaml(WORLD, seed=args.seed, n_users=args.users)
    t0 = time.perf_counter()
    imp, _ = world.simulate_logs(args.impressions, progress=True)
    day1 = imp[imp["ts"] < world.config.start_ts + DAY].reset_index(drop=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    day1.to_parquet(logs / "impressions.parquet")
    print(f"    {len(day1):,} impressions of day 1 ({world.n_items_total:,} items over the two days) in "
          f"{time.perf_counter() - t0:.1f} s -> {logs}")
    base = load_train_config(TRAIN)
    training = base.training if args.epochs is None else replace(base.training, epochs=args.epochs)
    cfg = replace(base, name=STATIC, features=str(FEATURES), training=replace(training, max_rows=None),
                  data=replace(base.data, path=str(logs)))
    registry = out / "registry"
    summary = train_from_config(cfg, registry=str(registry), progress=True, log=lambda m: print("    " + m))
    loaded = load_model(registry, STATIC)
    save_model(registry, STREAM, loaded.module.state_dict(), loaded.encoder, cfg.model,
               loaded.objective_configs, loaded.metrics, data={"copy_of": f"{STATIC}@{loaded.version}"})
    train_fallback(logs, registry, [o.name for o in cfg.objectives])
    return world, registry, summary


def write_configs(out: Path, registry: Path, port: int, args) -> tuple[Path, Path]:
    bus = {"url": f"embedded://{out / 'bus'}", "fsync": "interval"}
    service = {
        "server": {"host": "127.0.0.1", "port": port, "workers": 2},
        "strategies": {"files": [str(STRATEGY)]},
        "experiments": {"file": str(EXPERIMENTS)},
        "model": {"registry": str(registry), "name": STATIC, "fallback": FALLBACK, "follow_current": True,
                  "poll_s": 0.3},
        "risk": str(RISK), "bus": bus, "store": {"url": "memory://", "half_life_s": 3600},
        "joiner": {"window_s": args.window, "grace_s": 0.5, "out": str(out / "joined"), "topic": "joined",
                   "objectives": str(STRATEGY), "flush_interval_s": 0.5},
    }
    stream = {
        "name": STREAM, "start_from": STREAM, "registry": str(registry), "bus": bus, "topic": "joined",
        "publish_interval_s": args.publish_interval, "checkpoint_interval_s": 30,
        "checkpoint": str(out / "stream" / "trainer.pt"), "keep_versions": 5,
        "training": {"batch_size": 256, "lr": 5e-4, "embedding_lr": 0.02, "max_wait_s": 0.5},
        "ids": {"item_id": {"capacity": 100_000, "min_count": 2, "ttl_s": 4 * DAY}},
        "guard": {"holdout_share": 0.05, "max_loss_increase": 0.05},
    }
    paths = out / "service.yaml", out / "stream.yaml"
    paths[0].write_text(json.dumps(service, indent=1))   # JSON is YAML
    paths[1].write_text(json.dumps(stream, indent=1))
    return paths


def stream_version(registry: Path) -> tuple[str | None, dict]:
    from ranking.registry import current_version

    version = current_version(registry, STREAM)
    if version is None:
        return None, {}
    try:
        return version, json.loads((registry / STREAM / version / "metrics.json").read_text())
    except (OSError, ValueError):
        return version, {}


def wait_for_training(port: int, registry: Path, joined_before: float, timeout_s: float) -> str | None:
    """Until a ``feed_stream`` version published after the joiner has emitted the hour (its window
    closes ``window_s`` after the hour's impressions) is served by both scorer workers."""
    deadline = time.monotonic() + timeout_s
    version = None
    while time.monotonic() < deadline:
        v, metrics = stream_version(registry)
        created = (registry / STREAM / v / "manifest.json").stat().st_mtime if v else 0
        if v and created > joined_before and metrics.get("stream", {}).get("freshness_s", {}).get("examples"):
            version = v
            break
        time.sleep(0.2)
    if version is None:
        return None
    seen: dict = {}   # worker -> the version number of feed_stream it serves (the trainer keeps publishing)
    while time.monotonic() < deadline:
        status, body = scorer_client(port).call("GET", "/readyz")
        served = (body.get("variant_models") or {}).get(STREAM) or f"{STREAM}@v0"
        seen[body.get("worker")] = int(served.rpartition("@v")[2])
        if len(seen) >= 2 and min(seen.values()) >= int(version[1:]):
            return version
        time.sleep(0.05)
    return None


def closed_loop(world, port: int, registry: Path, args) -> dict:
    """One round per simulated hour: every user requests a feed at that hour (concurrently) and answers
    it at once with the world's feedback (posted right after the slate, as a real client would, so the
    joiner's short window holds it); then wait until the streaming model that has trained on the hour
    is served by both workers."""
    import threading

    from tqdm import tqdm

    users = [f"u{k}" for k in range(min(args.users, world.config.n_users))]
    rngs = [np.random.default_rng([args.seed, k]) for k in range(len(users))]
    start = world.config.start_ts + DAY
    stats = {"latencies": [], "errors": 0, "variant": {}, "truth": {"like": {}, "click": {}},
             "fresh_llm": {}, "served": {}, "versions": [], "waits": [], "freshness": []}
    lock = threading.Lock()   # the world (its item counters, the users' random streams) is not thread-safe
    local = threading.local()

    def serve(k: int, ts: float, hour: int) -> None:
        if not hasattr(local, "client"):
            local.client = scorer_client(port)
        user = users[k]
        with lock:
            body = {"request_id": f"stream-{args.seed}-{k}-{hour}", "user_id": user,
                    "candidates": world.candidates(user, args.candidates, rngs[k], ts=ts)}
        t0 = time.perf_counter()
        status, resp = local.client.call("POST", "/v1/rank", body)
        latency = time.perf_counter() - t0
        if status != 200:
            with lock:
                stats["errors"] += 1
            return
        slate = [item["item_id"] for item in resp["items"]]
        clock = time.time() - ts   # feedback is stamped in wall time, like the exposure it follows
        with lock:
            events = world.respond(user, slate, rngs[k], ts=ts, request_id=body["request_id"])
            truth = world.true_probs([user] * len(slate), slate, np.arange(1, len(slate) + 1), ts)
            for name in ("like", "click"):
                stats["truth"][name][user] = stats["truth"][name].get(user, 0.0) + float(truth[name].sum())
            variant = next((e["variant"] for e in resp["experiments"]), None)
            stats["variant"][user] = variant
            idx = world.item_index(slate)
            fresh = (world.item_born_ts[idx] > world.config.start_ts + DAY) & world.item_is_llm[idx]
            stats["fresh_llm"][variant] = stats["fresh_llm"].get(variant, 0) + int(fresh.sum())
            stats["served"][variant] = stats["served"].get(variant, 0) + len(slate)
            stats["latencies"].append(latency)
        for event in events:
            event["ts"] = round(event["ts"] + clock, 3)
        post_events(local.client, events)

    with ThreadPoolExecutor(args.concurrency) as pool:
        for hour in tqdm(range(args.hours), desc="    simulated hours", unit="h"):
            ts = start + (hour + 0.5) * 3600.0
            list(pool.map(lambda k: serve(k, ts, hour), range(len(users))))
            posted = time.time()
            if hour + 1 < args.hours:
                version = wait_for_training(port, registry, posted + args.window, timeout_s=60)
                stats["versions"].append(version)
                stats["waits"].append(time.time() - posted)
                if version is not None:   # read now: the registry keeps only the last few versions
                    stats["freshness"].append(stream_version(registry)[1].get("stream", {}).get("freshness_s", {}))
    return stats


def freshness(stats: dict) -> dict:
    """Over the versions served each hour: how old their newest feedback was when they were published
    (publish time - the feedback event's publish time; each version's p99 and max)."""
    rows = [f for f in stats["freshness"] if f.get("examples")]
    if not rows:
        return {}
    return {"versions": len(rows), "p99_max": max(r["p99"] for r in rows),
            "p99_median": float(np.median([r["p99"] for r in rows])), "max": max(r["max"] for r in rows)}


def run(args) -> int:
    from experiments.config import load_experiments
    from experiments.dashboard import build_results, write_results, write_static_html

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    procs = Processes()
    t0 = time.perf_counter()
    try:
        say("1/5", f"simulating a living world ({WORLD.relative_to(ROOT)}) and training on its first day")
        world, registry, summary = prepare(out, args)
        port = free_port()
        service, stream = write_configs(out, registry, port, args)
        say("2/5", f"starting the scorer (http://127.0.0.1:{port}, 2 workers following the registry), the joiner "
                   "and the streaming trainer")
        cli = [sys.executable, "-m", "stratarank.cli"]
        scorer = procs.start(cli + ["serve", "--config", str(service)], out / "scorer.log")
        wait_ready(port, scorer, out / "scorer.log")
        procs.start(cli + ["join", "--config", str(service)], out / "joiner.log")
        trainer = procs.start(cli + ["train-stream", "--config", str(stream)], out / "trainer.log")

        say("3/5", f"closed-loop A/B on the second day: {args.users} users x {args.hours} simulated hours, "
                   f"static {STATIC}@v1 vs streaming {STREAM} (republished every {args.publish_interval:g} s)")
        stats = closed_loop(world, port, registry, args)
        procs.stop(only=trainer)
        procs.stop()

        say("4/5", "analysing the experiment")
        exposures, events, n_impressions = read_bus(f"embedded://{out / 'bus'}")
        config = load_experiments(EXPERIMENTS)
        bundle = build_results(config, exposures, events)
        write_results(out / "results", bundle)
        html = write_static_html(out / "results", out / "dashboard.html")
        experiment = config.experiments[0]
        truth = {"likes_per_user": true_lift(stats["variant"], stats["truth"]["like"], "static", "streaming"),
                 "clicks_per_user": true_lift(stats["variant"], stats["truth"]["click"], "static", "streaming")}
        say("5/5", "summary")
        text = summary_text(bundle["records"], truth, stats, freshness(stats), experiment,
                            time.perf_counter() - t0, n_impressions)
        (out / "report.txt").write_text(text + "\n")
        print(text)
        print(f"\nwrote: dashboard {html}\n       report {out / 'report.txt'}\n       joined examples "
              f"{out / 'joined'}/  models {registry}/  logs of the scorer, joiner and trainer in {out}/")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the demo started", file=sys.stderr)
        return 130
    finally:
        procs.stop()
    return 0


def summary_text(records, truth, stats, fresh, experiment, wall: float, n_impressions: int) -> str:
    lines = ["", "=" * 100, f"Closed-loop A/B test {experiment.name}: streaming vs static ({experiment.description})",
             "=" * 100, *result_lines(records, truth, "static", "streaming")]
    share = {v: stats["fresh_llm"].get(v, 0) / max(stats["served"].get(v, 0), 1) for v in ("static", "streaming")}
    lat = np.array(stats["latencies"]) * 1e3
    waits = [w for w in stats["waits"] if w is not None]
    lines += [
        "",
        f"impressions on fresh LLM items (born on day 2): static {share['static']:.1%}, streaming "
        f"{share['streaming']:.1%}",
        f"served: {int(sum(stats['served'].values())):,} items in {len(stats['latencies']):,} requests; errors "
        f"{stats['errors']}; bus: {n_impressions:,} impressions",
        f"streaming model: {sum(v is not None for v in stats['versions'])} of {len(stats['versions'])} hours served "
        f"a version trained on the hour before; waiting for it took {np.median(waits) if waits else float('nan'):.1f} s"
        " (median)",
    ]
    if fresh:
        lines.append(f"freshness (a feedback event -> a published version trained on it, per version p99): median "
                     f"{fresh['p99_median']:.1f} s, worst {fresh['p99_max']:.1f} s over {fresh['versions']} versions "
                     f"(goal: p99 <= 120 s; the scorer serves a version within its poll of 0.3 s)")
    lines += [f"latency /v1/rank (client side): p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms",
              f"wall time: {wall:.0f} s"]
    return "\n".join(lines)
