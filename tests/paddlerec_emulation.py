"""PaddleRec's own entry points, re-implemented from their semantics for the drop-in tests.

PaddleRec is not on PyPI, so ``tests/test_paddlerec_dropin.py`` cannot run the real
``tools/trainer.py`` and ``models/recall/mind/infer.py``. This file does what they do, step by
step and in the same order, with nothing added that changes the outcome (no validation, no
defaults of ours, no sorting of file lists):

* config: ``load_yaml`` flattens the YAML into dotted keys and keeps only the keys that start
  with ``workspace``, ``runner`` or ``hyper_parameters`` (a ``milvus:`` section is dropped);
  ``config["config_abs_dir"]`` is the config file's folder;
* ``-o``: one flag, then ``key=value`` items; a value is cast to int or bool when the key's current
  value is one, else stored as a string (the trainer applies them; MIND's infer.py parses ``-o``
  and ignores it);
* model: the trainer appends the config's folder to ``sys.path``; MIND's infer.py appends the
  *config dict* (PaddleRec calls ``load_dy_model_class(config)``), so its ``dygraph_model`` and
  readers come from the script's own folder (``sys.path[0]``);
* data: every entry of the data folder, in ``os.listdir`` order, read by ``RecDataset(file_list,
  config=config)`` of the module named by ``runner.{train,infer}_reader_path``, batched by
  ``paddle.io.DataLoader(..., drop_last=True)``;
* checkpoints: ``{model_save_path}/{epoch}/rec.pdparams`` and ``rec.pdopt``, ``model_save_path``
  relative to the working directory; ``model_init_path`` is loaded whenever the key is present;
* infer: an exact inner-product search over every row of ``dy_model.item_emb.weight`` (faiss
  ``IndexFlatIP`` in PaddleRec; numpy here), each interest searched for ``top_n``, the
  ``ni * top_n`` (id, score) pairs sorted by score, de-duplicated, id 0 skipped, cut at
  ``top_n``; Recall = hits / targets, NDCG = DCG / IDCG over the hits, HitRate; the user count
  ``total`` starts at 1, so PaddleRec's printed means divide by users + 1.

Which tool runs is decided by this file's name, as it is copied into a PaddleRec-shaped tree:
``<root>/tools/trainer.py`` is the trainer, ``<root>/models/recall/<name>/infer.py`` MIND's
infer.py. Both log what PaddleRec logs; with ``PADDLEREC_EMULATION_REPORT=<path>`` set they also
write a JSON report (the exact figures the tests check) there. Nothing here imports
``paddlerec_milvus``: PaddleRec does not have it.
"""

import argparse
import importlib
import json
import logging
import math
import os
import sys
import time

import numpy as np
import yaml

logger = logging.getLogger(__name__)

REPORT_ENV = "PADDLEREC_EMULATION_REPORT"
SECTIONS = ["workspace", "runner", "hyper_parameters"]


# ---- tools/utils/utils_single.py and save_load.py ----------------------------------------------

def get_abs_model(model):
    if not os.path.isfile(model):
        raise OSError(f"model config: {model} invalid")
    return model


def _read_yaml(path):
    with open(path) as f:
        return yaml.load(f.read(), Loader=yaml.FullLoader)


def load_yaml(yaml_file):
    """Flattened dotted keys of the sections PaddleRec reads (prefix match, as PaddleRec does)."""
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(prefix + [k], v)
            elif k in ("dataset", "phase", "runner") and isinstance(v, list):
                for item in v:
                    if item.get("name") is None:
                        raise ValueError("name must be in dataset list. ", v)
                    walk(prefix + [k, item["name"]], item)
            else:
                flat[".".join(prefix + [k])] = v

    walk([], _read_yaml(yaml_file))
    return {k: v for k, v in flat.items() if any(k.startswith(s) for s in SECTIONS)}


def apply_opts(config, opts):
    """tools/trainer.py's ``-o`` handling (a value holding "=" fails the unpacking, as there)."""
    for parameter in opts or []:
        key, value = parameter.strip().split("=")
        if type(config.get(key)) is int:
            value = int(value)
        if type(config.get(key)) is bool:
            value = value.lower() == "true"
        config[key] = value


def load_dy_model_class(path_entry):
    sys.path.append(path_entry)
    from dygraph_model import DygraphModel

    return DygraphModel()


