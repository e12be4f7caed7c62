"""Grouped MoE (kernels.moe) vs the reference loop: forward and every gradient, fresh random inputs."""

import pytest
import torch

from mixtune import kernels
from mixtune.quant.nf4 import NF4Weight


class _LoRA:
    def __init__(self, A, B, scaling):
        self.A, self.B, self.scaling = A, B, scaling


def _case(seed, nf4, dtype, names, E=4, H=64, I=128, N=41, k=2, r=8):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ws = [rn(E, I, H) * 0.1, rn(E, I, H) * 0.1, rn(E, H, I) * 0.1]
    ws = [NF4Weight.quantize(w) for w in ws] if nf4 else [w.to(dtype) for w in ws]
    A = {n: rn(E, r, H if n != "w2" else I) for n in names}
    B = {n: rn(E, I if n != "w2" else H, r) * 0.1 for n in names}
    x = rn(N, H).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    idx[:3] = torch.tensor([0, 1])  # uneven groups; one expert may get none
    idx[idx == E - 1] = 0
    tw = torch.rand(N, k, generator=g).to(dtype)
    go = rn(N, H).to(dtype)
    return ws, A, B, x, idx, tw, go


def _run(backend, ws, A, B, x, idx, tw, go, precision="bf16", shared=False):
    """shared: w3's A is w1's (one tensor under both names, as ExpertLoRA(shared_gate_up_a=True) holds it)."""
    x = x.clone().requires_grad_()
    tw = tw.clone().requires_grad_()
    a = {n: t.clone().requires_grad_() for n, t in A.items()}
    if shared:
        a["w3"] = a["w1"]
    b = {n: t.clone().requires_grad_() for n, t in B.items()}
    lora = _LoRA(a, b, 2.0) if a else None
    y = kernels.moe_experts(x, idx, tw, *ws, lora=lora, backend=backend, precision=precision)
    (y.float() * go.float()).sum().backward()
    out = {"y": y, "dx": x.grad, "dw": tw.grad}
    out.update({f"dA_{n}": a[n].grad for n in a})
    out.update({f"dB_{n}": b[n].grad for n in b})
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["grouped", "grouped_lowmem"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("names", [("w1", "w2", "w3"), ("w2",), ("w3",), ()])
def test_grouped_matches_reference_fp32(backend, nf4, names):
    case = _case(hash((backend, nf4, names)) % 1000, nf4, torch.float32, names)
    ref = _run("reference", *case)
    got = _run(backend, *case)
    assert set(got) == set(ref)
    for key in ref:
        assert torch.isfinite(got[key]).all(), key
        assert _rel(got[key], ref[key]) < 1e-5, (key, _rel(got[key], ref[key]))


@pytest.mark.parametrize("backend", ["grouped", "grouped_lowmem"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("names", [("w1", "w2", "w3"), ("w1", "w3")])
def test_grouped_with_shared_gate_up_a_matches_reference_fp32(backend, nf4, names):
    """One A for w1 and w3 (peft's fused gate_up_proj LoRA): the rank-r fused products give the reference's
    values, and the shared A's gradient is the sum of both uses (autograd's, in the reference)."""
    case = _case(hash((backend, nf4, names, "shared")) % 1000, nf4, torch.float32, names)
    ref = _run("reference", *case, shared=True)
    got = _run(backend, *case, shared=True)
    sep = _run("reference", *case)
    assert _rel(sep["y"], ref["y"]) > 1e-3  # sharing changes the function (w3 uses w1's A)
    for key in ref:
        assert _rel(got[key], ref[key]) < 1e-5, (key, _rel(got[key], ref[key]))
    assert got["dA_w1"] is got["dA_w3"]  # one tensor, one gradient


def test_shared_gate_up_a_bf16_as_close_as_reference_bf16():
    names = ("w1", "w2", "w3")
    ws, A, B, x, idx, tw, go = _case(11, True, torch.bfloat16, names)
    ref32 = _run("reference", [w.dequantize(torch.float32) for w in ws], A, B, x.float(), idx, tw.float(), go,
                 shared=True)
    ref16 = _run("reference", ws, A, B, x, idx, tw, go, shared=True)
    got = _run("grouped", ws, A, B, x, idx, tw, go, shared=True)
    for key in ref32:
        e_ref, e_got = _rel(ref16[key], ref32[key]), _rel(got[key], ref32[key])
        assert e_got < 2 * e_ref + 1e-3 and e_got < 3e-2, (key, e_got, e_ref)


def test_grouped_bf16_as_close_as_reference_bf16():
    """In bf16 both paths round; each must be near an fp32 evaluation of the same function."""
    names = ("w1", "w2", "w3")
    ws, A, B, x, idx, tw, go = _case(7, True, torch.bfloat16, names)
    ref32 = _run("reference", [w.dequantize(torch.float32) for w in ws], A, B, x.float(), idx, tw.float(), go)
    ref16 = _run("reference", ws, A, B, x, idx, tw, go)
    got = _run("grouped", ws, A, B, x, idx, tw, go)
    for key in ref32:
        e_ref, e_got = _rel(ref16[key], ref32[key]), _rel(got[key], ref32[key])
        assert e_got < 2 * e_ref + 1e-3 and e_got < 3e-2, (key, e_got, e_ref)


def test_grouped_no_lora_and_auto_backend_on_cpu():
    ws, A, B, x, idx, tw, go = _case(3, True, torch.float32, ())
    y_auto = kernels.moe_experts(x, idx, tw, *ws)  # auto = reference on CPU
    y_grp = kernels.moe_experts(x, idx, tw, *ws, backend="grouped")
    assert _rel(y_grp, y_auto) < 1e-5
    with pytest.raises(ValueError, match="unknown MoE backend"):
        kernels.moe_experts(x, idx, tw, *ws, backend="nope")


def test_grouped_mm_k_matches_per_expert_products():
    from mixtune.kernels.moe import grouped_mm, grouped_mm_k
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 30, generator=g)
    b = torch.randn(30, 7, generator=g)
    offs = torch.tensor([10, 10, 30], dtype=torch.int32)  # an empty group in the middle
    out = grouped_mm_k(a, b, offs)
    assert torch.allclose(out[0], a[:, :10] @ b[:10], atol=1e-5)
    assert torch.allclose(out[1], torch.zeros(5, 7))
    assert torch.allclose(out[2], a[:, 10:] @ b[10:], atol=1e-5)
    w = torch.randn(3, 7, 4, generator=g)
    rows = grouped_mm(b, w, offs)
    assert torch.allclose(rows[:10], b[:10] @ w[0], atol=1e-5)
    assert torch.allclose(rows[10:], b[10:] @ w[2], atol=1e-5)
