"""Unsloth, timed on the same workload as `mixtune bench`: a random checkpoint of the Mixtral-8x7B geometry
(default) or, with --geometry qwen3-30b-a3b, of the Qwen3-30B-A3B geometry (hidden 2048, 128 experts x 768,
top-8 renormalised, 32 / 4 heads of 128, vocab 151,936; transformers' Qwen3MoeForCausalLM), cut to
--layers layers, 4-bit (NF4) base weights, LoRA r=64 alpha=16 dropout 0 on q/k/v/o AND the MoE experts, packed
rows of 1024 tokens from `mixtune.bench.packed_batch` (per-example position ids restarting at 0, the first token
of each example unlabeled), forward + backward + fused AdamW, CUDA-synchronized.

Run from the repository root on the GPU machine, in one call that carries .whl/unsloth (Unsloth 2026.10.9 and
its dependencies, ~27 MB), .whl/site (bitsandbytes, peft) and .gpu/tok (tokenizer files):

    PYTHONPATH=src:.whl/unsloth:.whl/site PYTHONUNBUFFERED=1 python3 bench/unsloth_bench.py --layers 4 \
      --settings "mb=8,ckpt=0;mb=8,ckpt=1;mb=16,ckpt=0;mb=8,ckpt=0,flat=1" --steps 5 --warmup 2 \
      --tokenizer-dir .gpu/tok --workdir /tmp/ub --json-out $OUT/unsloth-bench.json 2>&1 | tee $OUT/unsloth-bench.log

Expected wall time ~5-8 min (checkpoint ~20 s, import ~20 s, per model load ~30-60 s, first step of each
model ~60 s of compilation, new shapes recompile). --time-budget (default 540 s) skips, and reports, settings
that would start too late for a 600 s call. The script sets HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE,
HF_DATASETS_OFFLINE, UNSLOTH_DISABLE_STATISTICS=1 and UNSLOTH_COMPILE_LOCATION=<workdir>/unsloth_compiled_cache
(Unsloth's default is ./unsloth_compiled_cache in the CWD) plus HF_HOME / TRITON_CACHE_DIR /
TORCHINDUCTOR_CACHE_DIR under <workdir> before importing anything; values already in the environment win.

The Qwen3-30B-A3B rows (the issue-13 anchors: 4 layers, micro-batch 8 and 16, no recomputation):

    PYTHONPATH=src:.whl/unsloth:/tmp/site PYTHONUNBUFFERED=1 python3 bench/unsloth_bench.py \
      --geometry qwen3-30b-a3b --layers 4 --settings "mb=8,ckpt=0;mb=16,ckpt=0" --workdir /tmp/ubq

.whl/unsloth (a flat site-packages tree, ~36 MiB; not committed): `pip install --no-deps --target .whl/unsloth
--python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
--platform manylinux_2_17_x86_64 --platform any --implementation cp` of unsloth==2026.10.9 unsloth_zoo==2026.10.9
trl==1.15.0 datasets==4.8.5 tyro docstring_parser shtab typeguard dill multiprocess cut_cross_entropy torchao
msgspec json5 nest_asyncio structlog pydantic pydantic_core diffusers, then trimmed to fit the 64 MiB carry:
no __pycache__/tests/RECORD/*.pyi, no studio/ bin/ unsloth_cli/, unsloth_zoo/mlx only __init__ + runtime (imported
on every platform), diffusers only its importable core (unused on the language-model path), torchao without its
_C*.so (optional, loaded by glob) and without the prototype packages nothing references, pydantic without v1/,
no hf_transfer (downloads only; the run is offline).

Tokenizer: the Mixtral tokenizer (32,000 pieces) is written into the Qwen3 checkpoint too. The batches are random
ids below the model's vocabulary, so the tokenizer only has to load: Unsloth's check_tokenizer refuses only
token ids >= the embedding's rows (32,000 < 151,936 passes), and the config's bos/eos are set to the tokenizer's
(1 / 2) so nothing disagrees; the dry run loads the same pair with plain transformers.

CPU check of everything but Unsloth (tiny 1-layer checkpoint written in a subprocess and reloaded, the same LoRA
through plain peft, the adapter-count check, timing loop and masking check of bench/peer_common.py on every
setting; the tiny Qwen3 keeps the real 151,936-entry vocabulary):

    PYTHONPATH=src:.whl/site python bench/unsloth_bench.py --dry-cpu --tokenizer-dir .gpu/tok
    PYTHONPATH=src:.whl/site python bench/unsloth_bench.py --dry-cpu --geometry qwen3-30b-a3b

What one run does, in order:
 1. writes the random bf16 checkpoint (transformers' MixtralForCausalLM / Qwen3MoeForCausalLM(config) on the
    GPU, init std 0.02, `save_pretrained` in the real HF layout, ~17 s and ~11 GB at 4 Mixtral layers, ~6 GB at 4
    Qwen3 layers) plus the tokenizer files into <workdir>/ckpt-L<layers> (Qwen3: ckpt-qwen3-30b-a3b-L<layers>),
    in a subprocess (so Unsloth is imported before transformers in this process, and the writer's GPU memory is
    gone); a complete checkpoint from an earlier run with the same geometry is reused; its config.json is read
    back through mixtune's MoEConfig and compared with the geometry;
 2. per checkpointing mode (settings that share one reuse the model): `FastLanguageModel.from_pretrained(dir,
    load_in_4bit=True)` (bitsandbytes NF4 with double quantization for q/k/v/o; Unsloth's own patch quantizes the
    fused 3-D expert parameters `mlp.experts.gate_up_proj` / `down_proj` to bnb Params4bit too), asserts that
    every attention projection and every expert tensor really is 4-bit (Unsloth silently falls back to 16-bit
    when bitsandbytes' CUDA library does not load), then `get_peft_model(r=64, lora_alpha=16, lora_dropout=0,
    target_modules=q/k/v/o, target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj],
    use_gradient_checkpointing=False | "unsloth")` and asserts the adapter parameter count (every layer's
    experts adapted; at 4 layers 111,673,344 for Mixtral, 214,171,648 for Qwen3);
 3. per setting: bench/peer_common.py's timing loop (described there): `steps` timed optimizer steps after
    `warmup` (the first one compiles, ~60 s; reported as first_step_s), plain loop, no trl Trainer, fused AdamW;
    tokens/s = mb*seq*accum / median step time, peak GiB = torch.cuda.max_memory_allocated;
 4. peer_common's masking check on the same shapes (no extra compile): final-norm hidden states outside each
    row's first example, with that example's tokens replaced; equal = document-masked, and plain causal
    positions give the size of a leak;
 5. a markdown table and one JSON line last. Exit code 1 if any setting failed (each failure prints its
    traceback; later settings still run), 2 on a usage error.

Settings with flat=1 run after all others (they wrap transformers' global "sdpa" entry; a varlen-kernel
fault must not take the other rows with it), so a checkpointing mode that has one is loaded last.

--settings: 'mb=8,ckpt=0;...' with keys mb (micro-batch rows of --seq tokens), accum (micro-batches per
optimizer step, default 1), ckpt (0: no checkpointing; 1: Unsloth's offloaded checkpointing,
use_gradient_checkpointing="unsloth"; hf: plain use_gradient_checkpointing=True), flat (1: the same tokens as
ONE row of mb*seq tokens plus `packed_seq_lengths`, the padding-free layout Unsloth's TRL integration produces;
this routes attention through Unsloth's varlen (flash) kernel instead of sdpa over a dense block-diagonal mask).

Masking (checked on CPU with the same Unsloth/transformers code): transformers 5.17 turns position ids that
restart inside a row into a block-diagonal causal mask (masking_utils.find_packed_sequence_indices) when no
attention_mask and no KV cache are passed, so Unsloth trains packed rows with per-example attention; the check
in step 4 verifies this on the GPU run and the table's `masking` column reports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

# bench/peer_common.py (geometries, checkpoint writer, batches, timing loop, masking check, table frame), shared with
# bench/experts4bit_bench.py; bench/ is not a package, so it is loaded by path, under the name that runner uses too.
if "_bench_peer_common" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "_bench_peer_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_common.py"))
    sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_spec.name])
from _bench_peer_common import (ALPHA, ATTN_TARGETS, EXPERT_TARGETS, GEOMETRIES, R, add_common_args,  # noqa: E402
                                check_adapters, check_geometry, check_written_config, checkpoint_complete,
                                checkpoint_spec, emit_result, fail_rows, free_cuda, hf_model_class, log, make_batches,
                                markdown_table, masking_check, settings_parts, sync, time_setting, write_checkpoint)


# ------------------------------------------------------------------------------------------ settings
def parse_settings(spec: str):
    out = []
    for part, pairs in settings_parts(spec):
        d = {"mb": 8, "accum": 1, "ckpt": "0", "flat": 0}
        for key, val in pairs:
            if key not in d:
                raise ValueError(f"--settings: unknown key {key!r} in {part!r} (mb, accum, ckpt, flat)")
            d[key] = val if key == "ckpt" else int(val)
        if d["ckpt"] not in ("0", "1", "hf"):
            raise ValueError(f"--settings: ckpt must be 0, 1 (Unsloth offloaded) or hf, got {d['ckpt']!r}")
        if d["mb"] < 1 or d["accum"] < 1:
            raise ValueError(f"--settings: mb and accum must be >= 1 in {part!r}")
        out.append(d)
    return out


def gc_mode(ckpt: str):
    return {"0": False, "1": "unsloth", "hf": True}[ckpt]


def label(s) -> str:
    ck = {"0": "none", "1": "unsloth (offloaded)", "hf": "hf (plain)"}[s["ckpt"]]
    return f"ckpt={ck}" + (", flat 1x(mb*seq)+varlen" if s["flat"] else ", rows+position_ids")


# ------------------------------------------------------------------------------------------ checkpoint
def ensure_checkpoint(args, g: dict, layers: int, device: str) -> tuple[str, dict]:
    prefix = "ckpt-" if args.geometry == "mixtral-8x7b" else f"ckpt-{args.geometry}-"
    path = os.path.join(args.workdir, f"{prefix}L{layers}" + ("-tiny" if args.dry_cpu else ""))
    spec = checkpoint_spec(g, layers, args.seed)
    if checkpoint_complete(path, spec) and not args.rewrite:
        return path, {"reused": True}
    need = (layers * 3 * 2 * g["num_local_experts"] * g["hidden_size"] * g["intermediate_size"]
            + 2 * 2 * g["vocab_size"] * g["hidden_size"]) * 1.15
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        raise RuntimeError(f"{args.workdir}: {free / 2**30:.1f} GiB free, the checkpoint needs ~{need / 2**30:.1f}")
    cmd = [sys.executable, os.path.abspath(__file__), "--_write-checkpoint", path, "--layers", str(layers),
           "--seed", str(args.seed), "--tokenizer-dir", args.tokenizer_dir, "--_device", device,
           "--geometry", args.geometry]
    if args.dry_cpu:
        cmd.append("--dry-cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = proc.stdout.strip().splitlines()
    if proc.returncode != 0:
        log(proc.stdout[-6000:])
        raise RuntimeError(f"checkpoint writer failed (exit {proc.returncode})")
    info = json.loads(next(line for line in reversed(tail) if line.startswith('{"params"')))
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    return path, info


# ------------------------------------------------------------------------------------------ unsloth
def quant_report(model):
    """Counts of 4-bit attention projections and expert tensors on the loaded (pre-LoRA) model."""
    att_4, att_all, exp_4, exp_all, other = 0, 0, 0, 0, {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ATTN_TARGETS:
            att_all += 1
            att_4 += type(mod).__name__ == "Linear4bit"
        if leaf == "experts":
            for pn in ("gate_up_proj", "down_proj"):
                p = getattr(mod, pn, None)
                if p is None:
                    continue
                exp_all += 1
                is4 = type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None
                exp_4 += is4
                if not is4:
                    other[f"{pn}"] = f"{type(p).__name__} {getattr(p, 'dtype', None)}"
    return {"attention_4bit": att_4, "attention_total": att_all, "experts_4bit": exp_4, "experts_total": exp_all,
            "non_4bit_examples": other}


def moe_info():
    info = {}
    try:
        from unsloth_zoo.temporary_patches.moe_utils import select_moe_backend
        info["moe_backend"] = select_moe_backend()
    except Exception as e:  # noqa: BLE001
        info["moe_backend"] = f"? ({type(e).__name__}: {e})"
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith(("UNSLOTH_MOE", "PYTORCH_ALLOC_CONF",
                                                                      "PYTORCH_CUDA_ALLOC_CONF"))}
    return info


def enable_varlen(s, row):
    """time_setting's prepare hook: flat settings get Unsloth's varlen attention (not in the dry run: no Unsloth)."""
    if s["flat"] and "unsloth" in sys.modules:
        from unsloth.utils.hf_packed_attention import enable_hf_packed_attention
        row["varlen_enabled"] = bool(enable_hf_packed_attention())


def packed_attention_stats():
    try:
        from unsloth.utils.hf_packed_attention import HF_PACKED_ATTENTION_STATS
        return dict(HF_PACKED_ATTENTION_STATS)
    except Exception:  # noqa: BLE001
        return {}


def load_unsloth(ckpt_dir, mode, args, g, layers, max_seq_length):
    """FastLanguageModel in 4-bit + LoRA on attention and experts. Returns (model, info)."""
    import torch
    from unsloth import FastLanguageModel

    info = {}
    t0 = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(
        model_name=ckpt_dir, max_seq_length=max_seq_length, dtype=None, load_in_4bit=not args.load_in_16bit,
        local_files_only=True, random_state=args.seed)
    sync()
    info["load_s"] = round(time.perf_counter() - t0, 1)
    q = quant_report(model)
    info["quant"] = q
    log(f"[load] {info['load_s']} s; 4-bit attention {q['attention_4bit']}/{q['attention_total']}, experts "
        f"{q['experts_4bit']}/{q['experts_total']} {q['non_4bit_examples'] or ''}; "
        f"GPU {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    if q["attention_total"] != 4 * layers or q["experts_total"] != 2 * layers:
        raise RuntimeError(f"unexpected module tree after load: {q}")
    if not args.load_in_16bit and (q["attention_4bit"] != q["attention_total"] or q["experts_4bit"] != q["experts_total"]):
        raise RuntimeError(f"Unsloth did not load the base in 4-bit (bitsandbytes' CUDA library not usable?): {q}")
    t0 = time.perf_counter()
    model = FastLanguageModel.get_peft_model(
        model, r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", target_modules=list(ATTN_TARGETS),
        target_parameters=list(EXPERT_TARGETS), use_gradient_checkpointing=mode, random_state=args.seed)
    sync()
    info["peft_s"] = round(time.perf_counter() - t0, 1)
    info.update(check_adapters(model, g, layers, f"[peft] {info['peft_s']} s; "))
    info["peft_config"] = {k: str(v) for k, v in model.peft_config["default"].to_dict().items()
                           if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters")}
    model.train()
    return model, info


def run_unsloth(args, settings, g, ckpt_dir, result, rows):
    import torch
    t_imp = time.perf_counter()
    import unsloth  # noqa: F401  (before transformers / peft / trl)
    from unsloth import FastLanguageModel  # noqa: F401
    result["unsloth_import_s"] = round(time.perf_counter() - t_imp, 1)
    from mixtune.bench import packed_batch
    v = result["versions"]
    for mod in ("unsloth", "unsloth_zoo", "transformers", "peft", "bitsandbytes", "trl", "triton", "torchao",
                "datasets"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            v[mod] = f"? {type(e).__name__}"
    v["gpu"] = torch.cuda.get_device_name()
    v["cuda"] = torch.version.cuda
    v["torch"] = torch.__version__
    log("[versions] " + json.dumps(v))
    max_seq = max(args.seq * (s["mb"] if s["flat"] else 1) for s in settings)
    order = []
    for s in settings:  # one model per checkpointing mode, in the order first asked for ...
        if s["ckpt"] not in order:
            order.append(s["ckpt"])
    # ... except that flat settings run last (they wrap transformers' global sdpa entry, and a fault in a
    # varlen kernel must not take the other rows with it): groups with one go after those without.
    order.sort(key=lambda ck: any(s["flat"] for s in settings if s["ckpt"] == ck))
    t_start = time.perf_counter()
    for ck in order:
        group = sorted(((i, s) for i, s in enumerate(settings) if s["ckpt"] == ck), key=lambda t: t[1]["flat"])
        model = None
        try:
            elapsed = time.perf_counter() - result["_t0"]
            if args.time_budget and elapsed > args.time_budget - 150:
                raise TimeoutError(f"skipped: {elapsed:.0f} s spent of --time-budget {args.time_budget} s")
            log(f"\n== Unsloth, use_gradient_checkpointing={gc_mode(ck)!r}: load + LoRA")
            model, info = load_unsloth(ckpt_dir, gc_mode(ck), args, g, args.layers, max_seq)
            info.update(moe_info())
            log(f"[moe] backend {info['moe_backend']} env {info['env']}")
            result["loads"][ck] = info
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            for i, s in group:
                rows[i]["error"] = f"load: {type(e).__name__}: {str(e)[:300]}"
            model = None
            free_cuda()
            continue
        for i, s in group:
            row = rows[i]
            row["load_s"] = info["load_s"]
            row["moe_backend"] = info["moe_backend"]
            try:
                elapsed = time.perf_counter() - result["_t0"]
                if args.time_budget and elapsed > args.time_budget - 60:
                    raise TimeoutError(f"skipped: {elapsed:.0f} s spent of --time-budget {args.time_budget} s")
                log(f"-- setting {i}: mb={s['mb']} accum={s['accum']} {label(s)}")
                time_setting(model, s, args, g, packed_batch, row, prepare=enable_varlen,
                             attention_stats=packed_attention_stats)
                log(f"  {row['tok_s']:,.0f} tok/s, step {row['step_s'] * 1e3:.1f} ms, peak {row['peak_gib']:.2f} GiB, "
                    f"loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}"
                    + (f", varlen calls {row.get('packed_attention_calls')}" if s["flat"] else ""))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            free_cuda()
            if not args.no_mask_check and "error" not in row:
                try:
                    row["masking"] = masking_check(model, s, args, g, packed_batch)
                    log(f"  masking check: {row['masking']}")
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    row["masking"] = {"verdict": f"check failed: {type(e).__name__}: {str(e)[:200]}"}
                free_cuda()
        model = None
        free_cuda()
        log(f"[free] GPU memory still allocated after freeing the model: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    result["unsloth_s"] = round(time.perf_counter() - t_start, 1)


# ------------------------------------------------------------------------------------------ dry run (CPU)
def dry_cpu(args, settings, g, ckpt_dir, result, rows):
    """Everything but Unsloth, on CPU: reload the tiny checkpoint (transformers + its tokenizer), put the same
    LoRA on it with plain peft (target_modules q/k/v/o + target_parameters on the fused experts) and run the
    GPU run's adapter check, timing loop (2 steps of mb<=2 x 128) and masking check for every setting."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    import peft
    from mixtune.bench import packed_batch
    model_type = GEOMETRIES[args.geometry][0]
    cfg = AutoConfig.from_pretrained(ckpt_dir)
    assert cfg.model_type == model_type, (cfg.model_type, model_type)
    assert cfg.num_hidden_layers == args.layers and cfg.hidden_size == g["hidden_size"], cfg
    assert cfg.vocab_size == g["vocab_size"], (cfg.vocab_size, g["vocab_size"])
    tok = AutoTokenizer.from_pretrained(ckpt_dir)
    # The checkpoint's embedding may be larger than the tokenizer (Qwen3: 151,936 rows, the Mixtral tokenizer's
    # 32,000 pieces): loaders accept that (Unsloth's check_tokenizer only refuses ids >= the embedding rows).
    if len(tok) > cfg.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, more than the model's {cfg.vocab_size} embeddings")
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32)
    model_class = type(model).__name__
    if model_class != hf_model_class(model_type)[1].__name__:
        raise RuntimeError(f"{ckpt_dir} loaded as {model_class}, expected {model_type}")
    rows_emb = model.get_input_embeddings().weight.shape[0]
    if rows_emb != g["vocab_size"]:
        raise RuntimeError(f"embedding has {rows_emb} rows, geometry vocab {g['vocab_size']}")
    experts = model.model.layers[0].mlp.experts
    E, I, H = g["num_local_experts"], g["intermediate_size"], g["hidden_size"]
    if tuple(experts.gate_up_proj.shape) != (E, 2 * I, H) or tuple(experts.down_proj.shape) != (E, H, I):
        raise RuntimeError(f"fused experts {tuple(experts.gate_up_proj.shape)} / {tuple(experts.down_proj.shape)}, "
                           f"expected ({E}, {2 * I}, {H}) / ({E}, {H}, {I})")
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=list(ATTN_TARGETS),
                                                       target_parameters=list(EXPERT_TARGETS)))
    result["dry"] = {"tokenizer": type(tok).__name__, "encode_hello": tok("hello")["input_ids"],
                     "tokenizer_len": len(tok), "model_class": model_class, "embedding_rows": rows_emb,
                     "peft": peft.__version__, **check_adapters(model, g, args.layers, "[dry peft] ")}
    model.train()
    seq = min(args.seq, 128)
    with torch.no_grad():  # the flat layout is the same loss as the rows layout
        b_rows = make_batches({"mb": 2, "accum": 1, "flat": 0}, seq, g["vocab_size"], "cpu", args.seed, packed_batch)[0]
        b_flat = make_batches({"mb": 2, "accum": 1, "flat": 1}, seq, g["vocab_size"], "cpu", args.seed, packed_batch)[0]
        l_rows = float(model(input_ids=b_rows[0], position_ids=b_rows[2], labels=b_rows[1], use_cache=False).loss)
        l_flat = float(model(input_ids=b_flat[0], position_ids=b_flat[2], labels=b_flat[1], use_cache=False).loss)
    result["dry"]["loss_rows_vs_flat"] = [l_rows, l_flat]
    log(f"[dry] loss, rows layout {l_rows:.6f} vs flat layout {l_flat:.6f}")
    if abs(l_rows - l_flat) > 1e-5:
        raise RuntimeError(f"flat layout changes the loss: {l_rows} vs {l_flat}")
    for i, s in enumerate(settings):
        s = dict(s, mb=min(s["mb"], 2))
        row = rows[i]
        a = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1})
        time_setting(model, s, a, g, packed_batch, row, device="cpu", seq=seq, prepare=enable_varlen,
                     attention_stats=packed_attention_stats)
        row["masking"] = masking_check(model, s, args, g, packed_batch, device="cpu", seq=seq)
        row["dry"] = f"mb {s['mb']} x {seq}"
        log(f"[dry] setting {i} ({label(s)}): {row['dry']}, loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}, "
            f"masking {row['masking']}")


