"""On the GPU: the gather-fused thin LoRA products (kernels/gather_mm.py) and the unfused path, each against an
fp32 reference, at the ranks and operand kinds the MoE passes them (a shared A: rank r, the fp32 parameter; [A1; A3]:
rank 2r, bf16; B2 transposed: rank r, fp32, strided); then the MoE layer check with the fusion and the NF4 word
decoding each on and off, to tell which of them moves the layer's error.

    PYTHONPATH=src python3 bench/gather_check.py [--geometry qwen3-30b-a3b] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json

import torch

from mixtune.bench_checks import check_moe
from mixtune.bench_kernels import _rel as rel, _routing
from mixtune.kernels import dequant, gather_mm
from mixtune.kernels.moe import grouped_mm, grouped_mm_k
from mixtune.kernels.route import gather_rows
from mixtune.model.config import GEOMETRIES


def products(cfg, tokens, r, dev):
    E, H, k = cfg.num_local_experts, cfg.hidden_size, cfg.num_experts_per_tok
    torch.manual_seed(0)
    tok, offs = _routing(tokens, E, k, dev)
    M = tok.numel()
    x = torch.randn(tokens, H, device=dev, dtype=torch.bfloat16)
    xs32 = x[tok].float()
    bounds = [0] + offs.tolist()
    rows = {}
    kinds = {"shared A (r, fp32)": torch.randn(E, r, H, device=dev) * 0.02,
             "[A1;A3] (2r, bf16)": (torch.randn(E, 2 * r, H, device=dev) * 0.02).to(torch.bfloat16),
             "[A1;A3] (2r, fp32)": torch.randn(E, 2 * r, H, device=dev) * 0.02,
             "B2^T (r, fp32, strided)": (torch.randn(E, H, r, device=dev) * 0.02).transpose(1, 2)}
    variants = [(n, W, None, None) for n, W in kinds.items()]
    variants += [(f"[A1;A3] (2r, bf16) wt={wt} stages={st}", kinds["[A1;A3] (2r, bf16)"], wt, st)
                 for wt in (True, False) for st in (None, 1)]
    for name, W, wt, st in variants:
        saved = dict(gather_mm.CONFIG)
        if wt is not None:
            gather_mm.CONFIG.update(wt=wt, stages=st, cast_w=False)  # the raw kernel form
        R = W.shape[1]
        ref = torch.empty(M, R, device=dev)
        for e in range(E):
            a, b = bounds[e], bounds[e + 1]
            ref[a:b] = 0.25 * xs32[a:b] @ W[e].float().t()
        xa = torch.full((M, H + R), float("nan"), device=dev, dtype=torch.bfloat16)
        u = torch.full((M, R), float("nan"), device=dev, dtype=torch.bfloat16)
        fused = gather_mm.gather_lowrank(x, tok, offs, W, 0.25, xa[:, :H], [xa[:, H:], u])
        gather_mm.CONFIG.update(saved)
        got = u.clone()
        gather_eq = bool(torch.equal(xa[:, :H], x[tok]))
        copy_eq = bool(torch.equal(xa[:, H:], u))
        xs = gather_rows(x, tok)
        unf = grouped_mm(xs, W.to(torch.bfloat16).transpose(1, 2), offs) * 0.25
        # the worst rows: a tile mapped to the wrong expert shows as whole rows far off
        row_err = ((got.float() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12))
        rows[name] = {"fused_ran": fused, "fused_rel": rel(got, ref), "unfused_rel": rel(unf, ref),
                      "gather_equal": gather_eq, "copy_equal": copy_eq,
                      "worst_row_rel": float(row_err.max()), "rows_over_5pct": int((row_err > 0.05).sum())}
    for R in (r, 2 * r):
        d = torch.randn(M, R, device=dev, dtype=torch.bfloat16)
        ref = torch.empty(E, R, H, device=dev)
        for e in range(E):
            a, b = bounds[e], bounds[e + 1]
            ref[e] = d[a:b].float().t() @ xs32[a:b]
        got = gather_mm.gather_lowrank_wgrad(d, x, tok, offs)
        unf = grouped_mm_k(d.t(), gather_rows(x, tok), offs)
        rows[f"wgrad R={R}"] = {"fused_rel": rel(got, ref) if got is not None else None, "unfused_rel": rel(unf, ref)}
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--geometry", default="qwen3-30b-a3b", choices=sorted(GEOMETRIES))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layer", type=int, default=2,
                   help="the MoE layer check: 0 none, 1 with the current settings, 2 with the fusion and the word "
                        "decoding each on and off")
    a = p.parse_args()
    cfg, dev = GEOMETRIES[a.geometry], a.device
    out = {"geometry": a.geometry, "config": dict(gather_mm.CONFIG), "products": products(cfg, a.tokens, a.r, dev)}
    for name, v in out["products"].items():
        print(f"{name:<40} " + " ".join(f"{k}={x:.3e}" if isinstance(x, float) else f"{k}={x}" for k, x in v.items()))
    layer = {}
    saved_g, saved_w = gather_mm.CONFIG["on"], dequant.CONFIG["words"]
    try:
        combos = [(saved_g, saved_w)] if a.layer == 1 else [(g, w) for g in (True, False) for w in (True, False)]
        for gmm, words in (combos if a.layer else []):
            gather_mm.CONFIG["on"], dequant.CONFIG["words"] = gmm, words
            res = check_moe(dev, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, a.tokens,
                            cfg.num_experts_per_tok, a.r, backends=("grouped", "grouped_lowmem", "grouped+shared"))
            key = f"gmm={int(gmm)},words={int(words)}"
            layer[key] = res
            for b in ("reference_bf16", "grouped", "grouped_lowmem", "grouped+shared"):
                print(f"{key:<16} {b:<16} " + " ".join(f"{k}={x:.2e}" for k, x in res[b].items()), flush=True)
    finally:
        gather_mm.CONFIG["on"], dequant.CONFIG["words"] = saved_g, saved_w
    out["layer"] = layer
    print(json.dumps(out))


if __name__ == "__main__":
    main()
