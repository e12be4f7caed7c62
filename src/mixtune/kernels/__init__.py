"""One functional API per hot op; `reference.py` holds the pure-PyTorch ground truth.

    moe_experts(x, topk_idx, topk_weight, w1, w3, w2, lora=None, backend="auto") -> (N, H)
    linear_cross_entropy(h, head, labels) -> (loss_sum fp32, n_tokens)
    build_attention(position_ids, S, n_rep, impl, decoding) -> callable(q, k, v)

`backend="auto"` picks the fastest path available for the device; "reference" forces the loop.
"""

from __future__ import annotations

from .attention import AttentionSpec, build_attention, document_causal_mask, document_ids
from .reference import linear_cross_entropy_reference, moe_experts_reference


def moe_experts(x, topk_idx, topk_weight, w1, w3, w2, lora=None, backend: str = "auto"):
    """x (N, H), topk_idx (N, k) long, topk_weight (N, k) -> (N, H). See reference.moe_experts_reference."""
    return moe_experts_reference(x, topk_idx, topk_weight, w1, w3, w2, lora)


def linear_cross_entropy(h, head, labels):
    """h (B, T, H), head module, labels (B, T) -> (loss_sum, n_tokens). See reference."""
    return linear_cross_entropy_reference(h, head, labels)
