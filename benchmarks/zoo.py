"""The model zoo side by side: MIND, ComiRec-DR and ComiRec-SA trained and scored in one run on
the quality section's data sets, at the reference budget and at the tuned recipe (the same
budgets for every model, epochs chosen on validation in the tuned runs).

    python -m benchmarks.zoo [--quick] [--datasets amazon_book_1m,movielens_1m]
        [--models mind,comirec_dr,comirec_sa]   ->  docs/model_zoo.md, docs/model_zoo.json
(--datasets takes any of benchmarks.quality.DATASETS)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from . import quality
from .common import machine

logger = logging.getLogger(__name__)
MODELS = ("mind", "comirec_dr", "comirec_sa")
NAMES = {"mind": "MIND", "comirec_dr": "ComiRec-DR", "comirec_sa": "ComiRec-SA"}


def run(quick: bool = False, datasets: tuple[str, ...] = quality.TUNED_ON,
        models: tuple[str, ...] = MODELS) -> dict:
    runs, figures = [], {}
    for name in datasets:
        pop = quality.popularity(name)
        figures[f"popular_recall50_{name}"] = pop["Recall@50"]
        figures[f"ref_recall50_{name}"] = quality.REFERENCE[name]["recall50"]
        recipes = (("reference_budget", quality.REFERENCE_BUDGET), ("tuned", quality.tuned_recipe(name)))
        for label, budget in recipes:
            for model in models:
                r = quality.train_and_evaluate(name, label, budget, quick, model=model)
                r["popular"] = pop
                runs.append(r)
                suffix = "" if label == "tuned" else "_refbudget"
                figures[f"recall50_{name}_{model}{suffix}"] = r["metrics"]["Recall@50"]
                figures[f"hitrate50_{name}_{model}{suffix}"] = r["metrics"]["HitRate@50"]
                figures[f"train_wall_s_{name}_{model}{suffix}"] = r["train_wall_s"]
                logger.info("%s %s %s: Recall@50 %.4f", name, model, label, r["metrics"]["Recall@50"])
    return {"figures": figures, "runs": runs}


def report(result: dict, machine: dict, command: str) -> str:
    lines = ["# The model zoo side by side", "",
             f"Command: `{command}`. Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} "
             f"cores, {machine.get('date', '')}. Every model trained with the same budget and seed "
             "in this one run; test split of the ComiRec protocol (docs/benchmarks.md §1); the tuned "
             "runs pick their epoch on the "
             "validation split. Recall/HitRate@50 over the full item set, exact search.", "",
             "| data | budget | model | Recall@50 | vs MIND | vs most-popular | HitRate@50 | NDCG@50 "
             "| epoch chosen | train wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    runs = result["runs"]
    for r in runs:
        mind = next((x for x in runs if x["dataset"] == r["dataset"] and x["label"] == r["label"]
                     and x["model"] == "mind"), None)
        m, pop = r["exact_metrics"], r["popular"]["Recall@50"]
        vs_mind = f"{m['Recall@50'] / mind['exact_metrics']['Recall@50']:.2f}" if mind else "-"
        model = NAMES.get(r["model"], r["model"])
        lines.append(f"| {r['dataset']} | {r['label'].replace('_', ' ')} | {model} "
                     f"| {m['Recall@50']:.4f} | {vs_mind} | {m['Recall@50'] / pop:.2f} | "
                     f"{m['HitRate@50']:.4f} | {m['NDCG@50']:.4f} | {r['final_epoch']} of {r['epochs_run']} "
                     f"| {r['train_wall_s']:.0f} |")
    lines += ["", "Most-popular Recall@50: " + ", ".join(
        f"{k[len('popular_recall50_'):]} {v:.4f}" for k, v in result["figures"].items()
        if k.startswith("popular_recall50_")), "",
        "Budgets: reference = `" + " ".join(quality.REFERENCE_BUDGET) + "`; tuned = the quality "
        "section's tuned recipe per data set (`benchmarks/quality.py` TUNED).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--datasets", default=",".join(quality.TUNED_ON))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    result = run(args.quick, tuple(args.datasets.split(",")), tuple(args.models.split(",")))
    result["wall_s"] = time.time() - t0
    command = "python -m benchmarks.zoo" + (" --quick" if args.quick else "") + \
        (f" --datasets {args.datasets}" if args.datasets != ",".join(quality.TUNED_ON) else "") + \
        (f" --models {args.models}" if args.models != ",".join(MODELS) else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_zoo.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, **result}, f, indent=2)
    with open(os.path.join(args.out, "model_zoo.md"), "w", encoding="utf-8") as f:
        f.write(report(result, machine(), command))
    print(f"wrote {args.out}/model_zoo.md and model_zoo.json ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
