"""Frozen NF4 linear layer whose backward dequantizes the weight again instead of keeping it.

    y = nf4_linear(x (..., in), w4: NF4Weight (out, in)) -> (..., out)

Autograd through a plain `F.linear(x, w4.dequantize())` would keep the dense weight alive until backward
(84 MB per attention layer of Mixtral); here nothing is saved but the weight's 4-bit buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dequant import dequantize_nf4


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w4):
        ctx.w4 = w4
        return F.linear(x, dequantize_nf4(w4, x.dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantize_nf4(ctx.w4, dy.dtype), None


def nf4_linear(x: torch.Tensor, w4) -> torch.Tensor:
    if not torch.is_grad_enabled() or not x.requires_grad:
        return F.linear(x, dequantize_nf4(w4, x.dtype))
    return _NF4Linear.apply(x, w4)
