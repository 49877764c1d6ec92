"""Write docs/benchmarks.md, docs/benchmarks.json and the quality plots from section results."""

from __future__ import annotations

import json
import os
from typing import Any


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def learning_curve_plot(runs: list[dict], path: str, machine: dict) -> str | None:
    """Recall@50 per epoch for each run (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        line, = ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", ms=3,
                        label=f"{r['dataset']} ({r['label']}), test")
        if r.get("valid_curve"):
            ax.plot(range(1, len(r["valid_curve"]) + 1), r["valid_curve"], ls="--", color=line.get_color(),
                    label=f"{r['dataset']} ({r['label']}), validation")
        if r.get("selected_by") == "validation":
            e = r["final_epoch"]
            ax.plot([e + 1], [r["curve"][e]], marker="*", ms=12, color=line.get_color())
    ax.set_xlabel("epoch (1000 batches x 128); star = epoch chosen on validation")
    ax.set_ylabel("Recall@50 (exact search)")
    ax.set_title(f"MIND learning curves - {machine['cores']} cores, {machine['cpu'][:40]}, {machine['date']}",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_section(q: dict, out_dir: str = "docs") -> list[str]:
    from .quality import REFERENCE

    lines = ["## 1. Quality", "",
             "Test users of each data set (ComiRec protocol: seeded 80/10/10 user split, first 80% of a "
             "test user's clicks are the history, the rest must be found), top-N over the full item set. "
             "Reference = PaddleRec's MIND with its sampling bug removed, as printed by its own infer.py "
             "on the same files (cited from `../shared/datasets/README.md`, not re-run here). "
             "`PaddleRec NDCG` divides by the ideal DCG of the hits only, as PaddleRec does.", "",
             "| data | run | Recall@50 | ratio vs ref | HitRate@50 | NDCG@50 | PaddleRec NDCG@50 | Recall@20 "
             "| HitRate@20 | users |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, ref in REFERENCE.items():
        runs = [r for r in q["runs"] if r["dataset"] == name]
        if not runs:
            continue
        pr_ndcg = f"{ref['paddlerec_ndcg50']:.4f}" if "paddlerec_ndcg50" in ref else "-"
        ndcg = f"{ref['ndcg50']:.4f}" if "ndcg50" in ref else "-"
        kind = "fixed, re-scored" if "ndcg50" in ref else "fixed"
        lines.append(f"| {name} | reference (PaddleRec MIND, {kind}) | {ref['recall50']:.4f} | 1.00 | "
                     f"{ref['hitrate50']:.4f} | {ndcg} | {pr_ndcg} | - | - | - |")
        if "published_recall50" in ref:
            pub = ref["published_recall50"]
            lines.append(f"| {name} | reference as published (re-seeding bug) | {pub:.4f} | "
                         f"{pub / ref['recall50']:.2f} | - | - | - | - | - | - |")
        pop = runs[0]["popular"]
        lines.append(f"| {name} | most popular | {pop['Recall@50']:.4f} | "
                     f"{pop['Recall@50'] / ref['recall50']:.2f} | {pop['HitRate@50']:.4f} | "
                     f"{pop['NDCG@50']:.4f} | - | {pop['Recall@20']:.4f} | {pop['HitRate@20']:.4f} | - |")
        for r in runs:
            m = r["metrics"]
            chosen = f"epoch {r.get('final_epoch', '?')} of {r.get('epochs_run', '?')}, " \
                f"{r.get('selected_by', 'last epoch')}"
            lines.append(
                f"| {name} | ours, {r['label'].replace('_', ' ')} ({chosen}) | {m['Recall@50']:.4f} | "
                f"{m['Recall@50'] / ref['recall50']:.2f} | {m['HitRate@50']:.4f} | {m['NDCG@50']:.4f} | "
                f"{m['PaddleRecNDCG@50']:.4f} | {m['Recall@20']:.4f} | {m['HitRate@20']:.4f} | "
                f"{r['users']} |")
    runs = "; ".join(f"`{r['dataset']}` {r['label']}: `{' '.join(r['budget'])}`" for r in q["runs"])
    lines += ["", "Runs: " + runs, ""]
    if q.get("curve_plot"):
        lines += [f"![learning curves]({os.path.relpath(q['curve_plot'], out_dir)})", ""]
    lines += ["## 2. Training", "",
              "| data | run | samples/s | ratio vs ref | epoch s | epochs run | train wall s | "
              "ref train wall s | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in q["runs"]:
        ref = REFERENCE[r["dataset"]]["samples_per_s"]
        ref_wall = REFERENCE[r["dataset"]].get("train_wall_s", 5 * 1000 * 128 / ref)
        lines.append(f"| {r['dataset']} | {r['label'].replace('_', ' ')} | {r['samples_per_s']:,.0f} | "
                     f"{r['samples_per_s'] / ref:.2f} | {r['epoch_s']:.1f} | {r.get('epochs_run', '-')} | "
                     f"{r['train_wall_s']:.0f} | ~{ref_wall:.0f} | {r['peak_rss_mb']:,.0f} |")
    floor = q.get("figures", {}).get("paddle_floor_rss_mb")
    if floor:
        lines += ["", f"Peak RSS floor of any Paddle trainer of this model, measured in the same run: "
                  f"{floor:,.0f} MB (Paddle imported, one sparse lookup + gradient of a 128 x 1301 id "
                  "batch). The reference's peak RSS was not recorded; it cannot be below this floor."]
    lines += ["", "Reference samples/s: amazon-book-1m ~1,470, movielens-1m ~2,100 "
              "(same machine type, cited); its train wall time is its 5 x 1000 x 128 samples at that "
              "rate. Our train wall time is the whole trainer process: start-up, training, checkpoints "
              "and, in the tuned runs, the validation after every epoch.",
              "", "Evaluation of every test user (model forward + search + merge + metrics):", "",
              "| data | run | Milvus Lite FLAT s | exact numpy s | same metrics |", "|---|---|---|---|---|"]
    for r in q["runs"]:
        same = all(abs(r["metrics"][k] - r["exact_metrics"][k]) < 1e-9 for k in r["exact_metrics"])
        lines.append(f"| {r['dataset']} | {r['label'].replace('_', ' ')} | {r['milvus_eval_s']:.1f} | "
                     f"{r['exact_eval_s']:.1f} | {'yes' if same else 'NO'} |")
    return lines + [""]


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


SECTION_TITLES = {"search": "## 3. Vector search", "serving": "## 4. Serving",
                  "load": "## 4b. Serving under load (external load generators)", "gpu": "## 5. GPU"}


SEARCH_CAVEAT = ("Latency, build time and memory of the engines. The `recall` column is neighbour overlap "
                 "with exact search on synthetic queries, which does not measure quality: what an index"
                 " costs in Recall@50 end to end is in sections 3b and 3c.")


def section_lines(key: str, sec: dict, out_dir: str, with_notes: bool = False) -> list[str]:
    intro = sec.get("intro", []) or ([SEARCH_CAVEAT] if key == "search" else [])
    lines = [SECTION_TITLES[key], ""] + intro + [""] + table(sec.get("rows", [])) + [""]
    for t in sec.get("tables", []):  # more tables: {"title": ..., "rows": [...]}
        lines += [t["title"], ""] + table(t["rows"]) + [""]
    for p in sec.get("plots", []):
        lines += [f"![{key}]({os.path.relpath(p, out_dir)})", ""]
    if with_notes and sec.get("notes"):
        lines += ["Notes of this section:", ""] + [f"- {n}" for n in sec["notes"]] + [""]
    return lines


def _put_sections(sections: list[list[str]], figures: dict, out_dir: str) -> str:
    """Replace each section (its first line is its ``## `` title) in docs/benchmarks.md, or insert
    it before the notes, and merge ``figures`` into docs/benchmarks.json; the rest stays."""
    md = os.path.join(out_dir, "benchmarks.md")
    with open(md) as f:
        lines = f.read().split("\n")
    for new in sections:
        title = new[0]
        if title in lines:
            start = lines.index(title)
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            lines[start:end] = new
        else:
            at = lines.index("## Notes") if "## Notes" in lines else len(lines)
            lines[at:at] = new
    with open(md, "w") as f:
        f.write("\n".join(lines))
    path = os.path.join(out_dir, "benchmarks.json")
    with open(path) as f:
        flat = json.load(f)
    flat.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()})
    with open(path, "w") as f:
        json.dump(flat, f, indent=2, sort_keys=True)
    return md


def update_sections(results: dict, command: str, out_dir: str = "docs") -> str:
    """Replace only these sections of an existing report (and their figures in the JSON), so one
    section can be re-measured without re-running the others; the command is noted in each."""
    sections, figures = [], {}
    for key, sec in results.items():
        if key not in SECTION_TITLES:
            raise ValueError(f"--update-docs cannot place section {key!r} (only {', '.join(SECTION_TITLES)})")
        new = section_lines(key, sec, out_dir, with_notes=True)
        new[1:1] = ["", f"This section re-measured on its own: `{command}`."]
        sections.append(new)
        figures.update(sec.get("figures", {}))
    return _put_sections(sections, figures, out_dir)


def write(results: dict, machine: dict, command: str, out_dir: str = "docs") -> str:
    """Write the markdown report and the flat JSON; returns the markdown path."""
    os.makedirs(out_dir, exist_ok=True)
    figures: dict[str, Any] = {}
    lines = ["# Benchmarks", "",
             f"Command: `{command}`  ",
             f"Machine: {machine['cores']} cores, {machine['memory_gb']} GB, {machine['cpu']}  ",
             "Versions: " + ", ".join(f"{k[:-8]} {v}" for k, v in machine.items() if k.endswith("_version"))
             + f", Python {machine['python']}  ",
             f"Date: {machine['date']}", "",
             "Measured values only; a figure that could not be measured says why. Shared, noisy 2-core "
             "machines: compare ratios within one run rather than absolute numbers across runs.", ""]
    if "runs" in results.get("quality", {}):
        q = results["quality"]
        figures.update(q["figures"])
        lines += quality_section(q, out_dir)
    for key in SECTION_TITLES:
        if key not in results:
            continue
        sec = results[key]
        figures.update(sec.get("figures", {}))
        lines += section_lines(key, sec, out_dir)
    notes = [n for sec in results.values() for n in sec.get("notes", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md = os.path.join(out_dir, "benchmarks.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    flat = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()}
    flat.update({f"machine_{k}": v for k, v in machine.items()})
    with open(os.path.join(out_dir, "benchmarks.json"), "w") as f:
        json.dump(flat, f, indent=2, sort_keys=True)
    return md


def merge_section(title: str, body: list[str], figures: dict, out_dir: str = "docs") -> None:
    """Put one stand-alone benchmark's section (``title``, a ``## `` line) into docs/benchmarks.md,
    replacing an older copy, and its figures into docs/benchmarks.json."""
    _put_sections([[title, "", *body, ""]], figures, out_dir)
