"""Quality and training speed: our MIND on amazon-book-1m and movielens-1m (ComiRec protocol)
under the reference budget and under our tuned settings, beside the reference figures and a
most-popular baseline; learning curves; samples/s, epoch time and peak RSS."""

from __future__ import annotations

import json
import logging
import os
import shutil

from paddlerec_milvus.checkpoint import best_epoch
from paddlerec_milvus.config import load_config
from paddlerec_milvus.data_prep import prepare_data
from paddlerec_milvus.scoring import score_popularity

from .common import BENCH_DIR, MODELS, SHARED_DATASETS, python, run_measured

logger = logging.getLogger(__name__)
CONFIG = os.path.join(MODELS, "mind", "config_bigdata.yaml")

# Figures printed by PaddleRec's own MIND infer.py on these files (../shared/datasets/README.md):
# 5 epochs x 1000 batches x 128, Adam lr 0.001, 1280 negatives, dim 64, 2 vCPU, CPU Paddle 3.3.1.
REFERENCE = {
    "amazon_book_1m": {"samples_per_s": 1470, "recall50": 0.0550, "hitrate50": 0.1099,
                       "paddlerec_ndcg50": 0.0399, "published_recall50": 0.0081},
    "movielens_1m": {"samples_per_s": 2100, "recall50": 0.1962, "hitrate50": 0.8480,
                     "paddlerec_ndcg50": 0.3228, "published_recall50": 0.0536},
    # The three later files: the README's re-scored figures (standard definitions, every test user
    # and eval item, same checkpoint); "printed" is what PaddleRec's infer.py showed.
    "amazon_health": {"samples_per_s": 2200, "recall50": 0.0663, "hitrate50": 0.1192,
                      "ndcg50": 0.0319, "printed_recall50": 0.0667, "train_wall_s": 287},
    "amazon_electronics_1m": {"samples_per_s": 2200, "recall50": 0.0451, "hitrate50": 0.0794,
                              "ndcg50": 0.0334, "printed_recall50": 0.0449, "train_wall_s": 305},
    "yoochoose_clicks_100k": {"samples_per_s": 2700, "recall50": 0.4790, "hitrate50": 0.5932,
                              "ndcg50": 0.2611, "printed_recall50": 0.4417, "train_wall_s": 248},
}
DATASETS = {"amazon_book_1m": "amazon-book-1m.csv.gz", "movielens_1m": "movielens-1m.csv.gz",
            "amazon_health": "amazon-health.csv.gz", "amazon_electronics_1m": "amazon-electronics-1m.csv.gz",
            "yoochoose_clicks_100k": "yoochoose-clicks-100k.csv.gz"}
# The data sets the tuned recipe was chosen on (issue 7); the other three it has never been tuned on.
TUNED_ON = ("amazon_book_1m", "movielens_1m")
REFERENCE_BUDGET = ["runner.epochs=5", "runner.batches_per_epoch=1000", "runner.train_batch_size=128",
                    "hyper_parameters.optimizer.learning_rate=0.001", "hyper_parameters.neg_samples=1280"]
# Tuned within the reference's training wall time (amazon ~435 s, movielens ~305 s at its speed):
# the speed-up buys more epochs; lazy Adam on sparse rows wants a higher learning rate. The epoch is
# chosen on the validation split (scored after every epoch, early stop after 3 epochs without a
# better Recall@50); the test split is used only for the figures. Learning rates were chosen on the
# validation split too (see the closing note of issue 7).
TUNED = {
    "amazon_book_1m": ["runner.epochs=20", "runner.batches_per_epoch=1000", "runner.train_batch_size=128",
                       "hyper_parameters.optimizer.learning_rate=0.003",
                       "hyper_parameters.neg_samples=1280", "runner.early_stop_patience=3"],
    "movielens_1m": ["runner.epochs=16", "runner.batches_per_epoch=1000", "runner.train_batch_size=128",
                     "hyper_parameters.optimizer.learning_rate=0.003", "hyper_parameters.neg_samples=1280",
                     "runner.early_stop_patience=3"],
}


