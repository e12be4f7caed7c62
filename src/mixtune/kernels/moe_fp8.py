"""The grouped MoE experts with FP8 (e4m3) matrix products: `moe.py`'s function and algorithm, with each of the
four large grouped products — h13 and y forward, dg and dxs backward — taking row-scaled FP8 operands
(`kernels.fp8`) instead of bf16. About 1.7x the bf16 grouped product's rate on an H200 (BENCHMARKS.md).

    y = moe_experts_grouped_fp8(x (N, H), topk_idx (N, k), topk_weight (N, k), w1, w3, w2, lora, save_h=True)

What is rounded to e4m3 (3 mantissa bits): the products' inputs — the gathered tokens with their LoRA inner
products [xs | s·u13], [g | s·u2], [dy | du2] and [dh13 | du13], each row under its own scale — and the frozen
NF4 weights with the LoRA matrices folded beside them ([W13 | B], [W2 | B2], [W2; A2]^T, [W13; A13]^T), one
scale per expert. Everything else is as in bf16: the products accumulate in fp32 and write bf16; routing,
SwiGLU, the LoRA inner products and every LoRA weight gradient stay in bf16/fp32. The backward weights are
dequantized straight into the transposed (K-contiguous) layout the FP8 kernel needs. Gradients are those of
the FP8 forward's function read as exact (a straight-through estimate), so training sees ~3% relative noise
per product where bf16 has ~0.4%: an opt-in trade (`model.expert_precision: fp8`), evaluated in BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from .fp8 import fp8_weights, quantize_rows, scaled_grouped_mm
from .moe import (_NAMES, _ab_grads, _bblk, _cast_lora, _cat_lora, _lora_args, _saved_lora, _sort,
                  _w13_lora_grads_t, grouped_mm, grouped_mm_k)
from .route import combine, gather_rows
from .swiglu import swiglu_backward, swiglu_forward


def _buf(M: int, base: int, extra: int, dt, dev) -> torch.Tensor:
    """An (M, base + extra [+ pad]) operand buffer: the FP8 kernel wants rows of a multiple of 16 bytes, so the
    width is rounded up to 16 with zero columns (e.g. LoRA rank 4 or 12); the caller fills [:, :base + extra]."""
    width = base + extra
    buf = torch.empty(M, -(-width // 16) * 16, dtype=dt, device=dev)
    buf[:, width:].zero_()
    return buf


def _weights(ws, extra, base_cols: int, width: int, transpose: bool = False):
    """fp8_weights with `extra` (E, N, c) or None widened by zero columns to the operand buffer's width."""
    pad = width - base_cols - (extra.shape[-1] if extra is not None else 0)
    if pad:
        E, N = ws[0].shape[0], (ws[0].shape[-1] if transpose else sum(w.shape[1] for w in ws))
        z = torch.zeros(E, N, pad, dtype=torch.float32, device=ws[0].device)
        extra = z if extra is None else torch.cat([extra.float(), z], 2)
    return fp8_weights(ws, extra, transpose=transpose)


def _mm8(a: torch.Tensor, W8, sw, offs) -> torch.Tensor:
    """a (M, K) bf16 -> a @ (W8 sw)^T per expert group, a quantized row-wise on the way."""
    q, sa = quantize_rows(a)
    return scaled_grouped_mm(q, sa, W8, sw, offs, a.dtype)


def _rank(lc, names) -> int:
    return next((lc[n][0].shape[1] for n in names if n in lc), 0)


def _up8(x, tok, offs, w1, w3, lc, s, r, dt, shared=False):
    """h13 = [xs | s·u13] @ [W13 | blockdiag(B1, B3)]^T (M, 2I) ([W13 | [B1; B3]] with a shared A),
    u13 = xs @ A13^T (M, R) or None (R = 2r, or r shared), xs (M, H)."""
    E, H, I = w1.shape[0], w1.shape[-1], w1.shape[1]
    R = r if shared else 2 * r
    xa = _buf(tok.numel(), H, R, dt, x.device)
    xs = gather_rows(x, tok, out=xa[:, :H])
    u13 = None
    if r:
        u13 = grouped_mm(xs, _cat_lora(lc, "w1", "w3", 1, shared).transpose(1, 2), offs)
        torch.mul(u13, s, out=xa[:, H:H + R])
    W8, sw = _weights([w1, w3], _bblk(lc, E, I, r, dt, x.device, shared) if r else None, H, xa.shape[1])
    return _mm8(xa, W8, sw, offs), u13, xs


