"""ASGI entry point: ``uvicorn serving.main:app`` from the repository root.

Settings come from ``PADDLEREC_MILVUS_*`` environment variables (see
``paddlerec_milvus.rest_api.ApiSettings``); by default the model exported to ``output/export``,
the Milvus collection named in its manifest, and the demo book titles.
"""

import logging
import sys

from paddlerec_milvus.errors import PaddleRecMilvusError
from paddlerec_milvus.rest_api import create_app

if not logging.getLogger().handlers:  # uvicorn configures only its own loggers
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

try:
    app = create_app()
except PaddleRecMilvusError as exc:
    logging.getLogger("serving.main").error("cannot start the REST API: %s", exc)
    sys.exit(2)
