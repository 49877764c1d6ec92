"""Train a model directory: ``python -u trainer.py -m mind/config.yaml [-o key=value ...]``."""

import sys

from paddlerec_milvus.cli import trainer_main

if __name__ == "__main__":
    sys.exit(trainer_main())
