"""Cross-entropy's loss and logit gradient in one kernel over a chunk of logits, in place.

    loss = ce_grad_inplace(logits, tgt)     # logits (c, V) bf16/fp32 -> loss (c,) fp32; logits := softmax - onehot

Per row: the log-sum-exp in fp32 (online max/sum, one read), the row's loss lse - logit[target], then the
gradient exp(logit - lse) - [v == target] written over the logits in their own dtype (a second read, one
write). The PyTorch path does the same arithmetic in fp32 with five passes over an fp32 copy; with a 152k
vocabulary those passes were the largest single cost of a Qwen3-30B-A3B step (BENCHMARKS.md). Triton on
CUDA; PyTorch elsewhere (and under `_triton.FORCE` on CPU through Triton's interpreter, for tests).
"""

from __future__ import annotations

import functools

import torch

from ._triton import use_triton

BLOCK = 4096


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_grad(x_ptr, stride, tgt_ptr, loss_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # running max per lane
        s = tl.zeros([BLOCK], tl.float32)  # running sum of exp(x - m) per lane
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            s = s * scale + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0))
        t = tl.load(tgt_ptr + row)
        xt = tl.load(base + t).to(tl.float32)
        tl.store(loss_ptr + row, lse - xt)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            msk = cols < V
            x = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == t, p - 1.0, p)
            tl.store(base + cols, p.to(x_ptr.dtype.element_ty), mask=msk)

    return ce_grad


def ce_grad_inplace_reference(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The PyTorch arithmetic: fp32 log-sum-exp, loss per row; logits := (softmax - onehot) in their dtype."""
    lf = logits.float()  # (c, V)
    lse = torch.logsumexp(lf, dim=-1)  # (c,)
    loss = lse - lf.gather(1, tgt[:, None]).squeeze(1)
    p = lf.sub_(lse[:, None]).exp_()
    p[torch.arange(tgt.numel(), device=p.device), tgt] -= 1.0
    logits.copy_(p)
    return loss


def ce_grad_inplace(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """logits (c, V) contiguous rows, tgt (c,) long -> per-row loss (c,) fp32; logits overwritten by the
    gradient of the summed loss with respect to them."""
    if not use_triton(logits) or logits.stride(-1) != 1:
        return ce_grad_inplace_reference(logits, tgt)
    c, V = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _kernel()[(c,)](logits, logits.stride(0), tgt, loss, V, BLOCK=min(BLOCK, 1 << (V - 1).bit_length()),
                        num_warps=8)
    return loss
