"""Fast NF4 dequantization: the whole (stacked) weight in one launch, no per-expert Python loop.

    W = dequantize_nf4(w4, torch.bfloat16)                 # shape w4.shape
    W13 = dequantize_nf4_stack([w1, w3], torch.bfloat16)   # (E, I1 + I3, H): [w1_e; w3_e] per expert

Reads `NF4Weight`'s buffers (bitsandbytes' exact layout: two codes per byte, the first element in the high
nibble; a uint8 absmax per 64 weights, double-quantized with `code2` against fp32 `absmax2` per 256 blocks,
plus `offset`) and computes `code[q] * (code2[absmax] * absmax2 + offset)` in fp32, rounded once to `dtype`:
the same arithmetic as `NF4Weight.dequantize` and `bitsandbytes.functional.dequantize_4bit`.
On CUDA a Triton kernel writes straight into the (optionally fused) output; elsewhere the PyTorch path runs.
"""

from __future__ import annotations

import functools

import torch

from ..model.nf4 import NF4Weight
from ._triton import use_triton

CONFIG = {"R": 64, "num_warps": 4}  # NF4 blocks (of 64 weights) per Triton program; tuned by the benchmark


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant_kernel(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, out_ptr,
                           n_blocks, per_expert, cols, ld, out_expert_stride, out_offset,
                           R: tl.constexpr):
        # R blocks of 64 weights per program; a block never crosses a row (cols % 64 == 0).
        # The codes are read as int32 words (8 per block, 8 codes per word, little-endian bytes).
        b = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)  # (R,) block ids
        mb = b < n_blocks
        a = tl.load(absmax_ptr + b, mask=mb, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + a) * tl.load(absmax2_ptr + b // 256, mask=mb, other=0.0) + tl.load(offset_ptr)
        w = tl.load(words_ptr + b[:, None] * 8 + tl.arange(0, 8)[None, :], mask=mb[:, None], other=0)  # (R, 8)
        j = tl.arange(0, 8)
        shift = (j // 2) * 8 + (1 - j % 2) * 4  # element j of a word: byte j//2, high nibble first
        q = (w[:, :, None] >> shift[None, None, :]) & 15  # (R, 8, 8)
        v = tl.reshape(tl.load(code_ptr + q), (R, 64)) * scale[:, None]  # (R, 64) in memory order
        f = b * 64  # first weight of the block in the source tensor
        e = f // per_expert
        rem = f - e * per_expert
        row = rem // cols
        dst = e * out_expert_stride + out_offset + row * ld + (rem - row * cols)  # (R,)
        ptr = dst[:, None] + tl.arange(0, 64)[None, :]
        tl.store(out_ptr + ptr, v.to(out_ptr.dtype.element_ty), mask=mb[:, None])

    return nf4_dequant_kernel


def _launch(w: NF4Weight, out: torch.Tensor, per_expert: int, cols: int, ld: int, out_expert_stride: int,
            out_offset: int) -> None:
    n_blocks = w.absmax.numel()
    R = CONFIG["R"]
    grid = ((n_blocks + R - 1) // R,)
    _kernel()[grid](w.packed.view(torch.int32), w.absmax, w.absmax2, w.code2, w.code, w.offset, out, n_blocks,
                    per_expert, cols, ld, out_expert_stride, out_offset, R=R, num_warps=CONFIG["num_warps"])


def _fits(w) -> bool:
    return isinstance(w, NF4Weight) and w.shape[-1] % 64 == 0


def dequantize_nf4(w, dtype: torch.dtype = torch.bfloat16, triton: bool | None = None) -> torch.Tensor:
    """NF4Weight (or plain tensor) -> dense tensor of w.shape in dtype."""
    if not isinstance(w, NF4Weight):
        return w.to(dtype)
    if not _fits(w) or not use_triton(w.packed, triton):
        return w.dequantize(dtype)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    n = out.numel()
    _launch(w, out, n, w.shape[-1], w.shape[-1], n, 0)
    return out


def dequantize_nf4_stack(ws, dtype: torch.dtype = torch.bfloat16, triton: bool | None = None,
                         rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """Weights of shapes (E, O_i, In) -> (E, rows, cols) with expert e's rows [w_0[e]; w_1[e]; ...] in
    [:sum O_i, :In]. rows >= sum O_i and cols >= In leave room for extra (LoRA) rows/columns, which are
    left uninitialised for the caller to fill. With NF4 weights on CUDA each weight is one launch."""
    E, In = ws[0].shape[0], ws[0].shape[-1]
    heights = [w.shape[1] for w in ws]
    rows = rows or sum(heights)
    cols = cols or In
    dev = ws[0].device
    out = torch.empty(E, rows, cols, dtype=dtype, device=dev)  # (E, rows, cols)
    off = 0
    for w, h in zip(ws, heights):
        if _fits(w) and use_triton(w.packed, triton):
            _launch(w, out, h * In, In, cols, rows * cols, off * cols)
        else:
            out[:, off:off + h, :In] = dequantize_nf4(w, dtype, False)
        off += h
    return out
