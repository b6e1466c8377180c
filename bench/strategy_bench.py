"""Blend + full re-rank of 1,000 candidates x 6 objectives (strategy core speed).

Prints the median wall time of `strategy.rank` (calibrate, transform, blend, LLM priors,
guardrails, quotas, diversity, exploration) and its ratio to a bare numpy weighted sum of the
same matrix, both measured in this process. Goal: median <= 2 ms. Never fails on time.

    .venv/bin/python bench/strategy_bench.py [--candidates 1000] [--repeats 300]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from strategy import parse_request, rank, strategy_from_dict

STRATEGY = {
    "strategy": "bench",
    "objectives": {
        "click": {"event": "click", "type": "binary", "weight": 1.0},
        "like": {"event": "like", "type": "binary", "weight": 4.0},
        "share": {"event": "share", "type": "binary", "weight": 8.0},
        "comment": {"event": "comment", "type": "binary", "weight": 6.0},
        "watch_time": {"event": "watch", "type": "regression", "transform": "log1p", "weight": 0.5},
        "report": {"event": "report", "type": "binary", "weight": -50.0},
    },
    "blend": {"formula": "weighted_sum"},
    "guardrails": [{"objective": "report", "max": 0.05, "action": "drop"}],
    "sources": {"llm": {"max_share": 0.3, "min_slots": 1, "prior_weight": 20}},
    "rerank": {"diversity": {"key": "topic", "max_per_window": 2, "window": 5}},
    "exploration": {"epsilon": 0.05},
    "slate_size": 20,
}


def make_request(n: int, rng: np.random.Generator, request_id: str) -> dict:
    cands = []
    for i in range(n):
        llm = i % 5 == 0
        cand = {"item_id": f"i{i}", "source": "llm" if llm else "retrieval", "topic": f"t{rng.integers(30)}",
                "creator_id": f"c{rng.integers(200)}", "features": {"impressions": int(rng.integers(0, 100))}}
        if llm:
            cand["generator"] = {"model": "g", "prior_score": float(rng.random())}
        cands.append(cand)
    return {"request_id": request_id, "user_id": "u1", "candidates": cands}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    strategy = strategy_from_dict(STRATEGY)
    body = make_request(args.candidates, rng, "bench-1")
    request = parse_request(body)
    P = rng.random((args.candidates, len(strategy.objectives)))
    P[:, 4] *= 60.0
    P[:, 5] *= 0.06
    w = strategy.weights

    for _ in range(20):  # warm-up
        rank(strategy, request, P)
    bare = median_ms(lambda: P @ w, args.repeats)
    full = median_ms(lambda: rank(strategy, request, P), args.repeats)
    parse = median_ms(lambda: parse_request(body), max(20, args.repeats // 10))
    out = rank(strategy, request, P)
    print(f"candidates x objectives      : {args.candidates} x {len(strategy.objectives)}")
    print(f"slate                        : {len(out.items)} items, {len(out.dropped)} dropped")
    print(f"bare numpy weighted sum      : median {bare * 1e3:8.1f} us")
    print(f"blend + full re-rank (rank)  : median {full * 1e3:8.1f} us   (goal <= 2000 us)")
    print(f"ratio rank / bare weighted sum: {full / bare:8.1f}x")
    print(f"(for reference) request validation of the same body: median {parse * 1e3:.1f} us")


if __name__ == "__main__":
    main()
