"""The MoE router fused: softmax -> top-k -> renormalise, and the load-balancing loss's sufficient statistics.

    topk_w, topk_idx, stats = route(logits (N, E), k, renormalize, weights=None)   # = kernels.moe_route
        topk_w   (N, k) fp32   the routing weights, largest first (renormalised to sum 1 when asked)
        topk_idx (N, k) int64  their experts
        stats    RouterStats   counts (E,) fp32: top-k assignments per expert, weighted by `weights`
                               prob_sums (E,) fp32: router probabilities summed over tokens, weighted
                               tokens () fp32: the weights' sum (N without weights)
    weights (N,): a per-token weight for the statistics only (the attention mask: 1 real token, 0 padding).

Gradients flow from `topk_w` and from `stats.prob_sums` (the load-balancing loss's path) back into `logits`
(in the logits' dtype); `topk_idx`, `counts` and `tokens` have none. `route_reference` is the ground truth and the
CPU path: the arithmetic `MoEBlock` used before this module (fp32 softmax, top-k, renormalise), the statistics
summed per expert instead of through a (N, k, E) one-hot. On CUDA, `_Route` runs one Triton kernel
forward (blocks of token rows, next_pow2(E) experts wide; at most 16 programs per SM, each looping over blocks
and keeping its partial statistics, summed after in one small deterministic reduction: no atomics) and one
backward, which recomputes the softmax from the saved logits instead of keeping the (N, E) fp32 probabilities.
H200, Qwen3's E = 128, k = 8, 65,536 bf16 tokens, forward + backward with the loss: 6.3 MB kept for backward
and an 8.5 MB forward peak, against 42 MB and 848 MB (the one-hot) before. At 131,072 tokens the forward
(with its reduction) took ~0.14 ms, the backward ~0.06 ms.

Top-k: the kernel takes the k largest logits by iterative arg-max, the reference by a stable descending sort of
the logits (softmax is monotone, so both are the top-k of the probabilities; comparing logits keeps an fp32
rounding of two near-equal probabilities from deciding). For distinct values the experts and their order equal
torch.topk's (what MoEBlock called before). Exact ties go to the lower expert index first, in both. They are
frequent with bf16 logits (unit-normal logits rounded to bf16: ~0.3 tied neighbours per row in the top 8 of
128); torch.topk leaves their order unspecified (on CPU it returned experts [1, 6, 4] for four equal values at
1, 2, 4, 6), so on a tie at the k-th place the old code could pick another expert, with an equal weight. Kernel
and reference agree on every finite input. (`kernels/route.py` is a different thing: the tokens' gather into
expert order and the weighted combine.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from ._triton import use_triton

# Launch settings: logits per row block (ROWS = elems // next_pow2(E) token rows, 1..128), warps, and the
# forward's programs per SM (each loops over row blocks; bounds the per-program partial statistics).
CONFIG = {"fwd_elems": 512, "fwd_warps": 1, "fwd_programs_per_sm": 16, "bwd_elems": 512, "bwd_warps": 1}


class RouterStats(NamedTuple):
    """One MoE layer's sufficient statistics for the load-balancing loss (all fp32, summed over tokens with the
    per-token weights): counts (E,) top-k assignments per expert (no gradient), prob_sums (E,) router
    probabilities (differentiable), tokens () the weights' sum."""
    counts: torch.Tensor
    prob_sums: torch.Tensor
    tokens: torch.Tensor


