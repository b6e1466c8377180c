"""A distilled student against its teacher: forward time at 500 candidates, model bytes, test AUC / GAUC per
objective, in one run, on the simulated world and on KuaiRand.

For each data set: the teacher (``conf/train/sim_mmoe.yaml``; ``conf/train/kuairand_hybrid.yaml``: MMoE with
GBDT leaf embeddings, distilled from LightGBM) and the student (``conf/train/sim_student.yaml``;
``conf/train/kuairand_student.yaml``: fewer experts, narrower towers, smaller embeddings and dense encodings,
``distill_from`` the teacher) are trained into a temporary registry, plus the same student architecture
trained on the labels alone (what the teacher's soft targets add), and the student's int8 serving variant
(its bytes against the teacher's: goal <= 10%). Serving cost is one request of 500 test rows:
``LoadedModel.predict`` (GBDT leaves + encode + forward, as the scorer pays) and the module's forward alone,
medians of ``--repeats`` rounds that time the four models in turn, one thread. Goals (issue 16): forward <= 0.4 x the
teacher's, AUC loss <= 0.002 per objective. Each AUC loss carries the 95% half-width of DeLong's paired
interval on the test rows (a rare objective's loss of 0.002 may be within its noise). Never fails on a figure.

    .venv/bin/python bench/student_bench.py [--data sim kuairand] [--repeats 50] [--sim-impressions 1000000]
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import run_model_bench  # noqa: E402 - bench/ is on the path as the script's folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"sim": ("conf/train/sim_mmoe.yaml", "conf/train/sim_student.yaml"),
           "kuairand": ("conf/train/kuairand_hybrid.yaml", "conf/train/kuairand_student.yaml")}


def timings(models: list, rows, repeats: int) -> list[tuple[float, float]]:
    """Per model, median seconds of (the served predict: leaves + encode + forward, the module forward
    alone), the models timed in turn within each repeat so machine drift falls on all alike."""
    import torch

    batches = [m.encoder.transform(m.with_leaves(rows), allow_missing=True) for m in models]
    served, forward = [[] for _ in models], [[] for _ in models]
    with torch.inference_mode():
        for _ in range(repeats + 5):   # 5 warm-up rounds
            for k, (loaded, batch) in enumerate(zip(models, batches)):
                t0 = time.perf_counter()
                loaded.predict(rows, allow_missing=True)
                served[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                loaded.module(batch.dense, batch.kjt)
                forward[k].append(time.perf_counter() - t0)
    return [(statistics.median(s[5:]), statistics.median(f[5:])) for s, f in zip(served, forward)]


def run(name: str, registry: Path, args, data_path: str | None) -> list[dict]:
    from ranking.artifacts import add_serving_variant, load_model
    from ranking.quantize import VariantError, embedding_bytes, model_bytes
    from ranking.train import evaluate_registered, load_train_config, load_frames, train_from_config

    teacher_cfg, student_cfg = (load_train_config(ROOT / p) for p in CONFIGS[name])
    if data_path is not None:
        teacher_cfg, student_cfg = (dataclasses.replace(c, data=dataclasses.replace(c.data, path=data_path))
                                    for c in (teacher_cfg, student_cfg))
    student_cfg = dataclasses.replace(student_cfg, registry=str(registry),
                                      distill_from=dataclasses.replace(student_cfg.distill_from, registry=str(registry)))
    labels_only = dataclasses.replace(student_cfg, name=f"{student_cfg.name}_labels_only", distill_from=None)
    _, _, test, _ = load_frames(teacher_cfg)   # the student's data section is the teacher's: the same test rows
    rows, models = [], []
    for cfg in (teacher_cfg, student_cfg, labels_only):
        t0 = time.perf_counter()
        train_from_config(cfg, registry=str(registry), progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t0
        loaded = load_model(registry, cfg.name)
        scored = evaluate_registered(loaded, cfg, "test", log=lambda m: None, frame=test, keep_predictions=True)
        emb, total = embedding_bytes(loaded.module), model_bytes(loaded.module)
        rows.append({"model": cfg.name, "train_s": seconds, "embedding_bytes": emb, "bytes": total, **scored_parts(scored)})
        models.append(loaded)
        print(f"  trained {cfg.name} in {seconds:.0f} s", flush=True)
    try:
        add_serving_variant(registry, student_cfg.name, "int8")   # the student as served with int8 tables
    except VariantError as exc:   # e.g. a dense-only student: it already is its own served form
        print(f"  no int8 variant of {student_cfg.name}: {exc}", flush=True)
    else:
        int8 = load_model(registry, student_cfg.name, quantized="int8")
        scored = evaluate_registered(int8, student_cfg, "test", log=lambda m: None, frame=test, keep_predictions=True)
        rows.append({"model": f"{student_cfg.name} int8", "train_s": 0.0,
                     "embedding_bytes": embedding_bytes(int8.module), "bytes": model_bytes(int8.module),
                     **scored_parts(scored)})
        models.append(int8)
    for row, (served, forward) in zip(rows, timings(models, test.iloc[:500].reset_index(drop=True), args.repeats)):
        row.update(served_ms=served * 1e3, forward_ms=forward * 1e3)
    return rows


def scored_parts(scored: dict) -> dict:
    """A bench row's share of an ``evaluate_registered(..., keep_predictions=True)`` result."""
    return {"metrics": scored["metrics"], "predictions": scored["predictions"], "labels": scored["labels"]}


