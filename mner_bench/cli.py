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
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=debug)], force=True)
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


def cmd_make_images(args) -> int:
    from .config import DataConfig
    from .data import sample_shots
    from .registry import get_registry
    from .synth import write_images

    reg = get_registry()
    spec = reg.spec("dataset", args.dataset)
    cfg = DataConfig(data_dir=args.data_dir)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else list(spec.splits)
    for s in splits:
        if s not in spec.splits:
            raise MnerBenchError(f"--splits: data set '{spec.name}' has no split '{s}'; splits: {', '.join(spec.splits)}")
    loader = spec.image_loader(cfg) if spec.image_loader else None
    counts = []
    for s in splits:
        tweets = spec.loader(s, cfg)
        if s == "train" and args.shots is not None:
            tweets = sample_shots(tweets, args.shots, args.seed)
        counts.append(f"{s} {write_images(tweets, args.out, args.size, loader)}")
    print(f"wrote generated images to {args.out}: {', '.join(counts)}")
    return 0


def _cli_options(args) -> dict:
    opts = {
        "data.dataset": args.dataset,
        "data.eval_dataset": getattr(args, "eval_dataset", None),
        "data.shots": args.shots,
        "data.data_dir": args.data_dir,
        "data.image_dir": getattr(args, "image_dir", None),
        "data.crop_dir": getattr(args, "crop_dir", None),
        "seed": args.seed,
        "train.epochs": args.epochs,
        "train.device": args.device,
        "output_dir": args.output_dir,
        "tracking.uri": args.tracking_uri,
        "quiet": True if args.quiet else None,
    }
    return {k: v for k, v in opts.items() if v is not None}


def cmd_run(args) -> int:
    from omegaconf import OmegaConf

    from .config import resolve_config
    from .errors import ConfigError
    from .registry import get_registry
    from .training import resolve_resume, run

    reg = get_registry()
    resume = None
    if args.resume:
        resume = resolve_resume(args.resume, args.tracking_uri)
        saved = resume / "config.yaml"
        method = OmegaConf.load(saved).method
        if args.method and reg.resolve_name("method", args.method) != method:
            raise ConfigError(f"--resume {args.resume} is a '{method}' run, not '{args.method}'")
        if args.overrides or any(v is not None for k, v in _cli_options(args).items() if k != "tracking.uri"):
            raise ConfigError("--resume continues a run with its saved config; give no other options or overrides")
        cfg = resolve_config(reg, method, saved, [], {"tracking.uri": args.tracking_uri} if args.tracking_uri else {})
    else:
        if not args.method:
            raise ConfigError("name a method (see 'mner-bench list method'), or --resume RUN")
        cfg = resolve_config(reg, args.method, args.config, args.overrides, _cli_options(args))
    result = run(cfg, reg, resume=resume)
    m = result.metrics
    print(f"test F1 {m['test_f1']:.4f} (P {m['test_precision']:.4f}, R {m['test_recall']:.4f}); "
          f"dev F1 {m['dev_f1']:.4f} at epoch {result.best_epoch}")
    if result.tracking_id:
        print(f"MLflow run id: {result.tracking_id} (store: {result.tracking_uri})")
    print(f"output folder: {result.output_dir}")
    return 0


def cmd_log_run(args) -> int:
    from .tracking import log_run_folder

    run_id = log_run_folder(args.folder, args.tracking_uri)
    print(f"MLflow run id: {run_id}")
    return 0


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MnerBenchError(f"{name} must be comma-separated whole numbers, got '{text}'") from None


