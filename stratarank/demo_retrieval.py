"""``stratarank demo --scenario retrieval``: where a feed's candidates come from, as a closed-loop A/B test.

1. simulate a living world (``--world``, default ``conf/sim/living.yaml``: items born every simulated
   hour, expiring after ~3 days, young items more interesting, drifting interests) up to time T, two
   simulated hours before its end (the items born after T are the future the loop serves);
2. train the TorchRec ranker (with the LightGBM fallback) and the two-tower retrieval model on its logs;
3. start the scorer (gunicorn, 2 workers) with the two-tower model and a corpus on the embedded bus; write
   every item alive at T to the corpus (``POST /v1/items``) and the logs' feedback to ``/v1/events``, times
   moved to the wall clock (world time = wall time - a shift fixed so that the loop starts at T), and wait
   until both workers have indexed the corpus and applied the feedback;
4. rounds: the items born since the last round are written to the corpus (and indexed by both workers);
   every user requests a feed, concurrently: the arm (``conf/experiments/retrieval.yaml``, computed with the
   scorer's own assignment) picks the endpoint: ``generator`` users are ranked by ``POST /v1/rank`` over the
   world's own candidates (as many as a feed's pool, stripped to what a corpus candidate carries),
   ``own_retrieval`` users by ``POST /v1/feed`` over the engine's retrieval; the scorer's reported arm must
   equal the client's; the world answers in user order and the loop waits for both near-line threads;
5. analyse likes and clicks per user with CIs against the true lift (the world's true probabilities of the
   served slates), the share of impressions on fresh LLM items (younger than 24 h) per arm, latencies.

Not deterministic: the world's time follows the wall clock.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .demo import (MODEL, ROOT, LoopStats, Processes, analyse, experiment_lines, free_port, nearline_records,
                   post_events, say, scorer_client, service_yaml, simulate, train_models, wait_ready,
                   write_report)

WORLD = ROOT / "conf/sim/living.yaml"
FEATURES = ROOT / "conf/features/living.yaml"
TWO_TOWER = ROOT / "conf/train/two_tower_living.yaml"
EXPERIMENTS = ROOT / "conf/experiments/retrieval.yaml"
CONTROL, TREATMENT = "generator", "own_retrieval"
RESERVE_S = 2 * 3600.0      # the world's last hours: its births are written during the loop
FRESH_S = 24 * 3600.0       # a fresh LLM item is younger than this
CANDIDATE_FEATURES = ("age_hours", "text_len")   # what online.retrieval.candidate_of gives a corpus item


def train_retrieval(logs: Path, registry: Path, epochs: int | None) -> dict:
    """The two-tower model of ``conf/train/two_tower_living.yaml`` trained on ``logs`` and registered."""
    from ranking.two_tower import load_two_tower_config, register_two_tower, train_two_tower

    cfg = load_two_tower_config(TWO_TOWER)
    training = cfg.training if epochs is None else replace(cfg.training, epochs=epochs)
    cfg = replace(cfg, data=replace(cfg.data, path=str(logs)), registry=str(registry), training=training)
    trained = train_two_tower(cfg, log=lambda m: print("    " + m), progress=True)
    path = register_two_tower(cfg.registry, cfg.name, trained)
    recall = trained.metrics["held_out"]["two_tower"]
    print(f"    registered {cfg.name}@{path.name} (held-out " + ", ".join(
        f"{k} {v:.3f}" for k, v in recall.items() if v is not None) + ")")
    return {"name": cfg.name, "version": path.name, "recall": recall}


def stripped(candidate: dict) -> dict:
    """A world candidate cut to what a corpus candidate carries (``online.retrieval.candidate_of``), so
    the ranker sees the same kind of candidates in both arms."""
    out = {k: candidate[k] for k in ("item_id", "source", "creator_id", "topic", "text", "generator")
           if k in candidate}
    out["features"] = {k: candidate["features"][k] for k in CANDIDATE_FEATURES}
    return out


def corpus_head(corpus, seq: int = 0) -> int:
    """The corpus's last change number (an index that has synced up to it holds every write)."""
    while batch := corpus.changes_since(seq, limit=10_000):
        seq = batch[-1].seq
    return seq


