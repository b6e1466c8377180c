"""Training from what the scorer served: the joiner's examples through `loader: served` — hours,
point-in-time history, inverse-propensity weights, schema errors naming file and column — into both
the TorchRec ranker and LightGBM."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from online.bus import open_bus
from online.joiner import JoinerConfig, publish_synthetic, run_joiner, synthetic_served
from ranking.datasets import load_served, read_served, served_parts
from ranking.lgbm import LGBMMultiObjective
from ranking.models import MultiTaskLoss, ObjectiveConfig
from ranking.train import load_frames, train_config_from_dict, train_from_config
from strategy import ValidationError

OBJECTIVES = {"click": "binary", "like": "binary", "share": "binary", "watch_time": "regression",
              "report": "binary"}


@pytest.fixture(scope="module")
def joined(tmp_path_factory, root):
    """A joiner's output folder: 1,500 served requests (15,000 examples) over about two hours."""
    folder = tmp_path_factory.mktemp("served")
    bus = open_bus(f"embedded://{folder / 'bus'}")
    publish_synthetic(bus, synthetic_served(1500, seed=4, window_s=30.0, gap_s=5.0, start_ts=1_767_225_600.0))
    cfg = JoinerConfig(out=str(folder / "joined"), window_s=30.0, grace_s=1.0, topic=None,
                       objectives=str(root / "conf/objectives/feed.yaml"))
    run_joiner(cfg, bus=bus, max_idle_s=0.3, drain=True)
    bus.close()
    return folder / "joined"


def test_served_examples_by_hour_with_point_in_time_history(joined):
    parts = served_parts(joined)
    hours = sorted({p.parent.name for p in parts})
    assert hours == ["hour=2026-01-01T00", "hour=2026-01-01T01", "hour=2026-01-01T02"]
    assert len(read_served(joined)) == 15_000
    assert len(read_served(joined, hours=("2026-01-01T01", "2026-01-01T01"))) == 7_200   # 720 requests an hour

    ds = load_served(joined, OBJECTIVES, valid_frac=0.1, test_frac=0.1)
    assert len(ds.train) + len(ds.valid) + len(ds.test) == 15_000
    assert ds.train["ts"].max() <= ds.valid["ts"].min() <= ds.valid["ts"].max() <= ds.test["ts"].min()
    assert {"position", "duration", "is_llm", "user_click_rate", "item_n_past"} <= set(ds.dense_columns)
    # a user's history counts only impressions served before the row (never the row's own request)
    frame = pd.concat([ds.train, ds.valid, ds.test]).sort_values("ts", kind="mergesort")
    first = frame.groupby("user_id").head(10)
    assert first["user_n_past"].groupby(first["user_id"]).min().eq(0).all()
    some = frame[frame["user_id"] == frame["user_id"].iloc[-1]]
    earlier = (some["ts"].to_numpy()[:, None] > some["ts"].to_numpy()[None, :]).sum(axis=1)
    assert np.array_equal(some["user_n_past"].to_numpy(), earlier)


def test_inverse_propensity_weights_are_clipped_and_mean_one(joined):
    ds = load_served(joined, OBJECTIVES, ips_clip=5.0)
    frame = pd.concat([ds.train, ds.valid, ds.test])
    w = frame["weight"].to_numpy()
    assert w.mean() == pytest.approx(1.0)
    raw = np.minimum(1.0 / frame["propensity"].to_numpy(), 5.0)   # the generator's last slot: 0.05 -> 20 -> 5
    assert np.allclose(w, raw / raw.mean()) and w.max() / w.min() == pytest.approx(5.0)


def test_a_part_of_another_schema_names_the_file_and_the_column(joined, tmp_path):
    copy = tmp_path / "joined"
    shutil.copytree(joined, copy)
    part = sorted(served_parts(copy))[1]
    pd.read_parquet(part).drop(columns=["like", "text"]).to_parquet(part)
    with pytest.raises(ValidationError) as exc:
        read_served(copy, ["like", "text"])
    assert {(e.path, e.file) for e in exc.value.errors} == {("like", str(part)), ("text", str(part))}
    assert "missing column 'like'" in exc.value.errors[0].message
    with pytest.raises(ValidationError) as exc:
        read_served(copy, hours=("2030-01-01T00", None))
    assert exc.value.errors[0].code == "missing_file"


def served_config(joined, root, **data):
    return train_config_from_dict({
        "name": "served_mmoe", "data": {"loader": "served", "path": str(joined), **data},
        "features": str(root / "conf/features/sim.yaml"), "objectives": str(root / "conf/objectives/feed.yaml"),
        "labels": {"watch_time": "watch_time"},
        "model": {"arch": "mmoe", "num_experts": 2, "expert": [16], "tower": [8], "bias_features": ["position"]},
        "training": {"epochs": 1, "batch_size": 512, "threads": 1}})


def test_torchrec_and_lightgbm_train_from_served_logs(joined, root, tmp_path):
    cfg = served_config(joined, root, ips_clip=10, from_hour="2026-01-01T00")
    summary = train_from_config(cfg, registry=str(tmp_path / "registry"), progress=False, log=lambda m: None)
    manifest = json.loads((tmp_path / "registry/served_mmoe/v1/manifest.json").read_text())
    assert summary["version"] == "v1" and manifest["data"]["loader"] == "served"
    assert manifest["data"]["weights"]["mean"] == pytest.approx(1.0, abs=0.05)
    train, valid, test, desc = load_frames(cfg)
    columns = desc["dense_columns"]
    model = LGBMMultiObjective({"click": "binary"}, num_boost_round=20).fit(train, columns, valid,
                                                                             weight_column="weight")
    assert model.predict(test).shape == (len(test), 1)


def test_served_data_keys_are_validated(joined, root):
    with pytest.raises(ValidationError) as exc:
        served_config(joined, root, from_hour="2026-01-01 00", ips_clip=0.5)
    assert {e.path for e in exc.value.errors} == {"data.from_hour", "data.ips_clip"}
    with pytest.raises(ValidationError) as exc:
        train_config_from_dict({"name": "x", "data": {"loader": "sim", "path": "runs/sim", "ips_clip": 5},
                                "features": "conf/features/sim.yaml", "objectives": {"click": {}}})
    assert exc.value.errors[0].path == "data.ips_clip" and "only for loader: served" in exc.value.errors[0].message


def test_weighted_loss_is_the_weighted_mean_of_row_losses():
    loss = MultiTaskLoss((ObjectiveConfig("click"), ObjectiveConfig("t", "regression")))
    out, y = torch.tensor([[0.3, 1.0], [-1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([3.0, 1.0])
    total, per = loss(out, y, w)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y[:, 0], reduction="none")
    assert per[0] == pytest.approx(float((bce * w).sum() / 4))
    assert per[1] == pytest.approx(float((((out[:, 1] - y[:, 1]) ** 2) * w).sum() / 4))
    assert loss(out, y, torch.ones(2))[0] == pytest.approx(float(loss(out, y)[0]))
