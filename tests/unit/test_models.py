"""Multi-task models on an EmbeddingBagCollection: shapes, losses, natural units, config validation."""
import numpy as np
import pandas as pd
import pytest
import torch

from ranking.features import FeatureEncoder, feature_spec_from_dict
from ranking.models import (ModelConfig, MultiTaskLoss, MultiTaskRanker, ObjectiveConfig, PlainMultiTaskRanker,
                            build_model, model_config_from_dict, to_natural, transform_labels)
from strategy.errors import Errors

torch.set_num_threads(1)

OBJECTIVES = (ObjectiveConfig("click"), ObjectiveConfig("like", loss_weight=2.0),
              ObjectiveConfig("watch_time", "regression", "log1p", 0.5))
SPEC = feature_spec_from_dict({"features": [
    {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
    {"name": "item_id", "type": "id", "column": "item_id", "dim": 4},
    {"name": "recent", "type": "id_list", "column": "recent", "table": "item_id"},
    {"name": "text", "type": "text", "column": "text", "buckets": 16, "dim": 4},
    {"name": "score", "type": "dense", "column": "score"},
]})


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 8, n)
    item = rng.integers(0, 12, n)
    df = pd.DataFrame({"user_id": user, "item_id": item,
                       "recent": [list(rng.integers(0, 12, 3)) for _ in range(n)],
                       "text": [f"w{i % 3} w{i % 5}" for i in item], "score": rng.normal(size=n)})
    click = ((user + item) % 2 == 0).astype(float)
    y = np.stack([click, click * (item % 3 == 0), click * (item + 1.0) * 3], axis=1)
    return df, y


@pytest.fixture(scope="module")
def encoded():
    df, y = data()
    enc = FeatureEncoder(SPEC).fit(df)
    return enc, enc.transform(df), y


@pytest.mark.parametrize("arch", ["shared_bottom", "mmoe", "ple"])
def test_each_arch_forward_backward(encoded, arch):
    enc, batch, y = encoded
    cfg = ModelConfig(arch=arch, bottom=(16,), expert=(16, 8), num_experts=3, num_shared_experts=1,
                      num_task_experts=1, num_levels=2, tower=(8,))
    torch.manual_seed(0)
    model = build_model(enc, OBJECTIVES, cfg)
    assert isinstance(model, MultiTaskRanker)
    out = model(batch.dense, batch.kjt)
    assert out.shape == (len(batch), len(OBJECTIVES))
    loss, per = MultiTaskLoss(OBJECTIVES)(out, torch.from_numpy(transform_labels(y, OBJECTIVES)))
    loss.backward()
    assert per.shape == (3,) and torch.isfinite(loss)
    assert model.ebc.embedding_bags["t_item_id"].weight.grad is not None


def test_training_lowers_the_loss(encoded):
    enc, batch, y = encoded
    torch.manual_seed(0)
    model = build_model(enc, OBJECTIVES, ModelConfig(arch="mmoe", expert=(16,), num_experts=2, tower=(8,)))
    targets = torch.from_numpy(transform_labels(y, OBJECTIVES))
    loss_fn = MultiTaskLoss(OBJECTIVES)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = None
    for _ in range(60):
        loss, _ = loss_fn(model(batch.dense, batch.kjt), targets)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_loss_is_weighted_bce_plus_mse():
    out = torch.tensor([[0.0, 2.0, 1.0], [1.0, -1.0, 3.0]])
    tgt = torch.tensor([[1.0, 0.0, 1.5], [0.0, 1.0, 2.0]])
    total, per = MultiTaskLoss(OBJECTIVES)(out, tgt)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = torch.stack([bce(out[:, 0], tgt[:, 0]), bce(out[:, 1], tgt[:, 1]), ((out[:, 2] - tgt[:, 2]) ** 2).mean()])
    assert torch.allclose(per, expected)
    assert torch.isclose(total, expected[0] + 2.0 * expected[1] + 0.5 * expected[2])


