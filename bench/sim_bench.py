"""Simulated-world throughput: impressions per second (median of 3 runs) and the ratio to a trivial baseline.

    .venv/bin/python bench/sim_bench.py [--config conf/sim/default.yaml] [--impressions N] [--runs 3]

Times ``World(config)`` + ``simulate_logs`` (the vectorised path behind ``stratarank simulate``),
then the Parquet writes separately, and compares with the least any simulator must do in the same
process: drawing the same number of Bernoulli labels (5 per impression) with numpy. Prints figures;
never passes or fails on time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.world import World, WorldConfig, oracle_aucs  # noqa: E402


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
    print(f"config {args.config}: {n} impressions, {len(ev)} events, median of {args.runs} runs")
    print(f"simulate (world + logs): {sim_s:.3f}s = {n / sim_s:,.0f} impressions/s")
    print(f"parquet write:           {write_s:.3f}s; simulate + write {n / (sim_s + write_s):,.0f} impressions/s")
    print(f"baseline (numpy, {5 * n} Bernoulli draws): {base_s:.4f}s = {n / base_s:,.0f} impressions/s; "
          f"simulate is {sim_s / base_s:.1f}x the baseline time")
    print("oracle AUC: " + ", ".join(f"{k} {v:.4f}" for k, v in oracle_aucs(imp).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
