"""Training throughput: the TorchRec multi-task model vs a plain-PyTorch twin of the same shape.

Both models get the same encoded batches (FeatureEncoder -> KeyedJaggedTensor), the same MMoE body
and the same optimizers (Adagrad on the tables, Adam on the rest); the TorchRec model pools through
``EmbeddingBagCollection``, the twin through one ``nn.EmbeddingBag`` per table. Each model runs in
its own subprocess so its peak RSS (``resource.getrusage``, data + encoding + model) is its own;
``tracemalloc`` reports the Python-heap peak of three extra training steps (tensor storage is not
traced by it; it is off while anything is timed, since it slows Python allocations several-fold).

    python bench/train_bench.py                       # 100k rows, 150 steps of 1024, 2 threads
    python bench/train_bench.py --rows 20000 --steps 30
    python bench/train_bench.py --epoch-1m            # also: one full epoch over 1M impressions (TorchRec)
    python bench/train_bench.py --data runs/sim       # a world's parquet instead of synthetic rows

Prints figures; never passes or fails on time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_rows(args):
    import pandas as pd

    from ranking.train import synthetic_impressions

    if args.data:
        p = Path(args.data)
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return df.iloc[: args.rows] if args.rows else df
    return synthetic_impressions(args.rows, seed=0, n_users=max(200, args.rows // 50), n_items=max(400, args.rows // 20))


def run_one(args) -> dict:
    """Train ``args.only`` (trec|plain) for ``args.steps`` steps; returns figures as a dict."""
    import numpy as np
    import torch

    from ranking.features import FeatureEncoder, load_feature_spec
    from ranking.models import ModelConfig, ObjectiveConfig, PlainMultiTaskRanker, build_model, MultiTaskLoss, \
        transform_labels
    from ranking.train import TrainingConfig, make_optimizer

    torch.set_num_threads(args.threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    df = load_rows(args)
    objectives = (ObjectiveConfig("click"), ObjectiveConfig("like"), ObjectiveConfig("share"),
                  ObjectiveConfig("watch_time", "regression", "log1p", 0.2), ObjectiveConfig("report"))
    t0 = time.perf_counter()
    enc = FeatureEncoder(load_feature_spec(ROOT / args.spec)).fit(df)
    batch = enc.transform(df)
    encode_s = time.perf_counter() - t0
    y = torch.from_numpy(transform_labels(df[[o.name for o in objectives]].to_numpy(np.float64), objectives))
    cfg = ModelConfig(arch=args.arch, expert=(64, 32), num_experts=4, tower=(32,))
    torch.manual_seed(0)
    if args.only == "trec":
        model = build_model(enc, objectives, cfg)
    else:
        model = PlainMultiTaskRanker(enc.embedding_bag_configs(), enc.dense_dim, objectives, cfg)
    opt = make_optimizer(model, TrainingConfig())
    if args.only == "plain":  # make_optimizer splits on the 'ebc.' prefix; the twin's tables are 'bags.'
        emb = [p for n, p in model.named_parameters() if n.startswith("bags.")]
        dense = [p for n, p in model.named_parameters() if not n.startswith("bags.")]
        from ranking.train import _Optimizers

        opt = _Optimizers(torch.optim.Adagrad(emb, lr=0.05), torch.optim.Adam(dense, lr=1e-3))
    loss_fn = MultiTaskLoss(objectives)
    rng = np.random.default_rng(0)
    bs = args.batch_size
    n = len(batch)
    steps = args.steps if not args.epoch else (n + bs - 1) // bs
    perm = rng.permutation(n)
    # the same batches for both models; built up front (or per step in --epoch mode)
    batches = [] if args.epoch else [batch.select(perm[(i * bs) % n:(i * bs) % n + bs]) for i in range(steps)]
    warm = 5
    t_model, t_batch, rows = 0.0, 0.0, 0
    step_times = []  # per-step model time: the median is robust to other processes' CPU bursts
    for i in range(steps + (0 if args.epoch else warm)):
        tb = time.perf_counter()
        if args.epoch:
            idx = perm[i * bs:(i + 1) * bs]
            part = batch.select(idx)
            kjt = part.kjt
        else:
            part = batches[i % steps]
            idx = None
            kjt = part.kjt
        tm = time.perf_counter()
        out = model(part.dense, kjt)
        target = y[torch.from_numpy(idx)] if idx is not None else y[: len(part)]
        loss, _ = loss_fn(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        te = time.perf_counter()
        if args.epoch or i >= warm:
            step_times.append((te - tm, tm - tb, len(part)))
            t_model += te - tm
            t_batch += tm - tb
            rows += len(part)
    # Python-heap peak of a few more steps, traced separately (tracemalloc slows every Python
    # allocation several-fold, so it stays off while encoding and timed steps run)
    tracemalloc.start()
    for i in range(3):
        part = batches[i % len(batches)] if batches else batch.select(perm[:bs])
        loss, _ = loss_fn(model(part.dense, part.kjt), y[: len(part)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"model": args.only, "rows": n, "steps": steps, "batch_size": bs, "examples": rows,
            "model_seconds": round(t_model, 3), "batch_seconds": round(t_batch, 3),
            "examples_per_second": bs / float(np.median([m for m, _, _ in step_times])),
            "examples_per_second_mean": rows / t_model,
            "examples_per_second_with_batching": bs / float(np.median([m + b for m, b, _ in step_times])),
            "encode_seconds": round(encode_s, 2), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "start_rss_mb": rss0 / 1024, "tracemalloc_peak_mb": py_peak / 2 ** 20,
            "params": sum(p.numel() for p in model.parameters()), "threads": args.threads}


def child(args, which: str, extra=()) -> dict:
    cmd = [sys.executable, __file__, "--only", which, "--rows", str(args.rows), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--arch", args.arch,
           "--spec", args.spec, *extra]
    if args.data:
        cmd += ["--data", args.data]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if res.returncode:
        sys.exit(f"{which} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per model (alternating); the best is kept")
    ap.add_argument("--arch", default="mmoe", choices=("shared_bottom", "mmoe", "ple"))
    ap.add_argument("--spec", default="conf/features/sim.yaml")
    ap.add_argument("--data", default=None, help="parquet file or folder (default: synthetic impressions)")
    ap.add_argument("--epoch-1m", action="store_true", help="also time one epoch over 1M impressions (TorchRec)")
    ap.add_argument("--only", choices=("trec", "plain"), help=argparse.SUPPRESS)
    ap.add_argument("--epoch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one(args)))
        return
    print(f"train_bench: {args.rows:,} rows, {args.steps} steps x {args.batch_size}, arch {args.arch}, "
          f"{args.threads} thread(s)")
    # alternate the two models (plain, trec, plain, trec) and keep each one's better run: the
    # machine is shared, and a neighbour's burst should not decide the ratio
    runs: dict = {}
    for which in ("plain", "trec") * args.repeat:
        r = child(args, which)
        if which not in runs or r["examples_per_second"] > runs[which]["examples_per_second"]:
            runs[which] = r
    for name, r in runs.items():
        label = "TorchRec EmbeddingBagCollection" if name == "trec" else "plain nn.EmbeddingBag twin"
        print(f"  {label:<34} {r['examples_per_second']:>10,.0f} ex/s (median model step), "
              f"{r['examples_per_second_with_batching']:>10,.0f} ex/s incl. KJT batching; "
              f"peak RSS {r['peak_rss_mb']:,.0f} MB, tracemalloc peak/step {r['tracemalloc_peak_mb']:,.2f} MB, "
              f"{r['params']:,} params")
    ratio = runs["trec"]["examples_per_second"] / runs["plain"]["examples_per_second"]
    print(f"  ratio TorchRec / plain: {ratio:.2f}x (median model step); "
          f"{runs['trec']['examples_per_second_with_batching'] / runs['plain']['examples_per_second_with_batching']:.2f}x"
          f" incl. batching")
    if args.epoch_1m:
        e = argparse.Namespace(**{**vars(args), "rows": 1_000_000})
        r = child(e, "trec", ["--epoch"])
        print(f"  1M-impression epoch (TorchRec, batch {args.batch_size}): encode {r['encode_seconds']:.1f} s, "
              f"train {r['model_seconds'] + r['batch_seconds']:.1f} s "
              f"({r['examples_per_second_with_batching']:,.0f} ex/s incl. batching), peak RSS {r['peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
