"""Ray Serve as serve_bench's peer: the same LightGBM model behind a Ray Serve deployment.

Installed by the bench into ``bench/.peers/ray/`` (bench/peers.py: ``RAY_PACKAGE``, plus the model's
packages in requirements.lock's versions) and served by bench/peer_ray_server.py run with the peer's
python: a Ray instance of its own (``ray.init(address="local")``, its files under the bench's
temporary folder), one deployment of ``num_replicas`` replicas behind Ray Serve's HTTP proxy on the
given port, the registered booster text files loaded by each replica (no pickle), ``POST /predict``
of the same ``dataframe_split`` JSON MLflow is sent, ``GET /health`` once ``serve.run`` has returned
(every replica up).

Ray Serve's processes: as many replica actors as the scorer's gunicorn workers (one logical CPU
each), one HTTP proxy actor that parses each request and hands it to a replica, the Serve
controller, and Ray's own (GCS server, raylet, monitor, log monitor, a minimal dashboard head and
agents). The server script stops them all on SIGTERM (``ray.shutdown()``; the bench's
``server_process`` sends it to the script's whole process group), so none is left behind.
"""
from __future__ import annotations

from pathlib import Path

from peers import ROOT, Peer

RAY_PACKAGE = "ray[serve]==2.60.0"
SERVER_CODE = ROOT / "bench/peer_ray_server.py"


class RayServePeer(Peer):
    name = "ray"
    package = RAY_PACKAGE
    model_packages = ("lightgbm", "numpy", "scipy")  # the replicas read no DataFrame: no pandas
    ready_path = "/health"
    predict_path = "/predict"
    how = "serve.run of a deployment, num_replicas=W, behind Ray Serve's HTTP proxy; a Ray instance of its own"

    def serve_command(self, lgbm_dir: Path, work: Path, port: int, workers: int) -> list[str]:
        return [str(self.python), str(SERVER_CODE), str(lgbm_dir), "--port", str(port), "--workers", str(workers),
                "--work", str(work / "ray")]