def write_items(client, world, idx, shift: float) -> int:
    """The world's items ``idx`` written to the corpus with ``POST /v1/items``; returns the items accepted."""
    from tqdm import tqdm

    from online.client import ApiError
    from strategy.items import MAX_ITEMS

    writes = [world.corpus_item(int(i), shift) for i in idx]
    accepted = 0
    for start in tqdm(range(0, len(writes), MAX_ITEMS), desc="    corpus writes", unit="batch",
                      disable=len(writes) <= MAX_ITEMS):
        try:
            accepted += client.items(writes[start:start + MAX_ITEMS])["accepted"]
        except ApiError as exc:
            raise SystemExit(f"/v1/items answered {exc}") from None
    return accepted


def post_all(client, events: list, batch: int = 5000) -> int:
    """``events`` posted to ``/v1/events`` in batches (a request holds at most ``MAX_EVENTS``)."""
    return sum(post_events(client, events[s:s + batch]) for s in range(0, len(events), batch))


def wait_indexed(port: int, seq: int, workers: int = 2, timeout_s: float = 600.0) -> float:
    """Seconds until every worker's retrieval index has synced the corpus up to change ``seq``."""
    t0 = time.monotonic()
    seen: dict = {}
    while time.monotonic() - t0 < timeout_s:
        _, body = scorer_client(port).call("GET", "/readyz")
        status = body.get("retrieval") or {}
        if status.get("error"):
            raise SystemExit(f"the retrieval index of worker {body.get('worker')} failed: {status['error']}")
        if body.get("worker") is not None:
            seen[body["worker"]] = int(status.get("seq") or 0)
        if len(seen) >= workers and min(seen.values()) >= seq:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise SystemExit(f"the scorer workers did not index the corpus up to change {seq} within {timeout_s:.0f} s "
                     f"(synced {seen})")


@dataclass
class RetrievalStats(LoopStats):
    """The loop's figures per arm (and per endpoint: ``/v1/rank`` for the generator, ``/v1/feed``)."""

    arm_checks: int = 0
    latency: dict = field(default_factory=lambda: {CONTROL: [], TREATMENT: []})
    impressions: dict = field(default_factory=lambda: {CONTROL: 0, TREATMENT: 0})
    llm: dict = field(default_factory=lambda: {CONTROL: 0, TREATMENT: 0})
    fresh_llm: dict = field(default_factory=lambda: {CONTROL: 0, TREATMENT: 0})
    pool_sizes: list = field(default_factory=list)       # candidates of each feed
    retrieved_by: dict = field(default_factory=dict)     # source -> served feed items it found
    written: set = field(default_factory=set)            # items born during the loop, written to the corpus
    written_served: dict = field(default_factory=lambda: {CONTROL: 0, TREATMENT: 0})
    written_distinct: set = field(default_factory=set)
    backfill: int = 0
    control_candidates: int = 0


def arms(users: list[str]) -> dict[str, str]:
    """Each user's arm, by the assignment the scorer runs on the experiment config it loads."""
    from experiments.assignment import Assigner
    from experiments.config import load_experiments

    assigner = Assigner(load_experiments(EXPERIMENTS))
    out = {}
    for user in users:
        got = [a.variant for a in assigner.assign(user) if a.experiment == "retrieval"]
        if len(got) != 1:
            raise SystemExit(f"{EXPERIMENTS}: user {user} has no arm of the retrieval experiment")
        out[user] = got[0]
    return out


