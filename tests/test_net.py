"""net.py: shapes, masking, determinism, the sampler and the loss."""

import os
import sys

import numpy as np
import paddle
import pytest
from conftest import MODELS

sys.path.insert(0, os.path.join(MODELS, "mind"))
import multi_interest  # noqa: E402
import net  # noqa: E402


@pytest.fixture
def model():
    paddle.seed(0)
    m = net.MindLayer(item_count=100, embedding_dim=16, hidden_size=16, neg_samples=32, maxlen=8,
                      capsual_iters=3, capsual_max_k=4, capsual_init_std=1.0)
    m.eval()
    return m


def t(x):
    return paddle.to_tensor(np.asarray(x, dtype=np.int64))


def test_shapes(model):
    hist = t([[1, 2, 3, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 9, 10, 11]])
    interests, weight = model(hist, t([3, 8]))
    assert interests.shape == [2, 4, 16] and weight.shape == [2, 4, 8]
    assert model.interests(hist, t([[3], [8]])).shape == [2, 4, 16]  # [B, 1] lengths work too


def test_padding_never_influences_interests(model):
    base = t([[5, 9, 13, 0, 0, 0, 0, 0]])
    noisy = t([[5, 9, 13, 77, 2, 98, 41, 6]])  # garbage after seq_len
    a, wa = model(base, t([3]))
    b, wb = model(noisy, t([3]))
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=0)
    assert float(wa[:, :, 3:].abs().sum()) == 0.0 and float(wb[:, :, 3:].abs().sum()) == 0.0


def test_interests_are_deterministic_and_squashed(model):
    hist, n = t([[3, 1, 4, 1, 5, 9, 2, 6]]), t([8])
    a, _ = model(hist, n)
    b, _ = model(hist, n)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    norms = np.linalg.norm(a.numpy(), axis=-1)
    assert (norms < 1).all() and (norms > 0).all()
    # interests differ from one another (routing logits break the symmetry)
    assert np.abs(a.numpy()[0, 0] - a.numpy()[0, 1]).max() > 1e-4


def test_routing_weights_sum_to_one_over_the_softmax_axis(model):
    _, w = model(t([[1, 2, 3, 4, 5, 0, 0, 0]]), t([5]))  # default: over the behaviours
    np.testing.assert_allclose(w.numpy()[0, :, :5].sum(axis=1), np.ones(4), rtol=1e-5)
    paddle.seed(0)
    other = net.MindLayer(item_count=100, embedding_dim=16, hidden_size=16, neg_samples=32, maxlen=8,
                          softmax_axis="interests")
    other.eval()
    _, w = other(t([[1, 2, 3, 4, 5, 0, 0, 0]]), t([5]))
    np.testing.assert_allclose(w.numpy()[0, :, :5].sum(axis=0), np.ones(5), rtol=1e-5)
    assert float(w[:, :, 5:].abs().sum()) == 0.0


def test_sampler_range_and_log_uniform_shape():
    paddle.seed(1)
    s = multi_interest.LogUniformSampler(1000)
    ids = s.sample(20000).numpy()
    assert ids.min() >= 1 and ids.max() <= 1000
    share_low = (ids <= 10).mean()
    expected = np.log(11) / np.log(1001)
    assert abs(share_low - expected) < 0.02


def test_loss_is_finite_and_accidental_hits_are_removed(model):
    model.train()
    paddle.seed(3)
    hist, n = t([[1, 2, 3, 0, 0, 0, 0, 0]] * 4), t([3] * 4)
    loss, _ = model(hist, n, t([[1], [2], [3], [4]]))
    assert np.isfinite(float(loss)) and float(loss) > 0
    # With every negative equal to the target, all negatives are accidental hits: loss ~ 0.
    model.neg_samples = 8
    model.sampler.sample = lambda num: paddle.full([num], 7, dtype="int64")
    loss7, _ = model(hist, n, t([[7]] * 4))
    assert float(loss7) < 1e-6


def test_padding_row_stays_zero_and_gradients_reach_used_rows(model):
    model.train()
    opt = paddle.optimizer.Adam(0.01, parameters=model.parameters(), lazy_mode=True)
    before = model.item_emb.weight.numpy().copy()
    loss, _ = model(t([[1, 2, 0, 0, 0, 0, 0, 0]]), t([2]), t([[3]]))
    loss.backward()
    opt.step()
    after = model.item_emb.weight.numpy()
    assert np.abs(after[0]).max() == 0.0
    assert np.abs(after[1] - before[1]).max() > 0


def test_prepared_negatives_give_the_same_loss_as_in_graph_sampling(model):
    model.train()
    hist, n, target = t([[1, 2, 3, 0, 0, 0, 0, 0]] * 3), t([3] * 3), t([[4], [9], [50]])
    negs = np.array([9, 2, 77, 5, 9, 31], dtype=np.int64)  # includes an accidental hit (9)
    bias = model.sampler.logit_bias_numpy(target.numpy(), negs)
    prepared, _ = model(hist, n, target, t(negs), paddle.to_tensor(bias))
    model.sampler.sample = lambda num: paddle.to_tensor(negs)
    model.neg_samples = len(negs)
    in_graph, _ = model(hist, n, target)
    np.testing.assert_allclose(float(prepared), float(in_graph), rtol=1e-5)


