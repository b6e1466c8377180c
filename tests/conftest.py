"""Shared fixtures: paths of the repo and of the shipped configuration."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def feed_yaml() -> Path:
    return ROOT / "conf" / "objectives" / "feed.yaml"


@pytest.fixture
def small_train_config(tmp_path):
    """``write(spec, rows=1500, name="small", **sections) -> (impressions frame, train config path)``: synthetic
    impressions and a tiny MMoE train config (click, like, watch_time) in ``tmp_path``; ``sections`` add or
    replace top keys (``leaves=...``, ``distill=...``)."""
    import json

    from ranking.train import synthetic_impressions

    def write(spec: dict, rows: int = 1500, name: str = "small", **sections):
        df = synthetic_impressions(rows, seed=2)
        df.to_parquet(tmp_path / "imp.parquet")
        (tmp_path / "spec.yaml").write_text(json.dumps(spec))
        cfg = {"name": name, "data": {"loader": "table", "path": str(tmp_path / "imp.parquet")},
               "features": str(tmp_path / "spec.yaml"),
               "objectives": {"click": {"type": "binary"}, "like": {"type": "binary"},
                              "watch_time": {"type": "regression", "transform": "log1p"}},
               "model": {"arch": "mmoe", "expert": [8], "num_experts": 2, "tower": [4]},
               "training": {"epochs": 2, "batch_size": 128, "threads": 1}, "registry": str(tmp_path / "reg"),
               **sections}
        (tmp_path / "train.yaml").write_text(json.dumps(cfg))
        return df, tmp_path / "train.yaml"

    return write


@pytest.fixture(scope="session")
def two_tower(tmp_path_factory):
    """A two-tower model trained on the small world's logs (conf/train/two_tower_small.yaml), registered:
    ``{"registry", "name", "world", "logs"}``."""
    from dataclasses import replace

    import torch

    from ranking.two_tower import load_two_tower_config, register_two_tower, train_two_tower
    from world import World

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("two-tower")
    world = World.from_yaml(ROOT / "conf" / "sim" / "small.yaml")
    logs, _ = world.simulate_logs(progress=False)
    logs.to_parquet(folder / "impressions.parquet")
    cfg = load_two_tower_config(ROOT / "conf" / "train" / "two_tower_small.yaml")
    cfg = replace(cfg, data=replace(cfg.data, loader="table", path=str(folder / "impressions.parquet")),
                  registry=str(folder / "registry"))
    register_two_tower(cfg.registry, cfg.name, train_two_tower(cfg, log=lambda *a: None, progress=False))
    return {"registry": cfg.registry, "name": cfg.name, "world": world, "logs": logs}
