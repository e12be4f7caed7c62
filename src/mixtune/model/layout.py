"""The tensor layout of a Mixtral checkpoint as shipped on the Hub (SPEC.md §3): which keys exist, in what
order, and how the model's tensors map onto them.

    keys = expected_keys(config)                       # canonical key order of a checkpoint
    for key, t in iter_model_state(model): ...         # the model's base weights under those keys
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import torch

from ..quant.nf4 import NF4Weight
from .config import MixtralConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_W = ("w1", "w2", "w3")

EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def expected_keys(config: MixtralConfig) -> list[str]:
    """Every tensor key of a Mixtral checkpoint in the real layout, in the canonical order."""
    keys = ["model.embed_tokens.weight"]
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        keys += [p + f"self_attn.{n}.weight" for n in ATTN_PROJ]
        keys.append(p + "block_sparse_moe.gate.weight")
        keys += [p + f"block_sparse_moe.experts.{e}.{w}.weight"
                 for e in range(config.num_local_experts) for w in EXPERT_W]
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    keys.append("model.norm.weight")
    if not config.tie_word_embeddings:
        keys.append("lm_head.weight")
    return keys

def iter_model_state(model, dtype: Optional[torch.dtype] = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a model's base weights in the real checkpoint layout and order (expert stacks split per
    expert, NF4 weights dequantized one at a time, LoRA adapters NOT folded in), in `dtype` (default: each
    tensor's own; NF4 weights in the model's dtype)."""
    cfg = model.config
    sd_dtype = dtype or model.dtype
    for key in expected_keys(cfg):
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
        yield key, t.detach().to(dtype or t.dtype)
