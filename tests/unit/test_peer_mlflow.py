"""serve_bench's MLflow peer (bench/peer_mlflow.py): the parts that run in the project's venv.

The peer itself (mlflow in its own venv) is not installed here; these check that what it is sent is
exactly what Stratarank's LightGBM ranker scores, and that its install pins follow the lock.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import peer_mlflow  # noqa: E402 - bench/ is not a package
from serve_bench import make_bodies  # noqa: E402


@pytest.fixture(scope="module")
def ranker(tmp_path_factory):
    from ranking.artifacts import load_registered_lgbm, register_lgbm
    from ranking.lgbm import LGBMMultiObjective

    rng = np.random.default_rng(0)
    n = 1000
    columns = ["prior_score", "duration", "creator_followers", "text_len", "is_llm"]
    frame = pd.DataFrame({c: rng.random(n) for c in columns})
    frame["click"] = (rng.random(n) < 0.1 + 0.5 * frame["prior_score"] * frame["is_llm"]).astype(float)
    frame["watch_time"] = frame["duration"] * 30 + rng.random(n)
    model = LGBMMultiObjective({"click": "binary", "watch_time": "regression"}, num_boost_round=15).fit(frame, columns)
    return load_registered_lgbm(register_lgbm(tmp_path_factory.mktemp("registry"), "feed_lgbm", model, {}))


def test_feature_frames_are_the_rows_the_ranker_scores(ranker):
    from online.app import Scorer
    from strategy import parse_request

    bodies = make_bodies(2, 40, 0.5)
    frames = peer_mlflow.feature_frames(bodies, ranker)
    for body, frame in zip(bodies, frames):
        req = parse_request(json.loads(body))
        rows = Scorer._frame(req, list(req.candidates), {}).frame()
        assert list(frame.columns) == ranker.model.feature_columns
        assert len(frame) == len(req.candidates) == 40
        np.testing.assert_array_equal(frame["is_llm"].to_numpy(),
                                      [float(c["source"] == "llm") for c in json.loads(body)["candidates"]])
        np.testing.assert_array_equal(ranker.model.predict(frame), ranker.predict(rows))


def test_invocation_body_is_strict_json_with_nan_as_null():
    frame = pd.DataFrame({"a": [1.5, np.nan], "b": [0.0, 2.0]})

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    body = json.loads(peer_mlflow.invocation_body(frame), parse_constant=no_constants)
    assert body == {"dataframe_split": {"columns": ["a", "b"], "data": [[1.5, 0.0], [None, 2.0]]}}


def test_lock_pins_follow_the_lock_and_name_what_is_missing(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a comment\nlightgbm==4.7.0\npandas==3.1.1  # why\ntorch==2.5.1\n")
    assert peer_mlflow.lock_pins(("pandas", "lightgbm"), lock) == ["pandas==3.1.1", "lightgbm==4.7.0"]
    with pytest.raises(peer_mlflow.PeerUnavailable, match="scipy"):
        peer_mlflow.lock_pins(("lightgbm", "scipy"), lock)