def test_dynamic_k_gives_a_user_log2_of_its_history_interests():
    paddle.seed(0)
    m = net.MindLayer(item_count=100, embedding_dim=16, hidden_size=16, neg_samples=32, maxlen=8,
                      capsual_max_k=4, dynamic_k=True)
    m.eval()
    hist = t([[1, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    interests = m.interests(hist, t([1, 3, 8])).numpy()
    # K'_u = max(1, min(4, floor(log2 n))): 1, 1, 3; the others are copies of the first
    for row, k_user in enumerate([1, 1, 3]):
        for k in range(4):
            same = np.allclose(interests[row, k], interests[row, 0])
            assert same == (k == 0 or k >= k_user), (row, k)
    m.train()  # training: the copies take no attention, and the loss is finite
    loss, _ = m(hist, t([1, 3, 8]), t([[9], [9], [9]]))
    assert np.isfinite(float(loss))
    assert m._active.numpy().sum(axis=1).tolist() == [1.0, 1.0, 3.0]


def test_relu_layers_map_every_interest_and_can_score_negatively():
    paddle.seed(0)
    m = net.MindLayer(item_count=100, embedding_dim=16, hidden_size=16, neg_samples=32, maxlen=8,
                      capsual_max_k=4, relu_layers=2)
    assert len([x for x in m.relu if isinstance(x, paddle.nn.Linear)]) == 3  # H = 2, then linear
    hist = t([[1, 2, 3, 4, 0, 0, 0, 0]])
    m.train()
    loss, interests = m(hist, t([4]), t([[9]]))
    loss.backward()
    assert interests.shape == [1, 4, 16] and (interests.numpy() < 0).any()
    assert all(p.grad is not None for p in m.relu.parameters())


def test_item_norm_penalty_adds_lambda_mean_squared_norm_and_shrinks_norms(model):
    model.train()
    hist, n, target = t([[1, 2, 3, 0, 0, 0, 0, 0]] * 3), t([3] * 3), t([[4], [9], [50]])
    negs = np.array([9, 2, 77, 5, 31], dtype=np.int64)
    bias = paddle.to_tensor(model.sampler.logit_bias_numpy(target.numpy(), negs))
    plain, _ = model(hist, n, target, t(negs), bias)
    model.item_norm_penalty = 0.5
    penalised, _ = model(hist, n, target, t(negs), bias)
    rows = model.item_emb.weight.numpy()[[4, 9, 50, *negs]]
    np.testing.assert_allclose(float(penalised) - float(plain), 0.5 * (rows ** 2).sum(1).mean(),
                               rtol=1e-5)
    # a step on the penalty alone shrinks exactly the rows the batch used
    before = model.item_emb.weight.numpy().copy()
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    (penalised - plain).backward()
    opt.step()
    after = model.item_emb.weight.numpy()
    used = sorted({4, 9, 50, *negs.tolist()})
    assert (np.linalg.norm(after[used], axis=1) < np.linalg.norm(before[used], axis=1)).all()
    np.testing.assert_array_equal(np.delete(after, used, axis=0), np.delete(before, used, axis=0))


def test_cosine_temperature_scores_cosines_and_both_towers_give_unit_vectors():
    import dygraph_model

    config = {"hyper_parameters.item_count": 100, "hyper_parameters.embedding_dim": 16,
              "hyper_parameters.neg_samples": 8, "hyper_parameters.maxlen": 8,
              "hyper_parameters.cosine_temperature": 0.1}
    dm = dygraph_model.DygraphModel()
    paddle.seed(0)
    model = dm.create_model(config)
    assert model.cosine_temperature == 0.1
    table = dm.item_vectors(model)
    np.testing.assert_allclose(np.linalg.norm(table[1:], axis=1), 1.0, rtol=1e-5)
    assert np.abs(table[0]).max() == 0  # padding stays zero
    hist, n = t([[1, 2, 3, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 9, 10, 11]]), t([3, 8])
    interests = dm.user_tower(model)(hist, n).numpy()
    np.testing.assert_allclose(np.linalg.norm(interests, axis=-1), 1.0, rtol=1e-5)
    # the training logits are cos / tau: with one negative the loss is softplus((cos_n - cos_p) / tau)
    model.train()
    target, negs = t([[4], [9]]), np.array([50], dtype=np.int64)
    zero_bias = paddle.zeros([2, 2], dtype="float32")
    loss, _ = model(hist, n, target, t(negs), zero_bias)
    served = model.readout(paddle.to_tensor(interests), paddle.to_tensor(table[[4, 9]])).numpy()
    served /= np.linalg.norm(served, axis=1, keepdims=True)
    cos_p, cos_n = (served * table[[4, 9]]).sum(1), served @ table[50]
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp((cos_n - cos_p) / 0.1))), rtol=1e-4)
    with pytest.raises(ValueError, match="cosine_temperature must be >= 0"):
        dm.create_model({**config, "hyper_parameters.cosine_temperature": -1})


