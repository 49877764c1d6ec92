"""Entry point of the Paddle Serving recall pipeline (the Ops live in paddlerec_milvus.serving_pipeline).

    python serving/web_service.py [-c serving/config.yml]

Same as ``paddlerec-milvus serve -c serving/config.yml``: runs in the foreground, Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from paddlerec_milvus import paddle_serving_compat  # noqa: E402,F401 - first: protobuf setting
from paddlerec_milvus.cli import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Paddle Serving recall pipeline (RPC + HTTP)")
    parser.add_argument("-c", "--config", default=os.path.join(HERE, "config.yml"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    sys.exit(main(["-v"] * args.verbose + ["serve", "-c", args.config]))
