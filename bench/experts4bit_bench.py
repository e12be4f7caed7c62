"""experts4bit-qlora (PyPI 0.58.1, with its `[fast]` kernel package grouped-nf4-gemm 0.51.0; both pure-Python wheels
on Triton), timed on the same workload as `mixtune bench` and its peers bench/unsloth_bench.py and
bench/stock_stack.py: random weights of the Mixtral-8x7B geometry (default) or, with --geometry qwen3-30b-a3b, of
the Qwen3-30B-A3B geometry (numbers from mixtune.model.config.GEOMETRIES, via bench/peer_common.py's checked copy),
cut to --layers layers, NF4 experts AND NF4 q/k/v/o, LoRA r=64 alpha=16 dropout 0 on q/k/v/o and on every expert
(fp32 adapters, as e4b's TC1 recipe trains them), packed rows of 1024 tokens from `mixtune.bench.packed_batch`
(per-example position ids restarting at 0, first token of each example unlabeled), forward + backward + fused
AdamW, CUDA-synchronized median step time, torch.cuda.max_memory_allocated peak, a table and one JSON line last.

Run from the repository root on the GPU machine (the H200 image has torch 2.11, triton 3.6, transformers 5.17;
.whl/e4b is a flat site-packages tree of experts4bit-qlora 0.58.1 + grouped-nf4-gemm 0.51.0, < 1 MB;
bitsandbytes comes from the carried wheel):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl
    PYTHONPATH=src:.whl/e4b:/tmp/site PYTHONUNBUFFERED=1 python3 bench/experts4bit_bench.py \
      --geometry qwen3-30b-a3b --layers 4 --settings "mb=8;mb=16" --json-out $OUT/e4b-qwen3.json
    PYTHONPATH=src:.whl/e4b:/tmp/site PYTHONUNBUFFERED=1 python3 bench/experts4bit_bench.py \
      --geometry mixtral-8x7b --layers 4 --settings "mb=8;mb=8,ckpt=1" --json-out $OUT/e4b-mixtral.json

.whl/e4b (not committed; .whl/ is git-ignored):
    pip install --no-deps --no-compile --target .whl/e4b experts4bit-qlora==0.58.1 grouped-nf4-gemm==0.51.0
Their declared dependencies: experts4bit-qlora needs torch>=2.2 and bitsandbytes>=0.43 (extras: [train]
transformers>=5.0, datasets, accelerate, safetensors, huggingface_hub; only transformers is imported here),
grouped-nf4-gemm needs torch>=2.8, triton>=3.4, numpy. transformers 5.17 on the H200 satisfies >=5.0 (the
package's own trainer is tested on 5.x; nothing pins a newer one).

How the model is built. e4b's own loader (`load_moe_4bit_streaming`, and `recipe.prepare_qlora_training` on top
of it) only reads safetensors from a checkpoint directory; per MoE layer it does exactly
`ExpertsLoRA(Experts4bit.from_float(gate_up, down, has_gate=True, activation=ACT2FN[hidden_act], quant_type="nf4",
compute_dtype=bf16, blocksize=64), r, alpha)` on the fused (E, 2I, H) / (E, H, I) stacks. This script builds
transformers' MixtralForCausalLM / Qwen3MoeForCausalLM from config on the GPU in bf16 (as bench/stock_stack.py does),
swaps every layer's `mlp.experts` for that same pair of the package's public classes (bf16 experts freed layer by
layer), and then follows `prepare_qlora_training`'s order with QLoRASetup(r=64, alpha=16, adapter_dtype="fp32",
attn_4bit=True, expert_kernel="grouped_nf4", dgrad=True): `quantize_attention_projections_4bit` (q/k/v/o to
bitsandbytes NF4), use_cache off, gradient checkpointing (only for ckpt=1, see below), `add_attention_lora` (fp32),
expert adapters cast to fp32, `enable_fast_train(model, dgrad=True)` (grouped-nf4-gemm's fused grouped NF4 kernels
forward and backward, plus its defaults: fused rope, fused RMSNorm, fused q/k/v, double-quantized expert absmax,
chunked LM loss where fp32 logits reach 1 GiB, its reentrant checkpoint for checkpointed layers). It is asserted
that every expert stack is NF4 (`verify_moe_4bit(strict=True)`), every attention base is a bitsandbytes Linear4bit,
enable_fast_train patched one wrapper per layer, and the trainable parameters are exactly the LoRA: e4b's expert
LoRA has per expert one A for gate|up (r x H), B (2I x r), and A (r x I), B (H x r) for down -- the same count as
peft's target_parameters LoRA: 214,171,648 at 4 Qwen3-30B-A3B layers, 111,673,344 at 4 Mixtral layers (mixtune's
per-expert w1/w3/w2 LoRA with its own A for w1 and w3 is larger; both are printed). A layer whose experts are not
adapted is refused.

--settings: 'mb=8;mb=16;mb=8,ckpt=1' with keys mb (rows of --seq tokens), accum (micro-batches per optimizer
step, default 1), ckpt (0: no recomputation, the default; 1: e4b's per-layer recompute, i.e. gradient
checkpointing of every decoder layer through its reentrant checkpoint, as its recipe always does), keep
(E4B_MOE_KEEP_LAYERS under ckpt=1: 0, a count of last layers, or all: checkpoint only attention there and keep the
MoE activations), kernel (grouped: the fused path, default; reference: ExpertsLoRA's per-expert bitsandbytes loop,
what `python -m experts4bit_qlora.train` runs without FAST_TRAIN=1), attn4 (1: NF4 q/k/v/o, default; 0: bf16).
Settings that share (ckpt, keep, kernel, attn4) share one model, built once. Other E4B_* variables in the
environment reach enable_fast_train unchanged and are recorded in the JSON.

Packed rows (the `masking` column): e4b has no packing API of its own for Hugging Face models -- its trainer pads
rows and passes an attention mask. Position ids reach transformers' decoder unchanged (e4b patches the experts,
rope application, RMSNorm, q/k/v projection, the checkpoint function and the loss, not the mask), so with no
attention_mask and no KV cache transformers (masking_utils.find_packed_sequence_indices) builds the block-diagonal
causal mask from the restarting position ids: packed rows train document-masked. Each GPU setting verifies this on
the training forward itself: the final-norm hidden states of every token outside each row's first example are
compared with that first example replaced by other random tokens (equal to bf16 noise = document-masked); plain
causal positions give the size of a leak. The chunked loss shifts labels per row with ignore_index -100 as
Hugging Face does, so each example's unlabeled first token is honoured.

--dry-cpu (CPU, no GPU): a tiny 1-layer model of the geometry's family (hidden 64, one expert 64 wide: e4b needs
the expert width divisible by its blocksize 64; vocabulary 512) built by the same code, NF4 experts + NF4
attention + fp32 LoRA, the adapter count checked, one training step per setting (mb <= 2 x 128 tokens) and the
masking check on e4b's REFERENCE expert path (ExpertsLoRA's bitsandbytes dequantize loop runs on CPU), then
enable_fast_train(dgrad=True) on that model: grouped-nf4-gemm imports and every wrapper is eligible and patched
(and keep= is applied). It stops there: the fused kernels are Triton kernels on bf16 operands and are not run on
CPU (the Triton interpreter computes bf16 tl.dot wrongly, see shared/STACK.md, and its RMSNorm/rope/q/k/v
kernels assume CUDA tensors), so the grouped path's numbers and memory are GPU-only.

Expected wall time on one H200: imports ~15 s; per model build ~10-20 s (4 Mixtral layers: ~11 GB of bf16 made
and quantized on the GPU; Qwen3 ~6 GB); the first step of a new shape compiles Triton kernels (~20-60 s); then
steps of ~0.2-0.5 s. The three-row Qwen3 + Mixtral pair above: ~3-5 min in all. Exit code 1 if any setting failed
(its traceback printed, the others still run), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))


def _peer(name):
    """bench/<name>.py as a module (bench/ is not a package). Used for bench/peer_common.py: the geometry, adapter
    count, timing loop and masking check are shared with the Unsloth runner, so the rows are measured the same way."""
    mod_name = f"_bench_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, os.path.join(_HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


pc = _peer("peer_common")
R, ALPHA, log, free_cuda = pc.R, pc.ALPHA, pc.log, pc.free_cuda
GEOMETRY_NAMES = sorted(pc.GEOMETRIES)
E4B_VERSION, GNF4_VERSION = "0.58.1", "0.51.0"
# e4b's Experts4bit needs each expert's width divisible by its quantization blocksize (64)
TINY_OVERRIDES = dict(hidden_size=64, intermediate_size=64, vocab_size=512)
E4B_ENV_PREFIXES = ("E4B_", "NF4_QLORA_", "OFFLOAD_EXPERTS", "TRAIN_ARENA", "PYTORCH_CUDA_ALLOC_CONF",
                    "PYTORCH_ALLOC_CONF")


# ------------------------------------------------------------------------------------------ settings
def parse_settings(spec: str):
    out = []
    for part, pairs in pc.settings_parts(spec):
        d = {"mb": 8, "accum": 1, "ckpt": 0, "keep": "0", "kernel": "grouped", "attn4": 1, "flat": 0}
        for key, val in pairs:
            if key not in d or key == "flat":
                raise ValueError(f"--settings: unknown key {key!r} in {part!r} (mb, accum, ckpt, keep, kernel, attn4)")
            if key in ("keep", "kernel"):
                d[key] = val.strip().lower()
            else:
                try:
                    d[key] = int(val)
                except ValueError:
                    raise ValueError(f"--settings: {key} must be an integer in {part!r}") from None
        if d["mb"] < 1 or d["accum"] < 1:
            raise ValueError(f"--settings: mb and accum must be >= 1 in {part!r}")
        if d["ckpt"] not in (0, 1) or d["attn4"] not in (0, 1):
            raise ValueError(f"--settings: ckpt and attn4 are 0 or 1 in {part!r}")
        if d["kernel"] not in ("grouped", "reference"):
            raise ValueError(f"--settings: kernel is grouped or reference in {part!r}")
        if d["keep"] != "all" and not (d["keep"].isdigit()):
            raise ValueError(f"--settings: keep is 0, a layer count or all in {part!r}")
        if d["keep"] != "0" and not d["ckpt"]:
            raise ValueError(f"--settings: keep= keeps MoE activations of CHECKPOINTED layers: needs ckpt=1 ({part!r})")
        if d["keep"] != "0" and d["kernel"] != "grouped":
            raise ValueError(f"--settings: keep= is applied by enable_fast_train: needs kernel=grouped ({part!r})")
        out.append(d)
    return out


def group_key(s):
    return (s["ckpt"], s["keep"], s["kernel"], s["attn4"])


def label(s) -> str:
    ck = "none"
    if s["ckpt"]:
        ck = "per-layer (e4b reentrant)" + (f", keep MoE {s['keep']}" if s["keep"] != "0" else "")
    return (f"ckpt={ck}, experts {'fused grouped-nf4' if s['kernel'] == 'grouped' else 'reference loop'}, "
            f"attn {'nf4' if s['attn4'] else 'bf16'}")


def geometry(name: str, dry: bool) -> tuple[str, dict]:
    model_type, full, tiny = pc.GEOMETRIES[name]
    return model_type, dict(tiny, **TINY_OVERRIDES) if dry else dict(full)


# ------------------------------------------------------------------------------------------ model
def build_model(model_type, g, layers, s, device, seed):
    """transformers' model from config in bf16 on `device`, experts swapped for e4b's ExpertsLoRA(Experts4bit),
    then prepare_qlora_training's steps (see the module docstring). Returns (model, info)."""
    import torch
    import experts4bit_qlora as e4b
    from experts4bit_qlora.lora import (ExpertsLoRA, LoRALinear, add_attention_lora,
                                        quantize_attention_projections_4bit, trainable_lora_param_ids)
    from transformers.activations import ACT2FN

    info = {}
    t0 = time.perf_counter()
    cfg = pc.hf_config(model_type, g, layers)
    _, model_cls = pc.hf_model_class(model_type)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(cfg, dtype=torch.bfloat16)
    act = getattr(cfg, "hidden_act", "silu")
    E, I, H = g["num_local_experts"], g["intermediate_size"], g["hidden_size"]
    for li, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        gu, dn = ex.gate_up_proj.data, ex.down_proj.data
        if tuple(gu.shape) != (E, 2 * I, H) or tuple(dn.shape) != (E, H, I):
            raise RuntimeError(f"layer {li}: fused experts {tuple(gu.shape)} / {tuple(dn.shape)}, expected "
                               f"({E}, {2 * I}, {H}) / ({E}, {H}, {I})")
        base = e4b.Experts4bit.from_float(gu, dn, has_gate=True, activation=ACT2FN[act], quant_type="nf4",
                                          compute_dtype=torch.bfloat16, blocksize=64)
        layer.mlp.experts = ExpertsLoRA(base, r=R, alpha=ALPHA, dtype=torch.bfloat16).to(device)
        del ex, gu, dn, base
        if device == "cuda":
            torch.cuda.empty_cache()
    v = e4b.verify_moe_4bit(model, strict=True)
    if v["n_quantized"] != layers or v["n_unquantized"]:
        raise RuntimeError(f"expert stacks not all NF4: {v}")
    info["experts_nf4"] = v["n_quantized"]
    if s["attn4"]:
        info["attention_nf4"] = quantize_attention_projections_4bit(model)
        if info["attention_nf4"] != 4 * layers:
            raise RuntimeError(f"quantize_attention_projections_4bit converted {info['attention_nf4']}, expected "
                               f"{4 * layers}")
    model.config.use_cache = False
    if s["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    info["attention_lora"] = add_attention_lora(model, R, ALPHA, torch.float32)
    for mod in model.modules():  # adapter_dtype="fp32" (TC1's): the expert adapters too
        if isinstance(mod, ExpertsLoRA):
            for n, p in mod.named_parameters(recurse=False):
                if "lora" in n:
                    p.data = p.data.to(torch.float32)
    bad = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)
           and (type(m.base).__name__ != "Linear4bit") == bool(s["attn4"])]
    if bad:
        raise RuntimeError(f"attention bases not {'NF4' if s['attn4'] else 'bf16'}: {bad[:4]}")
    if s["kernel"] == "grouped":
        info.update(enable_grouped(model, s, layers))
    e_ids, a_ids = trainable_lora_param_ids(model)
    for p in model.parameters():
        p.requires_grad_(id(p) in e_ids or id(p) in a_ids)
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        info["resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    info.update(pc.check_adapters(model, g, layers, f"[e4b] built in {info['build_s']} s; "))
    return model, info


def enable_grouped(model, s, layers, dry=False):
    """enable_fast_train(dgrad=True) with E4B_MOE_KEEP_LAYERS from the setting; every wrapper must be patched."""
    from experts4bit_qlora.engines.fast import FAST_TRAIN_STATS, enable_fast_train
    from experts4bit_qlora.engines.moe_keep import MOE_KEEP_STATS
    keep0 = dict(MOE_KEEP_STATS)  # the counters are module-global: compare with this call's increase
    prev = os.environ.get("E4B_MOE_KEEP_LAYERS")
    if s["keep"] != "0":
        os.environ["E4B_MOE_KEEP_LAYERS"] = s["keep"]
    else:
        os.environ.pop("E4B_MOE_KEEP_LAYERS", None)
    try:
        n = enable_fast_train(model, dgrad=True)
    finally:
        if prev is None:
            os.environ.pop("E4B_MOE_KEEP_LAYERS", None)
        else:
            os.environ["E4B_MOE_KEEP_LAYERS"] = prev
    if n != layers:
        raise RuntimeError(f"enable_fast_train patched {n} ExpertsLoRA wrappers, expected {layers} "
                           f"(grouped-nf4-gemm missing or a stack ineligible): {dict(FAST_TRAIN_STATS)}")
    info = {"fast_train_patched": n, "fast_train_stats": json.loads(json.dumps(dict(FAST_TRAIN_STATS), default=str))}
    try:
        from experts4bit_qlora.engines.train_qkv_fuse import TRAIN_QKV_STATS
        info["train_qkv_stats"] = json.loads(json.dumps(dict(TRAIN_QKV_STATS), default=str))
    except Exception:  # noqa: BLE001
        pass
    if s["keep"] != "0":
        d = {k: v - keep0.get(k, 0) for k, v in MOE_KEEP_STATS.items() if isinstance(v, int)}
        info["moe_keep_stats"] = d
        # on CPU (--dry-cpu) keep_moe_activations skips the layers as "offloaded" (experts not on CUDA)
        seen = d.get("layers", 0) + (d.get("skipped_offloaded", 0) if dry else 0)
        if not seen:
            raise RuntimeError(f"keep={s['keep']}: no layer keeps its MoE activations ({MOE_KEEP_STATS})")
    try:
        from experts4bit_qlora.engines.chunked_lm_loss import _target
        info["chunked_lm_loss"] = _target(model).__dict__.get("_e4b_chunked_lm_loss") is not None
    except Exception:  # noqa: BLE001
        pass
    try:
        import nf4_route
        import torch
        info["train_gemm_route"] = str(nf4_route.train_gemm_route(torch.device("cuda")))
    except Exception as e:  # noqa: BLE001
        info["train_gemm_route"] = f"? ({type(e).__name__})"
    return info


def versions():
    from importlib import metadata
    v = {"python": platform.python_version()}
    for dist in ("experts4bit-qlora", "grouped-nf4-gemm", "torch", "triton", "transformers", "bitsandbytes"):
        try:
            v[dist] = metadata.version(dist)
        except Exception:  # noqa: BLE001
            v[dist] = None
    try:
        import experts4bit_qlora
        v["experts4bit_qlora_path"] = os.path.dirname(experts4bit_qlora.__file__)
    except Exception as e:  # noqa: BLE001
        v["experts4bit_qlora_path"] = f"not importable: {type(e).__name__}: {e}"
    return v


# ------------------------------------------------------------------------------------------ runs
def run(args, settings, model_type, g, result, rows, device):
    """One model per (ckpt, keep, kernel, attn4) group, in the order first asked for; each setting timed with
    peer_common's loop (the one unsloth_bench times with: same batches, same median, same peak) and
    masking-checked."""
    from mixtune.bench import packed_batch
    dry = device == "cpu"
    order = []
    for s in settings:
        if group_key(s) not in order:
            order.append(group_key(s))
    for key in order:
        group = [(i, s) for i, s in enumerate(settings) if group_key(s) == key]
        s0 = dict(group[0][1], kernel="reference") if dry else group[0][1]
        model = None
        try:
            model, info = build_model(model_type, g, args.layers, s0, device, args.seed)
            result["builds"][label(group[0][1])] = info
            for i, s in group:
                row = rows[i]
                row.update({k: info.get(k) for k in ("build_s", "trainable", "trainable_expected",
                                                     "mixtune_per_layer", "lora_dtypes", "resident_gib")})
                try:
                    if dry:
                        s = dict(s, mb=min(s["mb"], 2))
                        a = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1})
                        pc.time_setting(model, s, a, g, packed_batch, row, device="cpu", seq=min(args.seq, 128))
                        row["dry"] = f"mb {s['mb']} x {min(args.seq, 128)}, reference expert path"
                    else:
                        pc.time_setting(model, s, args, g, packed_batch, row, device=device)
                    if not args.no_mask_check:
                        row["masking"] = pc.masking_check(model, s, args, g, packed_batch, device=device,
                                                          seq=min(args.seq, 128) if dry else None)
                    log(f"[{label(s)}] mb {s['mb']}: " + (
                        f"{row['dry']}, loss {row['loss_first']:.4f}" if dry else
                        f"{row['tok_s']:,.0f} tok/s, peak {row['peak_gib']:.2f} GiB, step {row['step_s']:.3f} s")
                        + f", masking {(row.get('masking') or {}).get('verdict', 'not checked')}")
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                free_cuda()
            if dry and group[0][1]["kernel"] == "grouped":
                # up to the first fused kernel: grouped-nf4-gemm imports, every wrapper is eligible and patched
                fast = enable_grouped(model, group[0][1], args.layers, dry=True)
                result["builds"][label(group[0][1])].update(fast)
                for i, _ in group:
                    rows[i]["fast_train_patched"] = fast["fast_train_patched"]
                log(f"[dry] enable_fast_train(dgrad=True) patched {fast['fast_train_patched']} wrapper(s); fused "
                    "kernels not run on CPU")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            for i, _ in group:
                rows[i].setdefault("error", f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            del model
            free_cuda()


# ------------------------------------------------------------------------------------------ report
def print_table(rows, args, v):
    tag = f"e4b {v.get('experts4bit-qlora') or '?'} + gnf4 {v.get('grouped-nf4-gemm') or '?'}"

    def line(r, shape, mask):
        tr = f"{r['trainable']:,}" if r.get("trainable") else ""
        if r.get("error"):
            return (f"| {tag} | {args.layers} | {shape} | {r['label']} | FAILED: {r['error'][:160]} | | | | {tr} "
                    f"| {mask} |")
        if "dry" in r:
            return (f"| dry run (CPU): {r['dry']} | {args.layers} | {shape} | {r['label']} | (CPU) | | | | {tr} "
                    f"| {mask} |")
        return (f"| {tag} | {args.layers} | {shape} | {r['label']} | {r['tok_s']:,.0f} | {r['tflops4']:.1f} | "
                f"{r['peak_gib']:.2f} | {r.get('first_step_s', '')} | {tr} | {mask} |")
    pc.markdown_table(rows, args, "trainable", line)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="mixtral-8x7b", choices=GEOMETRY_NAMES,
                   help="model geometry (random weights): mixtral-8x7b (default) or qwen3-30b-a3b")
    pc.add_common_args(p, "mb=8", "'mb=8,accum=1,ckpt=0|1,keep=0|n|all,kernel=grouped|reference,attn4=1|0;...'",
                       "untimed steps first (the first compiles Triton kernels)")
    p.add_argument("--dry-cpu", action="store_true",
                   help="CPU check: tiny 1-layer model built by the same code, adapter count, one reference-path step "
                        "+ masking per setting, enable_fast_train patch count (no fused kernel runs)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = parse_settings(args.settings)
        if not settings:
            raise ValueError("--settings is empty")
        if args.steps < 1 or args.warmup < 0 or args.layers < 1:
            raise ValueError("--steps and --layers must be >= 1 and --warmup >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_cpu:
        args.layers = 1
    t0 = time.perf_counter()
    model_type, g = geometry(args.geometry, args.dry_cpu)
    result = {"layers": args.layers, "seq": args.seq, "geometry_name": args.geometry, "model_type": model_type,
              "geometry": g, "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "adapter_dtype": "fp32",
                                      "targets": "q/k/v/o + every expert (gate_up, down)"},
              "settings": settings, "builds": {}, "ok": False, "dry_cpu": args.dry_cpu,
              "env": {k: v for k, v in os.environ.items() if k.startswith(E4B_ENV_PREFIXES)}}
    rows = [dict(s, label=label(s)) for s in settings]
    exit_code = 1
    try:
        pc.check_geometry(args.geometry)  # the copy equals mixtune's GEOMETRIES; 4-layer adapter count as measured
        import torch
        device = "cpu" if args.dry_cpu else "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: this benchmark needs the GPU (use --dry-cpu for the CPU check)")
        v = result["versions"] = versions()
        v["torch_cuda"] = torch.version.cuda
        if device == "cuda":
            v["gpu"] = torch.cuda.get_device_name()
        log("[versions] " + json.dumps(v))
        if v.get("experts4bit-qlora") != E4B_VERSION:
            log(f"note: experts4bit-qlora {v.get('experts4bit-qlora')} (this runner was written for {E4B_VERSION})")
        exp = pc.expected_adapter_params(g, args.layers)
        log(f"== {args.layers} layers of {'a tiny version of ' if args.dry_cpu else ''}the {args.geometry} geometry "
            f"({model_type}); LoRA r={R} alpha={ALPHA} fp32: expected {exp['total']:,} trainable (mixtune's "
            f"per-expert w1/w3/w2 LoRA: {exp['mixtune_per_layer'] * args.layers:,})")
        run(args, settings, model_type, g, result, rows, device)
        exit_code = 0 if all(not r.get("error") for r in rows) else 1
    except Exception as e:  # noqa: BLE001
        exit_code = pc.fail_rows(result, rows, e)
    print_table(rows, args, result.get("versions", {}))
    return pc.emit_result(result, rows, exit_code, t0, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
