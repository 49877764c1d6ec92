"""What every multi-interest model of this zoo shares: the item tower (one embedding table),
log-uniform negatives, the sampled-softmax objective, the exportable user tower and the PaddleRec
glue (``DygraphModelBase``). A model's ``net.py`` adds only its interest extractor (``extract``)
and how the interests meet the target in training (``readout``); its ``dygraph_model.py`` only
builds that network from the config.

This file is the same in every model directory (a test keeps the copies identical): PaddleRec
imports a model directory on its own, so a directory cannot import from a sibling.
"""

import math

import numpy as np
import paddle
import paddle.nn as nn


def squash(z, eps=1e-9):
    """Capsule non-linearity: keeps the direction, maps the norm into [0, 1)."""
    sq = paddle.sum(z * z, axis=-1, keepdim=True)
    return z * (sq / (1.0 + sq)) / paddle.sqrt(sq + eps)


def select_interest(interests, target_emb, mode="hard"):
    """The user vector a training target is scored against: ``hard`` = the interest with the
    largest inner product with the target (ComiRec; a one-hot mask, not a gather, so it is one
    graph in dygraph and static mode and only the chosen interest gets gradient); ``soft`` = the
    softmax(score)-weighted mix (MIND's label-aware attention with p = 1)."""
    score = paddle.sum(interests * target_emb.unsqueeze(1), axis=-1)  # [B, K]
    if mode == "hard":
        att = nn.functional.one_hot(paddle.argmax(score, axis=-1), interests.shape[1])
        att = att.astype(interests.dtype)
    else:
        att = nn.functional.softmax(score, axis=-1)
    return paddle.sum(att.unsqueeze(-1) * interests, axis=1)  # [B, D]


class LogUniformSampler:
    """Negatives drawn ~ log-uniform over ids 1..n (dense ids are ranked by popularity).

    P(r) = log((r + 1) / r) / log(n + 1); ``log_q`` is log(expected count) for log-Q correction.
    """

    def __init__(self, num_items):
        self.n = num_items  # candidate ids are 1..n; 0 is padding
        self.log_range = math.log(self.n + 1)

    def sample(self, num):
        u = paddle.rand([num], dtype="float32")
        ids = paddle.floor(paddle.exp(u * self.log_range)).astype("int64")
        return paddle.clip(ids, 1, self.n)

    def log_q(self, ids, num):
        r = ids.astype("float32")
        prob = (paddle.log(r + 1.0) - paddle.log(r)) / self.log_range
        return paddle.log(prob * num + 1e-12)

    def sample_numpy(self, rng, num):
        """The same distribution drawn with numpy (readers prepare whole batches with it)."""
        ids = np.floor(np.exp(rng.random(num) * self.log_range)).astype(np.int64)
        return np.clip(ids, 1, self.n)

    def logit_bias_numpy(self, target, negs):
        """[B, 1 + S] additive logit bias: -log Q for the target and each negative, and
        -1e9 where a negative is the target itself (an accidental hit)."""
        def log_q(ids):
            r = ids.astype(np.float64)
            return np.log(np.log1p(1.0 / r) / self.log_range * len(negs) + 1e-12)

        target = np.asarray(target).reshape(-1)
        bias = np.empty((len(target), 1 + len(negs)), dtype=np.float32)
        bias[:, 0] = -log_q(target)
        bias[:, 1:] = -log_q(negs)[None, :]
        bias[:, 1:][negs[None, :] == target[:, None]] = -1e9
        return bias


class UniformSampler(LogUniformSampler):
    """Negatives drawn uniformly over ids 1..n: for catalogues whose popularity is flat, where
    log-uniform draws half its negatives from the first ~sqrt(n) ids and leaves most items never
    pushed down. Q(r) = 1/n for every id, so the log-Q correction is a constant."""

    def sample(self, num):
        return paddle.randint(1, self.n + 1, [num], dtype="int64")

    def log_q(self, ids, num):
        return paddle.full(ids.shape, math.log(num / self.n), dtype="float32")

    def sample_numpy(self, rng, num):
        return rng.integers(1, self.n + 1, size=num, dtype=np.int64)

    def logit_bias_numpy(self, target, negs):
        target = np.asarray(target).reshape(-1)
        bias = np.full((len(target), 1 + len(negs)), -math.log(len(negs) / self.n), dtype=np.float32)
        bias[:, 1:][negs[None, :] == target[:, None]] = -1e9
        return bias


SAMPLERS = {"log_uniform": LogUniformSampler, "uniform": UniformSampler}


