"""`stratarank evaluate` on simulated logs: per-objective metrics with the oracle, NDCG@10, a plot."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stratarank(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "stratarank.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_evaluate_reports_oracle_auc_ndcg_and_a_reliability_plot(tmp_path):
    sim = tmp_path / "sim"
    out = stratarank("simulate", "--config", "conf/sim/small.yaml", "--out", str(sim), "--impressions", "30000")
    assert out.returncode == 0, out.stderr
    cfg = tmp_path / "train.yaml"
    cfg.write_text((ROOT / "conf/train/sim_mmoe.yaml").read_text().replace("path: runs/sim", f"path: {sim}"))
    out = stratarank("train", "--config", str(cfg), "--registry", str(tmp_path / "registry"), "--epochs", "1",
                     "--no-progress")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    plot = tmp_path / "reliability.png"
    out = stratarank("evaluate", "--registry", str(tmp_path / "registry"), "--model", "sim_mmoe", "--data", str(sim),
                     "--strategy", "conf/objectives/feed.yaml", "--plot", str(plot), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["model"] == "sim_mmoe@v1" and result["split"] == "test" and result["rows"] > 1000
    click = result["objectives"]["click"]
    assert set(click) >= {"auc", "gauc", "logloss", "ece", "oracle_auc", "oracle_ratio"}
    assert 0.5 < click["oracle_auc"] < 1 and abs(click["oracle_ratio"] - click["auc"] / click["oracle_auc"]) < 1e-12
    assert set(result["objectives"]["watch_time"]) >= {"rmse", "mae"}
    assert 0 < result["ndcg@10"] <= 1
    assert plot.stat().st_size > 5000

    bad = stratarank("evaluate", "--registry", str(tmp_path / "registry"), "--model", "sim_mmoe",
                     "--data", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and "no such file or folder" in bad.stderr
    bad = stratarank("evaluate", "--registry", str(tmp_path / "registry"), "--model", "nope", "--data", str(sim))
    assert bad.returncode == 1 and "no model 'nope'" in bad.stderr
