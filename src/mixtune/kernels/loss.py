"""Chunked linear + cross-entropy: the (tokens, vocab) fp32 logits are never materialised for the batch.

    loss_sum, n_tokens = linear_cross_entropy_chunked(h (B, T, H), head, labels (B, T), chunk_size=4096)

Only positions whose shifted label is not -100 are computed. For a plain (or NF4) linear head, each chunk's
logits are formed, reduced to its loss, and turned into the chunk's input gradient right away
((softmax - onehot) @ W), so the backward is one multiply; peak extra memory is one chunk of fp32 logits.
Any other head module (e.g. LoRA-wrapped) is called chunk by chunk under activation checkpointing.
Same result as `reference.linear_cross_entropy_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..quant.nf4 import NF4Weight
from .ce import ce_grad_inplace
from .dequant import dequantize_nf4


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, tgt, chunk):
        # h (n, H), W (V, H), tgt (n,) -> scalar fp32 sum of token cross-entropies
        n = h.shape[0]
        need_w = W.requires_grad
        dh = torch.empty_like(h)
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], tgt[s:s + chunk]
            p = hc @ W.t()  # (c, V) logits in h's dtype
            loss += ce_grad_inplace(p, tc).sum()  # p := softmax - onehot = d loss / d logits, in place
            dh[s:s + chunk] = p @ W
            if need_w:
                dW += (p.t() @ hc).float()
        ctx.save_for_backward(dh, dW)
        return loss

    @staticmethod
    def backward(ctx, gl):
        dh, dW = ctx.saved_tensors
        return dh * gl.to(dh.dtype), (dW * gl if dW is not None else None), None, None


def _head_weight(head):
    """The (V, H) weight of a plain bias-free linear or NF4 head, else None."""
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    if isinstance(getattr(head, "weight", None), NF4Weight) and getattr(head, "bias", None) is None:
        return head.weight  # an NF4 linear (mixtune.model.nf4.NF4Linear)
    return None


def _chunk_ce(head, hc, tc):
    return F.cross_entropy(head(hc).float(), tc, reduction="sum")


def linear_cross_entropy_chunked(h: torch.Tensor, head, labels: torch.Tensor, chunk_size: int = 4096):
    """h (B, T, H), labels (B, T) unshifted (-100 = ignore) -> (loss_sum fp32, n_tokens). t predicts t+1."""
    H = h.shape[-1]
    tgt = labels[:, 1:]  # (B, T-1)
    valid = tgt != -100
    n_tokens = valid.sum()
    hv = h[:, :-1][valid]  # (n, H) only positions that carry a label
    tv = tgt[valid]  # (n,)
    if hv.shape[0] == 0:
        return (h.sum() * 0.0).float(), n_tokens
    W = _head_weight(head)
    if W is not None:
        if isinstance(W, NF4Weight):
            W = dequantize_nf4(W, h.dtype)
        return _LinearCE.apply(hv.reshape(-1, H), W.to(h.dtype), tv, chunk_size), n_tokens
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, hv.shape[0], chunk_size):
        hc, tc = hv[s:s + chunk_size], tv[s:s + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            loss = loss + checkpoint(_chunk_ce, head, hc, tc, use_reentrant=False)
        else:
            loss = loss + _chunk_ce(head, hc, tc)
    return loss, n_tokens
