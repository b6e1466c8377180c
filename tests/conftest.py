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
