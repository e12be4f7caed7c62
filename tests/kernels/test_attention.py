"""The varlen attention path: example boundaries from position ids, the flattened layout, and its agreement with
the eager document mask (forward and input gradients). FlashAttention itself runs only on CUDA (a GPU test
below, skipped here); on CPU the same spec runs example by example."""

import pytest
import torch

from mixtune.bench_checks import packed_batch
from mixtune.kernels import attention
from mixtune.kernels.attention import (AttentionSpec, VarlenAttentionSpec, build_attention, doc_boundaries,
                                       varlen_by_example)


def test_doc_boundaries_flatten_rows_and_start_every_row():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0],
                        [3, 4, 0, 1, 2, 3]])  # the second row does not start at 0: its head is its own group
    cu = doc_boundaries(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 8, 12]
    spec = VarlenAttentionSpec(pos, 1)
    assert spec.max_len == 6  # the row length bounds every example (no sync for the true maximum, 4)
    assert pos[1, 0] == 3  # the input is not modified


def _qkv(B, T, nh, nkv, d, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, n, T, d, generator=g, device=device, dtype=dtype) for n in (nh, nkv, nkv)]


def _run(pos, base, impl, go):
    q, k, v = (t.detach().clone().requires_grad_() for t in base)
    o = build_attention(pos, pos.shape[1], q.shape[1] // k.shape[1], impl)(q, k, v)
    (o.float() * go).sum().backward()
    return [o, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2)])
def test_varlen_equals_eager_document_mask_forward_and_grads(nh, nkv):
    B, T, d = 3, 200, 16
    _, _, pos = packed_batch(B, T, 100, "cpu", seed=3, min_doc=8)
    base = _qkv(B, T, nh, nkv, d, seed=1)
    go = torch.randn(B, nh, T, d, generator=torch.Generator().manual_seed(2))
    spec = build_attention(pos, T, nh // nkv, "varlen")
    assert isinstance(spec, VarlenAttentionSpec)
    for a, b in zip(_run(pos, base, "varlen", go), _run(pos, base, "eager", go)):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-5)


def test_auto_is_dense_sdpa_without_flash_and_plain_causal_for_single_examples():
    B, T = 2, 64
    _, _, pos = packed_batch(B, T, 100, "cpu", seed=0, min_doc=8)
    assert isinstance(build_attention(pos, T, 1, "auto"), AttentionSpec)  # CPU: no FlashAttention
    one = torch.arange(T).expand(B, T)
    spec = build_attention(one, T, 1, "varlen")
    assert isinstance(spec, AttentionSpec) and spec.is_causal and spec.mask is None


def test_varlen_spec_takes_flash_only_for_inputs_flash_takes(monkeypatch):
    """The spec decides per call: CPU tensors (or fp32, or an odd head size) never reach the flash op."""
    B, T, nh, nkv, d = 2, 96, 4, 2, 16
    _, _, pos = packed_batch(B, T, 100, "cpu", seed=4, min_doc=8)
    spec = VarlenAttentionSpec(pos, nh // nkv)
    spec.flash = True  # as on a GPU
    monkeypatch.setattr(attention._FlashVarlen, "apply", lambda *a: pytest.fail("CPU input reached flash"))
    q, k, v = _qkv(B, T, nh, nkv, d, seed=5)
    ref = build_attention(pos, T, nh // nkv, "eager")(q, k, v)
    assert torch.allclose(spec(q, k, v), ref, atol=2e-6)


def test_varlen_by_example_is_causal_within_each_example():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, 8, generator=g) for _ in range(3))
    out = varlen_by_example(q, k, v, cu, 7)
    v2 = v.clone()
    v2[5:] += 1.0  # changing the second example's values leaves the first untouched
    assert torch.equal(varlen_by_example(q, k, v2, cu, 7)[:5], out[:5])
    v3 = v.clone()
    v3[11] += 1.0  # the last token's value reaches only the last query
    diff = (varlen_by_example(q, k, v3, cu, 7) - out).abs().amax(dim=(1, 2))
    assert diff[:11].max() == 0 and diff[11] > 0


def test_model_loss_and_grads_equal_with_varlen_and_sdpa(tiny_config):
    from mixtune.model.modeling import MoEForCausalLM
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config).float()
    model.init_weights(seed=1)
    ids, labels, pos = packed_batch(2, 64, tiny_config.vocab_size, "cpu", seed=6, min_doc=8)
    res = {}
    for impl in ("sdpa", "varlen"):
        model.zero_grad(set_to_none=True)
        model.attn_implementation = impl
        out = model(ids, pos, labels, return_logits=False)
        out.loss.backward()
        res[impl] = (out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(res["sdpa"][1]) > 5
    assert torch.allclose(res["sdpa"][0], res["varlen"][0], atol=1e-6)
    for a, b in zip(res["sdpa"][1], res["varlen"][1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen needs CUDA")
def test_flash_varlen_matches_fp32_eager_on_gpu():
    B, T, nh, nkv, d = 2, 512, 8, 2, 128
    _, _, pos = packed_batch(B, T, 100, "cuda", seed=7, min_doc=16)
    base = _qkv(B, T, nh, nkv, d, seed=8, device="cuda")
    go = torch.randn(B, nh, T, d, device="cuda")
    ref = _run(pos, base, "eager", go)
    got = _run(pos, [t.to(torch.bfloat16) for t in base], "varlen", go)
    for a, b in zip(got, ref):
        assert float((a.float() - b).norm() / b.norm()) < 2e-2
