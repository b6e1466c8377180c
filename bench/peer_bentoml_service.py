"""The LightGBM model of serve_bench as a BentoML service: runs in the BentoML peer's own venv only.

Never imported by the project (it needs bentoml, which is not in requirements.lock)::

    PEER_VENV/bin/bentoml serve peer_bentoml_service:LightGBMService --working-dir bench \\
        --host 127.0.0.1 --port PORT --arg lgbm_dir=LGBM_DIR --arg workers=N

serves the registered ``LGBMMultiObjective`` folder ``LGBM_DIR`` with N worker processes (the
service's ``workers``, read from the ``--arg`` values with ``bentoml.use_arguments``; each worker
loads the booster text files, no pickle, and runs the sync API on its one thread): ``POST /predict``
of ``dataframe_split`` JSON (the API's one parameter, so the body MLflow is sent is exactly its
input) answers ``{"predictions": [{objective: score, ...}, ...]}`` (bench/peer_lgbm.py, as the other
peers do), a body that is not such JSON a 400 naming the field; ``GET /readyz`` is 200 from a worker
once it has loaded the model. The per-request access log is off, as in the other servers.
"""
import bentoml
import peer_lgbm
from bentoml.exceptions import InvalidArgument

ARGS = bentoml.use_arguments()


@bentoml.service(name="stratarank_lgbm", workers=int(ARGS.workers), logging={"access": {"enabled": False}})
class LightGBMService:
    def __init__(self):
        self.columns, self.boosters = peer_lgbm.load_folder(ARGS.lgbm_dir)

    @bentoml.api
    def predict(self, dataframe_split: dict) -> dict:
        try:
            x = peer_lgbm.decode_split({"dataframe_split": dataframe_split}, self.columns)
        except peer_lgbm.BadRequest as exc:
            raise InvalidArgument(str(exc)) from None   # a 400
        return peer_lgbm.encode(peer_lgbm.scores(self.boosters, x))
