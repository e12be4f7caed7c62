"""The fused router (kernels.router) against its pure-PyTorch reference, and the model's loss, aux loss and
gradients before and after routing moved there.

The Triton kernels run on CUDA where there is a GPU, else under Triton's CPU interpreter (TRITON_INTERPRET=1,
set by conftest before triton is imported), in fp32: the interpreter's fp32 -> bf16 casts truncate, so the one
bf16 case compares gradients within a bf16 rounding."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

from mixtune import kernels
from mixtune.kernels import _triton, router
from mixtune.kernels.router import route, route_reference
from mixtune.model import modeling
from mixtune.model.config import TINY_FAMILY_CONFIGS

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = _triton.triton_available() and (DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON, reason="needs triton (and, without a GPU, its interpreter switched on before triton was imported)")


def _run(fn, logits, k, renormalize, weights, gw, gps):
    """fn's outputs and d logits of <topk_w, gw> + <prob_sums, gps> (a None term left out)."""
    x = logits.detach().clone().requires_grad_(True)
    tw, ti, st = fn(x, k, renormalize, weights)
    loss = 0.0
    if gw is not None:
        loss = loss + (tw * gw).sum()  # the experts' path
    if gps is not None:
        loss = loss + (st.prob_sums * gps).sum()  # the load-balancing loss's path
    loss.backward()
    return tw.detach(), ti, st.counts, st.prob_sums.detach(), st.tokens, x.grad


def _compare(got, want, w_atol=1e-6, g_rtol=1e-5, g_atol=1e-6):
    """Experts exactly; weights within w_atol; d logits within g_rtol, or g_atol of the gradient's largest
    element (softmax's backward, p * (g - <p, g>), cancels: fp32 rounding of its terms is absolute)."""
    tw, ti, c, ps, n, dl = got
    tw0, ti0, c0, ps0, n0, dl0 = want
    assert ti.dtype == torch.int64 and torch.equal(ti, ti0)
    torch.testing.assert_close(tw, tw0, rtol=0, atol=w_atol)
    # sums over N tokens, in another order (fp32: ~1e-6 relative at the GPU case's ~10^5 weighted tokens)
    torch.testing.assert_close(c, c0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ps, ps0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(n, n0, rtol=1e-5, atol=0)
    torch.testing.assert_close(dl, dl0, rtol=g_rtol, atol=g_atol * float(dl0.abs().max()))


def _rows(E):
    """The larger of the forward's and the backward's rows per block."""
    return max(router._rows(E, router.CONFIG[c])[1] for c in ("fwd_elems", "bwd_elems"))


def _kernel(x, k, renormalize, weights):
    return route(x, k, renormalize, weights, triton=True)


@needs_triton
@pytest.mark.parametrize("E,k", [(128, 8), (8, 2), (60, 4)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernels_match_reference(E, k, renormalize, weighted):
    """Forward values and d logits, through the top-k weights, the aux loss's probability sums, or both; with and
    without token weights (zeros for padding, fractions too); N leaves the last row block part-full, and the
    forward's programs loop over several blocks (2 programs on a CPU; enough blocks for it on a GPU)."""
    rows = _rows(E)
    N = (5 if DEV == "cpu" else 3000) * rows + 3
    assert N % router._rows(E, router.CONFIG["fwd_elems"])[1] and N % router._rows(E, router.CONFIG["bwd_elems"])[1]
    g = torch.Generator().manual_seed(100 * E + 10 * k + 2 * renormalize + weighted)
    logits = (torch.randn(N, E, generator=g) * 2).to(DEV)
    w = None
    if weighted:
        w = torch.rand(N, generator=g)
        w[torch.rand(N, generator=g) < 0.3] = 0.0
        w = w.to(DEV)
    gw, gps = torch.randn(N, k, generator=g).to(DEV), torch.randn(E, generator=g).to(DEV)
    for grads in ((gw, None), (None, gps), (gw, gps)):
        want = _run(route_reference, logits, k, renormalize, w, *grads)
        got = _run(_kernel, logits, k, renormalize, w, *grads)
        _compare(got, want)
    if renormalize:
        torch.testing.assert_close(got[0].sum(1), torch.ones(N, device=DEV))


@needs_triton
def test_kernels_bf16_logits():
    """bf16 logits (the compute dtype): read and upcast in the kernel, d logits written back in bf16. Distinct
    values (multiples of 1/16: exact in bf16), so the experts are determined."""
    E, k = 60, 4
    N = 3 * _rows(E) + 5
    g = torch.Generator().manual_seed(7)
    logits = torch.stack([torch.randperm(E, generator=g) for _ in range(N)]).float() / 16 - 1.5  # (N, E)
    logits = logits.to(torch.bfloat16).to(DEV)
    w = (torch.rand(N, generator=g) > 0.2).float().to(DEV)
    gw, gps = torch.randn(N, k, generator=g).to(DEV), torch.randn(E, generator=g).to(DEV)
    for renormalize in (True, False):
        want = _run(route_reference, logits, k, renormalize, w, gw, gps)
        got = _run(_kernel, logits, k, renormalize, w, gw, gps)
        assert got[5].dtype == torch.bfloat16
        _compare(got[:5] + (got[5].float(),), want[:5] + (want[5].float(),), g_rtol=1e-2, g_atol=1e-2)


@needs_triton
@pytest.mark.parametrize("renormalize", [True, False])
def test_exact_ties_go_to_the_lower_expert(renormalize):
    """Many exact ties (a handful of distinct logit values): kernel and reference both take the lower expert
    first, so experts, weights and gradients still agree; a hand-made row where torch.topk does not."""
    E, k = 16, 4
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 5, (41, E), generator=g).float() * 0.5  # (N, E)
    logits[0] = 1.0  # all equal: experts 0..k-1
    logits = logits.to(DEV)
    gw, gps = torch.randn(41, k, generator=g).to(DEV), torch.randn(E, generator=g).to(DEV)
    want = _run(route_reference, logits, k, renormalize, None, gw, gps)
    _compare(_run(_kernel, logits, k, renormalize, None, gw, gps), want)
    assert want[1][0].tolist() == list(range(k))
    row = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 0.2, 1.0]], device=DEV)  # 1.0 at experts 1, 2, 4, 6
    for fn in (route_reference, _kernel):
        assert fn(row, 3, renormalize, None)[1].tolist() == [[1, 2, 4]]


