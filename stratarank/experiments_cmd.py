"""``stratarank experiments analyze`` and ``stratarank dashboard`` (no torch import).

    stratarank experiments analyze --config conf/experiments/like_up.yaml \\
        --exposures DIR_OR_FILE --events DIR_OR_FILE [--format json|table] [--out DIR] [--pre-period 14D]
    stratarank dashboard --results DIR [--decisions FILE ...] [--port 8050] [--host 127.0.0.1] [--html OUT.html]

``analyze`` reads Parquet/CSV files or folders (``experiments.analysis.load_table``), analyses every
experiment of the config and prints one JSON record per (experiment, variant, metric) — the keys of
``experiments.analysis.analyze`` — or a table; ``--out DIR`` also writes ``results.json`` (those
records), ``experiments.json`` and ``cumulative.json`` (daily cumulative lifts) for the dashboard.
"""
from __future__ import annotations

import json
import sys


def _errors(exc) -> int:
    for err in exc.errors:
        print(str(err), file=sys.stderr)
    return 1


def _pre_period(text, ts):
    """``None``, ``'all'``, a number (units of ``ts``) or a duration (``14D``); a duration is turned
    into seconds when ``ts`` is numeric (Unix seconds, as in the shared event schema)."""
    import pandas as pd

    if text is None or text == "all":
        return text
    try:
        return float(text)
    except ValueError:
        pass
    if pd.api.types.is_numeric_dtype(ts.dtype):
        try:
            return pd.Timedelta(text).total_seconds()
        except ValueError:
            pass
    return text  # checked (and reported) by analyze


def cmd_analyze(args) -> int:
    from experiments.analysis import load_table
    from experiments.config import load_experiments
    from experiments.dashboard import build_results, write_results
    from strategy.errors import ValidationError

    try:
        config = load_experiments(args.config)
        exposures = load_table(args.exposures, "exposures")
        events = load_table(args.events, "events")
        bundle = build_results(config, exposures, events, pre_period=_pre_period(args.pre_period, exposures["ts"]),
                               alpha=args.alpha, correction=args.correction, cumulative=args.out is not None)
    except ValidationError as exc:
        return _errors(exc)
    if args.out is not None:
        try:
            written = write_results(args.out, bundle)
        except OSError as exc:
            print(f"{args.out}: cannot write results: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if args.format == "table":
        print(format_table(bundle["records"], args.alpha))
    else:
        print(json.dumps(bundle["records"], indent=2))
    return 0


def format_table(records, alpha: float = 0.05) -> str:
    """A fixed-width table for a terminal: relative lifts in %, their CI, p-values, flags."""
    from experiments.dashboard import fmt_p, fmt_pct

    head = (f"{'experiment':<16} {'variant':<12} {'metric':<18} {'role':<9} {'users c/t':>15} "
            f"{'control':>10} {'treatment':>10} {'lift':>9} {'CI (rel.)':>21} {'p':>8} {'adj.p':>8}  flags")
    lines = [head, "-" * len(head)]
    srm_seen = set()
    for r in records:
        flags = []
        if r.get("srm_alarm") and r["experiment"] not in srm_seen:
            flags.append(f"SRM ALARM p={fmt_p(r['srm_p'])}")
            srm_seen.add(r["experiment"])
        padj = r.get("p_value_adjusted")
        if r.get("role") == "guardrail" and r.get("guardrail"):
            flags.append(f"guardrail {r['guardrail'].upper()}")
        elif padj is not None and padj < alpha:
            flags.append("significant")
        if r.get("error"):
            flags.append(r["error"])
        ci = ("–" if r.get("rel_ci_low") is None else f"[{fmt_pct(r['rel_ci_low'])}, {fmt_pct(r['rel_ci_high'])}]")
        num = lambda x: "–" if x is None else f"{x:.4g}"  # noqa: E731
        users = f"{r['control_users']}/{r['users']}"
        lines.append(
            f"{r['experiment']:<16} {str(r['variant']):<12} {r['metric']:<18} {r['role']:<9} "
            f"{users:>15} {num(r['control_mean']):>10} "
            f"{num(r['treatment_mean']):>10} {fmt_pct(r['rel_lift']):>9} {ci:>21} {fmt_p(r['p_value']):>8} "
            f"{fmt_p(padj):>8}  {'; '.join(flags)}")
    return "\n".join(lines)


def cmd_dashboard(args) -> int:
    from pathlib import Path

    from experiments.dashboard import create_app, read_results, write_static_html

    missing = [d for d in args.decisions if not Path(d).is_file()]
    if missing:
        print(f"--decisions: no such file: {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        bundle = read_results(args.results, args.decisions)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{args.results}: {exc}", file=sys.stderr)
        return 1
    for problem in bundle["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if args.html:
        out = write_static_html(args.results, args.html, args.decisions)
        print(f"wrote {out}")
        return 0
    from werkzeug.serving import make_server

    server = make_server(args.host, args.port, create_app(Path(args.results), args.decisions), threaded=True)
    print(f"dashboard of {args.results} on http://{args.host}:{server.server_port}/dashboard/ (Ctrl-C to stop)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub) -> None:
    """Register ``experiments`` (with ``analyze``) and ``dashboard`` on the ``stratarank`` parsers."""
    p = sub.add_parser("experiments", help="A/B experiments: analyse exposures and events")
    esub = p.add_subparsers(dest="experiments_command", required=True)
    a = esub.add_parser("analyze", help="analyse every experiment of a config; JSON records or a table")
    a.add_argument("--config", required=True, metavar="FILE", help="experiments YAML, e.g. conf/experiments/like_up.yaml")
    a.add_argument("--exposures", required=True, metavar="PATH", help="Parquet/CSV file or folder of exposures")
    a.add_argument("--events", required=True, metavar="PATH", help="Parquet/CSV file or folder of feedback events")
    a.add_argument("--format", choices=("json", "table"), default="json")
    a.add_argument("--out", metavar="DIR", help="also write results.json, experiments.json, cumulative.json here")
    a.add_argument("--pre-period", metavar="WINDOW", help="CUPED pre-period: 'all', a duration (14D) or seconds")
    a.add_argument("--alpha", type=float, default=0.05)
    a.add_argument("--correction", choices=("holm", "bh"), default="holm")
    a.set_defaults(func=cmd_analyze)

    d = sub.add_parser("dashboard", help="serve the A/B dashboard of a results folder (or write static HTML)")
    d.add_argument("--results", required=True, metavar="DIR", help="folder written by experiments analyze --out")
    d.add_argument("--port", type=int, default=8050)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--html", metavar="OUT", help="write one static HTML file (PNG plots inlined) and exit")
    d.add_argument("--decisions", action="append", default=[], metavar="FILE",
                   help="a ramp controller's decision log (JSON lines) to show as a timeline; repeatable "
                        "(the results folder's *decisions.jsonl are always read)")
    d.set_defaults(func=cmd_dashboard)
