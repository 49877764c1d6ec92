"""Where Paddle runs: the GPU when asked for and usable, else the CPU with one clear warning."""

from __future__ import annotations

import logging
from typing import Any

import paddle

logger = logging.getLogger(__name__)


def set_device(config: dict[str, Any]) -> str:
    """``gpu`` when ``runner.use_gpu`` asks and a GPU is usable, else ``cpu``."""
    if config.get("runner.use_gpu", False):
        if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
            paddle.set_device("gpu")
            return "gpu"
        logger.warning("runner.use_gpu is True but this Paddle has no usable GPU "
                       "(install paddlepaddle-gpu on a CUDA machine); running on CPU")
    paddle.set_device("cpu")
    return "cpu"
