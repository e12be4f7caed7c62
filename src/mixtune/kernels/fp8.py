"""FP8 (e4m3) matrix products for the MoE experts: row-wise scaled operands and grouped products.

    q, s = quantize_rows(x)                     # x (M, K) -> q (M, K) float8_e4m3fn, s (M,) fp32: x ≈ q * s[:, None]
    W8, sw = fp8_weights([w1, w3], extra, transpose=False)   # NF4 experts -> (E, N, K) fp8, (E, N) fp32 scales
    y = scaled_grouped_mm(q, s, W8, sw, offs)   # y[m] = (q[m] s[m]) @ (W8[e] sw[e][:, None])^T for m in group e

Scales are powers of two: the smallest 2^k with amax / 2^k <= 448 (the e4m3 maximum), so scaling is exact and
the only rounding is e4m3's own (to nearest-even; relative precision is the same at any scale). An activation
row has its own; an expert weight has one per expert (the NF4 block scales bound |w|, so no pass over the
weight is needed), expanded over its output rows as the grouped kernel wants.
On CUDA (compute capability >= 8.9) the product is `torch._scaled_grouped_mm` (CUTLASS, fp32 accumulation)
and quantization is a Triton kernel; elsewhere both run in PyTorch with the same arithmetic (the product
exactly: dequantize in fp32, multiply, round once) — that emulation is what CPU tests check the model against.
"""

from __future__ import annotations

import torch

from ._triton import soft_round, use_triton

F8 = torch.float8_e4m3fn
F8_MAX = 448.0
_SGMM = getattr(torch, "_scaled_grouped_mm", None)
FALLBACKS = {"scaled_grouped_mm": 0}  # CUDA calls that had to be emulated (unsupported shape or device)


def fp8_supported(device: torch.device | str) -> bool:
    """Whether the FP8 grouped product runs natively on `device` (else it is emulated, slowly)."""
    device = torch.device(device)
    if device.type != "cuda" or _SGMM is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _quant_kernel():
    from ._tl import quant_rows_kernel
    return quant_rows_kernel


def pow2_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amax >= 0 (fp32) -> (s, inv): s = 2^k the smallest power of two with amax / s <= 448, inv = 2^-k, k in
    [-126, 126]; 0 for amax == 0. Bit arithmetic, the same as the Triton kernels'."""
    b = amax.float().contiguous().view(torch.int32)
    k = ((b >> 23) & 0xFF) - 127 - 8 + ((b & 0x7FFFFF) > 0x600000).to(torch.int32)
    k = k.clamp(-126, 126)
    s = ((k + 127) << 23).view(torch.float32)
    inv = ((127 - k) << 23).view(torch.float32)
    zero = amax <= 0
    return s.masked_fill(zero, 0.0), inv.masked_fill(zero, 0.0)


def quantize_rows(x: torch.Tensor, triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q (M, K) float8_e4m3fn, s (M,) fp32) with s = pow2_scale(amax_row) and q = e4m3(x / s)
    (an all-zero row gets s = 0 and q = 0)."""
    M, K = x.shape
    if use_triton(x, triton) and x.stride(1) == 1:
        q = torch.empty(M, K, dtype=F8, device=x.device)
        s = torch.empty(M, dtype=torch.float32, device=x.device)
        if M:
            _quant_kernel()[(M,)](x, q, s, K, x.stride(0), K, BLOCK=2048, SOFT_ROUND=soft_round(), num_warps=8)
        return q, s
    xf = x.float()
    amax = xf.abs().amax(1) if K else xf.new_zeros(M)
    s, inv = pow2_scale(amax)
    return (xf * inv[:, None]).clamp(-F8_MAX, F8_MAX).to(F8), s


def expert_amax(w) -> torch.Tensor:
    """(E,) fp32 upper bound of |w[e]| for an expert stack: the largest NF4 block scale (|code| <= 1), cached on
    the frozen weight; for a plain tensor its exact amax."""
    from ..quant.nf4 import NF4Weight
    E = w.shape[0]
    if not isinstance(w, NF4Weight):
        return w.detach().abs().reshape(E, -1).amax(1).float()
    cached = getattr(w, "_fp8_amax", None)
    if cached is None or cached.device != w.device:
        cached = w.real_absmax().abs().view(E, -1).amax(1)
        w._fp8_amax = cached
    return cached


def fp8_weights(ws, extra: torch.Tensor | None = None, transpose: bool = False):
    """Frozen expert weights ws (each (E, O_i, In)) -> (W8 (E, N, K) fp8, scale (E, N) fp32) as
    `scaled_grouped_mm` takes them: transpose=False: N = sum O_i, K = In ([w_0[e]; w_1[e]; ...]);
    transpose=True: N = In, K = sum O_i ([w_0[e]^T | w_1[e]^T | ...]). `extra` (E, N, c), e.g. LoRA
    matrices folded into the product, fills K's last c columns under the same per-expert scale."""
    from .dequant import dequantize_nf4_stack
    amax = torch.stack([expert_amax(w) for w in ws]).amax(0)
    if extra is not None:
        amax = torch.maximum(amax, extra.detach().abs().reshape(extra.shape[0], -1).amax(1).float())
    scale, inv = pow2_scale(amax)
    E, In = ws[0].shape[0], ws[0].shape[-1]
    base = sum(w.shape[1] for w in ws) if transpose else In
    c = extra.shape[-1] if extra is not None else 0
    W8 = dequantize_nf4_stack(ws, F8, cols=base + c, inv=inv, transpose=transpose)
    if extra is not None:
        W8[:, :, base:] = (extra.float() * inv[:, None, None]).clamp(-F8_MAX, F8_MAX).to(F8)
    return W8, scale[:, None].expand(E, W8.shape[1]).contiguous()


def _emulated(a8, sa, b8, sb, offs, out_dtype):
    out = torch.empty(a8.shape[0], b8.shape[1], dtype=out_dtype, device=a8.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            a = a8[start:end].float() * sa[start:end, None]
            b = b8[e].float() * sb[e][:, None]
            out[start:end] = (a @ b.t()).to(out_dtype)
        start = end
    return out


def scaled_grouped_mm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor, offs: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a8 (M, K) fp8 row-major with row scales sa (M,); b8 (E, N, K) fp8 (K contiguous) with scales sb (E, N);
    rows offs[e-1]:offs[e] of a belong to expert e -> (M, N) in out_dtype, fp32 accumulation."""
    if a8.is_cuda and fp8_supported(a8.device):
        try:
            y = _SGMM(a8, b8.transpose(1, 2), sa, sb, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True)
            return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
        except RuntimeError as e:  # e.g. a model dimension not a multiple of 16
            if not FALLBACKS["scaled_grouped_mm"]:
                import warnings
                warnings.warn(f"mixtune: the FP8 grouped product does not run at shape {tuple(a8.shape)} x "
                              f"{tuple(b8.shape)} ({str(e).splitlines()[0][:120]}); emulating it (slow). "
                              "Use model.expert_precision bf16 for this model.", stacklevel=2)
            FALLBACKS["scaled_grouped_mm"] += 1
    return _emulated(a8, sa, b8, sb, offs, out_dtype)
