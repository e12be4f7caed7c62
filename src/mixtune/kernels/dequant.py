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

BYTES_PER_PROGRAM = 2048  # packed bytes per Triton program = 4096 weights = 64 NF4 blocks


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, out_ptr,
                           n_bytes, bytes_per_expert, out_expert_stride, out_offset,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        bo = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) byte offsets
        m = bo < n_bytes
        b = tl.load(packed_ptr + bo, mask=m, other=0).to(tl.int32)
        v_hi = tl.load(code_ptr + (b >> 4))  # first element of the pair
        v_lo = tl.load(code_ptr + (b & 15))
        blk = bo // 32  # 64 weights = 32 bytes per absmax block
        a = tl.load(absmax_ptr + blk, mask=m, other=0).to(tl.int32)
        s = tl.load(code2_ptr + a) * tl.load(absmax2_ptr + blk // 256, mask=m, other=0.0) + tl.load(offset_ptr)
        vals = tl.reshape(tl.join(v_hi * s, v_lo * s), (2 * BLOCK,))  # (2*BLOCK,) in memory order
        e = bo // bytes_per_expert  # expert of each byte
        dst = e * out_expert_stride + out_offset + 2 * (bo - e * bytes_per_expert)
        dst2 = tl.reshape(tl.join(dst, dst + 1), (2 * BLOCK,))
        m2 = tl.reshape(tl.join(m, m), (2 * BLOCK,))
        tl.store(out_ptr + dst2, vals.to(out_ptr.dtype.element_ty), mask=m2)

    return nf4_dequant_kernel


def _launch(w: NF4Weight, out: torch.Tensor, per_expert: int, out_expert_stride: int, out_offset: int) -> None:
    n_bytes = w.packed.numel()
    grid = (triton_cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _kernel()[grid](w.packed, w.absmax, w.absmax2, w.code2, w.code, w.offset, out, n_bytes, per_expert // 2,
                    out_expert_stride, out_offset, BLOCK=BYTES_PER_PROGRAM, num_warps=4)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dequantize_nf4(w, dtype: torch.dtype = torch.bfloat16, triton: bool | None = None) -> torch.Tensor:
    """NF4Weight (or plain tensor) -> dense tensor of w.shape in dtype."""
    if not isinstance(w, NF4Weight):
        return w.to(dtype)
    if not use_triton(w.packed, triton):
        return w.dequantize(dtype)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    n = out.numel()
    _launch(w, out, n, n, 0)
    return out


def dequantize_nf4_stack(ws, dtype: torch.dtype = torch.bfloat16, triton: bool | None = None) -> torch.Tensor:
    """Weights of shapes (E, O_i, In) -> (E, sum O_i, In), expert e's rows [w_0[e]; w_1[e]; ...].

    With NF4 weights on CUDA each weight is dequantized by one launch straight into its slice."""
    E, In = ws[0].shape[0], ws[0].shape[-1]
    rows = [w.shape[1] for w in ws]
    if not all(isinstance(w, NF4Weight) for w in ws) or not use_triton(ws[0].packed, triton):
        return torch.cat([dequantize_nf4(w, dtype, False) for w in ws], dim=1)
    out = torch.empty(E, sum(rows), In, dtype=dtype, device=ws[0].device)  # (E, sum O_i, In)
    stride = sum(rows) * In
    off = 0
    for w, r in zip(ws, rows):
        per = r * In
        if per % 2:
            raise ValueError("NF4 expert slices must hold an even number of weights")
        _launch(w, out, per, stride, off)
        off += per
    return out
