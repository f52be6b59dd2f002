#!/usr/bin/env bash
# The GPU check of issue 14 (point 5), on a machine with a CUDA GPU, in well under 10 minutes:
#   1. the tests that need CUDA (tests/test_gpu.py: fit and predict stay on the GPU, the CPU's scores) and the
#      torch coreset's tests, on the GPU's torch (at most 4 minutes);
#   2. benchmarks/gpu_bench.py: CPU against CUDA, fit and predict side by side on textile (at most 5 minutes).
#
#   bash benchmarks/gpu_check.sh            # from anywhere; PYTHON=... to use another interpreter than .venv's
#
# Without a CUDA GPU it says so in one line on stderr and exits 2, having run nothing.
# Exit status: 0 all passed, 1 a test or the benchmark failed, 2 no GPU, 124 a step ran out of its time.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
    python="$(command -v python3 || echo python3)"
fi

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch here ($("$python" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1 | tail -n 1)): run it on a machine with one" >&2
    exit 2
fi

started=$SECONDS
"$python" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

echo "== CUDA tests"
status=0
timeout 240 "$python" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_coreset_torch.py || status=$?

echo "== CPU against CUDA (benchmarks/gpu_bench.py)"
bench=0
timeout 300 "$python" benchmarks/gpu_bench.py --train 100 --test 64 --rounds 2 || bench=$?
if [ "$status" -eq 0 ]; then
    status=$bench
fi

echo "gpu_check: done in $((SECONDS - started)) s, exit status $status"
exit "$status"
