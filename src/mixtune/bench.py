"""`mixtune bench`: check the fast kernels against the references, then time QLoRA training steps.

    mixtune bench --cpu-tiny                       # seconds on CPU: numerics + a few tiny training steps
    python bench/train_throughput.py --layers 4 --micro-batch 8 --stock --full   # the H200 benchmark

One run, in order: (a) numerics — the grouped MoE layer (forward, and backward w.r.t. x, the routing weights
and every LoRA A/B) and the model's loss/gradients on the fast path, each against the pure-PyTorch reference
on the same random weights, as ‖fast − ref‖/‖ref‖ next to the reference's own bf16 error against an fp32
evaluation; (b) training steps (forward + backward + AdamW over the LoRA parameters) of mixtune and, with
--stock, of the stock stack (transformers + bitsandbytes 4-bit + peft: bench/stock_stack.py) on the same
geometry, batch and packed rows; (c) with --full, mixtune on all layers of the geometry at each requested
setting. Prints a table (tokens/s, model TFLOP/s under the 4·N and 6·N conventions, peak memory, build time)
and one JSON line last. A row that fails (e.g. out of memory) is reported as such and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from dataclasses import dataclass

import torch

from .model.config import MixtralConfig

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
LORA_R, LORA_ALPHA = 64, 16.0


# ------------------------------------------------------------------------------------------ accounting
def active_params(cfg: MixtralConfig, layers: int) -> int:
    """Matmul parameters one token touches: attention + top-k experts per layer, plus the lm_head."""
    H, d = cfg.hidden_size, cfg.head_dim
    attn = 2 * H * cfg.num_attention_heads * d + 2 * H * cfg.num_key_value_heads * d
    expert = 3 * H * cfg.intermediate_size
    return layers * (attn + cfg.num_experts_per_tok * expert) + cfg.vocab_size * H


@dataclass
class Row:
    name: str
    layers: int
    micro_batch: int
    seq: int
    accum: int = 1
    setting: str = ""
    tok_s: float = float("nan")
    tflops4: float = float("nan")
    tflops6: float = float("nan")
    peak_gib: float = float("nan")
    build_s: float = float("nan")
    step_s: float = float("nan")
    loss: float = float("nan")
    est_gib: float = float("nan")  # mixtune.memory_plan's estimate of the peak for this setting
    error: str = ""

    def fill(self, cfg, tokens_per_step, step_times, peak_bytes, loss):
        med = sorted(step_times)[len(step_times) // 2]
        n = active_params(cfg, self.layers)
        self.step_s = med
        self.tok_s = tokens_per_step / med
        self.tflops4 = 4 * n * self.tok_s / 1e12
        self.tflops6 = 6 * n * self.tok_s / 1e12
        self.peak_gib = peak_bytes / 2**30
        self.loss = loss


# ------------------------------------------------------------------------------------------ data
def packed_batch(B: int, T: int, vocab: int, device, seed: int = 0, min_doc: int = 32):
    """(B, T) input_ids, labels (the first token of each example masked), position_ids restarting per example.
    Example lengths are uniform in [min_doc, T] until the row is full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    pos = torch.empty(B, T, dtype=torch.long)
    labels = ids.clone()
    for b in range(B):
        t = 0
        while t < T:
            n = min(T - t, int(torch.randint(min(min_doc, T), T + 1, (1,), generator=g)))
            pos[b, t:t + n] = torch.arange(n)
            labels[b, t] = -100
            t += n
    return ids.to(device), labels.to(device), pos.to(device)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ (a) numerics
class _LoRA:
    def __init__(self, A, B, scaling):
        self.A, self.B, self.scaling = A, B, scaling


