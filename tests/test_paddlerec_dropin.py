"""Every shipped model directory drops into PaddleRec unchanged.

PaddleRec cannot be installed here (it is not on PyPI), so ``paddlerec_emulation.py`` re-implements
its ``tools/trainer.py`` and ``models/recall/mind/infer.py`` (see that file for the semantics).
The tests build a PaddleRec-shaped tree in a temporary folder:

    <tmp>/PaddleRec/tools/trainer.py                  the emulated trainer
    <tmp>/PaddleRec/models/recall/<name>/             a copy of models/<name>/ (every model dir)
    <tmp>/PaddleRec/models/recall/<name>/infer.py     the emulated MIND infer.py

and run each tool in its own subprocess, as a PaddleRec user would (``python tools/trainer.py
-m models/recall/<name>/config.yaml -o ...``, then ``python models/recall/<name>/infer.py -m ...
-top_n 50``), from a working directory of its own (PaddleRec saves checkpoints relative to it).
A subprocess per run keeps ``sys.path``/``sys.modules`` clean: every model dir has modules named
``net``, ``dygraph_model``, ``mind_reader``... PaddleRec's MIND infer.py imports ``dygraph_model``
from its own folder (``sys.path[0]``), so each model dir gets its own copy of it, as PaddleRec's
recall models each ship theirs.

Model dirs are found by glob (``models/*/dygraph_model.py``): a new one is covered automatically.
"""

import collections
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from paddlerec_emulation import load_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
EMULATION = os.path.join(REPO, "tests", "paddlerec_emulation.py")
MODEL_DIRS = sorted(os.path.basename(os.path.dirname(p))
                    for p in glob.glob(os.path.join(MODELS, "*", "dygraph_model.py")))
SHIPPED_YAMLS = sorted(glob.glob(os.path.join(MODELS, "*", "config*.yaml")))
IGNORE = shutil.ignore_patterns("output*", "__pycache__", "data_bigdata")
TOP_N = 50
# One epoch of a few batches, given the PaddleRec way (one -o, int values cast from the YAML's):
# enough for each model to beat most-popular on the demo data. ComiRec-DR learns slowest (one
# epoch of 500 batches only ties most-popular: 0.1065 vs 0.1061).
TRAIN_BATCHES = 60
TRAIN_BATCHES_OF = {"comirec_dr": 600}


def train_opts(name):
    return ["runner.epochs=1", f"runner.batches_per_epoch={TRAIN_BATCHES_OF.get(name, TRAIN_BATCHES)}"]


# The keys PaddleRec reads with no default (or a default that breaks: use_gpu -> GPU).
REQUIRED = ("runner.epochs", "runner.print_interval", "runner.train_batch_size",
            "runner.infer_batch_size", "runner.train_data_dir", "runner.test_data_dir",
            "runner.use_gpu")
INT_KEYS = ("runner.epochs", "runner.train_batch_size", "runner.infer_batch_size",
            "runner.batches_per_epoch", "runner.print_interval", "runner.infer_start_epoch",
            "runner.infer_end_epoch", "hyper_parameters.item_count")


# ---- the PaddleRec tree and its tools ----------------------------------------------------------

@pytest.fixture(scope="module")
def paddlerec(tmp_path_factory):
    """``<tmp>/PaddleRec`` with the emulated tools and a copy of every model dir; yields its root."""
    root = tmp_path_factory.mktemp("paddlerec") / "PaddleRec"
    os.makedirs(root / "tools")
    shutil.copyfile(EMULATION, root / "tools" / "trainer.py")
    for name in MODEL_DIRS:
        dst = root / "models" / "recall" / name
        shutil.copytree(os.path.join(MODELS, name), dst, ignore=IGNORE)
        shutil.copyfile(EMULATION, dst / "infer.py")
    return str(root)


def _model_dir(root, name):
    return os.path.join(root, "models", "recall", name)


