"""What each approximate index costs end to end on a trained model: amazon-book-1m (tuned recipe,
epoch chosen on validation) evaluated on a Milvus 2.3 server through `infer.py --ann-builds 3`
for every index setting below, all in one run on one server. Each row: mean end-to-end
Recall@50 loss against exact search over 3 builds (with its spread), the mean share of an
interest's exact top-50 the index returned, and search ms per user against FLAT's in the same run.

    python -m benchmarks.ann_e2e [--run amazon_book_1m_tuned] [--settings NAME ...] [--eval-time]

Trains the checkpoint first when the run folder has none (benchmarks.quality's tuned recipe).
Writes docs/ann_end_to_end.json and .md, then times the evaluation itself (``infer.py --best``) on
Milvus Lite against the server in alternating turns (docs/benchmarks.md section 3d; ``--eval-time``
does only that).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

from benchmarks.common import BENCH_DIR, MODELS, machine, python, run_measured
from benchmarks.quality import CONFIG, _overrides, prepared, tuned_recipe
from benchmarks.report import merge_section
from paddlerec_milvus.checkpoint import best_epoch
from paddlerec_milvus.milvus_server import MilvusServer

logger = logging.getLogger("benchmarks.ann_e2e")
REPO = os.path.dirname(MODELS)
DATASET = "amazon_book_1m"

# name -> (index_type, index_params, search_params)
SETTINGS: dict[str, tuple[str, dict[str, int], dict[str, int]]] = {
    "hnsw_m16_ef64": ("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 64}),
    "hnsw_m16_ef128": ("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 128}),
    "hnsw_m8_ef50": ("HNSW", {"M": 8, "efConstruction": 200}, {"ef": 50}),
    "ivf_flat_1024_16": ("IVF_FLAT", {"nlist": 1024}, {"nprobe": 16}),
    "ivf_flat_1024_64": ("IVF_FLAT", {"nlist": 1024}, {"nprobe": 64}),
    "ivf_flat_2048_64": ("IVF_FLAT", {"nlist": 2048}, {"nprobe": 64}),
    "ivf_flat_64_4": ("IVF_FLAT", {"nlist": 64}, {"nprobe": 4}),
    "ivf_flat_128_8": ("IVF_FLAT", {"nlist": 128}, {"nprobe": 8}),
    "ivf_flat_256_16": ("IVF_FLAT", {"nlist": 256}, {"nprobe": 16}),
    "ivf_flat_512_32": ("IVF_FLAT", {"nlist": 512}, {"nprobe": 32}),
    "scann_256_16": ("SCANN", {"nlist": 256}, {"nprobe": 16, "reorder_k": 100}),
    "ivf_sq8_1024_32": ("IVF_SQ8", {"nlist": 1024}, {"nprobe": 32}),
    "scann_1024_32": ("SCANN", {"nlist": 1024}, {"nprobe": 32, "reorder_k": 200}),
}

PROFILE_SETTING = "ivf_flat_64_4"  # what configs/milvus_standalone.yaml sets
DEFAULT_SETTINGS = ["ivf_flat_64_4", "ivf_flat_128_8", "ivf_flat_256_16", "ivf_flat_1024_16",
                    "ivf_flat_1024_64", "ivf_flat_2048_64", "ivf_sq8_1024_32", "hnsw_m16_ef64",
                    "hnsw_m16_ef128"]


def _checkpoint(run: str, extra: list[str]) -> tuple[list[str], int]:
    """The run's -o overrides and its best epoch, training it first if needed."""
    run_dir = os.path.join(BENCH_DIR, "runs", run)
    over = _overrides(prepared(DATASET), run_dir, validate=True) + tuned_recipe(DATASET) + extra
    epoch = best_epoch(os.path.join(run_dir, "ckpt"))
    if epoch is None:
        logger.info("training %s ...", run)
        run_measured([python(), "-u", os.path.join(MODELS, "trainer.py"), "-m", CONFIG, "-o", *over],
                     cwd=MODELS)
        epoch = best_epoch(os.path.join(run_dir, "ckpt"))
    return over, int(epoch)


def _milvus_keys(setting: tuple[str, dict[str, int], dict[str, int]]) -> list[str]:
    kind, build, search = setting
    return ([f"milvus.index_type={kind}"] + [f"milvus.index_params.{k}={v}" for k, v in build.items()]
            + [f"milvus.search_params.{k}={v}" for k, v in search.items()])


