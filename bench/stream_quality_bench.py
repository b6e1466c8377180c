"""Does learning from the stream pay? Next-hour test AUC over a simulated day of a living world, in one run:
the streaming model vs the batch model trained once at the start vs a batch model retrained every 6 hours.

The living world (``conf/sim/living_stream.yaml``: items born every hour and expiring, young items more
interesting, drifting interests, trending topics) is simulated for two days. Day 1 trains the batch model
(``conf/train/sim_mmoe.yaml``'s architecture on ``conf/features/living.yaml``). Day 2 is replayed hour by
hour, prequentially: every model is scored on hour h before anything of hour h is trained on; then the
streaming trainer (``online/stream_train.StreamTrainer``, the code behind ``stratarank train-stream``,
started from the day-1 model) trains on hour h; at hours 6, 12 and 18 the 6-hourly model is retrained from
scratch on everything before. Printed: mean AUC of click and like over the 24 hours, the same on the
slice of items younger than a day at serving time, and per-hour figures.
Goal: streaming >= batch-once + 0.02 AUC on click and >= the 6-hourly retrain. Never fails on a figure.

    .venv/bin/python bench/stream_quality_bench.py [--impressions 600000] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ranking.metrics import auc  # noqa: E402
from world import World  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600.0
LABELS = ("click", "like", "share", "watch_time", "report")


def train_batch(frame, folder: Path, name: str, epochs: int, registry: Path):
    from ranking.artifacts import load_model
    from ranking.train import load_train_config, train_from_config
    from dataclasses import replace

    path = folder / f"{name}.parquet"
    frame.to_parquet(path)
    base = load_train_config(ROOT / "conf/train/sim_mmoe.yaml")
    cfg = replace(base, name=name, features=str(ROOT / "conf/features/living.yaml"),
                  data=replace(base.data, loader="sim", path=str(path), valid_fraction=0.1, test_fraction=1e-6),
                  training=replace(base.training, epochs=epochs, max_rows=None, patience=1))
    train_from_config(cfg, registry=str(registry), progress=False, log=lambda m: None)
    return load_model(registry, name)


def records(frame) -> list[dict]:
    """Day-2 rows as the joiner would emit them (``example_id``, served features, labels)."""
    out = frame.to_dict("records")
    for r in out:
        r["example_id"] = f"{r['request_id']}:{r['item_id']}"
        r["user_recent_items"] = list(r["user_recent_items"])
        if r["generator"] is None or r["prior_score"] != r["prior_score"]:
            r["prior_score"] = None
    return out


def stream_scores(trainer, rows: list[dict]) -> np.ndarray:
    import torch

    from ranking.models import to_natural

    trainer.module.eval()
    with torch.no_grad():
        _, batch, _ = trainer._encode(rows)
        p = to_natural(trainer.module(batch.dense, batch.kjt), trainer.objectives).double().numpy()
    trainer.module.train()
    return p


def aucs(frame, p, objectives, mask=None) -> dict:
    out = {}
    for k, name in enumerate(objectives):
        if name in ("click", "like"):
            y = frame[name].to_numpy()
            m = np.ones(len(y), bool) if mask is None else mask
            out[name] = float(auc(y[m] > 0, p[m, k])) if 0 < y[m].sum() < m.sum() else float("nan")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "conf/sim/living_stream.yaml"))
    ap.add_argument("--impressions", type=int, default=None, help="default: the config's (2 days)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each batch training")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)

    import torch

    from online.stream_train import StreamConfig, StreamTrainer

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    world = World.from_yaml(args.config)
    imp, _ = world.simulate_logs(args.impressions, progress=False)
    start = world.config.start_ts
    day1 = imp[imp["ts"] < start + 86_400].reset_index(drop=True)
    day2 = imp[imp["ts"] >= start + 86_400].reset_index(drop=True)
    hour = ((day2["ts"] - start - 86_400) // HOUR).astype(int).to_numpy()
    print(f"living world {args.config}: {len(day1):,} impressions on day 1, {len(day2):,} on day 2; "
          f"{world.n_items_total:,} items ({world.config.n_items:,} at the start); simulated in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="stream-quality-"))
    registry = folder / "registry"
    t = time.perf_counter()
    once = train_batch(day1, folder, "batch_once", args.epochs, registry)
    print(f"batch model on day 1: {time.perf_counter() - t:.0f} s", flush=True)
    cfg = StreamConfig.from_dict({"name": "streaming", "start_from": "batch_once", "registry": str(registry),
                                  "checkpoint": str(folder / "trainer.pt"),
                                  "training": {"batch_size": 256, "lr": 5e-4, "embedding_lr": 0.02},
                                  "guard": {"holdout_share": 0.001},
                                  "ids": {"item_id": {"capacity": 60_000, "min_count": 2, "ttl_s": 4 * 86_400}}})
    trainer = StreamTrainer(cfg, log_fn=lambda m: None)
    six = once
    rows = records(day2)
    seen_items = set(day1["item_id"])
    results = {m: {"all": [], "young": [], "new": []} for m in ("batch_once", "batch_6h", "streaming")}
    print(f"{'hour':>4} {'rows':>6} {'young':>6}   click AUC: once   6h  stream   like AUC: once   6h  stream",
          flush=True)
    for h in range(24):
        if h and h % 6 == 0:
            t = time.perf_counter()
            six = train_batch(imp[imp["ts"] < start + 86_400 + h * HOUR].reset_index(drop=True), folder,
                              f"batch_6h_{h}", args.epochs, registry)
            print(f"     (retrained the 6-hourly model on {int((imp['ts'] < start + 86_400 + h * HOUR).sum()):,} "
                  f"rows in {time.perf_counter() - t:.0f} s)", flush=True)
        idx = np.flatnonzero(hour == h)
        part = day2.iloc[idx].reset_index(drop=True)
        young = part["age_hours"].to_numpy() < 24
        new = ~part["item_id"].isin(seen_items).to_numpy()
        scores = {"batch_once": once.predict(part), "batch_6h": six.predict(part),
                  "streaming": stream_scores(trainer, [rows[i] for i in idx])}
        names = list(once.objectives)
        line = []
        for m, p in scores.items():
            results[m]["all"].append(aucs(part, p, names))
            results[m]["young"].append(aucs(part, p, names, young))
            results[m]["new"].append(aucs(part, p, names, new))
        for obj in ("click", "like"):
            line.append(" ".join(f"{results[m]['all'][-1][obj]:.4f}" for m in scores))
        print(f"{h:>4} {len(part):>6} {young.mean():>6.1%}   {line[0]}   {line[1]}", flush=True)
        for i in idx:
            r = rows[i]
            trainer.add("day2", 0, int(i), int(i) + 1, r)
        trainer.step()

    summary = {}
    print(f"\nmean next-hour AUC over the 24 hours of day 2 ({time.perf_counter() - t0:.0f} s in all):")
    print(f"{'slice':<34}{'model':<12}{'click':>8}{'like':>8}")
    for slice_name, label in (("all", "all impressions"), ("young", "items younger than a day"),
                              ("new", "items the day-1 model never saw")):
        for m in results:
            click = float(np.nanmean([r["click"] for r in results[m][slice_name]]))
            like = float(np.nanmean([r["like"] for r in results[m][slice_name]]))
            summary.setdefault(slice_name, {})[m] = {"click": click, "like": like}
            print(f"{label:<34}{m:<12}{click:>8.4f}{like:>8.4f}")
    s = summary["all"]
    print(f"\nstreaming - batch once: click {s['streaming']['click'] - s['batch_once']['click']:+.4f}, like "
          f"{s['streaming']['like'] - s['batch_once']['like']:+.4f} (goal: click >= +0.02); streaming - 6-hourly: "
          f"click {s['streaming']['click'] - s['batch_6h']['click']:+.4f}, like "
          f"{s['streaming']['like'] - s['batch_6h']['like']:+.4f} (goal: >= 0)")
    ids = trainer.ids.stats(reset=False)["item_id"]
    print(f"streaming item table: {ids['used']:,} of {ids['capacity']:,} rows used, {ids['admitted']:,} admitted, "
          f"{ids['evicted']:,} evicted; {ids['oov_share']:.1%} of item lookups hit the shared row 0")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "hours": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
