"""``stratarank join``: the joiner (served impressions + feedback -> training examples, exactly once).

Importing this module stays light (no torch, no kafka): they load inside the command.
"""
from __future__ import annotations

import json
import signal
import sys
import threading


def cmd_join(args) -> int:
    """Join until SIGTERM/SIGINT (or ``--max-idle`` seconds without records), flush, checkpoint,
    and print the final counters as one JSON line on stdout."""
    from dataclasses import replace

    from strategy.errors import ValidationError

    from online.joiner import JoinerConfig, run_joiner

    try:
        cfg = JoinerConfig.load(args.config)
        if args.bus is not None:
            from online.nearline import NearlineConfig

            cfg = replace(cfg, bus=NearlineConfig(bus=cfg.bus).with_urls(bus_url=args.bus).bus)
        if args.out is not None:
            cfg = replace(cfg, out=args.out)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 2
    stop = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def progress(stats):
        print(json.dumps({"progress": stats.to_dict()}), file=sys.stderr, flush=True)

    print(json.dumps({"joiner": {"bus": cfg.bus.url, "consumer": cfg.consumer, "out": cfg.out, "topic": cfg.topic,
                                 "window_s": cfg.window_s, "grace_s": cfg.grace_s, "objectives": cfg.objectives}}),
          file=sys.stderr, flush=True)
    try:
        stats = run_joiner(cfg, stop=stop, max_idle_s=args.max_idle, drain=args.drain, on_progress=progress,
                           progress_interval_s=args.progress_interval)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 2
    print(json.dumps(stats.to_dict()), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("join", help="join served impressions with their feedback into training examples")
    p.add_argument("--config", default="conf/service.yaml", metavar="FILE",
                   help="service YAML (its bus and joiner sections; labels from joiner.objectives)")
    p.add_argument("--bus", metavar="URL", help="override bus.url: embedded://PATH or kafka://HOST:PORT")
    p.add_argument("--out", metavar="DIR", help="override joiner.out (Parquet examples and the checkpoint)")
    p.add_argument("--max-idle", type=float, metavar="S",
                   help="exit after S seconds without records (before the first one: at least 15 s)")
    p.add_argument("--drain", action="store_true",
                   help="at exit, emit every open impression as if its window had closed (the feedback is complete)")
    p.add_argument("--progress-interval", type=float, default=10.0, metavar="S", help="progress line on stderr every S s")
    p.set_defaults(func=cmd_join)
