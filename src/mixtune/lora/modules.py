"""The LoRA modules: `LoRALinear` (one wrapped linear) and `ExpertLoRA` (one layer's stacked experts).

Linear targets become `LoRALinear`:
y = base(x) + (dropout(x) @ A^T) @ B^T * alpha / r, with A (r, in) kaiming-uniform (as peft) and B (out, r) zero.
Expert targets add one `ExpertLoRA` per layer as `experts.lora`:
A[name] (E, r, in), B[name] (E, out, r); `mixtune.kernels.moe_experts` applies them without forming B·A.

No target names here: which matrices to adapt is the caller's choice (`targets.apply_lora`), shapes come from
the wrapped modules.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..model.modeling import MixtralExperts
from ..model.nf4 import NF4Linear


def _uniform_kaiming(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """peft's A init: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn on CPU in fp32."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` / `NF4Linear` plus a trainable low-rank update. x (..., in) -> (..., out).
    A base bias (Qwen2-MoE's q/k/v) stays frozen inside `base(x)`; LoRA adds to it, as peft's bias="none".

    The adapter tensors (fp32 by default) are cast to the input's dtype for the product, as the expert kernel does.
    No `.weight` attribute on purpose: code that reads `weight` directly would silently drop the adapter."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        if self.lora_A.device.type != "meta":
            self.lora_A.copy_(_uniform_kaiming(tuple(self.lora_A.shape), self.in_features, gen))
            self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s · B @ A, (out, in) fp32 (for merging and tests; the forward never forms it)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.to(x.dtype)  # (r, in)
        b = self.lora_B.to(x.dtype)  # (out, r)
        u = self.dropout(x) @ a.t()  # (..., r)
        # y + s·u·Bᵀ in one GEMM whose epilogue adds y (one pass over the (..., out) output, not three)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), b.t(), alpha=self.scaling)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class ExpertLoRA(nn.Module):
    """LoRA for one layer's stacked experts, read by `mixtune.kernels.moe_experts(..., lora=...)`.

    A[name] (E, r, in), B[name] (E, out, r) for each name in `names`, in that order: a stacked (E, out, in) matrix
    of `experts` (Mixtral: w1/w3: in=H, out=I; w2: in=I, out=H); `scaling` = alpha / r. No dropout (as peft's
    target_parameters require). shared_gate_up_a (with both w1 and w3): A["w3"] IS A["w1"], one Parameter
    under both names — peft's LoRA on the fused gate_up_proj (A (r, H), B (2I, r) per expert), which the PEFT
    files still write per matrix (w1 and w3 keys with equal A); the kernels then run one rank-r product for
    both."""

    def __init__(self, experts: MixtralExperts, names: Iterable[str], r: int, alpha: float,
                 dtype: torch.dtype = torch.float32, shared_gate_up_a: bool = False):
        super().__init__()
        E = experts.num_experts
        self.num_experts, self.r, self.alpha, self.scaling = E, r, float(alpha), float(alpha) / r
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in dict.fromkeys(names):
            w = getattr(experts, name, None)  # a Parameter or an NF4Weight, (E, out, in)
            if getattr(w, "ndim", 0) != 3 or w.shape[0] != E:
                raise ValueError(f"ExpertLoRA: {name!r} is not a stacked expert matrix of {type(experts).__name__}")
            fout, fin = w.shape[1], w.shape[2]
            self.A[name] = nn.Parameter(torch.zeros(E, r, fin, device=w.device, dtype=dtype))  # (E, r, in)
            self.B[name] = nn.Parameter(torch.zeros(E, fout, r, device=w.device, dtype=dtype))  # (E, out, r)
        self.shared_gate_up_a = bool(shared_gate_up_a and "w1" in self.A and "w3" in self.A)
        if self.shared_gate_up_a:
            self.A["w3"] = self.A["w1"]

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        for name in self.A:
            A = self.A[name]
            if self.shared_gate_up_a and name == "w3":
                self.B[name].zero_()  # its A is w1's, drawn once
            elif A.device.type != "meta":
                A.copy_(_uniform_kaiming(tuple(A.shape), A.shape[-1], gen))
                self.B[name].zero_()

    def delta_weight(self, name: str, e: int) -> torch.Tensor:
        """s · B_e @ A_e for expert e's `name` matrix, (out, in) fp32."""
        return (self.B[name][e].float() @ self.A[name][e].float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"targets={list(self.A.keys())}, experts={self.num_experts}, r={self.r}, alpha={self.alpha:g}"
                + (", gate/up share A" if self.shared_gate_up_a else ""))
