"""Glue between ComiRec-SA and a PaddleRec-style runner (ours, or PaddleRec's tools/trainer.py)."""

import multi_interest
import net
import numpy as np
import paddle


def _check_sizes(config):
    """item_count and embedding_dim, checked before building a model on them."""
    item_count = config.get("hyper_parameters.item_count", None)
    if not isinstance(item_count, int) or item_count < 2:
        raise ValueError(
            "hyper_parameters.item_count must be an integer >= 2 (largest item id + 1), "
            f"got {item_count!r}"
        )
    embedding_dim = config.get("hyper_parameters.embedding_dim", 64)
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise ValueError(f"hyper_parameters.embedding_dim must be a positive integer, got {embedding_dim!r}")
    hidden_size = config.get("hyper_parameters.hidden_size", embedding_dim)
    if hidden_size != embedding_dim:
        raise ValueError(
            "hyper_parameters.hidden_size must equal embedding_dim: interests are searched "
            f"against item embeddings (got {hidden_size} vs {embedding_dim})"
        )
    return item_count, embedding_dim


class DygraphModel:
    """The PaddleRec model-zoo interface for ComiRec-SA."""

    def create_model(self, config):
        item_count, embedding_dim = _check_sizes(config)
        return net.ComiRecSALayer(
            item_count,
            embedding_dim,
            config.get("hyper_parameters.neg_samples", 1280),
            config.get("hyper_parameters.maxlen", 20),
            config.get("hyper_parameters.capsual.max_k", 4),
            config.get("hyper_parameters.self_attention.hidden_size", 4 * embedding_dim),
            config.get("hyper_parameters.self_attention.add_positions", True),
            config.get("hyper_parameters.readout", "hard"),
        )

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
        return paddle.optimizer.Adam(
            learning_rate=lr, parameters=dy_model.parameters(), lazy_mode=lazy
        )

    # The two towers: the only parts of a model that evaluation, validation, export and serving use
    # (docs/design.md, "Model hooks").
    def item_vectors(self, dy_model):
        """The item tower: float32 [item_count, D], row i for dense item id i (row 0 = padding)."""
        return dy_model.item_emb.weight.numpy()

    def user_tower(self, dy_model):
        """The user tower: a Layer mapping (hist_item [B, L], seq_len [B]) int64 to [B, K, D]
        interests; evaluation runs it and export saves it with paddle.jit.save."""
        return multi_interest.UserTower(dy_model)

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
