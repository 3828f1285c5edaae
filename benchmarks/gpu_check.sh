#!/usr/bin/env bash
# The first run on a GPU (one GPU, no internet): a random InternLM2-7B-width model, 4 layers, vocabulary 92,544;
# a training micro-batch of 8 × 1,024 tokens in bf16, plain and FSDP2 (1 process): tokens/s, model TFLOP/s, MFU,
# peak allocated/reserved memory, the host-sync check, the GPU's log-probs against fp32 on the CPU; then fast vs
# plain log-probs, a plain and a 1-process FSDP2 run with resume (they must agree), precompute_ref, eval.py
# (benchmarks/gpu_check.py says what and why; --cpu runs everything that does not need CUDA).
#   bash benchmarks/gpu_check.sh          # on the GPU; the output is also written to gpu_check.txt in docs/
#   bash benchmarks/gpu_check.sh --cpu    # the same logic, tiny, on CPU processes (tests/test_scale.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--cpu" ]]; then
  exec python benchmarks/gpu_check.py --cpu "${@:2}"
fi
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  python benchmarks/gpu_check.py "$@"
} 2>&1 | tee "docs"/gpu_check.txt
