"""The grouped MoE's thin LoRA products with the token gather inside: one pass over the gathered rows where the
unfused path writes them (gather), reads them back (the rank-r grouped product) and copies the product into the
widened buffer.

    gather_lowrank(x (N, H), tok (M,), offs (E,), W (E, R, H), s, xs=view (M, H), outs=[views (M, R)])
        xs[m] = x[tok[m]]  and  out[m] = s * x[tok[m]] @ W[e(m)]^T  into every view of `outs`
    gather_lowrank_wgrad(d (M, R), x (N, H), tok (M,), offs (E,)) -> (E, R, H) fp32
        out[e] = d[rows of e]^T @ x[tok[rows of e]]   (the LoRA A's gradient, no gathered copy of x)

Rows m are the assignments sorted by expert: expert e owns rows offs[e-1]:offs[e] (offs cumulative, int32, on the
device: nothing here syncs with the host). W may be any dtype and any strides (the fp32 parameters themselves,
or a transposed view: the w2 backward passes B2 (E, H, r) as its (E, r, H) transpose); its tiles are cast to x's
dtype before the product, as the unfused path casts W once. Products accumulate in fp32 and are scaled by s
there, then rounded once to the output's dtype.

CONFIG["on"] = False turns both off (the bench's `gmm=0` rows: before/after on one machine). CONFIG["wt"] picks
how W's tiles are loaded (see _wt), "stages" the pipelining depth (None: Triton's default), and "cast_w" = False
hands a non-fp32 W to the kernel as it is (bench/gather_check.py, to test the raw forms on the GPU). Triton on CUDA;
the unfused path elsewhere (the caller keeps its unfused PyTorch path), and under `_triton.FORCE` on CPU
through Triton's interpreter, for the tests.
"""

from __future__ import annotations

import functools

import torch

from ._triton import use_triton
from .route import _cdiv, _rows_ok

