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
through plain peft, this script's adapter-count check, timing loop and masking check on every setting; the tiny
Qwen3 keeps the real 151,936-entry vocabulary):

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
 3. per setting: `steps` timed optimizer steps after `warmup` (the first one compiles, ~60 s; reported as
    first_step_s), plain loop, no trl Trainer: model(input_ids, position_ids, labels, use_cache=False),
    loss/accum backward, torch.optim.AdamW(fused=True) step; tokens/s = mb*seq*accum / median step time, peak
    GiB = torch.cuda.max_memory_allocated;
 4. a masking check on the same shapes (no extra compile): the hidden states after the final norm of every
    token outside each row's first example, with that first example replaced by other random tokens; equal
    (to bf16 noise) = document-masked attention, different = attention crosses examples. The same with plain
    causal positions is printed as the reference of how large a leak looks;
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
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

# The benchmarked geometries, in mixtune's field names (num_local_experts = expert count, intermediate_size = one
# expert's width), the same as mixtune.model.config.GEOMETRIES[name] (checked against it when importable).
# Keys other than these are HF config keys of the family passed as they are (head_dim, norm_topk_prob).
# Mixtral-8x7B: transformers' MixtralForCausalLM.
GEOMETRY = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                rope_theta=1e6, rms_norm_eps=1e-5)
TINY = dict(GEOMETRY, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4)
# Qwen3-30B-A3B: transformers' Qwen3MoeForCausalLM, every layer MoE (decoder_sparse_step 1, no mlp_only_layers),
# head_dim 128 independent of hidden/heads, renormalised top-8 of 128 experts, 151,936-entry vocabulary.
QWEN3_GEOMETRY = dict(vocab_size=151936, hidden_size=2048, intermediate_size=768, num_attention_heads=32,
                      num_key_value_heads=4, head_dim=128, num_local_experts=128, num_experts_per_tok=8,
                      norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)
# Tiny Qwen3: head_dim 32 with hidden 64 (4 heads x 32 != 64, as in the real model), the REAL vocabulary (so the
# dry run loads a 151,936-row embedding next to the 32,000-piece tokenizer, as the GPU run does).
QWEN3_TINY = dict(QWEN3_GEOMETRY, hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, num_local_experts=8, num_experts_per_tok=4)
GEOMETRIES = {"mixtral-8x7b": ("mixtral", GEOMETRY, TINY), "qwen3-30b-a3b": ("qwen3_moe", QWEN3_GEOMETRY, QWEN3_TINY)}
# peft LoRA parameters at 4 layers (asserted before anything is timed; see expected_adapter_params)
EXPECTED_ADAPTERS_4L = {"mixtral-8x7b": 111_673_344, "qwen3-30b-a3b": 214_171_648}
R, ALPHA = 64, 16
ATTN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MARKER = "unsloth_bench_checkpoint.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------ settings
def parse_settings(spec: str):
    out = []
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        d = {"mb": 8, "accum": 1, "ckpt": "0", "flat": 0}
        for kv in filter(None, (x.strip() for x in part.split(","))):
            key, _, val = kv.partition("=")
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


def expected_adapter_params(g: dict, layers: int, r: int = R) -> dict:
    """peft LoRA parameter counts. Attention: A (r, in) + B (out, r). Experts through peft target_parameters on
    the fused 3-D parameters: rank r per expert, A (r*E, in) + B (out, r*E); gate_up is one fused projection, so
    its A is shared by gate and up (mixtune/per-expert w1,w3 LoRA have one A each: 30.0 M/layer vs 27.9 M)."""
    H, I, E = g["hidden_size"], g["intermediate_size"], g["num_local_experts"]
    d = g.get("head_dim") or H // g["num_attention_heads"]
    q, kv = g["num_attention_heads"] * d, g["num_key_value_heads"] * d
    attn = r * (H + q) + 2 * r * (H + kv) + r * (q + H)
    experts = r * E * (H + 2 * I) + r * E * (I + H)
    per_w = r * E * (H + I)  # one of w1/w3/w2 adapted separately per expert (mixtune's layout)
    return {"attention_per_layer": attn, "experts_per_layer": experts, "per_layer": attn + experts,
            "total": layers * (attn + experts), "mixtune_per_layer": attn + 3 * per_w}


