"""A frozen linear layer whose weight is stored in NF4 (`mixtune.quant.nf4.NF4Weight`).

    lin = NF4Linear(NF4Weight.quantize(w))    # w (out, in)
    y = lin(x)                                # x (..., in) -> (..., out), in x's dtype

The forward is `mixtune.kernels.nf4_linear` (fused dequantization on GPU; the backward re-dequantizes instead
of keeping the 16-bit weight).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import nf4_linear
from ..quant.nf4 import BLOCK, NF4Weight, dequantize_any  # noqa: F401  (re-exported: the model's storage)


class NF4Linear(nn.Module):
    """A frozen bias-free linear layer with an NF4 weight; computes in the input's dtype."""

    def __init__(self, weight: NF4Weight):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"
