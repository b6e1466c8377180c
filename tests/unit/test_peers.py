"""serve_bench's peers (bench/peers.py, peer_mlflow.py, peer_litserve.py, peer_ray.py, peer_bentoml.py,
peer_lgbm.py): the parts that run in the project's venv.

The peers themselves (mlflow, litserve, ray, bentoml in their own venvs) are not installed here; these check that
what they are sent is exactly what Stratarank's LightGBM ranker scores, that the model code they
share decodes, scores and answers as the booster does (behind a real HTTP server), and that their
venvs are made with the lock's pins and reused, never installed twice.
"""
import http.server
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import peer_lgbm  # noqa: E402 - bench/ is not a package
import peers  # noqa: E402
from serve_bench import make_bodies  # noqa: E402


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    from ranking.artifacts import register_lgbm
    from ranking.lgbm import LGBMMultiObjective

    rng = np.random.default_rng(0)
    n = 1000
    columns = ["prior_score", "duration", "creator_followers", "text_len", "is_llm"]
    frame = pd.DataFrame({c: rng.random(n) for c in columns})
    frame["click"] = (rng.random(n) < 0.1 + 0.5 * frame["prior_score"] * frame["is_llm"]).astype(float)
    frame["watch_time"] = frame["duration"] * 30 + rng.random(n)
    model = LGBMMultiObjective({"click": "binary", "watch_time": "regression"}, num_boost_round=15).fit(frame, columns)
    return register_lgbm(tmp_path_factory.mktemp("registry"), "feed_lgbm", model, {})


@pytest.fixture(scope="module")
def ranker(registered):
    from ranking.artifacts import load_registered_lgbm

    return load_registered_lgbm(registered)


@pytest.fixture(scope="module")
def frames(ranker):
    return peers.feature_frames(make_bodies(2, 40, 0.5), ranker)


def test_feature_frames_are_the_rows_the_ranker_scores(ranker):
    from online.app import Scorer
    from strategy import parse_request

    bodies = make_bodies(2, 40, 0.5)
    frames = peers.feature_frames(bodies, ranker)
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

    body = json.loads(peers.invocation_body(frame), parse_constant=no_constants)
    assert body == {"dataframe_split": {"columns": ["a", "b"], "data": [[1.5, 0.0], [None, 2.0]]}}