def closed_loop(world, port: int, corpus, seq: int, T: float, shift: float, args,
                stats: RetrievalStats) -> RetrievalStats:
    """``args.requests`` rounds: the items born since the last round (since T, the corpus's backfill, for
    the first) written and indexed; every user's feed from their arm's endpoint (concurrently); the
    world's feedback in user order; a near-line barrier."""
    from tqdm import tqdm

    from strategy.retrieval import DEFAULT_RETRIEVAL

    users = [f"u{k}" for k in range(min(args.users, world.config.n_users))]
    arm_of = arms(users)
    rngs = [np.random.default_rng([args.seed, k]) for k in range(len(users))]
    stats.control_candidates = DEFAULT_RETRIEVAL.max_candidates   # the generator gives as many as a feed's pool
    poster = scorer_client(port)
    local = threading.local()
    bar = tqdm(total=len(users) * args.requests, desc="    closed loop", unit="req", mininterval=0.5)
    baseline = nearline_records(port, 2)
    posted = 0
    last = T

    def call(path: str, body: dict):
        if not hasattr(local, "client"):
            local.client = scorer_client(port)
        t0 = time.perf_counter()
        status, resp = local.client.call("POST", path, body)
        bar.update(1)
        return status, resp, time.perf_counter() - t0

    with ThreadPoolExecutor(args.concurrency) as pool:
        for r in range(args.requests):
            now = time.time() - shift
            born = np.flatnonzero((world.item_born_ts > last) & (world.item_born_ts <= now))
            last = now
            if len(born):
                write_items(poster, world, born, shift)
                stats.written.update(world.item_ids[born])
                seq = corpus_head(corpus, seq)
                wait_indexed(port, seq)
            now = time.time() - shift
            requests = []
            for k, user in enumerate(users):
                body = {"request_id": f"retr-{args.seed}-{k}-{r}", "user_id": user}
                if arm_of[user] == CONTROL:
                    found = world.candidates(user, stats.control_candidates, rngs[k], ts=now)
                    body["candidates"] = [stripped(c) for c in found]
                requests.append(("/v1/rank" if arm_of[user] == CONTROL else "/v1/feed", body))
            answers = list(pool.map(lambda req: call(*req), requests))
            now = time.time() - shift   # the users answer now
            batch: list = []
            for k, (status, resp, latency) in enumerate(answers):
                user, arm = users[k], arm_of[users[k]]
                if status != 200:
                    stats.errors += 1
                    continue
                served_arm = [e["variant"] for e in resp["experiments"] if e["experiment"] == "retrieval"]
                if served_arm != [arm]:
                    raise SystemExit(f"user {user}: the scorer served arm {served_arm} but the client computed "
                                     f"{arm!r} ({EXPERIMENTS}): the client and the scorer assign differently")
                stats.arm_checks += 1
                stats.variant_of[user] = arm
                request_id = requests[k][1]["request_id"]
                slate = record(world, stats, arm, user, request_id, resp, now, latency)
                batch += [{**e, "ts": round(e["ts"] + shift, 3)}
                          for e in world.respond(user, slate, rngs[k], ts=now, request_id=request_id)]
            posted += post_all(poster, batch)
            # the scorer logged one impression per served item; the near-line threads apply those and the events
            nearline_records(port, 2, at_least={w: n + stats.served + posted for w, n in baseline.items()})
    bar.close()
    return stats


def record(world, stats: RetrievalStats, arm: str, user: str, request_id: str, resp: dict, ts: float,
           latency: float) -> list[str]:
    """One answer's figures: its slate's true expected likes and clicks, LLM and fresh LLM impressions,
    the feed's pool and sources; returns the slate."""
    slate = [item["item_id"] for item in resp["items"]]
    idx = world.item_index(slate)
    truth = world.true_probs([user] * len(slate), slate, np.arange(1, len(slate) + 1), ts=ts)
    stats.true_likes[user] = stats.true_likes.get(user, 0.0) + float(truth["like"].sum())
    stats.true_clicks[user] = stats.true_clicks.get(user, 0.0) + float(truth["click"].sum())
    llm = world.item_is_llm[idx]
    stats.slates[request_id] = slate
    stats.latencies.append(latency)
    stats.latency[arm].append(latency)
    stats.served += len(slate)
    stats.served_llm += int(llm.sum())
    stats.degraded += bool(resp.get("degraded"))
    stats.impressions[arm] += len(slate)
    stats.llm[arm] += int(llm.sum())
    stats.fresh_llm[arm] += int((llm & (ts - world.item_born_ts[idx] < FRESH_S)).sum())
    new = [i for i in slate if i in stats.written]
    stats.written_served[arm] += len(new)
    stats.written_distinct.update(new)
    if arm == TREATMENT:
        stats.pool_sizes.append(resp["retrieval"]["candidates"])
        for item in resp["items"]:
            for source in item["retrieved_by"]:
                stats.retrieved_by[source] = stats.retrieved_by.get(source, 0) + 1
    return slate


