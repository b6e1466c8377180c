"""The LightGBM model of serve_bench as an MLflow pyfunc model: runs in the peer's own venv only.

Never imported by the project (it needs mlflow, which is not in requirements.lock). Two uses:

- ``PEER_PYTHON bench/mlflow_peer_model.py LGBM_DIR OUT_DIR``: saves the registered
  ``ranking.lgbm.LGBMMultiObjective`` folder ``LGBM_DIR`` (its manifest.json + one LightGBM text file
  per objective) as an MLflow model in ``OUT_DIR`` ("models from code": this file is the model's
  code, the booster text files its artifacts; nothing is pickled).
- ``mlflow models serve`` loads this file from the saved model and calls :meth:`predict` per request.

One booster per objective (LightGBM has no multi-output booster), so a single ``mlflow.lightgbm``
flavor model could only score one objective: the pyfunc scores all of them, in the manifest's order,
as ``LGBMMultiObjective.predict`` does.
"""
import json
import sys

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd


class MultiObjectiveLGBM(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        manifest = json.loads(open(context.artifacts["manifest"], encoding="utf-8").read())
        self.columns = list(manifest["feature_columns"])
        self.boosters = {name: lgb.Booster(model_file=context.artifacts[name]) for name in manifest["files"]}

    def predict(self, context, model_input, params=None):
        x = pd.DataFrame(model_input)[self.columns].to_numpy(dtype=np.float64)
        out = {}
        for name, booster in self.boosters.items():
            best = booster.best_iteration if booster.best_iteration and booster.best_iteration > 0 else None
            out[name] = booster.predict(x, num_iteration=best)
        return pd.DataFrame(out)


mlflow.models.set_model(MultiObjectiveLGBM())


def save(lgbm_dir: str, out_dir: str) -> None:
    manifest_path = f"{lgbm_dir}/manifest.json"
    manifest = json.loads(open(manifest_path, encoding="utf-8").read())
    artifacts = {"manifest": manifest_path, **{k: f"{lgbm_dir}/{f}" for k, f in manifest["files"].items()}}
    mlflow.pyfunc.save_model(out_dir, python_model=__file__, artifacts=artifacts,
                             pip_requirements=[f"lightgbm=={lgb.__version__}", f"pandas=={pd.__version__}"])


if __name__ == "__main__":
    save(sys.argv[1], sys.argv[2])
