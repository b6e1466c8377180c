"""``stratarank experiments control``: the guarded-ramp controller (experiments/control.py).

    stratarank experiments control --config conf/control/like_up_ramp.yaml \\
        --exposures DIR_OR_FILE --events DIR_OR_FILE [--once] [--interval 300] [--now EPOCH]
        [--state FILE] [--log FILE]

Each step reads the exposure and event tables, decides (advance | hold | stop | complete), writes the
new state (the experiment's range and status; :func:`experiments.control.apply_state` turns it into
the config the scorer serves) and appends the decision with its evidence to the JSONL log. Without
``--once`` it repeats every ``--interval`` seconds until the experiment is stopped or completed.
Exit status: 0, or 1 on invalid input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_control(args) -> int:
    from experiments.analysis import load_table
    from experiments.control import load_control, run_once
    from strategy.errors import ValidationError

    try:
        config = load_control(args.config)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    while True:
        try:
            exposures = load_table(args.exposures, "exposures")
            events = load_table(args.events, "events")
        except ValidationError as exc:
            for err in exc.errors:
                print(str(err), file=sys.stderr)
            return 1
        decision = run_once(config, exposures, events, now=args.now, state_path=args.state, log_path=args.log)
        out = decision.to_dict()
        print(json.dumps({k: out[k] for k in ("time", "experiment", "action", "reasons", "range_after", "status")}),
              flush=True)
        if args.once or decision.state.status != "running":
            return 0
        time.sleep(args.interval)


def _find_subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps sub-command groups as _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def add_parser(sub) -> None:
    """Register ``control`` under ``stratarank experiments`` (registered by experiments_cmd, which
    must come first); a top-level ``control`` command when that group does not exist."""
    group = sub.choices.get("experiments") if hasattr(sub, "choices") else None
    esub = _find_subparsers(group) if group is not None else None
    target = esub if esub is not None else sub
    c = target.add_parser("control", help="guarded ramp: advance, hold or stop an experiment from its guardrails")
    c.add_argument("--config", required=True, metavar="FILE", help="ramp YAML, e.g. conf/control/like_up_ramp.yaml")
    c.add_argument("--exposures", required=True, metavar="PATH", help="Parquet/CSV file or folder of exposures")
    c.add_argument("--events", required=True, metavar="PATH", help="Parquet/CSV file or folder of feedback events")
    c.add_argument("--once", action="store_true", help="decide once and exit")
    c.add_argument("--interval", type=float, default=300.0, metavar="SECONDS", help="pause between steps")
    c.add_argument("--now", type=float, metavar="EPOCH", help="decision time (default: the wall clock)")
    c.add_argument("--state", metavar="FILE", help="state file (default: the config's 'state')")
    c.add_argument("--log", metavar="FILE", help="decision log, JSONL (default: the config's 'log')")
    c.set_defaults(func=cmd_control)
