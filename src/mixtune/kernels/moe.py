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
With save_h=False the backward does the w2 part first, then recomputes h13 and reuses that dequantized
[W1; W3] buffer for dxs (one w1|w3 dequantization in backward, not two).

LoRA rides inside the big products by widening the contraction (no (M, I) adds, no B·A):
  h13 = [xs | s·u1 | s·u3] @ [[W1 | B1 | 0], [W3 | 0 | B3]]^T        with u = xs @ A^T          (K = H + 2r)
        [xs | s·u13] @ [[W1 | B1], [W3 | B3]]^T                      when w1 and w3 share one A (K = H + r;
                                                                      peft's fused gate_up_proj adapter)
  y   = [g | s·u2] @ [W2 | B2]^T                                      with u2 = g @ A2^T         (K = I + r)
  dg  = [dy | du2] @ [W2; A2]                                         with du2 = s·dy @ B2
  dxs = [dh13 | du13] @ [W13; A13]                                    with du13 = s·dh13 @ blockdiag(B1, B3)
The dequantization kernel writes the frozen weights straight into the widened buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dequant import dequantize_nf4, dequantize_nf4_stack
from .route import combine, combine_backward, gather_rows
from .swiglu import swiglu_backward, swiglu_forward

_GMM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
FALLBACKS = {"grouped_mm": 0, "grouped_mm_k": 0}  # times a layout had to be copied to suit the kernel


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Row-grouped: a (M, K) rows of group e are offs[e-1]:offs[e]; b (E, K, N) -> (M, N)."""
    if _GMM is not None:
        try:
            return _GMM(a, b, offs=offs)
        except RuntimeError:
            FALLBACKS["grouped_mm"] += 1
            try:
                return _GMM(a.contiguous(), b.contiguous(), offs=offs)
            except RuntimeError:  # e.g. strides that are not multiples of 16 bytes (tiny shapes)
                pass
    return _grouped_mm_loop(a, b, offs)


def grouped_mm_k(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """K-grouped (weight gradients): a (P, M), b (M, Q), group e sums over M-slice e -> (E, P, Q)."""
    if _GMM is not None:
        try:
            return _GMM(a, b, offs=offs)
        except RuntimeError:  # the CUDA kernel may want the summed (M) dimension contiguous in both
            FALLBACKS["grouped_mm_k"] += 1
            try:
                return _GMM(a.contiguous(), b.t().contiguous().t(), offs=offs)
            except RuntimeError:
                pass
    return torch.stack([a[:, s:t] @ b[s:t] for s, t in _bounds(offs)])


def _bounds(offs: torch.Tensor):
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def _grouped_mm_loop(a, b, offs):
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e, (s, t) in enumerate(_bounds(offs)):
        out[s:t] = a[s:t] @ b[e]
    return out


_NAMES = ("w1", "w3", "w2")


def _lora_args(lora):
    """ExpertLoRA or None -> (scaling, shared, [A1, B1, A3, B3, A2, B2]) with None where a matrix has no LoRA.
    shared: w1 and w3 share one A (the same Parameter, in both slots; its gradient comes back in A1's only)."""
    ab = []
    for n in _NAMES:
        ab += [lora.A[n], lora.B[n]] if lora is not None and n in lora.A else [None, None]
    shared = ab[0] is not None and ab[0] is ab[2]
    return (float(lora.scaling) if lora is not None else 1.0), shared, ab


def _cast_lora(params: dict, dt, shared: bool) -> dict:
    """{name: (A, B)} -> compute-dtype copies {name: (A, B)}, a shared A cast once."""
    lc = {n: (A.to(dt), B.to(dt)) for n, (A, B) in params.items() if not (shared and n == "w3")}
    if shared:
        lc["w3"] = (lc["w1"][0], params["w3"][1].to(dt))
    return lc


def _saved_lora(names, rest, dt, shared=False):
    """The saved LoRA parameters -> (their dtypes {name: (A, B)}, compute-dtype copies {name: (A, B)})."""
    params = {n: (rest[2 * i], rest[2 * i + 1]) for i, n in enumerate(names)}
    return ({n: (A.dtype, B.dtype) for n, (A, B) in params.items()}, _cast_lora(params, dt, shared))


def _w13_lora_grads(grads, lc, du13, xs, u13, dh13, offs, s, r, I, shared=False):
    """dA13 = du13^T xs, dB13 = s u13^T dh13 per expert, split into grads["w1"], grads["w3"] (where present);
    with a shared A its whole gradient goes to w1 (w3's A slot gets None)."""
    dA13 = grouped_mm_k(du13.t(), xs, offs)  # (E, R, H), R = 2r (r shared)
    dBt = grouped_mm_k(u13.t(), dh13, offs).mul_(s)  # (E, R, 2I): [u1|u3]^T [dh1|dh3]
    if shared:
        grads["w1"] = (dA13, dBt[:, :, :I].transpose(1, 2))
        grads["w3"] = (None, dBt[:, :, I:].transpose(1, 2))
        return
    if "w1" in lc:
        grads["w1"] = (dA13[:, :r], dBt[:, :r, :I].transpose(1, 2))
    if "w3" in lc:
        grads["w3"] = (dA13[:, r:], dBt[:, r:, I:].transpose(1, 2))


def _ab_grads(grads, pdt) -> list:
    """grads {name: (dA, dB)} -> the autograd outputs for [A1, B1, A3, B3, A2, B2], in the parameters' dtypes."""
    out = []
    for n in _NAMES:
        if n not in grads:
            out += [None, None]
            continue
        dA, dB = grads[n]
        out += [dA.to(pdt[n][0]).contiguous() if dA is not None else None, dB.to(pdt[n][1]).contiguous()]
    return out


def _sort(topk_idx, E):
    """-> order (M,) assignment ids sorted by expert, offs (E,) int32 cumulative counts (no host sync)."""
    flat = topk_idx.reshape(-1)  # (M,)
    order = torch.argsort(flat, stable=True)
    bounds = torch.arange(E, device=flat.device, dtype=flat.dtype)
    offs = torch.searchsorted(flat[order], bounds, right=True).to(torch.int32)  # (E,)
    return order, offs


def _cat_lora(lc, n1, n3, dim, shared=False):
    """A13 = [A1; A3] along the rank dim (zeros where a matrix has no LoRA); the one A itself when shared."""
    if shared:
        return lc[n1][0]
    ref = lc[n1][0] if n1 in lc else lc[n3][0]
    a1 = lc[n1][0] if n1 in lc else torch.zeros_like(ref)
    a3 = lc[n3][0] if n3 in lc else torch.zeros_like(ref)
    return torch.cat([a1, a3], dim=dim)


def _bblk(lc, E, I, r, dt, dev, shared=False):
    """blockdiag(B1, B3): (E, 2I, 2r), zeros where a matrix has no LoRA; [B1; B3] (E, 2I, r) when A is shared."""
    if shared:
        return torch.cat([lc["w1"][1], lc["w3"][1]], dim=1)
    out = torch.zeros(E, 2 * I, 2 * r, dtype=dt, device=dev)
    if "w1" in lc:
        out[:, :I, :r] = lc["w1"][1]
    if "w3" in lc:
        out[:, I:, r:] = lc["w3"][1]
    return out


def _up(x, tok, offs, w1, w3, lc, s, I, dt, shared=False):
    """h13 = x[tok] @ [w1; w3]^T + LoRA, (M, 2I); also u13 = xs @ A13^T (M, R) or None (R = 2r, or r with a
    shared A), xs = x[tok] (M, H) — with LoRA a view into the widened [xs | s·u13] buffer, gathered straight
    into it — and the dequantized weight buffer Wa (E, 2I, H [+ R]) whose [:, :, :H] is [W1; W3] (the backward
    reuses it)."""
    H = w1.shape[-1]
    M = tok.numel()
    if "w1" not in lc and "w3" not in lc:
        xs = gather_rows(x, tok)
        W13 = dequantize_nf4_stack([w1, w3], dt)  # (E, 2I, H)
        return grouped_mm(xs, W13.transpose(1, 2), offs), None, xs, W13
    A13 = _cat_lora(lc, "w1", "w3", 1, shared)  # (E, R, H)
    R = A13.shape[1]
    xa = torch.empty(M, H + R, dtype=dt, device=x.device)  # [xs | s·u13]
    xs = gather_rows(x, tok, out=xa[:, :H])
    u13 = grouped_mm(xs, A13.transpose(1, 2), offs)  # (M, R)
    torch.mul(u13, s, out=xa[:, H:])
    Wa = dequantize_nf4_stack([w1, w3], dt, cols=H + R)  # (E, 2I, H + R), LoRA columns next
    if shared:  # [[W1 | B1], [W3 | B3]]
        Wa[:, :I, H:] = lc["w1"][1]
        Wa[:, I:, H:] = lc["w3"][1]
        return grouped_mm(xa, Wa.transpose(1, 2), offs), u13, xs, Wa
    r = R // 2
    Wa[:, :I, H + r:].zero_()
    Wa[:, I:, H:H + r].zero_()
    for n, rows, cols in (("w1", slice(0, I), slice(H, H + r)), ("w3", slice(I, 2 * I), slice(H + r, H + 2 * r))):
        if n in lc:
            Wa[:, rows, cols] = lc[n][1]  # B (E, I, r)
        else:
            Wa[:, rows, cols].zero_()
    h13 = grouped_mm(xa, Wa.transpose(1, 2), offs)  # (M, 2I)
    return h13, u13, xs, Wa


class _GroupedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weight, topk_idx, w1, w3, w2, scaling, save_h, shared, *ab):
        # ab = (A1, B1, A3, B3, A2, B2), any pair None; A (E, r, in), B (E, out, r); shared: A3 is A1
        N, H = x.shape
        k = topk_idx.shape[1]
        E, I = w1.shape[0], w1.shape[1]
        dt = x.dtype
        s = scaling
        order, offs = _sort(topk_idx, E)
        tok = order // k  # (M,) token of each sorted assignment
        M = order.numel()
        lora = {n: (ab[2 * i], ab[2 * i + 1]) for i, n in enumerate(_NAMES) if ab[2 * i] is not None}
        lc = _cast_lora(lora, dt, shared)  # compute-dtype copies (small)

        h13, u13 = _up(x, tok, offs, w1, w3, lc, s, I, dt, shared)[:2]  # the weight buffer is freed here
        if "w2" in lc:
            A2, B2 = lc["w2"]
            r2 = A2.shape[1]
            ga = torch.empty(M, I + r2, dtype=dt, device=x.device)  # [g | s·u2]
            g = swiglu_forward(h13, out=ga[:, :I])  # (M, I) view
            u2 = grouped_mm(g, A2.transpose(1, 2), offs)  # (M, r)
            ga[:, I:] = u2 * s
            W2a = dequantize_nf4_stack([w2], dt, cols=I + r2)  # (E, H, I + r)
            W2a[:, :, I:] = B2
            y = grouped_mm(ga, W2a.transpose(1, 2), offs)  # (M, H)
            del ga, g, W2a
        else:
            u2 = None
            g = swiglu_forward(h13)  # (M, I)
            W2 = dequantize_nf4(w2, dt)  # (E, H, I)
            y = grouped_mm(g, W2.transpose(1, 2), offs)  # (M, H)
            del g, W2
        inv = torch.empty_like(order)
        inv[order] = torch.arange(M, device=order.device)  # sorted position of each assignment
        out = combine(y, inv, topk_weight, N, k)  # (N, H), fp32 accumulation

        ctx.meta = (w1, w3, w2, s, save_h, I, k, list(lora), shared)
        # the LoRA parameters themselves (already resident), not their compute-dtype copies
        ctx.save_for_backward(x, topk_weight, order, inv, offs, h13 if save_h else None, y, u13, u2,
                              *[t for n in lora for t in lora[n]])
        return out

    @staticmethod
    def backward(ctx, dout):
        w1, w3, w2, s, save_h, I, k, names, shared = ctx.meta
        x, topk_weight, order, inv, offs, h13, y, u13, u2, *rest = ctx.saved_tensors
        N, H = x.shape
        E = w1.shape[0]
        M = order.numel()
        dt = x.dtype
        pdt, lc = _saved_lora(names, rest, dt, shared)
        tok = order // k
        dout = dout.contiguous()
        xs = Wa = None
        wsort = topk_weight.reshape(-1)[order]  # (M,)
        grads = {}
        r2 = lc["w2"][0].shape[1] if "w2" in lc else 0
        ya = torch.empty(M, H + r2, dtype=dt, device=x.device)  # [dy | du2]
        dy = ya[:, :H]
        # dy[m] = wsort[m] * dout[tok[m]];  d topk_weight[n, j] = <dout[n], y[assignment]>, in fp32
        dws = combine_backward(dout, tok, y, wsort, dy)  # (M,)
        dtw = dws[inv].view(N, k).to(topk_weight.dtype)
        # ---- w2:  dg = [dy | du2] @ [W2; A2]
        if "w2" in lc:
            A2, B2 = lc["w2"]
            du2 = grouped_mm(dy, B2, offs).mul_(s)  # (M, r)
            ya[:, H:] = du2
            W2b = dequantize_nf4_stack([w2], dt, rows=H + r2)  # (E, H + r, I)
            W2b[:, H:] = A2
            dg = grouped_mm(ya, W2b, offs)  # (M, I)
            del W2b
            dB2 = grouped_mm_k(u2.t(), dy, offs).mul_(s).transpose(1, 2)  # (E, H, r)
        else:
            W2 = dequantize_nf4(w2, dt)  # (E, H, I)
            dg = grouped_mm(dy, W2, offs)  # (M, I)
            del W2
        del dy, ya
        if h13 is None:  # grouped_lowmem: recompute h13 now, keeping the dequantized [W1; W3] for dxs below
            h13, _, xs, Wa = _up(x, tok, offs, w1, w3, lc, s, I, dt, shared)
        # ---- SwiGLU backward; g (for dA2) comes out of the same pass, written over dg
        R = u13.shape[1] if u13 is not None else 0  # 2r, or r with a shared A
        r = R // 2
        rw = R if Wa is None else 0  # with Wa reused, du13 @ A13 is a separate product
        dha = torch.empty(M, 2 * I + rw, dtype=dt, device=x.device)  # [dh13 | du13]
        if "w2" in lc:
            dh13, g = swiglu_backward(h13, dg, out=dha[:, :2 * I], want_g=True)  # (M, 2I) view, (M, I)
            grads["w2"] = (grouped_mm_k(du2.t(), g, offs), dB2)  # dA2 (E, r, I)
            del g
        else:
            dh13 = swiglu_backward(h13, dg, out=dha[:, :2 * I])
        del dg, h13
        # ---- w1/w3:  dxs = [dh13 | du13] @ [W13; A13]
        if u13 is None:
            W13 = Wa if Wa is not None else dequantize_nf4_stack([w1, w3], dt)  # (E, 2I, H)
            dxs = grouped_mm(dh13, W13, offs)  # (M, H)
            del W13, Wa
        else:
            du13 = grouped_mm(dh13, _bblk(lc, E, I, r, dt, x.device, shared), offs).mul_(s)  # (M, R)
            if Wa is not None:  # dxs = dh13 @ [W1; W3] (the forward's buffer, LoRA columns skipped) + du13 @ A13
                dxs = grouped_mm(dh13, Wa[:, :, :H], offs)  # (M, H)
                del Wa
                dxs += grouped_mm(du13, _cat_lora(lc, "w1", "w3", 1, shared), offs)
            else:
                dha[:, 2 * I:] = du13
                Wb = dequantize_nf4_stack([w1, w3], dt, rows=2 * I + R)  # (E, 2I + R, H)
                Wb[:, 2 * I:] = _cat_lora(lc, "w1", "w3", 1, shared)
                dxs = grouped_mm(dha, Wb, offs)  # (M, H)
                del Wb
            if xs is None:
                xs = gather_rows(x, tok)  # (M, H)
            _w13_lora_grads(grads, lc, du13, xs, u13, dh13, offs, s, r, I, shared)
        del dha, dh13
        dx = combine(dxs, inv, None, N, k)  # (N, H)
        return (dx, dtw, None, None, None, None, None, None, None, *_ab_grads(grads, pdt))


def moe_experts_grouped(x, topk_idx, topk_weight, w1, w3, w2, lora=None, save_h: bool = True):
    """x (N, H), topk_idx (N, k) long, topk_weight (N, k) -> (N, H); see the module docstring."""
    scaling, shared, ab = _lora_args(lora)
    return _GroupedMoE.apply(x, topk_weight, topk_idx, w1, w3, w2, scaling, save_h, shared, *ab)
