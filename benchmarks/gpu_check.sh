#!/usr/bin/env bash
# The GPU check in one go (a few minutes on a fresh machine with a CUDA GPU, installs included):
# correctness of the CUDA path against float64 on the CPU, then the norm and training-step
# benchmarks on the GPU. Results land in benchmarks/results/*cuda*.json (commit them).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q -e '.[test]'
fi
PY=.venv/bin/python
$PY -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
$PY benchmarks/gpu_check.py --out benchmarks/results/gpu_check_cuda.json
$PY benchmarks/norm_speed.py --device cuda --repeats 30 --backends torch compiled triton \
    --out benchmarks/results/norm_speed_cuda.json
$PY benchmarks/train_throughput.py --device cuda --out benchmarks/results/train_throughput_cuda.json
