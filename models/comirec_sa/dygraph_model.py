"""Glue between ComiRec-SA and a PaddleRec-style runner (ours, or PaddleRec's tools/trainer.py):
the shared interface (multi_interest.DygraphModelBase) plus how ComiRec-SA's network is built."""

import multi_interest
import net


class DygraphModel(multi_interest.DygraphModelBase):
    """The PaddleRec model-zoo interface for ComiRec-SA."""

    def create_model(self, config):
        item_count, embedding_dim = multi_interest.check_sizes(config)
        return self.configure(net.ComiRecSALayer(
            item_count,
            embedding_dim,
            config.get("hyper_parameters.neg_samples", 1280),
            config.get("hyper_parameters.maxlen", 20),
            config.get("hyper_parameters.capsual.max_k", 4),
            config.get("hyper_parameters.self_attention.hidden_size", 4 * embedding_dim),
            config.get("hyper_parameters.self_attention.add_positions", True),
            config.get("hyper_parameters.readout", "hard"),
        ), config)
