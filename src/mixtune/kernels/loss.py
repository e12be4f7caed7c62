"""Chunked linear + cross-entropy: the (tokens, vocab) fp32 logits are never materialised for the batch.

    loss_sum, n_tokens = linear_cross_entropy_chunked(h (B, T, H), head, labels (B, T), chunk_size=4096)

Only positions whose shifted label is not -100 are computed. For a plain (or NF4) linear head, each chunk's
logits are formed, reduced to its loss, and turned into the chunk's input gradient right away
((softmax - onehot) @ W), so the backward is one multiply. Every chunk's logits go into ONE reused buffer of
`chunk_rows(V)` rows in the compute dtype (at most 4096 rows and about 1 GiB: 2048 rows at Qwen3's 151,936-token
vocabulary, 4096 at Mixtral's 32,000), so the loss adds one chunk of logits to the step's peak, never two.
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


CHUNK_BYTES = 1 << 30  # the reused logits buffer's size bound (bytes)


def chunk_rows(vocab: int, limit: int = 4096, itemsize: int = 2) -> int:
    """Rows of one logits chunk: the largest power of two <= limit whose (rows, vocab) buffer of `itemsize`
    bytes fits CHUNK_BYTES (at least 256). Mixtral (32,000): 4096; Qwen3 (151,936): 2048."""
    rows = 1 << max(8, (CHUNK_BYTES // max(1, vocab * itemsize)).bit_length() - 1)
    return max(1, min(limit, rows))


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, tgt, chunk):
        # h (n, H), W (V, H), tgt (n,) -> scalar fp32 sum of token cross-entropies
        n = h.shape[0]
        need_w = W.requires_grad
        dh = torch.empty_like(h)
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        buf = h.new_empty(min(chunk, n), W.shape[0])  # (chunk, V): every chunk's logits, then its gradient
        Wt = W.t()
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], tgt[s:s + chunk]
            p = buf[:hc.shape[0]]
            torch.mm(hc, Wt, out=p)  # (c, V) logits in h's dtype
            loss += ce_grad_inplace(p, tc).sum()  # p := softmax - onehot = d loss / d logits, in place
            torch.mm(p, W, out=dh[s:s + chunk])  # (c, H)
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
    """h (B, T, H), labels (B, T) unshifted (-100 = ignore) -> (loss_sum fp32, n_tokens). t predicts t+1.
    chunk_size bounds the rows per chunk; a large vocabulary lowers it (`chunk_rows`)."""
    B, T, H = h.shape
    valid = labels[:, 1:] != -100  # (B, T-1)
    n_tokens = valid.sum()
    # the flat positions t of (B*T) whose label t+1 counts: one nonzero (one host sync for the count)
    bt = valid.nonzero()  # (n, 2) (row, t)
    flat = bt[:, 0] * T + bt[:, 1]  # (n,)
    hv = h.reshape(B * T, H).index_select(0, flat)  # (n, H) only positions that carry a label
    tv = labels.reshape(B * T).index_select(0, flat + 1)  # (n,)
    if hv.shape[0] == 0:
        return (h.sum() * 0.0).float(), n_tokens
    W = _head_weight(head)
    if W is not None:
        if isinstance(W, NF4Weight):
            W = dequantize_nf4(W, h.dtype)
        rows = chunk_rows(W.shape[0], chunk_size, h.element_size())
        return _LinearCE.apply(hv.reshape(-1, H), W.to(h.dtype), tv, rows), n_tokens
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, hv.shape[0], chunk_size):
        hc, tc = hv[s:s + chunk_size], tv[s:s + chunk_size]
        if torch.is_grad_enabled() and hc.requires_grad:
            loss = loss + checkpoint(_chunk_ce, head, hc, tc, use_reentrant=False)
        else:
            loss = loss + _chunk_ce(head, hc, tc)
    return loss, n_tokens
