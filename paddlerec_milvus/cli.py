"""Command-line entry points: ``paddlerec-milvus`` and the model zoo's trainer/infer scripts."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import ConfigError, PaddleRecMilvusError

logger = logging.getLogger("paddlerec_milvus")
# Import-time noise of dependencies, not actionable for a user of this CLI.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _run(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; a user's mistake is one line on stderr and exit code 2, not a trace."""
    try:
        return fn(args) or 0
    except PaddleRecMilvusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder that cannot be read or written: name it
        logger.debug("OSError", exc_info=True)
        reason = exc.strerror or str(exc) or type(exc).__name__
        if exc.filename is not None:
            where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
            reason = f"{where}: {reason}"
        print(f"error: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("-m", "--config_yaml", default=default, required=default is None,
                   help="model config YAML (e.g. mind/config.yaml)")
    p.add_argument("-o", "--opt", nargs="*", action="extend", default=[],
                   help="override a config key: -o runner.epochs=3 (repeatable)")


def _load(args: argparse.Namespace):
    """The config of ``-m``/``-o``, with ``runner.cpu_threads`` applied before Paddle is imported
    (every command that loads a model config imports Paddle only after this)."""
    from .config import load_config
    from .cpu_threads import configure_cpu_threads

    path = args.config_yaml
    if not os.path.isabs(path) and not os.path.exists(path):
        # Like PaddleRec: `-m mind/config.yaml` from models/, or from the repo root.
        alt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", path)
        if os.path.exists(alt):
            path = alt
    config = load_config(path, args.opt)
    configure_cpu_threads(config)
    return config


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three fractions, e.g. 0.8,0.1,0.1")
    return parts  # prepare_data checks they are non-negative and sum to 1


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from .data_prep import prepare_data

    stats = prepare_data(
        args.input, args.output, seed=args.seed, min_user_clicks=args.min_user_clicks,
        min_item_clicks=args.min_item_clicks, split=args.split, sep=args.sep,
        skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite,
    )
    print(f"wrote {args.output}: {stats.users} users "
          f"({stats.train_users} train / {stats.valid_users} valid / {stats.test_users} test), "
          f"{stats.items} items, {stats.interactions} clicks"
          + (f", {stats.bad_lines_skipped} bad lines skipped" if stats.bad_lines_skipped else ""))
    print(f"set hyper_parameters.item_count: {stats.item_count}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = _load(args)
    from .checkpoint import ensure_writable
    from .runner import train

    ensure_writable(config.get("runner.model_save_path") or "output_model")

    summary = train(config)
    for e in summary.epochs:
        valid = f", valid {summary.valid_metric} {e.valid:.5f}" if e.valid is not None else ""
        print(f"epoch {e.epoch}: loss {e.mean_loss:.4f}, {e.samples_per_s:.0f} samples/s, "
              f"{e.seconds:.1f} s -> {e.checkpoint}{valid}")
    if summary.best_epoch is not None:
        best = {e.epoch: e.valid for e in summary.epochs}.get(summary.best_epoch)
        if best is not None and summary.valid_popular is not None and best <= summary.valid_popular:
            print(f"WARNING: the best epoch is no better than most-popular on validation "
                  f"({summary.valid_metric} {best:.5f} <= {summary.valid_popular:.5f})")
        print(f"best epoch by valid {summary.valid_metric}: {summary.best_epoch}"
              + (" (stopped early)" if summary.stopped_early else "")
              + (f"; the tower reads each user's latest {summary.history_len} clicks (recall.history_len)"
                 if summary.history_len else ""))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.ann_builds:
        if args.exact:
            raise ConfigError("--ann-builds compares the Milvus index with exact search itself; "
                              "drop --exact")
        from .ann_eval import evaluate_ann

        print(evaluate_ann(config, builds=args.ann_builds, top_n=args.top_n, best=args.best,
                           timing_rounds=args.ann_timing_rounds).format())
        return 0
    from .evaluate import evaluate_epochs

    results = evaluate_epochs(config, top_n=args.top_n, paddlerec_metrics=args.paddlerec_metrics,
                              exact=args.exact, best=args.best)
    for r in results:
        print(r.format_line())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = _load(args)
    from .tune import format_report, parse_budget, tune

    budget = parse_budget(args.budget)
    output = args.output or (str(config.get("runner.model_save_path") or "output_model") + "_tune")
    rep = tune(config, budget, output, max_trials=args.trials, overrides=args.opt)
    print(format_report(rep), end="")
    if rep.best_trial is None:
        print("no trial completed within the budget; run again with the same --output to continue")
        return 1
    print(f"best config: {rep.tuned_config} (train it: python -u trainer.py -m {rep.tuned_config}; "
          f"a copy in {output}/best_config.yaml); the best trial's checkpoints: {rep.best_checkpoints} "
          f"(infer.py -m {rep.tuned_config} --best -o runner.infer_load_path={rep.best_checkpoints}); "
          f"report: {output}/tune_report.md")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    config = _load(args)
    from .export import export_model

    m = export_model(config, args.output, epoch=args.epoch, collection=args.collection)
    print(f"exported epoch {m.epoch} (version {m.model_version}) to {args.output}: "
          f"{m.items_indexed} items in {m.milvus_uri} collection {m.collection}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving_pipeline import serve_main

    return serve_main(args.config)


def cmd_api(args: argparse.Namespace) -> int:
    from .rest_api import run_api

    return run_api(host=args.host, port=args.port, export_dir=args.export_dir,
                   milvus_uri=args.milvus_uri, collection=args.collection)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddlerec-milvus",
                                     description="MIND multi-interest recall with Milvus")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-data", help="raw user,item,timestamp logs -> MIND data folder")
    p.add_argument("--input", required=True, help="CSV (or .csv.gz) of user,item,timestamp")
    p.add_argument("--output", required=True, help="folder to write (train/ valid/ test/ ...)")
    p.add_argument("--seed", type=int, default=2021)
    p.add_argument("--min-user-clicks", type=int, default=5)
    p.add_argument("--min-item-clicks", type=int, default=5)
    p.add_argument("--split", type=_split, default=(0.8, 0.1, 0.1), metavar="TRAIN,VALID,TEST",
                   help="fractions of users for train, validation and test (default 0.8,0.1,0.1)")
    p.add_argument("--sep", default=",")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (counted) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_prepare_data)

    p = sub.add_parser("train", help="train a model directory (as models/trainer.py)")
    _add_config_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("infer", help="evaluate checkpoints with Milvus (as models/infer.py)")
    _add_config_args(p)
    _add_infer_args(p)
    p.set_defaults(fn=cmd_infer)

    p = sub.add_parser("tune", help="search hyper-parameters on the validation split (Optuna)")
    _add_config_args(p)
    p.add_argument("--budget", required=True, help="wall time: 30m, 2h, 90s")
    p.add_argument("--trials", type=int, default=None, help="stop after this many trials")
    p.add_argument("--output", default=None,
                   help="study folder (default {runner.model_save_path}_tune); the same folder resumes")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("export", help="export the user tower + item vectors for serving")
    _add_config_args(p)
    p.add_argument("--epoch", type=int, default=None,
                   help="checkpoint epoch (default: the best by validation if recorded, else the latest)")
    p.add_argument("--output", required=True, help="folder for the inference model and manifest")
    p.add_argument("--collection", default=None,
                   help="serving collection/alias "
                   "(default: milvus.serving_collection or {milvus.collection}_serving)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("serve", help="run the Paddle Serving pipeline (RPC + HTTP) in the foreground")
    p.add_argument("-c", "--config", default="serving/config.yml")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("api", help="run the REST API (FastAPI/uvicorn) in the foreground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--export-dir", default=None, help="exported model folder (default: env or output/export)")
    p.add_argument("--milvus-uri", default=None)
    p.add_argument("--collection", default=None)
    p.set_defaults(fn=cmd_api)
    return parser


def _add_infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-top_n", "--top_n", type=int, default=50)
    p.add_argument("--paddlerec-metrics", action="store_true",
                   help="also report PaddleRec's NDCG variant (IDCG over the hits only)")
    p.add_argument("--exact", action="store_true",
                   help="search with exact numpy top-k instead of Milvus (for comparisons)")
    p.add_argument("--best", action="store_true",
                   help="evaluate the best epoch by validation (best.json) instead of "
                   "runner.infer_start_epoch..infer_end_epoch")
    p.add_argument("--ann-builds", type=int, default=0, metavar="N",
                   help="score one epoch (--best, else runner.infer_start_epoch) through the "
                   "profile's Milvus index N times, each a fresh build, beside exact search and "
                   "FLAT on the same interests: end-to-end recall loss and search cost per user")
    p.add_argument("--ann-timing-rounds", type=int, default=3, metavar="R",
                   help="with --ann-builds: time each build's search cost in R turns alternating "
                   "with FLAT's (default 3)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return _run(args.fn, args)


def trainer_main(argv: Sequence[str] | None = None) -> int:
    """``models/trainer.py``: PaddleRec's trainer command line."""
    p = argparse.ArgumentParser(description="train a PaddleRec-style model directory")
    _add_config_args(p, default="mind/config.yaml")
    args = p.parse_args(argv)
    setup_logging()
    return _run(cmd_train, args)


def infer_main(argv: Sequence[str] | None = None) -> int:
    """``models/infer.py``: PaddleRec's infer command line, searching Milvus."""
    p = argparse.ArgumentParser(description="evaluate checkpoints with Milvus recall")
    _add_config_args(p, default="mind/config.yaml")
    _add_infer_args(p)
    args = p.parse_args(argv)
    setup_logging()
    return _run(cmd_infer, args)


if __name__ == "__main__":
    sys.exit(main())


