"""NF4 dequantization kernel configurations on this GPU: bf16 output, e4m3 output (row-major) and e4m3 transposed,
for one layer's w1|w3 of the Mixtral-8x7B geometry (8 x 28672 x 4096). Checks each output against the PyTorch
path first, then times every configuration; prints a table and a final JSON line with the best of each.

    PYTHONPATH=src:.whl/site python3 bench/dequant_sweep.py"""
import json

import torch

from mixtune.bench import cuda_ms
from mixtune.kernels import dequant, fp8
from mixtune.kernels.dequant import dequantize_nf4_stack
from mixtune.model.nf4 import NF4Weight


def timed(fn):
    return cuda_ms(fn, reps=20)


g = torch.Generator(device="cuda").manual_seed(0)
E, I, H = 8, 14336, 4096
ws = [NF4Weight.quantize(torch.randn(E, I, H, generator=g, device="cuda").to(torch.bfloat16) * 0.02) for _ in range(2)]
inv = fp8.pow2_scale(torch.stack([fp8.expert_amax(w) for w in ws]).amax(0))[1]
out = {"ok": True}
ref = {tr: dequantize_nf4_stack(ws, fp8.F8, inv=inv, transpose=tr, triton=False).float() for tr in (False, True)}
ref16 = dequantize_nf4_stack(ws, torch.bfloat16, triton=False)
gb = E * 2 * I * H / 1e9  # weights; bytes moved = 0.5 (codes) + 1/64 (absmax) + 1 or 2 (output) per weight
rows = []
for R in (16, 32, 64, 128, 256):
    for nw in (1, 2, 4, 8):
        dequant.CONFIG.update(R=R, num_warps=nw, R8=R, num_warps8=nw)
        ok16 = torch.equal(dequantize_nf4_stack(ws, torch.bfloat16), ref16)
        ok8 = torch.equal(dequantize_nf4_stack(ws, fp8.F8, inv=inv).float(), ref[False])
        out["ok"] &= ok8  # bf16 may differ by one bf16 step where the GPU contracts scale*absmax2+offset to an FMA
        t16 = timed(lambda: dequantize_nf4_stack(ws, torch.bfloat16))
        t8 = timed(lambda: dequantize_nf4_stack(ws, fp8.F8, inv=inv))
        rows.append(dict(kind="row", R=R, nw=nw, bf16_ms=t16, e4m3_ms=t8, bf16_TBps=gb * 2.516 / t16,
                         e4m3_TBps=gb * 1.516 / t8, bf16_equal=ok16, e4m3_equal=ok8))
        print(rows[-1], flush=True)
for TO in (16, 32, 64, 128):
    for nw in (1, 2, 4, 8):
        dequant.CONFIG.update(TO=TO, num_warps_t=nw)
        ok = torch.equal(dequantize_nf4_stack(ws, fp8.F8, inv=inv, transpose=True).float(), ref[True])
        out["ok"] &= ok
        t = timed(lambda: dequantize_nf4_stack(ws, fp8.F8, inv=inv, transpose=True))
        rows.append(dict(kind="transposed", TO=TO, nw=nw, e4m3_ms=t, e4m3_TBps=gb * 1.516 / t, e4m3_equal=ok))
        print(rows[-1], flush=True)
rr = [r for r in rows if r["kind"] == "row"]
out["best_bf16"] = min(rr, key=lambda r: r["bf16_ms"])
out["best_e4m3"] = min(rr, key=lambda r: r["e4m3_ms"])
out["best_transposed"] = min((r for r in rows if r["kind"] == "transposed"), key=lambda r: r["e4m3_ms"])
out["default"] = {k: [r for r in rows if r["kind"] == k and r.get("R", r.get("TO")) == 64 and r["nw"] == 4][0]
                  for k in ("row", "transposed")}
print(json.dumps(out))