def test_reference_is_the_routers_old_arithmetic():
    """route_reference = softmax, torch.topk (distinct values), renormalise, and the statistics the old loss
    built from a (N, k, E) one-hot; the public API routes there off CUDA."""
    g = torch.Generator().manual_seed(4)
    N, E, k = 23, 8, 2
    logits = torch.randn(N, E, generator=g)
    w = (torch.rand(N, generator=g) > 0.25).float()
    probs = logits.softmax(-1)
    v, i = probs.topk(k, dim=-1)
    for renormalize in (True, False):
        for weights in (None, w):
            tw, ti, st = kernels.moe_route(logits, k, renormalize, weights)
            ww = torch.ones(N) if weights is None else weights
            assert torch.equal(ti, i)
            torch.testing.assert_close(tw, v / v.sum(-1, keepdim=True) if renormalize else v, rtol=0, atol=0)
            torch.testing.assert_close(st.counts, (F.one_hot(i, E).float() * ww[:, None, None]).sum((0, 1)))
            torch.testing.assert_close(st.prob_sums, (probs * ww[:, None]).sum(0))
            assert float(st.tokens) == float(ww.sum())
    with pytest.raises(ValueError, match="top-k"):
        kernels.moe_route(logits, E + 1, True)


# ---------------------------------------------------------------------------------------------- end to end
# The router and loss as MoEBlock and load_balancing_loss computed them before kernels.router (the "before").

