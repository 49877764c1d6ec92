"""ComiRec-SA: the self-attentive multi-interest extractor of ComiRec (Cen et al., KDD 2020,
"Controllable Multi-Interest Framework for Recommendation"), the network only.

Shapes: B users, L = maxlen history slots, K = max_k interests, D = embedding_dim.
History rows are left-aligned and zero-padded; ``seq_len`` says how many slots are real,
and padded slots never influence the interests (their attention weight is exactly 0).

Each of the K attention heads is a softmax over the history positions of
``W2 tanh(W1 (E + P))``; interest k is head k's mix of the item embeddings E (without the
position embeddings P, so interests live in the item space Milvus searches). Training reads
out the single interest closest to the target (ComiRec's hard readout).
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from multi_interest import MultiInterestLayer, select_interest

READOUT = ("hard", "soft")


class SelfAttention(nn.Layer):
    """K-head additive self-attention over the history (ComiRec's ``Model_ComiRec_SA``).

    W1 (D -> hidden_size, tanh) and W2 (hidden_size -> K) have biases, as ComiRec's dense
    layers do; ComiRec uses hidden_size = 4 D.
    """

    def __init__(self, dim, maxlen, max_k, hidden_size=None, add_positions=True):
        super().__init__()
        self.maxlen = maxlen
        self.w1 = nn.Linear(dim, hidden_size or 4 * dim)
        self.w2 = nn.Linear(hidden_size or 4 * dim, max_k)
        self.position = None
        if add_positions:
            # The item embeddings' scale (Xavier over the item table is ~0.05 per entry on the
            # demo): larger positions would drown the items in the attention's input at first.
            self.position = self.create_parameter(
                [maxlen, dim], default_initializer=nn.initializer.Normal(0.0, 0.02))

    def forward(self, item_emb, seq_len):
        # item_emb [B, L, D], seq_len [B] or [B, 1]
        seq_len = paddle.reshape(seq_len, [-1, 1]).astype("int64")
        positions = paddle.arange(self.maxlen, dtype="int64").unsqueeze(0)
        mask = (positions < seq_len).astype(item_emb.dtype).unsqueeze(1)  # [B, 1, L]
        x = item_emb if self.position is None else item_emb + self.position.unsqueeze(0)
        score = paddle.transpose(self.w2(paddle.tanh(self.w1(x))), [0, 2, 1])  # [B, K, L]
        # Softmax over the real positions only; the final product makes padding exactly 0.
        weight = F.softmax(score + (mask - 1.0) * 1e9, axis=-1) * mask
        return paddle.matmul(weight, item_emb), weight  # [B, K, D], [B, K, L]


class ComiRecSALayer(MultiInterestLayer):
    """ComiRec-SA: self-attention extracts the interests; ``readout`` meets the target."""

    def __init__(self, item_count, embedding_dim=64, neg_samples=1280, maxlen=20, capsual_max_k=4,
                 attention_hidden_size=None, add_positions=True, readout_mode="hard"):
        super().__init__(item_count, embedding_dim, neg_samples)
        if readout_mode not in READOUT:
            raise ValueError(f"readout must be one of {READOUT}, got {readout_mode!r}")
        self.readout_mode = readout_mode
        self.attention = SelfAttention(embedding_dim, maxlen, capsual_max_k, attention_hidden_size,
                                       add_positions)

    def extract(self, hist_emb, seq_len):
        return self.attention(hist_emb, seq_len)

    def readout(self, interests, target_emb):
        return select_interest(interests, target_emb, self.readout_mode)
