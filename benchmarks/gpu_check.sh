#!/usr/bin/env bash
# hessdiag on one CUDA GPU: Hessian-vector products per second of each mode, looped
# against batched blocks, compiled forward-over-reverse, peak memory, and the top-5 time
# against PyHessian's, for ResNet-18 (batch 64) and a small ViT, printed as one table.
#
#   bash benchmarks/gpu_check.sh                       # one CUDA GPU, under 8 minutes
#   bash benchmarks/gpu_check.sh --device cpu --tiny   # small sizes on a CPU, under a minute
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --out gpu_check.json
#
# Options are those of benchmarks/gpu_check.py (--help). The Python is ${PYTHON:-python}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
