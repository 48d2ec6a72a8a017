#!/usr/bin/env bash
# micle_jax against PyTorch on one NVIDIA GPU, in one run of a few minutes.
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from anywhere in the repository
#
# ResNet-50 1x, 224 px, 256 pairs (512 views), bfloat16: micle_jax's trainer
# step (benchmarks/common.build_step) and the same SimCLR step in PyTorch
# (torchvision's ResNet-50, channels_last, bf16 autocast, torch.compile), one
# process after the other on the same GPU (benchmarks/compare_pytorch.py), then
# an 8192^3 bfloat16 matmul in JAX on that GPU as the reference. Prints both
# views/s, each side's FLOP rate as a fraction of the matmul's, and last
# `ratio micle_jax/pytorch: X.XX`. Figures go to docs/performance.md.
#
# Needs jax with CUDA, flax, optax, ml_collections and absl-py, and torch with
# torchvision (`pip install -e '.[bench]'`). Wheels of packages the machine
# lacks can wait in .whl/ of the repository: they are installed into
# /tmp/site first. Every setting can be overridden from the environment, e.g.
# a smoke run on a CPU:
#   DEVICE=cpu ARCH=r18x0.25 IMAGE_SIZE=32 BATCH=8 DTYPE=float32 MATMUL=256 \
#     TORCH_PYTHON=/path/to/torch/python benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_PYTHON=${TORCH_PYTHON:-$PYTHON}
DEVICE=${DEVICE:-gpu}
ARCH=${ARCH:-r50x1}
IMAGE_SIZE=${IMAGE_SIZE:-224}
BATCH=${BATCH:-256}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-20}
MATMUL=${MATMUL:-8192}
LIMIT=${LIMIT:-450}  # seconds: the whole comparison, under the 8 minutes it is meant for

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
for module in jax flax optax ml_collections absl; do
  if ! "$PYTHON" -c "import $module" 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import $module; install it (pip install -e .) or put its" \
      "wheel in .whl/" >&2
    exit 2
  fi
done
if ! "$TORCH_PYTHON" -c "import torch, importlib.util as u; assert u.find_spec('torchvision')" \
  2>/dev/null; then
  echo "gpu_check: $TORCH_PYTHON cannot import torch and torchvision;" \
    "pip install -e '.[bench]' or set TORCH_PYTHON" >&2
  exit 2
fi
if [ "$DEVICE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices('cuda'))"
fi

export PYTHONUNBUFFERED=1
timeout "$LIMIT" "$PYTHON" benchmarks/compare_pytorch.py \
  --device="$DEVICE" --arch="$ARCH" --image_size="$IMAGE_SIZE" --batch="$BATCH" \
  --dtype="$DTYPE" --channels_last --torch_compile --rounds=1 --steps="$STEPS" \
  --matmul_size="$MATMUL" --torch_python="$TORCH_PYTHON"
