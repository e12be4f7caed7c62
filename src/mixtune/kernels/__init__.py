"""One functional API per hot op; `reference.py` holds the pure-PyTorch ground truth.

    moe_experts(x, topk_idx, topk_weight, w1, w3, w2, lora=None, backend="auto") -> (N, H)
    linear_cross_entropy(h, head, labels) -> (loss_sum fp32, n_tokens)
    build_attention(position_ids, S, n_rep, impl, decoding) -> callable(q, k, v)
    rms_norm(x, weight, eps) -> like x;  nf4_linear(x, w4) -> x @ W^T;  apply_rope(q, k, cos, sin) -> (q, k)
    moe_route(logits (N, E), k, renormalize, weights=None) -> (topk_w (N, k) fp32, topk_idx (N, k), RouterStats)

MoE backends: "reference" (the per-expert loop), "grouped" (sorted tokens, grouped matrix products, fused
NF4 dequantization; saves the (M, 2I) expert pre-activations), "grouped_lowmem" (the same, recomputing those
in backward), "auto" (= grouped on CUDA, reference elsewhere).
Expert precision: "bf16", or "fp8" (the grouped backends' four large products in e4m3 with row-wise scales,
`moe_fp8.py`; on CPU emulated exactly, for tests).
"""

from __future__ import annotations

from .attention import AttentionSpec, build_attention, document_causal_mask, document_ids
from .reference import linear_cross_entropy_reference, moe_experts_reference

MOE_BACKENDS = ("auto", "reference", "grouped", "grouped_lowmem")
EXPERT_PRECISIONS = ("bf16", "fp8")


def moe_experts(x, topk_idx, topk_weight, w1, w3, w2, lora=None, backend: str = "auto", precision: str = "bf16"):
    """x (N, H), topk_idx (N, k) long, topk_weight (N, k) -> (N, H). See reference.moe_experts_reference."""
    if precision not in EXPERT_PRECISIONS:
        raise ValueError(f"unknown expert precision {precision!r}; choose one of {', '.join(EXPERT_PRECISIONS)}")
    fp8 = precision == "fp8"
    if backend == "auto":
        backend = "grouped" if x.is_cuda or fp8 else "reference"
    if lora is not None and getattr(lora, "dropout", 0.0):  # dropout on the expert input: the per-expert loop
        return moe_experts_reference(x, topk_idx, topk_weight, w1, w3, w2, lora)
    if backend == "reference":
        if fp8:
            raise ValueError("expert precision fp8 needs a grouped MoE backend (grouped or grouped_lowmem), "
                             "not reference")
        return moe_experts_reference(x, topk_idx, topk_weight, w1, w3, w2, lora)
    if backend in ("grouped", "grouped_lowmem"):
        if fp8:
            from .moe_fp8 import moe_experts_grouped_fp8 as fn
        else:
            from .moe import moe_experts_grouped as fn
        return fn(x, topk_idx, topk_weight, w1, w3, w2, lora, save_h=backend == "grouped")
    raise ValueError(f"unknown MoE backend {backend!r}; choose one of {', '.join(MOE_BACKENDS)}")


def linear_cross_entropy(h, head, labels, chunk_size: int = 4096, impl: str = "auto"):
    """h (B, T, H), head module, labels (B, T) -> (loss_sum, n_tokens). See reference."""
    if impl == "reference":
        return linear_cross_entropy_reference(h, head, labels)
    from .loss import linear_cross_entropy_chunked
    return linear_cross_entropy_chunked(h, head, labels, chunk_size)


def use_rope_kernel(q) -> bool:
    """Whether `apply_rope` runs the fused kernel on q (CUDA with Triton, or forced in tests)."""
    from ._triton import use_triton
    return use_triton(q)


def apply_rope(q, k, cos, sin):
    """Rotary embedding of q (B, nh, T, d) and k (B, nkv, T, d), fused; see kernels.rope."""
    from .rope import apply_rope as _rope
    return _rope(q, k, cos, sin)


def rms_norm(x, weight, eps: float):
    """RMSNorm as modeling.RMSNorm computes it (fp32 statistics, weight * normed.to(x.dtype)), saving only x."""
    from .norm import rms_norm as _rms
    return _rms(x, weight, eps)


def nf4_linear(x, w):
    """x (..., in) @ W^T for an NF4Weight W (out, in), re-dequantizing in backward instead of saving W."""
    from .linear import nf4_linear as _lin
    return _lin(x, w)


def moe_route(logits, k: int, renormalize: bool, weights=None, triton=None):
    """The router: fp32 softmax over logits (N, E), top-k, renormalised if asked -> (topk_w (N, k) fp32,
    topk_idx (N, k) int64, RouterStats: the load-balancing loss's per-expert sums, weighted by weights (N,));
    fused in Triton on CUDA (triton=True forces it, for the interpreter), see kernels.router. (Not
    `route`: that name is the submodule kernels.route, the tokens' gather / combine.)"""
    from .router import route as _route
    return _route(logits, k, renormalize, weights, triton)
