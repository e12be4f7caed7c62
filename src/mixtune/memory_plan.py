"""Activation checkpointing chosen by memory: estimate a training step's peak GPU memory from the model's
shapes, and pick the cheapest recomputation policy that fits a budget.

    est = estimate_bytes(config, weights_bytes, trainable, micro_batch, seq, r, optim, policy)
    policy, est = plan(budget_bytes, config, weights_bytes, trainable, micro_batch, seq, r, optim)

A policy is (full, attention, backend):
- `full`: the first `full` layers recompute everything in backward;
- `attention`: the other layers recompute their attention block;
- `backend`: `grouped` keeps the experts' (tokens × 2I) pre-activations, `grouped_lowmem` recomputes them.

The estimate adds up:
- the weights;
- the adapter, its gradients and the optimizer's moments;
- what autograd keeps per token and layer, counted tensor by tensor from the shapes below, bf16;
- the largest transient: one layer's backward buffers, the dequantized expert weights, a loss chunk; with
  `precision="fp8"` those weights take one byte each and the widest backward buffer gets an e4m3 copy.

Against the 32-layer H200 measurements in BENCHMARKS.md it is within 0.1% without checkpointing, 2% for the
low-memory policy and 4–8% above with full checkpointing; with FP8 experts within 0.2% without
recomputation and ~5% above for the low-memory policy (`tests/test_memory_plan.py` holds those rows).
The budget is for `torch.cuda.max_memory_allocated`: leave the CUDA context and the allocator's slack
(a few %) out of the card's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

from .lora import lora_parameters
from .model.config import MixtralConfig
from .quant.nf4 import NF4Weight

GiB = 2**30
BF16 = 2


@dataclass(frozen=True)
class Policy:
    full: int  # the first `full` layers recompute everything
    attention: bool  # the other layers recompute their attention block
    backend: str  # grouped | grouped_lowmem

    def describe(self, layers: int) -> str:
        parts = []
        if self.full >= layers:
            parts.append("every layer recomputed in backward")
        else:
            if self.full:
                parts.append(f"first {self.full} of {layers} layers recomputed")
            if self.attention:
                parts.append("attention blocks recomputed")
            if not parts:
                parts.append("no recomputation")
        parts.append(f"MoE backend {self.backend}")
        return ", ".join(parts)


def _per_token_layer(c: MixtralConfig, r: int, lora_dropout: float = 0.0) -> dict:
    """Bytes autograd keeps per token and layer, by part."""
    H, I, k, E = c.hidden_size, c.intermediate_size, c.num_experts_per_tok, c.num_local_experts
    kv = c.num_key_value_heads * c.head_dim
    # LoRA dropout on q/k/v/o keeps each projection's dropped input (bf16) and its mask (1 byte)
    dropout = 4 * H * (BF16 + 1) if lora_dropout > 0 else 0
    return {
        # norm input, normed x (q/k/v input), q|k|v after RoPE, attention output (o_proj input), softmax stats,
        # the four LoRA inner products
        "attention": BF16 * (4 * H + 2 * kv) + 4 * c.num_attention_heads + 4 * r * BF16 + dropout,
        "attention_recomputed": H * BF16,  # the block's input only
        # residual (norm input), normed x (router + experts input), router probs/ids, expert outputs y (k x H),
        # LoRA inner products
        "moe": 2 * H * BF16 + E * 4 * 2 + k * 10 + k * H * BF16 + k * 3 * r * BF16,
        "h13": k * 2 * I * BF16,  # the (tokens x 2I) pre-activations `grouped` keeps
        "layer_recomputed": H * BF16,
    }


def estimate_bytes(c: MixtralConfig, weights_bytes: float, trainable: int, micro_batch: int, seq: int, r: int,
                   optim: str, policy: Policy, lora_dropout: float = 0.0, precision: str = "bf16") -> float:
    """Peak bytes of one training step (see the module doc). lora_dropout > 0 counts the dropped inputs that
    LoRA on q/k/v/o keeps (an upper bound when fewer of them are targets); precision is the experts'
    (model.expert_precision)."""
    L = c.num_hidden_layers
    H, I, E, k = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
    T = micro_batch * seq
    state = trainable * 8 if optim == "adamw" else trainable * 2.02  # fp32 m, v | 8-bit m, v + block scales
    fixed = weights_bytes + trainable * 4 * 2 + state  # + the fp32 adapter and its gradients
    p = _per_token_layer(c, r, lora_dropout)
    lowmem = policy.backend == "grouped_lowmem"
    kept = (p["attention_recomputed"] if policy.attention else p["attention"]) + p["moe"] + (0 if lowmem else p["h13"])
    full = min(policy.full, L)
    saved = T * (full * p["layer_recomputed"] + (L - full) * kept)
    # one layer's backward: [dh13 | du13], dg, [dy | du2] (per routed copy), plus — when that layer's
    # activations are rebuilt in backward — the layer's own saved set; the dequantized w1|w3 (+ LoRA columns);
    # one 4096-token fp32 logits chunk of the loss
    rebuilt = (p["attention"] + p["moe"] + p["h13"]) if (full > 0 or lowmem) else 0
    fp8 = precision == "fp8"
    transient = (E * 2 * I * (H + 2 * r) * (1 if fp8 else BF16) + T * (k * (3 * I + H) * BF16 + rebuilt)
                 + 4096 * c.vocab_size * 4 + (T * k * (2 * I + 2 * r) if fp8 else 0))
    return fixed + saved + transient


def relative_work(c: MixtralConfig, policy: Policy) -> float:
    """Matmul work of a step relative to no recomputation (1.0): recomputing a layer adds its forward, the
    attention block its share, and the low-memory MoE the w1|w3 product."""
    H, I, k, L = c.hidden_size, c.intermediate_size, c.num_experts_per_tok, c.num_hidden_layers
    kv = c.num_key_value_heads * c.head_dim
    A = H * (2 * H + 2 * kv)  # q, k, v, o
    X = k * 3 * H * I  # two experts' w1, w3, w2
    base = 4 * (A + X) * L
    full = min(policy.full, L)
    extra = full * 2 * (A + X)
    if policy.attention:
        extra += (L - full) * 2 * A
    if policy.backend == "grouped_lowmem":
        extra += L * 2 * (2 / 3) * X
    return (base + extra) / base


def plan(budget_bytes: float, c: MixtralConfig, weights_bytes: float, trainable: int, micro_batch: int, seq: int,
         r: int, optim: str, lora_dropout: float = 0.0, precision: str = "bf16") -> tuple[Policy, float]:
    """The policy with the least recomputation whose estimate fits `budget_bytes` -> (policy, estimate).
    Raises ValueError naming the smallest estimate when nothing fits."""
    L = c.num_hidden_layers
    best = None
    smallest = None
    for backend in ("grouped", "grouped_lowmem"):
        for attention in (False, True):
            for full in range(L + 1):
                pol = Policy(full, attention and full < L, backend)
                est = estimate_bytes(c, weights_bytes, trainable, micro_batch, seq, r, optim, pol, lora_dropout,
                                     precision)
                if smallest is None or est < smallest[1]:
                    smallest = (pol, est)
                if est <= budget_bytes:
                    key = (relative_work(c, pol), full, backend != "grouped", attention)
                    if best is None or key < best[0]:
                        best = (key, pol, est)
    if best is None:
        pol, est = smallest
        raise ValueError(f"model.memory_budget_gib: nothing fits {budget_bytes / GiB:.1f} GiB at micro-batch "
                         f"{micro_batch} x {seq} tokens; the smallest estimate is {est / GiB:.1f} GiB "
                         f"({pol.describe(L)}, train.optim {optim}). Lower per_device_train_batch_size (and raise "
                         f"gradient_accumulation_steps), use train.optim adamw_8bit, or raise the budget")
    return best[1], best[2]


def _nf4_bytes(shape) -> int:
    """Storage of one NF4 tensor as `NF4Weight` holds it: packed codes, uint8 absmax, fp32 absmax2, code2."""
    n = math.prod(shape)
    nb = n // 64
    return n // 2 + nb + 4 * math.ceil(nb / 256) + 4 * 256


def memory_estimate(model, dtype_bytes: int = 2) -> dict:
    """Bytes for weights (NF4 as mixtune stores it / all 16-bit), the fp32 adapter, its gradients and AdamW's
    fp32 m and v. Activations are not included (they depend on batch, length and checkpointing)."""
    adapter_ids = {id(p) for p in lora_parameters(model)}
    trainable = sum(p.numel() for p in lora_parameters(model))
    dense = quantizable = nf4 = 0
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            continue
        leaf = [x for x in name.split(".") if x not in ("base", "weight")][-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"):
            quantizable += p.numel()
            nf4 += _nf4_bytes(p.shape)
        else:
            dense += p.numel()
    for name, mod in model.named_modules():
        if isinstance(mod, NF4Weight):
            quantizable += math.prod(mod.shape)
            nf4 += _nf4_bytes(mod.shape)
    weights_nf4 = nf4 + dense * dtype_bytes
    weights_16 = (quantizable + dense) * dtype_bytes
    adapter = trainable * 4
    grads = trainable * 4
    optim = trainable * 8
    return {"weights_nf4": weights_nf4, "weights_bf16": weights_16, "adapter_fp32": adapter,
            "gradients_fp32": grads, "optimizer_adamw_fp32": optim,
            "training_total_nf4": weights_nf4 + adapter + grads + optim,
            "training_total_bf16": weights_16 + adapter + grads + optim}