def check_moe(device, E, H, I, N, k, r, seed=0, dtype=torch.bfloat16,
              backends=("grouped", "grouped_lowmem", "grouped+fp8", "grouped_lowmem+fp8")):
    """Our MoE layer vs the reference on the same random NF4 weights (LoRA on w1/w3/w2, B nonzero).
    Returns {backend: {output: err, ...}, "reference_bf16": {...}}, errors against an fp32 reference
    ("+fp8": the backend with expert_precision fp8)."""
    from . import kernels
    from .model.nf4 import NF4Weight
    g = torch.Generator(device=device).manual_seed(seed)

    def rn(*s, scale=1.0):
        return torch.randn(s, generator=g, device=device) * scale

    ws = [NF4Weight.quantize(rn(E, I, H, scale=0.02).to(dtype)), NF4Weight.quantize(rn(E, I, H, scale=0.02).to(dtype)),
          NF4Weight.quantize(rn(E, H, I, scale=0.02).to(dtype))]
    A = {n: rn(E, r, H if n != "w2" else I, scale=0.02) for n in ("w1", "w3", "w2")}
    Bm = {n: rn(E, I if n != "w2" else H, r, scale=0.02) for n in ("w1", "w3", "w2")}
    x0 = rn(N, H)
    logits = rn(N, E)
    tw0, idx = logits.softmax(-1).topk(k, dim=-1)
    tw0 = tw0 / tw0.sum(-1, keepdim=True)
    go = rn(N, H)
    out = {}

    def run(backend, dt):
        x = x0.detach().to(dt).clone().requires_grad_()
        tw = tw0.detach().to(dt).clone().requires_grad_()
        a = {n: t.clone().requires_grad_() for n, t in A.items()}
        b = {n: t.clone().requires_grad_() for n, t in Bm.items()}
        lora = _LoRA(a, b, 2.0)
        wts = ws if dt != torch.float32 else [w.dequantize(torch.float32) for w in ws]
        name, _, prec = backend.partition("+")
        y = kernels.moe_experts(x, idx, tw, *wts, lora=lora, backend=name, precision=prec or "bf16")
        (y.float() * go).sum().backward()
        return dict(out=y, dx=x.grad, dw=tw.grad, **{f"dA_{n}": a[n].grad for n in a},
                    **{f"dB_{n}": b[n].grad for n in b})

    ref32 = run("reference", torch.float32)
    for name in ("reference",) + tuple(backends):
        res = run(name, dtype)
        out[name if name != "reference" else "reference_bf16"] = {kk: rel(res[kk], ref32[kk]) for kk in ref32}
        del res
    return out


FP8_MOE_MAX_ERR = 0.1  # e4m3 rounds each operand by ~2.6% rms; h13 -> SwiGLU -> y compounds two products


def moe_check_passes(res: dict) -> bool:
    """Every bf16 fast-path error within 2x the reference's own bf16 error (+1e-3), and under 3e-2; every
    FP8 error finite and under FP8_MOE_MAX_ERR."""
    ref = res["reference_bf16"]
    ok = True
    for name, errs in res.items():
        if name == "reference_bf16":
            continue
        for kk, e in errs.items():
            if name.endswith("+fp8"):
                ok &= math.isfinite(e) and e < FP8_MOE_MAX_ERR
            else:
                ok &= math.isfinite(e) and e <= 2 * ref[kk] + 1e-3 and e < 3e-2
    return bool(ok)


def check_fp8(cfg: MixtralConfig, device, M: int = 8192, seed: int = 0) -> dict:
    """FP8 kernels at the model's expert shapes: Triton row quantization and NF4->e4m3 dequantization (row-major
    and transposed) equal to the PyTorch path value for value; the grouped FP8 product
    (torch._scaled_grouped_mm) vs the exact fp32 product of the same quantized operands; uneven groups."""
    from .kernels import fp8
    from .kernels.dequant import dequantize_nf4_stack
    from .model.nf4 import NF4Weight
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator(device=device).manual_seed(seed)
    out = {"native": fp8.fp8_supported(device)}
    x = torch.randn(M, H + 128, generator=g, device=device).to(torch.bfloat16)
    x[:, :7] *= 50  # outlier columns
    qt, st = fp8.quantize_rows(x)
    qp, sp = fp8.quantize_rows(x, triton=False)
    out["quant_rows_equal"] = bool(torch.equal(qt.float(), qp.float()) and torch.equal(st, sp))
    w = NF4Weight.quantize(torch.randn(E, I, H, generator=g, device=device).to(torch.bfloat16) * 0.02)
    inv = 448.0 / fp8.expert_amax(w)
    for tr in (False, True):
        a = dequantize_nf4_stack([w], fp8.F8, inv=inv, transpose=tr)
        b = dequantize_nf4_stack([w], fp8.F8, inv=inv, transpose=tr, triton=False)
        out[f"dequant_fp8{'_t' if tr else ''}_equal"] = bool(torch.equal(a.float(), b.float()))
        del a, b
    cuts = torch.sort(torch.randint(0, M, (E - 1,), generator=g, device=device)).values
    offs = torch.cat([cuts, torch.tensor([M], device=device)]).to(torch.int32)
    W8, sw = fp8.fp8_weights([w])
    got = fp8.scaled_grouped_mm(qt[:, :H].contiguous(), st, W8, sw, offs)
    ref = fp8._emulated(qt[:, :H].contiguous(), st, W8, sw, offs, torch.float32)
    out["grouped_mm_rel"] = rel(got, ref)
    out["ok"] = (out["quant_rows_equal"] and out["dequant_fp8_equal"] and out["dequant_fp8_t_equal"]
                 and out["grouped_mm_rel"] < 5e-3)  # bf16 output rounding alone is ~2e-3
    return out