def make_sampler(config, num_items):
    """hyper_parameters.negative_sampler: log_uniform (default; dense ids are ranked by popularity)
    or uniform."""
    name = config.get("hyper_parameters.negative_sampler", "log_uniform") or "log_uniform"
    if name not in SAMPLERS:
        raise ValueError(f"hyper_parameters.negative_sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](num_items)


class MultiInterestLayer(nn.Layer):
    """Item tower = the embedding table ``item_emb`` (PaddleRec's infer.py reads it by that
    name); user tower = ``extract`` over the history's embeddings.

    Subclasses implement ``extract(hist_emb [B, L, D], seq_len) -> (interests [B, K, D], weights)``
    and ``readout(interests, target_emb [B, D]) -> [B, D]``.
    """

    def __init__(self, item_count, embedding_dim, neg_samples):
        super().__init__()
        self.item_count = item_count
        self.neg_samples = neg_samples
        self.item_emb = nn.Embedding(
            item_count, embedding_dim, padding_idx=0, sparse=True,
            weight_attr=paddle.ParamAttr(initializer=nn.initializer.XavierUniform()),
        )
        self.sampler = LogUniformSampler(item_count - 1)
        # Options every model shares, set by DygraphModelBase.configure from the config:
        # item_norm_penalty: lambda of lambda * mean |e|^2 over the targets' and negatives' rows, a
        # lazy L2 that touches only the rows a batch used and keeps item norms small;
        # cosine_temperature: tau > 0 scores cos(user, item) / tau in training, and both towers
        # give unit vectors, so Milvus's inner product is the cosine (IVF/HNSW index unit vectors
        # better than norms spread over 0.5-16). 0 = the plain inner product.
        # embedding_dropout: p of dropout on the history's embeddings in training only (the
        # targets, negatives and the served tower are untouched), against overfitting long histories.
        self.item_norm_penalty = 0.0
        self.cosine_temperature = 0.0
        self.embedding_dropout = 0.0

    def _norm_penalty(self, *rows):
        if not self.item_norm_penalty:
            return 0.0
        sq = paddle.concat([paddle.sum(r * r, axis=-1) for r in rows])
        return self.item_norm_penalty * paddle.mean(sq)

    def extract(self, hist_emb, seq_len):
        raise NotImplementedError

    def _train_history(self, hist_emb):
        if not self.embedding_dropout or not self.training:
            return hist_emb
        return nn.functional.dropout(hist_emb, p=self.embedding_dropout, training=True)

    def _unit(self, x):
        return x / paddle.sqrt(paddle.sum(x * x, axis=-1, keepdim=True) + 1e-12)

    def _served(self, interests):
        """Interests as the user tower gives them: unit vectors under cosine scoring."""
        return self._unit(interests) if self.cosine_temperature else interests

    def _scored(self, user_vec, *item_rows):
        """(user_vec, item rows) for the training logits: cos / tau under cosine scoring."""
        if not self.cosine_temperature:
            return (user_vec, *item_rows)
        return (self._unit(user_vec) / self.cosine_temperature, *[self._unit(r) for r in item_rows])

    def readout(self, interests, target_emb):
        raise NotImplementedError

    def interests(self, hist_item, seq_len):
        """The user tower: [B, L] ids and lengths -> [B, K, D] interest vectors."""
        interests, _ = self.extract(self.item_emb(hist_item), seq_len)
        return self._served(interests)

    def sampled_softmax_loss(self, user_vec, target):
        """Sampled softmax over shared negatives, accidental hits removed, log-Q corrected."""
        target = paddle.reshape(target, [-1])
        negs = self.sampler.sample(self.neg_samples)
        pos_w = self.item_emb(target)  # [B, D]
        neg_w = self.item_emb(negs)  # [S, D]
        penalty = self._norm_penalty(pos_w, neg_w)
        user_vec, pos_w, neg_w = self._scored(user_vec, pos_w, neg_w)
        pos_logit = paddle.sum(user_vec * pos_w, axis=-1, keepdim=True)
        pos_logit = pos_logit - self.sampler.log_q(target, self.neg_samples).unsqueeze(-1)
        neg_logit = paddle.matmul(user_vec, neg_w, transpose_y=True)
        neg_logit = neg_logit - self.sampler.log_q(negs, self.neg_samples).unsqueeze(0)
        hit = (negs.unsqueeze(0) == target.unsqueeze(-1)).astype(neg_logit.dtype)
        neg_logit = neg_logit - hit * 1e9
        logits = paddle.concat([pos_logit, neg_logit], axis=-1)
        return paddle.mean(paddle.logsumexp(logits, axis=-1) - logits[:, 0]) + penalty

    def forward(self, hist_item, seq_len, target_item=None, neg_items=None, logit_bias=None):
        """Training (target given): mean loss and interests; otherwise interests and weights.

        ``neg_items`` [S] and ``logit_bias`` [B, 1 + S] (from ``sampler.logit_bias_numpy``) are
        optional: without them (PaddleRec's DataLoader) negatives are sampled inside the graph.
        """
        if target_item is None:
            interests, weights = self.extract(self.item_emb(hist_item), seq_len)
            return self._served(interests), weights
        if neg_items is None:
            interests, _ = self.extract(self._train_history(self.item_emb(hist_item)), seq_len)
            target_emb = self.item_emb(paddle.reshape(target_item, [-1]))
            user_vec = self.readout(self._served(interests), self._served(target_emb))
            return self.sampled_softmax_loss(user_vec, target_item), interests
        # One lookup for history, targets and negatives: one sparse gradient to merge.
        b, length = hist_item.shape
        target = paddle.reshape(target_item, [-1])
        ids = paddle.concat([paddle.reshape(hist_item, [-1]), target, neg_items])
        hist_emb, target_emb, neg_emb = paddle.split(
            self.item_emb(ids), [b * length, b, neg_items.shape[0]])
        interests, _ = self.extract(self._train_history(paddle.reshape(hist_emb, [b, length, -1])), seq_len)
        user_vec = self.readout(self._served(interests), self._served(target_emb))
        penalty = self._norm_penalty(target_emb, neg_emb)
        user_vec, target_emb, neg_emb = self._scored(user_vec, target_emb, neg_emb)
        pos_logit = paddle.sum(user_vec * target_emb, axis=-1, keepdim=True)
        neg_logit = paddle.matmul(user_vec, neg_emb, transpose_y=True)
        logits = paddle.concat([pos_logit, neg_logit], axis=-1) + logit_bias
        label = paddle.zeros([b, 1], dtype="int64")
        loss = paddle.mean(nn.functional.cross_entropy(logits, label, reduction="none"))
        return loss + penalty, interests


class UserTower(nn.Layer):
    """The exportable user tower of a ``MultiInterestLayer``: ids and lengths -> interests."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hist_item, seq_len):
        return self.model.interests(hist_item, seq_len)


def check_sizes(config):
    """item_count and embedding_dim, checked before building a model on them."""
    item_count = config.get("hyper_parameters.item_count", None)
    if not isinstance(item_count, int) or item_count < 2:
        raise ValueError(
            "hyper_parameters.item_count must be an integer >= 2 (largest item id + 1), "
            f"got {item_count!r}"
        )
    embedding_dim = config.get("hyper_parameters.embedding_dim", 64)
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError("hyper_parameters.embedding_dim must be a positive integer, "
                         f"got {embedding_dim!r}")
    hidden_size = config.get("hyper_parameters.hidden_size", embedding_dim)
    if hidden_size != embedding_dim:
        raise ValueError(
            "hyper_parameters.hidden_size must equal embedding_dim: interests are searched "
            f"against item embeddings (got {hidden_size} vs {embedding_dim})"
        )
    return item_count, embedding_dim


def lr_schedule(config, lr):
    """``hyper_parameters.optimizer.decay: cosine``: the rate falls from ``lr`` to
    ``lr x min_lr_ratio`` (default 0.1) over runner.epochs x runner.batches_per_epoch steps, after
    ``warmup_steps`` of linear warm-up from 0. ``none`` (default): a constant rate."""
    decay = str(config.get("hyper_parameters.optimizer.decay") or "none").lower()
    warmup = int(config.get("hyper_parameters.optimizer.warmup_steps") or 0)
    if decay not in ("none", "cosine"):
        raise ValueError(f"hyper_parameters.optimizer.decay = {decay!r}: expected none or cosine")
    if warmup < 0:
        raise ValueError(f"hyper_parameters.optimizer.warmup_steps must be >= 0, got {warmup}")
    if decay == "none" and not warmup:
        return None
    schedule = lr
    if decay == "cosine":
        per_epoch = config.get("runner.batches_per_epoch")
        if not per_epoch:
            raise ValueError("hyper_parameters.optimizer.decay: cosine needs runner.batches_per_epoch "
                             "(the schedule's length is epochs x batches_per_epoch)")
        total = max(1, int(config.get("runner.epochs", 1)) * int(per_epoch) - warmup)
        ratio = float(config.get("hyper_parameters.optimizer.min_lr_ratio", 0.1))
        schedule = paddle.optimizer.lr.CosineAnnealingDecay(lr, T_max=total, eta_min=lr * ratio)
    if warmup:
        schedule = paddle.optimizer.lr.LinearWarmup(schedule, warmup, 0.0, lr)
    return schedule


class ScheduledAdam(paddle.optimizer.Adam):
    """Adam whose learning-rate schedule moves one step per optimizer step, so it decays under any
    training loop (PaddleRec's tools/trainer.py never calls a scheduler's step())."""

    def step(self):
        super().step()
        self._learning_rate.step()


class DygraphModelBase:
    """The PaddleRec model-zoo interface every model here shares; a model's ``dygraph_model.py``
    subclasses it as ``DygraphModel`` and adds ``create_model`` (its network and its keys)."""

    def create_model(self, config):
        raise NotImplementedError

    def configure(self, model, config):
        """The options every model shares, set on a model's freshly built network."""
        model.item_norm_penalty = float(config.get("hyper_parameters.item_norm_penalty", 0.0) or 0.0)
        tau = float(config.get("hyper_parameters.cosine_temperature", 0.0) or 0.0)
        if tau < 0:
            raise ValueError(f"hyper_parameters.cosine_temperature must be >= 0 (0 = off), got {tau}")
        model.cosine_temperature = tau
        drop = float(config.get("hyper_parameters.embedding_dropout", 0.0) or 0.0)
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"hyper_parameters.embedding_dropout must be in [0, 1) (0 = off), got {drop}")
        model.embedding_dropout = drop
        model.sampler = make_sampler(config, model.item_count - 1)
        return model

    def create_feeds_train(self, batch_data):
        """[hist, target, seq_len] (+ [neg_items, logit_bias] from our reader's fast path)."""
        feeds = [paddle.to_tensor(np.asarray(x), dtype="int64") for x in batch_data[:3]]
        if len(batch_data) == 5:
            feeds.append(paddle.to_tensor(np.asarray(batch_data[3]), dtype="int64"))
            feeds.append(paddle.to_tensor(np.asarray(batch_data[4]), dtype="float32"))
        return feeds

    def create_feeds_infer(self, batch_data):
        hist_item = paddle.to_tensor(np.asarray(batch_data[0]), dtype="int64")
        seq_len = paddle.to_tensor(np.asarray(batch_data[1]), dtype="int64")
        return [hist_item, seq_len]

    def create_loss(self, loss):
        return paddle.mean(loss)

    def create_optimizer(self, dy_model, config):
        lr = config.get("hyper_parameters.optimizer.learning_rate", 0.001)
        # lazy_mode: Adam touches only the embedding rows a batch used (sparse gradients);
        # False updates every row each step (momentum keeps moving rows not in the batch).
        lazy = config.get("hyper_parameters.optimizer.lazy_mode", True)
        schedule = lr_schedule(config, lr)
        if schedule is None:
            return paddle.optimizer.Adam(learning_rate=lr, parameters=dy_model.parameters(), lazy_mode=lazy)
        return ScheduledAdam(learning_rate=schedule, parameters=dy_model.parameters(), lazy_mode=lazy)

    # The two towers: the only parts of a model that evaluation, validation, export and serving use
    # (docs/design.md, "Model hooks").
    def item_vectors(self, dy_model):
        """The item tower: float32 [item_count, D], row i for dense item id i (row 0 = padding)."""
        table = dy_model.item_emb.weight.numpy()
        if getattr(dy_model, "cosine_temperature", 0.0):  # unit rows; the padding row stays 0
            table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
        return table

    def user_tower(self, dy_model):
        """The user tower: a Layer mapping (hist_item [B, L], seq_len [B]) int64 to [B, K, D]
        interests; evaluation runs it and export saves it with paddle.jit.save."""
        return UserTower(dy_model)

    def create_metrics(self):
        return [], []

    def train_forward(self, dy_model, metrics_list, batch_data, config):
        hist_item, target_item, seq_len, *negatives = self.create_feeds_train(batch_data)
        loss, _ = dy_model(hist_item, seq_len, target_item, *negatives)
        loss = self.create_loss(loss)
        return loss, metrics_list, {"loss": loss}

    def infer_forward(self, dy_model, metrics_list, batch_data, config):
        hist_item, seq_len = self.create_feeds_infer(batch_data)
        dy_model.eval()
        interests, weight = dy_model.forward(hist_item, seq_len)
        return interests, weight
