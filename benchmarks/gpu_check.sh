#!/usr/bin/env bash
# Every GPU figure of the README in one command, for a GPU machine whose Python has torch but
# not this package's dependencies (such as a lent, offline one). Takes about 7 minutes on an H200
# (bench_train about 3, bench_quality about 4).
#
# Prepare on a machine with the internet, in the repository root (both folders are for git-excluded use):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl dictionary-learning nnsight pydantic pydantic_core \
#     annotated-types typing-inspection python-socketio python-engineio bidict simple-websocket wsproto \
#     websocket-client dill multiprocess datasets zstandard chardet defusedxml truststore
#   git --git-dir=<science-of-finetuning/dictionary_learning clone>/.git archive HEAD dictionary_learning | tar x -C .sof
# Then on the GPU machine, in the repository root:  bash benchmarks/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mneme-site .whl/*.whl \
    || { echo "could not install the wheels in .whl"; exit 1; }
  export PYTHONPATH=/tmp/mneme-site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fork=()
[ -d .sof/dictionary_learning ] && fork=(--fork .sof)
# Paper sizes: tokens/s, share of the bf16 matmul peak, dense reference, peak memory; the fork beside ours.
timeout 420 python3 benchmarks/bench_train.py --gpu --steps 10 "${fork[@]}" 2>&1 | tee "$out/bench_train_gpu.txt"
# Planted-feature recovery trained on the GPU (bf16 autocast), two seeds.
timeout 330 python3 benchmarks/bench_quality.py --device cuda --seeds 0 1 2>&1 | tee "$out/bench_quality_cuda.txt"
