"""Chunked linear+CE, memory-light RMSNorm and NF4 linear vs their plain-PyTorch definitions."""

import torch
from torch import nn

from mixtune import kernels
from mixtune.kernels.norm import rms_norm
from mixtune.model.nf4 import NF4Linear, NF4Weight


def _labels(B, T, V, g):
    lab = torch.randint(0, V, (B, T), generator=g)
    lab[0, :5] = -100
    lab[1, 7] = -100
    return lab


def test_chunked_ce_matches_reference_plain_and_trainable_head():
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 17, 32, 50
    head = nn.Linear(H, V, bias=False)
    lab = _labels(B, T, V, g)
    for trainable in (False, True):
        head.weight.requires_grad_(trainable)
        h = torch.randn(B, T, H, generator=g, requires_grad=True)
        ref, n_ref = kernels.linear_cross_entropy(h, head, lab, impl="reference")
        ref.backward()
        gh, gw = h.grad.clone(), (head.weight.grad.clone() if trainable else None)
        h.grad = None
        head.weight.grad = None
        got, n = kernels.linear_cross_entropy(h, head, lab, chunk_size=5)
        (got * 1.0).backward()
        assert int(n) == int(n_ref)
        assert torch.allclose(got, ref, rtol=1e-5)
        assert torch.allclose(h.grad, gh, atol=1e-6)
        if trainable:
            assert torch.allclose(head.weight.grad, gw, atol=1e-5)


def test_chunked_ce_with_wrapped_head_uses_the_module():
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 9, 16, 30

    class Wrapped(nn.Module):  # e.g. a LoRA-wrapped lm_head: only callable as a module
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(H, V, bias=False)
            self.extra = nn.Parameter(torch.randn(V, generator=g) * 0.1)

        def forward(self, x):
            return self.base(x) + self.extra

    head = Wrapped()
    lab = _labels(B, T, V, g)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    ref, _ = kernels.linear_cross_entropy(h, head, lab, impl="reference")
    ref.backward()
    ge = head.extra.grad.clone()
    head.extra.grad = None
    got, _ = kernels.linear_cross_entropy(h, head, lab, chunk_size=4)
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(head.extra.grad, ge, atol=1e-5)


def test_rms_norm_torch_path_matches_module():
    from mixtune.model.modeling import RMSNorm
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(24, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    x = torch.randn(3, 4, 24, generator=g, requires_grad=True)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    go = torch.randn(ref.shape, generator=g)
    (ref * go).sum().backward()
    gref = x.grad.clone()
    x.grad = None
    norm.weight.requires_grad_(True)
    y = rms_norm(x, norm.weight, 1e-5)
    (y * go).sum().backward()
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(x.grad, gref, atol=1e-5)
    assert norm.weight.grad is not None


def test_nf4_linear_backward_redequantizes():
    g = torch.Generator().manual_seed(3)
    w = NF4Weight.quantize(torch.randn(48, 64, generator=g))
    lin = NF4Linear(w)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    y = lin(x)
    go = torch.randn(y.shape, generator=g)
    (y * go).sum().backward()
    W = w.dequantize(torch.float32)
    assert torch.allclose(y, x @ W.t(), atol=1e-5)
    assert torch.allclose(x.grad, go @ W, atol=1e-5)


def test_flex_attention_document_mask_matches_eager_forward():
    """FlexAttention's block-sparse document mask = the eager reference (forward; CPU has no flex backward)."""
    import pytest
    pytest.importorskip("torch.nn.attention.flex_attention")
    from mixtune.bench import packed_batch
    from mixtune.kernels.attention import FlexAttentionSpec, build_attention
    B, T, nh, nkv, d = 2, 160, 4, 2, 16
    _, _, pos = packed_batch(B, T, 100, "cpu", seed=2, min_doc=16)
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(B, nh, T, d, generator=g), torch.randn(B, nkv, T, d, generator=g), \
        torch.randn(B, nkv, T, d, generator=g)
    flex = build_attention(pos, T, nh // nkv, "flex")
    assert isinstance(flex, FlexAttentionSpec)
    ref = build_attention(pos, T, nh // nkv, "eager")(q, k, v)
    assert torch.allclose(flex(q, k, v), ref, atol=1e-5)


def test_sdpa_with_shared_kv_heads_matches_repeated_heads(monkeypatch):
    """attention.SDPA_GQA (sdpa reads the 8 shared k/v heads, enable_gqa) = repeating k/v: values and
    gradients, on packed rows with the document mask, in a plain causal row, and in a decode step."""
    from mixtune.bench import packed_batch
    from mixtune.kernels import attention
    from mixtune.kernels.attention import build_attention
    B, T, nh, nkv, d = 2, 96, 4, 2, 16
    _, _, pos = packed_batch(B, T, 100, "cpu", seed=3, min_doc=16)
    g = torch.Generator().manual_seed(6)
    base = [torch.randn(B, n, T, d, generator=g) for n in (nh, nkv, nkv)]
    go = torch.randn(B, nh, T, d, generator=g)
    causal = torch.arange(T).expand(B, T)
    for p, S, decoding in ((pos, T, False), (causal, T, False), (torch.full((B, 1), T - 1), T, True)):
        outs = []
        for gqa in (False, True):
            monkeypatch.setattr(attention, "SDPA_GQA", gqa)
            q, k, v = (t.clone().requires_grad_() for t in base)
            qq = q[:, :, -1:] if decoding else q
            o = build_attention(p, S, nh // nkv, "sdpa", decoding=decoding)(qq, k, v)
            (o * go[:, :, -o.shape[2]:]).sum().backward()
            outs.append([o, q.grad, k.grad, v.grad])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rms_norm_triton_kernel_matches_torch_path_for_narrow_and_wide_rows():
    """The Triton kernels (Triton's interpreter on CPU) equal the PyTorch path, forward and backward: narrow rows
    packed several per program (Qwen3's per-head q/k norms, H = 128; a row count that leaves the last program
    part-full), a wide row per program, and a width that is not a power of two (masked columns)."""
    import pytest
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(5)
    for R, H in ((37, 128), (5, 2048), (9, 24), (3, 96)):
        w = torch.rand(H, generator=g) + 0.5
        x = torch.randn(R, H, generator=g) * 3
        go = torch.randn(R, H, generator=g)
        outs = []
        for tri in (False, True):
            xx = x.clone().requires_grad_(True)
            y = rms_norm(xx, w, 1e-6, triton=tri)
            (y * go).sum().backward()
            outs.append((y.detach(), xx.grad))
        (y0, g0), (y1, g1) = outs
        assert torch.allclose(y1, y0, atol=1e-5, rtol=1e-5), (R, H)
        assert torch.allclose(g1, g0, atol=1e-5, rtol=1e-5), (R, H)
