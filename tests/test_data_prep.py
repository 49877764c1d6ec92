"""prepare-data on a real sample (MovieLens-1M users copied from ../shared)."""

import filecmp
import gzip
import json
import os
import subprocess
import sys

import pytest
from conftest import MODELS

from paddlerec_milvus.data_prep import prepare_data
from paddlerec_milvus.errors import DataError


def _slot_users(path):
    users = {}
    with open(path) as f:
        for line in f:
            toks = dict()
            hist, evals = [], []
            for t in line.split():
                k, v = t.split(":")
                if k == "hist_item":
                    hist.append(int(v))
                elif k == "eval_item":
                    evals.append(int(v))
                else:
                    toks[k] = int(v)
            users[toks["user_id"]] = (hist, evals)
    return users


@pytest.fixture(scope="module")
def prepared(ml_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "ml"
    stats = prepare_data(ml_sample, str(out), seed=7)
    return out, stats


def test_counts_and_meta(prepared, ml_sample):
    out, stats = prepared
    with open(ml_sample) as f:
        lines = sum(1 for _ in f) - 1
    assert stats.lines_read == lines + 1  # header counted as a line read
    assert stats.users == stats.train_users + stats.valid_users + stats.test_users
    assert stats.train_users == round(stats.users * 0.8)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["item_count"] == stats.items + 1
    with open(out / "item_map.tsv") as f:
        rows = f.read().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(1, stats.items + 1))
    clicks = [int(r.split("\t")[2]) for r in rows]
    assert clicks == sorted(clicks, reverse=True)  # dense ids ranked by popularity


def test_no_user_in_two_splits(prepared):
    out, stats = prepared
    with open(out / "train" / "part-0.txt") as f:
        train_users = {int(line.split(",")[0]) for line in f}
    valid = set(_slot_users(out / "valid" / "part-0.txt"))
    test = set(_slot_users(out / "test" / "part-0.txt"))
    assert len(train_users) == stats.train_users
    assert len(valid) == stats.valid_users and len(test) == stats.test_users
    assert not (train_users & valid or train_users & test or valid & test)


def test_history_comes_before_eval_in_time(prepared, ml_sample):
    out, _ = prepared
    raw_item = {}
    with open(out / "item_map.tsv") as f:
        next(f)
        for line in f:
            d, r, _ = line.split("\t")
            raw_item[int(d)] = r
    raw_user = {}
    with open(out / "user_map.tsv") as f:
        next(f)
        for line in f:
            d, r = line.rstrip("\n").split("\t")
            raw_user[int(d)] = r
    times = {}
    with open(ml_sample) as f:
        next(f)
        for line in f:
            u, i, t = line.strip().split(",")
            times.setdefault((u, i), []).append(int(t))
    users = _slot_users(out / "test" / "part-0.txt")
    assert users
    for uid, (hist, evals) in users.items():
        assert hist and evals
        assert len(hist) == max(1, int((len(hist) + len(evals)) * 0.8))
        u = raw_user[uid]
        last_hist = max(min(times[(u, raw_item[i])]) for i in hist)
        first_eval = min(max(times[(u, raw_item[i])]) for i in evals)
        assert last_hist <= first_eval


def test_deterministic_for_a_seed_and_seed_matters(prepared, ml_sample, tmp_path):
    out, _ = prepared
    again = tmp_path / "again"
    prepare_data(ml_sample, str(again), seed=7)
    for rel in ("train/part-0.txt", "valid/part-0.txt", "test/part-0.txt", "item_map.tsv", "meta.json"):
        assert filecmp.cmp(out / rel, again / rel, shallow=False), rel
    other = tmp_path / "other"
    prepare_data(ml_sample, str(other), seed=8)
    assert (out / "test/part-0.txt").read_text() != (other / "test/part-0.txt").read_text()