def active_params(g: dict, layers: int) -> int:
    H, I = g["hidden_size"], g["intermediate_size"]
    d = g.get("head_dim") or H // g["num_attention_heads"]
    attn = 2 * H * g["num_attention_heads"] * d + 2 * H * g["num_key_value_heads"] * d
    return layers * (attn + g["num_experts_per_tok"] * 3 * H * I) + g["vocab_size"] * H


# ------------------------------------------------------------------------------------------ checkpoint
def checkpoint_spec(g: dict, layers: int, seed: int) -> dict:
    return {"geometry": g, "layers": layers, "seed": seed, "init_std": 0.02, "dtype": "bfloat16"}


def checkpoint_complete(path: str, spec: dict) -> bool:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f) == spec and os.path.isfile(os.path.join(path, "config.json"))
    except (OSError, ValueError):
        return False


def hf_model_class(model_type: str):
    """(config class, causal-LM class) of transformers for the family."""
    if model_type == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        return Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralConfig, MixtralForCausalLM


def hf_config(model_type: str, g: dict, layers: int):
    """transformers' config of the family for geometry g (mixtune's field names translated to the family's).
    bos/eos are the tokenizer's (1 / 2: the Mixtral tokenizer is written beside every checkpoint; token ids are
    random in this benchmark, so the geometry's own special ids do not matter)."""
    config_cls, _ = hf_model_class(model_type)
    common = dict(num_hidden_layers=layers, initializer_range=0.02, use_cache=False, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None, output_router_logits=False)
    if model_type == "qwen3_moe":
        k = {key: v for key, v in g.items() if key not in ("intermediate_size", "num_local_experts")}
        # intermediate_size is the dense MLP's width in Qwen files: unused when every layer is MoE; the real 6144
        return config_cls(**common, **k, moe_intermediate_size=g["intermediate_size"],
                          num_experts=g["num_local_experts"], intermediate_size=6144, decoder_sparse_step=1,
                          mlp_only_layers=[], use_sliding_window=False, attention_bias=False)
    return config_cls(**common, sliding_window=None, **g)


def write_checkpoint(path: str, g: dict, layers: int, seed: int, tokenizer_dir: str, device: str,
                     model_type: str = "mixtral") -> dict:
    """Random <Family>ForCausalLM(config) (init std 0.02) in bf16, save_pretrained in the real HF layout, tokenizer
    files beside it. Runs in its own process (see main)."""
    import torch
    import transformers

    t0 = time.perf_counter()
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    cfg = hf_config(model_type, g, layers)
    _, model_cls = hf_model_class(model_type)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(cfg, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    w = model.model.layers[0].mlp.experts.gate_up_proj
    std = float(w[0, :1024, :1024].float().std())
    if not 0.015 < std < 0.025:
        raise RuntimeError(f"random init: expert weight std {std:.4f}, expected ~0.02")
    t_build = time.perf_counter() - t0
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    n_tok = 0
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(path, name))
            n_tok += 1
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise RuntimeError(f"--tokenizer-dir {tokenizer_dir}: no tokenizer_config.json (need HF tokenizer files)")
    # The real layout: per-expert w1/w2/w3 under block_sparse_moe (Mixtral), per-expert gate_proj/up_proj/down_proj
    # under mlp.experts (Qwen3-MoE); transformers 5 converts its fused in-memory experts on save.
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            keys = list(json.load(f)["weight_map"])
    else:
        from safetensors import safe_open
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            keys = list(f.keys())
    expert_key = {"qwen3_moe": "mlp.experts.0.gate_proj.weight"}.get(model_type, "block_sparse_moe.experts.0.w1.weight")
    if not any(expert_key in k for k in keys):
        raise RuntimeError(f"saved checkpoint is not in the real {model_type} layout ({expert_key}): {keys[:8]}")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    info = {"params": n_params, "bytes": size, "build_s": round(t_build, 1),
            "total_s": round(time.perf_counter() - t0, 1), "tokenizer_files": n_tok, "n_keys": len(keys),
            "transformers": transformers.__version__, "expert_std": round(std, 5)}
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(checkpoint_spec(g, layers, seed), f)
    info["model_type"] = model_type
    return info


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


