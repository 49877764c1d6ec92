"""The default (tuned) MIND recipe on the three data sets it was never tuned on, beside the
reference's re-scored figures and most-popular (../shared/datasets/README.md).

    python -m benchmarks.later_sets [--from-results output/bench/later_sets.json]
        ->  docs/quality_later_sets.md, docs/quality_later_sets.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from . import quality
from .common import BENCH_DIR, machine

SETS = ("amazon_health", "amazon_electronics_1m", "yoochoose_clicks_100k")


def run() -> list[dict]:
    runs = []
    for name in SETS:
        pop = quality.popularity(name)
        r = quality.train_and_evaluate(name, "tuned", quality.tuned_recipe(name), False)
        r["popular"] = pop
        runs.append(r)
    return runs


def report(runs: list[dict], machine_info: dict) -> str:
    lines = ["# MIND's default recipe on data it was not tuned on", "",
             f"`python -m benchmarks.later_sets`; {machine_info.get('cpu', '?')}, "
             f"{machine_info.get('cores', '?')} cores, {machine_info.get('date', '')}. Recipe: `"
             + " ".join(quality.tuned_recipe(SETS[0])) + "` (chosen on amazon-book-1m and movielens-1m), "
             "epoch chosen on the validation split, test split scored with exact search. Reference = "
             "PaddleRec MIND with its re-seeding removed, re-scored with the standard definitions "
             "(cited from ../shared/datasets/README.md).", "",
             "| data | Recall@50 | vs reference | vs most-popular | HitRate@50 | ref HitRate@50 | "
             "pop HitRate@50 | epoch chosen | train wall s | ref train wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ref, m, pop = quality.REFERENCE[r["dataset"]], r["exact_metrics"], r["popular"]
        lines.append(f"| {r['dataset']} | {m['Recall@50']:.4f} | {m['Recall@50'] / ref['recall50']:.2f} | "
                     f"{m['Recall@50'] / pop['Recall@50']:.2f} | {m['HitRate@50']:.4f} | "
                     f"{ref['hitrate50']:.4f} | {pop['HitRate@50']:.4f} | {r['final_epoch']} of "
                     f"{r['epochs_run']} | {r['train_wall_s']:.0f} | {ref['train_wall_s']} |")
    lines += ["", "Validation Recall@50 per epoch (the curve the epoch was chosen on):", ""]
    lines += [f"- {r['dataset']}: " + ", ".join(f"{v:.4f}" for v in r["valid_curve"]) for r in runs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.later_sets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-results", default=None, help="write the report from a saved run")
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.from_results:
        with open(args.from_results, encoding="utf-8") as f:
            runs = json.load(f)
    else:
        runs = run()
        os.makedirs(BENCH_DIR, exist_ok=True)
        with open(os.path.join(BENCH_DIR, "later_sets.json"), "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=2)
    figures = {}
    for r in runs:
        figures[f"recall50_{r['dataset']}"] = r["exact_metrics"]["Recall@50"]
        figures[f"popular_recall50_{r['dataset']}"] = r["popular"]["Recall@50"]
        figures[f"hitrate50_{r['dataset']}"] = r["exact_metrics"]["HitRate@50"]
        figures[f"train_wall_s_{r['dataset']}"] = r["train_wall_s"]
    with open(os.path.join(args.out, "quality_later_sets.json"), "w", encoding="utf-8") as f:
        json.dump({"figures": figures, "runs": runs}, f, indent=2)
    with open(os.path.join(args.out, "quality_later_sets.md"), "w", encoding="utf-8") as f:
        f.write(report(runs, machine()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
