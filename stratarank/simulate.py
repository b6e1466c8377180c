"""``stratarank simulate``: write a simulated world's logs as Parquet (no torch import).

    stratarank simulate --config conf/sim/default.yaml --out DIR [--impressions N] [--seed S]

writes ``DIR/impressions.parquet`` (served features, labels, true probabilities) and
``DIR/events.parquet`` (feedback events in the shared event schema) and prints one summary line.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def cmd_simulate(args) -> int:
    from world import World, WorldConfig, summarize
    from strategy.errors import FieldError, ValidationError

    t0 = time.perf_counter()
    overrides = {}
    if args.impressions is not None:
        overrides["impressions"] = args.impressions
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.policy is not None:
        overrides["policy"] = args.policy
    try:
        config = WorldConfig.from_yaml(args.config, **overrides)
    except ValidationError as exc:
        for err in exc.errors:
            if err.path in overrides:  # a bad --impressions/--seed names the flag, not the file
                err = FieldError(err.path, err.message, err.code, "--" + err.path.replace("_", "-"))
            print(str(err), file=sys.stderr)
        return 1
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"{out}: cannot create output folder: {exc.strerror}", file=sys.stderr)
        return 1
    world = World(config)
    impressions, events = world.simulate_logs(progress=not args.quiet)
    impressions.to_parquet(out / "impressions.parquet", index=False)
    events.to_parquet(out / "events.parquet", index=False)
    seconds = time.perf_counter() - t0
    print(f"simulate {args.config} seed {config.seed} policy {config.policy}: "
          f"{summarize(impressions, events, seconds)} -> {out}/")
    return 0


def add_parser(sub) -> None:
    """Register ``simulate`` on the ``stratarank`` sub-command parsers."""
    p = sub.add_parser("simulate", help="simulate a feed world and write Parquet logs (impressions, events)")
    p.add_argument("--config", required=True, metavar="FILE", help="world YAML, e.g. conf/sim/default.yaml")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--impressions", type=int, metavar="N", help="override the config's impressions")
    p.add_argument("--seed", type=int, metavar="S", help="override the config's seed")
    p.add_argument("--policy", choices=("random", "popular"), help="override the config's logging policy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)
