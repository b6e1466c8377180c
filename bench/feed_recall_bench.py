"""Feed retrieval quality on the living world: recall of each candidate source and of their blend.

The living world (``--world``, default conf/sim/living.yaml: ~100k items alive at a time, 10k users)
is simulated for ``--impressions``; a two-tower model is trained on those logs
(``--train-config``, default conf/train/two_tower_living.yaml, or ``--model`` from ``--registry``);
at the end of the logs (time T) the corpus holds every item alive at T, the near-line store has
applied every logged event, and the retriever (``online.retrieval.Retriever``) has indexed the corpus.

For ``--users`` users who engaged at least once: the oracle is the ``--top`` items the world's truth
ranks highest for the user at T (P(click) at the top position, over every alive item); recall@K is the
share of them in a pool of K items (``--k``, default 500). Rows: each source alone (its count K), the
blend (the default ``retrieval:`` section scaled to K), popularity (the alive items with the most logged
clicks) and the world's own candidate generator (``World.candidates``: its topic-personalised draws).
Goal: blend >= 0.5, above popularity and the world's generator. Never fails on a figure.

Information ceilings (extra rows, not sources; ``--no-ceiling`` skips them): the K alive items an
oracle-style score built from knowable parts ranks highest: the user's topic affinity + knowable quality
(human: the creator's quality; LLM: the mean quality of the alive items of its generator and prior-score
bin) + freshness + harm, with the world's effect weights. ``ceiling: true affinity`` takes the user's
true affinity at T (a perfect user model), ``ceiling: clicks`` estimates it from the user's logged clicks
per topic, ``ceiling: exposure`` from the user's logged impressions per topic (the logging policy's
exposure): what a ranker could reach with what the logs can tell.

    .venv/bin/python bench/feed_recall_bench.py [--impressions 300000] [--users 300] [--k 500] [--no-ceiling]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from online.corpus import Corpus, CorpusConfig  # noqa: E402
from online.features import MemoryStore  # noqa: E402
from online.retrieval import RetrievalConfig, Retriever  # noqa: E402
from strategy.items import MAX_ITEMS, parse_items  # noqa: E402
from strategy.retrieval import DEFAULT_RETRIEVAL, SOURCE_NAMES, RetrievalPlan, RetrievalSource  # noqa: E402
from world import World  # noqa: E402

GOAL = 0.5
CEILINGS = ("ceiling: true affinity", "ceiling: clicks", "ceiling: exposure")
CLICK_PRIOR = 5.0       # pseudo-impressions at the overall click rate in the clicks estimate
EXPOSURE_PRIOR = 1.0    # pseudo-impressions per topic in the exposure estimate
PRIOR_BINS = 20


def corpus_items(world: World, ts: float) -> list[dict]:
    """The world's items alive at ``ts`` as ``POST /v1/items`` writes."""
    alive = np.flatnonzero((world.item_born_ts <= ts) & (world.item_expires_ts > ts))
    return [world.corpus_item(int(i)) for i in alive]


def scaled(plan: RetrievalPlan, k: int) -> RetrievalPlan:
    f = k / plan.max_candidates
    return RetrievalPlan(tuple(replace(s, count=max(1, round(s.count * f))) for s in plan.sources), k)


