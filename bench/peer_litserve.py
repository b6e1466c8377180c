"""LitServe as serve_bench's peer: the same LightGBM model behind a ``litserve.LitAPI``.

Installed by the bench into ``bench/.peers/litserve/`` (bench/peers.py: ``LITSERVE_PACKAGE``, which
brings fastapi, uvicorn and pyzmq, plus the model's packages in requirements.lock's versions) and
served by bench/peer_litserve_server.py run with the peer's python: the registered booster text
files loaded by each inference worker (no pickle), ``POST /predict`` of the same
``dataframe_split`` JSON MLflow is sent, ``GET /health`` once every worker is ready.

LitServe's processes: ``workers_per_device`` inference workers on the CPU (as many as the scorer's
gunicorn workers) and as many uvicorn API-server processes (its default ``num_api_servers``),
which hand each decoded request to a worker through a queue.
"""
from __future__ import annotations

from pathlib import Path

from peers import ROOT, Peer

LITSERVE_PACKAGE = "litserve==0.2.19"
SERVER_CODE = ROOT / "bench/peer_litserve_server.py"


class LitServePeer(Peer):
    name = "litserve"
    package = LITSERVE_PACKAGE
    model_packages = ("lightgbm", "numpy", "scipy")  # the server reads no DataFrame: no pandas
    ready_path = "/health"
    predict_path = "/predict"
    how = "LitServer(accelerator='cpu', workers_per_device=W), W API-server processes"

    def serve_command(self, lgbm_dir: Path, work: Path, port: int, workers: int) -> list[str]:
        return [str(self.python), str(SERVER_CODE), str(lgbm_dir), "--port", str(port), "--workers", str(workers)]