# ------------------------------------------------------------------------------------------ report
def print_table(rows, args):
    def line(r, shape, mask):
        if "dry" in r:
            return (f"| dry run: HF + peft on CPU, {r['dry']} | {args.layers} | {shape} | {r['label']} | (CPU) | | | | "
                    f"| {mask} |")
        if r.get("error"):
            return (f"| unsloth {r.get('unsloth', '')} | {args.layers} | {shape} | {r['label']} | FAILED: {r['error']} "
                    f"| | | | | {mask} |")
        return (f"| unsloth {r.get('unsloth', '')} | {args.layers} | {shape} | {r['label']}, "
                f"{r.get('moe_backend', '')} | {r['tok_s']:,.0f} | {r['tflops4']:.1f} | {r['peak_gib']:.2f} | "
                f"{r.get('first_step_s', '')} | {r.get('load_s', '')} | {mask} |")
    markdown_table(rows, args, "load s", line)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="mixtral-8x7b", choices=sorted(GEOMETRIES),
                   help="model geometry (random weights): mixtral-8x7b (MixtralForCausalLM, default) or "
                        "qwen3-30b-a3b (Qwen3MoeForCausalLM)")
    add_common_args(p, "mb=8,ckpt=0;mb=8,ckpt=1;mb=16,ckpt=0",
                    "'mb=8,accum=1,ckpt=0|1|hf,flat=0|1;...' (ckpt=1: Unsloth's offloaded checkpointing)",
                    "untimed steps first (the first compiles, ~60 s)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "unsloth_bench"),
                   help="checkpoint + compile cache go here (4 layers: ~11 GB Mixtral, ~6 GB Qwen3)")
    p.add_argument("--tokenizer-dir", default="",
                   help="HF tokenizer files to copy into the checkpoint (e.g. .gpu/tok); default: generate them "
                        "with mixtune.data.tokenizer.load_tokenizer('') (needs mistral-common)")
    p.add_argument("--rewrite", action="store_true", help="rewrite the checkpoint even if a complete one exists")
    p.add_argument("--load-in-16bit", action="store_true", help="bf16 base instead of 4-bit (not the benchmark)")
    p.add_argument("--time-budget", type=int, default=540,
                   help="seconds: settings that would start past this (minus a margin) are skipped and reported; "
                        "0 = no limit (default 540, for a 600 s call)")
    p.add_argument("--dry-cpu", action="store_true",
                   help="CPU check without Unsloth: tiny 1-layer checkpoint written + reloaded, batches built")
    p.add_argument("--_write-checkpoint", dest="write_checkpoint", default="", help=argparse.SUPPRESS)
    p.add_argument("--_device", dest="device", default="cuda", help=argparse.SUPPRESS)
    return p


