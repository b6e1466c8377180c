"""MLflow's model server as serve_bench's peer: the same LightGBM model behind ``mlflow models serve``.

Installed by the bench into ``bench/.peers/mlflow/`` (bench/peers.py: ``MLFLOW_PACKAGE`` plus the
model's packages in requirements.lock's versions). The registered LightGBM model is saved as an
MLflow pyfunc model by ``bench/peer_mlflow_model.py`` run with the peer's python, and served with
``--env-manager local`` (the peer venv's own packages) on ``/invocations``.
"""
from __future__ import annotations

from pathlib import Path

from peers import ROOT, Peer

# `mlflow models serve --env-manager local` needs only the skinny package: its scoring server is
# uvicorn + fastapi, both dependencies of mlflow-skinny (the full package adds the tracking UI)
MLFLOW_PACKAGE = "mlflow-skinny==3.17.2"
MODEL_CODE = ROOT / "bench/peer_mlflow_model.py"


class MLflowPeer(Peer):
    name = "mlflow"
    package = MLFLOW_PACKAGE
    ready_path = "/ping"
    predict_path = "/invocations"
    how = "mlflow models serve --env-manager local, a pyfunc of the booster text files"

    def prepare(self, lgbm_dir: Path, work: Path) -> None:
        """The registered LightGBM folder ``lgbm_dir`` saved as an MLflow model in ``work/mlflow-model``."""
        self.run([self.python, MODEL_CODE, lgbm_dir, work / "mlflow-model"], "saving the MLflow model", 300)

    def serve_command(self, lgbm_dir: Path, work: Path, port: int, workers: int) -> list[str]:
        return [str(self.venv / "bin/mlflow"), "models", "serve", "-m", str(work / "mlflow-model"), "-p", str(port),
                "-w", str(workers), "--env-manager", "local", "--host", "127.0.0.1"]
