"""`mixtune inspect`: architecture, parameter counts, LoRA targets and a memory estimate, without weights.

    mixtune inspect --model mistralai/Mixtral-8x7B-v0.1 --lora.targets q_proj,v_proj,experts --lora.r 64 [--json]
    mixtune inspect --model Qwen/Qwen3-30B-A3B --lora.targets attention,experts --lora.r 64

Only config.json is read, of any family (mixtral, qwen3_moe, olmoe, qwen2_moe): the model is built on the meta
device (NF4 placeholders where loading would quantize), LoRA is applied there, and everything is counted from
shapes. `params` (memory_plan.param_counts) holds the base parameters (adapter excluded) by part: total,
ACTIVE — what one token's forward uses: attention (with its biases and q/k norms), the router, k of the E
routed experts, the shared expert and its gate, the dense MLP of dense layers, the norms, and the embeddings and
lm_head counted whole (a tied lm_head once), as the published "active" figures count them — and trainable
(the adapter). `total_params` is base + adapter. The peft-style "all params" is the
number peft + bitsandbytes print for the same targets on a 4-bit transformers-4.x model (4-bit weights counted
as packed bytes), so the reference recipe's line can be checked: `trainable params: 56836096 || all params:
23539437568` for its target list on Mixtral-8x7B. `--json` prints one JSON object.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

from .config import Config
from .lora import apply_lora
from .lora.targets import known_names
from .memory_plan import memory_estimate, param_counts
from .model import human_bytes as _human


def inspect_main(cfg: Config, json_out: bool = False, nproc: Optional[int] = None) -> dict:
    """Print (or, with json_out, print as one JSON object) what fine-tuning `cfg.model` with `cfg.lora` means.
    nproc: torchrun ranks to plan for (default: WORLD_SIZE, else 1); with train.distributed fsdp the training
    peak is per GPU with the weights and the adapter's state divided over them."""
    from .distributed import world_from_env
    from .model import build_model_on_meta, load_config_only

    config = load_config_only(cfg.model.name_or_path, cfg.model.cache_dir, cfg.model.revision,
                              family=cfg.model.family)
    quant = cfg.model.quant
    model = build_model_on_meta(config, quant, torch.bfloat16)
    seed = cfg.lora.init_seed if cfg.lora.init_seed is not None else cfg.train.seed
    report = apply_lora(model, cfg.lora, seed, warn=False)  # the output carries the warnings (text and JSON)
    mem = memory_estimate(model)
    counts = param_counts(model)
    fam = config.family
    moe_layers = [l for l in range(config.num_hidden_layers) if config.is_moe_layer(l)]
    arch = {"family": fam.model_type, "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "attention_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "experts": config.num_local_experts, "experts_per_token": config.num_experts_per_tok,
            "vocab_size": config.vocab_size, "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
            "max_position_embeddings": config.max_position_embeddings,
            "norm_topk_prob": config.norm_topk_prob, "qk_norm": fam.qk_norm,
            "attention_bias": [n for n in fam.bias_on if config.attention_bias],
            "clip_qkv": config.clip_qkv if fam.has_clip_qkv else None,
            "shared_expert_intermediate_size": config.shared_expert_intermediate_size if fam.shared_expert else 0,
            "dense_layers": [l for l in range(config.num_hidden_layers) if l not in moe_layers],
            "dense_intermediate_size": config.dense_intermediate_size or config.intermediate_size,
            "tie_word_embeddings": config.tie_word_embeddings}
    out = {"model": cfg.model.name_or_path or f"(tiny default, {cfg.model.family})", "family": fam.model_type,
           "quant": quant, "architecture": arch, "params": counts,
           "total_params": report.total_params, "trainable_params": report.trainable_params,
           "peft_all_params": report.peft_all_params, "peft_line": report.peft_line(),
           "lora": {"r": report.r, "alpha": report.alpha, "scaling": report.scaling, "dropout": cfg.lora.dropout,
                    "targets": list(cfg.lora.targets)},
           "family_targets": list(known_names(fam)),
           "matched_targets": report.matched, "unmatched_targets": report.unmatched,
           "unmatched_messages": report.messages, "adapted": report.adapted, "memory_bytes": mem,
           "training_peak": training_peaks(cfg, config, mem, nproc or world_from_env()[0])}
    if json_out:
        print(json.dumps(out))
        return out
    a = arch
    print(f"model: {out['model']}")
    print(f"  {fam.model_type} ({fam.architecture}): {a['layers']} layers, hidden {a['hidden_size']}, experts "
          f"{a['experts']} x FFN {a['intermediate_size']} (top-{a['experts_per_token']}"
          f"{', renormalised' if a['norm_topk_prob'] else ''}), attention {a['attention_heads']} query / "
          f"{a['kv_heads']} KV heads of {a['head_dim']}, vocab {a['vocab_size']}, RoPE theta {a['rope_theta']:g}")
    extras = _variants(a)
    if extras:
        print(f"  {'; '.join(extras)}")
    pc = counts
    print(f"  parameters: {pc['total']:,} total, {pc['active']:,} active per token (k of E experts; embeddings "
          f"and lm_head counted whole), {pc['trainable']:,} trainable")
    print(f"  LoRA target names ({fam.model_type}): {' '.join(out['family_targets'])}")
    print(report.format())
    print(f"memory of the weights and the adapter (weights {quant}):")
    four = "q/k/v/o + experts" + (" + shared expert" if a["shared_expert_intermediate_size"] else "") + \
        (" + dense MLPs" if a["dense_layers"] else "")
    print(f"  weights nf4 ({four} 4-bit, rest bf16): {_human(mem['weights_nf4'])}")
    print(f"  weights bf16: {_human(mem['weights_bf16'])}")
    print(f"  LoRA adapter fp32: {_human(mem['adapter_fp32'])}, gradients fp32: {_human(mem['gradients_fp32'])}, "
          f"AdamW m+v fp32: {_human(mem['optimizer_adamw_fp32'])}")
    print(f"  training total: {_human(mem['training_total_nf4'])} with nf4 weights, "
          f"{_human(mem['training_total_bf16'])} with bf16 weights")
    tp = out["training_peak"]
    print(f"estimated peak GPU memory of a training step (nf4, micro-batch {tp['micro_batch']} x {tp['seq']} "
          f"tokens, train.optim {tp['optim']}, expert precision {tp['expert_precision']}"
          f"{_per_gpu(tp)}; mixtune.memory_plan):")
    for row in tp["policies"]:
        print(f"  {row['policy']:<72} {_human(row['bytes'])}  (work x{row['relative_work']:.2f})")
    if "plan" in tp:
        pl = tp["plan"]
        print(f"  model.memory_budget_gib {cfg.model.memory_budget_gib:g}: "
              + (f"{pl['policy']} ({_human(pl['bytes'])})" if "error" not in pl else pl["error"]))
    return out


