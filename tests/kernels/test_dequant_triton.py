"""The Triton kernels (NF4 dequantization, SwiGLU, RMSNorm) under Triton's CPU interpreter, against PyTorch.

Skipped when Triton is not installed (it is an optional extra). fp32 outputs: the interpreter's bf16 casts
truncate instead of rounding."""

import os
import sys

import pytest
import torch

# The interpreter must be on before Triton is first imported in this process (it patches triton.language).
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton was imported before the interpreter could be enabled", allow_module_level=True)


@pytest.mark.parametrize("words", [False, True])  # both decodings (dequant.CONFIG["words"])
def test_nf4_dequant_exact_and_widened(monkeypatch, words):
    from mixtune.kernels import dequant
    from mixtune.kernels.dequant import dequantize_nf4, dequantize_nf4_stack
    from mixtune.quant.nf4 import NF4Weight
    monkeypatch.setitem(dequant.CONFIG, "words", words)
    monkeypatch.setitem(dequant.CONFIG, "R", 256)  # 384 and 192 blocks: the last program is partly masked
    g = torch.Generator().manual_seed(1)
    w1 = NF4Weight.quantize(torch.randn(3, 64, 128, generator=g))
    w3 = NF4Weight.quantize(torch.randn(3, 32, 128, generator=g) * 3)
    assert torch.equal(dequantize_nf4(w1, torch.float32, triton=True), w1.dequantize(torch.float32))
    out = dequantize_nf4_stack([w1, w3], torch.float32, triton=True, rows=100, cols=136)
    ref = torch.cat([w1.dequantize(torch.float32), w3.dequantize(torch.float32)], 1)
    assert out.shape == (3, 100, 136)
    assert torch.equal(out[:, :96, :128], ref)


@pytest.mark.parametrize("words", [False, True])
def test_nf4_dequant_extras_placed_in_the_same_launch(monkeypatch, words):
    """Extra regions beside the weights (the LoRA B columns, A rows): placed, cast, scaled, zero-filled around,
    in partly masked tiles, equal between the Triton kernel (interpreter) and the PyTorch path, and nothing
    else of the buffer touched."""
    from mixtune.kernels import dequant
    from mixtune.kernels.dequant import Extra, dequantize_nf4_stack
    monkeypatch.setitem(dequant.CONFIG, "words", words)
    from mixtune.quant.nf4 import NF4Weight
    g = torch.Generator().manual_seed(13)
    E, I, H, r = 3, 40, 128, 5
    w1, w3 = (NF4Weight.quantize(torch.randn(E, I, H, generator=g)) for _ in range(2))
    B1, B3 = torch.randn(E, I, r, generator=g), torch.randn(E, I, r, generator=g)
    A1 = torch.randn(E, r, H, generator=g)
    cases = [  # (extras, rows, cols, region of each expert that the extras cover)
        ([Extra(B1, 0, H, 2 * r, at=0), Extra(B3, I, H, 2 * r, at=r, scale=0.5)], 2 * I, H + 2 * r + 3,
         (slice(0, 2 * I), slice(H, H + 2 * r))),
        ([Extra(None, 0, H, 2 * r, height=I), Extra(B3, I, H, 2 * r, at=r)], 2 * I, H + 2 * r,
         (slice(0, 2 * I), slice(H, H + 2 * r))),
        ([Extra(A1, 2 * I, 0, H), Extra(None, 2 * I + r, 0, H, height=r)], 2 * I + 2 * r + 1, H,
         (slice(2 * I, 2 * I + 2 * r), slice(0, H))),
    ]
    for extras, rows, cols, (rs, cs) in cases:
        got = dequantize_nf4_stack([w1, w3], torch.float32, triton=True, rows=rows, cols=cols, extras=extras)
        ref = dequantize_nf4_stack([w1, w3], torch.float32, triton=False, rows=rows, cols=cols, extras=extras)
        assert torch.equal(got[:, :2 * I, :H], ref[:, :2 * I, :H])
        assert torch.equal(got[:, rs, cs], ref[:, rs, cs])
    # the PyTorch placement itself: B1 | 0 beside W1, 0 | 0.5·B3 beside W3
    out = dequantize_nf4_stack([w1, w3], torch.float32, triton=False, cols=H + 2 * r, extras=cases[0][0])
    assert torch.equal(out[:, :I, H:H + r], B1) and not out[:, :I, H + r:].any()
    assert torch.equal(out[:, I:, H + r:], 0.5 * B3) and not out[:, I:, H:H + r].any()
    with pytest.raises(ValueError, match="extras"):
        dequantize_nf4_stack([w1, w3], torch.float32, transpose=True, extras=cases[0][0])


