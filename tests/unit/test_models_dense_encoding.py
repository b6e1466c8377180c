"""Model-side dense encodings (quantile / piecewise / bucket): known values map to known bins, config errors
name the field, the trainer fits the edges on training rows, and a registry round trip (weights_only=True)
predicts identically."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ranking.features import FeatureEncoder, feature_spec_from_dict
from ranking.models import (DenseEncoding, ModelConfig, ObjectiveConfig, build_model, fit_dense_encodings,
                            model_config_from_dict, to_natural)
from strategy.errors import Errors

torch.set_num_threads(1)

OBJECTIVES = (ObjectiveConfig("click"), ObjectiveConfig("like"),
              ObjectiveConfig("watch_time", "regression", "log1p", 0.5))
SPEC = {"name": "t", "features": [
    {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
    {"name": "rate", "type": "dense", "column": "rate"},
    {"name": "count", "type": "dense", "column": "count", "log1p": True},
    {"name": "flag", "type": "dense", "column": "flag"},
]}


def frame(n=400, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"user_id": rng.integers(0, 20, n), "rate": rng.beta(2, 5, n),
                       "count": rng.pareto(1.5, n) * 10, "flag": (rng.random(n) < 0.2).astype(float)})
    z = 3 * (df["rate"] - 0.3) + 0.5 * df["flag"]
    click = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    y = np.stack([click, click * (rng.random(n) < 0.5), click * rng.gamma(2.0, 5.0, n)], axis=1)
    return df, y


def test_piecewise_bucket_and_quantile_map_known_values_to_known_bins():
    x = torch.linspace(0, 100, 10001).unsqueeze(1)                  # uniform: edges 0, 25, 50, 75, 100
    enc = {m: DenseEncoding(1, m, bins=4, dim=3).fit(x) for m in ("piecewise", "bucket", "quantile")}
    assert torch.allclose(enc["piecewise"].edges, torch.tensor([[0.0, 25.0, 50.0, 75.0, 100.0]]))
    probe = torch.tensor([[-5.0], [10.0], [37.5], [75.0], [200.0]])
    pw = enc["piecewise"].piecewise(probe)[:, 0]
    assert torch.allclose(pw, torch.tensor([[0, 0, 0, 0], [0.4, 0, 0, 0], [1, 0.5, 0, 0], [1, 1, 1, 0],
                                            [1, 1, 1, 1.0]]))       # clamped below and above the range
    assert enc["bucket"].bucket(probe)[:, 0].tolist() == [0, 0, 1, 3, 3]
    q = enc["quantile"](probe)[:, 0]
    assert torch.allclose(q, torch.tensor([-1.0, -0.8, -0.25, 0.5, 1.0]))   # 2 * train CDF - 1
    assert enc["piecewise"](probe).shape == (5, 3) and enc["bucket"](probe).shape == (5, 3)


def test_a_few_distinct_values_get_a_few_bins():
    x = torch.tensor([[0.0]] * 80 + [[1.0]] * 20)                       # a 0/1 flag, 20% ones
    e = DenseEncoding(1, "piecewise", bins=8, dim=2).fit(x)
    assert e.edges[0, :2].tolist() == [0.0, 1.0] and torch.all(e.edges[0, 2:] == 1.0)   # zero-width padding
    pw = e.piecewise(torch.tensor([[0.0], [1.0], [0.5]]))[:, 0]
    assert pw[:, 1:].abs().sum() == 0 and pw[:, 0].tolist() == [0.0, 1.0, 0.5]
    b = DenseEncoding(1, "bucket", bins=8, dim=2).fit(x)
    assert b.bucket(torch.tensor([[0.0], [1.0]]))[:, 0].tolist() == [0, 7]
    q = DenseEncoding(1, "quantile", bins=8, dim=2).fit(x)
    assert q(torch.tensor([[0.0], [1.0]]))[:, 0].tolist() == [-1.0, 1.0]


def test_unfitted_encoding_refuses_to_run_and_fit_dense_encodings_fits_once():
    df, _ = frame()
    enc = FeatureEncoder(feature_spec_from_dict(SPEC)).fit(df)
    batch = enc.transform(df)
    model = build_model(enc, OBJECTIVES, ModelConfig(expert=(8,), num_experts=2, tower=(4,),
                                                     dense_encoding="piecewise", dense_bins=4))
    with pytest.raises(RuntimeError, match="not fitted"):
        model(batch.dense, batch.kjt)
    assert fit_dense_encodings(model, batch.dense) == 1
    edges = model.dense_encoding.edges.clone()
    assert fit_dense_encodings(model, batch.dense[:10] * 5) == 0           # fitted edges are kept
    assert torch.equal(model.dense_encoding.edges, edges)
    assert model(batch.dense, batch.kjt).shape == (len(df), 3)


def test_config_errors_name_the_field_and_allowed_values():
    errs = Errors()
    assert model_config_from_dict(errs, {"dense_encoding": "quantiles", "dense_bins": 1,
                                         "dense_embedding_dim": 0}) is None
    by_path = {e.path: e.message for e in errs.items}
    assert set(by_path) == {"model.dense_encoding", "model.dense_bins", "model.dense_embedding_dim"}
    assert "none, quantile, piecewise, bucket" in by_path["model.dense_encoding"]
    cfg = model_config_from_dict(Errors(), {"dense_encoding": "bucket", "dense_bins": 8, "dense_embedding_dim": 4})
    assert cfg == ModelConfig(dense_encoding="bucket", dense_bins=8, dense_embedding_dim=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="model.dense_encoding"):
        DenseEncoding(2, "quantiles", 4, 2)


@pytest.mark.parametrize("mode", ["piecewise", "bucket", "quantile"])
def test_registry_round_trip_with_weights_only_predicts_identically(tmp_path, mode):
    from ranking.artifacts import load_model, save_model

    df, y = frame()
    enc = FeatureEncoder(feature_spec_from_dict(SPEC)).fit(df)
    batch = enc.transform(df)
    cfg = ModelConfig(expert=(8,), num_experts=2, tower=(4,), dense_encoding=mode, dense_bins=6,
                      dense_embedding_dim=3)
    torch.manual_seed(1)
    model = build_model(enc, OBJECTIVES, cfg)
    fit_dense_encodings(model, batch.dense)
    model.eval()
    path = save_model(tmp_path, "enc", model.state_dict(), enc, cfg, OBJECTIVES, {"valid": {}})
    state = torch.load(path / "weights.pt", weights_only=True)
    assert state["dense_encoding.edges"].shape == (3, 7) and bool(state["dense_encoding.fitted"])
    assert json.loads((path / "manifest.json").read_text())["model"]["config"]["dense_encoding"] == mode
    loaded = load_model(tmp_path, "enc")
    with torch.no_grad():
        want = to_natural(model(batch.dense, batch.kjt), OBJECTIVES).double().numpy()
    got = loaded.predict(df)
    np.testing.assert_array_equal(got, want)
    assert torch.equal(loaded.module.dense_encoding.edges, model.dense_encoding.edges)


def test_trainer_fits_the_edges_on_training_rows_and_registers(tmp_path):
    from ranking.artifacts import load_model
    from ranking.train import load_train_config, synthetic_impressions, train_from_config

    df = synthetic_impressions(600, seed=2)
    df.to_parquet(tmp_path / "imp.parquet")
    spec = {"name": "t", "features": [
        {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
        {"name": "prior_score", "type": "dense", "column": "prior_score"},
        {"name": "duration", "type": "dense", "column": "duration", "log1p": True},
        {"name": "creator_followers", "type": "dense", "column": "creator_followers", "log1p": True}]}
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    (tmp_path / "train.yaml").write_text(json.dumps({
        "name": "tiny_enc", "data": {"loader": "table", "path": str(tmp_path / "imp.parquet")},
        "features": str(tmp_path / "spec.yaml"),
        "objectives": {"click": {"type": "binary"}, "watch_time": {"type": "regression", "transform": "log1p"}},
        "model": {"arch": "mmoe", "expert": [8], "tower": [4], "dense_encoding": "piecewise", "dense_bins": 8},
        "training": {"epochs": 2, "batch_size": 128, "threads": 1}, "registry": str(tmp_path / "reg")}))
    summary = train_from_config(load_train_config(tmp_path / "train.yaml"), log=lambda *a: None, progress=False)
    loaded = load_model(tmp_path / "reg", "tiny_enc")
    edges = loaded.module.dense_encoding.edges
    assert edges.shape == (3, 9) and bool(torch.all(edges[:, 1:] >= edges[:, :-1]))
    # the edges are the training rows' quantiles (the trainer's first 80% of rows by time)
    train_dense = loaded.encoder.transform(df.iloc[:480]).dense[:, 2].double().numpy()
    want = np.unique(np.quantile(train_dense, np.linspace(0, 1, 9)))
    assert np.allclose(edges[2, :len(want)].double().numpy(), want, atol=1e-5)
    assert loaded.predict(df.iloc[:5]).shape == (5, 2)
    assert 0 <= summary["metrics"]["valid"]["click"]["auc"] <= 1
