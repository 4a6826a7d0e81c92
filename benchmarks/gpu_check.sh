#!/usr/bin/env bash
# One prepared GPU check of halp's extraction at full Qwen2.5-VL-7B shapes (random weights, bf16, no download).
#   bash benchmarks/gpu_check.sh              one CUDA card (H200): under 8 minutes; prints every figure
#   bash benchmarks/gpu_check.sh --reduced    CPU, tiny model: checks the script (tests/test_gpu_check.py runs it)
# Extra arguments go to benchmarks/gpu_check.py (--json PATH, --peak-tflops N, --workers N); PYTHON=... picks the
# interpreter (default: python on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --reduced "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 900 "${PYTHON:-python}" "$here/gpu_check.py" "$@"