# ------------------------------------------------------------------------------------------ batches
def make_batches(s, seq, vocab, device, seed, packed_batch):
    """[(input_ids, labels, position_ids, packed_seq_lengths or None)] for one optimizer step. flat: the same
    rows concatenated into one row (each row starts a new example, whose first label is -100, so the loss terms
    are the same as the (mb, seq) layout) with the example lengths for Unsloth's varlen path."""
    import torch
    out = []
    for i in range(s["accum"]):
        ids, lab, pos = packed_batch(s["mb"], seq, vocab, device, seed + i)
        if s["flat"]:
            starts = (pos.reshape(-1) == 0).nonzero().flatten().tolist() + [pos.numel()]
            lengths = torch.tensor([b - a for a, b in zip(starts, starts[1:])], dtype=torch.int32)
            out.append((ids.reshape(1, -1), lab.reshape(1, -1), pos.reshape(1, -1), lengths))
        else:
            out.append((ids, lab, pos, None))
    return out


def first_example_replaced(ids, pos, vocab, seed):
    """A copy of ids whose first example of every row (positions before the second 0 in position_ids) is other
    random tokens, and a mask of the tokens outside those first examples."""
    import torch
    g = torch.Generator().manual_seed(seed + 999)
    ids2, keep = ids.clone(), torch.ones_like(ids, dtype=torch.bool)
    p = pos.cpu()
    for b in range(ids.shape[0]):
        zeros = (p[b] == 0).nonzero().flatten().tolist()
        end = zeros[1] if len(zeros) > 1 else ids.shape[1]
        ids2[b, :end] = torch.randint(3, vocab, (end,), generator=g).to(ids.device)
        keep[b, :end] = False
    return ids2, keep


# ------------------------------------------------------------------------------------------ unsloth
def _sync(device="cuda"):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


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


def adapter_report(model, layers):
    per_layer = {}
    total = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        total += p.numel()
        if "lora_" not in name:
            per_layer.setdefault("non_lora", 0)
            per_layer["non_lora"] += p.numel()
            continue
        li = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "?"
        kind = "experts" if ".experts." in name else ("attention" if "self_attn" in name else "other")
        key = f"{li}:{kind}"
        per_layer[key] = per_layer.get(key, 0) + p.numel()
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    return total, per_layer, dtypes


