"""Kernel sweeps `mixtune bench` runs on the GPU before timing steps (from bench.time_kernels): the tiles of the
gather-fused LoRA products (kernels.gather_mm), checked against the unfused path, timed beside it, the fastest
tile kept in gather_mm.CONFIG for the rows that follow.

    res = sweep_gather_mm(cfg, device, timer)    # timer(fn) -> ms per call (bench.cuda_ms)
"""

from __future__ import annotations

import torch

from .model.config import MixtralConfig


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _routing(N: int, E: int, k: int, device):
    """Uniform random top-k routing of N tokens -> (tok (M,), offs (E,) int32), sorted by expert as the MoE does."""
    idx = torch.rand(N, E, device=device).topk(k, dim=1).indices
    flat = idx.reshape(-1).to(torch.int32)
    order = torch.argsort(flat, stable=True)
    offs = torch.searchsorted(flat[order], torch.arange(E, device=device, dtype=torch.int32), right=True)
    return order // k, offs.to(torch.int32)


def sweep_gather_mm(cfg: MixtralConfig, device, timer, tokens: int = 16384, r: int = 64,
                    dtype=torch.bfloat16) -> dict:
    """The forward's gather + u13 = s · x[tok] @ A^T and the backward's dA = du^T x[tok] at this geometry
    (`tokens` tokens, top-k, rank r, in `dtype`): the unfused path's time, each tile's, the fastest kept; the
    fused results checked against the unfused ones (gathered rows equal, products within bf16 rounding)."""
    from .kernels import gather_mm
    from .kernels.moe import grouped_mm, grouped_mm_k
    from .kernels.route import gather_rows
    E, H, k = cfg.num_local_experts, cfg.hidden_size, cfg.num_experts_per_tok
    torch.manual_seed(0)
    tok, offs = _routing(tokens, E, k, device)
    M = tok.numel()
    x = torch.randn(tokens, H, device=device, dtype=dtype)
    A = torch.randn(E, r, H, device=device) * 0.02  # fp32, as the parameters are
    xa = torch.empty(M, H + r, device=device, dtype=dtype)
    u = torch.empty(M, r, device=device, dtype=dtype)
    d = torch.randn(M, r, device=device, dtype=dtype)

    def unfused():
        gather_rows(x, tok, out=xa[:, :H])
        torch.mul(grouped_mm(xa[:, :H], A.to(dtype).transpose(1, 2), offs), 0.25, out=u)
        xa[:, H:].copy_(u)

    def unfused_w():
        return grouped_mm_k(d.t(), gather_rows(x, tok), offs)

    out = {"unfused_ms": timer(unfused), "unfused_wgrad_ms": timer(unfused_w)}
    ref_x, ref_u = xa[:, :H].clone(), u.clone()
    ref_w = unfused_w().float()
    saved = dict(gather_mm.CONFIG)
    fwd, wgd = {}, {}
    try:
        for BM, BK, nw in ((64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (256, 64, 8)):
            gather_mm.CONFIG.update(on=True, BM=BM, BK=BK, warps=nw)
            fwd[(BM, BK, nw)] = timer(lambda: gather_mm.gather_lowrank(x, tok, offs, A, 0.25, xa[:, :H], [xa[:, H:], u]))
        for BMW, BH, nw in ((32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (64, 64, 4)):
            gather_mm.CONFIG.update(on=True, BMW=BMW, BH=BH, warps_w=nw)
            wgd[(BMW, BH, nw)] = timer(lambda: gather_mm.gather_lowrank_wgrad(d, x, tok, offs))
    finally:
        gather_mm.CONFIG.update(saved)
    best, best_w = min(fwd, key=fwd.get), min(wgd, key=wgd.get)
    gather_mm.CONFIG.update(BM=best[0], BK=best[1], warps=best[2], BMW=best_w[0], BH=best_w[1], warps_w=best_w[2])
    xa.fill_(float("nan"))
    u.fill_(float("nan"))
    gather_mm.gather_lowrank(x, tok, offs, A, 0.25, xa[:, :H], [xa[:, H:], u])
    got_w = gather_mm.gather_lowrank_wgrad(d, x, tok, offs)
    out.update(
        fused_ms={f"BM{a}K{b}w{c}": v for (a, b, c), v in fwd.items()},
        fused_wgrad_ms={f"BM{a}H{b}w{c}": v for (a, b, c), v in wgd.items()},
        config={k: gather_mm.CONFIG[k] for k in ("BM", "BK", "warps", "BMW", "BH", "warps_w")},
        gather_equal=bool(torch.equal(xa[:, :H], ref_x)), u_rel=_rel(u, ref_u), u_copy_equal=bool(torch.equal(xa[:, H:], u)),
        wgrad_rel=_rel(got_w, ref_w))
    out["best_ms"], out["best_wgrad_ms"] = fwd[best], wgd[best_w]
    out["kinds_rel"] = _check_kinds(x, tok, offs, E, H, r, dtype)
    out["ok"] = (out["gather_equal"] and out["u_copy_equal"] and out["u_rel"] < 1e-2 and out["wgrad_rel"] < 1e-2
                 and all(v < 1e-2 for v in out["kinds_rel"].values()))
    return out


def _check_kinds(x, tok, offs, E, H, r, dtype) -> dict:
    """The other operands the MoE passes the fused products, each fused vs unfused (rel. error): [A1; A3] of
    rank 2r (separate A's) in fp32 and in the compute dtype, B2 (E, H, r) read as its strided transpose, and the weight
    gradient at rank 2r."""
    from .kernels import gather_mm
    from .kernels.moe import grouped_mm, grouped_mm_k
    from .kernels.route import gather_rows
    M = tok.numel()
    xs = gather_rows(x, tok)
    res = {}
    kinds = {"A13_2r": torch.randn(E, 2 * r, H, device=x.device) * 0.02,
             "A13_2r_" + str(dtype).split(".")[-1]: (torch.randn(E, 2 * r, H, device=x.device) * 0.02).to(dtype),
             "B2t_r": (torch.randn(E, H, r, device=x.device) * 0.02).transpose(1, 2)}
    for name, W in kinds.items():
        R = W.shape[1]
        u = torch.full((M, R), float("nan"), device=x.device, dtype=dtype)
        gather_mm.gather_lowrank(x, tok, offs, W, 0.25, None, [u])
        res[name] = _rel(u, grouped_mm(xs, W.to(dtype).transpose(1, 2), offs) * 0.25)
    d = torch.randn(M, 2 * r, device=x.device, dtype=dtype)
    got = gather_mm.gather_lowrank_wgrad(d, x, tok, offs)
    res["wgrad_2r"] = _rel(got, grouped_mm_k(d.t(), xs, offs).float()) if got is not None else float("nan")
    return res
