"""Token routing for the grouped MoE: gather tokens into expert order and combine the expert outputs back —
each one pass over memory instead of PyTorch's gather + multiply + reduce chains. (The combine's backward is a
gather of the output gradient: the routing weights' gradient comes out of the SwiGLU backward, kernels/moe.py.)

    gather_rows(x (N, H), idx (M,), out=None)       -> out[m, :H] = x[idx[m]]   (out may be a wider buffer's view)
    combine(y (M, H), inv (N*k,), w (N, k) | None)  -> out[n] = sum_j w[n, j] * y[inv[n*k + j]]   (N, H)

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

    return gather_kernel, combine_kernel


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