def tuned_recipe(name: str) -> list[str]:
    """The tuned recipe of a data set; amazon-book-1m's for the sets it was not tuned on."""
    return TUNED.get(name, TUNED["amazon_book_1m"])


def prepared(name: str) -> str:
    """The data set prepared with the ComiRec protocol (cached under output/bench/data)."""
    out = os.path.join(BENCH_DIR, "data", name)
    if not os.path.isfile(os.path.join(out, "meta.json")):
        src = os.path.join(SHARED_DATASETS, DATASETS[name])
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{src} not found (set PADDLEREC_MILVUS_DATASETS)")
        prepare_data(src, out, seed=2021, overwrite=True)
    return out


def _overrides(data: str, run_dir: str, validate: bool = False) -> list[str]:
    with open(os.path.join(data, "meta.json")) as f:
        item_count = json.load(f)["item_count"]
    return [f"runner.train_data_dir={data}/train", f"runner.test_data_dir={data}/test",
            f"runner.valid_data_dir={data + '/valid' if validate else ''}",
            f"runner.model_save_path={run_dir}/ckpt", f"runner.infer_load_path={run_dir}/ckpt",
            f"hyper_parameters.item_count={item_count}", f"milvus.uri={run_dir}/milvus.db",
            "milvus.collection=bench_items"]


def model_config(model: str) -> str:
    """The model directory's full-data config (models/<model>/config_bigdata.yaml)."""
    return os.path.join(MODELS, model, "config_bigdata.yaml")


def train_and_evaluate(name: str, label: str, budget: list[str], quick: bool, model: str = "mind") -> dict:
    """Train in a subprocess (so its peak RSS is its own), then evaluate every epoch."""
    data = prepared(name)
    config = model_config(model)
    run = f"{name}_{label}" if model == "mind" else f"{name}_{model}_{label}"
    run_dir = os.path.join(BENCH_DIR, "runs", run)
    shutil.rmtree(os.path.join(run_dir, "ckpt"), ignore_errors=True)  # no best.json of an older run
    validate = any(o.startswith("runner.early_stop_patience=") for o in budget)
    over = _overrides(data, run_dir, validate) + budget
    if quick:
        over += ["runner.epochs=2", "runner.batches_per_epoch=200"]
    cmd = [python(), "-u", os.path.join(MODELS, "trainer.py"), "-m", config, "-o", *over]
    logger.info("training %s (%s)...", name, label)
    out, wall, peak_mb = run_measured(cmd, cwd=MODELS)
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    rates = [float(line.split(",")[1].split()[0]) for line in epochs]
    secs = [float(line.split(",")[2].split()[0]) for line in epochs]
    valid = [float(line.rsplit(" ", 1)[1]) for line in epochs if ", valid " in line]
    n_epochs = len(epochs)
    final_epoch = best_epoch(os.path.join(run_dir, "ckpt")) if validate else None
    final_epoch = n_epochs - 1 if final_epoch is None else final_epoch
    logger.info("evaluating %s (%s), %d epochs, exact search...", name, label, n_epochs)
    infer = [python(), "-u", os.path.join(MODELS, "infer.py"), "-m", config, "-top_n", "50",
             "--paddlerec-metrics", "-o", *over, "runner.infer_start_epoch=0",
             f"runner.infer_end_epoch={n_epochs}"]
    run_measured(infer + ["--exact"], cwd=MODELS)
    curve = []
    for epoch in range(n_epochs):
        with open(os.path.join(run_dir, "ckpt", str(epoch), "metrics_top50_exact.json")) as f:
            res = json.load(f)
        curve.append(res["metrics"]["Recall@50"])
        if epoch == final_epoch:
            final_exact = res
    logger.info("evaluating %s (%s), epoch %d, Milvus Lite...", name, label, final_epoch)
    last = [f"runner.infer_start_epoch={final_epoch}", f"runner.infer_end_epoch={final_epoch + 1}"]
    run_measured(infer[:-2] + last, cwd=MODELS)
    with open(os.path.join(run_dir, "ckpt", str(final_epoch), "metrics_top50.json")) as f:
        final = json.load(f)
    return {
        "dataset": name, "model": model, "label": label, "budget": budget, "quick": quick,
        "train_wall_s": wall, "train_s": sum(secs), "samples_per_s": sum(r * s for r, s in zip(rates, secs))
        / max(sum(secs), 1e-9), "epoch_s": sum(secs) / max(len(secs), 1), "peak_rss_mb": peak_mb,
        "epochs_run": n_epochs, "final_epoch": final_epoch, "selected_by": "validation" if validate
        else "last epoch", "valid_curve": valid,
        "metrics": final["metrics"], "users": final["users"], "milvus_eval_s": final["seconds"],
        "exact_eval_s": final_exact["seconds"], "exact_metrics": final_exact["metrics"], "curve": curve,
    }


