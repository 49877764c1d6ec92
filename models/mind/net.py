"""MIND: Multi-Interest Network with Dynamic routing (Li et al. 2019), the network only.

Shapes: B users, L = maxlen history slots, K = max_k interests, D = embedding_dim.
History rows are left-aligned and zero-padded; ``seq_len`` says how many slots are real,
and padded slots never influence the interests (their routing weight is exactly 0).
"""

import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def squash(z, eps=1e-9):
    """Capsule non-linearity: keeps the direction, maps the norm into [0, 1)."""
    sq = paddle.sum(z * z, axis=-1, keepdim=True)
    return z * (sq / (1.0 + sq)) / paddle.sqrt(sq + eps)


class CapsuleRouting(nn.Layer):
    """Behaviour-to-interest dynamic routing with one shared bilinear map.

    Routing logits start from a fixed, seeded matrix stored with the model (not redrawn per
    call), so the same history always gives the same interests, online and offline. The
    softmax runs over the same axis in every iteration: over the behaviours (``softmax_axis =
    "behaviours"``: each interest is a convex mix of the history, the default) or over the
    interests (``"interests"``: each behaviour is split among the interests). Padded slots get
    weight exactly 0 either way.
    """

    def __init__(self, dim, hidden_size, maxlen, max_k, iters, init_std,
                 softmax_axis="behaviours", normalize_update=True):
        super().__init__()
        if softmax_axis not in ("behaviours", "interests"):
            raise ValueError("capsual.softmax_axis must be 'behaviours' or 'interests', "
                             f"got {softmax_axis!r}")
        self.max_k, self.iters, self.maxlen = max_k, iters, maxlen
        self.over_behaviours = softmax_axis == "behaviours"
        self.normalize_update = normalize_update
        # N(0, init_std) as in MIND/PaddleRec: a large map makes the squashed interests start
        # near unit length, so logits (and gradients) are not vanishing at the start.
        self.bilinear = self.create_parameter(
            [dim, hidden_size], default_initializer=nn.initializer.Normal(0.0, init_std)
        )
        self.routing_init = self.create_parameter(
            [max_k, maxlen], default_initializer=nn.initializer.Normal(0.0, init_std)
        )
        self.routing_init.stop_gradient = True

    def _weights(self, logits, mask):
        if self.over_behaviours:
            return F.softmax(logits + (mask - 1.0) * 1e9, axis=-1) * mask
        return F.softmax(logits, axis=1) * mask

    def forward(self, item_emb, seq_len):
        # item_emb [B, L, D], seq_len [B] or [B, 1]
        seq_len = paddle.reshape(seq_len, [-1, 1]).astype("int64")
        positions = paddle.arange(self.maxlen, dtype="int64").unsqueeze(0)
        mask = (positions < seq_len).astype(item_emb.dtype).unsqueeze(1)  # [B, 1, L]
        low = paddle.matmul(item_emb, self.bilinear)  # [B, L, H]
        low_fixed = low.detach()
        logits = self.routing_init.unsqueeze(0) + paddle.zeros_like(mask)  # [B, K, L]
        for i in range(self.iters):
            weight = self._weights(logits, mask)  # [B, K, L]
            if i < self.iters - 1:
                interests = squash(paddle.matmul(weight, low_fixed))  # [B, K, H]
                delta = paddle.matmul(interests, low_fixed, transpose_y=True) * mask
                if self.normalize_update:  # keeps the softmax from saturating on large embeddings
                    delta = delta / paddle.clip(paddle.norm(delta, p=2, axis=-1, keepdim=True), min=1.0)
                logits = logits + delta
            else:
                interests = squash(paddle.matmul(weight, low))
        return interests, weight


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


