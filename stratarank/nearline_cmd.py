"""``stratarank nearline``: run the near-line consumer (bus -> real-time feature store).

Importing this module stays light (no torch, no kafka, no redis): they load inside the command.
"""
from __future__ import annotations

import json

from .runtime import add_consumer_arguments, print_errors, progress, say, stop_on_signals


def cmd_nearline(args) -> int:
    """Consume until SIGTERM/SIGINT (or ``--max-idle`` seconds without records), then snapshot,
    commit and print the final figures as one JSON line on stdout."""
    from dataclasses import replace

    from strategy.errors import ValidationError

    from online.nearline import NearlineConfig, run_nearline

    try:
        cfg = NearlineConfig.load(args.config).with_urls(args.bus, args.store)
        if args.progress_interval is not None:
            cfg = replace(cfg, nearline=replace(cfg.nearline, progress_interval_s=args.progress_interval))
        stop = stop_on_signals()
        say(nearline={"bus": cfg.bus.url, "store": cfg.store.effective_url, "consumer": cfg.nearline.consumer,
                      "topics": list(cfg.nearline.topics)})
        stats = run_nearline(cfg, stop=stop, max_idle_s=args.max_idle, on_progress=progress)
    except ValidationError as exc:
        return print_errors(exc)
    print(json.dumps(stats.to_dict()), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("nearline", help="run the near-line consumer: event bus -> real-time feature store")
    p.add_argument("--config", default="conf/service.yaml", metavar="FILE", help="service YAML (bus, store, nearline)")
    add_consumer_arguments(p, progress_default=None)
    p.add_argument("--store", metavar="URL", help="override store.url: memory://[PATH] or redis://HOST:PORT/DB")
    p.set_defaults(func=cmd_nearline)
