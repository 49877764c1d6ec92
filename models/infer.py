"""Evaluate checkpoints with Milvus recall: ``python -u infer.py -m mind/config.yaml -top_n 50``."""

import sys

from paddlerec_milvus.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main())
