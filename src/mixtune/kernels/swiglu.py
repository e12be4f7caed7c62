"""SwiGLU on a fused [h1 | h3] activation: g = silu(h1) * h3, and its backward, one pass each.

    g = swiglu_forward(h13)              # h13 (M, 2I) -> (M, I)
    dh13 = swiglu_backward(h13, dg)      # dg (M, I) -> (M, 2I) = [dL/dh1 | dL/dh3]
    dh13, g, dot = swiglu_backward(h13, dg, want_g=True, row_scale=w, want_dot=True)  # the MoE's backward

Computed in fp32, rounded once. Triton on CUDA; PyTorch elsewhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._triton import use_triton

BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(h_ptr, g_ptr, I, g_ld, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = col < I
        h1 = tl.load(h_ptr + row * 2 * I + col, mask=m, other=0.0).to(tl.float32)
        h3 = tl.load(h_ptr + row * 2 * I + I + col, mask=m, other=0.0).to(tl.float32)
        g = h1 * tl.sigmoid(h1) * h3
        tl.store(g_ptr + row * g_ld + col, g.to(g_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def bwd(h_ptr, dg_ptr, dh_ptr, g_ptr, w_ptr, dot_ptr, I, dh_ld, WRITE_G: tl.constexpr, SCALE: tl.constexpr,
            DOT: tl.constexpr, BLOCK: tl.constexpr):
        # one row per program, its I columns in BLOCK-wide steps (the row's dot product stays in the program)
        row = tl.program_id(0).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32) if SCALE else 1.0
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, I, BLOCK):
            col = c + tl.arange(0, BLOCK)
            m = col < I
            h1 = tl.load(h_ptr + row * 2 * I + col, mask=m, other=0.0).to(tl.float32)
            h3 = tl.load(h_ptr + row * 2 * I + I + col, mask=m, other=0.0).to(tl.float32)
            dg = tl.load(dg_ptr + row * I + col, mask=m, other=0.0).to(tl.float32)
            s = tl.sigmoid(h1)
            g = h1 * s * h3
            if DOT:
                acc += dg * g
            d = dg * w
            dh3 = d * h1 * s
            dh1 = d * h3 * s * (1.0 + h1 * (1.0 - s))
            tl.store(dh_ptr + row * dh_ld + col, dh1.to(dh_ptr.dtype.element_ty), mask=m)
            tl.store(dh_ptr + row * dh_ld + I + col, dh3.to(dh_ptr.dtype.element_ty), mask=m)
            if WRITE_G:  # the forward's g = silu(h1)·h3, recomputed for free from the loads above
                tl.store(g_ptr + row * I + col, g.to(g_ptr.dtype.element_ty), mask=m)
        if DOT:
            tl.store(dot_ptr + row, tl.sum(acc, axis=0))

    return fwd, bwd


def _rowmajor(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.stride(0) >= t.shape[1]


def swiglu_forward(h13: torch.Tensor, triton: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """h13 (M, 2I) -> g (M, I); `out` may be a row-strided (M, I) view (e.g. the left part of a wider buffer)."""
    M, I2 = h13.shape
    I = I2 // 2
    if not use_triton(h13, triton) or M == 0 or (out is not None and not _rowmajor(out)):
        g = F.silu(h13[:, :I].float()).mul_(h13[:, I:].float()).to(h13.dtype)
        if out is None:
            return g
        out.copy_(g)
        return out
    h13 = h13.contiguous()
    g = torch.empty(M, I, dtype=h13.dtype, device=h13.device) if out is None else out
    _kernels()[0][(M, (I + BLOCK - 1) // BLOCK)](h13, g, I, g.stride(0), BLOCK=BLOCK, num_warps=4)
    return g


def swiglu_backward(h13: torch.Tensor, dg: torch.Tensor, triton: bool | None = None,
                    out: torch.Tensor | None = None, want_g: bool = False, row_scale: torch.Tensor | None = None,
                    want_dot: bool = False):
    """-> dh13 (M, 2I) = [dL/dh1 | dL/dh3] for the upstream gradient row_scale[m] * dg[m] (row_scale (M,), or
    none); `out` may be a row-strided (M, 2I) view. With want_g, also g = swiglu_forward(h13), computed in the
    same pass and written over dg's buffer (each element of dg is read before its g is stored there), so dg must
    not be used afterwards. With want_dot, also dot (M,) fp32 = sum_i dg[m, i] * g[m, i] (dg unscaled): the
    MoE's routing-weight gradient when dg is the unweighted gradient of g. Returns dh13, then g, then dot (those
    asked for)."""
    M, I2 = h13.shape
    I = I2 // 2
    if not use_triton(h13, triton) or M == 0 or (out is not None and not _rowmajor(out)):
        h1, h3, d = h13[:, :I].float(), h13[:, I:].float(), dg.float()
        s = torch.sigmoid(h1)
        g = h1 * s * h3
        dot = (d * g).sum(1) if want_dot else None
        if row_scale is not None:
            d = d * row_scale.float()[:, None]
        dh3 = d * h1 * s
        dh1 = d * h3 * s * (1 + h1 * (1 - s))
        dh = torch.cat([dh1, dh3], dim=1).to(h13.dtype)  # (M, 2I)
        if out is not None:
            out.copy_(dh)
            dh = out
        res = [dh]
        if want_g:
            res.append(dg.copy_(g) if dg.dtype == h13.dtype else g.to(h13.dtype))
        if want_dot:
            res.append(dot)
        return res[0] if len(res) == 1 else tuple(res)
    h13, dg = h13.contiguous(), dg.contiguous()
    dh = torch.empty_like(h13) if out is None else out
    g = dg
    dot = torch.empty(M, dtype=torch.float32, device=h13.device) if want_dot else dh
    w = row_scale.contiguous() if row_scale is not None else dh  # any pointer when unscaled
    _kernels()[1][(M,)](h13, dg, dh, g, w, dot, I, dh.stride(0), WRITE_G=want_g, SCALE=row_scale is not None,
                        DOT=want_dot, BLOCK=BLOCK, num_warps=4)
    res = [dh] + ([g] if want_g else []) + ([dot] if want_dot else [])
    return res[0] if len(res) == 1 else tuple(res)