def create_data_loader(config, place, mode="train"):
    from paddle.io import DataLoader

    if mode == "train":
        data_dir = config.get("runner.train_data_dir", None)
        batch_size = config.get("runner.train_batch_size", None)
        reader_path = config.get("runner.train_reader_path", "reader")
    else:
        data_dir = config.get("runner.test_data_dir", None)
        batch_size = config.get("runner.infer_batch_size", None)
        reader_path = config.get("runner.infer_reader_path", "reader")
    data_dir = os.path.join(config.get("config_abs_dir", None), data_dir)
    file_list = [os.path.join(data_dir, x) for x in os.listdir(data_dir)]
    logger.info(f"reader path:{reader_path}")
    reader_class = importlib.import_module(reader_path)
    dataset = reader_class.RecDataset(file_list, config=config)
    return DataLoader(dataset, batch_size=batch_size, places=place, drop_last=True)


def save_model(net, optimizer, model_path, epoch_id, prefix="rec"):
    import paddle

    model_path = os.path.join(model_path, str(epoch_id))
    if not os.path.exists(model_path):
        os.makedirs(model_path)
    model_prefix = os.path.join(model_path, prefix)
    paddle.save(net.state_dict(), model_prefix + ".pdparams")
    paddle.save(optimizer.state_dict(), model_prefix + ".pdopt")
    logger.info(f"Already save model in {model_path}")


def load_model(model_path, net, prefix="rec"):
    import paddle

    logger.info(f"start load model from {model_path}")
    param_state_dict = paddle.load(os.path.join(model_path, prefix) + ".pdparams")
    net.set_dict(param_state_dict)