def test_swiglu_kernels_match_torch():
    from mixtune.kernels.swiglu import swiglu_backward, swiglu_forward
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, 2 * 100, generator=g)
    dg = torch.randn(9, 100, generator=g)
    assert torch.allclose(swiglu_forward(h, True), swiglu_forward(h, False), atol=1e-6)
    assert torch.allclose(swiglu_backward(h, dg, True), swiglu_backward(h, dg, False), atol=1e-6)
    wide = torch.full((9, 230), float("nan"))
    swiglu_backward(h, dg, True, out=wide[:, :200])
    assert torch.allclose(wide[:, :200], swiglu_backward(h, dg, False), atol=1e-6)
    assert torch.isnan(wide[:, 200:]).all()  # nothing written past the view
    for tri in (True, False):  # g from the backward pass, written over dg
        d = dg.clone()
        dh, g = swiglu_backward(h, d, tri, want_g=True)
        assert torch.allclose(dh, swiglu_backward(h, dg, False), atol=1e-6)
        assert torch.allclose(g, swiglu_forward(h, False), atol=1e-6)
        assert g.data_ptr() == d.data_ptr()


def test_swiglu_backward_row_scale_and_dot():
    """The MoE backward's form: the upstream gradient scaled per row (the routing weights) and the row dot
    <dg, g> of the unscaled gradient, in the same pass; I > the kernel's block, so each row's loop runs twice."""
    from mixtune.kernels.swiglu import swiglu_backward, swiglu_forward
    g = torch.Generator().manual_seed(12)
    M, I = 6, 1100
    h = torch.randn(M, 2 * I, generator=g)
    dg = torch.randn(M, I, generator=g)
    w = torch.rand(M, generator=g)
    want_dh = swiglu_backward(h, dg * w[:, None], False)
    want_dot = (dg * swiglu_forward(h, False)).sum(1)
    for tri in (True, False):
        d = dg.clone()
        wide = torch.full((M, 2 * I + 5), float("nan"))
        dh, gg, dot = swiglu_backward(h, d, tri, out=wide[:, :2 * I], want_g=True, row_scale=w, want_dot=True)
        assert torch.allclose(dh, want_dh, atol=1e-5) and torch.isnan(wide[:, 2 * I:]).all()
        assert torch.allclose(gg, swiglu_forward(h, False), atol=1e-6) and gg.data_ptr() == d.data_ptr()
        assert torch.allclose(dot, want_dot, rtol=1e-5, atol=1e-4)
        dh2, dot2 = swiglu_backward(h, dg.clone(), tri, row_scale=w, want_dot=True)  # without g
        assert torch.allclose(dh2, want_dh, atol=1e-5) and torch.allclose(dot2, want_dot, rtol=1e-5, atol=1e-4)


def test_rms_norm_kernel_matches_module_math():
    from mixtune.kernels.norm import rms_norm
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 48, generator=g, requires_grad=True)
    w = torch.rand(48, generator=g) + 0.5
    y = rms_norm(x, w, 1e-5, triton=True)
    go = torch.randn(y.shape, generator=g)
    (y * go).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    yr = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    (yr * go).sum().backward()
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert torch.allclose(y, yr, atol=1e-5)
    assert torch.allclose(gx, x.grad, atol=1e-5)


