#!/usr/bin/env bash
# Stage 02 on a GPU machine (the device tool), CPU baseline on the same machine in the same run:
# bench_devices for TopK and BatchTopK; then bench_gpu_scale (stage 02 at the demo's and Bielik's
# shape against the measured bf16 peak, and training on the fly on a random model of Bielik's shape
# against its bare forward). Copies each result to $OUT when set (the device tool brings $OUT back),
# named after the GPU.
#
#     bash bench/gpu.sh
set -euo pipefail
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($NF)}')
nvidia-smi -L
for architecture in topk batchtopk; do
    python bench/bench_devices.py --tokens=500000 --EPOCHS=3 --ARCHITECTURE=$architecture
    suffix=$([ "$architecture" = topk ] && echo "" || echo "_$architecture")
    cp bench/results/devices.json "${OUT:-bench/results}/devices${suffix}_${gpu}.json"
done
python bench/bench_gpu_scale.py
cp bench/results/gpu_scale.json "${OUT:-bench/results}/gpu_scale_${gpu}.json"
