"""``stratarank train``, ``stratarank evaluate``, ``stratarank quantize``, ``stratarank models list`` and
``models rollback``.

Importing this module stays light (no torch): the heavy imports happen inside the commands.
"""
from __future__ import annotations

import json
import sys


def cmd_train(args) -> int:
    """Train the model of a train config; ``--nproc N`` trains with DistributedModelParallel."""
    from strategy.errors import ValidationError

    for flag, value in (("--epochs", args.epochs), ("--max-rows", args.max_rows), ("--nproc", args.nproc)):
        if value is not None and value < 1:
            print(f"{flag}: must be at least 1, got {value}", file=sys.stderr)
            return 2
    try:
        from ranking.train import load_train_config

        cfg = load_train_config(args.config)
        overrides = {}
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        if args.max_rows is not None:
            overrides["max_rows"] = args.max_rows
        if overrides:
            import dataclasses

            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **overrides))
        if args.nproc > 1:
            from ranking.distributed import train_distributed

            summary = train_distributed(cfg, nproc=args.nproc, registry=args.registry,
                                        progress=not args.no_progress, config_path=args.config,
                                        overrides=overrides)
        else:
            from ranking.train import train_from_config

            summary = train_from_config(cfg, registry=args.registry, progress=not args.no_progress)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "metrics"} |
                         {"metrics": {s: summary["metrics"].get(s) for s in ("valid", "test")}}, indent=2))
    return 0


def cmd_models_list(args) -> int:
    from ranking.registry import list_models

    rows = list_models(args.registry)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {args.registry}")
        return 0
    print(f"{'':1} {'name':<20} {'version':<8} {'created':<21} {'arch':<14} metrics")
    for r in rows:
        kinds = r.get("metric_kinds", {})
        metrics = ", ".join(f"{k} {kinds.get(k, '')} {v:.3f}".replace("  ", " ") if isinstance(v, (int, float))
                            else f"{k} -" for k, v in r["metrics"].items())
        variants = f" (serving: {', '.join(r['serving'])})" if r.get("serving") else ""
        print(f"{'*' if r['current'] else ' '} {r['name']:<20} {r['version']:<8} {r['created'] or '':<21} "
              f"{r['arch'] or '':<14} {r['metric_split']}: {metrics}{variants}")
    return 0


def cmd_quantize(args) -> int:
    """Add a serving variant with row-wise quantized embedding tables to a registered TorchRec version."""
    from strategy.errors import ValidationError

    from ranking.quantize import VariantError

    try:
        from ranking.artifacts import add_serving_variant

        entry = add_serving_variant(args.registry, args.model, args.to)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    except VariantError as exc:
        print(f"{args.model}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(entry, indent=2))
        return 0
    share = entry["embedding_bytes"] / max(entry["fp32_embedding_bytes"], 1)
    print(f"{args.model}: {entry['file']} ({entry['bytes']:,} bytes): embedding tables {entry['fp32_embedding_bytes']:,} "
          f"-> {entry['embedding_bytes']:,} bytes ({share:.1%} of fp32), whole model {entry['fp32_model_bytes']:,} "
          f"-> {entry['model_bytes']:,} bytes")
    return 0


def cmd_models_rollback(args) -> int:
    """Point a model's ``current`` at the version before it (or ``--to``); scorers following the
    registry serve it within their poll interval."""
    from strategy.errors import ValidationError

    from ranking.registry import current_version, rollback

    before = current_version(args.registry, args.name)
    try:
        version = rollback(args.registry, args.name, args.to)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    print(f"{args.name}: current {before} -> {version}")
    return 0


def cmd_evaluate(args) -> int:
    """Evaluate a registered model on held-out data: per-objective metrics, NDCG@10, reliability plot."""
    from strategy import load_strategy
    from strategy.errors import ValidationError

    try:
        from online.predictor import load_ranker
        from ranking.evaluate import evaluate_model, held_out_rows

        model = load_ranker(args.registry, args.model, args.quantized)
        if getattr(model, "load_warning", None):
            print(f"{args.model}: {model.load_warning}", file=sys.stderr)
            return 1
        frame, data = held_out_rows(args.data, args.split)
        strategy = load_strategy(args.strategy) if args.strategy else None
        result = evaluate_model(model, frame, strategy, plot=args.plot)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    tables = f" ({args.quantized} tables)" if args.quantized != "none" else ""
    result = {"model": f"{model.name}@{model.version}{tables}", "data": data["source"], "split": data["split"],
              **result}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']} on {result['data']} ({result['split']}, {result['rows']:,} rows)")
    for name, m in result["objectives"].items():
        print(f"  {name:<16} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if result.get("ndcg@10") is not None:
        print(f"  blended score NDCG@10 {result['ndcg@10']:.4f}")
    if result.get("plot"):
        print(f"  reliability plot: {result['plot']}")
    return 0


def add_parser(sub) -> None:
    """Register ``train``, ``evaluate``, ``quantize`` and ``models`` on the ``stratarank`` sub-parsers."""
    from ranking.quantize import QUANTIZE

    p = sub.add_parser("train", help="train a TorchRec multi-task ranker and register it")
    p.add_argument("--config", required=True, metavar="FILE", help="a train config, e.g. conf/train/sim_mmoe.yaml")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes for DistributedModelParallel (table-wise sharding, gloo, CPU)")
    p.add_argument("--registry", default=None, metavar="DIR", help="registry folder (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    p.add_argument("--max-rows", type=int, default=None, help="override training.max_rows (most recent train rows)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a registered model on held-out data")
    p.add_argument("--model", required=True, metavar="REF", help="name (current), name@version or a version folder")
    p.add_argument("--data", required=True, metavar="PATH|kuairand",
                   help="simulated logs (folder or impressions.parquet; its time-split test rows) or 'kuairand'")
    p.add_argument("--registry", default="registry", metavar="DIR")
    p.add_argument("--strategy", metavar="FILE", help="objectives YAML whose blended score NDCG@10 is reported")
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--plot", metavar="PNG", help="write a reliability plot here")
    p.add_argument("--quantized", choices=QUANTIZE, default="none",
                   help="evaluate the version's serving variant with quantized tables (stratarank quantize)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quantize", help="add a serving variant with row-wise int8/int4 embedding tables to a "
                                        "registered TorchRec version")
    p.add_argument("--model", required=True, metavar="NAME[@V]", help="name (current), name@version or a version folder")
    p.add_argument("--registry", default="registry", metavar="DIR")
    p.add_argument("--to", required=True, choices=[q for q in QUANTIZE if q != "none"])
    p.add_argument("--json", action="store_true", help="print the manifest entry as JSON")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("models", help="list registered models")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("list", help="list the registry's models and versions (* = current)")
    q.add_argument("--registry", default="registry", metavar="DIR")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser("rollback", help="point a model's current version back (the one before, or --to)")
    q.add_argument("name")
    q.add_argument("--to", metavar="VERSION", help="e.g. v12 (default: the version before the current one)")
    q.add_argument("--registry", default="registry")
    q.set_defaults(func=cmd_models_rollback)
