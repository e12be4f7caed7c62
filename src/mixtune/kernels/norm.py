"""RMSNorm that saves only its input and the per-row inverse RMS for backward.

    y = rms_norm(x (..., H), weight (H,), eps)  ==  weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)

The same arithmetic as `mixtune.model.modeling.RMSNorm`; autograd through that module keeps several fp32
copies of x per norm (≈ 3·4 bytes per element), this keeps x (2 bytes) and one fp32 per row. Triton on CUDA
(one program per row); PyTorch elsewhere.
"""

from __future__ import annotations

import functools

import torch

from ._triton import use_triton


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(x_ptr, w_ptr, y_ptr, r_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < H
        x = tl.load(x_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        n = (x * r).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + c, mask=m, other=0.0)
        tl.store(y_ptr + row * H + c, (w.to(tl.float32) * n.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(r_ptr + row, r)

    @triton.jit
    def bwd(x_ptr, w_ptr, dy_ptr, r_ptr, dx_ptr, H, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < H
        x = tl.load(x_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row)
        xh = x * r
        dn = dy * w
        dx = r * (dn - xh * (tl.sum(dn * xh, axis=0) / H))
        tl.store(dx_ptr + row * H + c, dx.to(dx_ptr.dtype.element_ty), mask=m)

    return fwd, bwd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, triton=None):
        H = x.shape[-1]
        x2 = x.reshape(-1, H).contiguous()  # (R, H)
        ctx.triton = triton
        if use_triton(x2, triton) and w.dtype == x.dtype:
            y = torch.empty_like(x2)
            r = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            _kernels()[0][(x2.shape[0],)](x2, w, y, r, H, eps, BLOCK=triton_next_pow2(H), num_warps=8)
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
            _kernels()[1][(x2.shape[0],)](x2, w, dy2, r, dx, H, BLOCK=triton_next_pow2(H), num_warps=8)
        else:
            xh = x2.float() * r[:, None]
            dn = dy2.float() * w.float()
            dx = (r[:, None] * (dn - xh * (dn * xh).mean(-1, keepdim=True))).to(x2.dtype)
        return dx.view(dy.shape), dw, None, None


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, triton: bool | None = None) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps, triton)