def test_lock_pins_follow_the_lock_and_name_what_is_missing(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a comment\nlightgbm==4.7.0\npandas==3.1.1  # why\ntorch==2.5.1\n")
    assert peers.lock_pins(("pandas", "lightgbm"), lock) == ["pandas==3.1.1", "lightgbm==4.7.0"]
    with pytest.raises(peers.PeerUnavailable, match="scipy"):
        peers.lock_pins(("lightgbm", "scipy"), lock)


def test_each_peer_pins_its_server_and_the_locks_model_packages():
    pins = dict(line.split("==") for line in peers.lock_pins(("lightgbm", "pandas", "numpy", "scipy")))
    mlflow, litserve = peers.named("mlflow"), peers.named("litserve")
    assert mlflow.requirements() == ["mlflow-skinny==3.17.2", *(f"{n}=={pins[n]}" for n in
                                                                ("lightgbm", "pandas", "numpy", "scipy"))]
    assert litserve.requirements() == ["litserve==0.2.19", *(f"{n}=={pins[n]}" for n in ("lightgbm", "numpy", "scipy"))]
    assert {mlflow.venv, litserve.venv} == {ROOT / "bench/.peers/mlflow", ROOT / "bench/.peers/litserve"}
    with pytest.raises(ValueError, match="mlflow, litserve, ray, bentoml"):
        peers.named("torchserve")


def test_ray_and_bentoml_pin_their_server_and_the_locks_model_packages_without_pandas():
    pins = dict(line.split("==") for line in peers.lock_pins(("lightgbm", "numpy", "scipy")))
    model = [f"{n}=={pins[n]}" for n in ("lightgbm", "numpy", "scipy")]
    ray, bentoml = peers.named("ray"), peers.named("bentoml")
    assert ray.requirements() == ["ray[serve]==2.60.0", *model]
    assert bentoml.requirements() == ["bentoml==1.4.40", *model]
    assert (ray.venv, bentoml.venv) == (ROOT / "bench/.peers/ray", ROOT / "bench/.peers/bentoml")
    assert [peers.named(n).name for n in peers.NAMES] == ["mlflow", "litserve", "ray", "bentoml"]
    assert (ray.label, bentoml.label) == ("ray /predict", "bentoml /predict")


def test_serve_commands_run_in_the_peer_venv_with_the_scorers_worker_count(tmp_path):
    lgbm_dir = tmp_path / "lightgbm"
    litserve = peers.named("litserve")
    cmd = litserve.serve_command(lgbm_dir, tmp_path, 8123, 3)
    assert cmd == [str(ROOT / "bench/.peers/litserve/bin/python"), str(ROOT / "bench/peer_litserve_server.py"),
                   str(lgbm_dir), "--port", "8123", "--workers", "3"]
    cmd = peers.named("mlflow").serve_command(lgbm_dir, tmp_path, 8123, 3)
    assert cmd[:3] == [str(ROOT / "bench/.peers/mlflow/bin/mlflow"), "models", "serve"]
    assert cmd[cmd.index("-m") + 1] == str(tmp_path / "mlflow-model") and cmd[cmd.index("-w") + 1] == "3"
    env = litserve.env()
    assert env["PATH"].split(":")[0] == str(ROOT / "bench/.peers/litserve/bin")
    assert env["OMP_NUM_THREADS"] == "1" and "PYTHONPATH" not in env


def test_ray_serves_from_a_script_of_its_own_with_a_replica_per_worker_and_its_files_in_work(tmp_path):
    lgbm_dir = tmp_path / "lightgbm"
    ray = peers.named("ray")
    assert ray.serve_command(lgbm_dir, tmp_path, 8123, 3) == [
        str(ROOT / "bench/.peers/ray/bin/python"), str(ROOT / "bench/peer_ray_server.py"), str(lgbm_dir),
        "--port", "8123", "--workers", "3", "--work", str(tmp_path / "ray")]
    assert (ray.ready_path, ray.predict_path) == ("/health", "/predict")
    assert (ROOT / "bench/peer_ray_server.py").exists()
    env = ray.env()
    assert env["PATH"].split(":")[0] == str(ROOT / "bench/.peers/ray/bin")
    assert env["OMP_NUM_THREADS"] == "1" and "PYTHONPATH" not in env


def test_bentoml_serves_the_service_file_with_the_model_and_worker_count_as_its_arguments(tmp_path):
    lgbm_dir = tmp_path / "lightgbm"
    bentoml = peers.named("bentoml")
    cmd = bentoml.serve_command(lgbm_dir, tmp_path, 8123, 3)
    assert cmd[:3] == [str(ROOT / "bench/.peers/bentoml/bin/bentoml"), "serve",
                       "peer_bentoml_service:LightGBMService"]
    assert cmd[cmd.index("--working-dir") + 1] == str(ROOT / "bench")
    assert (ROOT / "bench/peer_bentoml_service.py").exists()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    args = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--arg"]
    assert args == [f"lgbm_dir={lgbm_dir}", "workers=3"]
    assert "--do-not-track" in cmd
    assert (bentoml.ready_path, bentoml.predict_path) == ("/readyz", "/predict")


class Recorded(peers.Peer):
    """A peer whose commands are recorded instead of run (no venv is made, nothing installed)."""
    name, package, ready_path, predict_path = "fake", "fakeserver==1.0", "/health", "/predict"
    model_packages = ("lightgbm",)

    def __init__(self, root):
        super().__init__(root)
        self.commands = []

    def run(self, cmd, what, timeout):
        self.commands.append([str(c) for c in cmd])
        if "venv" in cmd:
            (self.venv / "bin").mkdir(parents=True, exist_ok=True)
            self.python.write_text("")


def test_ensure_venv_installs_the_pinned_lines_once_and_again_when_the_lock_changes(tmp_path):
    (tmp_path / "requirements.lock").write_text("lightgbm==4.7.0\n")
    peer = Recorded(tmp_path)
    assert peer.ensure_venv() == ["fakeserver==1.0", "lightgbm==4.7.0"]
    venv, pip = peer.commands
    assert venv == [sys.executable, "-m", "venv", "--clear", str(tmp_path / "bench/.peers/fake")]
    assert pip == [str(tmp_path / "bench/.peers/fake/bin/python"), "-m", "pip", "install", "-q",
                   "fakeserver==1.0", "lightgbm==4.7.0"]
    assert peer.ensure_venv() == ["fakeserver==1.0", "lightgbm==4.7.0"]
    assert len(peer.commands) == 2                      # the same lines: reused, nothing run
    (tmp_path / "requirements.lock").write_text("lightgbm==4.8.0\n")
    peer.ensure_venv()
    assert peer.commands[-1][-1] == "lightgbm==4.8.0"    # a new pin: made again


def test_a_failing_peer_command_is_unavailable_with_its_output(tmp_path):
    peer = peers.named("litserve")
    with pytest.raises(peers.PeerUnavailable, match="the step exited 3:\nboom"):
        peer.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], "the step", 60)


