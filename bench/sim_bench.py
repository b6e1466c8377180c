"""Simulated-world throughput and memory: impressions per second (median of 3 runs), the ratio to a
trivial baseline, and the peak memory of building the world and simulating its logs.

    .venv/bin/python bench/sim_bench.py [--config conf/sim/default.yaml] [--impressions N] [--runs 3]
    .venv/bin/python bench/sim_bench.py --config conf/sim/living.yaml     # 100k items x 10k users, living

Times ``World(config)`` + ``simulate_logs`` (the vectorised path behind ``stratarank simulate``),
then the Parquet writes separately, and compares with the least any simulator must do in the same
process: drawing the same number of Bernoulli labels (5 per impression) with numpy. Memory is one more
run under ``tracemalloc`` (numpy reports its buffers to it): the world's own arrays and the peak while
simulating. Prints figures; never passes or fails on time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from world import World, WorldConfig, oracle_aucs  # noqa: E402


def _median_time(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "conf" / "sim" / "default.yaml"))
    ap.add_argument("--impressions", type=int)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    overrides = {"impressions": args.impressions} if args.impressions else {}
    config = WorldConfig.from_yaml(args.config, **overrides)
    n = config.impressions

    build_s, world = _median_time(lambda: World(config), args.runs)
    sim_s, (imp, ev) = _median_time(lambda: World(config).simulate_logs(progress=False), args.runs)

    def write():
        with tempfile.TemporaryDirectory() as tmp:
            imp.to_parquet(Path(tmp) / "impressions.parquet", index=False)
            ev.to_parquet(Path(tmp) / "events.parquet", index=False)

    write_s, _ = _median_time(write, args.runs)

    p = np.random.default_rng(0).random(n) * 0.2

    def baseline():
        rng = np.random.default_rng(1)
        return rng.random((5, n)) < p

    base_s, _ = _median_time(baseline, args.runs)
    tracemalloc.start()
    traced = World(config)
    world_mb = tracemalloc.get_traced_memory()[0] / 2**20
    traced.simulate_logs(progress=False)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    del traced

    living = "living" if config.living.enabled else "static"
    print(f"config {args.config}: {living} world, {config.n_users:,} users, {world.n_items_total:,} items "
          f"({config.n_items:,} initial), {n} impressions, {len(ev)} events, median of {args.runs} runs")
    print(f"world build:             {build_s:.3f}s; its arrays {world_mb:,.0f} MiB; peak while simulating "
          f"{peak_mb:,.0f} MiB (logs {imp.memory_usage(deep=True).sum() / 2**20:,.0f} MiB)")
    print(f"simulate (world + logs): {sim_s:.3f}s = {n / sim_s:,.0f} impressions/s")
    print(f"parquet write:           {write_s:.3f}s; simulate + write {n / (sim_s + write_s):,.0f} impressions/s")
    print(f"baseline (numpy, {5 * n} Bernoulli draws): {base_s:.4f}s = {n / base_s:,.0f} impressions/s; "
          f"simulate is {sim_s / base_s:.1f}x the baseline time")
    print("oracle AUC: " + ", ".join(f"{k} {v:.4f}" for k, v in oracle_aucs(imp).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