def test_natural_units_and_label_transform():
    y = np.array([[1.0, 0.0, 9.0]])
    t = transform_labels(y, OBJECTIVES)
    assert t[0, 2] == pytest.approx(np.log1p(9.0))
    nat = to_natural(torch.tensor([[0.0, 100.0, float(np.log1p(9.0))]]), OBJECTIVES)
    assert nat[0, 0] == pytest.approx(0.5) and nat[0, 1] == pytest.approx(1.0)
    assert nat[0, 2] == pytest.approx(9.0, rel=1e-5)                   # seconds again
    assert to_natural(torch.tensor([[0.0, 0.0, -3.0]]), OBJECTIVES)[0, 2] == 0.0  # clipped at 0


def test_plain_pytorch_twin_has_the_same_shape(encoded):
    enc, batch, _ = encoded
    cfg = ModelConfig(arch="mmoe", expert=(16,), num_experts=2, tower=(8,))
    trec = build_model(enc, OBJECTIVES, cfg)
    plain = PlainMultiTaskRanker(enc.embedding_bag_configs(), enc.dense_dim, OBJECTIVES, cfg)
    assert plain(batch.dense, batch.kjt).shape == trec(batch.dense, batch.kjt).shape
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in trec.parameters())


def test_model_config_validation():
    errs = Errors()
    assert model_config_from_dict(errs, {"arch": "mmoee", "num_experts": 0, "expertt": [4]}) is None
    paths = {e.path for e in errs.items}
    assert {"model.arch", "model.num_experts", "model.expertt"} <= paths
    assert "did you mean 'mmoe'" in " ".join(e.message for e in errs.items)
    cfg = model_config_from_dict(Errors(), {"arch": "ple", "expert": [8], "num_levels": 2})
    assert cfg == ModelConfig(arch="ple", expert=(8,), num_levels=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_dot_interaction_and_position_bias_tower():
    spec = feature_spec_from_dict({"features": [
        {"name": "user_id", "type": "id", "column": "user_id", "dim": 4},
        {"name": "item_id", "type": "id", "column": "item_id", "dim": 6},
        {"name": "position", "type": "id", "column": "position", "dim": 2, "fill": 1},
        {"name": "score", "type": "dense", "column": "score"},
    ]})
    df, y = data()
    df = df.assign(position=np.arange(len(df)) % 5 + 1)
    enc = FeatureEncoder(spec).fit(df)
    cfg = ModelConfig(expert=(8,), num_experts=2, tower=(4,), interaction="dot", interaction_dim=3,
                      bias_features=("position",))
    torch.manual_seed(0)
    model = build_model(enc, OBJECTIVES, cfg)
    assert model.body_names == ["user_id", "item_id"] and model.bias_names == ["position"]
    assert model.interaction.out_dim == 3                     # user, item, dense: 3 pairs
    batch = enc.transform(df)
    out = model(batch.dense, batch.kjt)
    assert out.shape == (len(df), 3)
    out.sum().backward()
    assert model.bias_tower.weight.grad is not None and model.interaction.proj[0].weight.grad is not None
    # the position only shifts the logits: same rows served without a position column (filled with 1)
    # differ from the logged rows by the bias tower's output alone, equal where position == 1
    with torch.no_grad():
        served = enc.transform(df.drop(columns=["position"]))
        o_served, o_logged = model(served.dense, served.kjt), model(batch.dense, batch.kjt)
    at_top = torch.from_numpy((df["position"] == 1).to_numpy().copy())
    assert torch.allclose(o_served[at_top], o_logged[at_top])
    assert not torch.allclose(o_served[~at_top], o_logged[~at_top])
    with pytest.raises(ValueError, match="bias_features"):
        build_model(enc, OBJECTIVES, ModelConfig(bias_features=("nope",)))
    errs = Errors()
    assert model_config_from_dict(errs, {"interaction": "cross"}) is None and "model.interaction" in str(errs.items)
    assert model_config_from_dict(Errors(), {"interaction": "dot", "bias_features": ["position"]}) == \
        ModelConfig(interaction="dot", bias_features=("position",))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_smearing_makes_natural_units_unbiased_in_mean(tmp_path):
    from ranking.models import smearing_factor, with_smearing
    from ranking.artifacts import load_model, save_model

    rng = np.random.default_rng(0)
    mu = rng.normal(1.0, 0.5, 20000)
    y = np.expm1(mu + rng.normal(0, 1.0, mu.shape))           # log1p(y) = mu + noise (sd 1)
    y = np.clip(y, 0, None)
    outputs = np.stack([np.zeros_like(mu), mu], axis=1)     # the log-space mean: a geometric-mean estimate
    objectives = (ObjectiveConfig("click"), ObjectiveConfig("watch_time", "regression", "log1p"))
    naive = to_natural(torch.from_numpy(outputs), objectives)[:, 1].numpy()
    assert naive.mean() < 0.75 * y.mean()                     # expm1 of a log-space fit is biased low
    factor = smearing_factor(outputs[:, 1], y)
    assert 1.3 < factor < 2.5                                # ~ E[exp(noise)] = exp(0.5)
    fixed = with_smearing(objectives, outputs, np.stack([np.zeros_like(y), y], axis=1))
    assert fixed[0].output_scale == 1.0 and fixed[1].output_scale == pytest.approx(factor, rel=1e-5)
    nat = to_natural(torch.from_numpy(outputs), fixed)[:, 1].numpy()
    assert nat.mean() == pytest.approx(y.mean(), rel=1e-4)
    assert smearing_factor(np.full(3, -5.0), np.zeros(3)) == 1.0   # degenerate: no correction
    # the factor is saved with the objective and applied by a loaded model
    df, _ = data()
    enc = FeatureEncoder(SPEC).fit(df)
    model = build_model(enc, fixed, ModelConfig(expert=(8,), num_experts=2, tower=()))
    path = save_model(tmp_path, "m", model.state_dict(), enc, model.config, fixed, {})
    loaded = load_model(tmp_path, "m")
    assert loaded.objective_configs[1].output_scale == pytest.approx(factor, rel=1e-5)
    with torch.no_grad():
        raw = model(enc.transform(df).dense, enc.transform(df).kjt)
    expect = np.clip(np.expm1(raw[:, 1].numpy()), 0, None) * fixed[1].output_scale
    assert np.allclose(loaded.predict(df)[:, 1], expect, rtol=1e-5)
    assert path.exists()


@pytest.mark.parametrize("arch,expert,tower", [("shared_bottom", (16, 8), (8,)), ("mmoe", (16, 8), (8,)),
                                                ("mmoe", (16,), (8, 4)), ("mmoe", (8,), ()), ("ple", (16, 8), (8,))])
def test_serving_runs_stacked_experts_gates_and_towers_with_the_same_outputs(encoded, arch, expert, tower):
    """Eval without autograd takes the stacked path (one batched matmul per layer); it equals the
    per-module path (eval with autograd on), and follows the weights after a load_state_dict."""
    enc, batch, _ = encoded
    cfg = ModelConfig(arch=arch, bottom=(16,), expert=expert, num_experts=3, num_shared_experts=1,
                      num_task_experts=1, num_levels=2, tower=tower)
    torch.manual_seed(1)
    model = build_model(enc, OBJECTIVES, cfg).eval()
    with torch.inference_mode():
        fast = model(batch.dense, batch.kjt)
    reference = model(batch.dense, batch.kjt).detach()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    torch.manual_seed(2)
    other = build_model(enc, OBJECTIVES, cfg).eval()
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        moved = model(batch.dense, batch.kjt)
    torch.testing.assert_close(moved, other(batch.dense, batch.kjt).detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(moved, fast)
