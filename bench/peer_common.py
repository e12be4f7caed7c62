"""What bench/unsloth_bench.py and bench/experts4bit_bench.py share, so that their peer rows are measured the same
way on the same workload: the benchmarked geometries (Mixtral-8x7B and Qwen3-30B-A3B, cross-checked against
mixtune.model.config.GEOMETRIES) and their tiny CPU versions, the LoRA (r=64 alpha=16 on q/k/v/o and on every
expert) with its expected adapter count, transformers' config / model class per family, the random bf16
checkpoint in the real HF layout (spec, reuse check, writer), the packed batches (from `mixtune.bench.packed_batch`,
optionally flattened to one row with `packed_seq_lengths`), the timing loop (warmup + timed optimizer steps,
median step, tokens/s, TF/s at 4 x active parameters, peak GiB, loss sanity), the document-masking check, the
markdown table's frame and CUDA freeing.

Not a script: both runners load it by path from this directory (bench/ is not a package) under the module name
_bench_peer_common, so one process holds one copy. It is exercised by their CPU dry runs (`python
bench/unsloth_bench.py --dry-cpu`, `python bench/experts4bit_bench.py --dry-cpu`) and tests/test_bench_peers.py.

The timing loop (time_setting): `args.warmup` untimed then `args.steps` timed optimizer steps, plain loop:
model(input_ids, position_ids, labels, use_cache=False), loss/accum backward, torch.optim.AdamW (fused on CUDA)
step, CUDA-synchronized; tokens/s = mb*seq*accum / median step time, peak GiB = torch.cuda.max_memory_allocated.

The masking check (masking_check), on the same shapes (no extra compile): the hidden states after the final norm of
every token outside each row's first example, with that first example replaced by other random tokens; equal (to
bf16 noise) = document-masked attention, different = attention crosses examples. The same with plain causal
positions is the reference of how large a leak looks.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
import traceback

# The benchmarked geometries, in mixtune's field names (num_local_experts = expert count, intermediate_size = one
# expert's width), the same as mixtune.model.config.GEOMETRIES[name] (check_geometry compares them).
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
MARKER = "unsloth_bench_checkpoint.json"  # the name checkpoints already on disk were written with
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------ settings
def settings_parts(spec: str):
    """--settings 'k=v,k=v;k=v;...': (part, [(key, value), ...]) per non-empty ';'-separated setting, blanks
    around parts and pairs dropped. Each runner checks the keys and values itself."""
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        yield part, [kv.partition("=")[::2] for kv in filter(None, (x.strip() for x in part.split(",")))]


# ------------------------------------------------------------------------------------------ LoRA counts
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


# ------------------------------------------------------------------------------------------ adapter check
def adapter_report(model, layers):
    """(trainable count, {"<layer>:attention|experts|other" or "non_lora": count}, sorted trainable dtypes)."""
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


# ------------------------------------------------------------------------------------------ timing + masking
def sync(device="cuda"):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def time_setting(model, s, args, g, packed_batch, row, device="cuda", seq=None, prepare=None, attention_stats=None):
    """The timing loop (module docstring) for setting s, results into row: first_step_s, peak_gib, step_s (the
    median), step_times, tok_s, tflops4, loss_first / loss_last / losses. Refuses a non-finite loss and a first
    loss far from ln(vocab). prepare(s, row), if given, runs once the optimizer exists (Unsloth's runner switches
    on its varlen attention there); attention_stats(), if given, returns counters whose increase over the steps
    goes to row["packed_attention_calls"]."""
    import torch
    seq = seq or args.seq
    cuda = device == "cuda"
    batches = make_batches(s, seq, g["vocab_size"], device, args.seed, packed_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    if prepare is not None:
        prepare(s, row)
    attention_stats = attention_stats or dict
    st0 = attention_stats()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    try:
        for it in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            step_loss = 0.0
            for ids, lab, pos, lengths in batches:
                kw = {"packed_seq_lengths": lengths} if lengths is not None else {}
                out = model(input_ids=ids, position_ids=pos, labels=lab, use_cache=False, **kw)
                (out.loss / s["accum"]).backward()
                step_loss += out.loss.detach() / s["accum"]
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
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
    st1 = attention_stats()
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


def free_cuda():
    """gc, then CUDA's cached blocks back (where torch and a GPU are there)."""
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# ------------------------------------------------------------------------------------------ command line
def add_common_args(p, settings_default: str, settings_help: str, warmup_help: str) -> None:
    """The arguments both runners take, after their own --geometry: --layers, --settings, --seq, --steps, --warmup,
    --seed, --no-mask-check, --json-out."""
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the geometry (default 4)")
    p.add_argument("--settings", default=settings_default, help=settings_help)
    p.add_argument("--seq", type=int, default=1024, help="packed row length (default 1024)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per setting")
    p.add_argument("--warmup", type=int, default=2, help=warmup_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mask-check", action="store_true", help="skip the document-masking check")
    p.add_argument("--json-out", default="", help="also write the final JSON object to this file")


# ------------------------------------------------------------------------------------------ report
def markdown_table(rows, args, column, line):
    """The table both runners end with: run | layers | mb x seq x accum | setting | tok/s | TF/s 4N | peak GiB |
    first step s | <column> | masking, one line per row from line(row, shape cell, masking verdict)."""
    log(f"\n| run | layers | mb x seq x accum | setting | tok/s | TF/s 4N | peak GiB | first step s | {column} "
        "| masking |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = f"{r['mb']}x{args.seq}" + (f"x{r['accum']}" if r["accum"] > 1 else "")
        log(line(r, shape, (r.get("masking") or {}).get("verdict", "")))


# ------------------------------------------------------------------------------------------ geometry checks
def check_geometry(name: str) -> None:
    """This module's copy of the geometry equals mixtune's (mixtune.model.config.GEOMETRIES[name]) where mixtune is
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
    if model_type == "qwen3_moe":  # every layer MoE, as the runners build it
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


def fail_rows(result: dict, rows: list, e: BaseException) -> int:
    """A run that stopped on `e`: its traceback printed, the error in the result and on every row not yet
    timed; returns the exit code (1)."""
    traceback.print_exc()
    result["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    for r in rows:
        r.setdefault("error", "not run: " + result["error"][:200])
    return 1


def emit_result(result: dict, rows: list, exit_code: int, t0: float, json_out: str = "") -> int:
    """The JSON line last (and into json_out): rows, ok, seconds since t0. Returns exit_code."""
    result["rows"] = rows
    result["ok"] = exit_code == 0
    result["seconds"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result, default=str)
    if json_out:
        with open(json_out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return exit_code
