"""The ``stratarank`` command line: the one place that wires the packages together.

Heavy imports (torch, torchrec, lightgbm) happen inside the sub-commands that need them, so
``stratarank validate`` and ``stratarank rank`` start fast and never import torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from strategy import ValidationError, load_strategy, parse_override, parse_request, rank
from strategy.config import read_yaml, strategy_from_dict
from strategy.errors import FieldError


def _summary(strategy) -> str:
    rules = []
    if strategy.guardrails:
        rules.append(f"{len(strategy.guardrails)} guardrail(s)")
    if strategy.sources:
        rules.append("sources " + ",".join(strategy.sources))
    if strategy.diversity:
        rules.append(f"diversity on {strategy.diversity.key}")
    if strategy.epsilon:
        rules.append(f"epsilon {strategy.epsilon:g}")
    return (f"strategy {strategy.name}: {len(strategy.objectives)} objectives "
            f"({', '.join(strategy.objective_names)}), {strategy.blend.formula}, slate {strategy.slate_size}"
            + (", " + ", ".join(rules) if rules else ""))


def cmd_validate(args) -> int:
    """Validate objectives files: a summary line per valid file, every error otherwise."""
    failed = False
    for name in args.files:
        try:
            data, lines = read_yaml(name)
            if isinstance(data, dict) and "layers" in data and "objectives" not in data:  # an experiments file
                from experiments.config import validate_experiments_file
                print(f"{name}: OK {validate_experiments_file(name)}")
                continue
            if not isinstance(data, dict) or "objectives" not in data:
                raise ValidationError([FieldError(
                    "", "not an objectives file: expected a mapping with top-level 'strategy' and 'objectives'"
                    " (or an experiments file with top-level 'layers')", "kind", name, 1)])
            strategy = strategy_from_dict(data, source=name, lines=lines)
        except ValidationError as exc:
            failed = True
            for err in exc.errors:
                print(str(err), file=sys.stderr)
            continue
        print(f"{name}: OK {_summary(strategy)}")
    return 1 if failed else 0


def _overrides(items) -> dict:
    return dict(parse_override(text) for text in items or ())


def cmd_rank(args) -> int:
    """Dry-run a strategy on a request whose candidates carry their predictions."""
    try:
        strategy = load_strategy(args.strategy, _overrides(args.override))
        try:
            body = json.loads(Path(args.input).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValidationError([FieldError("", f"cannot read file: {exc.strerror}", "io", args.input)]) from None
        except json.JSONDecodeError as exc:
            raise ValidationError([FieldError("", f"invalid JSON: {exc.msg}", "json", args.input, exc.lineno)]) from None
        try:
            request = parse_request(body)
            if request.strategy is not None and request.strategy != strategy.name:
                raise ValidationError([FieldError(
                    "strategy", f"request asks for strategy '{request.strategy}', file defines '{strategy.name}'",
                    "unknown_strategy")])
            result = rank(strategy, request)
        except ValidationError as exc:
            raise ValidationError([FieldError(e.path, e.message, e.code, args.input) for e in exc.errors]) from None
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    if args.format == "table":
        print(_table(result))
    else:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def _table(result) -> str:
    rows = [f"request {result.request_id} · strategy {result.strategy}",
            f"{'rank':>4}  {'item':<10} {'source':<10} {'score':>8}  reasons"]
    for item in result.items:
        rows.append(f"{item.rank:>4}  {item.item_id:<10} {item.source:<10} {item.score:>8.4f}  {', '.join(item.reasons)}")
    if result.dropped:
        rows.append("dropped: " + ", ".join(f"{d.item_id} ({d.reason})" for d in result.dropped))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stratarank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate objectives YAML files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("rank", help="dry-run a strategy on a /v1/rank request with predictions")
    p.add_argument("--strategy", required=True, metavar="FILE", help="objectives YAML")
    p.add_argument("--input", required=True, metavar="REQUEST.json", help="a /v1/rank body; candidates carry predictions")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="e.g. objectives.like.weight=8 (repeatable)")
    p.add_argument("--format", choices=("json", "table"), default="json")
    p.set_defaults(func=cmd_rank)

    # each module registers its sub-commands; none imports torch, lightgbm or kafka at import time
    from . import (benchmark_cmd, control_cmd, corpus_cmd, demo, experiments_cmd, join_cmd, nearline_cmd, serve_cmd,
                   retrieval_cmd, simulate, stream_cmd, train_cmd, tune_cmd)

    for module in (simulate, train_cmd, stream_cmd, benchmark_cmd, serve_cmd, nearline_cmd, join_cmd, corpus_cmd,
                   experiments_cmd, control_cmd, tune_cmd, demo, retrieval_cmd):
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
