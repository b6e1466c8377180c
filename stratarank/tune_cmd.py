"""``stratarank tune``: search objective weights against online metrics (experiments/tune.py).

    stratarank tune --config conf/tune/feed_weights.yaml [--out PROPOSED.yaml] [--report REPORT.json]

Offline pre-screening (SNIPS on logs of the exploring base strategy), then online Bayesian
optimisation in the simulated world within the file's request budget. The winner is written as a
strategy YAML (``--out`` or the file's ``output``) for review: it is never applied. The report (JSON)
holds every evaluation, the offline estimates and, because the world knows the truth, the true value
of the proposal against the true grid optimum. Exit status: 0; 1 on invalid input; 2 when no weight
vector met the guardrails with enough confidence (nothing proposed).
"""
from __future__ import annotations

import json
import sys


def cmd_tune(args) -> int:
    from experiments.tune import load_tune, tune, write_proposal
    from strategy.errors import ValidationError

    try:
        config = load_tune(args.config)
        out = args.out or config.output or "runs/tune/proposed_strategy.yaml"

        def progress(e):
            rel = ", ".join(f"{m} {v:+.2%}" for m, v in e["relative"].items())
            print(f"[{e['why']:>7}] {', '.join(f'{v:.3g}' for v in e['x'])}: {rel}", file=sys.stderr, flush=True)

        report = tune(config, progress=None if args.quiet else progress)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    if args.report:
        from pathlib import Path

        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    summary = {k: report.get(k) for k in ("pick", "pick_feasible_prob", "pick_predicted_relative",
                                          "pick_relative_true", "guardrails_held", "fraction_of_optimum",
                                          "optimum", "requests_used", "budget_requests")}
    if report.get("pick") is None:
        print(json.dumps(summary, indent=2))
        print("no weight vector met the guardrails with enough confidence: nothing proposed", file=sys.stderr)
        return 2
    path = write_proposal(config, report, out)
    summary["proposal"] = str(path)
    print(json.dumps(summary, indent=2))
    print(f"wrote the proposal {path} (not applied)", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="tune objective weights: offline IPS screening + online Bayesian optimisation")
    p.add_argument("--config", required=True, metavar="FILE", help="tuning YAML, e.g. conf/tune/feed_weights.yaml")
    p.add_argument("--out", metavar="FILE", help="where to write the proposed strategy (default: the file's output)")
    p.add_argument("--report", metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-evaluation progress on stderr")
    p.set_defaults(func=cmd_tune)
