#!/usr/bin/env bash
# End-to-end check of the whole product on a CUDA GPU (no Hub): the tiny default, then the recommended
# Mixtral-8x7B QLoRA preset on a random checkpoint of the REAL geometry (2 layers, written in the real
# safetensors layout): load + NF4 quantize, train with evaluation and checkpoints, merge, generate.
#
#   bash bench/gpu_e2e.sh OUTDIR [TINY_CKPT_DIR] [TOKENIZER_DIR]
#
# TOKENIZER_DIR holds `mixtune.data.load_tokenizer("").save_pretrained(...)` output (for machines without
# mistral-common). GEOM=small shrinks the "real geometry" model for a CPU dry run of this script.
set -euo pipefail
OUT=${1:?OUTDIR}; TINY=${2:-}; TOK=${3:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
M=python3; command -v mixtune >/dev/null && M="" || true
run() { if [ -n "$M" ]; then python3 -m mixtune "$@"; else mixtune "$@"; fi; }

echo "== 1. tiny default on $(python3 -c 'import torch;print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
TINY_ARGS=(); [ -n "$TINY" ] && TINY_ARGS=(--model.name_or_path "$TINY")
run train "${TINY_ARGS[@]}" --output_dir "$OUT/tiny" --train.merge_after true --train.progress false 2>&1 | tee "$OUT/tiny.log"
run generate --adapter "$OUT/tiny/adapter" --prompt "Why is the sky blue?" --greedy --max-new-tokens 16 --json | tee "$OUT/tiny-gen.jsonl"
run generate --model "$OUT/tiny/merged" --prompt "Why is the sky blue?" --greedy --max-new-tokens 16 --json | tee "$OUT/tiny-gen-merged.jsonl"

echo "== 2. Mixtral-8x7B geometry, 2 layers, random weights in the real layout"
python3 - "$OUT/m2" "${GEOM:-full}" <<'PY'
import sys, time, torch
from mixtune.model.config import MixtralConfig
from mixtune.model.tiny import make_tiny_checkpoint
small = sys.argv[2] == "small"
cfg = MixtralConfig(num_hidden_layers=2, **(dict(hidden_size=256, intermediate_size=512) if small else {}))
t = time.time(); torch.set_num_threads(max(1, torch.get_num_threads()))
make_tiny_checkpoint(sys.argv[1], cfg, seed=0, shards=3, tokenizer=False)
print(f"checkpoint written in {time.time() - t:.1f} s")
PY
if [ -n "$TOK" ]; then cp "$TOK"/* "$OUT/m2/"; else python3 -c "from mixtune.data import load_tokenizer; load_tokenizer('').save_pretrained('$OUT/m2')"; fi
COMMON=(configs/mixtral-8x7b-qlora.yaml --model.name_or_path "$OUT/m2" --data.source bundled --data.eval_split ""
        --data.eval_max_rows 64 --train.per_device_train_batch_size 8 --train.gradient_accumulation_steps 2
        --train.eval_steps 4 --train.save_steps 4 --train.logging_steps 1 --train.generate_after 1
        --generate.max_new_tokens 24 --train.progress false --output_dir "$OUT/r2")
run train "${COMMON[@]}" --train.max_steps 8 --train.merge_after true 2>&1 | tee "$OUT/r2.log"
run generate --adapter "$OUT/r2/adapter" --prompt "Explain photosynthesis." --greedy --max-new-tokens 8 --json | tee "$OUT/r2-gen.jsonl"
cp "$OUT/tiny/metrics.jsonl" "$OUT/tiny-metrics.jsonl"; cp "$OUT/r2/metrics.jsonl" "$OUT/r2-metrics.jsonl"; cp "$OUT/r2/report.md" "$OUT/r2-report.md"
ls -la "$OUT/r2" "$OUT/r2/merged" | tee "$OUT/r2-files.txt"
echo "== done"
