"""Glue between ComiRec-DR and a PaddleRec-style runner (ours, or PaddleRec's tools/trainer.py):
the shared interface (multi_interest.DygraphModelBase) plus how ComiRec-DR's network is built."""

import multi_interest
import net


class DygraphModel(multi_interest.DygraphModelBase):
    """The PaddleRec model-zoo interface for ComiRec-DR."""

    def create_model(self, config):
        item_count, embedding_dim = multi_interest.check_sizes(config)
        return self.configure(net.ComiRecDRLayer(
            item_count,
            embedding_dim,
            config.get("hyper_parameters.neg_samples", 1280),
            config.get("hyper_parameters.maxlen", 20),
            config.get("hyper_parameters.capsual.iters", 3),
            config.get("hyper_parameters.capsual.max_k", 4),
            config.get("hyper_parameters.capsual.init_std", 1.0),
            config.get("hyper_parameters.capsual.bilinear", "per_interest"),
            config.get("hyper_parameters.readout", "hard"),
        ), config)