def check_attention(cfg: MixtralConfig, device, B=2, T=1024, seed=0) -> dict:
    """FlexAttention (block-sparse document mask) and sdpa (dense mask) vs an fp32 eager evaluation, forward and
    input gradients, on packed rows at the model's head geometry."""
    from .kernels.attention import build_attention
    _, _, pos = packed_batch(B, T, 100, device, seed)
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(seed)
    base = [torch.randn(B, n, T, d, generator=g, device=device) for n in (nh, nkv, nkv)]
    go = torch.randn(B, nh, T, d, generator=g, device=device)

    def run(impl, dt):
        q, k, v = (t.detach().to(dt).clone().requires_grad_() for t in base)
        o = build_attention(pos, T, nh // nkv, impl)(q, k, v)
        (o.float() * go).sum().backward()
        return [o, q.grad, k.grad, v.grad]

    from .kernels import attention as _attention
    ref = run("eager", torch.float32)
    out = {}
    saved = _attention.SDPA_GQA
    for name, impl, gqa in (("sdpa", "sdpa", False), ("sdpa-gqa", "sdpa", True), ("flex", "flex", False)):
        _attention.SDPA_GQA = gqa
        try:
            out[name] = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), run(impl, torch.bfloat16), ref)}
        except Exception as e:  # noqa: BLE001 - report, the flex rows then fail on their own
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        finally:
            _attention.SDPA_GQA = saved
    return out


