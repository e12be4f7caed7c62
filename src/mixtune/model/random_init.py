"""A full-size MoE of any family with random weights built directly in NF4 on the device, layer by layer.

    model = build_random_nf4_model(MoEConfig(), device="cuda", seed=0)   # Mixtral-8x7B geometry
    model = build_random_nf4_model(QWEN3_30B_A3B_CONFIG, device="cuda")   # any family's geometry

Lets full-size speed and memory be measured without a 60-280 GB checkpoint: each weight is drawn as N(0, std²)
in the compute dtype on the device and quantized right away (the same storage `load_model` produces: attention
and dense-MLP linears as `NF4Linear`, expert stacks as `NF4Weight`), so at most one (E, I, H) expert stack is
ever dense. Router, norms, biases, embedding and lm_head stay in the compute dtype, as when loading.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import MoEConfig
from .layout import EXPERT_W, quantized_linear
from .loading import LayerParking, build_model_on_meta
from .modeling import MoEForCausalLM
from .nf4 import NF4Linear, NF4Weight


@torch.no_grad()
def build_random_nf4_model(config: MoEConfig, device="cuda", seed: int = 0, dtype=torch.bfloat16,
                           std: float = 0.02, quant: str = "nf4", offload_layers: bool = False,
                           shard_of: tuple[int, int] | None = None) -> MoEForCausalLM:
    """Random-init model on `device`; quant="nf4" (default) or "none" (dense, for small tests).
    offload_layers: park each decoder layer on the CPU once it is built (as `load_model` does for fsdp), so
    the device never holds more than one layer plus the embedding and lm_head; shard_of=(rank, world): each
    parked layer keeps only this rank's FSDP chunk of its NF4 storage."""
    device = torch.device(device)
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    model = build_model_on_meta(config, "none", dtype)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)

    def param(t):
        return nn.Parameter(t, requires_grad=False)

    parking = LayerParking(model, offload_layers, shard_of)
    for path, mod in list(model.named_modules()):
        parent_path, _, leaf = path.rpartition(".")
        if isinstance(mod, nn.Linear):
            w = randn(mod.out_features, mod.in_features)
            bias = None if mod.bias is None else param(torch.zeros(mod.out_features, device=device, dtype=dtype))
            if quant == "nf4" and quantized_linear(path):
                setattr(model.get_submodule(parent_path), leaf, NF4Linear(NF4Weight.quantize(w), bias))
            else:
                mod.weight = param(w)
                mod.bias = bias
            del w
        elif isinstance(mod, nn.Embedding):
            mod.weight = param(randn(*mod.weight.shape))
        elif hasattr(mod, "eps") and isinstance(getattr(mod, "weight", None), nn.Parameter):  # RMSNorm
            mod.weight = param(torch.ones(mod.weight.shape, device=device, dtype=dtype))
        elif leaf == "experts" and hasattr(mod, "w1"):
            for name in EXPERT_W:
                shape = tuple(getattr(mod, name).shape)
                w = randn(*shape)  # one (E, out, in) stack dense at a time
                delattr(mod, name)
                setattr(mod, name, NF4Weight.quantize(w) if quant == "nf4" else param(w))
                del w
        parking.filled(path + ".")  # parks this module's layer once its last tensor is built
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"random init left tensors unfilled: {left[:5]}")
    parking.finish()
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.load_seconds = time.perf_counter() - t0
    return model
