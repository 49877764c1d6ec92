"""The default recipe (models/mind/config_bigdata.yaml as shipped) on the five development sets,
beside the reference's re-scored figures and most-popular (../shared/datasets/README.md).

    python -m benchmarks.five_sets [--sets amazon_book_1m,...] [--from-results output/bench/five_sets.json]
        ->  docs/quality_five_sets.md, docs/quality_five_sets.json (and the recall50_<set> /
            popular_recall50_<set> keys of docs/benchmarks.json)

Each set: train with the config's own settings (only the data paths and item_count set), the
epoch, the history bonus and the history length chosen on the validation split; test Recall@50
with exact search, and the same checkpoint with the bonus off and with the whole history, so
the share of each is visible.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from paddlerec_milvus.checkpoint import (
    BEST_FILE,
    checkpoint_dir,
    history_bonus_for,
    history_len_for,
    load_checkpoint,
)
from paddlerec_milvus.config import load_config
from paddlerec_milvus.evaluate import model_for_evaluation
from paddlerec_milvus.model_dir import create_reader
from paddlerec_milvus.recall import ExactIndex
from paddlerec_milvus.scoring import score_checkpoint

from . import quality
from .common import BENCH_DIR, machine

SETS = tuple(quality.DATASETS)
# the shipped config's own early stopping, spelled out so train_and_evaluate validates
RECIPE = ["runner.early_stop_patience=3"]


def without_extras(name: str, run_dir: str, epoch: int) -> dict:
    """Test metrics of the chosen checkpoint without the history bonus (at the chosen history
    length) and with the whole history (at the chosen bonus), and what validation chose."""
    over = quality._overrides(quality.prepared(name), run_dir, validate=True) + RECIPE
    cfg = load_config(quality.CONFIG, over)
    save = cfg["runner.model_save_path"]
    dm, model = model_for_evaluation(cfg)
    load_checkpoint(model, checkpoint_dir(save, epoch))
    bonus, length = history_bonus_for(cfg, save, epoch), history_len_for(cfg, save, epoch)
    reader, dim = create_reader(cfg, "test"), int(cfg["hyper_parameters.embedding_dim"])
    no_bonus, _ = score_checkpoint(cfg, dm, model, reader, ExactIndex(dim), 50, progress=False,
                                   history_bonus=0.0, history_len=length)
    full = no_bonus if length is None else score_checkpoint(
        cfg, dm, model, reader, ExactIndex(dim), 50, progress=False,
        history_bonus=history_bonus_for({**cfg, "recall.history_len": 0}, save, epoch))[0]
    with open(os.path.join(save, BEST_FILE), encoding="utf-8") as f:
        tried = json.load(f).get("history_len_tried") or {}
    return {"no_bonus_metrics": no_bonus, "full_history_metrics": full, "history_bonus": bonus,
            "history_len": length, "history_len_tried": tried}


def run(sets: tuple[str, ...]) -> list[dict]:
    runs = []
    for name in sets:
        pop = quality.popularity(name)
        r = quality.train_and_evaluate(name, "default", RECIPE, False)
        run_dir = os.path.join(BENCH_DIR, "runs", f"{name}_default")
        r.update(without_extras(name, run_dir, r["final_epoch"]))
        r["popular"] = pop
        runs.append(r)
    return runs


def report(runs: list[dict], machine_info: dict) -> str:
    lines = ["# MIND's default recipe on five data sets", "",
             f"`python -m benchmarks.five_sets`; {machine_info.get('cpu', '?')}, "
             f"{machine_info.get('cores', '?')} cores, {machine_info.get('date', '')}. Recipe: "
             "`models/mind/config_bigdata.yaml` as shipped (up to 20 epochs x 1000 x 128, lr 0.003, 1280 "
             "negatives, early stop after 3 epochs without a better validation Recall@50, "
             "`recall.history_bonus: auto`, `recall.history_len: auto`); epoch, history bonus and history "
             "length chosen on the validation split, "
             "test split scored with exact search. Reference = PaddleRec MIND with its re-seeding "
             "removed, re-scored with the standard definitions (cited from ../shared/datasets/README.md; "
             "amazon-book-1m and movielens-1m: the figures its infer.py printed).", "",
             "| data | Recall@50 | vs reference | vs most-popular | bonus off | all maxlen | latest clicks "
             "| HitRate@50 | ref HitRate@50 | pop HitRate@50 | epoch chosen | train wall s "
             "| ref train wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ref, m, pop = quality.REFERENCE[r["dataset"]], r["exact_metrics"], r["popular"]
        ref_wall = ref.get("train_wall_s") or round(5000 * 128 / ref["samples_per_s"])
        lines.append(f"| {r['dataset']} | {m['Recall@50']:.4f} | {m['Recall@50'] / ref['recall50']:.2f} | "
                     f"{m['Recall@50'] / pop['Recall@50']:.2f} | {r['no_bonus_metrics']['Recall@50']:.4f} | "
                     f"{r.get('full_history_metrics', m)['Recall@50']:.4f} | "
                     f"{r.get('history_len') or 'all'} | "
                     f"{m['HitRate@50']:.4f} | {ref['hitrate50']:.4f} | {pop['HitRate@50']:.4f} | "
                     f"{r['final_epoch']} of {r['epochs_run']} | {r['train_wall_s']:.0f} | {ref_wall} |")
    lines += ["", "bonus off = the same checkpoint with `recall.history_bonus=0`; all maxlen = with "
              "`recall.history_len=0` (the tower reads the whole history, up to maxlen 20); latest clicks "
              "= the history length validation chose. History bonus chosen "
              "(score units; 0 = off): " + ", ".join(f"{r['dataset']} {r['history_bonus']:.3g}" for r in runs)
              + ". Reference train wall for amazon-book-1m and movielens-1m: 5,000 batches of 128 at its "
              "cited samples/s.", "",
              "Validation Recall@50 per epoch (the curve the epoch was chosen on):", ""]
    lines += [f"- {r['dataset']}: " + ", ".join(f"{v:.4f}" for v in r["valid_curve"]) for r in runs]
    lines += ["", "Validation Recall@50 of the chosen epoch by history length (latest n clicks; a shorter "
              "one is kept only if it beats all 20 by 1%):", ""]
    lines += [f"- {r['dataset']}: " + ", ".join(f"{n}: {v:.4f}" for n, v in r["history_len_tried"].items())
              for r in runs if r.get("history_len_tried")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.five_sets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated data set names")
    p.add_argument("--from-results", default=None, help="write the report from a saved run")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.from_results:
        with open(args.from_results, encoding="utf-8") as f:
            runs = json.load(f)
    else:
        sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
        unknown = [s for s in sets if s not in SETS]
        if unknown:
            p.error(f"unknown data sets {unknown}; known: {', '.join(SETS)}")
        runs = run(sets)
        os.makedirs(BENCH_DIR, exist_ok=True)
        with open(os.path.join(BENCH_DIR, "five_sets.json"), "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=2)
    figures = {}
    for r in runs:
        name = r["dataset"]
        figures[f"recall50_{name}"] = r["exact_metrics"]["Recall@50"]
        figures[f"popular_recall50_{name}"] = r["popular"]["Recall@50"]
        figures[f"hitrate50_{name}"] = r["exact_metrics"]["HitRate@50"]
        figures[f"recall50_{name}_no_history_bonus"] = r["no_bonus_metrics"]["Recall@50"]
        if "full_history_metrics" in r:
            figures[f"recall50_{name}_all_maxlen"] = r["full_history_metrics"]["Recall@50"]
            figures[f"history_len_{name}"] = r["history_len"] or 0
        figures[f"train_wall_s_{name}"] = r["train_wall_s"]
    with open(os.path.join(args.out, "quality_five_sets.json"), "w", encoding="utf-8") as f:
        json.dump({"figures": figures, "runs": runs}, f, indent=2)
    with open(os.path.join(args.out, "quality_five_sets.md"), "w", encoding="utf-8") as f:
        f.write(report(runs, machine()))
    bench = os.path.join(args.out, "benchmarks.json")
    if os.path.isfile(bench):  # the five sets' keys of the main benchmark file
        with open(bench, encoding="utf-8") as f:
            doc = json.load(f)
        doc.update(figures)
        with open(bench, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
