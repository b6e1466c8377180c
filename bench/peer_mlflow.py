"""MLflow's model server as serve_bench's peer: the same LightGBM model behind ``mlflow models serve``.

MLflow is installed by the bench into a virtual environment of its own, ``bench/.peers/mlflow/``
(git-ignored), never into the project's lock or venv: ``MLFLOW_PACKAGE`` plus the packages the model
needs in requirements.lock's versions. The registered LightGBM model is saved as an MLflow pyfunc
model by ``bench/peer_mlflow_model.py`` run with the peer's python, and served with
``--env-manager local`` (the peer venv's own packages). Requests are ``dataframe_split`` JSON of the
feature columns the model reads, built from the very candidates serve_bench sends to ``/v1/rank``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# `mlflow models serve --env-manager local` needs only the skinny package: its scoring server is
# uvicorn + fastapi, both dependencies of mlflow-skinny (the full package adds the tracking UI)
MLFLOW_PACKAGE = "mlflow-skinny==3.17.2"
MODEL_PACKAGES = ("lightgbm", "pandas", "numpy", "scipy")  # pinned as in requirements.lock
VENV = ROOT / "bench/.peers/mlflow"
MODEL_CODE = ROOT / "bench/peer_mlflow_model.py"
INSTALLED = "stratarank-installed.txt"  # in the venv: the requirement lines it was made with


class PeerUnavailable(RuntimeError):
    """The peer could not be installed, saved or started; the message says why."""


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


def peer_python() -> Path:
    return VENV / "bin/python"


def _run(cmd: list, what: str, timeout: float) -> None:
    try:
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                              env=peer_env(), cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise PeerUnavailable(f"{what} exited {done.returncode}:\n{tail}")


def ensure_venv() -> list[str]:
    """Create (or reuse) the peer venv with MLflow and the model's packages; the requirement lines."""
    requirements = [MLFLOW_PACKAGE, *lock_pins()]
    marker = VENV / INSTALLED
    if peer_python().exists() and marker.exists() and marker.read_text().split() == requirements:
        return requirements
    print(f"installing the MLflow peer into {VENV.relative_to(ROOT)}: {' '.join(requirements)} ...", flush=True)
    _run([sys.executable, "-m", "venv", "--clear", VENV], "python -m venv", 300)
    _run([peer_python(), "-m", "pip", "install", "-q", *requirements], "pip install (peer venv)", 1200)
    marker.write_text("\n".join(requirements) + "\n")
    return requirements


def peer_env() -> dict:
    """The peer's environment: its venv first on PATH, one OpenMP thread (as the scorer), none of the
    project's PYTHONPATH, and uvicorn's per-request access log off (``--no-access-log`` through
    uvicorn's environment; the scorer's gunicorn logs no requests either)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", UVICORN_ACCESS_LOG="false",
               PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


def save_model(lgbm_dir: Path, out_dir: Path) -> None:
    """The registered LightGBM model's folder ``lgbm_dir`` saved as an MLflow model in ``out_dir``."""
    _run([peer_python(), MODEL_CODE, lgbm_dir, out_dir], "saving the MLflow model", 300)


def serve_command(model_dir: Path, port: int, workers: int) -> list[str]:
    return [str(VENV / "bin/mlflow"), "models", "serve", "-m", str(model_dir), "-p", str(port),
            "-w", str(workers), "--env-manager", "local", "--host", "127.0.0.1"]


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
    """``/invocations`` JSON (``dataframe_split``) of a feature frame; NaN as JSON null."""
    data = [[None if v != v else float(v) for v in row] for row in frame.to_numpy(dtype=np.float64).tolist()]
    return json.dumps({"dataframe_split": {"columns": list(frame.columns), "data": data}}).encode()


def check_predictions(port: int, body: bytes, frame, ranker) -> float:
    """Largest absolute difference between the peer's predictions for ``body`` and the booster's own
    (``ranker.model.predict`` of the same frame); a peer that answers wrongly is PeerUnavailable."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise PeerUnavailable(f"/invocations answered {resp.status}: {payload[:300]!r}")
    rows = json.loads(payload)["predictions"]
    got = np.array([[row[name] for name in ranker.objectives] for row in rows], dtype=np.float64)
    want = ranker.model.predict(frame)
    if got.shape != want.shape:
        raise PeerUnavailable(f"/invocations returned {got.shape} predictions, the booster {want.shape}")
    return float(np.max(np.abs(got - want)))
