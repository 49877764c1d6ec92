"""User mistakes through the real command line: one ``error:`` line on stderr, exit 2, no trace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import MODELS, REPO

from paddlerec_milvus.checkpoint import load_checkpoint, save_checkpoint
from paddlerec_milvus.errors import ConfigError

CONFIG = os.path.join(MODELS, "mind", "config.yaml")


def _cli(*args: str, script: str | None = None, cwd: str = REPO) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-u", script] if script else [sys.executable, "-m", "paddlerec_milvus.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _model_copy(tmp_path, old: str | None = None, new: str | None = None) -> str:
    """models/mind without its outputs (the demo data is small), optionally with one edit."""
    dst = tmp_path / "mind"
    shutil.copytree(os.path.join(MODELS, "mind"), dst,
                    ignore=shutil.ignore_patterns("output*", "__pycache__", "data_bigdata"))
    if old is not None:
        text = (dst / "config.yaml").read_text()
        assert old in text
        (dst / "config.yaml").write_text(text.replace(old, new, 1))
    return str(dst / "config.yaml")


def _truncated_checkpoint(base) -> str:
    """``{base}/ckpt/0/rec.pdparams`` cut to its first 100 bytes, as ``head -c 100`` does."""
    import paddle

    folder = base / "ckpt" / "0"
    folder.mkdir(parents=True)
    path = str(folder / "rec.pdparams")
    paddle.save({"item_emb.weight": paddle.zeros([1941, 64])}, path)
    with open(path, "rb") as f:
        head = f.read(100)
    with open(path, "wb") as f:
        f.write(head)
    return str(base / "ckpt")


@pytest.mark.parametrize("old, new, message", [
    ("  epochs: 4", "  epochz: 4", "unknown key 'runner.epochz' (did you mean 'runner.epochs'?)"),
    ("    learning_rate: 0.005", "    learning_rte: 0.5",
     "unknown key 'hyper_parameters.optimizer.learning_rte' "
     "(did you mean 'hyper_parameters.optimizer.learning_rate'?)"),
])
def test_typo_key_in_yaml(tmp_path, old, new, message):
    cfg = _model_copy(tmp_path, old, new)
    line = _one_error_line(_cli("train", "-m", cfg))
    assert line == f"error: {cfg}: {message}"


def test_typo_key_in_yaml_through_trainer_py(tmp_path):
    cfg = _model_copy(tmp_path, "  seed: 2021", "  sead: 2021")
    line = _one_error_line(_cli("-m", cfg, script="trainer.py", cwd=MODELS))
    assert "unknown key 'runner.sead' (did you mean 'runner.seed'?)" in line and cfg in line


def test_typo_key_in_override(tmp_path):
    line = _one_error_line(_cli("train", "-m", CONFIG, "-o", "runner.epocs=1"))
    assert "did you mean 'runner.epochs'" in line


def test_model_save_path_under_a_file(tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    save = blocker / "sub"
    line = _one_error_line(_cli("train", "-m", CONFIG, "-o", f"runner.model_save_path={save}",
                                "runner.epochs=1", "runner.batches_per_epoch=1"))
    assert str(save) in line and "Not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_model_save_path_in_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _one_error_line(_cli("train", "-m", CONFIG, "-o", f"runner.model_save_path={ro}/out",
                                    "runner.epochs=1", "runner.batches_per_epoch=1"))
    finally:
        ro.chmod(0o755)
    assert f"{ro}/out" in line and "Permission denied" in line


def test_save_checkpoint_into_a_file_names_the_path(tmp_path):
    import paddle

    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"cannot write checkpoint to {blocker}/sub/0: Not a directory"):
        save_checkpoint(paddle.nn.Linear(2, 2), None, str(blocker / "sub"), 0)


def test_load_truncated_checkpoint_is_a_config_error(tmp_path):
    import paddle

    ckpt = _truncated_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint .*/0/rec.pdparams cannot be read \(.+\); "
                       "it may be truncated: re-train or pick another epoch"):
        load_checkpoint(paddle.nn.Linear(2, 2), os.path.join(ckpt, "0"))


@pytest.mark.slow
def test_truncated_checkpoint_export(tmp_path):
    ckpt = _truncated_checkpoint(tmp_path)
    line = _one_error_line(_cli("export", "-m", CONFIG, "-o", f"runner.infer_load_path={ckpt}",
                                f"milvus.uri={tmp_path}/m.db", "--output", str(tmp_path / "export")))
    assert f"{ckpt}/0/rec.pdparams cannot be read" in line and "truncated" in line
    assert not os.path.exists(tmp_path / "export")


@pytest.mark.slow
def test_truncated_checkpoint_infer_py(tmp_path):
    ckpt = _truncated_checkpoint(tmp_path)
    line = _one_error_line(_cli("-m", "mind/config.yaml", "-o", f"runner.infer_load_path={ckpt}",
                                "runner.infer_start_epoch=0", "runner.infer_end_epoch=1",
                                f"milvus.uri={tmp_path}/m.db", script="infer.py", cwd=MODELS))
    assert f"{ckpt}/0/rec.pdparams cannot be read" in line and "truncated" in line


@pytest.mark.slow
def test_truncated_checkpoint_train_resume(tmp_path):
    ckpt = _truncated_checkpoint(tmp_path)
    line = _one_error_line(_cli("train", "-m", CONFIG, "-o", f"runner.model_init_path={ckpt}/0",
                                f"runner.model_save_path={tmp_path}/out", "runner.epochs=2",
                                "runner.batches_per_epoch=1"))
    assert f"{ckpt}/0/rec.pdparams cannot be read" in line and "truncated" in line


@pytest.mark.slow
def test_truncated_real_checkpoint_export(trained_demo, tmp_path):
    """The same with the first 100 bytes of a real trained checkpoint (a copy of it)."""
    src = os.path.join(os.path.dirname(trained_demo["config_path"]), "output_model_mind", "1")
    dst = tmp_path / "ckpt" / "1"
    shutil.copytree(src, dst)
    with open(dst / "rec.pdparams", "rb") as f:
        head = f.read(100)
    (dst / "rec.pdparams").write_bytes(head)
    line = _one_error_line(_cli("export", "-m", trained_demo["config_path"], "-o",
                                *trained_demo["overrides"], f"runner.infer_load_path={tmp_path}/ckpt",
                                f"milvus.uri={tmp_path}/m.db", "--output", str(tmp_path / "export")))
    assert f"{dst}/rec.pdparams cannot be read" in line and "truncated" in line