def _run(script, args, cwd, report):
    """One PaddleRec tool in a subprocess; (returncode, output, report dict or None)."""
    env = dict(os.environ, PADDLEREC_EMULATION_REPORT=str(report))
    proc = subprocess.run([sys.executable, "-u", script, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    data = None
    if proc.returncode == 0 and os.path.isfile(report):
        with open(report) as f:
            data = json.load(f)
        assert not data["paddlerec_milvus_modules"], \
            f"{script}: the model dir imported {data['paddlerec_milvus_modules']}"
    return proc.returncode, proc.stdout + proc.stderr, data


def paddlerec_train(root, config, opts, cwd):
    """``python tools/trainer.py -m config -o opts`` from ``cwd``; the trainer's report."""
    os.makedirs(cwd, exist_ok=True)
    report = os.path.join(cwd, "train_report.json")
    rc, out, data = _run(os.path.join(root, "tools", "trainer.py"),
                         ["-m", config, "-o", *opts], cwd, report)
    assert rc == 0, f"PaddleRec's trainer failed on {config}:\n{out[-4000:]}"
    return data


def paddlerec_infer(model_dir, config, cwd, top_n=TOP_N):
    """``python <model_dir>/infer.py -m config -top_n N`` from ``cwd``; (rc, output, report)."""
    os.makedirs(cwd, exist_ok=True)
    report = os.path.join(cwd, "infer_report.json")
    return _run(os.path.join(model_dir, "infer.py"), ["-m", config, "-top_n", str(top_n)], cwd,
                report)


def infer_config(config, tag, **runner):
    """A copy of ``config`` beside it with ``runner`` keys replaced (MIND's infer.py ignores -o,
    so a PaddleRec user edits the YAML); returns its path."""
    with open(config) as f:
        data = yaml.safe_load(f)
    data["runner"].update(runner)
    path = os.path.join(os.path.dirname(config), f"config_dropin_{tag}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


# ---- data facts, read the way PaddleRec's loader finds the files -------------------------------

def _data_files(config, key):
    flat = load_yaml(config)
    folder = os.path.join(os.path.dirname(os.path.abspath(config)), flat[key])
    return [os.path.join(folder, x) for x in os.listdir(folder)]


def _test_users(files):
    """Test users = the non-empty lines of the slot files (one user a line)."""
    n = 0
    for path in files:
        with open(path) as f:
            n += sum(1 for line in f if line.strip())
    return n


def most_popular_recall(train_files, scored_targets, top_n=TOP_N):
    """Recall@top_n of the top_n most clicked training items (``uid,item_id,time``), same users."""
    counts = collections.Counter()
    for path in train_files:
        with open(path) as f:
            counts.update(int(line.split(",")[1]) for line in f if line.strip())
    top = {i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]}
    return sum(len(top & set(t)) / len(t) for t in scored_targets) / len(scored_targets)


# ---- checkpoints made by PaddleRec's trainer, once per model dir --------------------------------

@pytest.fixture(scope="module")
def emulated_checkpoints(paddlerec, tmp_path_factory):
    """name -> the trainer's report, training each model dir at most once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            config = os.path.join(_model_dir(paddlerec, name), "config.yaml")
            assert os.path.isfile(config), f"models/{name}/ has a dygraph_model.py but no config.yaml"
            cwd = str(tmp_path_factory.mktemp(f"run_{name}"))
            cache[name] = paddlerec_train(paddlerec, config, train_opts(name), cwd)
            cache[name]["cwd"] = cwd
        return cache[name]

    return get


# ---- 1. every model dir: PaddleRec's trainer, then PaddleRec's MIND infer.py -------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_DIRS)
def test_model_dir_trains_and_evaluates_in_paddlerec(name, paddlerec, emulated_checkpoints,
                                                      tmp_path):
    model_dir = _model_dir(paddlerec, name)
    config = os.path.join(model_dir, "config.yaml")
    trained = emulated_checkpoints(name)
    batches = TRAIN_BATCHES_OF.get(name, TRAIN_BATCHES)

    # -o was applied with PaddleRec's casting (int in the YAML -> int), and training ran.
    assert trained["config"]["runner.epochs"] == 1
    assert trained["config"]["runner.batches_per_epoch"] == batches
    assert [e["epoch"] for e in trained["epochs"]] == [0]
    assert trained["epochs"][0]["batches"] == batches
    assert all(v == v and abs(v) < 1e6 for v in trained["epochs"][0]["logged_losses"])
    assert trained["model_modules"]["dygraph_model"] == os.path.join(model_dir, "dygraph_model.py")
    # Checkpoints land under the working directory (PaddleRec's model_save_path semantics).
    ckpt = trained["epochs"][0]["checkpoint"]
    save_path = load_yaml(config)["runner.model_save_path"]
    assert ckpt == os.path.join(trained["cwd"], save_path, "0")
    assert os.path.isfile(os.path.join(ckpt, "rec.pdparams"))
    assert os.path.isfile(os.path.join(ckpt, "rec.pdopt"))

    cfg = infer_config(config, "infer", infer_load_path=os.path.dirname(ckpt),
                       infer_start_epoch=0, infer_end_epoch=1)
    rc, out, report = paddlerec_infer(model_dir, cfg, str(tmp_path / "infer"))
    assert rc == 0, f"PaddleRec's infer.py failed on models/{name}:\n{out[-4000:]}"
    assert report["model_modules"]["dygraph_model"] == os.path.join(model_dir, "dygraph_model.py")
    (epoch,) = report["epochs"]
    n_users = _test_users(_data_files(config, "runner.test_data_dir"))
    assert epoch["users"] == n_users, (
        f"models/{name}: PaddleRec scored {epoch['users']} of {n_users} test users "
        f"(infer_batch_size {load_yaml(config)['runner.infer_batch_size']}, drop_last=True)")
    assert epoch["total"] == n_users + 1  # PaddleRec's counter starts at 1
    assert abs(epoch["recall"] - epoch["recall_exact"] * n_users / (n_users + 1)) < 1e-9

    popular = most_popular_recall(_data_files(config, "runner.train_data_dir"),
                                  epoch["scored_targets"])
    print(f"\nmodels/{name}: PaddleRec trainer 1 epoch x {batches} batches "
          f"({trained['epochs'][0]['seconds']:.1f} s); infer.py Recall@{TOP_N} "
          f"{epoch['recall_exact']:.4f} over {epoch['users']} users (printed {epoch['recall']:.5f}), "
          f"NDCG {epoch['ndcg_exact']:.4f}, HitRate {epoch['hitrate_exact']:.4f}; "
          f"most-popular Recall@{TOP_N} {popular:.4f}")
    assert epoch["recall_exact"] > popular, (
        f"models/{name}: Recall@{TOP_N} {epoch['recall_exact']:.4f} after {batches} "
        f"batches does not beat most-popular {popular:.4f}")


# ---- 2. our trainer's checkpoints load in PaddleRec's infer.py ---------------------------------

@pytest.mark.slow
def test_our_trainer_checkpoint_loads_in_paddlerec_infer(paddlerec, tmp_path):
    model_dir = _model_dir(paddlerec, "mind")
    save_path = str(tmp_path / "ours")
    proc = subprocess.run(
        [sys.executable, "-u", os.path.join(MODELS, "trainer.py"), "-m",
         os.path.join(model_dir, "config.yaml"), "-o", "runner.epochs=1",
         f"runner.batches_per_epoch={TRAIN_BATCHES}", f"runner.model_save_path={save_path}",
         "runner.valid_data_dir="],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert os.path.isfile(os.path.join(save_path, "0", "rec.pdparams"))

    config = os.path.join(model_dir, "config.yaml")
    cfg = infer_config(config, "ours", infer_load_path=save_path, infer_start_epoch=0,
                       infer_end_epoch=1)
    rc, out, report = paddlerec_infer(model_dir, cfg, str(tmp_path / "infer"))
    assert rc == 0, out[-4000:]
    (epoch,) = report["epochs"]
    n_users = _test_users(_data_files(config, "runner.test_data_dir"))
    assert epoch["users"] == n_users
    popular = most_popular_recall(_data_files(config, "runner.train_data_dir"),
                                  epoch["scored_targets"])
    print(f"\nmodels/trainer.py 1 epoch x {TRAIN_BATCHES} batches -> PaddleRec infer.py "
          f"Recall@{TOP_N} {epoch['recall_exact']:.4f} (most-popular {popular:.4f})")
    assert epoch["recall_exact"] > popular


# ---- 3. static checks of every shipped YAML ----------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED_YAMLS, ids=lambda p: os.path.relpath(p, MODELS))
def test_shipped_yaml_reads_right_under_paddlerec(path):
    flat = load_yaml(path)
    rel = os.path.relpath(path, REPO)
    # PaddleRec loads a checkpoint whenever the key is present, even "".
    assert "runner.model_init_path" not in flat, f"{rel}: runner.model_init_path is set"
    for key in REQUIRED:
        assert key in flat, f"{rel}: PaddleRec needs {key}"
    assert type(flat["runner.use_gpu"]) is bool, f"{rel}: runner.use_gpu must be a YAML bool"
    for key in INT_KEYS:
        if key in flat:
            # -o casts to int only when the YAML value's type is exactly int.
            assert type(flat[key]) is int, f"{rel}: {key} is {flat[key]!r}, not an int"
    # The readers are modules of the model dir itself.
    model_dir = os.path.dirname(path)
    for key in ("runner.train_reader_path", "runner.infer_reader_path"):
        module = flat.get(key, "reader")
        assert os.path.isfile(os.path.join(model_dir, f"{module}.py")), \
            f"{rel}: {key} names {module!r}, not a module of {os.path.basename(model_dir)}/"
    # DataLoader(drop_last=True): a partial last batch of test users is never scored.
    test_dir = os.path.join(model_dir, flat["runner.test_data_dir"])
    if os.path.isdir(test_dir):
        users = _test_users([os.path.join(test_dir, x) for x in os.listdir(test_dir)])
        batch = flat["runner.infer_batch_size"]
        assert batch <= users, f"{rel}: infer_batch_size {batch} > {users} test users: none scored"
        if os.path.basename(path) == "config.yaml":
            assert users % batch == 0, \
                f"{rel}: infer_batch_size {batch} leaves {users % batch} of {users} users unscored"


@pytest.mark.parametrize("name", MODEL_DIRS)
def test_model_dir_has_no_module_shadowing_paddlerec(name):
    """PaddleRec's tools import their ``utils`` package; a model dir module of that name would
    shadow it (MIND's infer.py puts its own folder first on sys.path)."""
    model_dir = os.path.join(MODELS, name)
    assert not os.path.exists(os.path.join(model_dir, "utils.py"))
    assert not os.path.exists(os.path.join(model_dir, "utils"))


@pytest.mark.slow
def test_mind_infer_in_place_evaluates_mind_for_any_config(paddlerec, emulated_checkpoints, tmp_path):
    """Why every model dir gets its own infer.py: PaddleRec's MIND infer.py imports
    ``dygraph_model`` and the readers from its own folder, whatever ``-m`` names (it appends the
    config dict, not the config's folder, to sys.path). Run in place on another model dir it
    builds MIND and loads only the matching parameters of that checkpoint."""
    others = [n for n in MODEL_DIRS if n != "mind"]
    if not others:
        pytest.skip("no model dir besides mind")
    name = min(others, key=lambda n: TRAIN_BATCHES_OF.get(n, TRAIN_BATCHES))
    config = os.path.join(_model_dir(paddlerec, name), "config.yaml")
    ckpt = emulated_checkpoints(name)["epochs"][0]["checkpoint"]
    cfg = infer_config(config, "in_place", infer_load_path=os.path.dirname(ckpt),
                       infer_start_epoch=0, infer_end_epoch=1)
    rc, out, report = paddlerec_infer(_model_dir(paddlerec, "mind"), cfg, str(tmp_path))
    assert rc == 0, out[-4000:]
    assert report["model_modules"]["dygraph_model"] == os.path.join(
        _model_dir(paddlerec, "mind"), "dygraph_model.py")


# ---- 4. negative controls: the emulation catches what PaddleRec trips on -----------------------

@pytest.mark.slow
def test_empty_model_init_path_fails_like_paddlerec(paddlerec, tmp_path):
    config = os.path.join(_model_dir(paddlerec, "mind"), "config.yaml")
    with open(config) as f:
        data = yaml.safe_load(f)
    data["runner"]["model_init_path"] = ""
    bad = os.path.join(os.path.dirname(config), "config_dropin_init_empty.yaml")
    with open(bad, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    cwd = str(tmp_path)
    rc, out, _ = _run(os.path.join(paddlerec, "tools", "trainer.py"),
                      ["-m", bad, "-o", *train_opts("mind")], cwd, os.path.join(cwd, "report.json"))
    assert rc != 0
    assert "(rec.pdparams) to load model not exists" in out, out[-2000:]
    assert not os.path.exists(os.path.join(cwd, "output_model_mind"))


@pytest.mark.slow
def test_infer_batch_above_test_users_scores_nobody(paddlerec, emulated_checkpoints, tmp_path):
    """The reported bug: infer_batch_size 256 on the 250 demo test users prints Recall 0.00000."""
    model_dir = _model_dir(paddlerec, "mind")
    config = os.path.join(model_dir, "config.yaml")
    assert _test_users(_data_files(config, "runner.test_data_dir")) < 256
    ckpt = emulated_checkpoints("mind")["epochs"][0]["checkpoint"]
    cfg = infer_config(config, "batch256", infer_batch_size=256,
                       infer_load_path=os.path.dirname(ckpt), infer_start_epoch=0,
                       infer_end_epoch=1)
    rc, out, report = paddlerec_infer(model_dir, cfg, str(tmp_path))
    assert rc == 0, out[-4000:]
    (epoch,) = report["epochs"]
    assert epoch["users"] == 0 and epoch["total"] == 1
    assert f"recall@{TOP_N}: 0.00000" in out
