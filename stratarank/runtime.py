"""What the long-running commands (``nearline``, ``join``, ``corpus``, ``train-stream``) share: a stop
event set by SIGTERM / SIGINT, progress and summary lines as JSON, validation errors printed one per
line, and the consumer flags (``--bus``, ``--max-idle``, ``--progress-interval``)."""
from __future__ import annotations

import json
import signal
import sys
import threading


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (the command then stops cleanly: flush, checkpoint, commit)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def say(**record) -> None:
    """A JSON line on stderr (start-up settings, progress)."""
    print(json.dumps(record), file=sys.stderr, flush=True)


def progress(stats) -> None:
    """``on_progress`` callback: the running figures as ``{"progress": ...}`` on stderr."""
    say(progress=stats.to_dict())


def print_errors(exc) -> int:
    """A ValidationError's problems, one ``file:line path: message`` per line on stderr; exit code 2."""
    for err in exc.errors:
        print(str(err), file=sys.stderr)
    return 2


def with_bus_url(cfg, url):
    """``cfg`` (a config with a ``bus`` field) with ``--bus URL`` applied and validated like the file."""
    if url is None:
        return cfg
    from dataclasses import replace

    from online.nearline import NearlineConfig

    return replace(cfg, bus=NearlineConfig(bus=cfg.bus).with_urls(bus_url=url).bus)


def add_consumer_arguments(p, progress_default: float | None = 10.0) -> None:
    """The flags of a command that consumes the bus: ``--bus``, ``--max-idle``, ``--progress-interval``."""
    p.add_argument("--bus", metavar="URL", help="override bus.url: embedded://PATH or kafka://HOST:PORT")
    p.add_argument("--max-idle", type=float, metavar="S",
                   help="exit after S seconds without records (before the first one: at least 15 s)")
    p.add_argument("--progress-interval", type=float, default=progress_default, metavar="S",
                   help="progress line on stderr every S s")