def ceiling_scorer(world: World, alive_idx: np.ndarray, ts: float, imp):
    """``score(user_id) -> {ceiling: scores over alive_idx}``: the information ceilings' rankings.

    Each score is the user's topic affinity + knowable quality + freshness + harm, weighted as in
    ``World._parts``; the variants differ in the affinity: true at ``ts``, or estimated from the
    user's logged clicks or impressions per topic in ``imp`` (counted once here, for every user).
    """
    e, lv = world.config.effects, world.config.living
    topic, llm = world.item_topic[alive_idx], world.item_is_llm[alive_idx]
    # knowable quality, optimistic: a model has to estimate creator quality (and these bins' means) from logs
    known_q = world.creator_quality[world.item_creator[alive_idx]]
    prior_bin = np.clip((np.nan_to_num(world.item_prior[alive_idx]) * PRIOR_BINS).astype(int), 0, PRIOR_BINS - 1)
    cell = world.item_generator[alive_idx][llm] * PRIOR_BINS + prior_bin[llm]
    cell_q = np.bincount(cell, weights=world.item_quality[alive_idx][llm]) / np.maximum(np.bincount(cell), 1)
    known_q[llm] = cell_q[cell]
    item_part = (e.quality * known_q + e.harm_click * world.item_harmful[alive_idx]
                 + lv.freshness_weight * np.exp2(-np.maximum(world.age_hours(alive_idx, ts), 0.0)
                                                 / lv.freshness_half_life_hours))

    n_topics = world.config.n_topics
    topic_of = {name: k for k, name in enumerate(world.topic_names)}
    counts = imp.groupby(["user_id", "topic"])["click"].agg(["size", "sum"]).reset_index()
    rows, cols = world.user_index(counts["user_id"].to_numpy()), counts["topic"].map(topic_of).to_numpy()
    shown, clicked = np.zeros((world.config.n_users, n_topics)), np.zeros((world.config.n_users, n_topics))
    shown[rows, cols], clicked[rows, cols] = counts["size"], counts["sum"]
    rate = float(imp["click"].mean())

    def score(user_id) -> dict[str, np.ndarray]:
        u = int(world.user_index([user_id])[0])
        n, c = shown[u], clicked[u]
        affinity = {
            CEILINGS[0]: e.affinity * world.affinity(np.full(len(alive_idx), u), topic, ts),
            CEILINGS[1]: np.log((c + CLICK_PRIOR * rate) / (n + CLICK_PRIOR) / rate)[topic],
            CEILINGS[2]: np.log((n + EXPOSURE_PRIOR) / (n.sum() + n_topics * EXPOSURE_PRIOR))[topic],
        }
        return {name: a + item_part for name, a in affinity.items()}

    return score


