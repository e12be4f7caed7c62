"""Pure-PyTorch references: the ground truth every fast kernel is tested against.

They are also the CPU path. Shapes: N tokens, H hidden, I expert intermediate, E experts, k experts/token,
r LoRA rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.nf4 import NF4Weight


def expert_weight(w, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e's (out, in) matrix from a stacked tensor or NF4Weight, in dtype."""
    if isinstance(w, NF4Weight):
        return w.dequantize_expert(e, dtype)
    return w[e].to(dtype)


def _lora_delta(lora, name: str, e: int, x: torch.Tensor):
    """s * (x @ A_e^T) @ B_e^T for the named expert matrix, or None. x (n, in) -> (n, out)."""
    if lora is None or name not in lora.A:
        return None
    A = lora.A[name][e].to(x.dtype)  # (r, in)
    B = lora.B[name][e].to(x.dtype)  # (out, r)
    return (x @ A.t()) @ B.t() * lora.scaling


def moe_experts_reference(x, topk_idx, topk_weight, w1, w3, w2, lora=None):
    """x (N, H), topk_idx (N, k) long, topk_weight (N, k) -> (N, H) = sum_k weight * expert(x).

    A Python loop over experts; each expert's frozen weights are dequantized on the fly and its LoRA update
    is applied as two low-rank products (B·A is never formed)."""
    E = w1.shape[0]
    out = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.where(topk_idx == e)  # (n_e,)
        if tok.numel() == 0:
            continue
        xe = x[tok]  # (n_e, H)
        h1 = xe @ expert_weight(w1, e, x.dtype).t()  # (n_e, I)
        h3 = xe @ expert_weight(w3, e, x.dtype).t()
        d1, d3 = _lora_delta(lora, "w1", e, xe), _lora_delta(lora, "w3", e, xe)
        if d1 is not None:
            h1 = h1 + d1
        if d3 is not None:
            h3 = h3 + d3
        h = F.silu(h1) * h3  # (n_e, I)
        y = h @ expert_weight(w2, e, x.dtype).t()  # (n_e, H)
        d2 = _lora_delta(lora, "w2", e, h)
        if d2 is not None:
            y = y + d2
        y = y * topk_weight[tok, slot, None]
        out = out.index_add(0, tok, y)
    return out


def linear_cross_entropy_reference(h: torch.Tensor, head, labels: torch.Tensor):
    """h (B, T, H) final hidden states, head: the lm_head module, labels (B, T) unshifted (-100 = ignore).
    Returns (sum of token cross-entropies in fp32, number of label tokens). Position t predicts labels[t+1]."""
    logits = head(h[:, :-1]).float()  # (B, T-1, V)
    tgt = labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                               reduction="sum")
    return loss_sum, (tgt != -100).sum()
