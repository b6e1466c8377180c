"""Quantized embedding tables against the fp32 model: embedding bytes, whole model bytes, forward time at
500 candidates, test AUC / GAUC per objective for fp32, int8 and int4, in one run, on the simulated world
and on KuaiRand.

For each data set the fp32 ranker (``conf/train/sim_mmoe.yaml``; ``conf/train/kuairand_hybrid.yaml``) is
trained into a temporary registry, its int8 and int4 serving variants are added exactly as
``stratarank quantize`` does (``ranking.artifacts.add_serving_variant``), and each of the three is loaded
the way the scorer loads it (``load_model(..., quantized=)``) and evaluated on the same test rows. Bytes
are the tensors held in memory (quantized rows with their fp16 scale and bias). Timing: one request of
500 test rows, the served predict (leaves + encode + forward) and the forward alone, medians of
``--repeats`` runs, alternating the three models, one thread. Goals (issue 16): int8 <= 26% and int4 <= 14%
of the fp32 embedding bytes; AUC loss <= 0.0005 (int8) and <= 0.001 (int4) per objective. The row format
bounds the byte ratio from below by ``1/4 + 1/dim`` (int8) and ``1/8 + 1/dim`` (int4), printed beside the
measured ratio. Never fails on a figure.

    .venv/bin/python bench/quant_bench.py [--data sim kuairand] [--repeats 50] [--sim-impressions 1000000]
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import run_model_bench  # noqa: E402 - bench/ is on the path as the script's folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"sim": "conf/train/sim_mmoe.yaml", "kuairand": "conf/train/kuairand_hybrid.yaml"}
VARIANTS = ("none", "int8", "int4")
GOAL_BYTES = {"int8": 0.26, "int4": 0.14}
GOAL_AUC_LOSS = {"int8": 0.0005, "int4": 0.001}


def format_bound(loaded, to: str) -> float:
    """The smallest embedding-byte share the fused row format allows for this model's tables:
    rows-weighted ``(dim * bits / 8 + 4) / (4 * dim)``."""
    from ranking.quantize import row_bytes

    tables = list(loaded.module.ebc.embedding_bag_configs())
    fp32 = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    return sum(t.num_embeddings * row_bytes(t.embedding_dim, to) for t in tables) / fp32


def median_times(models: dict, rows, repeats: int) -> dict:
    """``{variant: (served s, forward s)}`` medians, the variants alternated in every round."""
    import torch

    batches = {k: m.encoder.transform(m.with_leaves(rows), allow_missing=True) for k, m in models.items()}
    times = {k: ([], []) for k in models}
    with torch.inference_mode():
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m.predict(rows, allow_missing=True)
                t1 = time.perf_counter()
                m.module(batches[k].dense, batches[k].kjt)
                times[k][0].append(t1 - t0)
                times[k][1].append(time.perf_counter() - t1)
    return {k: (statistics.median(s), statistics.median(f)) for k, (s, f) in times.items()}


def run(name: str, registry: Path, args, data_path: str | None) -> list[dict]:
    from ranking.artifacts import add_serving_variant, load_model
    from ranking.quantize import embedding_bytes, model_bytes
    from ranking.train import evaluate_registered, load_frames, load_train_config, train_from_config

    cfg = dataclasses.replace(load_train_config(ROOT / CONFIGS[name]), serving=None)
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data_path))
    t0 = time.perf_counter()
    train_from_config(cfg, registry=str(registry), progress=False, log=lambda m: None)
    print(f"  trained {cfg.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    for to in VARIANTS[1:]:
        add_serving_variant(registry, cfg.name, to)
    models = {to: load_model(registry, cfg.name, quantized=to) for to in VARIANTS}
    _, _, test, _ = load_frames(cfg)
    times = median_times(models, test.iloc[:500].reset_index(drop=True), args.repeats)
    rows = []
    for to, loaded in models.items():
        metrics = evaluate_registered(loaded, cfg, "test", log=lambda m: None, frame=test)["metrics"]
        rows.append({"variant": "fp32" if to == "none" else to, "embedding_bytes": embedding_bytes(loaded.module),
                     "bytes": model_bytes(loaded.module), "served_ms": times[to][0] * 1e3,
                     "forward_ms": times[to][1] * 1e3, "metrics": metrics,
                     "bound": format_bound(loaded, to) if to != "none" else 1.0})
    return rows


def report(name: str, rows: list[dict]) -> None:
    base = rows[0]
    objectives = [k for k, m in base["metrics"].items() if "auc" in m]
    print(f"\n{name}: 500 candidates, medians; AUC / GAUC on the test split")
    head = (f"{'variant':<8}{'emb MiB':>9}{'x fp32':>8}{'bound':>7}{'model MiB':>10}{'x fp32':>8}"
            f"{'served ms':>10}{'forward ms':>11}")
    print(head + "".join(f"{k:>22}" for k in objectives))
    for r in rows:
        cells = "".join(f"{r['metrics'][k]['auc']:>10.4f} / {r['metrics'][k].get('gauc', float('nan')):.4f}"
                        for k in objectives)
        print(f"{r['variant']:<8}{r['embedding_bytes'] / 2**20:>9.2f}"
              f"{r['embedding_bytes'] / base['embedding_bytes']:>8.3f}{r['bound']:>7.3f}"
              f"{r['bytes'] / 2**20:>10.2f}{r['bytes'] / base['bytes']:>8.3f}"
              f"{r['served_ms']:>10.2f}{r['forward_ms']:>11.2f}{cells}")
    for r in rows[1:]:
        loss = {k: base["metrics"][k]["auc"] - r["metrics"][k]["auc"] for k in objectives}
        share = r["embedding_bytes"] / base["embedding_bytes"]
        print(f"  {r['variant']}: embedding bytes {share:.1%} of fp32 (goal <= {GOAL_BYTES[r['variant']]:.0%}, "
              f"format bound {r['bound']:.1%}); AUC loss " + ", ".join(f"{k} {v:+.5f}" for k, v in loss.items())
              + f" (goal <= {GOAL_AUC_LOSS[r['variant']]} each); forward x{r['forward_ms'] / base['forward_ms']:.2f}")


def main(argv=None) -> int:
    return run_model_bench(__doc__, CONFIGS, "quant-bench-", run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
