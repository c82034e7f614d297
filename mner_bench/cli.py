"""The ``mner-bench`` command line.

User errors (:class:`~mner_bench.errors.MnerBenchError`) print one clear message and exit with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .errors import MnerBenchError

log = logging.getLogger("mner_bench")


def _setup_logging(quiet: bool, debug: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=debug)], force=True)
    logging.getLogger("mner_bench").setLevel(level)
    for noisy in ("transformers", "huggingface_hub", "mlflow", "alembic", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- commands


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .registry import KINDS, get_registry

    reg = get_registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    table = Table(title="registered components")
    for col in ("kind", "name", "plugin", "description"):
        table.add_column(col)
    for kind in kinds:
        if kind not in KINDS:
            from .errors import UnknownNameError

            raise UnknownNameError("component kind", kind, KINDS)
        for name, entry in reg.items(kind):
            if name not in reg.list_components(kind, args.pattern):
                continue
            desc = entry.spec.description
            aliases = getattr(entry.spec, "aliases", ())
            if aliases:
                desc = f"{desc} (aliases: {', '.join(aliases)})"
            table.add_row(kind, name, entry.plugin, desc)
    Console().print(table)
    return 0


def cmd_datasets(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .config import DataConfig
    from .data import ENTITY_TYPES
    from .metrics import count_entities
    from .registry import get_registry

    reg = get_registry()
    names = args.names or [n for n, _ in reg.items("dataset")]
    cfg = DataConfig(data_dir=args.data_dir)
    table = Table(title="data sets (entities counted as the scorer counts them)")
    for col in ("data set", "split", "tweets", "tokens", *ENTITY_TYPES, "entities", "longest tweet"):
        table.add_column(col, justify="right" if col not in ("data set", "split") else "left")
    for name in names:
        spec = reg.spec("dataset", name)
        for split in spec.splits:
            tweets = spec.loader(split, cfg)
            ents = count_entities([t.tags for t in tweets])
            table.add_row(spec.name, split, str(len(tweets)), str(sum(len(t.tokens) for t in tweets)),
                          *(str(ents.get(t, 0)) for t in ENTITY_TYPES), str(sum(ents.values())),
                          str(max(len(t.tokens) for t in tweets)))
    Console().print(table)
    return 0


def _cli_options(args) -> dict:
    opts = {
        "data.dataset": args.dataset,
        "data.eval_dataset": getattr(args, "eval_dataset", None),
        "data.shots": args.shots,
        "data.data_dir": args.data_dir,
        "data.image_dir": getattr(args, "image_dir", None),
        "seed": args.seed,
        "train.epochs": args.epochs,
        "train.device": args.device,
        "output_dir": args.output_dir,
        "tracking.uri": args.tracking_uri,
        "quiet": True if args.quiet else None,
    }
    return {k: v for k, v in opts.items() if v is not None}


def cmd_run(args) -> int:
    from .config import resolve_config
    from .registry import get_registry
    from .training import run

    reg = get_registry()
    cfg = resolve_config(reg, args.method, args.config, args.overrides, _cli_options(args))
    result = run(cfg, reg)
    m = result.metrics
    print(f"test F1 {m['test_f1']:.4f} (P {m['test_precision']:.4f}, R {m['test_recall']:.4f}); "
          f"dev F1 {m['dev_f1']:.4f} at epoch {result.best_epoch}")
    if result.tracking_id:
        print(f"MLflow run id: {result.tracking_id} (store: {result.tracking_uri})")
    print(f"output folder: {result.output_dir}")
    return 0


# --------------------------------------------------------------------------- parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="data set name (t15, t17, ...); default from the method's config (t15)")
    p.add_argument("--shots", type=int, help="train on N tweets drawn with --seed (default: all)")
    p.add_argument("--seed", type=int, help="random seed (default 1)")
    p.add_argument("--epochs", type=int, help="training epochs (default 30)")
    p.add_argument("--config", help="YAML file merged over the method's defaults")
    p.add_argument("--data-dir", help="folder with twitter2015/ and twitter2017/ (else $MNER_BENCH_DATA)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--output-dir", help="parent folder of run outputs (default ./runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=5e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mner-bench",
        description="Train, evaluate and compare multimodal NER methods on Twitter2015/2017.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train and evaluate one method")
    p.add_argument("method", help="method name (see 'mner-bench list method')")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list registered components by kind")
    p.add_argument("kind", nargs="?", help="text_encoder, visual_encoder, aligner, decoder, dataset or method")
    p.add_argument("--pattern", default="*", help="glob on names")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("datasets", help="statistics of data sets per split")
    p.add_argument("names", nargs="*", help="data sets (default: all)")
    p.add_argument("--data-dir", help="folder with the data (else $MNER_BENCH_DATA)")
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options; argparse leaves those in ``extra``
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _setup_logging(getattr(args, "quiet", False), args.debug)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except MnerBenchError as exc:
        if args.debug:
            raise
        print(f"mner-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mner-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
