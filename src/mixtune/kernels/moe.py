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

from .dequant import Extra, dequantize_nf4, dequantize_nf4_stack
from .gather_mm import gather_lowrank, gather_lowrank_wgrad
from .route import combine, gather_rows
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


def _w13_lora_grads(grads, lc, du13, xs, u13, dh13, offs, r, I, shared=False, dA13=None):
    """dA13 = du13^T xs (unless given) and dB = dh^T (s u) per expert (u13 carries s), into grads["w1"],
    grads["w3"] (where present): each dB straight in B's (E, I, r) layout from its own half of dh13 and its own u
    (no cross terms of the two halves, no transposed copy); with a shared A its whole gradient goes to w1 (w3's A
    slot None)."""
    if dA13 is None:
        dA13 = grouped_mm_k(du13.t(), xs, offs)  # (E, R, H), R = 2r (r shared)
    dh1, dh3 = dh13[:, :I], dh13[:, I:]  # (M, I) views
    if shared:
        grads["w1"] = (dA13, grouped_mm_k(dh1.t(), u13, offs))  # (E, I, r)
        grads["w3"] = (None, grouped_mm_k(dh3.t(), u13, offs))
        return
    if "w1" in lc:
        grads["w1"] = (dA13[:, :r], grouped_mm_k(dh1.t(), u13[:, :r], offs))
    if "w3" in lc:
        grads["w3"] = (dA13[:, r:], grouped_mm_k(dh3.t(), u13[:, r:], offs))


def _w13_lora_grads_t(grads, lc, du13, xs, u13, dh13, offs, s, r, I, shared=False):
    """The FP8 path's form: dA13 = du13^T xs, dB13 = s u13^T dh13 as one (E, R, 2I) product, transposed views."""
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
    """-> order (M,) assignment ids sorted by expert, offs (E,) int32 cumulative counts (no host sync). The
    expert ids are sorted as int32 (a radix sort makes half the passes of int64's)."""
    flat = topk_idx.reshape(-1).to(torch.int32)  # (M,)
    order = torch.argsort(flat, stable=True)
    bounds = torch.arange(E, device=flat.device, dtype=flat.dtype)
    offs = torch.searchsorted(flat[order], bounds, right=True).to(torch.int32)  # (E,)
    return order, offs


def _put(dst: torch.Tensor, src: torch.Tensor, s: float = 1.0) -> None:
    """dst := s * src in dst's dtype, one pass (src may be fp32 parameters, dst a strided bf16 slice); the
    product is formed in src's precision and rounded once."""
    if s == 1.0:
        dst.copy_(src)
    else:
        torch.mul(src, s, out=dst)


def _cat_lora(lc, n1, n3, dim, shared=False, dt=None):
    """A13 = [A1; A3] along the rank dim (zeros where a matrix has no LoRA); the one A itself when shared.
    dt: the result's dtype (the parameters cast in the same pass), else theirs."""
    if shared:
        a = lc[n1][0]
        return a if dt is None else a.to(dt)
    ref = lc[n1][0] if n1 in lc else lc[n3][0]
    E, r, H = ref.shape
    out = torch.empty(E, 2 * r, H, dtype=dt or ref.dtype, device=ref.device)  # (E, 2r, H)
    for n, sl in ((n1, slice(0, r)), (n3, slice(r, 2 * r))):
        if n in lc:
            out[:, sl].copy_(lc[n][0])
        else:
            out[:, sl].zero_()
    return out


def _bblk(lc, E, I, r, dt, dev, shared=False, s: float = 1.0):
    """s · blockdiag(B1, B3): (E, 2I, 2r), zeros where a matrix has no LoRA; s · [B1; B3] (E, 2I, r) when A is
    shared. Built in dt straight from the parameters (any dtype): one pass per B."""
    if shared:  # (r as the caller counts it may be half the inner width: read the rank off B)
        out = torch.empty(E, 2 * I, lc["w1"][1].shape[-1], dtype=dt, device=dev)
        _put(out[:, :I], lc["w1"][1], s)
        _put(out[:, I:], lc["w3"][1], s)
        return out
    out = torch.empty(E, 2 * I, 2 * r, dtype=dt, device=dev)
    out[:, :I, r:].zero_()
    out[:, I:, :r].zero_()
    for n, rows, cols in (("w1", slice(0, I), slice(0, r)), ("w3", slice(I, 2 * I), slice(r, 2 * r))):
        if n in lc:
            _put(out[:, rows, cols], lc[n][1], s)
        else:
            out[:, rows, cols].zero_()
    return out


