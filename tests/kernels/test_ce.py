"""The fused cross-entropy gradient kernel (Triton, run here by its interpreter) vs the PyTorch arithmetic."""

import pytest
import torch

from mixtune.kernels import _triton
from mixtune.kernels.ce import ce_grad_inplace, ce_grad_inplace_reference


@pytest.mark.parametrize("V", [50, 4096, 5000])
def test_kernel_equals_pytorch_path(V, monkeypatch):
    if not _triton.triton_available():
        pytest.skip("triton not installed")
    g = torch.Generator().manual_seed(V)
    x = torch.randn(7, V, generator=g) * 4  # fp32: the interpreter's bf16 casts truncate
    x[3, : V // 2] = -1e30  # a row whose first half is (nearly) -inf: the online max must cope
    tgt = torch.randint(0, V, (7,), generator=g)
    ref_x = x.clone()
    ref_loss = ce_grad_inplace_reference(ref_x, tgt)
    monkeypatch.setattr(_triton, "FORCE", True)
    got_loss = ce_grad_inplace(x, tgt)
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x, ref_x, atol=1e-6)
    assert torch.allclose(x.sum(1), torch.zeros(7), atol=1e-4)  # softmax - onehot sums to 0 per row


def test_reference_is_the_gradient_of_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 33, generator=g, requires_grad=True)
    tgt = torch.randint(0, 33, (5,), generator=g)
    torch.nn.functional.cross_entropy(logits, tgt, reduction="sum").backward()
    x = logits.detach().clone()
    loss = ce_grad_inplace_reference(x, tgt)
    assert torch.allclose(loss.sum(), torch.nn.functional.cross_entropy(logits.detach(), tgt, reduction="sum"))
    assert torch.allclose(x, logits.grad, atol=1e-6)