class _GroupedMoEFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weight, topk_idx, w1, w3, w2, scaling, save_h, shared, *ab):
        N, H = x.shape
        k = topk_idx.shape[1]
        E, I = w1.shape[0], w1.shape[1]
        dt = x.dtype
        s = scaling
        order, offs = _sort(topk_idx, E)
        tok = order // k
        M = order.numel()
        lora = {n: (ab[2 * i], ab[2 * i + 1]) for i, n in enumerate(_NAMES) if ab[2 * i] is not None}
        lc = _cast_lora(lora, dt, shared)
        r, r2 = _rank(lc, ("w1", "w3")), _rank(lc, ("w2",))

        h13, u13, _ = _up8(x, tok, offs, w1, w3, lc, s, r, dt, shared)
        ga = _buf(M, I, r2, dt, x.device)  # [g | s·u2]
        g = swiglu_forward(h13, out=ga[:, :I])
        u2 = None
        if r2:
            A2, B2 = lc["w2"]
            u2 = grouped_mm(g, A2.transpose(1, 2), offs)  # (M, r2)
            torch.mul(u2, s, out=ga[:, I:I + r2])
        W8, sw = _weights([w2], B2 if r2 else None, I, ga.shape[1])  # (E, H, I + r2)
        y = _mm8(ga, W8, sw, offs)  # (M, H)
        del ga, g, W8
        inv = torch.empty_like(order)
        inv[order] = torch.arange(M, device=order.device)
        out = combine(y, inv, topk_weight, N, k)

        ctx.meta = (w1, w3, w2, s, save_h, I, k, r, r2, list(lora), shared)
        # not y: as in moe.py, the routing weights' gradient comes out of the SwiGLU backward
        ctx.save_for_backward(x, topk_weight, order, inv, offs, h13 if save_h else None, u13, u2,
                              *[t for n in lora for t in lora[n]])
        return out

    @staticmethod
    def backward(ctx, dout):
        w1, w3, w2, s, save_h, I, k, r, r2, names, shared = ctx.meta
        x, topk_weight, order, inv, offs, h13, u13, u2, *rest = ctx.saved_tensors
        N, H = x.shape
        E = w1.shape[0]
        M = order.numel()
        dt = x.dtype
        pdt, lc = _saved_lora(names, rest, dt, shared)
        R = r if shared else 2 * r  # the w1|w3 LoRA's inner width
        tok = order // k
        dout = dout.contiguous()
        wsort = topk_weight.reshape(-1)[order].float()
        grads = {}
        ya = _buf(M, H, r2, dt, x.device)  # [dy_u | du2_u], unweighted (moe.py's backward says why)
        dy = gather_rows(dout, tok, out=ya[:, :H])
        # ---- w2:  dg_u = [dy_u | du2_u] @ [W2; A2]
        if r2:
            A2, B2 = lc["w2"]
            torch.mul(grouped_mm(dy, B2, offs), s, out=ya[:, H:H + r2])  # du2_u (M, r2)
            # dB2 = s u2^T (w ⊙ dy_u), (E, H, r2)
            dB2 = grouped_mm_k(u2.mul(wsort[:, None].to(dt)).t(), dy, offs).mul_(s).transpose(1, 2)
        W8, sw = _weights([w2], A2.transpose(1, 2) if r2 else None, H, ya.shape[1], True)  # (E, I, H + r2)
        dg = _mm8(ya, W8, sw, offs)  # (M, I), unweighted
        du2 = ya[:, H:H + r2].mul(wsort[:, None].to(dt))  # the weighted du2, for dA2
        del W8
        xs = None
        if h13 is None:  # grouped_lowmem: recompute h13
            h13, _, xs = _up8(x, tok, offs, w1, w3, lc, s, r, dt, shared)
        dha = _buf(M, 2 * I, R, dt, x.device)  # [dh13 | du13]
        # w ⊙ dg_u through SwiGLU; g (for dA2) and the routing weights' gradient <dg_u, g> in the same pass
        dh13, g, dws = swiglu_backward(h13, dg, out=dha[:, :2 * I], want_g=True, row_scale=wsort, want_dot=True)
        if r2:
            grads["w2"] = (grouped_mm_k(du2.t(), g, offs), dB2)  # dA2 (E, r2, I)
        dtw = dws[inv].view(N, k).to(topk_weight.dtype)
        del dg, g, h13, ya, dy, du2
        # ---- w1/w3:  dxs = [dh13 | du13] @ [W13; A13]
        A13 = _cat_lora(lc, "w1", "w3", 1, shared) if r else None  # (E, R, H)
        if r:
            du13 = dha[:, 2 * I:2 * I + R]
            torch.mul(grouped_mm(dh13, _bblk(lc, E, I, r, dt, x.device, shared), offs), s, out=du13)
        W8, sw = _weights([w1, w3], A13.transpose(1, 2) if r else None, 2 * I, dha.shape[1], True)  # (E, H, 2I+R)
        dxs = _mm8(dha, W8, sw, offs)  # (M, H)
        del W8
        if r:
            if xs is None:
                xs = gather_rows(x, tok)
            _w13_lora_grads_t(grads, lc, du13, xs, u13, dh13, offs, s, r, I, shared)
        del dha, dh13
        dx = combine(dxs, inv, None, N, k)
        return (dx, dtw, None, None, None, None, None, None, None, *_ab_grads(grads, pdt))


def moe_experts_grouped_fp8(x, topk_idx, topk_weight, w1, w3, w2, lora=None, save_h: bool = True):
    """x (N, H), topk_idx (N, k) long, topk_weight (N, k) -> (N, H); see the module docstring."""
    scaling, shared, ab = _lora_args(lora)
    return _GroupedMoEFP8.apply(x, topk_weight, topk_idx, w1, w3, w2, scaling, save_h, shared, *ab)
