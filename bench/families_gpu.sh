#!/usr/bin/env bash
# Every family's full-size geometry on the GPU (random NF4 weights built on the device): the numerics checks
# of `mixtune bench` (one MoE layer at the geometry's expert shapes, a 1-layer model's loss and LoRA gradients
# through the fast path vs the pure-PyTorch fp32 reference, FP8 and attention kernels) for each family, then
# Qwen3-30B-A3B training throughput at 4 layers (the issue-13 anchor workload: LoRA r=64 on q/k/v/o + experts,
# packed 1024-token rows, no recomputation, micro-batch 8 and 16).
#
#   bash bench/families_gpu.sh OUTDIR
set -uo pipefail
OUT=${1:?OUTDIR}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src:${PYTHONPATH:-}
for g in qwen3-30b-a3b olmoe-1b-7b qwen2-57b-a14b mixtral-8x22b; do
  echo "== checks: $g"
  timeout 240 python3 -m mixtune bench --geometry "$g" --settings "" 2>&1 | grep -v '^{' | tee "$OUT/check-$g.log"
done
echo "== qwen3-30b-a3b, 4 layers, throughput"
timeout 300 python3 -m mixtune bench --geometry qwen3-30b-a3b --no-check --layers 4 --steps 6 --warmup 2 \
  --settings "mb=8,ckpt=0,backend=grouped;mb=16,ckpt=0,backend=grouped" 2>&1 | tee "$OUT/qwen3-4L.log"
