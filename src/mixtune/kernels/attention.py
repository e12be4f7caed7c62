"""Attention over packed rows: plain causal, a per-example (document) causal mask, or a decode step.

    attn = build_attention(position_ids (B, T), S, n_rep, impl, decoding=False)
    o = attn(q (B, nh, T, d), k (B, nkv, S, d), v (B, nkv, S, d))  # -> (B, nh, T, d)

A new example starts wherever the position id is 0, so no token attends across an example boundary.
`impl`: "sdpa" (torch scaled_dot_product_attention with a dense boolean mask; on an H200 torch dispatches it
to cuDNN's fused attention), "eager" (explicit softmax, the reference), "flex" (FlexAttention with a
block-sparse document mask: blocks that cross an example boundary are skipped; compiled on CUDA, the unfused
reference implementation elsewhere; GQA without repeating k/v), "varlen" (FlashAttention's variable-length
kernel: the packed rows become one list of examples, each causal within itself, so no masked-out work is done
and no mask is built; GQA read directly; CUDA with bf16/fp16 on compute capability >= 8.0, and elsewhere the
dense-mask sdpa path), "auto" (= varlen where it runs, else sdpa).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids restarting at 0 per example -> (B, T) example index within the row."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=1)


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, 1, T, T) bool, True where query i may attend key j (same example, j <= i)."""
    doc = document_ids(position_ids)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    same = doc[:, :, None] == doc[:, None, :]
    return (same & causal)[:, None]


def is_single_document(position_ids: torch.Tensor) -> bool:
    """True when every row is one example starting at position 0 (plain causal attention suffices)."""
    T = position_ids.shape[1]
    ar = torch.arange(T, device=position_ids.device)
    return bool((position_ids == ar).all())


# sdpa with enable_gqa=True lets the fused kernel (cuDNN on an H200) read the shared k/v heads directly instead
# of materializing n_rep copies that autograd keeps for backward. Measured (BENCHMARKS.md, session 2 call 5):
# +1.4% tok/s at 4 layers, and 5.3 GiB less at 32 layers, micro-batch 14, with identical numerics. False
# restores the repeat (the benchmark's gqa=0).
SDPA_GQA = True


class AttentionSpec:
    """How one forward attends: plain causal, a dense boolean document mask, or a decode step."""

    def __init__(self, mask: Optional[torch.Tensor], is_causal: bool, n_rep: int, impl: str = "sdpa"):
        self.mask, self.is_causal, self.n_rep, self.impl = mask, is_causal, n_rep, impl

    def __call__(self, q, k, v):
        gqa = self.n_rep > 1 and SDPA_GQA and self.impl != "eager"
        if self.n_rep > 1 and not gqa:
            k = k.repeat_interleave(self.n_rep, dim=1)  # (B, nh, S, d)
            v = v.repeat_interleave(self.n_rep, dim=1)
        if self.impl == "eager":
            scale = 1.0 / math.sqrt(q.shape[-1])
            s = (q @ k.transpose(-1, -2)).float() * scale  # (B, nh, T, S)
            if self.mask is not None:
                s = s.masked_fill(~self.mask, float("-inf"))
            elif self.is_causal:
                T, S = s.shape[-2:]
                s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T), float("-inf"))
            return (s.softmax(-1).to(v.dtype) @ v)
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask,
                                                  is_causal=self.is_causal and self.mask is None, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask,
                                              is_causal=self.is_causal and self.mask is None)



_FLEX_COMPILED = {}


