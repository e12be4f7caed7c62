"""Grouped MoE experts for training: all experts in a few grouped matrix products, NF4 weights dequantized
per layer (one fused launch for w1|w3, one for w2), LoRA as grouped low-rank products, and a backward that
dequantizes the frozen weights again instead of keeping them.

    y = moe_experts_grouped(x (N, H), topk_idx (N, k), topk_weight (N, k), w1, w3, w2, lora, save_h=True)

Same function as `reference.moe_experts_reference` (the ground truth). Steps, with M = N·k assignments:
  order = argsort(topk_idx.flatten())        # assignments sorted by expert; offs = cumulative counts (E,)
  xs = x[order // k]                         # (M, H)
  h13 = xs @ [w1_e; w3_e]^T (+ LoRA)         # (M, 2I), one grouped product
  g = silu(h1) * h3                          # (M, I)
  y = g @ w2_e^T (+ LoRA)                    # (M, H)
  out[n] = sum_j topk_weight[n, j] * y[assignment (n, j)]
Saved for backward: x, h13 (or nothing, with save_h=False: then h13 is recomputed, trading one w1|w3 grouped
product for (M, 2I) of memory), y (for d topk_weight), the LoRA inner products (M, r). Never the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dequant import dequantize_nf4, dequantize_nf4_stack
from .swiglu import swiglu_backward, swiglu_forward

_GMM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Row-grouped: a (M, K) rows of group e are offs[e-1]:offs[e]; b (E, K, N) -> (M, N)."""
    if _GMM is None:
        return _grouped_mm_loop(a, b, offs)
    try:
        return _GMM(a, b, offs=offs)
    except RuntimeError:
        return _GMM(a.contiguous(), b.contiguous(), offs=offs)


