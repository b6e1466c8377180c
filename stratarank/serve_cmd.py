"""``stratarank serve``: the scorer under gunicorn (a production WSGI server), app factory per worker."""
from __future__ import annotations

import os
import signal
import sys


def cmd_serve(args) -> int:
    from gunicorn.app.base import BaseApplication

    from online.config import load_service_config
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

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread" if args.threads > 1 else "sync")
            self.cfg.set("timeout", 30)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", None)
            self.cfg.set("loglevel", "warning")
            self.cfg.set("worker_exit", _close_scorer)

        def load(self):
            import torch

            from online.app import create_app

            torch.set_num_threads(args.torch_threads)  # workers x threads should not exceed the cores

            # /admin/reload swaps this worker in place, then SIGHUP makes the master replace the
            # other workers gracefully (in-flight requests finish; new ones see the new config).
            return create_app(config, on_reload=lambda: os.kill(os.getppid(), signal.SIGHUP))

    print(f"stratarank scorer on http://{host}:{port} ({workers} workers)", flush=True)
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
    p.set_defaults(func=cmd_serve)
