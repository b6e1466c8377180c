"""BentoML as serve_bench's peer: the same LightGBM model behind a ``bentoml.service``.

Installed by the bench into ``bench/.peers/bentoml/`` (bench/peers.py: ``BENTOML_PACKAGE``, plus the
model's packages in requirements.lock's versions) and served by ``bentoml serve`` of
bench/peer_bentoml_service.py (the service's code; the model folder and the worker count are its
``--arg`` values): ``POST /predict`` of the same ``dataframe_split`` JSON MLflow is sent, ``GET
/readyz`` once a worker has loaded the booster text files.

BentoML's processes: one ``bentoml serve`` arbiter (circus) and ``workers`` API-server processes on
the one socket it binds, as many as the scorer's gunicorn workers; each decodes, predicts and
encodes in its own process (no separate runner).
"""
from __future__ import annotations

from pathlib import Path

from peers import ROOT, Peer

BENTOML_PACKAGE = "bentoml==1.4.40"
SERVICE = "peer_bentoml_service:LightGBMService"   # bench/peer_bentoml_service.py


class BentoMLPeer(Peer):
    name = "bentoml"
    package = BENTOML_PACKAGE
    model_packages = ("lightgbm", "numpy", "scipy")  # the service reads no DataFrame: no pandas
    ready_path = "/readyz"
    predict_path = "/predict"
    how = "bentoml serve of a @bentoml.service(workers=W), W API-server processes"

    def serve_command(self, lgbm_dir: Path, work: Path, port: int, workers: int) -> list[str]:
        return [str(self.venv / "bin/bentoml"), "serve", SERVICE, "--working-dir", str(ROOT / "bench"),
                "--host", "127.0.0.1", "--port", str(port), "--arg", f"lgbm_dir={lgbm_dir}",
                "--arg", f"workers={workers}", "--do-not-track"]