def _old_moe_forward(self, x, token_weight=None):
    B, T, H = x.shape
    flat = x.reshape(-1, H)  # (N, H)
    logits = self.gate(flat)  # (N, E)
    probs = logits.float().softmax(dim=-1)  # (N, E) fp32
    topk_w, topk_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
    if self.norm_topk:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    y = self.experts(flat, topk_idx, topk_w.to(x.dtype))
    if hasattr(self, "shared_expert"):
        y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
    return y.view(B, T, H), (probs, topk_idx)


def _old_load_balancing_loss(router_stats, num_experts, attention_mask=None):
    w = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32)  # (N,)
    frac, prob, n = 0.0, 0.0, 0.0
    for probs, idx in router_stats:  # probs (N, E) fp32, idx (N, k)
        onehot = F.one_hot(idx, num_experts).float()  # (N, k, E)
        if w is None:
            frac, prob, n = frac + onehot.sum(0), prob + probs.sum(0), n + probs.shape[0]
        else:
            frac = frac + (onehot * w[:, None, None]).sum(0)
            prob = prob + (probs * w[:, None]).sum(0)
            n = n + w.sum()
    return (frac / n * (prob / n)[None]).sum() * num_experts


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"])
def test_model_loss_aux_loss_and_gradients_unchanged(family, monkeypatch):
    """A tiny random model of each family (renormalised top-k or not, dense layers, a shared expert), padding
    in the batch, loss + aux loss backpropagated: the same loss, aux loss and every gradient as before, on the
    PyTorch path and through the Triton kernels (with recomputation of every layer too). On a GPU the model runs
    there, with every other kernel as it runs in training, the same before and after."""
    cfg = TINY_FAMILY_CONFIGS[family]
    model = modeling.MoEForCausalLM(cfg)
    model.init_weights(seed=3, std=0.1)  # std 0.1: a router far from uniform
    model.to(DEV).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] not in ("w1", "w2", "w3"))  # experts stay frozen
    g = torch.Generator().manual_seed(5)
    B, T = 2, 13
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0
    labels[1, 9:] = -100
    pos = torch.arange(T).expand(B, T)
    ids, labels, mask, pos = (t.to(DEV) for t in (ids, labels, mask, pos))

    def step(with_mask=True):
        model.zero_grad(set_to_none=True)
        out = model(ids, pos, labels, return_logits=False, attention_mask=mask if with_mask else None)
        (out.loss + 0.5 * out.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), out.aux_loss.detach(), grads

    runs = {}
    with monkeypatch.context() as m:
        m.setattr(kernels, "moe_route", functools.partial(router.route, triton=False))
        runs["torch"] = [step(), step(False)]
    if TRITON:
        with monkeypatch.context() as m:
            m.setattr(kernels, "moe_route", functools.partial(router.route, triton=True))
            runs["triton"] = [step(), step(False)]
            model.set_checkpointing(-1)
            runs["triton+recompute"] = [step(), step(False)]
            model.set_checkpointing(0)
    with monkeypatch.context() as m:
        m.setattr(modeling.MoEBlock, "forward", _old_moe_forward)
        m.setattr(modeling, "load_balancing_loss", lambda parts, E: _old_load_balancing_loss(parts, E, mask))
        before = step()
        m.setattr(modeling, "load_balancing_loss", lambda parts, E: _old_load_balancing_loss(parts, E, None))
        before_unmasked = step(False)
    assert not torch.allclose(before[1], before_unmasked[1])  # the padding matters to the aux loss here
    assert "model.layers.0.block_sparse_moe.gate.weight" in before[2]
    for name, (got, got_unmasked) in runs.items():
        for (loss, aux, grads), (loss0, aux0, grads0) in ((got, before), (got_unmasked, before_unmasked)):
            torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0, msg=name)
            torch.testing.assert_close(aux, aux0, rtol=1e-6, atol=0, msg=name)
            assert grads.keys() == grads0.keys()
            for n in grads0:
                torch.testing.assert_close(grads[n], grads0[n], rtol=1e-5, atol=1e-5 * float(grads0[n].abs().max()),
                                           msg=f"{name}: {n}")  # within 1e-5 of each gradient's scale
