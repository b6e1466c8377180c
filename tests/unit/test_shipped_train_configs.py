"""Every shipped train config under conf/train/ loads and validates (a config edited without a run of its
trainer would otherwise fail only when someone trains it): the rankers through ``load_train_config``, the
retrieval models through ``load_two_tower_config``, the streaming trainer through ``StreamConfig.load``."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "conf/train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_train_config_loads(path):
    if path.stem.startswith("two_tower"):
        from ranking.two_tower import load_two_tower_config

        cfg = load_two_tower_config(path)
    elif path.stem == "stream":
        from online.stream_train import StreamConfig

        cfg = StreamConfig.load(path)
    else:
        from ranking.train import load_train_config

        cfg = load_train_config(path)
        assert cfg.objectives
        assert Path(cfg.features).exists(), f"{path.name}: features file {cfg.features} is missing"
    assert cfg.name


def test_there_are_configs_to_check():
    assert len(CONFIGS) >= 8
