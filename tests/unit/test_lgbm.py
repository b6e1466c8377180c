"""ranking.lgbm (per-objective boosters, LambdaMART, text-format save/load), ranking.benchmark and the
``stratarank benchmark`` command, on small synthetic frames."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ranking.benchmark import BenchmarkResult, LightGBMRanker, run_benchmark, score_predictions
from ranking.datasets import Dataset
from ranking.lgbm import LGBMLambdaRanker, LGBMMultiObjective, utility_grades
from ranking.metrics import auc, ndcg_at_k

FEATURES = ["f0", "f1", "f2", "noise"]
FAST = {"learning_rate": 0.1, "num_leaves": 15, "min_data_in_leaf": 20}


def _frame(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    df = pd.DataFrame(x, columns=FEATURES[:3])
    df["noise"] = rng.normal(size=n)
    df["click"] = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - x[:, 1])))).astype(int)
    df["like"] = (rng.random(n) < 1 / (1 + np.exp(-(2 * x[:, 2] - 1)))).astype(int)
    df["watch_time"] = np.exp(0.5 * x[:, 0]) * 3 + rng.normal(0, 0.3, n)
    df["user_id"] = rng.integers(0, 100, n)
    df["date"] = np.repeat(np.arange(10), n // 10 + 1)[:n]
    df["ts"] = np.arange(n, dtype=float)
    return df


@pytest.fixture(scope="module")
def frames():
    df = _frame()
    return df.iloc[:2400].reset_index(drop=True), df.iloc[2400:].reset_index(drop=True)


@pytest.fixture(scope="module")
def fitted(frames):
    train, _ = frames
    model = LGBMMultiObjective({"click": "binary", "like": "binary", "watch_time": "regression"}, FAST,
                               num_boost_round=60)
    return model.fit(train, FEATURES)


def test_multi_objective_learns_each_objective(fitted, frames):
    _, test = frames
    pred = fitted.predict(test)
    assert pred.shape == (len(test), 3)
    assert ((pred[:, :2] > 0) & (pred[:, :2] < 1)).all()
    assert auc(test["click"], pred[:, 0]) > 0.75
    assert auc(test["like"], pred[:, 1]) > 0.75
    # regression in the label's own units
    assert np.corrcoef(pred[:, 2], test["watch_time"])[0, 1] > 0.8
    assert abs(pred[:, 2].mean() - test["watch_time"].mean()) < 0.5


def test_save_load_text_format_round_trip(fitted, frames, tmp_path):
    _, test = frames
    fitted.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["click.txt", "like.txt", "manifest.json", "watch_time.txt"]  # no pickle
    assert (tmp_path / "m" / "click.txt").read_text().startswith("tree")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["objectives"] == {"click": "binary", "like": "binary", "watch_time": "regression"}
    assert manifest["feature_columns"] == FEATURES
    loaded = LGBMMultiObjective.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.predict(test), fitted.predict(test), rtol=1e-12)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({**manifest, "kind": "lambdarank"}))
    with pytest.raises(ValueError):
        LGBMMultiObjective.load(tmp_path / "m")


def test_early_stopping_on_valid_and_errors(frames):
    train, test = frames
    model = LGBMMultiObjective(["click"], {**FAST, "learning_rate": 0.3}, num_boost_round=500,
                               early_stopping_rounds=10).fit(train, FEATURES, valid_df=test)
    assert 0 < model.boosters["click"].best_iteration < 500
    with pytest.raises(KeyError, match="share"):
        LGBMMultiObjective(["share"]).fit(train, FEATURES)
    with pytest.raises(ValueError):
        LGBMMultiObjective({"click": "poisson"})
    with pytest.raises(RuntimeError):
        LGBMMultiObjective(["click"]).predict(test)


def test_utility_grades_monotone():
    u = np.array([0.0, 5.0, 1.0, 5.0, 3.5])
    np.testing.assert_array_equal(utility_grades(u), [0, 3, 1, 3, 2])
    rng = np.random.default_rng(0)
    v = rng.normal(size=1000)
    g = utility_grades(v, max_grade=30)
    assert g.min() == 0 and g.max() == 30
    assert (np.diff(g[np.argsort(v)]) >= 0).all()


def test_lambdarank_ranks_by_utility_and_round_trips(frames, tmp_path):
    train, test = frames
    weights = {"click": 1.0, "like": 4.0}
    ranker = LGBMLambdaRanker(weights, ["user_id"], FAST, num_boost_round=40).fit(train, FEATURES)
    score = ranker.predict(test)
    realised = test["click"] + 4 * test["like"]
    rng = np.random.default_rng(0)
    good = ndcg_at_k(realised, score, test["user_id"], k=5)
    rand = ndcg_at_k(realised, rng.random(len(test)), test["user_id"], k=5)
    assert good > rand + 0.1
    ranker.save(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["manifest.json", "ranker.txt"]
    np.testing.assert_allclose(LGBMLambdaRanker.load(tmp_path / "r").predict(test), score, rtol=1e-12)


# ------------------------------------------------------------------------------ benchmark


class _Oracle:
    """Predicts the labels themselves (AUC 1) — or their negation (AUC 0)."""

    def __init__(self, name, objectives, sign=1.0):
        self.name, self.objectives, self.sign = name, objectives, sign
        self.fitted_on = None

    def fit(self, train, valid):
        self.fitted_on = (len(train), None if valid is None else len(valid))
        return self

    def predict(self, test):
        return self.sign * test[self.objectives].to_numpy(dtype=float)


def _dataset():
    df = _frame(1000)
    return Dataset(train=df.iloc[:800].reset_index(drop=True), test=df.iloc[800:].reset_index(drop=True),
                   objectives=["click", "like"], dense_columns=FEATURES, id_columns=["user_id"], name="synthetic")


def test_run_benchmark_scores_rankers_and_averages():
    ds = _dataset()
    good, bad = _Oracle("good", ds.objectives), _Oracle("bad", ds.objectives, -1.0)
    result = run_benchmark(ds, [good, bad], averages=[("good", "bad"), ("good", "missing")],
                           utility_weights={"click": 1.0, "like": 2.0}, progress=False)
    assert good.fitted_on == (800, None)
    assert result.models == ["good", "bad", "avg(good, bad)"]
    assert result.metrics["good"]["click"]["auc"] == pytest.approx(1.0)
    assert result.metrics["bad"]["like"]["auc"] == pytest.approx(0.0)
    assert result.metrics["avg(good, bad)"]["click"]["auc"] == pytest.approx(0.5)  # all predictions 0
    assert result.ndcg["good"] == pytest.approx(1.0) and result.ndcg["bad"] < 0.9
    table = result.table()
    assert "good" in table and "avg(good, bad)" in table and "1.000 / 1.000" in table
    json.dumps(result.to_dict())  # serialisable
    with pytest.raises(ValueError):
        score_predictions(ds.test, ds.objectives, np.zeros((3, 2)))


def test_lightgbm_ranker_picks_rounds_on_held_out_days():
    ds = _dataset()
    ranker = LightGBMRanker(ds.objectives, FEATURES, {**FAST, "learning_rate": 0.3}, max_rounds=300,
                            early_stopping_rounds=10)
    ranker.fit(ds.train, None)
    assert set(ranker.rounds) == {"click", "like"} and all(20 <= r < 300 for r in ranker.rounds.values())
    pred = ranker.predict(ds.test)
    assert pred.shape == (200, 2)
    assert auc(ds.test["like"], pred[:, 1]) > 0.7


def test_benchmark_result_table_marks_missing_cells():
    r = BenchmarkResult("d", ["click"], ["a", "b"], {"a": {"click": {"auc": 0.7, "gauc": 0.6}}},
                        notes=["TorchRec column left out: x"])
    text = r.table()
    assert "0.700 / 0.600" in text and "note: TorchRec column left out: x" in text


def test_benchmark_cmd_import_is_light_and_registered():
    code = ("import sys, stratarank.benchmark_cmd, ranking.benchmark; "
            "print('torch' in sys.modules, 'lightgbm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    from stratarank.cli import build_parser

    args = build_parser().parse_args(["benchmark", "kuairand", "--models", "popularity", "--json"])
    assert args.models == "popularity" and args.json and callable(args.func)


def test_benchmark_cli_popularity_json(tmp_path, capsys):
    """End to end through the CLI on a small folder in the KuaiRand layout (popularity only: fast)."""
    import importlib.util
    from pathlib import Path

    from stratarank.cli import main

    spec = importlib.util.spec_from_file_location("_kuairand_helpers", Path(__file__).with_name("test_datasets.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    _write_kuairand = helpers._write_kuairand
    _write_kuairand(tmp_path, n=500)
    assert main(["benchmark", "kuairand", "--data", str(tmp_path), "--models", "popularity", "--json",
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["models"] == ["item popularity"]
    assert set(out["metrics"]["item popularity"]) == {"click", "long_view", "like", "comment", "profile_enter"}
    assert out["rows"]["train"] + out["rows"]["test"] == 500
    assert main(["benchmark", "kuairand", "--data", str(tmp_path / "none"), "--models", "popularity"]) == 1
    assert "interactions.tsv" in capsys.readouterr().err
