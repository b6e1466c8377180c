"""``stratarank train-stream``: the streaming trainer (joined examples -> a registry version every minute).

Importing this module stays light (no torch): it loads inside the command.
"""
from __future__ import annotations

import json
import sys

from .runtime import print_errors, say, stop_on_signals, with_bus_url


def cmd_train_stream(args) -> int:
    """Train until SIGTERM/SIGINT (or ``--max-idle`` seconds without records), publish what was
    trained, checkpoint, and print the final counters as one JSON line on stdout."""
    from dataclasses import replace

    from strategy.errors import FieldError, ValidationError

    from online.stream_train import StreamConfig, run_stream_trainer

    try:
        cfg = with_bus_url(StreamConfig.load(args.config), args.bus)
        for key in ("registry", "checkpoint"):
            if getattr(args, key) is not None:
                cfg = replace(cfg, **{key: getattr(args, key)})
        if args.nproc is not None and args.nproc < 1:
            raise ValidationError([FieldError("nproc", f"must be >= 1, got {args.nproc}", "range", "--nproc")])
        if args.publish_interval is not None:
            if args.publish_interval < 1:
                raise ValidationError([FieldError("publish_interval_s", f"must be >= 1, got {args.publish_interval}",
                                                  "range", "--publish-interval")])
            cfg = replace(cfg, publish_interval_s=args.publish_interval)
        if args.nproc is not None and args.nproc > 1:
            from online.stream_dist import run_distributed

            overrides = {k: getattr(cfg, k) for k in ("bus", "registry", "checkpoint", "publish_interval_s")}
            summary = run_distributed(args.config, args.nproc, overrides, args.max_idle)
            print(json.dumps(summary), flush=True)
            return 0
        stop = stop_on_signals()
        say(train_stream={"name": cfg.name, "start_from": cfg.start_from, "bus": cfg.bus.url, "topic": cfg.topic,
                          "registry": cfg.registry, "publish_interval_s": cfg.publish_interval_s})
        stats = run_stream_trainer(cfg, stop=stop, max_idle_s=args.max_idle,
                                   log_fn=lambda m: print(m, file=sys.stderr, flush=True))
    except ValidationError as exc:
        return print_errors(exc)
    print(json.dumps(stats.to_dict()), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train-stream", help="update a TorchRec ranker from the joined stream, publishing versions")
    p.add_argument("--config", default="conf/train/stream.yaml", metavar="FILE")
    p.add_argument("--bus", metavar="URL", help="override bus.url: embedded://PATH or kafka://HOST:PORT")
    p.add_argument("--registry", metavar="DIR", help="override registry")
    p.add_argument("--checkpoint", metavar="FILE", help="override checkpoint")
    p.add_argument("--publish-interval", type=float, metavar="S", help="override publish_interval_s")
    p.add_argument("--max-idle", type=float, metavar="S", help="exit after S seconds without records")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="ranks of DistributedModelParallel (table-wise sharding, gloo, CPU), each training on its "
                        "share of the examples")
    p.set_defaults(func=cmd_train_stream)
