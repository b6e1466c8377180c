"""Benchmark of experiments.analysis.analyze on synthetic exposure + event rows.

Prints rows/s and seconds (median of --repeats runs) and the ratio to a baseline measured in
the same process: a bare pandas ``groupby(['user_id', 'type'])['value'].sum()`` over the same
event rows (the least work any per-user metric computation must do). Never fails on time.

    .venv/bin/python bench/analysis_bench.py --rows 1000000
    .venv/bin/python bench/analysis_bench.py             # 10M rows (~1.5 GB of RAM)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.analysis import analyze  # noqa: E402

METRICS = {
    "clicks_per_user": {"type": "mean", "event": "click"},
    "watch_time": {"type": "mean", "event": "watch", "value": "sum"},
    "ctr": {"type": "ratio", "numerator": {"event": "click"}, "denominator": {"event": "impression"}},
    "reports": {"type": "mean", "event": "report"},
}
EXPERIMENTS = [
    {"name": "rank_v2", "control": "control", "metrics": ["ctr", "watch_time", "clicks_per_user"],
     "guardrails": ["reports"]},
    {"name": "blend_w", "control": "control", "metrics": ["ctr", "watch_time"], "guardrails": ["reports"]},
]


def make_rows(rows: int, seed: int = 0, exposure_share: float = 0.1):
    """``rows`` rows in all: ``exposure_share`` of them exposures (2 experiments in 2 layers,
    some users exposed twice), the rest events (5 types, 1 % duplicated ids, ~30 % before exposure)."""
    rng = np.random.default_rng(seed)
    n_exp = max(int(rows * exposure_share), 4)
    n_ev = rows - n_exp
    n_users = max(n_exp // 2 * 9 // 10, 2)
    u = rng.integers(0, n_users, n_exp)
    e = rng.integers(0, 2, n_exp)
    names = np.array(["rank_v2", "blend_w"])
    # deterministic assignment per (user, experiment), like a hash-based layer
    arm = ((u * 2654435761 + e * 97) >> 7) % 2
    exposures = pd.DataFrame({
        "user_id": u, "layer": np.where(e == 0, "rank", "blend"), "experiment": names[e],
        "variant": np.where(arm == 0, "control", "treatment"),
        "ts": rng.integers(1_000_000, 2_000_000, n_exp),
    })
    types = np.array(["impression", "click", "watch", "like", "report"])
    t = rng.choice(5, n_ev, p=[0.5, 0.1, 0.25, 0.1, 0.05])
    ev_id = np.arange(n_ev, dtype=np.int64)
    dup = rng.random(n_ev) < 0.01
    ev_id[dup] = rng.integers(0, n_ev, int(dup.sum()))
    events = pd.DataFrame({
        "event_id": ev_id, "ts": rng.integers(0, 3_000_000, n_ev), "type": types[t],
        "user_id": rng.integers(0, n_users, n_ev), "item_id": rng.integers(0, 100_000, n_ev),
        "request_id": rng.integers(0, 10**9, n_ev),
        "value": np.where(t == 2, rng.exponential(30.0, n_ev), 1.0),
    })
    return exposures, events


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="exposure + event rows (default 10M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cuped", action="store_true", help="analyse without the pre-period covariate")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    exposures, events = make_rows(args.rows, args.seed)
    gen = time.perf_counter() - t0
    rows = len(exposures) + len(events)
    print(f"rows: {rows:,} ({len(exposures):,} exposures + {len(events):,} events), generated in {gen:.1f} s")

    pre = None if args.no_cuped else "all"
    recs, sec = timed(lambda: analyze(exposures, events, METRICS, EXPERIMENTS, pre_period=pre), args.repeats)
    _, base = timed(lambda: events.groupby(["user_id", "type"])["value"].sum(), args.repeats)
    print(f"analyze: {sec:.2f} s median of {args.repeats}, {rows / sec:,.0f} rows/s, {len(recs)} records"
          f" (CUPED {'off' if pre is None else 'on'})")
    print(f"baseline groupby(['user_id','type']).value.sum(): {base:.2f} s, {rows / base:,.0f} rows/s")
    print(f"ratio analyze / baseline: {sec / base:.2f}x")
    for r in recs[:3]:
        print(f"  {r['experiment']}/{r['variant']}/{r['metric']}: users={r['users']:,} "
              f"lift={r['abs_lift']:+.4g} p={r['p_value']:.3g} srm_p={r['srm_p']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