def run(run_name: str, settings: list[str], builds: int, extra: list[str]) -> dict[str, Any]:
    over, epoch = _checkpoint(run_name, extra)
    rows = []
    with MilvusServer(tempfile.mkdtemp(prefix="ann-e2e-", dir=BENCH_DIR)) as srv:
        for name in settings:
            cmd = [python(), "-u", os.path.join(MODELS, "infer.py"), "-m", CONFIG, "-top_n", "50", "--best",
                   "--ann-builds", str(builds), "-o", *over, f"milvus.uri={srv.uri}",
                   "milvus.collection=ann_e2e", *_milvus_keys(SETTINGS[name])]
            logger.info("%s ...", name)
            proc = subprocess.run(cmd, cwd=MODELS, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                rows.append({"setting": name, "error": proc.stderr.strip().splitlines()[-1][:300]})
                logger.warning("%s failed: %s", name, rows[-1]["error"])
                continue
            print(proc.stdout, flush=True)
            kind = SETTINGS[name][0].lower()
            with open(os.path.join(BENCH_DIR, "runs", run_name, "ckpt", str(epoch),
                                   f"ann_top50_{kind}.json")) as f:
                rows.append({"setting": name, **json.load(f)})
    return {"date": dt.date.today().isoformat(), "machine": machine(), "run": run_name, "epoch": epoch,
            "extra": extra, "builds": builds, "rows": rows}


def eval_times(run_name: str, rounds: int = 3, extra: list[str] | None = None) -> dict[str, Any]:
    """``infer.py --best`` of the same checkpoint on Milvus Lite and on a Milvus server (FLAT,
    the evaluation default), in alternating turns: the evaluation's own seconds (fill + interests +
    search + scoring, as infer.py prints them) and the whole process's wall time."""
    over, epoch = _checkpoint(run_name, extra or [])
    folder = os.path.join(BENCH_DIR, "runs", run_name, "ckpt", str(epoch))
    times: dict[str, dict[str, list[float]]] = {e: {"eval_s": [], "wall_s": []} for e in ("lite", "server")}
    work = tempfile.mkdtemp(prefix="eval-time-", dir=BENCH_DIR)
    with MilvusServer(os.path.join(work, "server")) as srv:
        uris = {"lite": os.path.join(work, "lite.db"), "server": srv.uri}
        for r in range(rounds):
            for engine in (("lite", "server") if r % 2 == 0 else ("server", "lite")):
                cmd = [python(), "-u", os.path.join(MODELS, "infer.py"), "-m", CONFIG, "-top_n", "50",
                       "--best", "-o", *over, f"milvus.uri={uris[engine]}", "milvus.collection=eval_time"]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, cwd=MODELS, capture_output=True, text=True, timeout=1800)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"infer.py on {engine} failed: {proc.stderr.strip()[-500:]}")
                with open(os.path.join(folder, "metrics_top50.json")) as f:
                    times[engine]["eval_s"].append(json.load(f)["seconds"])
                times[engine]["wall_s"].append(wall)
                logger.info("%s: evaluation %.1f s, process %.1f s", engine,
                            times[engine]["eval_s"][-1], wall)
    med = {e: {k: statistics.median(v) for k, v in t.items()} for e, t in times.items()}
    return {"rounds": rounds, "times": times, "median": med,
            "server_over_lite_eval": med["server"]["eval_s"] / med["lite"]["eval_s"],
            "server_over_lite_wall": med["server"]["wall_s"] / med["lite"]["wall_s"]}


def write_eval_times(res: dict[str, Any], out_dir: str) -> None:
    m = res["median"]
    lines = [
        f"`python -m benchmarks.ann_e2e --eval-time` ({res['rounds']} turns each, alternating; medians): "
        "`infer.py --best` of the amazon-book-1m checkpoint, FLAT. The evaluation's own seconds (fill, "
        "interests, search, scoring) and the whole process (start-up and model load included). The server is "
        "`MilvusServer`'s, started with its FAST_HANDOFF settings (docs/design.md: refill waits).", "",
        "| engine | evaluation s | process s |", "|---|---|---|",
        f"| Milvus Lite | {m['lite']['eval_s']:.1f} | {m['lite']['wall_s']:.1f} |",
        f"| Milvus server 2.3.5 | {m['server']['eval_s']:.1f} | {m['server']['wall_s']:.1f} |",
        f"| server / Lite | {res['server_over_lite_eval']:.2f}x | {res['server_over_lite_wall']:.2f}x |", ""]
    figures = {"eval_milvus_server_s_amazon_book_1m": m["server"]["eval_s"],
               "eval_milvus_lite_paired_s_amazon_book_1m": m["lite"]["eval_s"],
               "eval_server_over_lite_amazon_book_1m": res["server_over_lite_eval"]}
    merge_section("## 3d. Evaluation on a Milvus server against Milvus Lite", lines, figures, out_dir)


