"""LoRA for Mixtral: linear targets (attention, lm_head, router) AND every expert, by name; PEFT-format files.

    report = apply_lora(model, cfg.lora, seed=cfg.train.seed)   # wraps targets, freezes the base
    print(report.format())                                      # matched / unmatched, counts
    save_adapter(model, "out/adapter", cfg.lora, "mistralai/Mixtral-8x7B-v0.1")
    load_adapter(fresh_model, "out/adapter")                    # applies LoRA with the adapter's config

Linear targets (`q_proj k_proj v_proj o_proj lm_head gate`) become `LoRALinear`:
y = base(x) + (dropout(x) @ A^T) @ B^T * alpha / r, with A (r, in) kaiming-uniform (as peft) and B (out, r) zero.
Expert targets (`w1 w2 w3`, or `experts` for all three) add one `ExpertLoRA` per layer as `experts.lora`:
A[name] (E, r, in), B[name] (E, out, r); `mixtune.kernels.moe_experts` applies them without forming B·A.

Adapter files follow PEFT's naming with the real checkpoint's module names, experts per expert
(`base_model.model.model.layers.{l}.block_sparse_moe.experts.{e}.w1.lora_A.weight`), which stock peft 0.21 loads
onto transformers 5.x (it fuses the experts itself). `merge_into_state_dict` folds an adapter into checkpoint
tensors (W + s·B·A in fp32, per expert) and is what `mixtune.merge` streams through.

Four rooms, one concern each:
    modules.py      LoRALinear, ExpertLoRA: the nn.Modules and their init; no target names
    targets.py      the per-family name tables (data), target resolution, apply_lora, counts, LoraReport
    peft_format.py  PEFT key mapping and adapter files: save_adapter, read_adapter, load_adapter
    merge.py        merge arithmetic over checkpoint tensors: adapter_deltas, merge_into_state_dict
Imports point one way: modules <- targets <- peft_format <- merge (merge needs only read_adapter,
adapter_scaling and PEFT_PREFIX); no room imports this package's __init__ or a room above it.
This file only re-exports, so `from mixtune.lora import ...` keeps working for every caller.
"""

from .merge import adapter_deltas, merge_into_state_dict, merge_lora_weights
from .modules import ExpertLoRA, LoRALinear
from .peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, SIDECAR, adapter_scaling, adapter_state_dict,
                          load_adapter, read_adapter, save_adapter, set_adapter_state_dict)
from .targets import (ALIASES, EXPERT_HINT, EXPERT_NAMES, KNOWN_NAMES, LINEAR_NAMES, LLAMA_EXPERT_NAMES, LoraReport,
                      apply_lora, build_report, check_targets, count_params, lora_parameters, unmatched_message)

__all__ = [
    # modules
    "ExpertLoRA", "LoRALinear",
    # targets
    "ALIASES", "EXPERT_HINT", "EXPERT_NAMES", "KNOWN_NAMES", "LINEAR_NAMES", "LLAMA_EXPERT_NAMES", "LoraReport",
    "apply_lora", "build_report", "check_targets", "count_params", "lora_parameters", "unmatched_message",
    # peft_format
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "SIDECAR", "adapter_scaling", "adapter_state_dict",
    "load_adapter", "read_adapter", "save_adapter", "set_adapter_state_dict",
    # merge
    "adapter_deltas", "merge_into_state_dict", "merge_lora_weights",
]