def cuda_ms(fn, reps: int = 10) -> float:
    """Median milliseconds of fn() on the current CUDA stream over `reps` calls, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def time_kernels(cfg: MixtralConfig, device, reps: int = 10) -> dict:
    """ms per call on the GPU: NF4 dequantization of one layer's experts (ours vs bitsandbytes), and the
    grouped products of one layer's experts at 16384 tokens, uniform routing; with FP8 support also the FP8
    pieces: e4m3 dequantization (row-major and transposed, choosing the transposed tile), row quantization
    and the FP8 grouped product."""
    from .kernels import fp8
    from .kernels.dequant import dequantize_nf4, dequantize_nf4_stack
    from .kernels.moe import grouped_mm
    from .model.nf4 import NF4Weight
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    w = [NF4Weight.quantize(torch.randn(E, I, H, device=device, dtype=torch.bfloat16) * 0.02) for _ in range(3)]

    def t(fn):
        return cuda_ms(fn, reps)

    from .kernels import dequant
    sweep = {}
    for R, nw in ((32, 4), (64, 4), (64, 8), (128, 8), (128, 4)):  # pick the dequant tile for this GPU
        dequant.CONFIG.update(R=R, num_warps=nw)
        sweep[f"R{R}w{nw}"] = t(lambda: dequantize_nf4(w[0], torch.bfloat16))
    best = min(sweep, key=sweep.get)
    dequant.CONFIG.update(R=int(best[1:best.index("w")]), num_warps=int(best[best.index("w") + 1:]))
    out = {"dequant_sweep_ms": sweep, "dequant_config": dict(dequant.CONFIG),
           "dequant_w13_ms": t(lambda: dequantize_nf4_stack(w[:2], torch.bfloat16)),
           "dequant_one_ms": t(lambda: dequantize_nf4(w[0], torch.bfloat16))}
    # Same arithmetic as NF4Weight.dequantize up to fp32 contraction (the GPU fuses scale*absmax2+offset into
    # one FMA), so a rare element can land one bf16 step away: check fp32 closeness, report bf16 mismatches.
    got, ref = dequantize_nf4(w[0], torch.float32), w[0].dequantize(torch.float32)
    out["dequant_max_rel_fp32"] = float((got - ref).abs().max() / ref.abs().max())
    del got, ref
    out["dequant_bf16_mismatch_frac"] = float(
        (dequantize_nf4(w[0], torch.bfloat16) != w[0].dequantize(torch.bfloat16)).float().mean())
    out["dequant_ok"] = out["dequant_max_rel_fp32"] < 1e-6 and out["dequant_bf16_mismatch_frac"] < 1e-4
    try:
        import bitsandbytes.functional as bf
        qs = w[0].bnb_quant_state()
        out["bnb_dequant_one_ms"] = t(lambda: bf.dequantize_4bit(w[0].packed, qs))
    except Exception as e:  # noqa: BLE001 - bitsandbytes is optional for this number
        out["bnb_dequant_one_ms"] = f"n/a ({type(e).__name__})"
    n_bytes = E * I * H * (2 + 0.5 + 1 / 64)  # bf16 written + codes + absmax read
    out["dequant_one_TBps"] = n_bytes / out["dequant_one_ms"] / 1e9
    M = 16384
    xs = torch.randn(M, H, device=device, dtype=torch.bfloat16)
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * (M // E)
    W = torch.randn(E, 2 * I, H, device=device, dtype=torch.bfloat16)
    ms = t(lambda: grouped_mm(xs, W.transpose(1, 2), offs))
    out["grouped_mm_w13_ms"] = ms
    out["grouped_mm_w13_TFLOPs"] = 2 * M * H * 2 * I / ms / 1e9
    del W
    if fp8.fp8_supported(device):  # the FP8 path's pieces at the same shapes
        tsweep = {}
        for TO in (32, 64, 128):  # rows per transposed tile
            dequant.CONFIG.update(TO=TO)
            tsweep[f"TO{TO}"] = t(lambda: fp8.fp8_weights(w[:2], transpose=True))
        dequant.CONFIG.update(TO=int(min(tsweep, key=tsweep.get)[2:]))
        out.update({"fp8_dequant_w13_t_sweep_ms": tsweep, "fp8_dequant_w13_ms": t(lambda: fp8.fp8_weights(w[:2])),
                    "fp8_dequant_w13_t_ms": min(tsweep.values()),
                    "fp8_quant_rows_MxI_ms": t(lambda: fp8.quantize_rows(xs.new_empty(M, I).normal_()))
                    - t(lambda: xs.new_empty(M, I).normal_())})
        W8, sw = fp8.fp8_weights(w[:2])
        q, sq = fp8.quantize_rows(xs)
        ms = t(lambda: fp8.scaled_grouped_mm(q, sq, W8, sw, offs))
        out["fp8_grouped_mm_w13_ms"] = ms
        out["fp8_grouped_mm_w13_TFLOPs"] = 2 * M * H * 2 * I / ms / 1e9
        del W8, q
    del w, xs
    return out


def check_model(cfg: MixtralConfig, device, B, T, seed=0, fp8=False):
    """Loss and LoRA gradients of a random NF4 model (one set of weights, nonzero LoRA B) along three paths:
    fp32 reference (ground truth: PyTorch only, per-expert loop, unchunked CE), bf16 reference (the same in
    bf16) and the bf16 fast path (grouped MoE, chunked CE, every Triton kernel: dequantization, RMSNorm, RoPE,
    routing, SwiGLU). Each bf16 path is compared with the fp32 one: the fast path must be about as close as
    plain bf16 PyTorch is (a random 1-layer model's gradients are sensitive: several % in bf16 either way)."""
    from . import kernels
    from .kernels import _triton
    model = build_model(cfg, device, seed)
    ids, labels, pos = packed_batch(B, T, cfg.vocab_size, device, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():  # nonzero B so every gradient path carries signal
        for p in params:
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    res = {}
    paths = ("fast", "fast_fp8", "reference_bf16", "reference_fp32") if fp8 else ("fast", "reference_bf16",
                                                                                  "reference_fp32")
    for path in paths:
        fast = path.startswith("fast")
        if path == "reference_fp32":
            model.float()  # last: the bf16 weights convert exactly; LoRA parameters are fp32 already
        model.set_moe_backend("grouped" if fast else "reference", "fp8" if path == "fast_fp8" else "bf16")
        saved = _triton.FORCE
        _triton.FORCE = saved if fast else False  # references: no Triton kernel anywhere
        try:
            for p in params:
                p.grad = None
            h = model_hidden(model, ids, pos)
            ce = kernels.linear_cross_entropy(h, model.lm_head, labels, impl="auto" if fast else "reference")
            loss = ce[0] / ce[1]
            loss.backward()
        finally:
            _triton.FORCE = saved
        res[path] = (loss.detach().double(), torch.cat([p.grad.detach().flatten().double() for p in params]))
    del model
    ref = res["reference_fp32"]
    out = {"loss": float(ref[0])}
    for path in paths[:-1]:
        out[f"{path}_loss_rel"] = rel(res[path][0], ref[0])
        out[f"{path}_grad_rel"] = rel(res[path][1], ref[1])
        out[f"{path}_grad_cos"] = float(torch.nn.functional.cosine_similarity(res[path][1], ref[1], 0))
    return out


def model_check_passes(m: dict) -> bool:
    """The fast path is within 1.25x (plus a small floor) of plain bf16 PyTorch's distance to fp32."""
    return (m["fast_loss_rel"] <= 1.25 * m["reference_bf16_loss_rel"] + 1e-3
            and m["fast_grad_rel"] <= 1.25 * m["reference_bf16_grad_rel"] + 1e-3)


def model_hidden(model, ids, pos):
    """The final normed hidden states (B, T, H), through the model's own forward (labels=None, no logits)."""
    cache = {}
    handle = model.model.norm.register_forward_hook(lambda m, i, o: cache.__setitem__("h", o))
    model(ids, pos, None, return_logits=False)
    handle.remove()
    return cache["h"]


# ------------------------------------------------------------------------------------------ (b) mixtune steps
def build_model(cfg: MixtralConfig, device, seed=0, r=LORA_R, alpha=LORA_ALPHA, quant="nf4"):
    from .config import LoraConfig
    from .lora import apply_lora
    from .model.random_init import build_random_nf4_model
    model = build_random_nf4_model(cfg, device=device, seed=seed, quant=quant)
    apply_lora(model, LoraConfig(r=r, alpha=alpha, targets=list(LORA_TARGETS)), seed=seed)
    model.train()
    return model


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_mixtune(model, cfg, row: Row, device, backend, ckpt, steps, warmup, seed=0, opt_fused=True,
                 attn="sdpa", optim="adamw", actk=0, gqa=1, prec="bf16"):
    """Times `steps` optimizer steps (after `warmup`) of row.accum micro-batches each; fills `row`."""
    from .lora import lora_parameters
    model.set_moe_backend(backend, prec)
    model.attn_implementation = attn
    model.set_checkpointing(max(0, int(ckpt)), attention=bool(actk))  # the first `ckpt` layers in full
    from .kernels import attention as _attention
    _attention.SDPA_GQA = bool(gqa)
    params = lora_parameters(model)
    cuda = torch.device(device).type == "cuda"
    if optim == "adamw" and not opt_fused:
        opt = torch.optim.AdamW(params, lr=1e-5, fused=False)
    else:
        from .optim import make_optimizer
        opt = make_optimizer(params, optim, lr=1e-5)
    batches = [packed_batch(row.micro_batch, row.seq, cfg.vocab_size, device, seed + i) for i in range(row.accum)]
    n_lab = sum(int((lab[:, 1:] != -100).sum()) for _, lab, _ in batches)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for it in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        tot = 0.0
        for ids, lab, pos in batches:
            out = model(ids, pos, lab, return_logits=False)
            (out.loss_sum / n_lab).backward()
            tot += float(out.loss_sum.detach()) if it == warmup + steps - 1 else 0.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
        loss = tot / n_lab
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    row.fill(cfg, row.micro_batch * row.seq * row.accum, times, peak, loss)
    del opt
    for p in params:
        p.grad = None
    return row


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def ckpt_label(n: int, layers: int) -> str:
    return "none" if n <= 0 else ("all" if n >= layers else f"{n}/{layers}")


def parse_settings(spec: str):
    """'mb=8,ckpt=0,backend=grouped;mb=16,...' -> list of dicts. ckpt = number of layers checkpointed
    (the first ones; 1 with the stock stack means all), accum = micro-batches per optimizer step, backend = MoE
    backend, attn = attention implementation, opt = adamw | adamw_8bit, actk=1: the layers not fully
    checkpointed recompute their attention block, gqa=1 (default): sdpa reads the shared k/v heads (enable_gqa),
    gqa=0: k/v repeated per query head, prec = expert precision bf16 | fp8."""
    out = []
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        d = {"mb": 8, "accum": 1, "ckpt": 0, "backend": "grouped", "attn": "sdpa", "opt": "adamw", "actk": 0,
             "gqa": 1, "prec": "bf16"}
        for kv in part.split(","):
            key, _, val = kv.partition("=")
            if key not in d:
                raise ValueError(f"--settings: unknown key {key!r} in {part!r} (mb, accum, ckpt, backend, attn, opt, "
                                 "actk, gqa, prec)")
            d[key] = val if key in ("backend", "attn", "opt", "prec") else int(val)
        out.append(d)
    return out


def profile_step(model, cfg, s, seq, device, path, seed=0):
    """One profiled training step at setting s; the top CUDA kernels by total time go to `path`."""
    from torch.profiler import ProfilerActivity, profile
    row = Row("profile", cfg.num_hidden_layers, s["mb"], seq, s["accum"])
    kw = dict(attn=s.get("attn", "sdpa"), optim=s.get("opt", "adamw"), actk=s.get("actk", 0), gqa=s.get("gqa", 1),
              prec=s.get("prec", "bf16"))
    time_mixtune(model, cfg, row, device, s["backend"], s["ckpt"], 1, 1, seed, **kw)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_mixtune(model, cfg, row, device, s["backend"], s["ckpt"], 1, 0, seed, **kw)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    with open(path, "w") as f:
        f.write(table)
    print("\n".join(table.splitlines()[:30]), flush=True)


def planned_peak_gib(model, cfg: MixtralConfig, s: dict, seq: int) -> float:
    """mixtune.memory_plan's estimate for setting `s` (printed next to the measured peak, so every benchmark
    run checks the planner). The planner models shared k/v heads (gqa=1) and the grouped backends."""
    from .inspect_model import memory_estimate
    from .lora import lora_parameters
    from .memory_plan import GiB, Policy, estimate_bytes
    if s["backend"] not in ("grouped", "grouped_lowmem") or not s.get("gqa", 1):
        return float("nan")
    trainable = sum(p.numel() for p in lora_parameters(model))
    pol = Policy(min(int(s["ckpt"]), cfg.num_hidden_layers), bool(s.get("actk")), s["backend"])
    return estimate_bytes(cfg, memory_estimate(model)["weights_nf4"], trainable, s["mb"], seq, LORA_R,
                          s.get("opt", "adamw"), pol, precision=s.get("prec", "bf16")) / GiB


def run_settings(cfg, layers, settings, device, steps, warmup, rows, label, seed=0, profile_path=""):
    t0 = time.perf_counter()
    c = MixtralConfig(**{**cfg.__dict__, "num_hidden_layers": layers})
    model = None
    try:
        model = build_model(c, device, seed)
        build_s = getattr(model, "load_seconds", time.perf_counter() - t0)
        for s in settings:
            row = Row(f"mixtune {label}", layers, s["mb"], rows["seq"], s["accum"],
                      f"{s['backend']}, ckpt={ckpt_label(s['ckpt'], layers)}"
                      + (f", attn={s['attn']}" if s.get("attn", "sdpa") != "sdpa" else "")
                      + (f", {s['opt']}" if s.get("opt", "adamw") != "adamw" else "")
                      + (", attn-ckpt" if s.get("actk") else "") + ("" if s.get("gqa", 1) else ", k/v repeated")
                      + (", fp8" if s.get("prec", "bf16") != "bf16" else ""),
                      build_s=build_s)
            row.est_gib = planned_peak_gib(model, c, s, rows["seq"])
            try:
                time_mixtune(model, c, row, device, s["backend"], s["ckpt"], steps, warmup, seed,
                             attn=s.get("attn", "sdpa"), optim=s.get("opt", "adamw"), actk=s.get("actk", 0),
                             gqa=s.get("gqa", 1), prec=s.get("prec", "bf16"))
            except torch.OutOfMemoryError as e:
                row.error = "OOM: " + str(e).split("\n")[0][:80]
            except RuntimeError as e:
                row.error = f"{type(e).__name__}: {str(e)[:120]}"
            rows["out"].append(row)
            print_row(row)
            free(device)
        if profile_path and settings:
            try:
                profile_step(model, c, settings[0], rows["seq"], device, profile_path, seed)
            except Exception as e:  # the profile is a diagnostic: never lose the rows for it
                print(f"profile failed: {type(e).__name__}: {str(e)[:200]}")
            free(device)
    finally:
        del model
        free(device)


# ------------------------------------------------------------------------------------------ report
HEADER = (f"{'run':<26} {'L':>3} {'mb x seq':>10} {'setting':<28} {'tok/s':>9} {'TF/s 4N':>8} {'TF/s 6N':>8} "
          f"{'peak GiB':>8} {'est GiB':>8} {'build s':>7} {'loss':>7}")


def print_row(r: Row):
    if r.error:
        print(f"{r.name:<26} {r.layers:>3} {r.micro_batch:>4}x{r.seq:<5} {r.setting:<28} {r.error}", flush=True)
        return
    mb = f"{r.micro_batch}x{r.seq}" + (f"x{r.accum}" if r.accum > 1 else "")
    print(f"{r.name:<26} {r.layers:>3} {mb:>10} {r.setting:<28} {r.tok_s:>9.0f} {r.tflops4:>8.1f} "
          f"{r.tflops6:>8.1f} {r.peak_gib:>8.2f} {r.est_gib:>8.2f} {r.build_s:>7.1f} {r.loss:>7.3f}", flush=True)


def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
        v["cuda"] = torch.version.cuda
    return v


def build_parser():
    p = argparse.ArgumentParser(prog="mixtune bench", description=__doc__.split("\n")[0])
    p.add_argument("--cpu-tiny", action="store_true", help="tiny geometry on CPU (seconds): numerics + steps")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--layers", type=int, default=4, help="layers for the side-by-side comparison")
    p.add_argument("--seq", type=int, default=1024, help="packed row length")
    p.add_argument("--settings", default="mb=8,ckpt=0,backend=grouped;mb=8,ckpt=1,backend=grouped",
                   help="mixtune settings at --layers: 'mb=8,accum=1,ckpt=0,backend=grouped;...'")
    p.add_argument("--full", default="", help="settings for the full-depth run (same syntax); empty: skip")
    p.add_argument("--full-layers", type=int, default=0, help="full depth (default: the geometry's)")
    p.add_argument("--stock", default="", help="stock-stack settings 'mb=8,ckpt=1;...' at --layers; empty: skip")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-check", action="store_true", help="skip the numerics checks")
    p.add_argument("--check-tokens", type=int, default=4096, help="tokens in the MoE layer check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="", help="write a torch.profiler kernel table of one step of the first "
                                                 "--layers setting to this file")
    return p


def main(argv=None, stock_runner=None) -> int:
    """`mixtune bench`. stock_runner: the stock-stack timer (bench/train_throughput.py passes it)."""
    args = build_parser().parse_args(argv)
    if args.cpu_tiny:
        device = "cpu"
        cfg = MixtralConfig(**TINY)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = MixtralConfig()
    try:
        settings = parse_settings(args.settings)
        full = parse_settings(args.full)
        stock = parse_settings(args.stock)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stock and stock_runner is None:
        print("error: --stock runs from bench/train_throughput.py (it needs the benchmark's stock-stack module)",
              file=sys.stderr)
        return 2
    result = {"versions": versions(), "device": device, "geometry": {k: getattr(cfg, k) for k in TINY},
              "seq": args.seq, "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS}}
    ok = True
    t_start = time.perf_counter()
    if not args.no_check:
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        N = args.check_tokens if not args.cpu_tiny else 64
        moe = check_moe(device, E, H, I, N, cfg.num_experts_per_tok, 64 if not args.cpu_tiny else 8, args.seed)
        moe_ok = moe_check_passes(moe)
        print(f"[check] MoE layer E={E} H={H} I={I} N={N}: rel. error vs fp32 reference "
              f"({'PASS' if moe_ok else 'FAIL'})")
        for name, errs in moe.items():
            print(f"  {name:<16} " + " ".join(f"{kk}={v:.2e}" for kk, v in errs.items()))
        mcfg = MixtralConfig(**{**cfg.__dict__, "num_hidden_layers": 1})
        mdl = check_model(mcfg, device, 2, min(args.seq, 512), args.seed, fp8=device == "cuda")
        mdl_ok = model_check_passes(mdl)
        print(f"[check] 1-layer model vs its fp32 reference path ({'PASS' if mdl_ok else 'FAIL'}): "
              f"fast bf16 path: loss rel {mdl['fast_loss_rel']:.2e}, LoRA grads rel {mdl['fast_grad_rel']:.2e}; "
              f"PyTorch bf16 reference: loss rel {mdl['reference_bf16_loss_rel']:.2e}, LoRA grads rel "
              f"{mdl['reference_bf16_grad_rel']:.2e}", flush=True)
        if "fast_fp8_loss_rel" in mdl:
            print(f"[check] 1-layer model, fp8 experts (reported, not gated): loss rel {mdl['fast_fp8_loss_rel']:.2e}, "
                  f"LoRA grads rel {mdl['fast_fp8_grad_rel']:.2e}, cosine {mdl['fast_fp8_grad_cos']:.5f} "
                  f"(bf16 fast path: cosine {mdl['fast_grad_cos']:.5f})", flush=True)
        result["check"] = {"moe": moe, "moe_pass": moe_ok, "model": mdl, "model_pass": mdl_ok}
        if device == "cuda":
            f8 = check_fp8(cfg, device, seed=args.seed)
            print(f"[check] FP8 kernels ({'PASS' if f8['ok'] else 'FAIL'}): {f8}", flush=True)
            result["check"]["fp8"] = f8
            ok = ok and f8["ok"]
        if device == "cuda":
            att = check_attention(cfg, device)
            use_flex = any(x.get("attn") == "flex" for x in settings + full)
            att_ok = all("error" not in e and max(e.values()) < 2e-2 for n, e in att.items()
                         if n != "flex" or use_flex)
            print(f"[check] attention on packed rows vs fp32 eager ({'PASS' if att_ok else 'FAIL'}): {att}", flush=True)
            result["check"]["attention"] = att
            ok = ok and att_ok
        if device == "cuda":
            result["kernels"] = time_kernels(cfg, device)
            ok = ok and result["kernels"]["dequant_ok"]
            print("[kernels] " + " ".join(f"{kk}={v:.3g}" if isinstance(v, float) else f"{kk}={v}"
                                          for kk, v in result["kernels"].items()), flush=True)
        ok = ok and moe_ok and mdl_ok
        free(device)
    rows = {"seq": args.seq, "out": []}
    print(HEADER, flush=True)
    if args.cpu_tiny:
        run_settings(cfg, cfg.num_hidden_layers, [dict(mb=2, accum=1, ckpt=0, backend="grouped"),
                                                  dict(mb=2, accum=1, ckpt=2, backend="reference")],
                     device, 2, 1, {"seq": 64, "out": rows["out"]}, "tiny", args.seed)
    else:
        if settings:
            run_settings(cfg, args.layers, settings, device, args.steps, args.warmup, rows, f"{args.layers}L", args.seed,
                         args.profile)
        if stock:
            for s in stock:
                row = stock_runner(Row, cfg, args.layers, s, args.seq, device, args.steps, args.warmup, args.seed)
                rows["out"].append(row)
                print_row(row)
                free(device)
        if full:
            L = args.full_layers or cfg.num_hidden_layers
            run_settings(cfg, L, full, device, args.steps, args.warmup, rows, f"{L}L", args.seed)
    print()
    print(HEADER)
    for r in rows["out"]:
        print_row(r)
    from .kernels.moe import FALLBACKS
    result["grouped_mm_layout_copies"] = dict(FALLBACKS)
    print(f"grouped_mm calls that needed a layout copy: {FALLBACKS}")
    result["rows"] = [r.__dict__ for r in rows["out"]]
    result["ok"] = ok
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