def backfill(world, port: int, logs: Path, T: float, shift: float, stats: RetrievalStats, corpus) -> int:
    """The corpus at T (every item alive then, by ``POST /v1/items``) and the logs' feedback (``/v1/events``),
    moved to the wall clock; waits until both workers have indexed the one and applied the other. Returns
    the corpus's last change number."""
    import pandas as pd

    client = scorer_client(port)
    before = nearline_records(port, 2)
    alive = np.flatnonzero((world.item_born_ts <= T) & (world.item_expires_ts > T))
    stats.backfill = write_items(client, world, alive, shift)
    events = pd.read_parquet(logs / "events.parquet")
    events = [{k: (v + shift if k == "ts" else v) for k, v in rec.items() if v == v}   # NaN value: absent
              for rec in events.to_dict("records")]
    posted = post_all(client, events)
    seq = corpus_head(corpus)
    seconds = wait_indexed(port, seq)
    nearline_records(port, 2, timeout_s=300, at_least={w: n + posted for w, n in before.items()})
    print(f"    corpus: {stats.backfill:,} items alive at T, indexed by both workers {seconds:.0f} s after the "
          f"writes; {posted:,} logged feedback events applied")
    return seq


def share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def latency_line(name: str, seconds: list) -> str:
    if not seconds:
        return f"latency {name} (client side): no requests"
    ms = np.asarray(seconds) * 1e3
    return (f"latency {name} (client side): p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms "
            f"over {len(ms):,} requests")