def cmd_sweep(args) -> int:
    from .registry import get_registry
    from .sweep import SweepSpec, run_sweep

    reg = get_registry()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        reg.spec("method", m)
    shots: list[int | None] = [None if s.strip() == "full" else int(s) for s in args.shots.split(",")] if args.shots else [None]
    spec = SweepSpec(methods, reg.resolve_name("dataset", args.dataset), shots, _int_list(args.seeds, "--seeds"),
                     list(args.overrides), args.epochs, args.data_dir, args.output_dir or "runs", args.tracking_uri,
                     args.device)
    reg.spec("dataset", spec.dataset)
    out = run_sweep(spec, jobs=args.jobs, collect_only=args.collect)
    print(out["artifacts"]["summary_md"].read_text())
    print(f"MLflow parent run id: {out['parent_run_id']}")
    print(f"sweep folder: {out['output_dir']} (wall {out['wall_seconds']:.0f} s)")
    if out["failed"] or out["missing"]:
        print(f"mner-bench: error: {len(out['missing'])} combination(s) did not finish: {', '.join(out['missing'])}",
              file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .report import build_report
    from .tracking import connect, resolve_uri

    client = connect(resolve_uri(args.tracking_uri))
    run_ids = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else None
    print(build_report(client, args.experiment or None, run_ids, args.filter or "", args.paper, args.format), end="")
    return 0


def cmd_analyze_alignment(args) -> int:
    """BGA-MNER's alignment analysis (paper Figure 3); the logic lives in the bga plugin."""
    try:
        from mner_bench_bga.analysis import analyze_alignment, format_result
    except ImportError:
        raise MnerBenchError("analyze-alignment needs the bga plugin (package mner_bench_bga)") from None
    res = analyze_alignment(args.run, split=args.split, pool=args.pool, max_tweets=args.max_tweets,
                            tracking_uri=args.tracking_uri, center=not args.no_center, checkpoint=args.checkpoint)
    print(format_result(res))
    return 0


def cmd_evaluate(args) -> int:
    """Score a finished run's best checkpoint again, with config overrides."""
    import json

    from .evaluate import evaluate_run, format_result

    res = evaluate_run(args.run, args.overrides, split=args.split, tracking_uri=args.tracking_uri,
                       device=args.device or "auto", image_dir=args.image_dir)
    if args.json:
        s = res.scores
        print(json.dumps({"run": str(res.run_dir), "dataset": res.dataset, "split": res.split, "tweets": res.tweets,
                          "overrides": list(args.overrides), "f1": s.f1, "precision": s.precision, "recall": s.recall,
                          "per_type": s.per_type, **res.image_metrics}))
    else:
        print(format_result(res, args.overrides))
    return 0


def cmd_predict(args) -> int:
    import json
    import time

    from rich.console import Console

    from .predict import Predictor, entity_spans, read_inputs, render_pretty

    t0 = time.perf_counter()
    if args.text is not None:
        lines, source = [args.text], "--text"
    elif args.input:
        from pathlib import Path

        path = Path(args.input)
        try:
            lines, source = path.read_text(encoding="utf-8").splitlines(), str(path)
        except FileNotFoundError:
            raise MnerBenchError(f"--input {path}: file not found") from None
        except UnicodeDecodeError as exc:
            raise MnerBenchError(f"--input {path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        lines, source = sys.stdin.read().splitlines(), "<stdin>"
    ids, words, gold = read_inputs(lines, args.pretokenized, source)
    predictor = Predictor.from_run(args.run, device=args.device or "auto", tracking_uri=args.tracking_uri,
                                   image_dir=args.image_dir)
    t_load = time.perf_counter()
    tags = predictor.tag(words, ids, batch_size=args.batch_size)
    t_tag = time.perf_counter()
    fmt = args.format or ("pretty" if sys.stdout.isatty() else "conll")
    if fmt == "conll":
        out = []
        for i, (imgid, ws, ts) in enumerate(zip(ids, words, tags, strict=True)):
            out.append(f"IMGID:{imgid}")
            for j, (w, t) in enumerate(zip(ws, ts, strict=True)):
                out.append(f"{w}\t{gold[i][j]}\t{t}" if gold else f"{w}\t{t}")
            out.append("")
        sys.stdout.write("\n".join(out) + "\n")
    elif fmt == "jsonl":
        for imgid, ws, ts in zip(ids, words, tags, strict=True):
            print(json.dumps({"id": imgid, "text": " ".join(ws), "tokens": ws, "entities": entity_spans(ws, ts)},
                             ensure_ascii=False))
    else:
        console = Console()
        for ws, ts in zip(words, tags, strict=True):
            console.print(render_pretty(ws, ts))
    print(f"tagged {len(words)} tweet(s): model loaded in {t_load - t0:.1f} s, tagged in {t_tag - t_load:.2f} s",
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="data set name (t15, t17, ...); default from the method's config (t15)")
    p.add_argument("--eval-dataset", help="test on another data set (cross-domain; selection stays on --dataset's dev)")
    p.add_argument("--shots", type=int, help="train on N tweets drawn with --seed (default: all)")
    p.add_argument("--seed", type=int, help="random seed (default 1)")
    p.add_argument("--epochs", type=int, help="training epochs (default 30)")
    p.add_argument("--config", help="YAML file merged over the method's defaults")
    p.add_argument("--data-dir", help="folder with twitter2015/ and twitter2017/ (else $MNER_BENCH_DATA)")
    p.add_argument("--image-dir", help="folder of <IMGID>.jpg images for multimodal methods (else $MNER_BENCH_IMAGES)")
    p.add_argument("--crop-dir", help="folder of object crops <IMGID>_crop<k>.jpg (or data.crop_index), up to data.max_crops")
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
    p.add_argument("method", nargs="?", help="method name (see 'mner-bench list method')")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run: its output folder or MLflow run id")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("log-run", help="log a finished run's output folder to MLflow (e.g. after the server was down)")
    p.add_argument("folder", help="the run's output folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (else the run's config, $MLFLOW_TRACKING_URI, ./mlflow.db)")
    p.set_defaults(func=cmd_log_run)

    p = sub.add_parser("list", help="list registered components by kind")
    p.add_argument("kind", nargs="?", help="text_encoder, visual_encoder, aligner, decoder, dataset or method")
    p.add_argument("--pattern", default="*", help="glob on names")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("datasets", help="statistics of data sets per split")
    p.add_argument("names", nargs="*", help="data sets (default: all)")
    p.add_argument("--data-dir", help="folder with the data (else $MNER_BENCH_DATA)")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("make-images", help="write generated images (<IMGID>.jpg) for a data set's tweets")
    p.add_argument("--dataset", required=True, help="data set (t15, t17, synth-ambiguous, ...)")
    p.add_argument("--out", required=True, help="folder to write the images to")
    p.add_argument("--shots", type=int, help="only the N training tweets a run with --shots N --seed S uses")
    p.add_argument("--seed", type=int, default=1, help="seed of the --shots draw (default 1)")
    p.add_argument("--splits", help="comma-separated splits (default: all)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--data-dir", help="folder with the data (else $MNER_BENCH_DATA)")
    p.set_defaults(func=cmd_make_images)
    p = sub.add_parser("sweep", help="run methods x shots x seeds as child runs of one MLflow run; plot and tables")
    p.add_argument("methods", help="comma-separated methods, e.g. bertcrf,bga")
    p.add_argument("--dataset", default="t15", help="data set (default t15)")
    p.add_argument("--shots", default="50,100,200,400", help="comma-separated training sizes ('full' for all)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=1, help="combinations run at once (processes)")
    p.add_argument("--epochs", type=int, help="training epochs of each run")
    p.add_argument("--data-dir", help="folder with the data (else $MNER_BENCH_DATA)")
    p.add_argument("--device", help="device of each run")
    p.add_argument("--output-dir", help="parent folder of run outputs (default ./runs)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--collect", action="store_true", help="run nothing; draw the plot and tables from finished runs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="results table (paper's Table 2 layout) from the MLflow store")
    p.add_argument("--experiment", action="append", help="experiment name(s) (default: all)")
    p.add_argument("--runs", help="comma-separated MLflow run ids")
    p.add_argument("--filter", help="MLflow search filter, e.g. \"tags.method = 'bga'\"")
    p.add_argument("--format", default="md", choices=["md", "csv"], help="output format")
    p.add_argument("--paper", action="store_true", help="add the paper's published rows (Table 2)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("analyze-alignment", help="BGA: generated vs real visual features of a trained run (paper Fig. 3)")
    p.add_argument("run", help="a bga run's output folder (or its MLflow run id)")
    p.add_argument("--split", default="test", help="split whose tweets with images are analysed (default test)")
    p.add_argument("--pool", default="tokens", choices=["tokens", "mean"],
                   help="compare features token by token (default) or averaged over tokens")
    p.add_argument("--no-center", action="store_true",
                   help="compare the raw features (default: each centred on its mean over the tweets)")
    p.add_argument("--max-tweets", type=int, help="analyse only the first N tweets with an image")
    p.add_argument("--tracking-uri", help="MLflow store of the run (default: the run's own tracking settings)")
    p.add_argument("--checkpoint", help="checkpoint file to analyse instead of the run's checkpoints/best.pt "
                                        "(e.g. its checkpoints/last.pt, kept with train.keep_last=true); metrics are "
                                        "logged at its epoch's step")
    p.set_defaults(func=cmd_analyze_alignment)
    p = sub.add_parser("evaluate", help="score a finished run's model again on a split, with config overrides")
    p.add_argument("run", help="the run's output folder or MLflow run id")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes to the run's saved config, e.g. aligner.inference_visual=real")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--image-dir", help="folder of <IMGID>.jpg images for methods that read images")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--tracking-uri", help="MLflow store to find a run id in (else $MLFLOW_TRACKING_URI, ./mlflow.db)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("predict", help="tag tweets with a trained run")
    p.add_argument("run", help="the run's output folder or MLflow run id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="one tweet")
    src.add_argument("--input", help="file: one tweet per line, or CoNLL (IMGID: lines; with or without gold tags)")
    p.add_argument("--pretokenized", action="store_true", help="words are separated by single spaces, used as they are")
    p.add_argument("--format", choices=["conll", "jsonl", "pretty"], help="default: pretty on a terminal, else conll")
    p.add_argument("--image-dir", help="images for methods that need them at inference (not bga)")
    p.add_argument("--batch-size", type=int, default=32, help="tweets per batch (default 32)")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--tracking-uri", help="MLflow store to find a run id in (else $MLFLOW_TRACKING_URI, ./mlflow.db)")
    p.set_defaults(func=cmd_predict)
    return parser


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (a scheduler's kill, ``kill PID``) stops like Ctrl-C: the MLflow run is marked
    KILLED and the last checkpoint stays for ``--resume``."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


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
    _stop_cleanly_on_sigterm()
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