CONFIG = {"on": True, "BM": 128, "BK": 64, "warps": 8, "BMW": 64, "BH": 128, "warps_w": 4, "wt": False,
          "stages": None, "cast_w": True}


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_lowrank_kernel(x_ptr, tok_ptr, offs_ptr, tstart_ptr, w_ptr, xs_ptr, u_ptr, u2_ptr,
                              H, R, E, x_ld, xs_ld, u_ld, u2_ld, w_se, w_sr, w_sh, scale,
                              EP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                              STORE_X: tl.constexpr, HAS_U2: tl.constexpr, IEEE: tl.constexpr,
                              WT: tl.constexpr):
        pid = tl.program_id(0)
        es = tl.arange(0, EP)
        ts = tl.load(tstart_ptr + es, mask=es < E, other=2147483647)  # first tile of each expert
        e = tl.sum((ts <= pid).to(tl.int32), 0) - 1  # the last expert starting at or before this tile
        t0 = tl.sum(tl.where(es == e, ts, 0), 0)
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
        end = tl.load(offs_ptr + e).to(tl.int64)
        row0 = start + (pid - t0).to(tl.int64) * BM
        if row0 < end:
            rows = row0 + tl.arange(0, BM)
            rm = rows < end
            src = tl.load(tok_ptr + rows, mask=rm, other=0).to(tl.int64)
            rr = tl.arange(0, BR)
            acc = tl.zeros((BM, BR), dtype=tl.float32)
            wbase = w_ptr + e.to(tl.int64) * w_se
            for k0 in range(0, H, BK):
                cols = k0 + tl.arange(0, BK)
                cm = cols < H
                xv = tl.load(x_ptr + src[:, None] * x_ld + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
                if STORE_X:
                    tl.store(xs_ptr + rows[:, None] * xs_ld + cols[None, :], xv.to(xs_ptr.dtype.element_ty),
                             mask=rm[:, None] & cm[None, :])
                if WT:  # W_e's (BR, BK) tile as stored, transposed in the product
                    wv = tl.trans(tl.load(wbase + rr[:, None] * w_sr + cols[None, :] * w_sh,
                                          mask=(rr[:, None] < R) & cm[None, :], other=0.0).to(xv.dtype))
                else:  # the (BK, BR) tile of W_e^T loaded as such
                    wv = tl.load(wbase + rr[None, :] * w_sr + cols[:, None] * w_sh,
                                 mask=(rr[None, :] < R) & cm[:, None], other=0.0).to(xv.dtype)
                if IEEE:
                    acc += tl.dot(xv, wv, input_precision="ieee")
                else:
                    acc += tl.dot(xv, wv)
            acc = acc * scale
            um = rm[:, None] & (rr[None, :] < R)
            tl.store(u_ptr + rows[:, None] * u_ld + rr[None, :], acc.to(u_ptr.dtype.element_ty), mask=um)
            if HAS_U2:
                tl.store(u2_ptr + rows[:, None] * u2_ld + rr[None, :], acc.to(u2_ptr.dtype.element_ty), mask=um)

    @triton.jit
    def gather_lowrank_wgrad_kernel(d_ptr, x_ptr, tok_ptr, offs_ptr, out_ptr, H, R, d_ld, x_ld,
                                    BM: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, IEEE: tl.constexpr):
        e = tl.program_id(0)
        cols = tl.program_id(1) * BH + tl.arange(0, BH)
        cm = cols < H
        start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(offs_ptr + e)
        rr = tl.arange(0, BR)
        acc = tl.zeros((BR, BH), dtype=tl.float32)
        for m0 in range(start, end, BM):
            rows = (m0 + tl.arange(0, BM)).to(tl.int64)
            rm = rows < end
            src = tl.load(tok_ptr + rows, mask=rm, other=0).to(tl.int64)
            dv = tl.load(d_ptr + rows[:, None] * d_ld + rr[None, :], mask=rm[:, None] & (rr[None, :] < R), other=0.0)
            xv = tl.load(x_ptr + src[:, None] * x_ld + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(dv), xv, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(dv), xv)
        optr = out_ptr + e.to(tl.int64) * R * H + rr[:, None] * H + cols[None, :]
        tl.store(optr, acc, mask=(rr[:, None] < R) & cm[None, :])

    return gather_lowrank_kernel, gather_lowrank_wgrad_kernel


def gather_lowrank(x: torch.Tensor, tok: torch.Tensor, offs: torch.Tensor, W: torch.Tensor, s: float,
                   xs: torch.Tensor | None, outs: list, triton: bool | None = None) -> bool:
    """xs[m] = x[tok[m]] (skipped when xs is None) and out[m] = s * x[tok[m]] @ W[e(m)]^T into each of `outs` (one
    or two (M, R) row-major views, e.g. the widened buffer's tail and a tensor kept for backward). Returns False,
    touching nothing, where the Triton kernel cannot run (the caller then takes its unfused path)."""
    M, H = tok.numel(), x.shape[1]
    E, R = W.shape[0], W.shape[1]
    if not CONFIG["on"] or not use_triton(x, triton) or not (1 <= len(outs) <= 2) or not _rows_ok(x) or W.shape[2] != H:
        return False
    if (xs is not None and not _rows_ok(xs)) or not all(_rows_ok(o) and o.shape == (M, R) for o in outs):
        return False
    if M == 0:
        return True
    if CONFIG["cast_w"] and W.dtype != torch.float32 and W.stride(2) == 1 and not _wt(W):
        W = W.float()  # the form the GPU got wrong with a row-major bf16 W (see _wt); exact in fp32
    c = CONFIG
    BM = c["BM"]
    cnt = torch.diff(offs, prepend=offs.new_zeros(1))
    tiles = (cnt + BM - 1) // BM
    tstart = (torch.cumsum(tiles, 0) - tiles).to(torch.int32)  # (E,) first tile of each expert
    grid = _cdiv(M, BM) + E  # an upper bound of the tiles (each expert's last one may be partial)
    u, u2 = outs[0], outs[-1]
    _kernels()[0][(grid,)](
        x, tok.contiguous(), offs, tstart, W, xs if xs is not None else x, u, u2,
        H, R, E, x.stride(0), xs.stride(0) if xs is not None else 0, u.stride(0), u2.stride(0),
        W.stride(0), W.stride(1), W.stride(2), float(s),
        EP=_pow2(E, 2), BM=BM, BK=c["BK"], BR=_pow2(R), STORE_X=xs is not None, HAS_U2=len(outs) == 2,
        IEEE=x.dtype == torch.float32, WT=_wt(W), num_warps=c["warps"], **_stages())
    return True


def _wt(W: torch.Tensor) -> bool:
    """How the kernel loads W's tiles: CONFIG["wt"] True = as stored, (BR, BK), transposed in the product; False =
    the (BK, BR) tile of W^T loaded as such; "auto" = the first where W's rows are contiguous along H.
    On an H100 (Triton 3.x, session 9, bench/gather_check.py) the second form gave whole rows wrong with a
    row-major bf16 W (Qwen3: 3.7e-2 rel., 2,013 of 32,768 rows over 5% off, the worst 62%) and was exact with fp32 W in either layout, so with that form a row-major W of
    another dtype is read as fp32 (gather_lowrank) until the first form is checked on the GPU."""
    wt = CONFIG["wt"]
    return W.stride(2) == 1 if wt == "auto" else bool(wt)


def _stages() -> dict:
    st = CONFIG["stages"]
    return {} if st is None else {"num_stages": int(st)}


def gather_lowrank_wgrad(d: torch.Tensor, x: torch.Tensor, tok: torch.Tensor, offs: torch.Tensor,
                         triton: bool | None = None) -> torch.Tensor | None:
    """(E, R, H) fp32: out[e] = d[rows of e]^T @ x[tok[rows of e]]; None where the Triton kernel cannot run."""
    M, R = d.shape
    H, E = x.shape[1], offs.numel()
    if not CONFIG["on"] or not use_triton(x, triton) or not _rows_ok(x) or not _rows_ok(d) or d.dtype != x.dtype:
        return None
    out = torch.empty(E, R, H, dtype=torch.float32, device=x.device)
    c = CONFIG
    _kernels()[1][(E, _cdiv(H, c["BH"]))](
        d, x, tok.contiguous(), offs, out, H, R, d.stride(0), x.stride(0),
        BM=c["BMW"], BR=_pow2(R), BH=c["BH"], IEEE=x.dtype == torch.float32, num_warps=c["warps_w"])
    return out