@pytest.mark.parametrize("backend", ["grouped", "grouped_lowmem"])
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_moe_through_triton_kernels(monkeypatch, shared, backend):
    """The whole grouped MoE path (widened dequantization, SwiGLU kernels, the routing weights' gradient from
    the SwiGLU backward, the gather-fused LoRA products in tiles of 16 rows) in fp32 vs the reference loop;
    shared: w1 and w3 share one A."""
    from mixtune import kernels
    from mixtune.kernels import _triton, gather_mm
    from mixtune.quant.nf4 import NF4Weight
    monkeypatch.setattr(_triton, "FORCE", True)
    for key, v in (("BM", 16), ("BMW", 16), ("BH", 32)):
        monkeypatch.setitem(gather_mm.CONFIG, key, v)
    g = torch.Generator().manual_seed(4)
    E, H, I, N, k, r = 4, 64, 128, 29, 2, 8
    ws = [NF4Weight.quantize(torch.randn(*s, generator=g) * 0.1) for s in ((E, I, H), (E, I, H), (E, H, I))]

    class L:
        scaling = 2.0
        A = {n: torch.randn(E, r, H if n != "w2" else I, generator=g) for n in ("w1", "w2", "w3")}
        B = {n: torch.randn(E, I if n != "w2" else H, r, generator=g) * 0.1 for n in ("w1", "w2", "w3")}

    x = torch.randn(N, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    tw = torch.rand(N, k, generator=g)
    go = torch.randn(N, H, generator=g)
    res = {}
    for backend in ("reference", backend):
        xx, ww = x.clone().requires_grad_(), tw.clone().requires_grad_()
        if shared:
            L.A["w3"] = L.A["w1"]
        for n in L.A:
            L.A[n].requires_grad_(True).grad = None
            L.B[n].requires_grad_(True).grad = None
        y = kernels.moe_experts(xx, idx, ww, *ws, lora=L, backend=backend)
        (y * go).sum().backward()
        res[backend] = [y, xx.grad, ww.grad] + [L.A[n].grad for n in L.A] + [L.B[n].grad for n in L.B]
    for a, b in zip(res[backend], res["reference"]):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_route_kernels_match_torch():
    """gather_rows into a wider buffer and the weighted combine (and its unweighted form for dx): Triton
    (interpreter) vs the PyTorch path, with a repeated token and an uneven H."""
    from mixtune.kernels.route import combine, gather_rows
    g = torch.Generator().manual_seed(5)
    N, k, H = 7, 2, 1100  # H > the kernels' block: the column loop / second program runs
    x = torch.randn(N, H, generator=g)
    order = torch.randperm(N * k, generator=g)
    tok = order // k
    wide = torch.full((N * k, H + 9), float("nan"))
    gather_rows(x, tok, out=wide[:, :H], triton=True)
    assert torch.equal(wide[:, :H], x[tok]) and torch.isnan(wide[:, H:]).all()
    inv = torch.empty_like(order)
    inv[order] = torch.arange(N * k)
    y = torch.randn(N * k, H, generator=g)
    w = torch.rand(N, k, generator=g)
    for ww in (w, None):
        assert torch.allclose(combine(y, inv, ww, N, k, triton=True), combine(y, inv, ww, N, k, triton=False),
                              atol=1e-5)
    ref = (y[inv].view(N, k, H) * w[:, :, None]).sum(1)
    assert torch.allclose(combine(y, inv, w, N, k, triton=True), ref, atol=1e-5)
    # against autograd of the combine itself: dy = the gathered output gradient times the weight
    dout = torch.randn(N, H, generator=g)
    yy, wr = y.clone().requires_grad_(), w.clone().requires_grad_()
    (((yy[inv].view(N, k, H) * wr[:, :, None]).sum(1)) * dout).sum().backward()
    assert torch.allclose(gather_rows(dout, tok, triton=True) * w.reshape(-1)[order][:, None], yy.grad, atol=1e-5)


def test_rope_kernel_matches_model_rope_forward_and_backward():
    """The fused rotary kernel (interpreter) vs modeling.apply_rope's PyTorch formula: values and gradients,
    on q/k laid out as the projections produce them ((B, T, n, d) storage seen as (B, n, T, d)), packed
    position ids, and a head count that is not a power of two."""
    from mixtune.kernels.rope import apply_rope as fused
    from mixtune.model import modeling
    g = torch.Generator().manual_seed(6)
    B, T, nh, nkv, d = 2, 5, 6, 2, 16
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    cos, sin = modeling.rope_cos_sin(pos, d, 10000.0, torch.float32)
    q0 = torch.randn(B, T, nh, d, generator=g).transpose(1, 2)
    k0 = torch.randn(B, T, nkv, d, generator=g).transpose(1, 2)
    gq, gk = torch.randn(B, nh, T, d, generator=g), torch.randn(B, nkv, T, d, generator=g)
    outs = []
    for fn in (lambda q, k: fused(q, k, cos, sin, triton=True), lambda q, k: modeling.apply_rope(q, k, cos, sin)):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        qr, kr = fn(q, k)
        ((qr * gq).sum() + (kr * gk).sum()).backward()
        outs.append((qr, kr, q.grad, k.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)
    assert outs[0][0].transpose(1, 2).is_contiguous()  # the projections' layout is kept


@pytest.mark.parametrize("words", [False, True])
def test_fp8_kernels_match_torch(monkeypatch, words):
    """FP8 (e4m3) outputs: row quantization, and NF4 dequantization scaled per expert, row-major and
    transposed (the backward's layout), widened — Triton (interpreter) vs the PyTorch path, value for value.
    (The interpreter's own fp32->fp8 cast misrounds across binades; the kernels round first, so the cast is
    exact and these comparisons are too.)"""
    from mixtune.kernels import dequant
    from mixtune.kernels.dequant import dequantize_nf4_stack
    from mixtune.kernels.fp8 import F8, quantize_rows
    from mixtune.quant.nf4 import NF4Weight
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2100, generator=g) * torch.tensor([1.0, 1e-3, 0.0, 50.0, 3.0])[:, None]
    x[4, 7] = 1e-9  # a subnormal after scaling
    qt, st = quantize_rows(x, triton=True)
    qp, sp = quantize_rows(x, triton=False)
    assert torch.equal(st, sp)
    assert torch.equal(qt.float(), qp.float())  # (+0 and -0 compare equal)
    qb, sb = quantize_rows(x.to(torch.bfloat16), triton=True)  # bf16 input, as in the model
    assert torch.equal(qb.float(), quantize_rows(x.to(torch.bfloat16), triton=False)[0].float())

    monkeypatch.setitem(dequant.CONFIG, "words", words)
    monkeypatch.setitem(dequant.CONFIG, "R", 256)
    monkeypatch.setitem(dequant.CONFIG, "R8", 256)
    monkeypatch.setitem(dequant.CONFIG, "TO", 32)  # 48 rows: the second tile is partly masked
    w1 = NF4Weight.quantize(torch.randn(3, 48, 128, generator=g))
    w3 = NF4Weight.quantize(torch.randn(3, 32, 128, generator=g) * 3)
    inv = torch.tensor([400.0, 90.0, 1000.0])  # the last one saturates: clamped to ±448
    for transpose in (False, True):
        for dt in (F8, torch.float32):
            kw = dict(cols=90 if transpose else 136, inv=inv if dt == F8 else None, transpose=transpose)
            t = dequantize_nf4_stack([w1, w3], dt, triton=True, **kw)
            p = dequantize_nf4_stack([w1, w3], dt, triton=False, **kw)
            n = (slice(None), slice(0, 128), slice(0, 80)) if transpose else (slice(None), slice(0, 80), slice(0, 128))
            assert t.shape == p.shape == ((3, 128, 90) if transpose else (3, 80, 136))
            assert torch.equal(t[n].float(), p[n].float()), (transpose, dt)
    ref = torch.cat([w1.dequantize(torch.float32), w3.dequantize(torch.float32)], 1).transpose(1, 2)
    assert torch.equal(dequantize_nf4_stack([w1, w3], torch.float32, triton=True, transpose=True), ref)
