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

This module is the runner (settings, timing, report, CLI). The checks of (a) live in mixtune.bench_checks;
its public names (packed_batch, check_moe, FP8_MOE_MAX_ERR, ...) stay importable from here.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass

import torch

from .bench_checks import (FP8_MOE_MAX_ERR, LORA_ALPHA, LORA_R, LORA_TARGETS,  # noqa: F401 (FP8_MOE_MAX_ERR: bench/)
                           build_model, check_attention, check_fp8, check_model, check_moe, model_check_passes,
                           moe_check_passes, packed_batch)
from .model.config import GEOMETRIES, MixtralConfig

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


# ------------------------------------------------------------------------------------------ accounting
def active_params(cfg: MixtralConfig, layers: int) -> int:
    """Matmul parameters one token touches in the first `layers` layers: attention + top-k experts (+ the shared
    expert) in MoE layers, the dense MLP in dense layers, plus the lm_head."""
    H, d = cfg.hidden_size, cfg.head_dim
    attn = 2 * H * cfg.num_attention_heads * d + 2 * H * cfg.num_key_value_heads * d
    moe = cfg.num_experts_per_tok * 3 * H * cfg.intermediate_size + 3 * H * cfg.shared_expert_intermediate_size
    dense = 3 * H * (cfg.dense_intermediate_size or cfg.intermediate_size)
    return sum(attn + (moe if cfg.is_moe_layer(l) else dense) for l in range(layers)) + cfg.vocab_size * H


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
    build_peak_gib: float = float("nan")  # peak while building (and sharding) the model, when measured
    host_s: float = float("nan")  # median seconds until a step's last launch returned (before its closing sync)
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
    from .quant.nf4 import NF4Weight
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    w = [NF4Weight.quantize(torch.randn(E, I, H, device=device, dtype=torch.bfloat16) * 0.02) for _ in range(3)]

    def t(fn):
        return cuda_ms(fn, reps)

    from .kernels import dequant
    sweep = {}
    # pick the dequant tile for this GPU (session 7 also tried decoding the codes as bytes, interleaved in
    # registers: its best tile took 0.316 ms on the H200 against 0.289 ms for the best one here, so it went)
    # session 8 added the word-by-word decoding (dequant.CONFIG["words"]); both are swept, the fastest is kept
    tiles = {False: ((32, 4), (64, 4), (32, 8), (64, 8), (128, 8), (128, 4)),
             True: ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8), (128, 8))}
    for words, rn in tiles.items():
        for R, nw in rn:
            dequant.CONFIG.update(R=R, num_warps=nw, words=words)
            sweep[(R, nw, words)] = t(lambda: dequantize_nf4(w[0], torch.bfloat16))
    R, nw, words = min(sweep, key=sweep.get)
    dequant.CONFIG.update(R=R, num_warps=nw, words=words)
    sweep = {f"R{a}w{b}{'W' if c else ''}": ms for (a, b, c), ms in sweep.items()}
    out = {"dequant_sweep_ms": sweep, "dequant_config": dict(dequant.CONFIG),
           "dequant_w13_ms": t(lambda: dequantize_nf4_stack(w[:2], torch.bfloat16)),
           "dequant_one_ms": t(lambda: dequantize_nf4(w[0], torch.bfloat16))}
    # Same arithmetic as NF4Weight.dequantize up to fp32 contraction (the GPU fuses scale*absmax2+offset into
    # one FMA), so a rare element can land one bf16 step away: check fp32 closeness, report bf16 mismatches.
    # Both decodings are checked, whichever won (a bench row may ask for either: nf4=words|blocks).
    ref, ref16 = w[0].dequantize(torch.float32), w[0].dequantize(torch.bfloat16)
    out["dequant_ok"] = True
    for tag, wd in (("", words), ("_other", not words)):
        dequant.CONFIG["words"] = wd
        torch.full_like(ref, float("nan"))  # poison the block the caching allocator hands out next (freed at once)
        got = dequantize_nf4(w[0], torch.float32)
        out[f"dequant_max_rel_fp32{tag}"] = float((got - ref).abs().max() / ref.abs().max())
        del got
        out[f"dequant_bf16_mismatch_frac{tag}"] = float((dequantize_nf4(w[0], torch.bfloat16) != ref16).float().mean())
        out["dequant_ok"] &= out[f"dequant_max_rel_fp32{tag}"] < 1e-6 and out[f"dequant_bf16_mismatch_frac{tag}"] < 1e-4
    dequant.CONFIG["words"] = words
    del ref, ref16
    from .bench_kernels import sweep_gather_mm
    out["gather_mm"] = sweep_gather_mm(cfg, device, t)  # the gather-fused LoRA products' tile, checked
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