def auc_losses(teacher: dict, other: dict, objectives: list[str]) -> str:
    """``click +0.0004 ± 0.0012, ...``: the teacher's AUC minus ``other``'s on the same test rows, with the
    95% half-width of DeLong's paired interval (``ranking.metrics.auc_difference``)."""
    from ranking.metrics import auc_difference

    if not np.array_equal(teacher["labels"], other["labels"]):
        raise ValueError(f"{other['model']} was scored on other test rows than the teacher")
    order = list(teacher["metrics"])
    cells = []
    for k in objectives:
        j = order.index(k)
        loss, se = auc_difference(teacher["labels"][:, j], teacher["predictions"][:, j], other["predictions"][:, j])
        cells.append(f"{k} {loss:+.4f} ± {1.96 * se:.4f}")
    return ", ".join(cells)


def report(name: str, rows: list[dict]) -> None:
    teacher = rows[0]
    objectives = [k for k, m in teacher["metrics"].items() if "auc" in m]
    print(f"\n{name}: 500 candidates, medians; AUC / GAUC on the test split")
    head = f"{'model':<28}{'served ms':>10}{'forward ms':>11}{'x teacher':>10}{'MiB':>8}{'x bytes':>8}"
    print(head + "".join(f"{k:>22}" for k in objectives))
    for r in rows:
        cells = "".join(f"{r['metrics'][k]['auc']:>10.4f} / {r['metrics'][k].get('gauc', float('nan')):.4f}"
                        for k in objectives)
        print(f"{r['model']:<28}{r['served_ms']:>10.2f}{r['forward_ms']:>11.2f}"
              f"{r['served_ms'] / teacher['served_ms']:>10.2f}{r['bytes'] / 2**20:>8.2f}"
              f"{r['bytes'] / teacher['bytes']:>8.3f}{cells}")
    student = rows[1]
    print(f"  student vs teacher: served time x{student['served_ms'] / teacher['served_ms']:.2f}, forward "
          f"x{student['forward_ms'] / teacher['forward_ms']:.2f} (goal <= 0.4); AUC loss (± 95% paired, DeLong) "
          + auc_losses(teacher, student, objectives) + " (goal <= 0.002 each)")
    if len(rows) < 4:   # no int8 variant: the student's own bytes are what it serves
        print(f"  student vs teacher: whole model x{student['bytes'] / teacher['bytes']:.3f} of the teacher's bytes "
              f"(goal <= 0.10)")
        return
    served = rows[3]
    print(f"  student int8 vs teacher: whole model x{served['bytes'] / teacher['bytes']:.3f} of the teacher's bytes "
          f"(goal <= 0.10), embeddings x{served['embedding_bytes'] / teacher['embedding_bytes']:.3f}; forward "
          f"x{served['forward_ms'] / teacher['forward_ms']:.2f}; AUC loss " + auc_losses(teacher, served, objectives))


def main(argv=None) -> int:
    return run_model_bench(__doc__, CONFIGS, "student-bench-", run, report, argv)


if __name__ == "__main__":
    sys.exit(main())
