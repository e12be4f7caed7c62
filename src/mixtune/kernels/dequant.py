"""Fast NF4 dequantization: the whole (stacked) weight in one launch, no per-expert Python loop.

    W = dequantize_nf4(w4, torch.bfloat16)                 # shape w4.shape
    W13 = dequantize_nf4_stack([w1, w3], torch.bfloat16)   # (E, I1 + I3, H): [w1_e; w3_e] per expert
    W13t = dequantize_nf4_stack([w1, w3], torch.float8_e4m3fn, inv=inv, transpose=True)  # (E, H, I1 + I3)
    Wa = dequantize_nf4_stack([w1, w3], torch.bfloat16, cols=H + r,
                              extras=[Extra(B1, 0, H, r), Extra(B3, I, H, r)])  # (E, 2I, H + r): [W1 | B1; W3 | B3]

Reads `NF4Weight`'s buffers (bitsandbytes' exact layout: two codes per byte, the first element in the high
nibble; a uint8 absmax per 64 weights, double-quantized with `code2` against fp32 `absmax2` per 256 blocks,
plus `offset`) and computes `code[q] * (code2[absmax] * absmax2 + offset)` in fp32, rounded once to `dtype`:
the same arithmetic as `NF4Weight.dequantize` and `bitsandbytes.functional.dequantize_4bit`.
For FP8 (e4m3) outputs the value is first multiplied by a per-expert `inv` (fp32, a power of two: exact) and
clamped to ±448, then rounded to nearest-even (see `kernels.fp8`). `transpose=True` writes each expert's
weight transposed (a K-contiguous layout for the backward's FP8 matmuls), tile by tile.
On CUDA a Triton kernel writes straight into the (optionally fused, widened) output; elsewhere PyTorch runs.
`extras` place other matrices (the LoRA A's and B's, any dtype, cast and optionally scaled) in the widened
buffer's extra rows or columns, zeros around them, in the same launch as the weight they sit beside (extra
programs of that launch: no copy launch of their own); see `Extra`.
"""

from __future__ import annotations

import torch

from typing import NamedTuple, Optional

from ..quant.nf4 import NF4Weight
from ._triton import soft_round, use_triton

# NF4 blocks per program and warps: R/num_warps for bf16 outputs (R=32, 4 warps won the bench's sweep in session 6
# on the H200 and in session 7 on the H100; 64/8 won on the H200 in session 7 by 2.6%: the bench's checks sweep each
# run), R8/num_warps8 for e4m3 outputs; TO rows per
# transposed (e4m3) tile with num_warps_t. The e4m3 ones are the fastest of bench/dequant_sweep.py on the H200
# (session 3, call 8: 0.84 ms row-major and 0.82 ms transposed for one layer's w1|w3, against 0.97 / 1.07 ms
# at R8=64, num_warps_t=4).
# words: decode word by word (see _tl.nf4_dequant_kernel: one layout from the lookups to the store); session 8
# added it (0.261 ms against 0.279 ms for the block decoding's best tile on the H100, bench/results/
# 2026-12-07-s8-call1-h100-qwen3-4L.log) and made it the default; the bench sweeps both decodings.
CONFIG = {"R": 32, "num_warps": 4, "R8": 128, "num_warps8": 4, "TO": 64, "num_warps_t": 1, "words": True}
F8 = torch.float8_e4m3fn


class Extra(NamedTuple):
    """A region of every expert's (rows, cols) output block written beside a dequantized weight: `height` rows x
    `width` columns from (row, col); its columns [at, at + Q) hold scale * src[e] (src (E, P, Q), P = height),
    the rest zeros; src None: all zeros (height must be given)."""
    src: Optional[torch.Tensor]
    row: int
    col: int
    width: int
    at: int = 0
    scale: float = 1.0
    height: Optional[int] = None

    def rows(self) -> int:
        return self.height if self.height is not None else self.src.shape[1]


XTILE = (32, 64)  # rows x columns of one extra-region tile (program)


def _kernels():
    from . import _tl
    return _tl.nf4_dequant_kernel, _tl.nf4_dequant_t_kernel


def _args(w: NF4Weight):
    return w.packed.view(torch.int32), w.absmax, w.absmax2, w.code2, w.code, w.offset


