"""``stratarank serve``: the scorer under gunicorn (a production WSGI server), app factory per worker.

Metrics: the workers share one ``prometheus_client`` multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``
when set, emptied at start; else a fresh temporary one, removed at exit), so any worker's /metrics
shows the whole server.
"""
from __future__ import annotations

import gc
import logging
import logging.config
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # online.metrics reads it; set before prometheus_client loads


def metrics_folder() -> tuple[Path, bool]:
    """The multiprocess folder, emptied of an earlier server's files, and whether it is ours to remove."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        return folder, False
    folder = Path(tempfile.mkdtemp(prefix="stratarank-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder, True


def cmd_serve(args) -> int:
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        print("stratarank serve: prometheus_client was imported before its multiprocess folder was set",
              file=sys.stderr)
        return 1
    folder, own_folder = metrics_folder()
    master = os.getpid()
    try:
        return _serve(args)
    finally:
        # a gunicorn worker is a fork of this frame and leaves through it too: only the master cleans up
        if own_folder and os.getpid() == master:
            shutil.rmtree(folder, ignore_errors=True)


def _serve(args) -> int:
    from gunicorn.app.base import BaseApplication

    from online.config import load_service_config
    from online.logs import logging_config
    from online.metrics import mark_worker_dead
    from strategy import ValidationError

    try:
        config = load_service_config(args.config)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    workers = args.workers or config.workers
    logging.config.dictConfig(logging_config(config.log_format, config.log_level))
    if config.rate_per_s and config.rate_storage == "memory://" and workers > 1:
        logging.getLogger("stratarank.scorer").warning(
            "rate_limit.storage is memory://: each of the %d workers keeps its own buckets, so a client may get up "
            "to %d x %g requests/s (x replicas); set rate_limit.storage: redis://HOST:PORT/DB for one limit",
            workers, workers, config.rate_per_s)

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread" if args.threads > 1 else "sync")
            self.cfg.set("timeout", 30)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", None)
            self.cfg.set("loglevel", config.log_level)
            self.cfg.set("logconfig_dict", logging_config(config.log_format, config.log_level))
            self.cfg.set("worker_exit", _close_scorer)
            self.cfg.set("child_exit", lambda server, worker: mark_worker_dead(worker.pid))

        def load(self):
            import torch

            from online.app import create_app

            torch.set_num_threads(args.torch_threads)  # workers x threads should not exceed the cores

            # /admin/reload swaps this worker in place, then SIGHUP makes the master replace the
            # other workers gracefully (in-flight requests finish; new ones see the new config).
            app = create_app(config, on_reload=lambda: os.kill(os.getppid(), signal.SIGHUP))
            if not args.no_gc_freeze:
                # the libraries, the model and the restored store are long-lived: exempt them from the
                # cyclic collector, whose full passes over them would land in some request's latency
                gc.collect()
                gc.freeze()
            return app

    logging.getLogger("stratarank.serve").info("stratarank scorer on http://%s:%s (%d workers)", host, port, workers)
    Server().run()
    return 0


def _close_scorer(server, worker) -> None:
    """gunicorn hook: flush the worker's bus (buffered impressions, exposures) before it exits."""
    scorer = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("stratarank")
    if scorer is not None:
        scorer.close()


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the real-time scorer (gunicorn)")
    p.add_argument("--config", metavar="FILE", help="service YAML (default: embedded defaults)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--threads", type=int, default=1, help="threads per worker (gthread when > 1)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads per worker")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="do not gc.freeze() each worker's heap once its app is built (the comparison)")
    p.set_defaults(func=cmd_serve)
