#!/usr/bin/env bash
# The device check of bench/gpu.md that fits a lent one-GPU machine's few minutes: the planner against a real
# step's device memory (bench/gpu_memory.py), whose dropout and activation-offload rows a CPU cannot measure.
#
#   here:    bash bench/gpu_wheels.sh            # the packages the machine lacks, into .whl/
#   device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Its files come back from $OUT: gpu.txt (the GPU and versions), gpu_memory.json and gpu_memory.log; the figures
# go into bench/README.md. Without $OUT (a GPU machine of your own) they go to /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: the carried wheels did not install" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, deepspeed; print(sys.version.split()[0], torch.__version__,
        transformers.__version__, deepspeed.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"
timeout 420 python3 bench/gpu_memory.py --out "$out/gpu_memory.json" 2>&1 | tee "$out/gpu_memory.log"