def _launch(w: NF4Weight, out: torch.Tensor, per_expert: int, cols: int, ld: int, out_expert_stride: int,
            out_offset: int, inv: torch.Tensor | None = None, extra: Extra | None = None) -> None:
    n_blocks = w.absmax.numel()
    fp8 = out.dtype == F8
    R = CONFIG["R8" if fp8 else "R"]
    n_dq = (n_blocks + R - 1) // R
    xa = (w.absmax2, 0, 0, 0, 0, 1.0, 0, 0, 0, 1, 1)  # no extra region
    n_x = 0
    if extra is not None:
        P, E = extra.rows(), out.shape[0]
        src = extra.src
        if src is not None:
            src = src if src.stride(-1) == 1 else src.contiguous()
        n_xp, n_xq = -(-P // XTILE[0]), -(-extra.width // XTILE[1])
        n_x = E * n_xp * n_xq
        xa = (src if src is not None else w.absmax2, src.stride(0) if src is not None else 0,
              src.stride(1) if src is not None else 0, P, src.shape[2] if src is not None else 0,
              float(extra.scale), extra.row * ld + extra.col, extra.width, extra.at, n_xp, n_xq)
    _kernels()[0][(n_dq + n_x,)](*_args(w), out, inv if inv is not None else w.absmax2, n_blocks,
                                 per_expert, cols, ld, out_expert_stride, out_offset, *xa, R=R, FP8=fp8,
                                 SOFT_ROUND=soft_round(), EXTRA=extra is not None,
                                 HAS_X=extra is not None and extra.src is not None, XBP=XTILE[0], XBQ=XTILE[1],
                                 WORDS=bool(CONFIG["words"]),
                                 num_warps=CONFIG["num_warps8" if fp8 else "num_warps"])


def _place(out: torch.Tensor, x: Extra) -> None:
    """The PyTorch path of an Extra: out (E, rows, cols)."""
    P = x.rows()
    region = out[:, x.row:x.row + P, x.col:x.col + x.width]
    if x.src is None:
        region.zero_()
        return
    Q = x.src.shape[2]
    region[:, :, :x.at].zero_()
    region[:, :, x.at + Q:].zero_()
    if x.scale == 1.0:
        region[:, :, x.at:x.at + Q].copy_(x.src)
    else:
        torch.mul(x.src, x.scale, out=region[:, :, x.at:x.at + Q])


def _launch_t(w: NF4Weight, out: torch.Tensor, ld: int, out_expert_stride: int, out_offset: int,
              inv: torch.Tensor | None) -> None:
    E, O, In = w.shape
    TO = CONFIG["TO"]
    nib = In // 64
    grid = (E * ((O + TO - 1) // TO) * nib,)
    _kernels()[1][grid](*_args(w), out, inv if inv is not None else w.absmax2, O, nib, ld, out_expert_stride,
                        out_offset, TO=TO, FP8=out.dtype == F8, SOFT_ROUND=soft_round(),
                        num_warps=CONFIG["num_warps_t"])


def _fits(w) -> bool:
    return isinstance(w, NF4Weight) and w.shape[-1] % 64 == 0


def _torch_values(w, dtype: torch.dtype, inv: torch.Tensor | None) -> torch.Tensor:
    """PyTorch path: the weight in `dtype`; for FP8, scaled by inv per expert (dim 0) and clamped first."""
    if dtype != F8:
        return dequantize_nf4(w, dtype, False)
    v = w.dequantize(torch.float32) if isinstance(w, NF4Weight) else w.float()
    if inv is not None:
        v = v * inv.view(-1, *([1] * (v.dim() - 1)))
    return v.clamp(-448.0, 448.0).to(dtype)


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
                         rows: int | None = None, cols: int | None = None, inv: torch.Tensor | None = None,
                         transpose: bool = False, extras=None) -> torch.Tensor:
    """Weights of shapes (E, O_i, In) -> (E, rows, cols) with expert e's rows [w_0[e]; w_1[e]; ...] in
    [:sum O_i, :In] (transpose=True: [w_0[e]^T | w_1[e]^T | ...] in [:In, :sum O_i]). rows/cols beyond those
    leave room for extra (LoRA) rows/columns, left uninitialised for the caller to fill, or filled by `extras`:
    one `Extra` or None per weight, written in that weight's launch (not with transpose or FP8). dtype
    float8_e4m3fn takes inv (E,) fp32: each expert's values are multiplied by it before rounding. With NF4
    weights on CUDA each weight is one launch."""
    E, In = ws[0].shape[0], ws[0].shape[-1]
    heights = [w.shape[1] for w in ws]
    if transpose:
        rows, cols = rows or In, cols or sum(heights)
    else:
        rows, cols = rows or sum(heights), cols or In
    if dtype == F8 and inv is None:
        raise ValueError("an FP8 dequantization needs inv, the per-expert scale")
    extras = list(extras) if extras is not None else [None] * len(ws)
    if any(x is not None for x in extras) and (transpose or dtype == F8):
        raise ValueError("extras are written beside row-major, non-FP8 dequantizations only")
    dev = ws[0].device
    out = torch.empty(E, rows, cols, dtype=dtype, device=dev)
    off = 0
    for w, h, x in zip(ws, heights, extras):
        if _fits(w) and use_triton(w.packed, triton):
            if transpose:
                _launch_t(w, out, cols, rows * cols, off, inv)
            else:
                _launch(w, out, h * In, In, cols, rows * cols, off * cols, inv, x)
            off += h
            continue
        if transpose:
            out[:, :In, off:off + h] = _torch_values(w, dtype, inv).transpose(1, 2)
        else:
            out[:, off:off + h, :In] = _torch_values(w, dtype, inv)
        if x is not None:
            _place(out, x)
        off += h
    return out
