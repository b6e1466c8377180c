"""What the model benchmarks share: their data options and the simulated logs they train on."""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_bench_args(doc: str, data_sets, argv=None) -> argparse.Namespace:
    """``--data`` (some of ``data_sets``), ``--repeats`` (timing runs) and ``--sim-impressions``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--data", nargs="+", choices=sorted(data_sets), default=sorted(data_sets))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sim-impressions", type=int, default=1_000_000, help="simulated logs (conf/sim/default.yaml)")
    return ap.parse_args(argv)


def simulated_logs(folder: Path, impressions: int) -> str:
    """Simulate ``impressions`` of the default world into ``folder/sim/impressions.parquet``; the folder's path."""
    from world import World

    logs = Path(folder) / "sim"
    logs.mkdir(parents=True)
    imp, _ = World.from_yaml(ROOT / "conf/sim/default.yaml").simulate_logs(impressions, progress=False)
    imp.to_parquet(logs / "impressions.parquet")
    return str(logs)


def run_model_bench(doc: str, data_sets, prefix: str, run, report, argv=None) -> int:
    """For each ``--data`` set: ``report(name, run(name, registry, args, data_path))``, one torch
    thread, a fresh temporary registry (``data_path``: the simulated logs for ``sim``, else None)."""
    import tempfile

    import torch

    args = model_bench_args(doc, data_sets, argv)
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    for name in args.data:
        data_path = simulated_logs(folder, args.sim_impressions) if name == "sim" else None
        print(f"{name}:", flush=True)
        report(name, run(name, folder / "registry", args, data_path))
    return 0
