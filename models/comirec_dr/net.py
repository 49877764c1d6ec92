"""ComiRec-DR: the dynamic-routing multi-interest extractor of ComiRec (Cen et al., KDD 2020,
"Controllable Multi-Interest Framework for Recommendation"), the network only.

Shapes: B users, L = maxlen history slots, K = max_k interests, D = embedding_dim.
History rows are left-aligned and zero-padded; ``seq_len`` says how many slots are real,
and padded slots never influence the interests (their routing weight is exactly 0).

Where it differs from MIND (models/mind): each interest has its own behaviour-to-interest map,
so routing can start from all-zero logits (no random or stored initial logits: the maps break
the symmetry), and the routing softmax runs over the interests (each behaviour is split among
them). Training reads out the single interest closest to the target (ComiRec's hard readout).
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from multi_interest import MultiInterestLayer, select_interest, squash

BILINEAR = ("per_interest", "shared")
READOUT = ("hard", "soft")


class DynamicRouting(nn.Layer):
    """ComiRec's capsule routing (its ``CapsuleNetwork`` without the ReLU layer).

    ``bilinear="per_interest"`` (ComiRec's ``bilinear_type=2``, the paper's model): one D x D map
    per (history position, interest), L*K*D*D weights. ``"shared"`` (``bilinear_type=1``): one map
    per interest, shared by all positions, K*D*D weights. Both start from N(0, init_std), as
    ComiRec does (std 1): the maps' output scale is init_std x the item embeddings' scale, so a
    smaller item table (larger Xavier embeddings) wants a smaller init_std (the demo uses 0.1).
    """

    def __init__(self, dim, maxlen, max_k, iters, init_std=1.0, bilinear="per_interest"):
        super().__init__()
        if bilinear not in BILINEAR:
            raise ValueError(f"capsual.bilinear must be one of {BILINEAR}, got {bilinear!r}")
        if iters < 1:
            raise ValueError(f"capsual.iters must be >= 1, got {iters}")
        self.dim, self.maxlen, self.max_k, self.iters = dim, maxlen, max_k, iters
        self.per_position = bilinear == "per_interest"
        shape = [maxlen, dim, max_k * dim] if self.per_position else [dim, max_k * dim]
        self.bilinear = self.create_parameter(
            shape, default_initializer=nn.initializer.Normal(0.0, init_std))

    def low_capsules(self, item_emb):
        """[B, L, D] behaviours -> [B, K, L, D]: behaviour t seen by interest k."""
        if self.per_position:  # batched over positions: [L, B, D] x [L, D, K*D]
            low = paddle.matmul(paddle.transpose(item_emb, [1, 0, 2]), self.bilinear)
            low = paddle.reshape(low, [self.maxlen, -1, self.max_k, self.dim])
            return paddle.transpose(low, [1, 2, 0, 3])
        low = paddle.reshape(paddle.matmul(item_emb, self.bilinear),
                             [-1, self.maxlen, self.max_k, self.dim])
        return paddle.transpose(low, [0, 2, 1, 3])

    def forward(self, item_emb, seq_len):
        # item_emb [B, L, D], seq_len [B] or [B, 1]
        seq_len = paddle.reshape(seq_len, [-1, 1]).astype("int64")
        positions = paddle.arange(self.maxlen, dtype="int64").unsqueeze(0)
        mask = (positions < seq_len).astype(item_emb.dtype).unsqueeze(1)  # [B, 1, L]
        low = self.low_capsules(item_emb)  # [B, K, L, D]
        # As in MIND and ComiRec, the routing iterations before the last see detached
        # capsules: only the final weighted sum carries gradients into the maps and embeddings.
        low_fixed = low.detach()
        # Logits start at zero (a constant: no gradient), i.e. each behaviour split evenly.
        logits = paddle.zeros([1, self.max_k, 1], dtype=item_emb.dtype) + paddle.zeros_like(mask)
        for i in range(self.iters):
            weight = F.softmax(logits, axis=1) * mask  # over the interests; padding -> exactly 0
            if i < self.iters - 1:
                caps = squash(paddle.matmul(weight.unsqueeze(2), low_fixed))  # [B, K, 1, D]
                logits = logits + paddle.squeeze(
                    paddle.matmul(low_fixed, caps, transpose_y=True), axis=-1)  # [B, K, L]
            else:
                caps = squash(paddle.matmul(weight.unsqueeze(2), low))
        return paddle.squeeze(caps, axis=2), weight  # [B, K, D], [B, K, L]


class ComiRecDRLayer(MultiInterestLayer):
    """ComiRec-DR: dynamic routing extracts the interests; ``readout`` meets the target."""

    def __init__(self, item_count, embedding_dim=64, neg_samples=1280, maxlen=20,
                 capsual_iters=3, capsual_max_k=4, capsual_init_std=1.0,
                 bilinear="per_interest", readout_mode="hard"):
        super().__init__(item_count, embedding_dim, neg_samples)
        if readout_mode not in READOUT:
            raise ValueError(f"readout must be one of {READOUT}, got {readout_mode!r}")
        self.readout_mode = readout_mode
        self.routing = DynamicRouting(embedding_dim, maxlen, capsual_max_k, capsual_iters,
                                      capsual_init_std, bilinear)

    def extract(self, hist_emb, seq_len):
        return self.routing(hist_emb, seq_len)

    def readout(self, interests, target_emb):
        return select_interest(interests, target_emb, self.readout_mode)
