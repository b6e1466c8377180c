"""The LightGBM model of serve_bench behind LitServe: runs in the LitServe peer's own venv only.

Never imported by the project (it needs litserve, which is not in requirements.lock)::

    PEER_PYTHON bench/peer_litserve_server.py LGBM_DIR --port PORT --workers N

serves the registered ``LGBMMultiObjective`` folder ``LGBM_DIR`` on 127.0.0.1:PORT with N inference
workers on the CPU: ``POST /predict`` of ``dataframe_split`` JSON answers
``{"predictions": [{objective: score, ...}, ...]}`` (bench/peer_lgbm.py, as the MLflow peer does), a
body that is not such JSON a 400 naming the field; ``GET /health`` is 200 once every worker has
loaded the booster text files.
"""
import argparse
import sys

import litserve as ls
import peer_lgbm
from fastapi import HTTPException


class LightGBMAPI(ls.LitAPI):
    def __init__(self, lgbm_dir: str):
        super().__init__(api_path="/predict")
        self.lgbm_dir = lgbm_dir

    def setup(self, device):
        self.columns, self.boosters = peer_lgbm.load_folder(self.lgbm_dir)

    def decode_request(self, request):
        try:
            return peer_lgbm.decode_split(request, self.columns)
        except peer_lgbm.BadRequest as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    def predict(self, x):
        return peer_lgbm.scores(self.boosters, x)

    def encode_response(self, output):
        return peer_lgbm.encode(output)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lgbm_dir")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2, help="inference worker processes (workers_per_device)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers: at least 1, got {args.workers}")
    server = ls.LitServer(LightGBMAPI(args.lgbm_dir), accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning",
               access_log=False)


if __name__ == "__main__":
    main(sys.argv[1:])
