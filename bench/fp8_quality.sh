#!/usr/bin/env bash
# Training-quality check of model.expert_precision fp8 against bf16, through the product itself on a GPU:
# `mixtune train` on a random checkpoint of the REAL Mixtral-8x7B geometry (2 layers, real safetensors layout),
# the bundled instruct data, identical seeds; only the expert precision differs (a third run, bf16 with
# another seed, gives the run-to-run scale). Evaluation always runs the experts in bf16, so eval losses compare.
#
#   bash bench/fp8_quality.sh OUTDIR [TOKENIZER_DIR] [STEPS]
#
# Prints the train/eval loss curves side by side and a final JSON line. GEOM=small: a CPU dry run.
set -euo pipefail
OUT=${1:?OUTDIR}; TOK=${2:-}; STEPS=${3:-60}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 - "$OUT/m2" "${GEOM:-full}" <<'PY'
import sys, time
from mixtune.model.config import MixtralConfig
from mixtune.model.tiny import make_tiny_checkpoint
small = sys.argv[2] == "small"
cfg = MixtralConfig(num_hidden_layers=2, **(dict(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                                 num_key_value_heads=2) if small else {}))
t = time.time()
make_tiny_checkpoint(sys.argv[1], cfg, seed=0, shards=3, tokenizer=False)
print(f"checkpoint written in {time.time() - t:.1f} s")
PY
if [ -n "$TOK" ]; then cp "$TOK"/* "$OUT/m2/"; else python3 -c "from mixtune.data import load_tokenizer; load_tokenizer('').save_pretrained('$OUT/m2')"; fi
COMMON=(configs/mixtral-8x7b-qlora.yaml --model.name_or_path "$OUT/m2" --data.source bundled --data.eval_split ""
        --data.eval_max_rows 64 --train.per_device_train_batch_size 8 --train.gradient_accumulation_steps 2
        --train.max_steps "$STEPS" --train.learning_rate 5e-4 --train.eval_steps $((STEPS / 4))
        --train.save_steps 100000 --train.logging_steps 1 --train.generate_after 0 --train.progress false
        --model.gradient_checkpointing false)
for run in "bf16 42" "fp8 42" "bf16 43"; do
  set -- $run
  python3 -m mixtune train "${COMMON[@]}" --model.expert_precision "$1" --train.seed "$2" \
    --output_dir "$OUT/$1-s$2" 2>&1 | tee "$OUT/$1-s$2.log" | grep -E "mixtune: done|eval|Error" || true
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
runs = {}
for name in ("bf16-s42", "fp8-s42", "bf16-s43"):
    recs = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    runs[name] = {"train": {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"},
                  "eval": {r["step"]: r["eval_loss"] for r in recs if r.get("kind") == "eval"}}
steps = sorted(runs["bf16-s42"]["train"])
print(f"{'step':>5} {'bf16 s42':>9} {'fp8 s42':>9} {'fp8-bf16':>9} {'bf16 s43':>9} {'s43-s42':>9}")
for s in steps:
    a, b, c = (runs[n]["train"].get(s, float("nan")) for n in ("bf16-s42", "fp8-s42", "bf16-s43"))
    if s % 5 == 0 or s == 1:
        print(f"{s:>5} {a:>9.4f} {b:>9.4f} {b - a:>+9.4f} {c:>9.4f} {c - a:>+9.4f}")
def mean_abs(x, y, lo):
    d = [abs(runs[x]["train"][s] - runs[y]["train"][s]) for s in steps if s > lo]
    return sum(d) / len(d)
half = steps[len(steps) // 2]
res = {"eval": {n: runs[n]["eval"] for n in runs},
       "train_mean_abs_diff_2nd_half": {"fp8_vs_bf16": mean_abs("fp8-s42", "bf16-s42", half),
                                       "seed43_vs_seed42": mean_abs("bf16-s43", "bf16-s42", half)}}
print("eval (bf16 experts):", json.dumps(res["eval"]))
print(json.dumps(res))
PY