def _write_report(report, folders):
    """Write the JSON report, with the modules imported from ``folders`` (the model directory
    and the script's folder) and any of ``paddlerec_milvus`` (PaddleRec does not have it)."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    folders = [os.path.abspath(f) + os.sep for f in folders]
    report["model_modules"] = {
        name: os.path.abspath(mod.__file__) for name, mod in list(sys.modules.items())
        if isinstance(getattr(mod, "__file__", None), str)
        and any(os.path.abspath(mod.__file__).startswith(f) for f in folders)
    }
    report["paddlerec_milvus_modules"] = sorted(
        name for name in sys.modules if name.split(".")[0] == "paddlerec_milvus")
    with open(path, "w") as f:
        json.dump(report, f)


# ---- tools/trainer.py ---------------------------------------------------------------------------

def trainer_main(argv=None):
    import paddle

    parser = argparse.ArgumentParser(description="paddle-rec run")
    parser.add_argument("-m", "--config_yaml", type=str)
    parser.add_argument("-o", "--opt", nargs="*", type=str)
    args = parser.parse_args(argv)
    args.abs_dir = os.path.dirname(os.path.abspath(args.config_yaml))
    args.config_yaml = get_abs_model(args.config_yaml)

    paddle.seed(12345)
    config = load_yaml(args.config_yaml)
    dy_model_class = load_dy_model_class(args.abs_dir)
    config["config_abs_dir"] = args.abs_dir
    if args.opt:
        apply_opts(config, args.opt)

    use_gpu = config.get("runner.use_gpu", True)
    use_xpu = config.get("runner.use_xpu", False)
    use_visual = config.get("runner.use_visual", False)
    epochs = config.get("runner.epochs", None)
    print_interval = config.get("runner.print_interval", None)
    model_save_path = config.get("runner.model_save_path", "model_output")
    model_init_path = config.get("runner.model_init_path", None)
    use_fleet = config.get("runner.use_fleet", False)
    logger.info(f"use_gpu: {use_gpu}, epochs: {epochs}, print_interval: {print_interval}, "
                f"model_save_path: {model_save_path}")

    if use_xpu:
        place = paddle.set_device(f"xpu:{os.getenv('FLAGS_selected_xpus', 0)}")
    else:
        place = paddle.set_device("gpu" if use_gpu else "cpu")

    dy_model = dy_model_class.create_model(config)
    if use_visual:
        from visualdl import LogWriter

        log_visual = LogWriter(args.abs_dir + "/visualDL_log/train")
    if model_init_path is not None:
        load_model(model_init_path, dy_model)
    optimizer = dy_model_class.create_optimizer(dy_model, config)
    if use_fleet:
        from paddle.distributed import fleet

        fleet.init(is_collective=True, strategy=fleet.DistributedStrategy())
        optimizer = fleet.distributed_optimizer(optimizer)
        dy_model = fleet.distributed_model(dy_model)

    logger.info("read data")
    train_dataloader = create_data_loader(config=config, place=place)
    report = {"epochs": [], "config": {k: v for k, v in config.items()
                                       if isinstance(v, (int, float, str, bool))}}
    step_num = 0
    for epoch_id in range(config.get("last_epoch", -1) + 1, epochs):
        dy_model.train()
        metric_list, metric_list_name = dy_model_class.create_metrics()
        epoch_begin = time.time()
        batches, samples, losses = 0, 0, []
        for batch_id, batch in enumerate(train_dataloader()):
            optimizer.clear_grad()
            batch_size = len(batch[0])
            loss, metric_list, tensor_print_dict = dy_model_class.train_forward(
                dy_model, metric_list, batch, config)
            loss.backward()
            optimizer.step()
            batches += 1
            samples += batch_size
            if batch_id % print_interval == 0:
                metric_str = "".join(
                    f"{metric_list_name[i]}:{metric_list[i].accumulate():.6f}, "
                    for i in range(len(metric_list_name)))
                tensor_print_str = ""
                if tensor_print_dict is not None:
                    for var_name, var in tensor_print_dict.items():
                        tensor_print_str += f"{var_name}:{var.numpy()},"
                        if use_visual:
                            log_visual.add_scalar(tag="train/" + var_name, step=step_num,
                                                  value=var.numpy())
                logger.info(f"epoch: {epoch_id}, batch_id: {batch_id}, {metric_str}{tensor_print_str}")
                losses.append(float(loss.numpy()))
            step_num += 1
        # PaddleRec reads the last batch's print dict here (an epoch without batches fails).
        tensor_print_str = ""
        if tensor_print_dict is not None:
            for var_name, var in tensor_print_dict.items():
                tensor_print_str += f"{var_name}:{var.numpy()},"
        logger.info(f"epoch: {epoch_id} done, {tensor_print_str} "
                    f"epoch time: {time.time() - epoch_begin:.2f} s")
        if not use_fleet or paddle.distributed.get_rank() == 0:
            save_model(dy_model, optimizer, model_save_path, epoch_id, prefix="rec")
        report["epochs"].append({
            "epoch": epoch_id, "batches": batches, "samples": samples,
            "logged_losses": losses, "seconds": time.time() - epoch_begin,
            "checkpoint": os.path.abspath(os.path.join(model_save_path, str(epoch_id))),
        })
    _write_report(report, [args.abs_dir])


# ---- models/recall/mind/infer.py ---------------------------------------------------------------

class ExactIP:
    """faiss.IndexFlatIP over every row of ``b``: top_n by inner product, best first; like faiss,
    id -1 and the lowest float where fewer than top_n rows exist."""

    def __init__(self, b):
        self.b = np.ascontiguousarray(b, dtype=np.float32)

    def search(self, q, k):
        scores = np.asarray(q, dtype=np.float32) @ self.b.T
        n = scores.shape[1]
        kk = min(k, n)
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n else \
            np.tile(np.arange(n), (scores.shape[0], 1))
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
        dist = np.take_along_axis(part_scores, order, axis=1)
        if kk < k:
            pad = k - kk
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=-np.finfo(np.float32).max)
        return dist, ids


def infer_main(argv=None):
    import paddle

    parser = argparse.ArgumentParser("PaddleRec train static script")
    parser.add_argument("-m", "--config_yaml", type=str)
    parser.add_argument("-top_n", "--top_n", type=int, default=20)
    parser.add_argument("-o", "--opt", nargs="*", type=str)  # parsed, never applied
    args = parser.parse_args(argv)
    args.abs_dir = os.path.dirname(os.path.abspath(args.config_yaml))
    args.config_yaml = get_abs_model(args.config_yaml)

    paddle.seed(12345)
    config = load_yaml(args.config_yaml)
    config["config_abs_dir"] = args.abs_dir
    # PaddleRec passes the config dict here: the import below resolves through sys.path[0],
    # the folder of this script.
    dy_model_class = load_dy_model_class(config)

    use_gpu = config.get("runner.use_gpu", True)
    print_interval = config.get("runner.print_interval", None)
    model_load_path = config.get("runner.infer_load_path", "model_output")
    start_epoch = config.get("runner.infer_start_epoch", 0)
    end_epoch = config.get("runner.infer_end_epoch", 10)
    batch_size = config.get("runner.infer_batch_size", None)
    os.environ["CPU_NUM"] = str(config.get("runner.thread_num", 1))
    logger.info(f"use_gpu: {use_gpu}, start_epoch: {start_epoch}, end_epoch: {end_epoch}, "
                f"model_load_path: {model_load_path}")

    place = paddle.set_device("gpu" if use_gpu else "cpu")
    dy_model = dy_model_class.create_model(config)
    test_dataloader = create_data_loader(config=config, place=place, mode="test")
    top_n = args.top_n
    report = {"top_n": top_n, "dygraph_model_file": os.path.abspath(
        sys.modules["dygraph_model"].__file__), "epochs": []}
    epoch_begin = interval_begin = time.time()
    for epoch_id in range(start_epoch, end_epoch):
        logger.info(f"load model epoch {epoch_id}")
        load_model(os.path.join(model_load_path, str(epoch_id)), dy_model)
        b = dy_model.item_emb.weight.numpy()
        faiss_index = ExactIP(b)

        total = 1
        total_recall = 0.0
        total_ndcg = 0.0
        total_hitrate = 0
        scored_targets = []  # the nonzero targets of every user the loop scored, in order
        for batch_id, batch_data in enumerate(test_dataloader()):
            user_embs, _ = dy_model_class.infer_forward(dy_model, None, batch_data, config)
            user_embs = user_embs.numpy()
            target_items = np.squeeze(batch_data[-1].numpy(), axis=1)
            if len(user_embs.shape) == 2:
                dist, ids = faiss_index.search(user_embs, top_n)
                ranked = [list(ids[i]) for i in range(len(target_items))]
                stop_at_zero = False  # the 2-D branch counts positions past an id 0
            else:
                ni = user_embs.shape[1]
                dist, ids = faiss_index.search(np.reshape(user_embs, [-1, user_embs.shape[-1]]), top_n)
                ranked = []
                for i in range(len(target_items)):
                    pairs = list(zip(np.reshape(ids[i * ni:(i + 1) * ni], -1),
                                     np.reshape(dist[i * ni:(i + 1) * ni], -1)))
                    pairs.sort(key=lambda x: x[1], reverse=True)
                    seen, kept = set(), []
                    for iid, _score in pairs:
                        if iid not in seen and iid != 0:
                            seen.add(iid)
                            kept.append(iid)
                            if len(seen) >= top_n:
                                break
                    ranked.append(kept)
                stop_at_zero = True
            for i, iid_list in enumerate(target_items):
                recall = 0
                dcg = 0.0
                iid_list = [x for x in list(iid_list) if x != 0]
                true_item_set = set(iid_list)
                for no, iid in enumerate(ranked[i]):
                    if stop_at_zero and iid == 0:
                        break
                    if iid in true_item_set:
                        recall += 1
                        dcg += 1.0 / math.log(no + 2, 2)
                idcg = sum(1.0 / math.log(no + 2, 2) for no in range(recall))
                total_recall += recall * 1.0 / len(iid_list)
                if recall > 0:
                    total_ndcg += dcg / idcg
                    total_hitrate += 1
                scored_targets.append([int(x) for x in iid_list])
            total += target_items.shape[0]
            if batch_id % print_interval == 0:
                logger.info(
                    f"epoch: {epoch_id}, batch_id: {batch_id}, recall@{top_n}: "
                    f"{total_recall / total:.5f}, ndcg@{top_n}: {total_ndcg / total:.5f}, "
                    f"hitrate@{top_n}: {total_hitrate * 1.0 / total:.5f}, speed: "
                    f"{print_interval * batch_size / (time.time() - interval_begin):.2f} ins/s")
        recall, ndcg, hitrate = total_recall / total, total_ndcg / total, total_hitrate / total
        logger.info(f"epoch: {epoch_id} done, recall@{top_n}: {recall:.5f}, ndcg@{top_n}: "
                    f"{ndcg:.5f}, hitrate@{top_n}: {hitrate:.5f}, "
                    f"epoch time: {time.time() - epoch_begin:.2f} s")
        users = len(scored_targets)
        report["epochs"].append({
            "epoch": epoch_id, "total": total, "users": users,
            "recall": recall, "ndcg": ndcg, "hitrate": hitrate,  # as PaddleRec prints them
            "recall_exact": total_recall / users if users else 0.0,
            "ndcg_exact": total_ndcg / users if users else 0.0,
            "hitrate_exact": total_hitrate / users if users else 0.0,
            "scored_targets": scored_targets,
        })
    _write_report(report, [args.abs_dir, os.path.dirname(os.path.abspath(__file__))])


def main():
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO)
    here = os.path.abspath(__file__)
    if os.path.basename(here) == "trainer.py" and os.path.basename(os.path.dirname(here)) == "tools":
        return trainer_main()
    if os.path.basename(here) == "infer.py":
        return infer_main()
    raise SystemExit(f"{here}: copy me to <root>/tools/trainer.py or <model dir>/infer.py")


if __name__ == "__main__":
    main()
