"""FP8 experts (kernels.moe_fp8, kernels.fp8) on CPU, where the FP8 products are emulated exactly.

Two kinds of check: with e4m3 rounding switched off (FP8 storage made fp32) the FP8 path must be *exactly*
the reference function — every layout, transpose and folded LoRA matrix right — and with real e4m3 it must
stay within FP8's rounding noise of the fp32 reference, in the forward and every gradient."""

import pytest
import torch

from mixtune import kernels
from mixtune.kernels import dequant, fp8
from mixtune.quant.nf4 import NF4Weight

from .test_moe import _case, _rel, _run

NAMES = [("w1", "w2", "w3"), ("w2",), ("w3",), ()]


@pytest.mark.parametrize("backend", ["grouped", "grouped_lowmem"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("names", NAMES)
def test_fp8_path_is_the_reference_function_without_rounding(monkeypatch, backend, nf4, names):
    monkeypatch.setattr(fp8, "F8", torch.float32)
    monkeypatch.setattr(dequant, "F8", torch.float32)
    case = _case(hash((backend, nf4, names, 8)) % 1000, nf4, torch.float32, names)
    ref = _run("reference", *case)
    got = _run(backend, *case, precision="fp8")
    assert set(got) == set(ref)
    for key in ref:
        assert _rel(got[key], ref[key]) < 1e-5, (key, _rel(got[key], ref[key]))


@pytest.mark.parametrize("backend", ["grouped", "grouped_lowmem"])
def test_fp8_path_with_shared_gate_up_a_is_the_reference_without_rounding(monkeypatch, backend):
    monkeypatch.setattr(fp8, "F8", torch.float32)
    monkeypatch.setattr(dequant, "F8", torch.float32)
    case = _case(hash((backend, "shared", 8)) % 1000, True, torch.float32, ("w1", "w2", "w3"))
    ref = _run("reference", *case, shared=True)
    got = _run(backend, *case, precision="fp8", shared=True)
    for key in ref:
        assert _rel(got[key], ref[key]) < 1e-5, (key, _rel(got[key], ref[key]))


@pytest.mark.parametrize("backend", ["grouped", "grouped_lowmem"])
@pytest.mark.parametrize("names", NAMES[:2])
def test_fp8_within_e4m3_noise_of_reference(backend, names):
    case = _case(11, True, torch.float32, names)
    ref = _run("reference", *case)
    got = _run(backend, *case, precision="fp8")
    for key in ref:
        err = _rel(got[key], ref[key])
        # one e4m3 rounding of each operand is ~2.6% rms; h13 -> SwiGLU -> y compounds two products
        assert 0.005 < err < 0.1, (key, err)
        cos = torch.nn.functional.cosine_similarity(got[key].flatten().double(), ref[key].flatten().double(), 0)
        assert cos > 0.99, (key, cos)


def test_fp8_grouped_equals_lowmem_and_rejects_reference():
    case = _case(4, True, torch.float32, ("w1", "w2", "w3"))
    a = _run("grouped", *case, precision="fp8")
    b = _run("grouped_lowmem", *case, precision="fp8")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ws, A, B, x, idx, tw, go = case
    with pytest.raises(ValueError, match="fp8 needs a grouped"):
        kernels.moe_experts(x, idx, tw, *ws, backend="reference", precision="fp8")
    with pytest.raises(ValueError, match="unknown expert precision"):
        kernels.moe_experts(x, idx, tw, *ws, precision="fp16")
    # auto on CPU takes the grouped path for fp8 (the reference has no FP8)
    y = kernels.moe_experts(x, idx, tw, *ws, backend="auto", precision="fp8")
    assert torch.equal(y, kernels.moe_experts(x, idx, tw, *ws, backend="grouped", precision="fp8"))


def test_quantize_rows_scales_and_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 100, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 5.0, 1e4])[:, None]
    q, s = fp8.quantize_rows(x, triton=False)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6,)
    assert s[3] == 0 and (q[3].float() == 0).all()  # an all-zero row
    top = q.float().abs().amax(1)[[0, 1, 2, 4, 5]]
    assert ((top > 224) & (top <= 448)).all()  # power-of-two scales: the row max lands in (224, 448]
    assert torch.equal(torch.frexp(s[[0, 1, 2, 4, 5]]).mantissa, torch.full((5,), 0.5))
    back = q.float() * s[:, None]
    rel = (back - x).abs() / x.abs().clamp_min(1e-30)
    big = x.abs() > x.abs().amax(1, keepdim=True) * 2 ** -6  # the normal e4m3 range: <= half an ulp (2^-4)
    assert (rel[big] <= 2 ** -4 + 1e-6).all()


