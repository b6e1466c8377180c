"""``stratarank train-retrieval``: train the two-tower retrieval model of a config (ranking/two_tower.py),
print its held-out recall@K next to popularity, and register it.

Importing this module stays light (no torch): the heavy imports happen inside the command.
"""
from __future__ import annotations

import sys


def cmd_train_retrieval(args) -> int:
    """Train, evaluate and register; a config or data problem prints every error (file:line) and exits 1."""
    from strategy.errors import ValidationError

    try:
        from ranking.two_tower import format_recall_table, load_two_tower_config, register_two_tower, train_two_tower

        cfg = load_two_tower_config(args.config)
        trained = train_two_tower(cfg, progress=not args.no_progress)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    print(format_recall_table(trained.metrics["held_out"]))
    registry = args.registry or cfg.registry
    path = register_two_tower(registry, cfg.name, trained)
    print(f"registered {cfg.name}@{path.name} in {registry} (current); trained in "
          f"{trained.metrics['train_seconds']:.1f}s, {trained.metrics['wall_seconds']:.1f}s in all")
    return 0


def add_parser(sub) -> None:
    """Register ``train-retrieval`` on the ``stratarank`` sub-command parsers."""
    p = sub.add_parser("train-retrieval", help="train the two-tower retrieval model and register it")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="two-tower YAML, e.g. conf/train/two_tower_small.yaml")
    p.add_argument("--registry", metavar="DIR", help="override the config's registry folder")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=cmd_train_retrieval)
