"""GPU check: FP8 experts at odd LoRA ranks (operands padded to 16 bytes) run natively and stay within FP8 noise.
python bench/fp8_odd_rank_check.py -> one line per rank and a final JSON line."""
import json

import torch

from mixtune.bench import FP8_MOE_MAX_ERR, check_moe
from mixtune.kernels import fp8

out = {}
for r in (4, 12, 64):
    res = check_moe("cuda", 8, 4096, 14336, 2048, 2, r, backends=("grouped+fp8", "grouped_lowmem+fp8"))
    worst = max(max(v.values()) for k, v in res.items() if k.endswith("+fp8"))
    out[r] = {"worst_fp8_rel": worst, "bf16_reference_rel": max(res["reference_bf16"].values())}
    print(f"r={r}: worst fp8 rel {worst:.3e}, bf16 reference {out[r]['bf16_reference_rel']:.3e}", flush=True)
out["fallbacks"] = dict(fp8.FALLBACKS)
out["ok"] = out["fallbacks"]["scaled_grouped_mm"] == 0 and all(
    out[r]["worst_fp8_rel"] < FP8_MOE_MAX_ERR for r in (4, 12, 64))
print(json.dumps(out))
