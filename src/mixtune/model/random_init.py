"""A full-size Mixtral with random weights built directly in NF4 on the device, layer by layer.

    model = build_random_nf4_model(MixtralConfig(), device="cuda", seed=0)   # Mixtral-8x7B geometry

Lets full-size speed and memory be measured without a 93 GB checkpoint: each weight is drawn as N(0, std²)
in the compute dtype on the device and quantized right away (the same `NF4Weight` storage `load_model`
produces: attention q/k/v/o as `NF4Linear`, expert stacks as `NF4Weight`), so at most one (E, I, H) expert
stack is ever dense. Router, norms, embedding and lm_head stay in the compute dtype, as when loading.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import MixtralConfig
from .loading import build_model_on_meta
from .modeling import MixtralForCausalLM
from .nf4 import NF4Linear, NF4Weight

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("w1", "w3", "w2")


@torch.no_grad()
def build_random_nf4_model(config: MixtralConfig, device="cuda", seed: int = 0, dtype=torch.bfloat16,
                           std: float = 0.02, quant: str = "nf4") -> MixtralForCausalLM:
    """Random-init model on `device`; quant="nf4" (default) or "none" (dense, for small tests)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    model = build_model_on_meta(config, "none", dtype)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)

    def param(t):
        return nn.Parameter(t, requires_grad=False)

    m = model.model
    m.embed_tokens.weight = param(randn(config.vocab_size, config.hidden_size))
    m.norm.weight = param(torch.ones(config.hidden_size, device=device, dtype=dtype))
    for layer in m.layers:
        att = layer.self_attn
        for name in ATTN:
            lin = getattr(att, name)
            w = randn(lin.out_features, lin.in_features)
            if quant == "nf4":
                setattr(att, name, NF4Linear(NF4Weight.quantize(w)))
            else:
                lin.weight = param(w)
            del w
        moe = layer.block_sparse_moe
        moe.gate.weight = param(randn(config.num_local_experts, config.hidden_size))
        ex = moe.experts
        for name in EXPERTS:
            shape = tuple(getattr(ex, name).shape)
            w = randn(*shape)  # one (E, out, in) stack dense at a time
            delattr(ex, name)
            setattr(ex, name, NF4Weight.quantize(w) if quant == "nf4" else param(w))
            del w
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = param(torch.ones(config.hidden_size, device=device, dtype=dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = m.embed_tokens.weight
    else:
        model.lm_head.weight = param(randn(config.vocab_size, config.hidden_size))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"random init left tensors unfilled: {left[:5]}")
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.load_seconds = time.perf_counter() - t0
    return model