def route_reference(logits: torch.Tensor, k: int, renormalize: bool, weights: Optional[torch.Tensor] = None):
    """The ground truth (and the path off CUDA): plain autograd ops. Same outputs as `route`."""
    N, E = logits.shape
    probs = logits.float().softmax(dim=-1)  # (N, E) fp32
    # top-k = probs.topk(k) for distinct values; a stable sort of the logits pins exact ties (lower expert first)
    topk_idx = logits.float().sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (N, k)
    topk_w = probs.gather(1, topk_idx)  # (N, k)
    if renormalize:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    if weights is None:
        wk = torch.ones(N * k, device=logits.device)  # (N*k,)
        prob_sums = probs.sum(0)  # (E,)
        tokens = torch.tensor(float(N), device=logits.device)
    else:
        w = weights.reshape(N).to(device=logits.device, dtype=torch.float32)  # (N,)
        wk = w[:, None].expand(N, k).reshape(-1)  # (N*k,) each token's weight on each of its k slots
        prob_sums = (probs * w[:, None]).sum(0)  # (E,)
        tokens = w.sum()
    counts = torch.zeros(E, device=logits.device).index_add_(0, topk_idx.reshape(-1), wk)  # (E,)
    return topk_w, topk_idx, RouterStats(counts, prob_sums, tokens)


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def route_fwd(l_ptr, wt_ptr, tw_ptr, ti_ptr, part_ptr, N, E, n_blocks, K: tl.constexpr, KP: tl.constexpr,
                  BLOCK_E: tl.constexpr, ROWS: tl.constexpr, RENORM: tl.constexpr, HAS_W: tl.constexpr):
        # a program takes row blocks pid, pid + programs, ... and sums its statistics over them
        pid = tl.program_id(0)
        col = tl.arange(0, BLOCK_E)  # (BLOCK_E,) experts
        cm = col < E
        slot = tl.arange(0, KP)  # (KP,) top-k slots (KP = next_pow2(K))
        acc_c = tl.zeros((BLOCK_E,), dtype=tl.float32)  # counts
        acc_p = tl.zeros((BLOCK_E,), dtype=tl.float32)  # probability sums
        acc_w = tl.zeros((ROWS,), dtype=tl.float32)  # token weights
        for blk in range(pid, n_blocks, tl.num_programs(0)):
            rows = (blk * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # (ROWS,) token rows (N < 2^31)
            rm = rows < N
            # fp32 logits x (-inf on padded experts, 0 on rows past N) and probabilities p, both (ROWS, BLOCK_E)
            x = tl.load(l_ptr + rows[:, None] * E + col[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
            x = tl.where(cm[None, :], x.to(tl.float32), float("-inf"))
            m = tl.max(x, axis=1)  # (ROWS,)
            den = tl.sum(tl.exp(x - m[:, None]), axis=1)  # (ROWS,)
            p = tl.exp(x - m[:, None]) / den[:, None]  # 0 on padded experts
            tw = tl.zeros((ROWS, KP), dtype=tl.float32)
            ti = tl.zeros((ROWS, KP), dtype=tl.int64)
            hits = tl.zeros((ROWS, BLOCK_E), dtype=tl.int1)  # the k picked experts
            for j in tl.static_range(K):
                # the largest logit left and its expert (ties: the lowest), one reduction; its probability is
                # computed as p's entries are, so it equals p[sel] exactly
                v, sel = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)  # (ROWS,)
                tw = tl.where(slot[None, :] == j, (tl.exp(v - m) / den)[:, None], tw)
                ti = tl.where(slot[None, :] == j, sel[:, None].to(tl.int64), ti)
                hit = col[None, :] == sel[:, None]  # (ROWS, BLOCK_E)
                x = tl.where(hit, float("-inf"), x)
                hits = hits | hit
            if RENORM:
                tw = tw / tl.sum(tw, axis=1)[:, None]  # unused slots hold 0
            out = rows[:, None] * K + slot[None, :]  # (ROWS, KP)
            om = rm[:, None] & (slot[None, :] < K)
            tl.store(tw_ptr + out, tw, mask=om)
            tl.store(ti_ptr + out, ti, mask=om)
            if HAS_W:
                wt = tl.load(wt_ptr + rows, mask=rm, other=0.0)  # (ROWS,)
            else:
                wt = rm.to(tl.float32)
            acc_c += tl.sum(tl.where(hits, wt[:, None], 0.0), axis=0)
            acc_p += tl.sum(p * wt[:, None], axis=0)
            acc_w += wt
        part = part_ptr + pid.to(tl.int64) * (2 * E + 1)  # this program's row: [counts E | prob sums E | tokens]
        tl.store(part + col, acc_c, mask=cm)
        tl.store(part + E + col, acc_p, mask=cm)
        tl.store(part + 2 * E, tl.sum(acc_w, axis=0))

    @triton.jit
    def route_bwd(l_ptr, ti_ptr, gw_ptr, gps_ptr, wt_ptr, dl_ptr, N, E, K: tl.constexpr, BLOCK_E: tl.constexpr,
                  ROWS: tl.constexpr, RENORM: tl.constexpr, HAS_GW: tl.constexpr, HAS_GPS: tl.constexpr,
                  HAS_W: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        col = tl.arange(0, BLOCK_E)  # (BLOCK_E,)
        rm = rows < N
        cm = col < E
        # fp32 logits x and probabilities p (as forward), both (ROWS, BLOCK_E)
        x = tl.load(l_ptr + rows[:, None] * E + col[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        x = tl.where(cm[None, :], x.to(tl.float32), float("-inf"))
        m = tl.max(x, axis=1)  # (ROWS,)
        den = tl.sum(tl.exp(x - m[:, None]), axis=1)  # (ROWS,)
        p = tl.exp(x - m[:, None]) / den[:, None]
        g = tl.zeros((ROWS, BLOCK_E), dtype=tl.float32)  # d loss / d probabilities
        if HAS_GPS:  # prob_sums[e] = sum_n w_n p[n, e]
            if HAS_W:
                wt = tl.load(wt_ptr + rows, mask=rm, other=0.0)
            else:
                wt = rm.to(tl.float32)
            gps = tl.load(gps_ptr + col, mask=cm, other=0.0)  # (BLOCK_E,)
            g += wt[:, None] * gps[None, :]
        if HAS_GW:
            if RENORM:  # w_j = p_j / s, s = sum_m p_m: d/dp_j = (g_j - sum_m g_m w_m) / s
                s = tl.zeros((ROWS,), dtype=tl.float32)
                dot = tl.zeros((ROWS,), dtype=tl.float32)  # sum_m g_m p_m
                for j in tl.static_range(K):
                    sel = tl.load(ti_ptr + rows * K + j, mask=rm, other=0)  # (ROWS,)
                    gj = tl.load(gw_ptr + rows * K + j, mask=rm, other=0.0)
                    xj = tl.load(l_ptr + rows * E + sel, mask=rm, other=0.0).to(tl.float32)  # its logit
                    pj = tl.exp(xj - m) / den  # = p[sel], computed alike
                    s += pj
                    dot += gj * pj
                s = tl.where(rm, s, 1.0)  # rows past N: keep their (unstored) arithmetic finite
                dot = dot / s
            for j in tl.static_range(K):
                sel = tl.load(ti_ptr + rows * K + j, mask=rm, other=0)  # (ROWS,)
                gj = tl.load(gw_ptr + rows * K + j, mask=rm, other=0.0)
                if RENORM:
                    gj = (gj - dot) / s
                g += tl.where(col[None, :] == sel[:, None], gj[:, None], 0.0)
        dl = p * (g - tl.sum(p * g, axis=1)[:, None])  # softmax backward, (ROWS, BLOCK_E)
        tl.store(dl_ptr + rows[:, None] * E + col[None, :], dl.to(dl_ptr.dtype.element_ty),
                 mask=rm[:, None] & cm[None, :])

    return route_fwd, route_bwd


def _rows(E: int, elems: int):
    """(BLOCK_E, ROWS): next_pow2(E) experts, about `elems` logits per row block."""
    block = 1 << max(0, (E - 1).bit_length())
    return block, max(1, min(128, elems // block))


def _fwd_programs(n_blocks: int, device: torch.device) -> int:
    """Programs of the forward, each looping over row blocks: bounded, so the partial statistics stay small
    (on a CPU, 2: the interpreter's tests then run the loop)."""
    if device.type != "cuda":
        return min(n_blocks, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(n_blocks, CONFIG["fwd_programs_per_sm"] * sms)


class _Route(torch.autograd.Function):
    """The Triton path of `route`: outputs (topk_w, topk_idx, counts, prob_sums, tokens)."""

    @staticmethod
    def forward(ctx, logits, weights, k, renormalize):
        N, E = logits.shape
        dev = logits.device
        topk_w = torch.empty(N, k, dtype=torch.float32, device=dev)
        topk_idx = torch.empty(N, k, dtype=torch.int64, device=dev)
        block, rows = _rows(E, CONFIG["fwd_elems"])
        n_blocks = -(-N // rows)
        grid = _fwd_programs(n_blocks, dev)
        part = torch.empty(max(grid, 1), 2 * E + 1, dtype=torch.float32, device=dev)  # per-program partials
        if N == 0:
            part.zero_()
        else:
            _kernels()[0][(grid,)](logits, weights if weights is not None else logits, topk_w, topk_idx, part,
                                   N, E, n_blocks, K=k, KP=1 << max(0, (k - 1).bit_length()), BLOCK_E=block,
                                   ROWS=rows, RENORM=renormalize, HAS_W=weights is not None,
                                   num_warps=CONFIG["fwd_warps"])
        tot = part.sum(0)  # (2E+1,) in a fixed order: deterministic
        counts, prob_sums, tokens = tot[:E], tot[E:2 * E], tot[2 * E]
        ctx.mark_non_differentiable(topk_idx, counts, tokens)
        ctx.set_materialize_grads(False)
        ctx.renormalize = renormalize
        ctx.save_for_backward(logits, topk_idx, weights)
        return topk_w, topk_idx, counts, prob_sums, tokens

    @staticmethod
    def backward(ctx, g_w, _g_idx, _g_counts, g_ps, _g_tokens):
        logits, topk_idx, weights = ctx.saved_tensors
        if (g_w is None and g_ps is None) or not ctx.needs_input_grad[0]:
            return None, None, None, None
        N, E = logits.shape
        k = topk_idx.shape[1]
        dl = torch.empty_like(logits)
        if N == 0:
            return dl, None, None, None
        gw = g_w.float().contiguous() if g_w is not None else logits  # any pointer when absent
        gps = g_ps.float().contiguous() if g_ps is not None else logits
        block, rows = _rows(E, CONFIG["bwd_elems"])
        wt = weights if weights is not None else logits
        _kernels()[1][(-(-N // rows),)](logits, topk_idx, gw, gps, wt, dl, N, E, K=k, BLOCK_E=block, ROWS=rows,
                                        RENORM=ctx.renormalize, HAS_GW=g_w is not None, HAS_GPS=g_ps is not None,
                                        HAS_W=weights is not None, num_warps=CONFIG["bwd_warps"])
        return dl, None, None, None


def route(logits: torch.Tensor, k: int, renormalize: bool, weights: Optional[torch.Tensor] = None,
          triton: bool | None = None):
    """logits (N, E) in the compute dtype -> (topk_w (N, k) fp32, topk_idx (N, k) int64, RouterStats).
    weights (N,) (any float dtype; no gradient) weigh the statistics only. triton: None = on CUDA, True forces
    the kernels (CPU tensors under TRITON_INTERPRET=1), False the reference."""
    N, E = logits.shape
    if not 0 < k <= E:
        raise ValueError(f"top-k of {k} experts out of {E}")
    if not use_triton(logits, triton):
        return route_reference(logits, k, renormalize, weights)
    w = None if weights is None else weights.reshape(N).to(device=logits.device, dtype=torch.float32).contiguous()
    topk_w, topk_idx, counts, prob_sums, tokens = _Route.apply(logits.contiguous(), w, k, bool(renormalize))
    return topk_w, topk_idx, RouterStats(counts, prob_sums, tokens)
