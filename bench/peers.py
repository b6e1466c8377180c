"""serve_bench's peers: other model servers given the same LightGBM model, and what they share.

Each peer is installed by the bench into a virtual environment of its own, ``bench/.peers/NAME/``
(git-ignored), never into the project's lock or venv: the peer's own pinned package plus the
packages the model needs in requirements.lock's versions (:class:`Peer`). Every peer is sent the
same JSON (:func:`invocation_body`: ``dataframe_split`` of the feature columns the model reads,
built from the very candidates serve_bench sends to ``/v1/rank``), answers
``{"predictions": [{objective: score, ...}, ...]}``, and must predict what the booster predicts
(:func:`check_predictions`) before it is timed.

The peers themselves: bench/peer_mlflow.py (MLflow's model server), bench/peer_litserve.py
(LitServe), bench/peer_ray.py (Ray Serve) and bench/peer_bentoml.py (BentoML); :func:`named` gives
them by name.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ("lightgbm", "pandas", "numpy", "scipy")  # pinned as in requirements.lock
INSTALLED = "stratarank-installed.txt"  # in a peer venv: the requirement lines it was made with
NAMES = ("mlflow", "litserve", "ray", "bentoml")


class PeerUnavailable(RuntimeError):
    """The peer could not be installed, saved or started, or it predicts wrongly; the message says why."""


def lock_pins(names=MODEL_PACKAGES, lock: Path = ROOT / "requirements.lock") -> list[str]:
    """``name==version`` of each of ``names`` as requirements.lock pins it."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = f"{name}=={version}"
    missing = [n for n in names if n not in pins]
    if missing:
        raise PeerUnavailable(f"{lock}: no pin for {missing}")
    return [pins[n] for n in names]


class Peer:
    """A model server in its own venv. Subclasses name it and say how to serve a LightGBM folder.

    ``package`` is the server's pinned requirement, ``model_packages`` the lock's packages the
    model needs there; ``ready_path`` answers 200 once the server can predict, ``predict_path``
    takes :func:`invocation_body` JSON; ``how`` says in the report how it serves."""

    name: str
    package: str
    model_packages: tuple[str, ...] = MODEL_PACKAGES
    ready_path: str
    predict_path: str
    how: str = ""

    def __init__(self, root: Path = ROOT, lock: Path | None = None):
        self.root = root
        self.lock = lock or root / "requirements.lock"

    @property
    def label(self) -> str:
        return f"{self.name} {self.predict_path}"

    @property
    def venv(self) -> Path:
        return self.root / "bench/.peers" / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin/python"

    def requirements(self) -> list[str]:
        return [self.package, *lock_pins(self.model_packages, self.lock)]

    def env(self) -> dict:
        """The peer's environment: its venv first on PATH, one OpenMP thread (as the scorer), none
        of the project's PYTHONPATH, and uvicorn's per-request access log off (``--no-access-log``
        through uvicorn's environment; the scorer's gunicorn logs no requests either)."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(OMP_NUM_THREADS="1", UVICORN_ACCESS_LOG="false",
                   PATH=f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
        return env

    def run(self, cmd: list, what: str, timeout: float) -> None:
        """``cmd`` in the peer's environment; a failure is PeerUnavailable with the output's tail."""
        try:
            done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                                  env=self.env(), cwd=self.root)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise PeerUnavailable(f"{what} exited {done.returncode}:\n{tail}")

    def is_installed(self, requirements: list[str]) -> bool:
        marker = self.venv / INSTALLED
        return self.python.exists() and marker.exists() and marker.read_text().split() == requirements

    def ensure_venv(self) -> list[str]:
        """Create (or reuse) the peer venv with the server and the model's packages; the requirement lines."""
        requirements = self.requirements()
        if self.is_installed(requirements):
            return requirements
        print(f"installing the {self.name} peer into {self.venv.relative_to(self.root)}: "
              f"{' '.join(requirements)} ...", flush=True)
        self.run([sys.executable, "-m", "venv", "--clear", self.venv], "python -m venv", 300)
        self.run([self.python, "-m", "pip", "install", "-q", *requirements], f"pip install ({self.name} venv)", 1200)
        (self.venv / INSTALLED).write_text("\n".join(requirements) + "\n")
        return requirements

    def prepare(self, lgbm_dir: Path, work: Path) -> None:
        """Anything the peer needs made from the registered LightGBM folder before it serves."""

    def serve_command(self, lgbm_dir: Path, work: Path, port: int, workers: int) -> list[str]:
        raise NotImplementedError


def named(name: str) -> Peer:
    """The peer called ``name`` (one of NAMES)."""
    if name == "mlflow":
        from peer_mlflow import MLflowPeer
        return MLflowPeer()
    if name == "litserve":
        from peer_litserve import LitServePeer
        return LitServePeer()
    if name == "ray":
        from peer_ray import RayServePeer
        return RayServePeer()
    if name == "bentoml":
        from peer_bentoml import BentoMLPeer
        return BentoMLPeer()
    raise ValueError(f"unknown peer {name!r}: allowed {', '.join(NAMES)}")


def feature_frames(bodies: list[bytes], ranker) -> list:
    """The numeric feature frame that ``ranker`` (a ``RegisteredLGBM``) scores for each request body:
    the scorer's own model-input rows (``Scorer._frame``) through the ranker's own column mapping
    (``is_llm`` from ``source``, NaN for absent columns), captured instead of predicted."""
    from online.app import Scorer
    from ranking.artifacts import RegisteredLGBM
    from strategy import parse_request

    class Capture:  # stands in for the booster set: its "prediction" is the frame it is given
        objectives, feature_columns = ranker.model.objectives, ranker.model.feature_columns

        @staticmethod
        def predict(frame):
            return frame

    capture = RegisteredLGBM(Capture(), ranker.name, ranker.version)
    frames = []
    for body in bodies:
        req = parse_request(json.loads(body))
        frames.append(capture.predict(Scorer._frame(req, list(req.candidates), {}).frame()))
    return frames


def invocation_body(frame) -> bytes:
    """The JSON every peer is sent (MLflow's ``dataframe_split``) of a feature frame; NaN as JSON null."""
    data = [[None if v != v else float(v) for v in row] for row in frame.to_numpy(dtype=np.float64).tolist()]
    return json.dumps({"dataframe_split": {"columns": list(frame.columns), "data": data}}).encode()


def post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """``POST path`` of JSON ``body`` on loopback ``port``: the status and the response body."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_predictions(port: int, path: str, body: bytes, frame, ranker) -> float:
    """Largest absolute difference between a peer's predictions for ``body`` (POSTed to ``path``)
    and the booster's own (``ranker.model.predict`` of the same frame); a peer that answers
    otherwise than 200 with one score per objective and row is PeerUnavailable."""
    status, payload = post(port, path, body)
    if status != 200:
        raise PeerUnavailable(f"{path} answered {status}: {payload[:300]!r}")
    try:
        rows = json.loads(payload)["predictions"]
        got = np.array([[row[name] for name in ranker.objectives] for row in rows], dtype=np.float64)
    except (ValueError, KeyError, TypeError) as exc:
        raise PeerUnavailable(f"{path} answered {payload[:300]!r}: {type(exc).__name__}: {exc}") from None
    want = ranker.model.predict(frame)
    if got.shape != want.shape:
        raise PeerUnavailable(f"{path} returned {got.shape} predictions, the booster {want.shape}")
    return float(np.max(np.abs(got - want)))
