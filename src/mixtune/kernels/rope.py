"""Rotary position embedding on q and k in one pass each (forward and backward), instead of PyTorch's
chunk / neg / cat / mul / mul / add chain (five full passes over q).

    q, k = apply_rope(q (B, nh, T, d), k (B, nkv, T, d), cos (B, T, d), sin (B, T, d))

Same function as `mixtune.model.modeling.apply_rope` (rotate-half convention, as transformers' Mixtral):
    y[:h] = x[:h]·cos[:h] − x[h:]·sin[:h],   y[h:] = x[h:]·cos[h:] + x[:h]·sin[h:]      (h = d/2)
and its transpose for the gradient. fp32 arithmetic, rounded once. The outputs keep the inputs' layout
((B, T, n, d) storage seen as (B, n, T, d), as the projections produce it). Triton on CUDA; PyTorch elsewhere.
"""

from __future__ import annotations

import functools

import torch

from ._triton import use_triton


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, NH, sxb, sxh, sxt, scb, sct, sob, soh, sot,
                    HALF: tl.constexpr, NH_P: tl.constexpr, BACKWARD: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one (b, t) per program, all heads
        b = pid // T
        t = pid - b * T
        h = tl.arange(0, NH_P)[:, None]
        j = tl.arange(0, HALF)[None, :]
        m = h < NH
        c1 = tl.load(cos_ptr + b * scb + t * sct + j).to(tl.float32)
        c2 = tl.load(cos_ptr + b * scb + t * sct + HALF + j).to(tl.float32)
        s1 = tl.load(sin_ptr + b * scb + t * sct + j).to(tl.float32)
        s2 = tl.load(sin_ptr + b * scb + t * sct + HALF + j).to(tl.float32)
        xp = x_ptr + b * sxb + t * sxt + h * sxh + j
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the rotation
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        op = out_ptr + b * sob + t * sot + h * soh + j
        tl.store(op, y1.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(op + HALF, y2.to(out_ptr.dtype.element_ty), mask=m)

    return rope_kernel


def _rope_reference(x, cos, sin, backward=False):
    h = x.shape[-1] // 2
    c, s = cos[:, None].float(), sin[:, None].float()
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    if backward:
        y = torch.cat([x1 * c[..., :h] + x2 * s[..., h:], x2 * c[..., h:] - x1 * s[..., :h]], dim=-1)
    else:
        y = torch.cat([x1 * c[..., :h] - x2 * s[..., :h], x2 * c[..., h:] + x1 * s[..., h:]], dim=-1)
    return y.to(x.dtype)


def _rope_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, triton) -> torch.Tensor:
    """x (B, n, T, d) -> rotated, in a (B, T, n, d) buffer seen as (B, n, T, d)."""
    B, NH, T, D = x.shape
    if (not use_triton(x, triton) or D % 2 or x.stride(-1) != 1 or cos.stride(-1) != 1
            or cos.stride() != sin.stride() or (D // 2) & (D // 2 - 1)):
        return _rope_reference(x, cos, sin, backward)
    out = torch.empty(B, T, NH, D, dtype=x.dtype, device=x.device).transpose(1, 2)
    if x.numel() == 0:
        return out
    cos = cos.expand(B, T, D)
    sin = sin.expand(B, T, D)
    _kernel()[(B * T,)](x, cos, sin, out, T, NH, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                        cos.stride(1), out.stride(0), out.stride(1), out.stride(2), HALF=D // 2,
                        NH_P=max(1, 1 << (NH - 1).bit_length()), BACKWARD=backward, num_warps=4)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, triton):
        ctx.save_for_backward(cos, sin)
        ctx.triton = triton
        return _rope_one(q, cos, sin, False, triton), _rope_one(k, cos, sin, False, triton)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        t = ctx.triton
        return (_rope_one(dq, cos, sin, True, t) if dq is not None else None,
                _rope_one(dk, cos, sin, True, t) if dk is not None else None, None, None, None)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               triton: bool | None = None):
    """q (B, nh, T, d), k (B, nkv, T, d), cos/sin (B or 1, T, d) -> rotated (q, k)."""
    return _Rope.apply(q, k, cos.detach(), sin.detach(), triton)