def grouped_mm_k(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """K-grouped (weight gradients): a (P, M), b (M, Q), group e sums over M-slice e -> (E, P, Q)."""
    if _GMM is None:
        return torch.stack([a[:, s:t] @ b[s:t] for s, t in _bounds(offs)])
    try:
        return _GMM(a, b, offs=offs)
    except RuntimeError:  # the CUDA kernel wants the summed (M) dimension contiguous in both operands
        return _GMM(a.contiguous(), b.t().contiguous().t(), offs=offs)


def _bounds(offs: torch.Tensor):
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def _grouped_mm_loop(a, b, offs):
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e, (s, t) in enumerate(_bounds(offs)):
        out[s:t] = a[s:t] @ b[e]
    return out


_NAMES = ("w1", "w3", "w2")


class _GroupedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weight, topk_idx, w1, w3, w2, scaling, save_h, *ab):
        # ab = (A1, B1, A3, B3, A2, B2), any pair None; A (E, r, in), B (E, out, r)
        N, H = x.shape
        k = topk_idx.shape[1]
        E, I = w1.shape[0], w1.shape[1]
        dt = x.dtype
        flat = topk_idx.reshape(-1)  # (M,)
        order = torch.argsort(flat, stable=True)  # (M,) assignment ids sorted by expert
        tok = order // k  # (M,) token of each sorted assignment
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)  # (E,)
        lora = {n: (ab[2 * i], ab[2 * i + 1]) for i, n in enumerate(_NAMES) if ab[2 * i] is not None}
        lc = {n: (A.to(dt), B.to(dt)) for n, (A, B) in lora.items()}  # compute-dtype copies (small)

        xs = x[tok]  # (M, H)
        h13, us = _up(xs, offs, w1, w3, lc, scaling, I, dt)
        g = swiglu_forward(h13)  # (M, I)
        W2 = dequantize_nf4(w2, dt)  # (E, H, I)
        y = grouped_mm(g, W2.transpose(1, 2), offs)  # (M, H)
        del W2
        if "w2" in lc:
            A, B = lc["w2"]
            us["w2"] = grouped_mm(g, A.transpose(1, 2), offs)  # (M, r)
            y.add_(grouped_mm(us["w2"], B.transpose(1, 2), offs), alpha=scaling)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)  # sorted position of assignment
        out = torch.bmm(topk_weight.to(dt).view(N, 1, k), y[inv].view(N, k, H)).view(N, H)

        ctx.meta = (w1, w3, w2, scaling, save_h, I, k, list(lora), [(A.dtype, B.dtype) for A, B in lora.values()])
        ctx.save_for_backward(x, topk_weight, order, inv, offs, h13 if save_h else None, y,
                              *[us[n] for n in lora], *[t for n in lora for t in lc[n]])
        return out

    @staticmethod
    def backward(ctx, dout):
        w1, w3, w2, s, save_h, I, k, names, pdtypes = ctx.meta
        x, topk_weight, order, inv, offs, h13, y, *rest = ctx.saved_tensors
        nl = len(names)
        us = dict(zip(names, rest[:nl]))
        lc = {n: (rest[nl + 2 * i], rest[nl + 2 * i + 1]) for i, n in enumerate(names)}
        N, H = x.shape
        M = order.numel()
        dt = x.dtype
        tok = order // k
        dout = dout.contiguous()
        xs = x[tok]  # (M, H)
        if h13 is None:
            h13, _ = _up(xs, offs, w1, w3, lc, s, I, dt)
        ds = dout[tok]  # (M, H) output grad of each sorted assignment
        # d topk_weight[n, j] = <dout[n], y[assignment]>, accumulated in fp32
        dws = torch.bmm(ds.view(M, 1, H), y.view(M, H, 1)).view(M)
        dtw = dws[inv].view(N, k).to(topk_weight.dtype)
        dy = ds.mul_(topk_weight.reshape(-1)[order].to(dt)[:, None])  # (M, H)
        grads = {}
        W2 = dequantize_nf4(w2, dt)  # (E, H, I)
        dg = grouped_mm(dy, W2, offs)  # (M, I)
        del W2
        if "w2" in lc:
            A, B = lc["w2"]
            du = grouped_mm(dy, B, offs).mul_(s)  # (M, r)
            g = swiglu_forward(h13)  # (M, I)
            grads["w2"] = (grouped_mm_k(du.t(), g, offs),  # dA (E, r, I)
                           grouped_mm_k(dy.t(), us["w2"], offs).mul_(s))  # dB (E, H, r)
            del g
            dg.add_(grouped_mm(du, A, offs))
        dh13 = swiglu_backward(h13, dg)  # (M, 2I)
        del dg, h13
        W13 = dequantize_nf4_stack([w1, w3], dt)  # (E, 2I, H)
        dxs = grouped_mm(dh13, W13, offs)  # (M, H)
        del W13
        for n, sl in (("w1", slice(0, I)), ("w3", slice(I, 2 * I))):
            if n not in lc:
                continue
            A, B = lc[n]
            dh = dh13[:, sl]  # (M, I)
            du = grouped_mm(dh, B, offs).mul_(s)  # (M, r)
            grads[n] = (grouped_mm_k(du.t(), xs, offs),  # dA (E, r, H)
                        grouped_mm_k(dh.t(), us[n], offs).mul_(s))  # dB (E, I, r)
            dxs.add_(grouped_mm(du, A, offs))
        dx = dxs[inv].view(N, k, H).sum(1)  # (N, H)
        ab_grads = []
        pdt = dict(zip(names, pdtypes))
        for n in _NAMES:
            if n in grads:
                ab_grads += [grads[n][0].to(pdt[n][0]), grads[n][1].to(pdt[n][1])]
            else:
                ab_grads += [None, None]
        return (dx, dtw, None, None, None, None, None, None, *ab_grads)


def _up(xs, offs, w1, w3, lc, s, I, dt):
    """h13 = xs @ [w1; w3]^T + LoRA, (M, 2I); also the LoRA inner products u = xs @ A^T (M, r)."""
    W13 = dequantize_nf4_stack([w1, w3], dt)  # (E, 2I, H)
    h13 = grouped_mm(xs, W13.transpose(1, 2), offs)  # (M, 2I)
    del W13
    us = {}
    for n, sl in (("w1", slice(0, I)), ("w3", slice(I, 2 * I))):
        if n in lc:
            A, B = lc[n]
            us[n] = grouped_mm(xs, A.transpose(1, 2), offs)  # (M, r)
            h13[:, sl].add_(grouped_mm(us[n], B.transpose(1, 2), offs), alpha=s)
    return h13, us


def moe_experts_grouped(x, topk_idx, topk_weight, w1, w3, w2, lora=None, save_h: bool = True):
    """x (N, H), topk_idx (N, k) long, topk_weight (N, k) -> (N, H); see the module docstring."""
    ab = []
    for n in _NAMES:
        if lora is not None and n in lora.A:
            ab += [lora.A[n], lora.B[n]]
        else:
            ab += [None, None]
    scaling = float(lora.scaling) if lora is not None else 1.0
    return _GroupedMoE.apply(x, topk_weight, topk_idx, w1, w3, w2, scaling, save_h, *ab)