def test_embedding_dropout_touches_only_the_training_history():
    import dygraph_model

    config = {"hyper_parameters.item_count": 100, "hyper_parameters.embedding_dim": 16,
              "hyper_parameters.neg_samples": 8, "hyper_parameters.maxlen": 8,
              "hyper_parameters.embedding_dropout": 0.5}
    dm = dygraph_model.DygraphModel()
    paddle.seed(0)
    model = dm.create_model(config)
    assert model.embedding_dropout == 0.5
    hist, n = t([[1, 2, 3, 4, 5, 0, 0, 0]] * 2), t([5, 5])
    target, negs = t([[9], [50]]), np.array([7, 31], dtype=np.int64)
    bias = paddle.to_tensor(model.sampler.logit_bias_numpy(target.numpy(), negs))
    model.train()
    losses = {float(model(hist, n, target, t(negs), bias)[0]) for _ in range(4)}
    assert len(losses) > 1  # a fresh mask per step
    model.eval()  # evaluation and the served tower never drop
    a = dm.user_tower(model)(hist, n).numpy()
    b = dm.user_tower(model)(hist, n).numpy()
    np.testing.assert_array_equal(a, b)
    model.embedding_dropout = 0.0
    model.train()  # off: training is deterministic for a fixed batch and negatives
    assert len({float(model(hist, n, target, t(negs), bias)[0]) for _ in range(3)}) == 1
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="embedding_dropout must be in"):
            dm.create_model({**config, "hyper_parameters.embedding_dropout": bad})


def test_uniform_sampler_draws_every_id_alike_and_corrects_by_a_constant():
    rng = np.random.default_rng(0)
    sampler = multi_interest.make_sampler({"hyper_parameters.negative_sampler": "uniform"}, 50)
    draws = sampler.sample_numpy(rng, 50_000)
    assert draws.min() == 1 and draws.max() == 50
    counts = np.bincount(draws, minlength=51)[1:]
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000  # log-uniform would give 1 >> 50
    negs = np.array([3, 7, 7, 40], dtype=np.int64)
    bias = sampler.logit_bias_numpy(np.array([7, 9]), negs)
    np.testing.assert_allclose(bias[1], -np.log(4 / 50), rtol=1e-6)
    assert (bias[0, [2, 3]] == -1e9).all() and bias[0, 0] == pytest.approx(-np.log(4 / 50))
    graph = sampler.sample(1000).numpy()
    assert graph.min() >= 1 and graph.max() <= 50
    np.testing.assert_allclose(sampler.log_q(paddle.to_tensor(negs), 4).numpy(), np.log(4 / 50), rtol=1e-6)
    assert type(multi_interest.make_sampler({}, 50)).__name__ == "LogUniformSampler"
    with pytest.raises(ValueError, match="negative_sampler must be one of"):
        multi_interest.make_sampler({"hyper_parameters.negative_sampler": "zipf"}, 50)


def test_cosine_decay_steps_with_the_optimizer_and_resumes():
    """decay: cosine moves once per optimizer step (no trainer has to call the scheduler), ends at
    lr x min_lr_ratio, and its position travels in the optimizer's state."""
    cfg = {"hyper_parameters.optimizer.decay": "cosine", "runner.epochs": 2, "runner.batches_per_epoch": 5,
           "hyper_parameters.optimizer.warmup_steps": 2}
    lin = paddle.nn.Linear(2, 1)
    opt = multi_interest.ScheduledAdam(learning_rate=multi_interest.lr_schedule(cfg, 0.01),
                                       parameters=lin.parameters())
    rates = []
    for _ in range(10):
        lin(paddle.ones([1, 2])).sum().backward()
        rates.append(opt.get_lr())
        opt.step()
        opt.clear_grad()
    assert rates[:3] == pytest.approx([0.0, 0.005, 0.01])  # warm-up
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # then falling
    assert opt.get_lr() == pytest.approx(0.001)  # 10 steps = epochs x batches: lr x 0.1
    again = multi_interest.ScheduledAdam(learning_rate=multi_interest.lr_schedule(cfg, 0.01),
                                         parameters=lin.parameters())
    again.set_state_dict(opt.state_dict())
    assert again.get_lr() == pytest.approx(opt.get_lr())
    assert multi_interest.lr_schedule({}, 0.01) is None  # default: constant rate, plain Adam
    with pytest.raises(ValueError, match="decay = 'linear'"):
        multi_interest.lr_schedule({"hyper_parameters.optimizer.decay": "linear"}, 0.01)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        multi_interest.lr_schedule({"hyper_parameters.optimizer.decay": "cosine"}, 0.01)
