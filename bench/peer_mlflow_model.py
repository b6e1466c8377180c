"""The LightGBM model of serve_bench as an MLflow pyfunc model: runs in the peer's own venv only.

Never imported by the project (it needs mlflow, which is not in requirements.lock). Two uses:

- ``PEER_PYTHON bench/peer_mlflow_model.py LGBM_DIR OUT_DIR``: saves the registered
  ``ranking.lgbm.LGBMMultiObjective`` folder ``LGBM_DIR`` (its manifest.json + one LightGBM text file
  per objective) as an MLflow model in ``OUT_DIR`` ("models from code": this file is the model's
  code, with bench/peer_lgbm.py as its code path; the booster text files are its artifacts;
  nothing is pickled).
- ``mlflow models serve`` loads this file from the saved model and calls :meth:`predict` per request.

One booster per objective (LightGBM has no multi-output booster), so a single ``mlflow.lightgbm``
flavor model could only score one objective: the pyfunc scores all of them, in the manifest's order,
as ``LGBMMultiObjective.predict`` does (bench/peer_lgbm.py, shared with the LitServe peer).
"""
import sys
from pathlib import Path

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd
import peer_lgbm


class MultiObjectiveLGBM(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        manifest = peer_lgbm.read_manifest(context.artifacts["manifest"])
        self.columns = list(manifest["feature_columns"])
        self.boosters = peer_lgbm.load_boosters({name: context.artifacts[name] for name in manifest["files"]})

    def predict(self, context, model_input, params=None):
        x = pd.DataFrame(model_input)[self.columns].to_numpy(dtype=np.float64)
        return pd.DataFrame(peer_lgbm.scores(self.boosters, x))


mlflow.models.set_model(MultiObjectiveLGBM())


def save(lgbm_dir: str, out_dir: str) -> None:
    manifest_path = f"{lgbm_dir}/manifest.json"
    manifest = peer_lgbm.read_manifest(manifest_path)
    artifacts = {"manifest": manifest_path, **{k: f"{lgbm_dir}/{f}" for k, f in manifest["files"].items()}}
    mlflow.pyfunc.save_model(out_dir, python_model=__file__, artifacts=artifacts,
                             code_paths=[str(Path(peer_lgbm.__file__).resolve())],
                             pip_requirements=[f"lightgbm=={lgb.__version__}", f"pandas=={pd.__version__}"])


if __name__ == "__main__":
    save(sys.argv[1], sys.argv[2])