# ------------------------------------------------------------------------------------------ (b) mixtune steps
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_mixtune(model, cfg, row: Row, device, backend, ckpt, steps, warmup, seed=0, opt_fused=True,
                 attn="auto", optim="adamw", actk=0, gqa=1, prec="bf16", dist=None):
    """Times `steps` optimizer steps (after `warmup`) of row.accum micro-batches each; fills `row`.
    dist (a Dist of several ranks, mixtune.bench_dist): each rank trains its own rows and the gradients are
    reduced as `mixtune train` reduces them (ddp: summed after the backward passes; fsdp: FSDP's own
    reduce-scatter); tokens/s counts every rank's tokens, the peak is the largest rank's."""
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
        from .loop.optim import make_optimizer
        opt = make_optimizer(params, optim, lr=1e-5)
    ranks = dist.world if dist is not None and dist.enabled else 1
    rank_seed = seed + (dist.rank * 1009 if ranks > 1 else 0)
    batches = [packed_batch(row.micro_batch, row.seq, cfg.vocab_size, device, rank_seed + i)
               for i in range(row.accum)]
    n_lab = sum(int((lab[:, 1:] != -100).sum()) for _, lab, _ in batches)
    if ranks > 1:
        n_lab = int(dist.sum(n_lab)[0])  # each rank's loss is over the whole step's label tokens
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, host, loss = [], [], float("nan")
    for it in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        tot = 0.0
        for ids, lab, pos in batches:
            out = model(ids, pos, lab, return_logits=False)
            (out.loss_sum / n_lab).backward()
            tot += float(out.loss_sum.detach()) if it == warmup + steps - 1 else 0.0
        if ranks > 1 and not dist.sharded:
            dist.sum_grads(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()  # the host has launched the whole step; the GPU may still be running it
        _sync(device)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
            host.append(t1 - t0)
        loss = tot / n_lab
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    if ranks > 1:
        import torch.distributed as tdist
        t = torch.tensor([peak], dtype=torch.float64, device=dist.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)  # the largest rank's peak (steps end together: collectives)
        peak = int(t[0])
        loss = dist.sum(tot)[0] / n_lab
    row.fill(cfg, row.micro_batch * row.seq * row.accum * ranks, times, peak, loss)
    row.host_s = sorted(host)[len(host) // 2] if host else float("nan")
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
    gqa=0: k/v repeated per query head, prec = expert precision bf16 | fp8, dist = ddp | fsdp (under torchrun:
    mixtune.bench_dist; one process trains plainly either way), r = LoRA rank (default 64; alpha stays 16),
    shared=1: the experts' w1/w3 share one LoRA A (lora.shared_gate_up_a; peft's fused gate_up_proj adapter, the
    peers' workload), nf4 = words | blocks: the NF4 dequantization's decoding for this row (default: the one
    the kernel sweep chose, else dequant.CONFIG's), gmm = 0 | 1: the gather-fused LoRA products
    (kernels.gather_mm) off or on for this row (default: on)."""
    out = []
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        d = {"mb": 8, "accum": 1, "ckpt": 0, "backend": "grouped", "attn": "auto", "opt": "adamw", "actk": 0,
             "gqa": 1, "prec": "bf16", "dist": "ddp", "r": LORA_R, "shared": 0, "nf4": "", "gmm": 1}
        for kv in part.split(","):
            key, _, val = kv.partition("=")
            if key not in d:
                raise ValueError(f"--settings: unknown key {key!r} in {part!r} (mb, accum, ckpt, backend, attn, opt, "
                                 "actk, gqa, prec, dist, r, shared, nf4, gmm)")
            if key == "dist" and val not in ("ddp", "fsdp"):
                raise ValueError(f"--settings: dist must be ddp or fsdp, got {val!r} in {part!r}")
            if key == "nf4" and val not in ("words", "blocks"):
                raise ValueError(f"--settings: nf4 must be words or blocks, got {val!r} in {part!r}")
            if key in ("backend", "attn", "opt", "prec", "dist", "nf4"):
                d[key] = val
                continue
            try:
                d[key] = int(val)
            except ValueError:
                raise ValueError(f"--settings: {key}={val!r} in {part!r} is not an integer") from None
            least = 1 if key in ("mb", "accum", "r") else 0
            if d[key] < least:
                raise ValueError(f"--settings: {key} must be >= {least}, got {d[key]} in {part!r}")
        out.append(d)
    return out


def profile_step(model, cfg, s, seq, device, path, seed=0):
    """One profiled training step at setting s; the top ops and kernels by CUDA time, then by host (CPU) self
    time — where a step that launches faster than it computes loses its time — go to `path`."""
    from torch.profiler import ProfilerActivity, profile
    row = Row("profile", cfg.num_hidden_layers, s["mb"], seq, s["accum"])
    kw = dict(attn=s.get("attn", "auto"), optim=s.get("opt", "adamw"), actk=s.get("actk", 0), gqa=s.get("gqa", 1),
              prec=s.get("prec", "bf16"))
    time_mixtune(model, cfg, row, device, s["backend"], s["ckpt"], 1, 1, seed, **kw)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_mixtune(model, cfg, row, device, s["backend"], s["ckpt"], 1, 0, seed, **kw)
    avg = prof.key_averages()
    table = avg.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    with open(path, "w") as f:
        f.write(table)
        f.write("\n\nby host self time:\n")
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=70))
    print("\n".join(table.splitlines()[:30]), flush=True)


def planned_peak_gib(model, cfg: MixtralConfig, s: dict, seq: int, ranks: int = 1) -> float:
    """mixtune.memory_plan's estimate for setting `s` (printed next to the measured peak, so every benchmark
    run checks the planner). The planner models shared k/v heads (gqa=1) and the grouped backends. With
    `ranks` > 1: the per-GPU estimate under s["dist"] (call it before the model is sharded)."""
    from .memory_plan import memory_estimate
    from .lora import lora_parameters
    from .memory_plan import GiB, Policy, estimate_bytes
    if s["backend"] not in ("grouped", "grouped_lowmem") or not s.get("gqa", 1):
        return float("nan")
    trainable = sum(p.numel() for p in lora_parameters(model))
    pol = Policy(min(int(s["ckpt"]), cfg.num_hidden_layers), bool(s.get("actk")), s["backend"])
    return estimate_bytes(cfg, memory_estimate(model)["weights_nf4"], trainable, s["mb"], seq, s.get("r", LORA_R),
                          s.get("opt", "adamw"), pol, precision=s.get("prec", "bf16"), ranks=ranks,
                          strategy=s.get("dist", "ddp"), accum=s.get("accum", 1),
                          shared_a=bool(s.get("shared", 0))) / GiB


def run_settings(cfg, layers, settings, device, steps, warmup, rows, label, seed=0, profile_path=""):
    """Time each setting on one random model, rebuilt only when a setting asks for another adapter (r=, shared=);
    with profile_path, one profiled step of the first setting follows the last row (after it: in session 6 the
    rows timed after a profile ran up to 16% slower where the step is host-bound, as if profiling had left the
    CUDA launch path slower)."""
    c = MixtralConfig(**{**cfg.__dict__, "num_hidden_layers": layers})
    model, model_r, build_s = None, None, float("nan")
    try:
        for s in settings:
            r = s.get("r", LORA_R)
            shared = bool(s.get("shared", 0))
            if (r, shared) != model_r:  # another adapter (and the old model freed first)
                del model
                model = None
                free(device)
                t0 = time.perf_counter()
                model, model_r = build_model(c, device, seed, r=r, shared_a=shared), (r, shared)
                build_s = getattr(model, "load_seconds", time.perf_counter() - t0)
            row = Row(f"mixtune {label}", layers, s["mb"], rows["seq"], s["accum"],
                      f"{s['backend']}, ckpt={ckpt_label(s['ckpt'], layers)}"
                      + (f", r={r}" if r != LORA_R else "") + (", shared A" if shared else "")
                      + (f", attn={s['attn']}" if s.get("attn", "auto") != "auto" else "")
                      + (f", {s['opt']}" if s.get("opt", "adamw") != "adamw" else "")
                      + (", attn-ckpt" if s.get("actk") else "") + ("" if s.get("gqa", 1) else ", k/v repeated")
                      + (", fp8" if s.get("prec", "bf16") != "bf16" else ""),
                      build_s=build_s)
            row.est_gib = planned_peak_gib(model, c, s, rows["seq"])
            from .kernels import dequant, gather_mm
            decode, fused = dequant.CONFIG["words"], gather_mm.CONFIG["on"]
            if s.get("nf4"):
                dequant.CONFIG["words"] = s["nf4"] == "words"
                row.setting += f", nf4 {s['nf4']}"
            gather_mm.CONFIG["on"] = bool(s.get("gmm", 1))
            row.setting += "" if gather_mm.CONFIG["on"] else ", unfused gather"
            try:
                time_mixtune(model, c, row, device, s["backend"], s["ckpt"], steps, warmup, seed,
                             attn=s.get("attn", "auto"), optim=s.get("opt", "adamw"), actk=s.get("actk", 0),
                             gqa=s.get("gqa", 1), prec=s.get("prec", "bf16"))
            except torch.OutOfMemoryError as e:
                row.error = "OOM: " + str(e).split("\n")[0][:80]
            except RuntimeError as e:
                row.error = f"{type(e).__name__}: {str(e)[:120]}"
            finally:
                dequant.CONFIG["words"], gather_mm.CONFIG["on"] = decode, fused
            rows["out"].append(row)
            print_row(row)
            free(device)
        if profile_path and settings:
            s = settings[0]
            try:
                if (s.get("r", LORA_R), bool(s.get("shared", 0))) != model_r:
                    del model
                    model = None
                    free(device)
                    model = build_model(c, device, seed, r=s.get("r", LORA_R), shared_a=bool(s.get("shared", 0)))
                profile_step(model, c, s, rows["seq"], device, profile_path, seed)
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
          f"{r.tflops6:>8.1f} {r.peak_gib:>8.2f} {r.est_gib:>8.2f} {r.build_s:>7.1f} {r.loss:>7.3f}"
          + (f"  (build peak {r.build_peak_gib:.2f} GiB)" if r.build_peak_gib == r.build_peak_gib else "")
          # host-bound when the step's launches end about when the step does (the GPU waits on the host)
          + (f"  host {1e3 * r.host_s:.1f}/{1e3 * r.step_s:.1f} ms" if r.host_s == r.host_s else ""), flush=True)


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
    p.add_argument("--cpu-tiny", action="store_true", help="tiny geometry on CPU (seconds): numerics + steps. "
                   "Without it the benchmark runs a real model's geometry and is refused without a CUDA GPU")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--geometry", default="mixtral-8x7b", choices=sorted(GEOMETRIES),
                   help="the model geometry benchmarked (random weights): any supported family")
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


def check_args(args) -> None:
    """Refuse numbers out of range, and the real-geometry benchmark anywhere but on a CUDA GPU (on CPU it would
    run for a long time in many GB of memory): --cpu-tiny is the CPU mode. ValueError with one line."""
    for name, least in (("steps", 1), ("warmup", 0), ("layers", 1), ("seq", 2), ("full_layers", 0),
                        ("check_tokens", 1)):
        v = getattr(args, name)
        if v < least:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= {least}, got {v}")
    if args.cpu_tiny:
        if args.device not in ("", "cpu"):
            raise ValueError(f"--cpu-tiny runs on the CPU; it cannot be combined with --device {args.device}")
        return
    if args.device and args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device: cuda, cuda:N or cpu, got {args.device!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        raise ValueError("the benchmark runs a real model's geometry (default Mixtral-8x7B) and needs a CUDA GPU"
                         + ("" if args.device else " (none found)") + "; on a CPU run the small mode: "
                         "mixtune bench --cpu-tiny")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU found; on a CPU run mixtune bench --cpu-tiny")


def main(argv=None, stock_runner=None) -> int:
    """`mixtune bench`. stock_runner: the stock-stack timer (bench/train_throughput.py passes it)."""
    args = build_parser().parse_args(argv)
    try:
        settings = parse_settings(args.settings)
        full = parse_settings(args.full)
        stock = parse_settings(args.stock)
        if stock and stock_runner is None:
            raise ValueError("--stock runs from bench/train_throughput.py (it needs the benchmark's stock-stack "
                             "module)")
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cpu_tiny:
        device = "cpu"
        cfg = MixtralConfig(**TINY)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = GEOMETRIES[args.geometry]
    result = {"versions": versions(), "device": device, "model": cfg.model_type,
              "geometry": {k: getattr(cfg, k) for k in TINY},
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
            ok = ok and result["kernels"]["dequant_ok"] and result["kernels"]["gather_mm"]["ok"]
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