def _up(x, tok, offs, w1, w3, lora, s, I, dt, shared=False):
    """h13 = x[tok] @ [w1; w3]^T + LoRA, (M, 2I); also u13 = s · xs @ A13^T (M, R) or None (R = 2r, or r with
    a shared A; scaled, as the product used it), xs = x[tok] (M, H) — with LoRA a view into the widened
    [xs | s·u13] buffer, gathered straight into it — and the dequantized weight buffer Wa (E, 2I, H [+ R])
    whose [:, :, :H] is [W1; W3] (the backward reuses it). lora: {name: (A, B)} parameters in any dtype; the
    B's are written into Wa's LoRA columns in the same pass that casts them."""
    H = w1.shape[-1]
    M = tok.numel()
    if "w1" not in lora and "w3" not in lora:
        xs = gather_rows(x, tok)
        W13 = dequantize_nf4_stack([w1, w3], dt)  # (E, 2I, H)
        return grouped_mm(xs, W13.transpose(1, 2), offs), None, xs, W13
    # (E, R, H): a shared A as the parameter itself (the fused kernel casts its tiles), else [A1; A3] in the
    # parameters' dtype (gather_mm._wt: a bf16 W gave wrong rows on the GPU; fp32 ones are exact)
    A13 = lora["w1"][0] if shared else _cat_lora(lora, "w1", "w3", 1, shared)
    R = A13.shape[1]
    xa = torch.empty(M, H + R, dtype=dt, device=x.device)  # [xs | s·u13]
    xs = xa[:, :H]
    u13 = torch.empty(M, R, dtype=dt, device=x.device)  # (M, R), scaled; kept for backward
    if not gather_lowrank(x, tok, offs, A13, s, xs, [xa[:, H:], u13]):  # the gather and u13 in one pass
        gather_rows(x, tok, out=xs)
        torch.mul(grouped_mm(xs, A13.to(dt).transpose(1, 2), offs), s, out=u13)
        xa[:, H:].copy_(u13)
    # (E, 2I, H + R): [[W1 | B1], [W3 | B3]] (shared A) or [[W1 | B1 | 0], [W3 | 0 | B3]], the B's placed (and
    # cast) by the dequantization launches themselves
    Wa = dequantize_nf4_stack([w1, w3], dt, cols=H + R, extras=_b13_extras(lora, H, I, R, shared))
    h13 = grouped_mm(xa, Wa.transpose(1, 2), offs)  # (M, 2I)
    return h13, u13, xs, Wa


def _b13_extras(lora, H, I, R, shared):
    """The B columns beside [W1; W3] (column H on): one Extra per weight."""
    B = {n: lora[n][1] if n in lora else None for n in ("w1", "w3")}
    if shared:
        return [Extra(B["w1"], 0, H, R), Extra(B["w3"], I, H, R)]
    r = R // 2
    return [Extra(B["w1"], 0, H, R, at=0, height=I), Extra(B["w3"], I, H, R, at=r, height=I)]


def _a13_extras(lora, I, H, R, shared):
    """The A rows below [W1; W3] (row 2I on), for dxs: one Extra per weight (w3's none when A is shared)."""
    if shared:
        return [Extra(lora["w1"][0], 2 * I, 0, H), None]
    r = R // 2
    return [Extra(lora[n][0] if n in lora else None, 2 * I + off, 0, H, height=r)
            for n, off in (("w1", 0), ("w3", r))]


def _cast_lora(params: dict, dt, shared: bool) -> dict:
    """{name: (A, B)} -> compute-dtype copies {name: (A, B)}, a shared A cast once (the FP8 path's operands)."""
    lc = {n: (A.to(dt), B.to(dt)) for n, (A, B) in params.items() if not (shared and n == "w3")}
    if shared:
        lc["w3"] = (lc["w1"][0], params["w3"][1].to(dt))
    return lc


