"""MIND: Multi-Interest Network with Dynamic routing (Li et al. 2019), the network only.

Shapes: B users, L = maxlen history slots, K = max_k interests, D = embedding_dim.
History rows are left-aligned and zero-padded; ``seq_len`` says how many slots are real,
and padded slots never influence the interests (their routing weight is exactly 0).

Two parts of the MIND paper that PaddleRec's MIND leaves out, off by default:
``capsual.dynamic_k`` (K'_u = max(1, min(K, floor(log2 |history|))) interests per user; the others
are copies of the first, so a K-wide search is unchanged, and the label-aware attention ignores
them) and ``capsual.relu_layers`` (H fully connected ReLU layers over every interest capsule, then
a linear map back to D, so an interest can still score an item negatively).
"""

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from multi_interest import MultiInterestLayer, squash


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


def active_interests(seq_len, max_k):
    """[B, K] 1.0 for the first K'_u = max(1, min(K, floor(log2 |history|))) interests, else 0."""
    n = paddle.clip(paddle.reshape(seq_len, [-1, 1]).astype("float32"), min=1.0)
    k_user = paddle.clip(paddle.floor(paddle.log(n) / math.log(2.0) + 1e-6), min=1.0, max=float(max_k))
    k = paddle.arange(max_k, dtype="float32").unsqueeze(0)
    return (k < k_user).astype("float32")


class MindLayer(MultiInterestLayer):
    """MIND: capsule routing extracts the interests; label-aware attention (softmax of
    score**pow_p) mixes them for the target in training."""

    def __init__(self, item_count, embedding_dim=64, hidden_size=64, neg_samples=1280,
                 maxlen=20, pow_p=1.0, capsual_iters=3, capsual_max_k=4,
                 capsual_init_std=1.0, softmax_axis="behaviours", normalize_update=True,
                 dynamic_k=False, relu_layers=0):
        super().__init__(item_count, embedding_dim, neg_samples)
        self.pow_p = float(pow_p)
        self.max_k = capsual_max_k
        self.dynamic_k = bool(dynamic_k)
        self.capsule = CapsuleRouting(embedding_dim, hidden_size, maxlen, capsual_max_k,
                                      capsual_iters, capsual_init_std, softmax_axis, normalize_update)
        self.relu = None
        if relu_layers:
            layers = []
            for _ in range(int(relu_layers)):
                layers += [nn.Linear(hidden_size, hidden_size), nn.ReLU()]
            self.relu = nn.Sequential(*layers, nn.Linear(hidden_size, hidden_size))
        self._active = None  # [B, K] of the last extract (dynamic_k), for readout

    def extract(self, hist_emb, seq_len):
        interests, weight = self.capsule(hist_emb, seq_len)
        if self.relu is not None:
            interests = self.relu(interests)
        if self.dynamic_k:
            active = active_interests(seq_len, self.max_k)  # [B, K]
            first = paddle.expand_as(interests[:, :1, :], interests)
            a = active.unsqueeze(-1)
            interests = a * interests + (1.0 - a) * first
            if self.training:  # readout's mask; export traces the tower in eval mode
                self._active = active
        return interests, weight

    def readout(self, interests, target_emb):
        """Weight the K interests by their match with the target (softmax of score**p)."""
        score = paddle.sum(interests * target_emb.unsqueeze(1), axis=-1)  # [B, K]
        if self.pow_p != 1.0:
            score = paddle.sign(score) * paddle.pow(paddle.abs(score), self.pow_p)
        if self.dynamic_k and self._active is not None:  # the copies take no attention
            score = score + (self._active - 1.0) * 1e9
        att = F.softmax(score, axis=-1).unsqueeze(-1)
        return paddle.sum(att * interests, axis=1)  # [B, H]