def _flex_attention(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention
    if device_type != "cuda":
        return flex_attention  # unfused reference path (CPU tests)
    if "fn" not in _FLEX_COMPILED:
        _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED["fn"]


class FlexAttentionSpec:
    """Document-causal attention through FlexAttention's block mask (built once per forward)."""

    def __init__(self, position_ids: torch.Tensor, n_rep: int):
        from torch.nn.attention.flex_attention import create_block_mask
        doc = document_ids(position_ids)  # (B, T) example index of each token
        B, T = doc.shape

        def mask_mod(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (kv <= q)

        self.block_mask = create_block_mask(mask_mod, B, None, T, T, device=position_ids.device)
        self.n_rep, self.impl, self.mask, self.is_causal = n_rep, "flex", None, False

    def __call__(self, q, k, v):
        """q (B, nh, T, d), k/v (B, nkv, T, d) -> (B, nh, T, d)."""
        fn = _flex_attention(q.device.type)
        return fn(q, k, v, block_mask=self.block_mask, enable_gqa=self.n_rep > 1)


def doc_boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids -> cu (n_examples + 1,) int32, the start of each example in the flattened (B*T,)
    tokens plus B*T at the end (one host sync: the number of examples). Every row starts an example, as in
    `document_ids` (tokens before a row's first position 0 form their own group)."""
    B, T = position_ids.shape
    starts = position_ids == 0  # (B, T)
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)  # (n_examples,) flat start indices, ascending
    return torch.cat([idx, idx.new_full((1,), B * T)]).to(torch.int32)


def flash_varlen_ok(device: torch.device) -> bool:
    """Whether FlashAttention's varlen kernel runs here: CUDA, compute capability >= 8.0, flash sdp enabled."""
    if device.type != "cuda" or not torch.backends.cuda.flash_sdp_enabled():
        return False
    return _flash_capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _flash_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8 and hasattr(torch.ops.aten, "_flash_attention_forward")


class _FlashVarlen(torch.autograd.Function):
    """Causal attention within each example of the flattened tokens: q (Tt, nh, d), k/v (Tt, nkv, d), cu (n+1,)
    int32 -> (Tt, nh, d). torch's FlashAttention ops called with their long-stable positional arguments."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused)
        return dq, dk, dv, None, None


def varlen_by_example(q, k, v, cu, max_len):
    """The same function as `_FlashVarlen` in plain PyTorch, example by example (the CPU path and the tests'
    reference for the flattening): q (Tt, nh, d), k/v (Tt, nkv, d) -> (Tt, nh, d)."""
    n_rep = q.shape[1] // k.shape[1]
    out = []
    for s, t in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qe, ke, ve = (x[s:t].transpose(0, 1) for x in (q, k, v))  # (heads, L, d)
        if n_rep > 1:
            ke, ve = ke.repeat_interleave(n_rep, 0), ve.repeat_interleave(n_rep, 0)
        out.append(F.scaled_dot_product_attention(qe, ke, ve, is_causal=True).transpose(0, 1))
    return torch.cat(out)


class VarlenAttentionSpec:
    """Document-causal attention over the packed rows as one flattened list of examples (`doc_boundaries`,
    computed once per forward). On CUDA FlashAttention's varlen kernel; elsewhere `varlen_by_example`. The
    longest example is bounded by the row length T, which the kernel is given instead (its grid's size only:
    blocks past an example's end exit at once) to spare a host sync."""

    def __init__(self, position_ids: torch.Tensor, n_rep: int):
        self.cu, self.max_len = doc_boundaries(position_ids), position_ids.shape[1]
        self.n_rep, self.impl, self.mask, self.is_causal = n_rep, "varlen", None, False
        self.flash = flash_varlen_ok(position_ids.device)
        self.position_ids = position_ids
        self._dense = None

    def __call__(self, q, k, v):
        """q (B, nh, T, d), k/v (B, nkv, T, d) -> (B, nh, T, d) (a transposed view of a (B, T, nh, d) tensor)."""
        B, nh, T, d = q.shape
        if not self.flash or q.dtype not in (torch.bfloat16, torch.float16) or d % 8 or d > 256:
            if q.is_cuda:  # FlashAttention does not take this: the dense-mask path, built once
                if self._dense is None:
                    self._dense = AttentionSpec(document_causal_mask(self.position_ids), False, self.n_rep)
                return self._dense(q, k, v)
            fn = varlen_by_example
        else:
            fn = _FlashVarlen.apply
        qf, kf, vf = (x.transpose(1, 2).reshape(B * T, x.shape[1], d) for x in (q, k, v))  # (B*T, heads, d)
        return fn(qf, kf, vf, self.cu, self.max_len).view(B, T, nh, d).transpose(1, 2)


def build_attention(position_ids: torch.Tensor, S: int, n_rep: int, impl: str = "auto",
                    decoding: bool = False):
    """One forward's attention. position_ids (B, T); S = key length (T, or cached + T when decoding)."""
    T = position_ids.shape[1]
    if impl == "flex" and not decoding and not is_single_document(position_ids):
        return FlexAttentionSpec(position_ids, n_rep)
    if not decoding and (impl == "auto" and flash_varlen_ok(position_ids.device)
                         or impl == "varlen" and not is_single_document(position_ids)):
        return VarlenAttentionSpec(position_ids, n_rep)  # (FlashAttention: rows of one example alike)
    impl = "eager" if impl == "eager" else "sdpa"
    if decoding:
        # one sequence per batch row; the T new tokens follow S - T cached ones
        if T == 1:
            return AttentionSpec(None, False, n_rep, impl)
        mask = torch.ones(T, S, dtype=torch.bool, device=position_ids.device).tril(S - T)
        return AttentionSpec(mask[None, None], False, n_rep, impl)
    if is_single_document(position_ids):
        return AttentionSpec(None, True, n_rep, impl)
    return AttentionSpec(document_causal_mask(position_ids), False, n_rep, impl)