def train_model(args, imp, folder: Path) -> tuple[str, str]:
    from ranking.two_tower import load_two_tower_config, register_two_tower, train_two_tower

    logs = folder / "logs.parquet"
    imp.to_parquet(logs)
    cfg = load_two_tower_config(args.train_config)
    cfg = replace(cfg, data=replace(cfg.data, loader="table", path=str(logs)), registry=str(folder / "registry"))
    t = time.perf_counter()
    trained = train_two_tower(cfg, progress=True)
    register_two_tower(cfg.registry, cfg.name, trained)
    print(f"two-tower trained in {time.perf_counter() - t:.0f} s", flush=True)
    return cfg.registry, cfg.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default=str(ROOT / "conf/sim/living.yaml"))
    ap.add_argument("--impressions", type=int, default=300_000)
    ap.add_argument("--train-config", default=str(ROOT / "conf/train/two_tower_living.yaml"))
    ap.add_argument("--model", help="a registered two-tower model (with --registry) instead of training one")
    ap.add_argument("--registry", default="registry")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ceiling", action="store_true", help="skip the information-ceiling rows")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from ranking.two_tower import load_two_tower

    folder = Path(tempfile.mkdtemp(prefix="feed-recall-"))
    world = World.from_yaml(args.world)
    imp, ev = world.simulate_logs(args.impressions, progress=True)
    T = float(imp["ts"].max())
    registry, ref = (args.registry, args.model) if args.model else train_model(args, imp, folder)
    encoder = load_two_tower(registry, ref)

    clock = lambda: T  # noqa: E731 - the world's time, not the wall clock
    corpus = Corpus(CorpusConfig(path=str(folder / "corpus.db"), synchronous="normal"), clock=clock)
    writes = corpus_items(world, T)
    for start in tqdm(range(0, len(writes), MAX_ITEMS), desc="corpus", unit="batch"):
        corpus.upsert(parse_items({"items": writes[start:start + MAX_ITEMS]}))
    store = MemoryStore()
    events = [{k: v for k, v in rec.items() if v == v} for rec in ev.to_dict("records")]   # NaN value: absent
    for start in range(0, len(events), 50_000):
        store.apply(events[start:start + 50_000])
    retriever = Retriever(RetrievalConfig(), corpus, encoder, store, clock=clock, seed=args.seed)
    t = time.perf_counter()
    retriever.sync()
    print(f"indexed {retriever.status()['indexed']} items ({retriever.status()['kind']}) in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    retriever.refresh_trending(force=True)

    alive_ids = np.array([w["item_id"] for w in writes], dtype=object)
    alive_idx = world.item_index(alive_ids)
    clicks = ev[ev["type"] == "click"]["item_id"].value_counts()
    alive = set(alive_ids)
    popular = [i for i in clicks.index if i in alive][: args.k]
    engaged = sorted(set(ev["user_id"]))
    rng = np.random.default_rng(args.seed)
    users = list(rng.choice(engaged, size=min(args.users, len(engaged)), replace=False))

    plans = {name: RetrievalPlan((RetrievalSource(name, args.k),), args.k) for name in SOURCE_NAMES}
    plans["blend"] = scaled(DEFAULT_RETRIEVAL, args.k)
    ceiling_scores = None if args.no_ceiling else ceiling_scorer(world, alive_idx, T, imp)
    rows = {name: [] for name in [*plans, "popularity", "world generator", *(CEILINGS if ceiling_scores else ())]}
    sizes = {name: [] for name in rows}
    latency = []
    for user_id in tqdm(users, desc="users", unit="user"):
        p = world.true_probs(np.full(len(alive_idx), user_id, dtype=object), alive_ids, np.ones(len(alive_idx)),
                             ts=np.full(len(alive_idx), T))["click"]
        oracle = set(alive_ids[np.argsort(-p, kind="stable")[: args.top]])
        rt = store.lookup(user_id, [], [], now=T)
        user = {"user_id": user_id, "recent_items": rt.recent_items, "topic_affinity": rt.topic_affinity}
        for name, plan in plans.items():
            t = time.perf_counter()
            pool = retriever.retrieve(plan, user, now=T)
            if name == "blend":
                latency.append((time.perf_counter() - t) * 1e3)
            got = {it.item_id for it in pool.items}
            rows[name].append(len(got & oracle) / args.top)
            sizes[name].append(len(got))
        gen = {c["item_id"] for c in world.candidates(user_id, args.k, rng, ts=T)}
        rows["world generator"].append(len(gen & oracle) / args.top)
        sizes["world generator"].append(len(gen))
        rows["popularity"].append(len(set(popular) & oracle) / args.top)
        sizes["popularity"].append(len(popular))
        for name, s in (ceiling_scores(user_id) if ceiling_scores else {}).items():
            top = set(alive_ids[np.argsort(-s, kind="stable")[: args.k]])
            rows[name].append(len(top & oracle) / args.top)
            sizes[name].append(len(top))

    print(f"\nliving world {Path(args.world).name}: {len(alive_ids):,} items alive at the end of {len(imp):,} "
          f"impressions, {len(users)} users; oracle: each user's top {args.top} by true P(click)")
    print(f"{'source':<24}{'recall@' + str(args.k):>12}{'± se':>8}{'pool':>8}")
    for name, values in rows.items():
        v = np.asarray(values)
        print(f"{name:<24}{v.mean():>12.3f}{v.std(ddof=1) / np.sqrt(len(v)):>8.3f}{np.mean(sizes[name]):>8.0f}")
    if ceiling_scores:
        true_a, from_clicks, from_exposure = (float(np.mean(rows[name])) for name in CEILINGS)
        print(f"ceilings (not sources: every alive item ranked by affinity + knowable quality + freshness + harm, "
              f"{len(imp) / imp['user_id'].nunique():.0f} impressions per user): goal {GOAL} vs {true_a:.3f} with "
              f"the true affinity, {from_clicks:.3f} / {from_exposure:.3f} with it estimated from the logged "
              "clicks / impressions per topic")
    blend = float(np.mean(rows["blend"]))
    print(f"blend {blend:.3f} (goal >= {GOAL}): " + ", ".join(
        f"{blend / base:.2f}x {label}" if base > 0 else f"{label} found none"
        for label, base in (("popularity", float(np.mean(rows["popularity"]))),
                            ("the world's generator", float(np.mean(rows["world generator"]))))))
    lat = np.asarray(latency)
    print(f"blend retrieval per request: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms "
          "(one thread, in process)")
    corpus.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
