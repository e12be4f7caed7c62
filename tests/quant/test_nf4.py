"""NF4 storage: our pure-PyTorch dequantization equals bitsandbytes' own, bit for bit."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from mixtune.model.nf4 import BLOCK, NF4Linear, NF4Weight, dequantize_any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnbF

SHAPES = [(96, 64), (32, 8), (4, 128, 64), (2, 256, 64), (3, 64, 320)]  # 2-D, 3-D aligned and not to 64*256


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_equals_bitsandbytes(shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 7 + shape[-1]), dtype=torch.float32)
    w = (w * 0.05).to(dtype)
    q = NF4Weight.quantize(w)
    # bitsandbytes quantizing the same tensor itself: identical storage and identical dequantization
    qb, st = bnbF.quantize_4bit(w, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.packed, qb.reshape(-1))
    assert torch.equal(q.absmax, st.absmax.reshape(-1))
    ref = bnbF.dequantize_4bit(qb, st)
    ours = q.dequantize()
    assert ours.dtype == dtype and ours.shape == w.shape
    assert torch.equal(ours, ref)
    # and bitsandbytes reading OUR buffers through the equivalent QuantState
    assert torch.equal(bnbF.dequantize_4bit(q.packed, q.bnb_quant_state()), ref)
    # double quantization is on: the absmax is stored as uint8 with fp32 second-level scales
    assert q.absmax.dtype == torch.uint8 and q.absmax2.numel() == -(-w.numel() // BLOCK // 256)
    assert (ours.float() - w.float()).abs().max() <= w.float().abs().max() * 0.2  # a 4-bit approximation
    # dequantizing to another dtype = bitsandbytes told to produce that dtype
    st.dtype = torch.float32
    ref32 = bnbF.dequantize_4bit(qb, st)
    assert torch.equal(q.dequantize(torch.float32), ref32)
    if len(shape) == 3:
        for e in range(shape[0]):
            assert torch.equal(q.dequantize_expert(e), ref[e])
            assert torch.equal(q.dequantize_expert(e, torch.float32), ref32[e])


def test_nf4_linear_equals_linear_on_bnb_dequantized():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g).to(torch.bfloat16)
    lin = NF4Linear(NF4Weight.quantize(w))
    qb, st = bnbF.quantize_4bit(w, blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    for dt in (torch.bfloat16, torch.float32):
        st.dtype = dt  # NF4Linear dequantizes straight to the input's dtype, as bitsandbytes does when asked
        wd = bnbF.dequantize_4bit(qb, st)
        x = torch.randn(5, 64, generator=g).to(dt)
        assert torch.equal(lin(x), F.linear(x, wd))
        assert torch.equal(dequantize_any(lin.weight, dt), wd)


def test_nf4_storage_moves_and_counts():
    w = torch.randn(4, 128, 64).to(torch.bfloat16)
    q = NF4Weight.quantize(w)
    n = w.numel()
    assert q.nbytes == n // 2 + n // 64 + 4 * (-(-n // 64 // 256)) + 256 * 4
    assert q.nbytes < w.numel() * 2 / 3.5  # ~4.1 bits per weight
    q2 = q.to(torch.device("cpu"))
    assert torch.equal(q2.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="multiple of 64"):
        NF4Weight.quantize(torch.randn(3, 7))
