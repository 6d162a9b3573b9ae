#!/usr/bin/env bash
# The accelerator check in one go, a few minutes: every path on the device against the CPU
# (outputs and outer gradients, float64), the wrapper's per-sample step against the hand-written
# one on the device, then the timing grid on the device and on the CPU, each as JSON with
# provenance under ${OUT:-runs}.
#     bash benchmarks/device_check.sh            # on a machine with CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/test_device.py
python benchmarks/field.py --device cuda --reps 9 --json "$out/field_cuda.json"
python benchmarks/field.py --device cpu --reps 5 --json "$out/field_cpu.json"
python benchmarks/tailoring.py --device cuda --no-memory --hidden 128,512 --batch 16,256 --k 1 --json "$out/tailoring_cuda.json"
