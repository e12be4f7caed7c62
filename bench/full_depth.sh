#!/usr/bin/env bash
# Issue 13's rows on one H200, one call. Parts (default: all, in this order):
#   q4       Qwen3-30B-A3B at 4 layers, the numerics checks and kernel sweeps first; the gather-fused LoRA
#            products on and off (gmm=0), both NF4 decodings
#   mixtral  Mixtral-8x7B at 32 layers, the headline setting (micro-batch 16 x 3 accumulation steps, no
#            recomputation): bf16 experts as session 7 ran them (blocks, unfused), then words, fused and not;
#            FP8 experts with both decodings
#   qwen     Qwen3-30B-A3B at 48 layers: the fastest settings that fit the card, a profile of one step of the first
#   q24      Qwen3-30B-A3B at 48 layers within 24 GiB (separate and shared A at r=8)
#   prof     one Qwen3 MoE layer by op at r=8, separate and shared A (why the shared A is slower there)
#   mprof    one Mixtral-8x7B MoE layer by op at 16,384 tokens (micro-batch 16)
#
#   PYTHONPATH=src:.whl/site bash bench/full_depth.sh OUTDIR [q4] [mixtral] [qwen] [q24] [prof] [mprof]
set -uo pipefail
OUT=${1:?OUTDIR}; shift; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
parts=${*:-q4 mixtral qwen q24 prof mprof}
B="python3 -m mixtune bench"
Q="--geometry qwen3-30b-a3b"
for p in $parts; do
  case $p in
    q4) timeout 200 $B $Q --layers 4 --steps 6 --warmup 2 --settings \
          "mb=16,shared=1;mb=16,shared=1,gmm=0;mb=8,shared=1;mb=8,shared=1,gmm=0;mb=16,shared=1,nf4=blocks;mb=8,shared=1,nf4=blocks" \
          2>&1 | tee "$OUT/qwen3-4L.log" ;;
    mixtral) timeout 200 $B --no-check --layers 32 --steps 2 --warmup 1 --settings \
          "mb=16,accum=3,nf4=blocks,gmm=0;mb=16,accum=3,nf4=words;mb=16,accum=3,nf4=words,gmm=0;mb=16,accum=3,prec=fp8,nf4=blocks;mb=16,accum=3,prec=fp8,nf4=words" \
          2>&1 | tee "$OUT/mixtral-32L.log" ;;
    qwen) timeout 150 $B $Q --layers 48 --no-check --steps 3 --warmup 1 --profile "$OUT/prof-qwen3-48L.txt" \
          --settings "mb=24,shared=1,nf4=words;mb=24,shared=1,nf4=blocks,gmm=0;mb=16,shared=1,nf4=words" 2>&1 | tee "$OUT/qwen3-48L.log" ;;
    q24) timeout 120 $B $Q --layers 48 --no-check --steps 3 --warmup 1 \
          --settings "mb=16,ckpt=48,r=8,opt=adamw_8bit;mb=16,ckpt=48,r=8,opt=adamw_8bit,shared=1;mb=12,ckpt=48,r=8,opt=adamw_8bit" \
          2>&1 | tee "$OUT/qwen3-48L-24g.log" ;;
    prof) timeout 100 python3 bench/moe_layer_profile.py --geometry qwen3-30b-a3b --tokens 16384 --shared 0,1 --r 8 \
          --out "$OUT/moe-layer-r8.txt" 2>&1 | grep -v '^{' | head -60 ;;
    mprof) timeout 100 python3 bench/moe_layer_profile.py --geometry mixtral-8x7b --tokens 16384 --shared 0 \
          --out "$OUT/moe-layer-mixtral.txt" 2>&1 | grep -v '^{' | head -40 ;;
  esac
done
