"""The numerics checks `mixtune bench` runs before timing: the fast kernels against the PyTorch references.

    mixtune bench --cpu-tiny      # runs these checks, then the timed steps of mixtune.bench; PASS/FAIL per check
    python -c "from mixtune.bench_checks import *; print(moe_check_passes(check_moe('cpu', 4, 128, 256, 64, 2, 8)))"

check_moe / moe_check_passes: the grouped MoE layer (forward, and backward w.r.t. x, the routing weights and
every LoRA A/B) on random NF4 weights vs the reference, as ‖fast − ref‖/‖ref‖ against an fp32 evaluation next
to the reference's own bf16 error. check_model / model_check_passes: a random NF4 model's loss and LoRA
gradients on the fast path vs plain bf16 PyTorch, both against fp32. check_fp8 (CUDA): the FP8 kernels at the
model's expert shapes. check_attention (CUDA): FlexAttention and sdpa on packed rows vs fp32 eager. Also the
pieces the benchmark runner shares: packed_batch (the packed rows every run trains on), build_model (a random
NF4 model with the benchmark's LoRA) and rel. Each check returns plain numbers; nothing here times anything,
and this module never imports mixtune.bench.
"""

from __future__ import annotations

import math

import torch

from .model.config import MixtralConfig

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
LORA_R, LORA_ALPHA = 64, 16.0


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
              backends=("grouped", "grouped_lowmem", "grouped+fp8", "grouped_lowmem+fp8", "grouped+shared",
                        "grouped_lowmem+shared")):
    """Our MoE layer vs the reference on the same random NF4 weights (LoRA on w1/w3/w2, B nonzero).
    Returns {backend: {output: err, ...}, "reference_bf16": {...}}, errors against an fp32 reference
    ("+fp8": the backend with expert_precision fp8; "+shared": w1 and w3 share one LoRA A, against the
    reference with the same sharing, "reference_bf16+shared")."""
    from . import kernels
    from .quant.nf4 import NF4Weight
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
        name, *opts = backend.split("+")
        if "shared" in opts:
            a["w3"] = a["w1"]
        b = {n: t.clone().requires_grad_() for n, t in Bm.items()}
        lora = _LoRA(a, b, 2.0)
        wts = ws if dt != torch.float32 else [w.dequantize(torch.float32) for w in ws]
        prec = "fp8" if "fp8" in opts else "bf16"
        y = kernels.moe_experts(x, idx, tw, *wts, lora=lora, backend=name, precision=prec)
        (y.float() * go).sum().backward()
        return dict(out=y, dx=x.grad, dw=tw.grad, **{f"dA_{n}": a[n].grad for n in a},
                    **{f"dB_{n}": b[n].grad for n in b})

    refs = {"": run("reference", torch.float32)}
    if any("+shared" in b for b in backends):
        refs["+shared"] = run("reference+shared", torch.float32)
    for name in ("reference",) + (("reference+shared",) if "+shared" in refs else ()) + tuple(backends):
        ref32 = refs["+shared" if "+shared" in name else ""]
        res = run(name, dtype)
        key = name.replace("reference", "reference_bf16") if name.startswith("reference") else name
        out[key] = {kk: rel(res[kk], ref32[kk]) for kk in ref32}
        del res
    return out


FP8_MOE_MAX_ERR = 0.1  # e4m3 rounds each operand by ~2.6% rms; h13 -> SwiGLU -> y compounds two products


def moe_check_passes(res: dict) -> bool:
    """Every bf16 fast-path error within 2x the reference's own bf16 error (+1e-3), and under 3e-2; every
    FP8 error finite and under FP8_MOE_MAX_ERR."""
    ok = True
    for name, errs in res.items():
        if name.startswith("reference_bf16"):
            continue
        ref = res["reference_bf16+shared" if "+shared" in name else "reference_bf16"]
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
    from .quant.nf4 import NF4Weight
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
    """FlexAttention (block-sparse document mask), FlashAttention varlen (one list of examples) and sdpa (dense
    mask) vs an fp32 eager evaluation, forward and input gradients, on packed rows at the model's head geometry."""
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
    for name, impl, gqa in (("sdpa", "sdpa", False), ("sdpa-gqa", "sdpa", True), ("varlen", "varlen", False),
                            ("flex", "flex", False)):
        _attention.SDPA_GQA = gqa
        try:
            out[name] = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), run(impl, torch.bfloat16), ref)}
        except Exception as e:  # noqa: BLE001 - report, the flex rows then fail on their own
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        finally:
            _attention.SDPA_GQA = saved
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


# ------------------------------------------------------------------------------------------ the model under test
def build_model(cfg: MixtralConfig, device, seed=0, r=LORA_R, alpha=LORA_ALPHA, quant="nf4", offload_layers=False,
                shard_of=None, shared_a=False):
    """The random NF4 model with the benchmark's adapter. offload_layers: decoder layers parked on the CPU as
    they are built (for fsdp, which brings them back one at a time when it shards), keeping only rank's chunk of
    the NF4 storage with shard_of=(rank, world). shared_a: lora.shared_gate_up_a."""
    from .config import LoraConfig
    from .lora import apply_lora
    from .model.random_init import build_random_nf4_model
    model = build_random_nf4_model(cfg, device=device, seed=seed, quant=quant, offload_layers=offload_layers,
                                   shard_of=shard_of)
    apply_lora(model, LoraConfig(r=r, alpha=alpha, targets=list(LORA_TARGETS), shared_gate_up_a=shared_a), seed=seed)
    model.train()
    return model
