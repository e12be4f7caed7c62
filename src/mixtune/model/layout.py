"""The tensor layout of a checkpoint as shipped on the Hub, for every family: which keys exist, in what order,
and how our module tree maps onto them (SPEC.md §3; the names per family in model/family.py).

    keys = expected_keys(config)                       # the checkpoint's keys, canonical order
    internal = to_internal(config)                     # {checkpoint key: our module-tree key}
    for key, t in iter_model_state(model): ...         # the model's base weights under the checkpoint's keys

Our keys are the module tree's (`model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight` per expert, though the
module holds one (E, out, in) stack); `Family.checkpoint_name` turns them into the family's names.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import torch

from ..quant.nf4 import NF4Weight
from .config import MoEConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_W = ("w1", "w2", "w3")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")  # dense SwiGLU: dense layers and the shared expert

# one expert's matrix in OUR naming (checkpoint keys go through to_internal first)
EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def quantized_linear(module_path: str) -> bool:
    """Whether the linear at `module_path` (our naming) is stored in NF4 with quant="nf4": the attention
    projections, and the dense SwiGLU projections of dense layers and shared experts. The router, the shared
    expert's gate, embeddings, norms and lm_head stay 16-bit."""
    parent, _, leaf = module_path.rpartition(".")
    if leaf in ATTN_PROJ:
        return parent.endswith(".self_attn")
    return leaf in MLP_PROJ and (parent.endswith(".mlp") or parent.endswith(".shared_expert"))


def internal_keys(config: MoEConfig) -> list[str]:
    """Every base tensor of the model in our naming (experts per expert), in the canonical order."""
    fam = config.family
    keys = ["model.embed_tokens.weight"]
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        for n in ATTN_PROJ:
            keys.append(p + f"self_attn.{n}.weight")
            if config.attention_bias and n in fam.bias_on:
                keys.append(p + f"self_attn.{n}.bias")
        if fam.qk_norm != "none":
            keys += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        if config.is_moe_layer(l):
            keys.append(p + "block_sparse_moe.gate.weight")
            keys += [p + f"block_sparse_moe.experts.{e}.{w}.weight"
                     for e in range(config.num_local_experts) for w in EXPERT_W]
            if fam.shared_expert:
                keys += [p + f"block_sparse_moe.shared_expert.{n}.weight" for n in MLP_PROJ]
                keys.append(p + "block_sparse_moe.shared_expert_gate.weight")
        else:
            keys += [p + f"mlp.{n}.weight" for n in MLP_PROJ]
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    keys.append("model.norm.weight")
    if not config.tie_word_embeddings:
        keys.append("lm_head.weight")
    return keys


def expected_keys(config: MoEConfig) -> list[str]:
    """Every tensor key of the family's checkpoint in the real layout, in the canonical order."""
    fam = config.family
    return [fam.checkpoint_name(k) for k in internal_keys(config)]


def to_internal(config: MoEConfig) -> dict[str, str]:
    """{checkpoint key: our key} for every tensor of the model."""
    fam = config.family
    return {fam.checkpoint_name(k): k for k in internal_keys(config)}


def iter_model_state(model, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a model's base weights in the checkpoint's layout, names and order (expert stacks split
    per expert, NF4 weights dequantized one at a time, LoRA adapters NOT folded in), in `dtype` (default: each
    tensor's own; NF4 weights in the model's dtype)."""
    cfg = model.config
    fam = cfg.family
    sd_dtype = dtype or model.dtype
    for key in internal_keys(cfg):
        m = EXPERT_RE.match(key)
        if m:
            l, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
            src = getattr(model.model.layers[l].block_sparse_moe.experts, w)
            t = src.dequantize_expert(e, sd_dtype) if isinstance(src, NF4Weight) else src[e]
        else:
            modname, _, pname = key.rpartition(".")
            mod = model.get_submodule(modname)
            if not hasattr(mod, pname) and hasattr(mod, "base"):  # a LoRA wrapper: its frozen base layer
                mod = mod.base
            src = getattr(mod, pname)
            t = src.dequantize(sd_dtype) if isinstance(src, NF4Weight) else src
        yield fam.checkpoint_name(key), t.detach().to(dtype or t.dtype)
