"""``stratarank corpus``: consume the ``items`` bus topic into the corpus (online/corpus.py).

Importing this module stays light (no torch, no kafka): they load inside the command.
"""
from __future__ import annotations

import json

from .runtime import add_consumer_arguments, print_errors, progress, say, stop_on_signals


def cmd_corpus(args) -> int:
    """Consume until SIGTERM/SIGINT (or ``--max-idle`` seconds without records) and print the
    final counters as one JSON line on stdout. Validation of the config is the scorer's
    (``load_service_config``): the bus, the ``corpus`` section and the risk rules it names."""
    from dataclasses import replace

    from strategy.errors import ValidationError

    from online.config import load_service_config
    from online.corpus import Corpus, run_corpus
    from online.risk import load_risk

    try:
        config = load_service_config(args.config)
        bus_cfg = config.nearline.with_urls(bus_url=args.bus).bus
        corpus_cfg = config.corpus if args.path is None else replace(config.corpus, path=args.path)
        risk = load_risk(config.risk_file) if config.risk_file else None
    except ValidationError as exc:
        return print_errors(exc)
    stop = stop_on_signals()
    say(corpus={"bus": bus_cfg.url, "path": corpus_cfg.path, "consumer": corpus_cfg.consumer,
                "topic": corpus_cfg.topic, "risk": config.risk_file})
    bus = bus_cfg.open()
    try:
        with Corpus(corpus_cfg, risk) as corpus:
            stats = run_corpus(corpus_cfg, bus, corpus, stop=stop, max_idle_s=args.max_idle, on_progress=progress,
                               progress_interval_s=args.progress_interval)
    finally:
        bus.close()
    print(json.dumps(stats.to_dict()), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("corpus", help="consume the items bus topic into the item corpus (SQLite)")
    p.add_argument("--config", default="conf/service.yaml", metavar="FILE",
                   help="service YAML (its bus, corpus and risk sections)")
    add_consumer_arguments(p)
    p.add_argument("--path", metavar="FILE", help="override corpus.path")
    p.set_defaults(func=cmd_corpus)
