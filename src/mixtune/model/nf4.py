"""A frozen linear layer whose weight is stored in NF4 (`mixtune.quant.nf4.NF4Weight`).

    lin = NF4Linear(NF4Weight.quantize(w))    # w (out, in)
    y = lin(x)                                # x (..., in) -> (..., out), in x's dtype

The forward is `mixtune.kernels.nf4_linear` (fused dequantization on GPU; the backward re-dequantizes instead
of keeping the 16-bit weight).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..kernels import nf4_linear
from ..quant.nf4 import BLOCK, NF4Weight, dequantize_any  # noqa: F401  (re-exported: the model's storage)


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight and an optional 16-bit bias (frozen, kept as the checkpoint
    has it: Qwen2-MoE's q/k/v); computes in the input's dtype."""

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nf4_linear(x, self.weight)  # (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4"
                f"{', bias' if self.bias is not None else ''}")
