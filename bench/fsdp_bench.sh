#!/usr/bin/env bash
# Issue 14 on two GPUs, one call: the one-GPU rows (numerics checks first), then the same settings under torchrun
# on two GPUs with train.distributed ddp and fsdp side by side (Mixtral-8x7B, 32 layers, LoRA r=64 on attention
# + all experts, 1024-token rows); then Mixtral-8x22B, 56 layers, random NF4 weights built on the GPUs, under fsdp.
# Each part prints its table and a JSON line; logs go to OUTDIR.
#
#   bash bench/fsdp_bench.sh OUTDIR          (on nvidia-h200-x2; PYTHONPATH with src and bitsandbytes)
set -uo pipefail
OUT=${1:?OUTDIR}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0
S=${S32:-"mb=8,ckpt=32;mb=8,ckpt=0"}
D=${D32:-"mb=8,ckpt=32,dist=ddp;mb=8,ckpt=32,dist=fsdp;mb=8,ckpt=0,dist=ddp;mb=8,ckpt=0,dist=fsdp;mb=8,ckpt=0,dist=fsdp,prec=fp8"}
X=${X56:-"mb=4,ckpt=56,dist=fsdp;mb=8,ckpt=56,dist=fsdp"}
[ -n "${SKIP_ONE:-}" ] || python3 -m mixtune bench --layers 32 --steps 3 --warmup 1 --settings "$S" \
  > "$OUT/one-gpu-32L.log" 2>&1; grep -v "^{" "$OUT/one-gpu-32L.log" | tail -6
[ -n "${SKIP_TWO:-}" ] || torchrun --standalone --nproc_per_node 2 -m mixtune bench --no-check --layers 32 --steps 3 \
  --warmup 1 --settings "$D" > "$OUT/two-gpu-32L.log" 2>&1; grep -v "^{" "$OUT/two-gpu-32L.log" | tail -9
[ -n "${SKIP_X:-}" ] || torchrun --standalone --nproc_per_node 2 -m mixtune bench --no-check --geometry mixtral-8x22b \
  --layers 56 --steps 2 --warmup 1 --settings "$X" > "$OUT/two-gpu-8x22b.log" 2>&1
grep -v "^{" "$OUT/two-gpu-8x22b.log" | tail -5
grep -h -B2 -A10 "Traceback" "$OUT"/*.log | head -60
free -g | head -2
