#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA device and CuPy:
# the `gpu`-marked tests, then bench/bench_gpu.py. Results (test log,
# benchmark text and JSON, nvidia-smi) go to the directory given (default
# gpu-results/).
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]
#
# Runs from a source checkout without installing it: the packages come from
# core/, client/ and server/ on PYTHONPATH. Wheels of missing dependencies
# may be put in .whl/ beforehand; they are installed into a scratch target.
set -uo pipefail
results=${1:-gpu-results}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/distill-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/distill-site
fi
export PYTHONPATH="$PWD/core:$PWD/client:$PWD/server:$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$results/nvidia-smi.txt"
python3 -c "import cupy, grpc, google.protobuf as p; print('cupy', cupy.__version__, 'grpc', grpc.__version__, 'protobuf', p.__version__)"
# Newer NumPy or CuPy on the GPU machine may deprecate what the pinned CPU
# versions do not: those warnings are reported, not turned into failures.
timeout "${DISTILL_GPU_TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    -W "default::DeprecationWarning" -W "default::FutureWarning" ${DISTILL_GPU_TESTS:-tests} 2>&1 | tee "$results/pytest-gpu.txt" | tail -60
tests=${PIPESTATUS[0]}
timeout "${DISTILL_GPU_BENCH_TIMEOUT:-240}" python3 bench/bench_gpu.py --json "$results/bench-gpu.json" ${DISTILL_GPU_BENCH_ARGS:-} 2>&1 \
    | tee "$results/bench-gpu.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench"
exit $((tests || bench))