def summary_text(analysis: dict, stats: RetrievalStats, models: dict, wall: float) -> str:
    lines = experiment_lines(analysis, CONTROL, TREATMENT)
    sources = sorted(stats.retrieved_by.items(), key=lambda kv: -kv[1])
    fed = stats.impressions[TREATMENT]
    lines += [
        f"impressions on fresh LLM items (LLM, younger than 24 h): {CONTROL} "
        f"{share(stats.fresh_llm[CONTROL], stats.impressions[CONTROL])}, {TREATMENT} "
        f"{share(stats.fresh_llm[TREATMENT], fed)} (all LLM items: "
        f"{share(stats.llm[CONTROL], stats.impressions[CONTROL])}, {share(stats.llm[TREATMENT], fed)})",
        f"arms: the scorer's assignment equals the client's in all {stats.arm_checks:,} answers "
        f"({EXPERIMENTS.relative_to(ROOT)}, experiments/assignment.py)",
        f"{TREATMENT} feeds: {np.mean(stats.pool_sizes) if stats.pool_sizes else 0:.0f} candidates retrieved per feed "
        f"(the {CONTROL} arm ranks {stats.control_candidates} of the world's); served items found by "
        + ", ".join(f"{name} {share(n, fed)}" for name, n in sources),
        f"corpus: {stats.backfill:,} items alive at T, then {len(stats.written):,} born during the loop written by "
        f"POST /v1/items before each round (indexed by both workers); {len(stats.written_distinct):,} of those served "
        f"({CONTROL} {stats.written_served[CONTROL]:,}, {TREATMENT} {stats.written_served[TREATMENT]:,} impressions)",
        f"served: {stats.served:,} items in {len(stats.latencies):,} requests; degraded responses {stats.degraded}; "
        f"errors {stats.errors}",
        latency_line(f"/v1/feed, {TREATMENT}", stats.latency[TREATMENT]),
        latency_line(f"/v1/rank, {CONTROL}", stats.latency[CONTROL]),
        f"bus: {analysis['impressions']:,} impressions, {analysis['events']:,} feedback events (the logs' history "
        f"included), {analysis['exposures']:,} exposures",
        f"models: {MODEL}@{models['mmoe']['version']} (test AUC click "
        f"{models['mmoe']['metrics'].get('test', {}).get('click', {}).get('auc', float('nan')):.3f}), "
        f"{models['two_tower']['name']}@{models['two_tower']['version']} (held-out "
        + ", ".join(f"{k} {v:.3f}" for k, v in models["two_tower"]["recall"].items() if v is not None) + ")",
        f"wall time: {wall:.0f} s",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from online.corpus import Corpus, CorpusConfig
    from world import WorldConfig

    from strategy import ValidationError

    world_config = Path(args.world).resolve()
    try:
        wc = WorldConfig.from_yaml(world_config, n_users=args.users)
    except ValidationError as exc:
        print("\n".join(f"--world: {err}" for err in exc.errors), file=sys.stderr)
        return 2
    if not wc.living.enabled:
        print(f"--world {args.world}: the retrieval scenario needs a living world (living.enabled: true)",
              file=sys.stderr)
        return 2
    T = wc.start_ts + wc.duration_days * 86_400.0 - RESERVE_S
    if T <= wc.start_ts:
        print(f"--world {args.world}: duration_days must exceed {RESERVE_S / 3600:g} h (the loop's future)",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    registry = out / "registry"
    procs = Processes()
    t0 = time.perf_counter()
    try:
        say("1/5", f"simulating a living world ({world_config.name}) up to T, {RESERVE_S / 3600:g} simulated hours "
                   "before its end")
        world, logs = simulate(out, args.seed, args.impressions, args.users, config=world_config, until=T)
        say("2/5", "training the TorchRec ranker, the LightGBM fallback and the two-tower retrieval model")
        # one torch thread, like the two-tower trainer: the demo's machine may be shared
        models = train_models(logs, registry, args.epochs, features=FEATURES, threads=1)
        models["two_tower"] = train_retrieval(logs, registry, args.epochs)

        port = free_port()
        bus_url = f"embedded://{out / 'bus'}"
        corpus_path = out / "corpus.db"
        say("3/5", f"starting the scorer on http://127.0.0.1:{port} (2 workers, retrieval over {corpus_path.name}) "
                   f"on {bus_url}; writing the corpus at T and the logs' feedback")
        config = service_yaml(out, registry, bus_url, port, EXPERIMENTS, {
            "retrieval": {"model": models["two_tower"]["name"], "registry": str(registry)},
            "corpus": {"path": str(corpus_path), "synchronous": "normal"}})
        scorer_log = out / "scorer.log"
        scorer = procs.start([sys.executable, "-m", "stratarank.cli", "serve", "--config", str(config)], scorer_log)
        wait_ready(port, scorer, scorer_log)
        shift = time.time() - T     # world time = wall time - shift: the loop starts at T
        stats = RetrievalStats()
        corpus = Corpus(CorpusConfig(path=str(corpus_path)))
        seq = backfill(world, port, logs, T, shift, stats, corpus)

        say("4/5", f"closed-loop A/B test: {min(args.users, wc.n_users)} users x {args.requests} rounds; "
                   f"{CONTROL}: /v1/rank over the world's candidates, {TREATMENT}: /v1/feed over the corpus")
        stats = closed_loop(world, port, corpus, seq, T, shift, args, stats)
        corpus.close()
        procs.stop(only=scorer)     # its workers flush the bus on shutdown

        say("5/5", "analysing the experiment and writing the dashboard")
        analysis = analyse(out, bus_url, stats, EXPERIMENTS)
        report = write_report(out, summary_text(analysis, stats, models, time.perf_counter() - t0))
        print(f"\nwrote: dashboard {analysis['html']}\n       results {analysis['results']}/\n       report {report}"
              f"\n       models {registry}/  logs {logs}/  corpus {corpus_path}  scorer log {scorer_log}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the demo started", file=sys.stderr)
        return 130
    finally:
        procs.stop()
    return 0