class MindLayer(nn.Layer):
    """Item tower = the embedding table; user tower = routing over the history."""

    def __init__(self, item_count, embedding_dim=64, hidden_size=64, neg_samples=1280,
                 maxlen=20, pow_p=1.0, capsual_iters=3, capsual_max_k=4,
                 capsual_init_std=1.0, softmax_axis="behaviours", normalize_update=True):
        super().__init__()
        self.item_count = item_count
        self.neg_samples = neg_samples
        self.pow_p = float(pow_p)
        self.item_emb = nn.Embedding(
            item_count, embedding_dim, padding_idx=0, sparse=True,
            weight_attr=paddle.ParamAttr(initializer=nn.initializer.XavierUniform()),
        )
        self.capsule = CapsuleRouting(embedding_dim, hidden_size, maxlen, capsual_max_k,
                                      capsual_iters, capsual_init_std, softmax_axis, normalize_update)
        self.sampler = LogUniformSampler(item_count - 1)

    def interests(self, hist_item, seq_len):
        """The user tower: [B, L] ids and lengths -> [B, K, H] interest vectors."""
        interests, _ = self.capsule(self.item_emb(hist_item), seq_len)
        return interests

    def label_aware_attention(self, interests, target_emb):
        """Weight the K interests by their match with the target (softmax of score**p)."""
        score = paddle.sum(interests * target_emb.unsqueeze(1), axis=-1)  # [B, K]
        if self.pow_p != 1.0:
            score = paddle.sign(score) * paddle.pow(paddle.abs(score), self.pow_p)
        att = F.softmax(score, axis=-1).unsqueeze(-1)
        return paddle.sum(att * interests, axis=1)  # [B, H]

    def sampled_softmax_loss(self, user_vec, target):
        """Sampled softmax over shared negatives, accidental hits removed, log-Q corrected."""
        target = paddle.reshape(target, [-1])
        negs = self.sampler.sample(self.neg_samples)
        pos_w = self.item_emb(target)  # [B, D]
        neg_w = self.item_emb(negs)  # [S, D]
        pos_logit = paddle.sum(user_vec * pos_w, axis=-1, keepdim=True)
        pos_logit = pos_logit - self.sampler.log_q(target, self.neg_samples).unsqueeze(-1)
        neg_logit = paddle.matmul(user_vec, neg_w, transpose_y=True)
        neg_logit = neg_logit - self.sampler.log_q(negs, self.neg_samples).unsqueeze(0)
        hit = (negs.unsqueeze(0) == target.unsqueeze(-1)).astype(neg_logit.dtype)
        neg_logit = neg_logit - hit * 1e9
        logits = paddle.concat([pos_logit, neg_logit], axis=-1)
        return paddle.mean(paddle.logsumexp(logits, axis=-1) - logits[:, 0])

    def forward(self, hist_item, seq_len, target_item=None, neg_items=None, logit_bias=None):
        """Training (target given): mean loss and interests; otherwise interests and weights.

        ``neg_items`` [S] and ``logit_bias`` [B, 1 + S] (from ``sampler.logit_bias_numpy``) are
        optional: without them negatives are sampled inside the graph.
        """
        if target_item is None:
            return self.capsule(self.item_emb(hist_item), seq_len)
        if neg_items is None:
            interests, _ = self.capsule(self.item_emb(hist_item), seq_len)
            target_emb = self.item_emb(paddle.reshape(target_item, [-1]))
            user_vec = self.label_aware_attention(interests, target_emb)
            return self.sampled_softmax_loss(user_vec, target_item), interests
        # One lookup for history, targets and negatives: one sparse gradient to merge.
        b, length = hist_item.shape
        target = paddle.reshape(target_item, [-1])
        ids = paddle.concat([paddle.reshape(hist_item, [-1]), target, neg_items])
        hist_emb, target_emb, neg_emb = paddle.split(
            self.item_emb(ids), [b * length, b, neg_items.shape[0]])
        interests, _ = self.capsule(paddle.reshape(hist_emb, [b, length, -1]), seq_len)
        user_vec = self.label_aware_attention(interests, target_emb)
        pos_logit = paddle.sum(user_vec * target_emb, axis=-1, keepdim=True)
        neg_logit = paddle.matmul(user_vec, neg_emb, transpose_y=True)
        logits = paddle.concat([pos_logit, neg_logit], axis=-1) + logit_bias
        label = paddle.zeros([b, 1], dtype="int64")
        return paddle.mean(F.cross_entropy(logits, label, reduction="none")), interests
