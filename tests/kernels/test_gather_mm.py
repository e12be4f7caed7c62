"""The gather-fused thin LoRA products (kernels.gather_mm) under Triton's CPU interpreter, against PyTorch: the
gathered copy value for value, the rank-r products within fp32 rounding, over experts with no rows, with several
tiles and a partial last one, ranks that are not powers of two, strided W (a transpose) and outputs that are
views of a wider buffer."""

import os
import sys

import pytest
import torch

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton was imported before the interpreter could be enabled", allow_module_level=True)

from mixtune.kernels import gather_mm  # noqa: E402
from mixtune.kernels.gather_mm import gather_lowrank, gather_lowrank_wgrad  # noqa: E402


def _routing(g, N, E, k):
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    idx[idx == 2] = 0  # expert 2 gets no rows
    idx[:, 0][:N // 2] = 1  # expert 1 gets many (several tiles, the last one partial)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.searchsorted(flat[order], torch.arange(E), right=True).to(torch.int32)
    return order // k, offs, flat[order]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("wt", ["auto", True, False])  # both ways of loading W's tiles, on either layout
@pytest.mark.parametrize("R,transposed", [(8, False), (24, True), (16, False)])
def test_gather_lowrank_matches_torch(monkeypatch, R, transposed, wt):
    monkeypatch.setitem(gather_mm.CONFIG, "wt", wt)
    monkeypatch.setitem(gather_mm.CONFIG, "BM", 16)
    monkeypatch.setitem(gather_mm.CONFIG, "BK", 32)
    g = torch.Generator().manual_seed(R)
    N, E, k, H = 37, 5, 2, 80  # H: two full BK tiles and a partial one
    tok, offs, ex = _routing(g, N, E, k)
    M = tok.numel()
    x = torch.randn(N, H, generator=g)
    W = torch.randn(E, H, R, generator=g).transpose(1, 2) if transposed else torch.randn(E, R, H, generator=g)
    wide = torch.full((M, H + R + 3), float("nan"))
    keep = torch.full((M, R), float("nan"))
    assert gather_lowrank(x, tok, offs, W, 0.5, wide[:, :H], [wide[:, H:H + R], keep], triton=True)
    ref = 0.5 * torch.einsum("mh,mrh->mr", x[tok], W[ex])
    assert torch.equal(wide[:, :H], x[tok])
    assert _rel(wide[:, H:H + R], ref) < 1e-6 and torch.equal(keep, wide[:, H:H + R])
    assert torch.isnan(wide[:, H + R:]).all()  # nothing beyond the views is written
    only = torch.full((M, R), float("nan"))
    assert gather_lowrank(x, tok, offs, W, 2.0, None, [only], triton=True)  # no gathered copy asked for
    assert _rel(only, 4 * ref) < 1e-6
    fresh = torch.full((M, R), float("nan"))
    assert not gather_lowrank(x, tok, offs, W, 1.0, None, [fresh], triton=False)  # no Triton: the caller's path
    assert torch.isnan(fresh).all()  # and nothing written


def test_gather_lowrank_wgrad_matches_torch(monkeypatch):
    monkeypatch.setitem(gather_mm.CONFIG, "BMW", 16)
    monkeypatch.setitem(gather_mm.CONFIG, "BH", 32)
    g = torch.Generator().manual_seed(3)
    N, E, k, H, R = 41, 5, 2, 80, 24
    tok, offs, ex = _routing(g, N, E, k)
    x = torch.randn(N, H, generator=g)
    d = torch.randn(tok.numel(), R, generator=g)
    got = gather_lowrank_wgrad(d, x, tok, offs, triton=True)
    bounds = [0] + offs.tolist()
    ref = torch.stack([d[s:t].t() @ x[tok[s:t]] for s, t in zip(bounds[:-1], bounds[1:])])
    assert got.dtype == torch.float32 and got.shape == (E, R, H)
    assert torch.equal(got[2], torch.zeros(R, H))  # the expert with no rows
    assert _rel(got, ref) < 1e-6
    assert gather_lowrank_wgrad(d, x, tok, offs, triton=False) is None