def setup_env(workdir):
    """Offline, no statistics, compile cache out of the CWD; before any HF / Unsloth import. Set values win."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                 ("UNSLOTH_DISABLE_STATISTICS", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                 ("TOKENIZERS_PARALLELISM", "false"),
                 ("UNSLOTH_COMPILE_LOCATION", os.path.join(workdir, "unsloth_compiled_cache")),
                 ("HF_HOME", os.path.join(workdir, "hf_home")), ("TRITON_CACHE_DIR", os.path.join(workdir, "triton")),
                 ("TORCHINDUCTOR_CACHE_DIR", os.path.join(workdir, "inductor"))):
        os.environ.setdefault(k, v)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model_type, full_g, tiny_g = GEOMETRIES[args.geometry]
    if args.write_checkpoint:  # subprocess mode: write the checkpoint, print one JSON line
        g = dict(tiny_g if args.dry_cpu else full_g)
        info = write_checkpoint(args.write_checkpoint, g, args.layers, args.seed, args.tokenizer_dir, args.device,
                                model_type)
        print(json.dumps(info), flush=True)
        return 0
    try:
        settings = parse_settings(args.settings)
        if not settings:
            raise ValueError("--settings is empty")
        if args.steps < 1 or args.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_cpu:
        args.layers = 1
    os.makedirs(args.workdir, exist_ok=True)
    setup_env(args.workdir)
    t0 = time.perf_counter()
    g = dict(tiny_g if args.dry_cpu else full_g)
    result = {"_t0": t0, "versions": {"python": platform.python_version()}, "layers": args.layers, "seq": args.seq,
              "geometry_name": args.geometry, "model_type": model_type, "geometry": g,
              "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": ATTN_TARGETS,
                                      "target_parameters": EXPERT_TARGETS},
              "settings": settings, "loads": {}, "ok": False,
              "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                      "UNSLOTH_DISABLE_STATISTICS", "UNSLOTH_COMPILE_LOCATION")}}
    rows = [dict(s, label=label(s)) for s in settings]
    exit_code = 1
    try:
        check_geometry(args.geometry)
        import torch
        if not args.dry_cpu and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: this benchmark needs the GPU (use --dry-cpu for the CPU check)")
        if not args.tokenizer_dir:
            args.tokenizer_dir = os.path.join(args.workdir, "tokenizer")
            from mixtune.data.tokenizer import load_tokenizer
            load_tokenizer("").save_pretrained(args.tokenizer_dir)
        args.tokenizer_dir = os.path.abspath(args.tokenizer_dir)
        if not os.path.isfile(os.path.join(args.tokenizer_dir, "tokenizer_config.json")):
            raise FileNotFoundError(f"--tokenizer-dir {args.tokenizer_dir}: no tokenizer_config.json")
        device = "cpu" if args.dry_cpu else "cuda"
        log(f"== checkpoint: {args.layers} layers of {'a tiny version of ' if args.dry_cpu else ''}the "
            f"{args.geometry} geometry ({model_type}) in {args.workdir}")
        ckpt_dir, info = ensure_checkpoint(args, g, args.layers, device)
        result["checkpoint"] = dict(info, path=ckpt_dir)
        check_written_config(ckpt_dir, g, args.layers, model_type)
        log(f"[checkpoint] {ckpt_dir}: {json.dumps(info)}")
        if args.dry_cpu:
            dry_cpu(args, settings, g, ckpt_dir, result, rows)
            exit_code = 0
        else:
            run_unsloth(args, settings, g, ckpt_dir, result, rows)
            exit_code = 0 if all(not r.get("error") for r in rows) else 1
    except Exception as e:  # noqa: BLE001
        exit_code = fail_rows(result, rows, e)
    for r in rows:
        r["unsloth"] = result["versions"].get("unsloth", "")
    print_table(rows, args)
    result.pop("_t0", None)
    return emit_result(result, rows, exit_code, t0, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
