"""RMSNorm that saves only its input and the per-row inverse RMS for backward.

    y = rms_norm(x (..., H), weight (H,), eps)  ==  weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)

The same arithmetic as `mixtune.model.modeling.RMSNorm`; autograd through that module keeps several fp32
copies of x per norm (≈ 3·4 bytes per element), this keeps x (2 bytes) and one fp32 per row. Triton on CUDA
(a program takes one wide row or several narrow ones); PyTorch elsewhere.
"""

from __future__ import annotations

import functools

import torch

from ._triton import use_triton


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    # ROWS rows of H per program, (ROWS, BLOCK) tiles: a wide row (the hidden state) is one program, a narrow one
    # (Qwen3's per-head q/k norms, H = 128 over tokens x heads rows) shares a program with others instead of
    # leaving most of a program's threads idle (one program per 128-wide row was 8% of a Qwen3 step).
    @triton.jit
    def fwd(x_ptr, w_ptr, y_ptr, r_ptr, R, H, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        c = tl.arange(0, BLOCK)
        rm = rows < R
        cm = c < H
        m = rm[:, None] & cm[None, :]
        offs = rows[:, None] * H + c[None, :]  # (ROWS, BLOCK)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)  # (ROWS,)
        n = (x * r[:, None]).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (w[None, :] * n.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(r_ptr + rows, r, mask=rm)

    @triton.jit
    def bwd(x_ptr, w_ptr, dy_ptr, r_ptr, dx_ptr, R, H, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        c = tl.arange(0, BLOCK)
        rm = rows < R
        cm = c < H
        m = rm[:, None] & cm[None, :]
        offs = rows[:, None] * H + c[None, :]  # (ROWS, BLOCK)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=rm, other=0.0)  # (ROWS,)
        xh = x * r[:, None]
        dn = dy * w[None, :]
        dx = r[:, None] * (dn - xh * (tl.sum(dn * xh, axis=1) / H)[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)

    return fwd, bwd


def _launch(R: int, H: int):
    """(grid, BLOCK, ROWS, num_warps) for R rows of H: about 2,048 elements per program at least."""
    block = triton_next_pow2(H)
    rows = max(1, min(64, 2048 // block))
    warps = 8 if block >= 2048 else 4
    return (triton_cdiv(R, rows),), block, rows, warps


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, triton=None):
        H = x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()  # (R, H)
        ctx.triton = triton
        if use_triton(x2, triton) and w.dtype == x.dtype:
            y = torch.empty_like(x2)
            r = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            grid, block, rows, warps = _launch(x2.shape[0], H)
            _kernels()[0][grid](x2, w, y, r, x2.shape[0], H, eps, BLOCK=block, ROWS=rows, num_warps=warps)
        else:
            xf = x2.float()
            r = torch.rsqrt(xf.pow(2).mean(-1) + eps)  # (R,)
            y = w * (xf * r[:, None]).to(x.dtype)
        ctx.eps = eps
        ctx.save_for_backward(x2, w, r)
        return y.view(x.shape[:-1] + (y.shape[-1],))

    @staticmethod
    def backward(ctx, dy):
        x2, w, r = ctx.saved_tensors
        H = x2.shape[-1]
        dy2 = dy.reshape(-1, H).contiguous()
        dw = None
        if ctx.needs_input_grad[1]:
            n = (x2.float() * r[:, None]).to(x2.dtype)
            dw = (dy2.float() * n.float()).sum(0).to(w.dtype)
        if not ctx.needs_input_grad[0]:
            return None, dw, None, None
        if use_triton(x2, ctx.triton) and w.dtype == x2.dtype:
            dx = torch.empty_like(x2)
            grid, block, rows, warps = _launch(x2.shape[0], H)
            _kernels()[1][grid](x2, w, dy2, r, dx, x2.shape[0], H, BLOCK=block, ROWS=rows, num_warps=warps)
        else:
            xh = x2.float() * r[:, None]
            dn = dy2.float() * w.float()
            dx = (r[:, None] * (dn - xh * (dn * xh).mean(-1, keepdim=True))).to(x2.dtype)
        return dx.view(dy.shape), dw, None, None


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, triton: bool | None = None) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps, triton)
