#!/usr/bin/env bash
# FSDP on two GPUs, the real product end to end (issue 14): a 2-layer Mixtral-8x7B-geometry random checkpoint in
# the real safetensors layout; the same 8 optimizer steps on one GPU (micro-batch 4 x 2 accumulation) and under
# torchrun on two GPUs with train.distributed fsdp (micro-batch 4 x 1 per rank = the same 8 rows a step);
# losses side by side; then merge and generate from the FSDP run's adapter.
#
#   bash bench/fsdp_gpu_e2e.sh OUTDIR TOKENIZER_DIR
set -uo pipefail
OUT=${1:?OUTDIR}; TOK=${2:?TOKENIZER_DIR}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 - "$OUT/m2" <<'PY'
import sys, time
from mixtune.model.config import MixtralConfig
from mixtune.model.tiny import make_tiny_checkpoint
t = time.time()
make_tiny_checkpoint(sys.argv[1], MixtralConfig(num_hidden_layers=2), seed=0, shards=3, tokenizer=False)
print(f"checkpoint written in {time.time() - t:.1f} s", flush=True)
PY
cp "$TOK"/* "$OUT/m2/"
COMMON=(configs/mixtral-8x7b-qlora.yaml --model.name_or_path "$OUT/m2" --data.source bundled --data.eval_split ""
        --data.eval_max_rows 32 --train.max_steps 8 --train.eval_steps 0 --train.save_steps 4 --train.logging_steps 1
        --train.generate_after 0 --train.progress false --train.report_to "" --train.per_device_train_batch_size 4
        --train.distributed fsdp)
[ -n "${SKIP_ONE:-}" ] || { python3 -m mixtune train "${COMMON[@]}" --train.gradient_accumulation_steps 2 \
  --output_dir "$OUT/one" > "$OUT/one.log" 2>&1; tail -12 "$OUT/one.log"; }
NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 -m mixtune train "${COMMON[@]}" \
  --train.gradient_accumulation_steps 1 --output_dir "$OUT/fsdp" > "$OUT/fsdp.log" 2>&1
grep -m3 -B3 -A12 "Traceback\|mixtune: error" "$OUT/fsdp.log"; grep -v "^\s*$" "$OUT/fsdp.log" | tail -12
python3 - "$OUT" <<'PY'
import json, sys
rows = {n: [json.loads(l) for l in open(f"{sys.argv[1]}/{n}/metrics.jsonl") if '"train"' in l] for n in ("one", "fsdp")}
print(f"{'step':>4} {'1 GPU loss':>11} {'2 GPU fsdp':>11} {'diff':>9} {'tok/s 1':>9} {'tok/s 2':>9}")
for a, b in zip(rows["one"], rows["fsdp"]):
    print(f"{a['step']:>4} {a['loss']:>11.5f} {b['loss']:>11.5f} {b['loss'] - a['loss']:>9.2e} {a['tokens_per_s']:>9.0f} {b['tokens_per_s']:>9.0f}")
print(json.dumps({"max_abs_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(rows["one"], rows["fsdp"]))}))
PY
python3 -m mixtune merge configs/mixtral-8x7b-qlora.yaml --model.name_or_path "$OUT/m2" --adapter "$OUT/fsdp/adapter" --out "$OUT/merged" 2>&1 | tail -3
python3 -m mixtune generate configs/mixtral-8x7b-qlora.yaml --model.name_or_path "$OUT/m2" --adapter "$OUT/fsdp/adapter" --prompt "Explain photosynthesis." --greedy --max-new-tokens 8 --json 2>&1 | tail -2
rm -rf "$OUT/m2" "$OUT/merged" "$OUT/one" "$OUT/fsdp"