def test_committed_demo_data_is_what_prepare_data_makes(tmp_path):
    data = os.path.join(MODELS, "mind", "data")
    out = tmp_path / "demo"
    prepare_data(os.path.join(data, "demo_clicks.csv.gz"), str(out))
    for rel in ("train/part-0.txt", "valid/part-0.txt", "test/part-0.txt", "item_map.tsv", "meta.json"):
        assert filecmp.cmp(os.path.join(data, "demo", rel), out / rel, shallow=False), rel


def test_string_ids_gzip_no_header_and_k_core(tmp_path):
    src = tmp_path / "clicks.csv.gz"
    rows = []
    for u in range(12):
        for k in range(6):
            rows.append(f"user-{u},book-{(u + k) % 8},{1000 + k}")
    rows.append("lonely-user,book-1,5")  # 1 click: dropped
    rows.append("user-0,rare-book,9999")  # item with 1 click: dropped
    with gzip.open(src, "wt") as f:
        f.write("\n".join(rows) + "\n")
    stats = prepare_data(str(src), str(tmp_path / "out"), seed=1)
    assert stats.users == 12 and stats.items == 8 and stats.interactions == 72
    raw = (tmp_path / "out" / "item_map.tsv").read_text()
    assert "rare-book" not in raw and "book-3" in raw


def test_ties_keep_file_order(tmp_path):
    src = tmp_path / "ties.csv"
    lines = ["user,item,timestamp"]
    for u in range(10):
        for i in [5, 3, 9, 1, 7, 2]:  # same timestamp: order must be kept
            lines.append(f"{u},{i},100")
    src.write_text("\n".join(lines) + "\n")
    prepare_data(str(src), str(tmp_path / "out"), seed=3, min_item_clicks=1, split=(1.0, 0.0, 0.0))
    item_map = {}
    for line in (tmp_path / "out" / "item_map.tsv").read_text().splitlines()[1:]:
        d, r, _ = line.split("\t")
        item_map[d] = r
    train_lines = (tmp_path / "out" / "train" / "part-0.txt").read_text().splitlines()
    first_user = [line.split(",") for line in train_lines if line.startswith("0,")]
    assert [item_map[i] for _, i, _ in first_user] == ["5", "3", "9", "1", "7", "2"]


def test_bad_line_names_file_and_line_and_leaves_nothing(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("user,item,timestamp\n1,2,3\n1,2\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad.csv:3: expected 3 fields"):
        prepare_data(str(src), str(out))
    src.write_text("1,2,3\n1,2,soon\n")
    with pytest.raises(DataError, match=r"bad.csv:2: timestamp 'soon' is not an integer"):
        prepare_data(str(src), str(out))
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_skip_bad_lines_counts_them(tmp_path):
    src = tmp_path / "mixed.csv"
    good = [f"{u},{i},{t}" for u in range(6) for t, i in enumerate(range(6))]
    src.write_text("\n".join(good[:10] + ["garbage", "1,,3", "2,3,x"] + good[10:]) + "\n")
    stats = prepare_data(str(src), str(tmp_path / "out"), skip_bad_lines=True)
    assert stats.bad_lines_skipped == 3
    assert stats.interactions == len(good)


def test_existing_output_needs_overwrite_and_is_replaced_whole(prepared, ml_sample, tmp_path):
    out = tmp_path / "o"
    prepare_data(ml_sample, str(out), seed=7)
    (out / "stale.txt").write_text("old")
    with pytest.raises(DataError, match="output folder exists"):
        prepare_data(ml_sample, str(out), seed=7)
    prepare_data(ml_sample, str(out), seed=7, overwrite=True)
    assert not (out / "stale.txt").exists()


def test_cli_reports_bad_input_without_traceback(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("1,2,3\nnot a line\n")
    proc = subprocess.run([sys.executable, "-m", "paddlerec_milvus.cli", "prepare-data", "--input",
                           str(src), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bad.csv:2: expected 3 fields" in proc.stderr
    assert "Traceback" not in proc.stderr
