"""``stratarank benchmark kuairand``: test AUC / GAUC per objective of the offline rankers.

Importing this module stays light (no torch, no lightgbm): the heavy imports happen inside the command.
"""
from __future__ import annotations

import json
import sys

MODELS = ("popularity", "lightgbm", "torchrec", "lambdarank")


def cmd_benchmark_kuairand(args) -> int:
    from strategy.errors import ValidationError

    from ranking.benchmark import kuairand_benchmark

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"--models: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr))
    try:
        result = kuairand_benchmark(args.data, models=models, torchrec_config=args.torchrec_config,
                                    history=args.history, progress=not args.no_progress, log=log)
    except ValidationError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    return 0


def add_parser(sub) -> None:
    """Register ``benchmark kuairand`` on the CLI's sub-parsers."""
    p = sub.add_parser("benchmark", help="offline benchmarks of the rankers (test AUC / GAUC per objective)")
    bsub = p.add_subparsers(dest="benchmark", required=True)
    k = bsub.add_parser("kuairand", help="the real KuaiRand logs, standard split (train 04-08..18, test 04-19..21)")
    k.add_argument("--data", metavar="DIR", default=None,
                   help="folder of interactions.tsv (default: $STRATARANK_DATA, else ../shared/data/kuairand)")
    k.add_argument("--models", default="popularity,lightgbm,torchrec",
                   help=f"comma-separated, from {', '.join(MODELS)} (default: %(default)s)")
    k.add_argument("--history", choices=("train", "all"), default="train",
                   help="history features of test rows: train days only (standard) or also earlier test days")
    k.add_argument("--torchrec-config", metavar="YAML", default=None,
                   help="train config of the TorchRec ranker (default: conf/train/kuairand_mmoe.yaml)")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=cmd_benchmark_kuairand)
