"""The LightGBM model of serve_bench behind Ray Serve: runs in the Ray peer's own venv only.

Never imported by the project (it needs ray, which is not in requirements.lock)::

    PEER_PYTHON bench/peer_ray_server.py LGBM_DIR --port PORT --workers N --work DIR

starts a local Ray instance of its own (``ray.init(address="local")``: a GCS server, a raylet and
their helpers, children of this process, their files under DIR) and serves the registered
``LGBMMultiObjective`` folder ``LGBM_DIR`` on 127.0.0.1:PORT through Ray Serve's HTTP proxy with one
deployment of N replicas (``num_replicas``, one logical CPU each; the instance has N): ``POST
/predict`` of ``dataframe_split`` JSON answers ``{"predictions": [{objective: score, ...}, ...]}``
(bench/peer_lgbm.py, as the other peers do), a body that is not such JSON a 400 naming the field;
``GET /health`` is 200 once ``serve.run`` has returned, that is once every replica has loaded the
booster text files (the application is RUNNING: this process then writes DIR/ready).

It blocks until SIGTERM or SIGINT, then ``ray.shutdown()`` stops the Ray processes it started (they
are in this process's group and die with it as well: Ray's kernel-level fate sharing), so nothing
of Ray outlives it.
"""
import argparse
import logging
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # before ray is imported: no usage report

import peer_lgbm  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

QUIET = {"log_level": "WARNING", "enable_access_log": False}   # no per-request log, as the other servers


@serve.deployment(ray_actor_options={"num_cpus": 1}, logging_config=QUIET)
class LightGBMDeployment:
    def __init__(self, lgbm_dir: str, ready_file: str):
        self.columns, self.boosters = peer_lgbm.load_folder(lgbm_dir)
        self.ready_file = ready_file

    async def __call__(self, request: Request):
        if request.url.path == "/health":
            ready = os.path.exists(self.ready_file)
            return JSONResponse({"ready": ready}, status_code=200 if ready else 503)
        if request.url.path != "/predict" or request.method != "POST":
            return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, status_code=404)
        try:
            x = peer_lgbm.decode_split(await request.json(), self.columns)
        except ValueError as exc:   # BadRequest, or a body that is not JSON
            return JSONResponse({"error": str(exc)}, status_code=400)
        return peer_lgbm.encode(peer_lgbm.scores(self.boosters, x))


def stop(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lgbm_dir")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2, help="replicas of the deployment (num_replicas)")
    ap.add_argument("--work", required=True, help="Ray's temp dir (sockets, logs) and the ready file")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error(f"--workers: at least 1, got {args.workers}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ready = work / "ready"
    ready.unlink(missing_ok=True)
    try:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)   # this driver's "Started Serve" lines
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _temp_dir=str(work / "tmp"))
        # after ray.init, whose core worker installs a fatal-signal handler (SIGTERM would abort the
        # driver, ray.shutdown never run): a stop is a SystemExit, and the finally below shuts Ray down
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=QUIET)
        app = LightGBMDeployment.options(num_replicas=args.workers).bind(str(Path(args.lgbm_dir).resolve()),
                                                                         str(ready))
        serve.run(app, name="lgbm", route_prefix="/")   # returns once every replica is up
        ready.write_text("")
        signal.pause()
    finally:
        ray.shutdown()   # the GCS, raylet, workers it started


if __name__ == "__main__":
    main(sys.argv[1:])