def test_fp8_weights_bound_and_layouts():
    g = torch.Generator().manual_seed(1)
    w1 = NF4Weight.quantize(torch.randn(3, 128, 64, generator=g))
    w3 = NF4Weight.quantize(torch.randn(3, 128, 64, generator=g) * 3)
    ex = torch.randn(3, 256, 8, generator=g)
    bound = fp8.expert_amax(w1)
    assert (bound >= w1.dequantize(torch.float32).abs().reshape(3, -1).amax(1)).all()
    W8, s = fp8.fp8_weights([w1, w3], ex)
    dense = torch.cat([w1.dequantize(torch.float32), w3.dequantize(torch.float32)], 1)  # (3, 256, 64)
    full = torch.cat([dense, ex], 2)
    assert W8.shape == (3, 256, 72) and s.shape == (3, 256)
    back = W8.float() * s[..., None]
    assert _rel(back, full) < 0.05 and (s[:, :1] == s).all()
    Wt, st = fp8.fp8_weights([w1, w3], torch.randn(3, 64, 8, generator=g), transpose=True)
    assert Wt.shape == (3, 64, 264) and st.shape == (3, 64)
    assert _rel(Wt[:, :, :256].float() * st[..., None], dense.transpose(1, 2)) < 0.05


def test_scaled_grouped_mm_emulation_is_exact_on_quantized_values():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(30, 32, generator=g)
    W = torch.randn(3, 16, 32, generator=g)
    offs = torch.tensor([10, 10, 30], dtype=torch.int32)  # expert 1 gets no rows
    qa, sa = fp8.quantize_rows(a, triton=False)
    qw = (W * 10).to(torch.float8_e4m3fn)
    sw = torch.full((3, 16), 0.1)
    y = fp8.scaled_grouped_mm(qa, sa, qw, sw, offs, torch.float32)
    A = qa.float() * sa[:, None]
    Wd = qw.float() * 0.1
    ref = torch.cat([A[:10] @ Wd[0].t(), A[10:] @ Wd[2].t()])
    assert torch.allclose(y, ref, atol=1e-5)


def test_pow2_scale_edges():
    amax = torch.tensor([448.0, 448.0 * 1.0000001, 224.0, 1.75, 1.7500001, 1.0, 3e-30, 1e30, 0.0, 1e-45])
    s, inv = fp8.pow2_scale(amax)
    for a, sc, iv in zip(amax.tolist(), s.tolist(), inv.tolist()):
        if a == 0:
            assert sc == 0 and iv == 0
            continue
        assert sc * iv == 1.0 and torch.frexp(torch.tensor(sc)).mantissa == 0.5
        if 2.0 ** -118 < a < 2.0 ** 126:  # inside the clamped exponent range: the smallest such power of two
            assert a / sc <= 448 and a / sc > 224, (a, sc)
    assert s[0] == 1.0 and s[1] == 2.0 and s[2] == 0.5 and s[3] == 2.0 ** -8 and s[4] == 2.0 ** -7


@pytest.mark.parametrize("r", [4, 12])
def test_fp8_operands_padded_to_16_bytes_for_odd_ranks(monkeypatch, r):
    """The FP8 kernel wants rows of a multiple of 16 bytes: H + 2r etc. are padded with zero columns (in the
    operand and in the weights); the result is still exactly the reference function."""
    from mixtune.kernels import moe_fp8
    monkeypatch.setattr(fp8, "F8", torch.float32)
    monkeypatch.setattr(dequant, "F8", torch.float32)
    widths = []
    real = moe_fp8._mm8
    monkeypatch.setattr(moe_fp8, "_mm8", lambda a, W8, sw, offs: widths.append(a.shape[1]) or real(a, W8, sw, offs))
    case = _case(21, True, torch.float32, ("w1", "w2", "w3"), r=r)
    ref = _run("reference", *case)
    got = _run("grouped_lowmem", *case, precision="fp8")
    assert widths and all(w % 16 == 0 for w in widths), widths
    for key in ref:
        assert _rel(got[key], ref[key]) < 1e-5, (key, _rel(got[key], ref[key]))