def test_decode_split_reads_the_models_columns_in_its_order(ranker, frames):
    frame = frames[0].copy()
    frame.iloc[0, 1] = np.nan
    shuffled = frame[list(reversed(frame.columns))].assign(extra=1.0)
    x = peer_lgbm.decode_split(json.loads(peers.invocation_body(shuffled)), ranker.model.feature_columns)
    np.testing.assert_array_equal(x, frame.to_numpy(dtype=np.float64))


@pytest.mark.parametrize("body, field", [
    ([1, 2], "dataframe_split: required"),
    ({"dataframe_split": {"columns": "a", "data": [[1]]}}, "dataframe_split.columns: required"),
    ({"dataframe_split": {"columns": ["a"], "data": [[1]]}}, r"dataframe_split.columns: missing \['b'\]"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": []}}, "dataframe_split.data: required"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3]]}}, "dataframe_split.data: rows of 2"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, "2"]]}}, "numbers or null"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, True]]}}, "numbers or null"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 10 ** 400]]}}, "too large"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, float("inf")]]}}, "infinite"),
])
def test_decode_split_names_the_bad_field(body, field):
    with pytest.raises(peer_lgbm.BadRequest, match=field):
        peer_lgbm.decode_split(body, ["a", "b"])


@pytest.fixture
def lgbm_server(registered):
    """A real HTTP server answering POST /predict with the peers' shared model code (what the
    LitServe peer's LitAPI runs: decode_split, scores, encode), or with ``answer`` when set."""
    from ranking.artifacts import LGBM_DIR

    columns, boosters = peer_lgbm.load_folder(registered / LGBM_DIR)
    state = {"answer": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = state["answer"] or peer_lgbm.encode(peer_lgbm.scores(boosters,
                                                                          peer_lgbm.decode_split(body, columns)))
            payload = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def test_the_shared_model_code_predicts_what_the_booster_predicts(lgbm_server, ranker, frames):
    port, state = lgbm_server
    frame = frames[0]
    assert peers.check_predictions(port, "/predict", peers.invocation_body(frame), frame, ranker) < 1e-12
    rows = peer_lgbm.encode(dict(zip(ranker.objectives, ranker.model.predict(frame).T)))["predictions"]
    state["answer"] = {"predictions": [{**r, "click": r["click"] + 0.5} for r in rows]}
    assert peers.check_predictions(port, "/predict", peers.invocation_body(frame), frame, ranker) == pytest.approx(0.5)
    state["answer"] = {"predictions": rows[:-1]}
    with pytest.raises(peers.PeerUnavailable, match=r"returned \(39, 2\) predictions, the booster \(40, 2\)"):
        peers.check_predictions(port, "/predict", peers.invocation_body(frame), frame, ranker)
    state["answer"] = {"scores": []}
    with pytest.raises(peers.PeerUnavailable, match="KeyError"):
        peers.check_predictions(port, "/predict", peers.invocation_body(frame), frame, ranker)