def _saved_lora(names, rest, dt, shared=False):
    """The saved LoRA parameters -> (their dtypes {name: (A, B)}, compute-dtype copies {name: (A, B)})."""
    params = _saved_params(names, rest)
    return ({n: (A.dtype, B.dtype) for n, (A, B) in params.items()}, _cast_lora(params, dt, shared))


def _saved_params(names, rest) -> dict:
    """The saved LoRA parameters, as saved (no copies): {name: (A, B)}."""
    return {n: (rest[2 * i], rest[2 * i + 1]) for i, n in enumerate(names)}


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
        # the LoRA parameters as they are (fp32): each is cast where it is used, in the pass that places it
        lora = {n: (ab[2 * i], ab[2 * i + 1]) for i, n in enumerate(_NAMES) if ab[2 * i] is not None}

        h13, u13 = _up(x, tok, offs, w1, w3, lora, s, I, dt, shared)[:2]  # the weight buffer is freed here
        if "w2" in lora:
            A2, B2 = lora["w2"]
            r2 = A2.shape[1]
            ga = torch.empty(M, I + r2, dtype=dt, device=x.device)  # [g | s·u2]
            g = swiglu_forward(h13, out=ga[:, :I])  # (M, I) view
            u2 = grouped_mm(g, A2.to(dt).transpose(1, 2), offs).mul_(s)  # (M, r), scaled
            ga[:, I:].copy_(u2)
            W2a = dequantize_nf4_stack([w2], dt, cols=I + r2, extras=[Extra(B2, 0, I, r2)])  # (E, H, I + r): [W2 | B2]
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
        # the LoRA parameters themselves (already resident), not compute-dtype copies; u13 and u2 scaled by s.
        # Not y: the routing weights' gradient comes out of the SwiGLU backward (see backward)
        ctx.save_for_backward(x, topk_weight, order, inv, offs, h13 if save_h else None, u13, u2,
                              *[t for n in lora for t in lora[n]])
        return out

    @staticmethod
    def backward(ctx, dout):
        # The w2 part runs on the UNWEIGHTED gradient dy_u[m] = dout[tok[m]], so its product is dg_u, with
        # dL/dg[m] = w[m] dg_u[m]. Since y[m] = W2 g[m] + s B2 A2 g[m] and dg_u[m] = W2^T dy_u[m] + s A2^T B2^T
        # dy_u[m], the routing weight's gradient <dout[tok[m]], y[m]> equals <dg_u[m], g[m]>: y need not be kept.
        # The SwiGLU backward applies w[m] to dg_u and forms that dot product in the same pass.
        w1, w3, w2, s, save_h, I, k, names, shared = ctx.meta
        x, topk_weight, order, inv, offs, h13, u13, u2, *rest = ctx.saved_tensors
        N, H = x.shape
        E = w1.shape[0]
        M = order.numel()
        dt = x.dtype
        lora = _saved_params(names, rest)
        pdt = {n: (A.dtype, B.dtype) for n, (A, B) in lora.items()}
        tok = order // k
        dout = dout.contiguous()
        xs = Wa = None
        wsort = topk_weight.reshape(-1)[order].float()  # (M,) routing weight of each sorted assignment
        grads = {}
        r2 = lora["w2"][0].shape[1] if "w2" in lora else 0
        ya = torch.empty(M, H + r2, dtype=dt, device=x.device)  # [dy_u | du2_u]
        dy = ya[:, :H]  # (M, H) view: dout of each assignment's token, unweighted
        # ---- w2:  dg_u = [dy_u | du2_u] @ [W2; A2]
        if "w2" in lora:
            A2, B2 = lora["w2"]
            du2 = torch.empty(M, r2, dtype=dt, device=x.device)  # (M, r) = s · dy_u @ B2
            # the gather of dout and du2 in one pass (B2 (E, H, r) read as its (E, r, H) transpose)
            if not gather_lowrank(dout, tok, offs, B2.transpose(1, 2), s, dy, [ya[:, H:], du2]):
                gather_rows(dout, tok, out=dy)
                B2s = torch.empty(B2.shape, dtype=dt, device=x.device)
                _put(B2s, B2, s)  # s · B2 in the compute dtype, one pass
                du2 = grouped_mm(dy, B2s, offs)
                del B2s
                ya[:, H:].copy_(du2)
            W2b = dequantize_nf4_stack([w2], dt, rows=H + r2, extras=[Extra(A2, H, 0, I)])  # (E, H + r, I): [W2; A2]
            dg = grouped_mm(ya, W2b, offs)  # (M, I), unweighted
            del W2b
            # dB2 = (s u2)^T dy = (w ⊙ s u2)^T dy_u, straight in B2's (E, H, r) layout (u2 carries s)
            wd = wsort[:, None].to(dt)  # (M, 1)
            dB2 = grouped_mm_k(dy.t(), u2.mul(wd), offs)
            du2.mul_(wd)  # the weighted du2, for dA2
        else:
            gather_rows(dout, tok, out=dy)
            W2 = dequantize_nf4(w2, dt)  # (E, H, I)
            dg = grouped_mm(dy, W2, offs)  # (M, I), unweighted
            del W2
        del dy, ya
        if h13 is None:  # grouped_lowmem: recompute h13 now, keeping the dequantized [W1; W3] for dxs below
            h13, _, xs, Wa = _up(x, tok, offs, w1, w3, lora, s, I, dt, shared)
        # ---- SwiGLU backward on w ⊙ dg_u; g (for dA2) comes out of the same pass, written over dg, and so does
        # the routing weights' gradient <dg_u, g>
        R = u13.shape[1] if u13 is not None else 0  # 2r, or r with a shared A
        r = R // 2
        rw = R if Wa is None else 0  # with Wa reused, du13 @ A13 is a separate product
        dha = torch.empty(M, 2 * I + rw, dtype=dt, device=x.device)  # [dh13 | du13]
        dh13, g, dws = swiglu_backward(h13, dg, out=dha[:, :2 * I], want_g=True, row_scale=wsort, want_dot=True)
        if "w2" in lora:
            grads["w2"] = (grouped_mm_k(du2.t(), g, offs), dB2)  # dA2 (E, r, I)
        del dg, g, h13
        dtw = dws[inv].view(N, k).to(topk_weight.dtype)
        # ---- w1/w3:  dxs = [dh13 | du13] @ [W13; A13]
        if u13 is None:
            W13 = Wa if Wa is not None else dequantize_nf4_stack([w1, w3], dt)  # (E, 2I, H)
            dxs = grouped_mm(dh13, W13, offs)  # (M, H)
            del W13, Wa
        else:
            du13 = grouped_mm(dh13, _bblk(lora, E, I, r, dt, x.device, shared, s), offs)  # (M, R), carries s
            if Wa is not None:  # dxs = dh13 @ [W1; W3] (the forward's buffer, LoRA columns skipped) + du13 @ A13
                dxs = grouped_mm(dh13, Wa[:, :, :H], offs)  # (M, H)
                del Wa
                dxs += grouped_mm(du13, _cat_lora(lora, "w1", "w3", 1, shared, dt), offs)
            else:
                dha[:, 2 * I:].copy_(du13)
                Wb = dequantize_nf4_stack([w1, w3], dt, rows=2 * I + R,
                                          extras=_a13_extras(lora, I, H, R, shared))  # (E, 2I + R, H): [W13; A13]
                dxs = grouped_mm(dha, Wb, offs)  # (M, H)
                del Wb
            dA13 = None
            if xs is None:  # dA13 = du13^T x[tok] with the gather inside the product, else a gathered copy
                dA13 = gather_lowrank_wgrad(du13, x, tok, offs)
                xs = gather_rows(x, tok) if dA13 is None else None  # (M, H)
            _w13_lora_grads(grads, lora, du13, xs, u13, dh13, offs, r, I, shared, dA13)  # u13 carries s
        del dha, dh13
        dx = combine(dxs, inv, None, N, k)  # (N, H)
        return (dx, dtw, None, None, None, None, None, None, None, *_ab_grads(grads, pdt))


def moe_experts_grouped(x, topk_idx, topk_weight, w1, w3, w2, lora=None, save_h: bool = True):
    """x (N, H), topk_idx (N, k) long, topk_weight (N, k) -> (N, H); see the module docstring."""
    scaling, shared, ab = _lora_args(lora)
    return _GroupedMoE.apply(x, topk_weight, topk_idx, w1, w3, w2, scaling, save_h, shared, *ab)