def write_docs(res: dict[str, Any], out_dir: str) -> None:
    with open(os.path.join(out_dir, "ann_end_to_end.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    ok = [r for r in res["rows"] if "error" not in r]
    exact = ok[0]["exact"]["metrics"]["Recall@50"] if ok else float("nan")
    lines = [
        "# Approximate indexes end to end (amazon-book-1m, Milvus 2.3.5 server)",
        "",
        f"`python -m benchmarks.ann_e2e --run {res['run']}` on {res['date']} "
        f"({res['machine'].get('cpu', '')}, {res['machine'].get('cores')} cores); "
        f"checkpoint epoch {res['epoch']} (chosen on validation)"
        + (f", trained with `{' '.join(res['extra'])}`" if res["extra"] else "")
        + f"; exact test Recall@50 {exact:.4f}. Every engine searches the same interest vectors of the "
        f"3,824 test users; {res['builds']} fresh builds per setting. Search cost: the search calls alone, "
        "one client thread, 256 users (1,024 queries) per call, every test user per pass; each build is "
        "timed in 3 turns alternating with a FLAT collection on the same server (FLAT, build, build, FLAT, "
        "FLAT, build), and `cheaper than FLAT` is the mean over builds of median FLAT pass / median build "
        "pass (min..max over builds): on this shared 2-core machine a FLAT pass timed minutes apart from "
        "the build's moved by up to 30%.",
        "",
        "| setting | build params | search params | Recall@50 loss, mean (min..max) | HitRate@50 loss | "
        "interest overlap | ms/user | FLAT ms/user | cheaper than FLAT | build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | | | failed: {r['error']} | | | | | | |")
            continue
        s = r["summary"]
        lines.append(
            f"| {r['setting']} | {r['index_type']} {r['index_params']} | {r['search_params']} | "
            f"{s['ann_recall50_rel_loss'] * 100:.2f}% ({s['ann_recall50_rel_loss_min'] * 100:.2f}.."
            f"{s['ann_recall50_rel_loss_max'] * 100:.2f}%) | {s['ann_hitrate50_rel_loss'] * 100:.2f}% | "
            f"{s['ann_interest_overlap']:.3f} | {s['ann_search_ms_per_user']:.3f} | "
            f"{s.get('flat_search_ms_per_user', float('nan')):.3f} | "
            f"{s.get('ann_speedup_vs_flat', float('nan')):.2f}x"
            + (f" ({s['ann_speedup_vs_flat_min']:.2f}..{s['ann_speedup_vs_flat_max']:.2f})"
               if "ann_speedup_vs_flat_min" in s else "")
            + f" | {s['ann_build_s']:.1f} |")
    lines.append("")
    with open(os.path.join(out_dir, "ann_end_to_end.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    figures = {}
    for r in ok:
        s = r["summary"]
        figures[f"ann_recall50_rel_loss_{r['setting']}"] = s["ann_recall50_rel_loss"]
        figures[f"ann_speedup_vs_flat_{r['setting']}"] = s.get("ann_speedup_vs_flat")
    if f"ann_recall50_rel_loss_{PROFILE_SETTING}" in figures:  # configs/milvus_standalone.yaml's index
        figures["ann_recall50_rel_loss"] = figures[f"ann_recall50_rel_loss_{PROFILE_SETTING}"]
        figures["ann_speedup_vs_flat"] = figures[f"ann_speedup_vs_flat_{PROFILE_SETTING}"]
    merge_section("## 3b. Approximate indexes end to end", [
        f"`python -m benchmarks.ann_e2e --run {res['run']}`; the full table is "
        "[ann_end_to_end.md](ann_end_to_end.md), the million-item run [catalogue_1m.md](catalogue_1m.md).",
        "", *lines[4:]], figures, out_dir)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=f"{DATASET}_tuned", help="run folder under output/bench/runs")
    p.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    p.add_argument("--builds", type=int, default=3)
    p.add_argument("-o", "--opt", nargs="*", default=[], help="extra training keys for a new run")
    p.add_argument("--out", default=os.path.join(REPO, "docs"))
    p.add_argument("--eval-time", action="store_true",
                   help="only time infer.py --best on Milvus Lite against a Milvus server (section 3d)")
    a = p.parse_args()
    if a.eval_time:
        write_eval_times(eval_times(a.run, extra=a.opt), a.out)
        return
    write_docs(run(a.run, a.settings, a.builds, a.opt), a.out)
    write_eval_times(eval_times(a.run, extra=a.opt), a.out)


if __name__ == "__main__":
    main()