def _per_gpu(tp: dict) -> str:
    if tp["ranks"] == 1:
        return ""
    what = ("weights, adapter, gradients and optimizer state sharded" if tp["strategy"] == "fsdp"
            else "every rank holds everything")
    return f"; per GPU of {tp['ranks']} ranks under {tp['strategy']}: {what}"


def _variants(a: dict) -> list[str]:
    """The family's variants present in this config, as words."""
    out = []
    if a["qk_norm"] != "none":
        out.append("q/k RMSNorm " + ("per head" if a["qk_norm"] == "head" else "over the projection"))
    if a["attention_bias"]:
        out.append(f"biases on {'/'.join(a['attention_bias'])}")
    if a["clip_qkv"] is not None:
        out.append(f"q/k/v clipped to +-{a['clip_qkv']:g}")
    if a["shared_expert_intermediate_size"]:
        out.append(f"shared expert of {a['shared_expert_intermediate_size']} with a sigmoid gate")
    if a["dense_layers"]:
        out.append(f"dense MLP of {a['dense_intermediate_size']} in layers {a['dense_layers']}")
    if a["tie_word_embeddings"]:
        out.append("lm_head tied to the embeddings")
    return out


def training_peaks(cfg: Config, config, mem: dict, ranks: int = 1) -> dict:
    """Estimated peak memory of a training step on one GPU under the main recomputation policies, at the
    config's micro-batch, row length, optimizer and gradient accumulation (train.gradient_accumulation_steps:
    with 1 no gradient exists at the activation peak), for `ranks` ranks under train.distributed; and the plan
    for model.memory_budget_gib (per GPU) when it is set."""
    from .memory_plan import GiB, Policy, estimate_bytes, plan, relative_work
    L = config.num_hidden_layers
    mb, seq, r, optim = (cfg.train.per_device_train_batch_size, cfg.data.max_seq_length, cfg.lora.r,
                         cfg.train.optim)
    prec = cfg.model.expert_precision
    trainable = mem["adapter_fp32"] // 4
    args = (config, mem["weights_nf4"], trainable)
    dist = {"ranks": ranks, "strategy": cfg.train.distributed, "accum": cfg.train.gradient_accumulation_steps,
            "shared_a": cfg.lora.shared_gate_up_a}
    out = {"micro_batch": mb, "seq": seq, "optim": optim, "expert_precision": prec, **dist, "policies": []}
    for pol in (Policy(0, False, "grouped"), Policy(0, True, "grouped"), Policy(0, True, "grouped_lowmem"),
                Policy(L, False, "grouped")):
        out["policies"].append({"policy": pol.describe(L),
                                "bytes": int(estimate_bytes(*args, mb, seq, r, optim, pol, cfg.lora.dropout, prec,
                                                        **dist)),
                                "relative_work": round(relative_work(config, pol), 3)})
    if cfg.model.memory_budget_gib > 0:
        try:
            pol, est = plan(cfg.model.memory_budget_gib * GiB, *args, mb, seq, r, optim, cfg.lora.dropout, prec,
                            **dist)
            out["plan"] = {"policy": pol.describe(L), "bytes": int(est), "full": pol.full,
                           "attention": pol.attention, "backend": pol.backend}
        except ValueError as e:
            out["plan"] = {"error": str(e)}
    return out
