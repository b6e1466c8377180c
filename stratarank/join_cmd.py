"""``stratarank join``: the joiner (served impressions + feedback -> training examples, exactly once).

Importing this module stays light (no torch, no kafka): they load inside the command.
"""
from __future__ import annotations

import json

from .runtime import add_consumer_arguments, print_errors, progress, say, stop_on_signals, with_bus_url


def cmd_join(args) -> int:
    """Join until SIGTERM/SIGINT (or ``--max-idle`` seconds without records), flush, checkpoint,
    and print the final counters as one JSON line on stdout."""
    from dataclasses import replace

    from strategy.errors import ValidationError

    from online.joiner import JoinerConfig, run_joiner

    try:
        cfg = with_bus_url(JoinerConfig.load(args.config), args.bus)
        if args.out is not None:
            cfg = replace(cfg, out=args.out)
        stop = stop_on_signals()
        say(joiner={"bus": cfg.bus.url, "consumer": cfg.consumer, "out": cfg.out, "topic": cfg.topic,
                    "window_s": cfg.window_s, "grace_s": cfg.grace_s, "objectives": cfg.objectives})
        stats = run_joiner(cfg, stop=stop, max_idle_s=args.max_idle, drain=args.drain, on_progress=progress,
                           progress_interval_s=args.progress_interval)
    except ValidationError as exc:
        return print_errors(exc)
    print(json.dumps(stats.to_dict()), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("join", help="join served impressions with their feedback into training examples")
    p.add_argument("--config", default="conf/service.yaml", metavar="FILE",
                   help="service YAML (its bus and joiner sections; labels from joiner.objectives)")
    add_consumer_arguments(p)
    p.add_argument("--out", metavar="DIR", help="override joiner.out (Parquet examples and the checkpoint)")
    p.add_argument("--drain", action="store_true",
                   help="at exit, emit every open impression as if its window had closed (the feedback is complete)")
    p.set_defaults(func=cmd_join)
