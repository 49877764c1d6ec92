"""Glue between MIND and a PaddleRec-style runner (ours, or PaddleRec's tools/trainer.py):
the shared interface (multi_interest.DygraphModelBase) plus how MIND's network is built."""

import multi_interest
import net


class DygraphModel(multi_interest.DygraphModelBase):
    """The PaddleRec model-zoo interface for MIND."""

    def create_model(self, config):
        item_count, embedding_dim = multi_interest.check_sizes(config)
        return self.configure(net.MindLayer(
            item_count,
            embedding_dim,
            embedding_dim,  # hidden_size: equal to embedding_dim (check_sizes)
            config.get("hyper_parameters.neg_samples", 1280),
            config.get("hyper_parameters.maxlen", 20),
            config.get("hyper_parameters.pow_p", 1.0),
            config.get("hyper_parameters.capsual.iters", 3),
            config.get("hyper_parameters.capsual.max_k", 4),
            config.get("hyper_parameters.capsual.init_std", 1.0),
            config.get("hyper_parameters.capsual.softmax_axis", "behaviours"),
            config.get("hyper_parameters.capsual.normalize_update", True),
            config.get("hyper_parameters.capsual.dynamic_k", False),
            config.get("hyper_parameters.capsual.relu_layers", 0),
        ), config)