def check_adapters(model, g, layers, prefix=""):
    """The trainable parameters are exactly the requested LoRA: every layer's attention and experts adapted."""
    total, per_layer, dtypes = adapter_report(model, layers)
    exp = expected_adapter_params(g, layers)
    log(f"{prefix}trainable {total:,} (expected {exp['total']:,} = {layers} x ({exp['attention_per_layer']:,} "
        f"attention + {exp['experts_per_layer']:,} experts); mixtune's per-expert w1/w3/w2 LoRA: "
        f"{exp['mixtune_per_layer']:,} per layer); LoRA dtypes {dtypes}")
    missing = [li for li in range(layers) if not per_layer.get(f"{li}:experts")]
    bad = [li for li in range(layers) if per_layer.get(f"{li}:experts") != exp["experts_per_layer"]
           or per_layer.get(f"{li}:attention") != exp["attention_per_layer"]]
    if missing or bad or total != exp["total"]:
        raise RuntimeError(f"adapters not as requested: layers without expert LoRA {missing}, layers with other "
                           f"counts {bad}; per layer {per_layer}")
    return {"trainable": total, "trainable_expected": exp["total"], "trainable_per_layer": exp["per_layer"],
            "mixtune_per_layer": exp["mixtune_per_layer"], "lora_dtypes": dtypes}


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
    _sync()
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
    _sync()
    info["peft_s"] = round(time.perf_counter() - t0, 1)
    info.update(check_adapters(model, g, layers, f"[peft] {info['peft_s']} s; "))
    info["peft_config"] = {k: str(v) for k, v in model.peft_config["default"].to_dict().items()
                           if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters")}
    model.train()
    return model, info


def time_setting(model, s, args, g, packed_batch, row, device="cuda", seq=None):
    import torch
    seq = seq or args.seq
    cuda = device == "cuda"
    batches = make_batches(s, seq, g["vocab_size"], device, args.seed, packed_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    if s["flat"] and "unsloth" in sys.modules:
        from unsloth.utils.hf_packed_attention import enable_hf_packed_attention
        row["varlen_enabled"] = bool(enable_hf_packed_attention())
    st0 = packed_attention_stats()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    try:
        for it in range(args.warmup + args.steps):
            _sync(device)
            t0 = time.perf_counter()
            step_loss = 0.0
            for ids, lab, pos, lengths in batches:
                kw = {"packed_seq_lengths": lengths} if lengths is not None else {}
                out = model(input_ids=ids, position_ids=pos, labels=lab, use_cache=False, **kw)
                (out.loss / s["accum"]).backward()
                step_loss += out.loss.detach() / s["accum"]
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            dt = time.perf_counter() - t0
            losses.append(float(step_loss))
            if it == 0:
                row["first_step_s"] = round(dt, 1)
                log(f"  step 0 (compile) {dt:.1f} s loss {losses[-1]:.4f}")
            if it >= args.warmup:
                times.append(dt)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    finally:
        del opt
        for p in params:
            p.grad = None
    st1 = packed_attention_stats()
    if st1:
        row["packed_attention_calls"] = {k: st1.get(k, 0) - st0.get(k, 0) for k in st1}
    med = sorted(times)[len(times) // 2]
    row["step_s"] = med
    row["step_times"] = [round(t, 4) for t in times]
    row["tok_s"] = s["mb"] * seq * s["accum"] / med
    row["tflops4"] = 4 * active_params(g, args.layers) * row["tok_s"] / 1e12
    row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    row["losses"] = [round(x, 4) for x in losses]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    # random model on uniform random ids: ~ln(vocab) (+ the logits' variance / 2): Mixtral 10.37 (+0.8), Qwen3 11.93
    ln_v = math.log(g["vocab_size"])
    if not ln_v - 1.4 < losses[0] < ln_v + 1.5:
        raise RuntimeError(f"first loss {losses[0]:.3f} is not ~ln(vocab) = {ln_v:.2f}: wrong labels or model?")


def masking_check(model, s, args, g, packed_batch, device="cuda", seq=None):
    """Hidden states after the final norm for tokens outside each row's first example, with that example's tokens
    replaced: rel. difference ~0 (bf16 noise) = document-masked; the same with plain causal positions shows how
    large a leak is. Same shapes as the timing (no recompile)."""
    import torch
    seq = seq or args.seq
    ids, lab, pos = packed_batch(s["mb"], seq, g["vocab_size"], device, args.seed)
    ids2, keep = first_example_replaced(ids, pos, g["vocab_size"], args.seed)
    causal = torch.arange(seq, device=device).expand_as(pos).contiguous()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    norm = base.model.norm
    cache = {}
    handle = norm.register_forward_hook(lambda m, i, o: cache.__setitem__("h", o[0] if isinstance(o, tuple) else o))

    def hidden(x, p):
        # The training forward itself (grad mode on, labels given: no recompile for a new graph), no backward.
        y = torch.where(lab == -100, lab, x)
        kw = {}
        if s["flat"]:
            starts = (p.reshape(-1) == 0).nonzero().flatten().tolist() + [p.numel()]
            kw["packed_seq_lengths"] = torch.tensor([b - a for a, b in zip(starts, starts[1:])], dtype=torch.int32)
            x, p, y = x.reshape(1, -1), p.reshape(1, -1), y.reshape(1, -1)
        cache.clear()
        with torch.enable_grad():
            out = model(input_ids=x, position_ids=p, labels=y, use_cache=False, **kw)
            h = cache.get("h")
            if h is None:  # the hook did not fire (compiled away?): ask for the hidden states instead
                out = model(input_ids=x, position_ids=p, labels=y, use_cache=False, output_hidden_states=True, **kw)
                h = out.hidden_states[-1] if getattr(out, "hidden_states", None) else None
        h = None if h is None else h.detach()
        cache.clear()
        del out
        if h is None:
            raise RuntimeError("no hidden states (final-norm hook did not fire, no output_hidden_states)")
        return h.reshape(ids.shape[0], ids.shape[1], -1).float()

    def rel(a, b):
        a, b = a[keep], b[keep]
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    try:
        res = {"packed": rel(hidden(ids2, pos), hidden(ids, pos))}
        res["causal_reference"] = rel(hidden(ids2, causal), hidden(ids, causal))
    finally:
        handle.remove()
    leak = res["causal_reference"]
    res["verdict"] = ("document-masked" if res["packed"] < min(2e-2, 0.1 * leak) else
                      "LEAKS ACROSS EXAMPLES (attention not document-masked)")
    return res


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
                time_setting(model, s, args, g, packed_batch, row)
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


def free_cuda():
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# ------------------------------------------------------------------------------------------ dry run (CPU)
def dry_cpu(args, settings, g, ckpt_dir, result, rows):
    """Everything but Unsloth, on CPU: reload the tiny checkpoint (transformers + its tokenizer), put the same
    LoRA on it with plain peft (target_modules q/k/v/o + target_parameters on the fused experts) and run this
    script's own adapter check, timing loop (2 steps of mb<=2 x 128) and masking check for every setting."""
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
        time_setting(model, s, a, g, packed_batch, row, device="cpu", seq=seq)
        row["masking"] = masking_check(model, s, args, g, packed_batch, device="cpu", seq=seq)
        row["dry"] = f"mb {s['mb']} x {seq}"
        log(f"[dry] setting {i} ({label(s)}): {row['dry']}, loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}, "
            f"masking {row['masking']}")


# ------------------------------------------------------------------------------------------ report
def print_table(rows, args):
    log("\n| run | layers | mb x seq x accum | setting | tok/s | TF/s 4N | peak GiB | first step s | load s | masking |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = f"{r['mb']}x{args.seq}" + (f"x{r['accum']}" if r["accum"] > 1 else "")
        mask = (r.get("masking") or {}).get("verdict", "")
        if "dry" in r:
            log(f"| dry run: HF + peft on CPU, {r['dry']} | {args.layers} | {shape} | {r['label']} | (CPU) | | | | "
                f"| {mask} |")
        elif r.get("error"):
            log(f"| unsloth {r.get('unsloth', '')} | {args.layers} | {shape} | {r['label']} | FAILED: {r['error']} "
                f"| | | | | {mask} |")
        else:
            log(f"| unsloth {r.get('unsloth', '')} | {args.layers} | {shape} | {r['label']}, "
                f"{r.get('moe_backend', '')} | {r['tok_s']:,.0f} | {r['tflops4']:.1f} | {r['peak_gib']:.2f} | "
                f"{r.get('first_step_s', '')} | {r.get('load_s', '')} | {mask} |")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="mixtral-8x7b", choices=sorted(GEOMETRIES),
                   help="model geometry (random weights): mixtral-8x7b (MixtralForCausalLM, default) or "
                        "qwen3-30b-a3b (Qwen3MoeForCausalLM)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the geometry (default 4)")
    p.add_argument("--settings", default="mb=8,ckpt=0;mb=8,ckpt=1;mb=16,ckpt=0",
                   help="'mb=8,accum=1,ckpt=0|1|hf,flat=0|1;...' (ckpt=1: Unsloth's offloaded checkpointing)")
    p.add_argument("--seq", type=int, default=1024, help="packed row length (default 1024)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles, ~60 s)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "unsloth_bench"),
                   help="checkpoint + compile cache go here (4 layers: ~11 GB Mixtral, ~6 GB Qwen3)")
    p.add_argument("--tokenizer-dir", default="",
                   help="HF tokenizer files to copy into the checkpoint (e.g. .gpu/tok); default: generate them "
                        "with mixtune.data.tokenizer.load_tokenizer('') (needs mistral-common)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rewrite", action="store_true", help="rewrite the checkpoint even if a complete one exists")
    p.add_argument("--load-in-16bit", action="store_true", help="bf16 base instead of 4-bit (not the benchmark)")
    p.add_argument("--no-mask-check", action="store_true", help="skip the document-masking check")
    p.add_argument("--time-budget", type=int, default=540,
                   help="seconds: settings that would start past this (minus a margin) are skipped and reported; "
                        "0 = no limit (default 540, for a 600 s call)")
    p.add_argument("--json-out", default="", help="also write the final JSON object to this file")
    p.add_argument("--dry-cpu", action="store_true",
                   help="CPU check without Unsloth: tiny 1-layer checkpoint written + reloaded, batches built")
    p.add_argument("--_write-checkpoint", dest="write_checkpoint", default="", help=argparse.SUPPRESS)
    p.add_argument("--_device", dest="device", default="cuda", help=argparse.SUPPRESS)
    return p


def check_geometry(name: str) -> None:
    """This script's copy of the geometry equals mixtune's (mixtune.model.config.GEOMETRIES[name]) where mixtune is
    importable, and its LoRA at 4 layers has the adapter count the anchors were measured with."""
    model_type, g, _ = GEOMETRIES[name]
    exp = expected_adapter_params(g, 4)["total"]
    if exp != EXPECTED_ADAPTERS_4L[name]:
        raise AssertionError(f"{name}: LoRA at 4 layers has {exp:,} parameters, "
                             f"expected {EXPECTED_ADAPTERS_4L[name]:,}")
    try:
        from mixtune.model.config import GEOMETRIES as MIXTUNE_GEOMETRIES
    except ImportError:
        log("note: mixtune not importable (PYTHONPATH=src?): geometry not cross-checked")
        return
    m = MIXTUNE_GEOMETRIES[name]
    assert m.model_type == model_type, (name, m.model_type, model_type)
    for k in g:
        assert getattr(m, k) == g[k], (name, k, getattr(m, k), g[k])
    if model_type == "qwen3_moe":  # every layer MoE, as this script builds it
        assert m.decoder_sparse_step == 1 and not m.mlp_only_layers, (m.decoder_sparse_step, m.mlp_only_layers)


def check_written_config(ckpt_dir: str, g: dict, layers: int, model_type: str) -> None:
    """The checkpoint's config.json, read back through mixtune's family-aware reader, has the geometry asked for
    (catches a family key transformers would ignore or rename, e.g. rope_theta or moe_intermediate_size)."""
    try:
        from mixtune.model.config import MoEConfig
    except ImportError:
        return
    m = MoEConfig.from_pretrained(ckpt_dir)
    got = {k: getattr(m, k) for k in g}
    if m.model_type != model_type or m.num_hidden_layers != layers or got != g or not all(
            m.is_moe_layer(li) for li in range(layers)):
        raise RuntimeError(f"{ckpt_dir}/config.json: {m.model_type}, {m.num_hidden_layers} layers, {got}; "
                           f"expected {model_type}, {layers} layers (all MoE), {g}")


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
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        for r in rows:
            r.setdefault("error", "not run: " + result["error"][:200])
        exit_code = 1
    for r in rows:
        r["unsloth"] = result["versions"].get("unsloth", "")
    print_table(rows, args)
    result.pop("_t0", None)
    result["rows"] = rows
    result["ok"] = exit_code == 0
    result["seconds"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result, default=str)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
