"""Token routing for the grouped MoE: gather tokens into expert order, combine the expert outputs back, and the
combine's backward — each one pass over memory instead of PyTorch's gather + multiply + reduce chains.

    gather_rows(x (N, H), idx (M,), out=None)       -> out[m, :H] = x[idx[m]]   (out may be a wider buffer's view)
    combine(y (M, H), inv (N*k,), w (N, k) | None)  -> out[n] = sum_j w[n, j] * y[inv[n*k + j]]   (N, H)
    combine_backward(dout (N, H), tok (M,), y (M, H), wsort (M,), dy_out)
        -> dy_out[m] = wsort[m] * dout[tok[m]]  (written in place, may be a view) and
           dws (M,) fp32 = <dout[tok[m]], y[m]>    (the routing-weight gradient of assignment m)

Arithmetic in fp32, rounded once to the output dtype. Triton on CUDA; PyTorch elsewhere (and the tests compare
the two under `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools

import torch

from ._triton import use_triton

BLOCK = 1024


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(x_ptr, idx_ptr, out_ptr, H, x_ld, out_ld, BLOCK: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        msk = col < H
        src = tl.load(idx_ptr + m).to(tl.int64)
        v = tl.load(x_ptr + src * x_ld + col, mask=msk, other=0.0)
        tl.store(out_ptr + m * out_ld + col, v.to(out_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, H, y_ld, K: tl.constexpr, HAS_W: tl.constexpr,
                       BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        msk = col < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            src = tl.load(inv_ptr + n * K + j).to(tl.int64)
            v = tl.load(y_ptr + src * y_ld + col, mask=msk, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + n * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + n * H + col, acc.to(out_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def combine_bwd_kernel(dout_ptr, tok_ptr, y_ptr, w_ptr, dy_ptr, dws_ptr, H, y_ld, dy_ld,
                           BLOCK: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)
        t = tl.load(tok_ptr + m).to(tl.int64)
        w = tl.load(w_ptr + m).to(tl.float32)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, H, BLOCK):
            col = c + tl.arange(0, BLOCK)
            msk = col < H
            d = tl.load(dout_ptr + t * H + col, mask=msk, other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + m * y_ld + col, mask=msk, other=0.0).to(tl.float32)
            acc += d * yv
            tl.store(dy_ptr + m * dy_ld + col, (d * w).to(dy_ptr.dtype.element_ty), mask=msk)
        tl.store(dws_ptr + m, tl.sum(acc, axis=0))

    return gather_kernel, combine_kernel, combine_bwd_kernel


def _rows_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor whose rows are contiguous (possibly the left part of a wider row-major buffer)."""
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]


def gather_rows(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None,
                triton: bool | None = None) -> torch.Tensor:
    """out[m] = x[idx[m]] for x (N, H); `out` (M, H) may be a row-strided view."""
    M, H = idx.numel(), x.shape[1]
    if out is None:
        out = torch.empty(M, H, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if not use_triton(x, triton) or not _rows_ok(out) or not _rows_ok(x):
        torch.index_select(x, 0, idx, out=out) if out.is_contiguous() else out.copy_(x[idx])
        return out
    _kernels()[0][(M, _cdiv(H, BLOCK))](x, idx.contiguous(), out, H, x.stride(0), out.stride(0), BLOCK=BLOCK,
                                              num_warps=4)
    return out


def combine(y: torch.Tensor, inv: torch.Tensor, w: torch.Tensor | None, N: int, k: int,
            triton: bool | None = None) -> torch.Tensor:
    """out[n] = sum_j w[n, j] * y[inv[n*k + j]] (w=None: weights 1), fp32 accumulation -> (N, H) in y's dtype."""
    H = y.shape[1]
    if N == 0:
        return y.new_zeros(0, H)
    if not use_triton(y, triton) or not _rows_ok(y):
        g = y[inv].view(N, k, H).float()
        if w is not None:
            g = g * w.float()[:, :, None]
        return g.sum(1).to(y.dtype)
    out = torch.empty(N, H, dtype=y.dtype, device=y.device)
    wt = w.contiguous() if w is not None else inv  # any pointer when there are no weights
    _kernels()[1][(N, _cdiv(H, BLOCK))](y, inv.contiguous(), wt, out, H, y.stride(0), K=k,
                                              HAS_W=w is not None, BLOCK=BLOCK, num_warps=4)
    return out


def combine_backward(dout: torch.Tensor, tok: torch.Tensor, y: torch.Tensor, wsort: torch.Tensor,
                     dy_out: torch.Tensor, triton: bool | None = None) -> torch.Tensor:
    """Writes dy_out[m] = wsort[m] * dout[tok[m]]; returns dws (M,) fp32 with dws[m] = <dout[tok[m]], y[m]>."""
    M, H = y.shape
    if M == 0:
        return torch.zeros(0, dtype=torch.float32, device=y.device)
    if not use_triton(y, triton) or not (_rows_ok(y) and _rows_ok(dy_out)):
        d = dout[tok].float()
        dws = (d * y.float()).sum(-1)
        dy_out.copy_(d * wsort.float()[:, None])
        return dws
    dout = dout.contiguous()
    dws = torch.empty(M, dtype=torch.float32, device=y.device)
    _kernels()[2][(M,)](dout, tok.contiguous(), y, wsort.contiguous(), dy_out, dws, H, y.stride(0),
                        dy_out.stride(0), BLOCK=BLOCK, num_warps=4)
    return dws
