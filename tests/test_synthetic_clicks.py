"""The million-item benchmark's click generator: planted topics, reproducible, prepare-data reads it."""

import numpy as np

from benchmarks.synthetic_clicks import generate, simulate
from paddlerec_milvus.data_prep import prepare_data


def test_users_click_within_their_topics_and_runs_repeat():
    user, item, ts = simulate(items=2_000, users=400, topics=20, mean_clicks=20, noise=0.0, seed=3)
    again = simulate(items=2_000, users=400, topics=20, mean_clicks=20, noise=0.0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((user, item, ts), again))
    assert not np.array_equal(item, simulate(items=2_000, users=400, topics=20, mean_clicks=20,
                                             noise=0.0, seed=4)[1])
    counts = np.bincount(user)
    assert counts.min() >= 5 and abs(counts.mean() - 20) < 3
    assert (np.diff(user) >= 0).all() and (np.diff(ts)[np.diff(user) == 0] > 0).all()
    # topic of an item: generated with members = permutation(items).reshape(topics, -1)
    members = np.random.default_rng(3).permutation(2_000).reshape(20, -1)
    topic_of = np.empty(2_000, dtype=np.int64)
    topic_of[members] = np.arange(20)[:, None]
    per_user = [len(np.unique(topic_of[item[user == u]])) for u in range(400)]
    assert max(per_user) <= 4 and min(per_user) >= 1 and np.mean(per_user) > 1.5


def test_generated_log_goes_through_prepare_data(tmp_path):
    stats = generate(str(tmp_path / "clicks.csv"), items=1_000, users=600, topics=20, mean_clicks=25)
    assert stats.clicks > 600 * 5 and stats.items > 950
    prep = prepare_data(str(tmp_path / "clicks.csv"), str(tmp_path / "data"), split=(0.8, 0.1, 0.1))
    assert prep.lines_read == stats.clicks + 1 and prep.bad_lines_skipped == 0
    assert prep.users > 0.95 * 600 and prep.items > 0.9 * stats.items