def popularity(name: str) -> dict[str, float]:
    data = prepared(name)
    return score_popularity(load_config(CONFIG, _overrides(data, os.path.join(BENCH_DIR, "pop"))), 50)


# The least any Paddle trainer of this model needs: Paddle imported and one sparse lookup (and its
# gradient) of a reference-sized batch (128 users x (20 history + 1 target + 1280 negatives)).
PADDLE_FLOOR = """
import numpy as np, paddle
paddle.set_device("cpu")
emb = paddle.nn.Embedding(38520, 64, sparse=True)
ids = paddle.to_tensor(np.random.default_rng(0).integers(1, 38520, (128, 1301)))
emb(ids).sum().backward()
"""


def paddle_floor_rss_mb() -> float:
    _, _, peak = run_measured([python(), "-c", PADDLE_FLOOR])
    return peak


def run(quick: bool = False, datasets: tuple[str, ...] = tuple(DATASETS)) -> dict:
    """All quality/training figures; flat keys carry their unit."""
    results, figures, notes = [], {}, []
    figures["paddle_floor_rss_mb"] = paddle_floor_rss_mb()
    for name in datasets:
        pop = popularity(name)
        ref = REFERENCE[name]
        figures[f"ref_train_samples_per_s_{name}"] = ref["samples_per_s"]
        figures[f"ref_recall50_{name}"] = ref["recall50"]
        figures[f"ref_hitrate50_{name}"] = ref["hitrate50"]
        figures[f"popular_recall50_{name}"] = pop["Recall@50"]
        figures[f"popular_hitrate50_{name}"] = pop["HitRate@50"]
        for label, budget in (("reference_budget", REFERENCE_BUDGET), ("tuned", tuned_recipe(name))):
            r = train_and_evaluate(name, label, budget, quick)
            r["popular"] = pop
            results.append(r)
            suffix = "" if label == "tuned" else "_refbudget"
            m = r["metrics"]
            figures[f"recall50_{name}{suffix}"] = m["Recall@50"]
            figures[f"hitrate50_{name}{suffix}"] = m["HitRate@50"]
            figures[f"ndcg50_{name}{suffix}"] = m["NDCG@50"]
            figures[f"paddlerec_ndcg50_{name}{suffix}"] = m["PaddleRecNDCG@50"]
            figures[f"recall20_{name}{suffix}"] = m["Recall@20"]
            figures[f"train_samples_per_s_{name}{suffix}"] = r["samples_per_s"]
            figures[f"train_wall_s_{name}{suffix}"] = r["train_wall_s"]
            figures[f"train_peak_rss_mb_{name}{suffix}"] = r["peak_rss_mb"]
            figures[f"eval_milvus_lite_s_{name}{suffix}"] = r["milvus_eval_s"]
            figures[f"eval_exact_numpy_s_{name}{suffix}"] = r["exact_eval_s"]
    if "amazon_book_1m" in datasets:
        figures["train_samples_per_s"] = figures.get("train_samples_per_s_amazon_book_1m_refbudget")
        figures["ref_train_samples_per_s"] = REFERENCE["amazon_book_1m"]["samples_per_s"]
    notes.append("Reference figures are PaddleRec's MIND as measured on the same files and machine type "
                 "(../shared/datasets/README.md); PaddleRec itself is not installed here, so they are "
                 "cited, not re-run. Its peak memory was not recorded there.")
    return {"figures": figures, "runs": results, "notes": notes}
