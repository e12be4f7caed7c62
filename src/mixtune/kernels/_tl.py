"""Triton kernels for NF4 decoding and FP8 (e4m3) rounding, at module level so that jit functions can call
one another (also under Triton's interpreter). Imported only when a Triton kernel is about to run; the callers
and their PyTorch equivalents are `dequant.py` and `fp8.py`."""

import triton
import triton.language as tl


@triton.jit
def round_e4m3(v):
    # v fp32, |v| <= 448 -> the nearest e4m3 value (ties to even), so the cast that follows is exact.
    # Normal range: keep 3 mantissa bits; below 2^-6 (subnormals): a fixed step of 2^-9.
    b = v.to(tl.int32, bitcast=True)
    nrm = ((b + 0x7FFFF + ((b >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    a = tl.abs(v) * 512.0
    sub = tl.floor(a + 0.5)
    sub = tl.where((sub - a == 0.5) & (sub % 2 == 1), sub - 1.0, sub) / 512.0  # ties to even
    return tl.where(tl.abs(v) < 0.015625, tl.where(v < 0, -sub, sub), nrm)


@triton.jit
def pow2_scale(amax):
    # amax >= 0 fp32 -> (s, inv): s = 2^k, the smallest power of two with amax / s <= 448, inv = 2^-k exactly,
    # k clamped to [-126, 126]; amax == 0 gives (0, 0). Same bit arithmetic as fp8.pow2_scale.
    b = amax.to(tl.int32, bitcast=True)
    k = ((b >> 23) & 0xFF) - 127 - 8 + ((b & 0x7FFFFF) > 0x600000).to(tl.int32)
    k = tl.minimum(tl.maximum(k, -126), 126)
    s = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return tl.where(amax > 0, s, 0.0), tl.where(amax > 0, inv, 0.0)


@triton.jit
def to_e4m3(v, SOFT_ROUND: tl.constexpr):
    # clamp to ±448 and round to nearest-even: the hardware cast (cvt.rn.satfinite) on a GPU; under the
    # interpreter, whose own cast misrounds across binades, round_e4m3 first so that the cast is exact
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    if SOFT_ROUND:
        v = round_e4m3(v)
    return v.to(tl.float8e4nv)


@triton.jit
def nf4_block_values(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, b, mb, R: tl.constexpr):
    # (R,) block ids -> (R, 64) fp32 weights in memory order. The codes are read as int32 words (8 per block,
    # 8 codes per word, little-endian bytes).
    a = tl.load(absmax_ptr + b, mask=mb, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + a) * tl.load(absmax2_ptr + b // 256, mask=mb, other=0.0) + tl.load(offset_ptr)
    w = tl.load(words_ptr + b[:, None] * 8 + tl.arange(0, 8)[None, :], mask=mb[:, None], other=0)  # (R, 8)
    j = tl.arange(0, 8)
    shift = (j // 2) * 8 + (1 - j % 2) * 4  # element j of a word: byte j//2, high nibble first
    q = (w[:, :, None] >> shift[None, None, :]) & 15  # (R, 8, 8)
    return tl.reshape(tl.load(code_ptr + q), (R, 64)) * scale[:, None]


@triton.jit
def nf4_dequant_kernel(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, out_ptr, inv_ptr,
                       n_blocks, per_expert, cols, ld, out_expert_stride, out_offset,
                       x_ptr, x_se, x_sp, XP, XQ, x_scale, ex_off, EW, x_at, n_xp, n_xq,
                       R: tl.constexpr, FP8: tl.constexpr, SOFT_ROUND: tl.constexpr, EXTRA: tl.constexpr,
                       HAS_X: tl.constexpr, XBP: tl.constexpr, XBQ: tl.constexpr, WORDS: tl.constexpr):
    # Programs [0, cdiv(n_blocks, R)): R blocks of 64 weights each; a block never crosses a row (cols % 64 == 0).
    # With EXTRA, the programs after them each write one (XBP, XBQ) tile of an extra region of every expert's
    # output: XP rows x EW columns at element offset ex_off, whose columns [x_at, x_at + XQ) are
    # x_scale * x[e] (x (E, XP, XQ), last stride 1; the LoRA matrices beside the weight) and the rest zeros.
    # WORDS: each thread decodes whole 32-bit words (8 codes) and computes their scale once per word, so the table
    # lookups, the scaling and the store share one layout (8 consecutive outputs per thread); without it the
    # (R, 8, 8) -> (R, 64) reshape gives the lookups a layout of one element per thread per block, which loads the
    # block's scale once per element and reshuffles the values through shared memory before the store.
    pid = tl.program_id(0).to(tl.int64)
    n_dq = (n_blocks + R - 1) // R
    if pid < n_dq:
        if WORDS:
            wi = pid * (R * 8) + tl.arange(0, R * 8)  # (8R,) word ids
            mw = wi < n_blocks * 8
            bw = wi // 8  # (8R,) block of each word
            aw = tl.load(absmax_ptr + bw, mask=mw, other=0).to(tl.int32)
            sw = tl.load(code2_ptr + aw) * tl.load(absmax2_ptr + bw // 256, mask=mw, other=0.0) + tl.load(offset_ptr)
            word = tl.load(words_ptr + wi, mask=mw, other=0)
            jw = tl.arange(0, 8)
            sh = (jw // 2) * 8 + (1 - jw % 2) * 4  # element j of a word: byte j//2, high nibble first
            vw = tl.load(code_ptr + ((word[:, None] >> sh[None, :]) & 15)) * sw[:, None]  # (8R, 8) fp32
            fw = wi * 8  # first weight of the word in the source tensor
            ew = fw // per_expert
            rw = fw - ew * per_expert
            roww = rw // cols
            dw = ew * out_expert_stride + out_offset + roww * ld + (rw - roww * cols)  # (8R,)
            pw = dw[:, None] + jw[None, :]
            if FP8:
                invw = tl.load(inv_ptr + ew, mask=mw, other=0.0)
                tl.store(out_ptr + pw, to_e4m3(vw * invw[:, None], SOFT_ROUND), mask=mw[:, None])
            else:
                tl.store(out_ptr + pw, vw.to(out_ptr.dtype.element_ty), mask=mw[:, None])
        else:
            b = pid * R + tl.arange(0, R)  # (R,) block ids
            mb = b < n_blocks
            v = nf4_block_values(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, b, mb, R)
            f = b * 64  # first weight of the block in the source tensor
            e = f // per_expert
            rem = f - e * per_expert
            row = rem // cols
            dst = e * out_expert_stride + out_offset + row * ld + (rem - row * cols)  # (R,)
            ptr = dst[:, None] + tl.arange(0, 64)[None, :]
            if FP8:
                inv = tl.load(inv_ptr + e, mask=mb, other=0.0)
                tl.store(out_ptr + ptr, to_e4m3(v * inv[:, None], SOFT_ROUND), mask=mb[:, None])
            else:
                tl.store(out_ptr + ptr, v.to(out_ptr.dtype.element_ty), mask=mb[:, None])
    elif EXTRA:
        t = pid - n_dq
        xe = t // (n_xp * n_xq)  # expert of this tile (names apart from the branch above: Triton types them)
        t2 = t - xe * n_xp * n_xq
        pi = t2 // n_xq
        xr = (pi * XBP + tl.arange(0, XBP))[:, None]  # (XBP, 1) region rows
        xc = ((t2 - pi * n_xq) * XBQ + tl.arange(0, XBQ))[None, :]  # (1, XBQ) region columns
        inside = (xr < XP) & (xc < EW)
        if HAS_X:
            src = (xc >= x_at) & (xc < x_at + XQ) & inside
            val = tl.load(x_ptr + xe * x_se + xr * x_sp + (xc - x_at), mask=src, other=0.0).to(tl.float32) * x_scale
        else:
            val = tl.zeros((XBP, XBQ), dtype=tl.float32)
        tl.store(out_ptr + xe * out_expert_stride + ex_off + xr * ld + xc, val.to(out_ptr.dtype.element_ty),
                 mask=inside)


@triton.jit
def nf4_dequant_t_kernel(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, out_ptr, inv_ptr,
                         O, nib, ld, out_expert_stride, out_offset, TO: tl.constexpr, FP8: tl.constexpr,
                         SOFT_ROUND: tl.constexpr):
    # One program: TO rows o of expert e's (O, In) weight at block column ib (64 input columns), written
    # transposed: out[e, ib*64 + i, out_offset + o] (row stride ld).
    pid = tl.program_id(0).to(tl.int64)
    n_ot = (O + TO - 1) // TO
    e = pid // (n_ot * nib)
    rem = pid - e * n_ot * nib
    ot = rem // nib
    ib = rem - ot * nib
    o = ot * TO + tl.arange(0, TO)  # (TO,)
    mo = o < O
    b = e * O * nib + o * nib + ib  # (TO,) block ids
    v = nf4_block_values(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, b, mo, TO)
    i = ib * 64 + tl.arange(0, 64)
    ptr = e * out_expert_stride + i[:, None] * ld + out_offset + o[None, :]
    if FP8:
        tl.store(out_ptr + ptr, tl.trans(to_e4m3(v * tl.load(inv_ptr + e), SOFT_ROUND)), mask=mo[None, :])
    else:
        tl.store(out_ptr + ptr, tl.trans(v).to(out_ptr.dtype.element_ty), mask=mo[None, :])


@triton.jit
def quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, x_ld, q_ld, BLOCK: tl.constexpr, SOFT_ROUND: tl.constexpr):
    # One row: its amax (pass 1), its power-of-two scale s, then q = e4m3(x / s) (pass 2; exact scaling).
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        c = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row * x_ld + c, mask=c < K, other=0.0).to(tl.float32)))
    s, inv = pow2_scale(tl.max(amax, axis=0))
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        c = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * x_ld + c, mask=c < K, other=0.0).to(tl.float32) * inv
        tl.store(q_ptr + row * q_ld + c, to_e4m3(v, SOFT_ROUND), mask=c < K)
