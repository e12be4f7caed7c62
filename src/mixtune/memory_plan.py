"""Activation checkpointing chosen by memory: estimate a training step's peak GPU memory from the model's
shapes, and pick the cheapest recomputation policy that fits a budget.

    est = estimate_bytes(config, weights_bytes, trainable, micro_batch, seq, r, optim, policy, accum=1)
    policy, est = plan(budget_bytes, config, weights_bytes, trainable, micro_batch, seq, r, optim, accum=1)
    counts = param_counts(model)        # total / active per token / trainable, by part
    mem = memory_estimate(model)        # weights (nf4 and bf16), adapter, gradients, AdamW state

A policy is (full, attention, backend):
- `full`: the first `full` layers recompute everything in backward;
- `attention`: the other layers recompute their attention block;
- `backend`: `grouped` keeps the experts' (tokens × 2I) pre-activations, `grouped_lowmem` recomputes them.

The estimate is the largest of three moments of a step:
- the loss (after the forward): everything the layers keep + one bf16 logits chunk (kernels/loss.py reuses one
  buffer of `chunk_rows(vocab)` rows for every chunk) + a few (tokens x H) tensors;
- each layer's backward, top layer first: what the layers not yet done keep + that layer's backward buffers,
  phase by phase (`_moe_backward`) + the gradients that exist by then;
- the optimizer step: weights, adapter, every gradient and the optimizer's moments; no activations.
Always present: the weights, the fp32 adapter and the optimizer's moments. Gradients (fp32, one per adapter
parameter): with `accum` 1 and zero_grad(set_to_none=True) none exists during the forward and each layer's
appear during its backward, while its activations are freed — so at the activation peak only the top layers'
count, and all of them only at the optimizer step; with `accum` > 1 all are held from the first micro-batch
on (+ the running layer's fresh ones before they are added in). Counting every gradient at the activation peak
at accum 1 overestimated the measured H200 peaks by 7-12%. Three other terms were corrected against the
kernels: the logits chunk no longer adds to a layer's backward (it is gone by then: the loss is its own
moment), the experts' w1|w3 phase no longer counts dg (freed before), and a recomputed layer's rebuilt h13 is
released before that phase; together with the gradients they made Mixtral with every layer recomputed 20% high.
What autograd keeps per token and layer is counted tensor by tensor from the shapes (`_per_token_layer`), bf16,
for every family (model/family.py): the query width from head_dim, q/k norms, q/k/v clipping, a shared expert,
and dense MLP layers where the config has them (each layer counted as its kind). A fully recomputed layer keeps
its input and, in its backward, rebuilds the rest — whose h13 its experts' backward releases before the
w1|w3 phase (a checkpointed tensor is freed once unpacked; one that is not recomputed stays saved until the
layer's backward ends). With `precision="fp8"` the dequantized weights take one byte each and each product's
activation operand gets an e4m3 copy. `KernelMemory` names what depends on the kernels' version: since session 7
the experts keep no outputs y (the routing weights' gradient comes out of the SwiGLU backward) and the loss
reuses one logits buffer; the measurements taken before are checked under `KERNELS_S6`, which keeps both.

Against the H200 measurements (`tests/test_memory_plan.py` holds every row: Mixtral-8x7B at 4 and 32 layers,
Qwen3-30B-A3B at 4 and 48 layers, accumulation 1 to 6, no / attention / full recomputation, bf16 and FP8
experts) it is within 1.2% below to 0.1% below: about 1.5% of the per-layer activations is not identified
(router/sort bookkeeping and the like), so leave a few % of margin.
The budget is for `torch.cuda.max_memory_allocated`: leave the CUDA context and the allocator's slack
(a few %) out of the card's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

from .kernels.loss import chunk_rows
from .lora import lora_parameters
from .model.config import MixtralConfig
from .model.layout import EXPERT_W, quantized_linear
from .quant.nf4 import NF4Weight, nf4_storage_ids

GiB = 2**30
BF16 = 2


@dataclass(frozen=True)
class KernelMemory:
    """What the kernels allocate that the estimate depends on, as a model of them (the defaults are today's
    kernels). The H200 measurements of sessions 2-6 were taken with kernels that kept each MoE layer's expert
    outputs y (k x H per token) for the routing weights' gradient and held two 4096-row logits chunks at once
    (`KERNELS_S6`); the tests check those rows under that model and the later ones under the defaults."""
    expert_outputs: bool = False  # the experts keep y (M, H) for backward
    logits_buffers: int = 1  # logits chunks alive at once while the loss runs (when there is more than one)
    logits_rows: int = 0  # rows per logits chunk; 0: kernels.loss.chunk_rows(vocab)


KERNELS_S6 = KernelMemory(expert_outputs=True, logits_buffers=2, logits_rows=4096)


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


def _per_token_layer(c: MixtralConfig, r: int, lora_dropout: float = 0.0, shared_a: bool = False,
                     kernels: KernelMemory = KernelMemory()) -> dict:
    """Bytes autograd keeps per token and layer, by part (every family: q/k/v widths from head_dim, q/k norms,
    q/k/v clipping, a shared expert, dense MLP layers). shared_a: the experts' w1/w3 share one LoRA A (one
    inner product for both). kernels.expert_outputs: the experts also keep their outputs y (today's take the
    routing weights' gradient from the SwiGLU backward instead)."""
    H, I, k, E = c.hidden_size, c.intermediate_size, c.num_experts_per_tok, c.num_local_experts
    fam = c.family
    qd = c.num_attention_heads * c.head_dim  # query width (= H for Mixtral; Qwen3: independent of H)
    kv = c.num_key_value_heads * c.head_dim
    # LoRA dropout on q/k/v/o keeps each projection's dropped input (bf16) and its mask (1 byte)
    dropout = (3 * H + qd) * (BF16 + 1) if lora_dropout > 0 else 0
    # q/k RMSNorm keeps its input (bf16) and one fp32 rstd per normed row (per head, or per projection)
    rows = c.num_attention_heads + c.num_key_value_heads if fam.qk_norm == "head" else 2
    qk_norm = (qd + kv) * BF16 + 4 * rows if fam.qk_norm != "none" else 0
    clip = (qd + 2 * kv) * BF16 if fam.has_clip_qkv and c.clip_qkv is not None else 0  # clamp keeps its input
    Is = c.shared_expert_intermediate_size if fam.shared_expert else 0
    Id = c.dense_intermediate_size or I
    return {
        # norm input, normed x (q/k/v input), q|k|v after RoPE, attention output (o_proj input), softmax stats,
        # the four LoRA inner products
        "attention": BF16 * (2 * H + 2 * qd + 2 * kv) + 4 * c.num_attention_heads + 4 * r * BF16 + dropout
        + qk_norm + clip,
        "attention_recomputed": H * BF16,  # the block's input only
        # residual (norm input), normed x (router + experts input), the router's logits (compute dtype: its fused
        # backward recomputes the softmax; kernels/router.py) and top-k weights/ids, (earlier kernels: the expert
        # outputs y, k x H), LoRA inner products
        "moe": 2 * H * BF16 + E * BF16 + k * 12 + (k * H * BF16 if kernels.expert_outputs else 0)
        + k * (2 if shared_a else 3) * r * BF16,
        "h13": k * 2 * I * BF16,  # the (tokens x 2I) pre-activations `grouped` keeps
        # Qwen2-MoE's shared expert: gate and up outputs, silu(gate), their product (down_proj input), its output
        # for the sigmoid gate's product, the gate (1 value); LoRA inner products
        "shared_expert": (BF16 * (4 * Is + H + 1) + 4 + 3 * r * BF16) if Is else 0,
        # a dense layer's MLP in place of the MoE block: residual, normed x, gate/up/silu/product, LoRA products
        "dense": BF16 * (2 * H + 4 * Id) + 3 * r * BF16,
        "layer_recomputed": H * BF16,
    }


def _moe_layers(c: MixtralConfig) -> list[bool]:
    """Per decoder layer: whether it has the MoE block (else a dense MLP)."""
    return [c.is_moe_layer(l) for l in range(c.num_hidden_layers)]


def _kept(p: dict, moe: bool, attention: bool, lowmem: bool) -> float:
    """Bytes per token a layer that is not fully recomputed keeps (see _per_token_layer)."""
    attn = p["attention_recomputed"] if attention else p["attention"]
    if not moe:
        return attn + p["dense"]
    return attn + p["moe"] + p["shared_expert"] + (0 if lowmem else p["h13"])


def _moe_backward(c: MixtralConfig, T: int, r: int, lowmem: bool, fp8: bool, shared_a: bool = False) -> float:
    """(A, B, C): bytes one MoE layer's experts backward (kernels/moe.py, moe_fp8.py) allocates on top of what the layer
    keeps in each of its three phases, M = T·k assignments (q: FP8's e4m3 copy of a product's
    activation operand, wb: bytes per dequantized weight):
      A  w2:      [dy | du2] (M, H+r), dg (M, I), W2 with A2 rows (E, H+r, I);
      B  SwiGLU:  dg (g is written over it), [dh13 | du13] (M, 2I+2r); grouped_lowmem adds the recomputed h13
                  (M, 2I), [xs | s·u13] (M, H+2r) and (bf16) the [W1; W3 | B] buffer it keeps for dxs;
      C  w1|w3:   [dh13 | du13], dxs (M, H), [W1; W3] with A13 rows (E, 2I+2r, H) — dg is freed before.
    (The estimate once added dg to C: M·I·2 bytes too many, 0.9 GiB for Mixtral at 16k tokens.) With shared_a
    the w1|w3 LoRA's inner width, 2r above, is r."""
    H, I, k, E = c.hidden_size, c.intermediate_size, c.num_experts_per_tok, c.num_local_experts
    M, q, wb = T * k, (1 if fp8 else 0), (1 if fp8 else BF16)
    w = r if shared_a else 2 * r  # the w1|w3 LoRA's inner width (r is also w2's rank)
    a = M * ((H + r) * (BF16 + q) + I * BF16) + E * (H + r) * I * wb
    b = M * (I + 2 * I + w) * BF16
    cc = M * ((2 * I + w) * (BF16 + q) + H * BF16) + E * (2 * I + w) * H * wb
    if lowmem:
        wa = E * 2 * I * (H + w)
        if fp8:  # the e4m3 [W1; W3] is freed once h13 is rebuilt; [xs | s·u13] stays (xs: the LoRA gradients)
            b = max(M * (I * BF16 + (H + w) * (BF16 + q) + 2 * I * BF16) + wa, b + M * (2 * I + H + w) * BF16)
            cc += M * (H + w) * BF16
        else:  # the bf16 buffer is reused for dxs: dh13 (M, 2I) and du13 (M, 2r) apart, no A13 rows
            b = M * (I + 2 * I + 2 * I + H + w) * BF16 + wa * BF16
            cc = M * (2 * I + w + H + w + H) * BF16 + wa * BF16
    return a, b, cc


def estimate_bytes(c: MixtralConfig, weights_bytes: float, trainable: int, micro_batch: int, seq: int, r: int,
                   optim: str, policy: Policy, lora_dropout: float = 0.0, precision: str = "bf16",
                   ranks: int = 1, strategy: str = "ddp", accum: int = 1, shared_a: bool = False,
                   kernels: KernelMemory = KernelMemory()) -> float:
    """Peak bytes of one training step on one GPU (see the module doc). lora_dropout > 0 counts the dropped
    inputs that LoRA on q/k/v/o keeps (an upper bound when fewer of them are targets); precision is the experts'
    (model.expert_precision). `ranks` GPUs under `strategy` fsdp: the decoder layers' weights, the adapter, its
    gradients and the optimizer state are divided by `ranks`, plus two layers all-gathered whole (the running
    one and the prefetched next) and the root (embeddings, lm_head), which FSDP2 keeps whole through the step;
    activations are per GPU either way. ddp: every rank holds everything. `accum` (gradient accumulation
    steps): 1 -- no gradient exists before the backward (zero_grad(set_to_none=True)), each layer's appear as
    its backward runs; > 1 -- every gradient is held from the first micro-batch on. shared_a: lora.shared_gate_up_a
    (`trainable` already counts the shared A once). kernels: the kernels' allocations modelled (`KernelMemory`:
    today's by default)."""
    L = c.num_hidden_layers
    H, I = c.hidden_size, c.intermediate_size
    T = micro_batch * seq
    state = trainable * 8 if optim == "adamw" else trainable * 2.02  # fp32 m, v | 8-bit m, v + block scales
    fixed = weights_bytes + trainable * 4 + state  # + the fp32 adapter
    sharded = strategy == "fsdp" and ranks > 1
    div = ranks if sharded else 1
    if sharded:
        root = c.vocab_size * H * BF16 * (1 if c.tie_word_embeddings else 2)
        layer = max(0.0, weights_bytes - root) / L
        # two layers all-gathered whole (the running one, the prefetched next): NF4 storage and fp32 adapter, in
        # FSDP2's all-gather buffers beside this rank's own shards (measured on 2 H200s: Mixtral-8x7B 32 layers
        # and Mixtral-8x22B 56 layers, bench/fsdp_bench.sh; counting them as (ranks-1)/ranks of a layer was
        # 1.2-2.5 GiB low)
        gathered = 2 * (layer + trainable * 4 / L)
        fixed = root + (weights_bytes - root + trainable * 4 + state) / ranks + gathered
    grads = trainable * 4 / div  # fp32, sharded under fsdp
    per_layer_grads = trainable * 4 / L  # split evenly over the layers (a LoRA lm_head counts in its share)
    fp8 = precision == "fp8"
    p = _per_token_layer(c, r, lora_dropout, shared_a, kernels)
    lowmem = policy.backend == "grouped_lowmem"
    kinds = _moe_layers(c)
    full = min(policy.full, L)
    saved = [T * (p["layer_recomputed"] if l < full else _kept(p, moe, policy.attention, lowmem))
             for l, moe in enumerate(kinds)]
    Is = c.shared_expert_intermediate_size if c.family.shared_expert else 0
    Id = c.dense_intermediate_size or I

    def transient(moe: bool, recomputed: bool) -> float:
        """One layer's backward on top of what all layers keep: its buffers (+ the saved set it rebuilds when
        recomputed: the checkpoint's input is kept already) and the layer output's gradient, which autograd
        holds for the residual branch while the block's backward runs."""
        rebuilt = T * (_kept(p, moe, False, lowmem) - p["layer_recomputed"]) if recomputed else 0
        if not moe:
            return Id * H * BF16 + T * (3 * Id + H) * BF16 + rebuilt + T * H * BF16
        a, b, cc = _moe_backward(c, T, r, lowmem, fp8, shared_a)
        # a recomputed layer's h13 lives in the checkpoint's frame until the experts' backward unpacks it;
        # its backward drops it before phase C (a layer that is not recomputed keeps it in its saved set)
        h13 = T * p["h13"] if recomputed and not lowmem else 0
        t = max(a + rebuilt, b + rebuilt, cc + rebuilt - h13)
        if Is:  # the shared expert's dequantized matrix and (tokens x 3 x width) gradients
            t = max(t, Is * H * BF16 + T * (3 * Is + H) * BF16 + rebuilt)
        return t + T * H * BF16

    # the loss (kernels/loss.py): one reused bf16 logits buffer of chunk_rows(vocab) rows (4096 at 32k, 2048 at
    # 152k), overwritten by its gradient (kernels/ce.py); the final norm's input and output, the labelled rows'
    # copy and their gradient (tokens x H each)
    rows = min(T, kernels.logits_rows or chunk_rows(c.vocab_size))
    loss = rows * c.vocab_size * BF16 * (kernels.logits_buffers if T > rows else 1) + 4 * T * H * BF16
    live = sum(saved)
    peak = fixed + (grads if accum > 1 else 0) + live + loss
    cache = {}
    for l in reversed(range(L)):  # backward: the top layer first; each frees its saved set when done
        key = (kinds[l], l < full)
        if key not in cache:
            cache[key] = transient(*key)
        # accum 1: the gradients of this layer and those above (sharded under fsdp); accum > 1: all of them, plus
        # this layer's fresh ones before they are added in (under fsdp: unsharded before the reduce-scatter)
        held = grads if accum > 1 else (L - l) * per_layer_grads / div
        fresh = per_layer_grads if accum > 1 or sharded else 0
        peak = max(peak, fixed + held + fresh + live + cache[key])
        live -= saved[l]
    return max(peak, fixed + grads)  # the optimizer step: every gradient and moment, no activations


def _layer_work(c: MixtralConfig) -> tuple[int, list[int], list[int]]:
    """Multiply-adds per token: attention projections (each layer), each layer's MLP part (top-k experts +
    shared expert, or the dense MLP), and what grouped_lowmem recomputes per layer (the experts' w1|w3)."""
    H, I, k = c.hidden_size, c.intermediate_size, c.num_experts_per_tok
    qd, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    A = H * (2 * qd + 2 * kv)  # q, k, v, o
    Is = c.shared_expert_intermediate_size if c.family.shared_expert else 0
    Id = c.dense_intermediate_size or I
    kinds = _moe_layers(c)
    X = [k * 3 * H * I + 3 * H * Is if moe else 3 * H * Id for moe in kinds]  # top-k experts' w1, w3, w2
    R = [2 * H * I * k if moe else 0 for moe in kinds]  # = (2/3) of the routed experts' work
    return A, X, R


def relative_work(c: MixtralConfig, policy: Policy) -> float:
    """Matmul work of a step relative to no recomputation (1.0): recomputing a layer adds its forward, the
    attention block its share, and the low-memory MoE the w1|w3 product."""
    L = c.num_hidden_layers
    A, X, R = _layer_work(c)
    base = 4 * sum(A + x for x in X)
    full = min(policy.full, L)
    extra = sum(2 * (A + x) for x in X[:full])
    if policy.attention:
        extra += (L - full) * 2 * A
    if policy.backend == "grouped_lowmem":
        extra += sum(2 * x for x in R)
    return (base + extra) / base


def plan(budget_bytes: float, c: MixtralConfig, weights_bytes: float, trainable: int, micro_batch: int, seq: int,
         r: int, optim: str, lora_dropout: float = 0.0, precision: str = "bf16", ranks: int = 1,
         strategy: str = "ddp", accum: int = 1, shared_a: bool = False) -> tuple[Policy, float]:
    """The policy with the least recomputation whose estimate fits `budget_bytes` (per GPU) -> (policy,
    estimate). Raises ValueError naming the smallest estimate when nothing fits."""
    L = c.num_hidden_layers
    best = None
    smallest = None
    for backend in ("grouped", "grouped_lowmem"):
        for attention in (False, True):
            for full in range(L + 1):
                pol = Policy(full, attention and full < L, backend)
                est = estimate_bytes(c, weights_bytes, trainable, micro_batch, seq, r, optim, pol, lora_dropout,
                                     precision, ranks, strategy, accum, shared_a)
                if smallest is None or est < smallest[1]:
                    smallest = (pol, est)
                if est <= budget_bytes:
                    key = (relative_work(c, pol), full, backend != "grouped", attention)
                    if best is None or key < best[0]:
                        best = (key, pol, est)
    if best is None:
        pol, est = smallest
        raise ValueError(f"model.memory_budget_gib: nothing fits {budget_bytes / GiB:.1f} GiB per GPU at micro-batch "
                         f"{micro_batch} x {seq} tokens; the smallest estimate is {est / GiB:.1f} GiB "
                         f"({pol.describe(L)}, train.optim {optim}). Lower per_device_train_batch_size (and raise "
                         f"gradient_accumulation_steps), use train.optim adamw_8bit, or raise the budget")
    return best[1], best[2]


def _nf4_bytes(shape) -> int:
    """Storage of one NF4 tensor as `NF4Weight` holds it: packed codes, uint8 absmax, fp32 absmax2, code2."""
    n = math.prod(shape)
    nb = n // 64
    return n // 2 + nb + 4 * math.ceil(nb / 256) + 4 * 256


def _strip(path: str) -> str:
    """A parameter / NF4 weight path without LoRA's `.base` and the trailing `.weight`: the module's path."""
    parts = [x for x in path.split(".") if x != "base"]
    if parts and parts[-1] == "weight":
        parts = parts[:-1]
    return ".".join(parts)


def _quantizable(path: str) -> bool:
    """Whether mixtune stores this base tensor in NF4 under quant=nf4 (model.layout.quantized_linear, plus the
    expert stacks)."""
    module = _strip(path)
    parent, _, leaf = module.rpartition(".")
    if parent.endswith(".experts") and leaf in EXPERT_W:
        return True
    return quantized_linear(module)


def _base_tensors(model):
    """(path, shape, stored in NF4 under quant=nf4) of every base weight (adapter excluded; NF4 weights by their
    logical shape; a tied lm_head once, under the embedding's name)."""
    adapter_ids = {id(p) for p in lora_parameters(model)} | nf4_storage_ids(model)  # NF4: by shape, below
    for name, p in model.named_parameters():
        if id(p) not in adapter_ids:
            yield name, tuple(p.shape), _quantizable(name)
    for name, mod in model.named_modules():
        if isinstance(mod, NF4Weight):
            yield name, tuple(mod.shape), True


PARTS = ("embeddings", "attention", "router", "experts", "shared_expert", "dense_mlp", "norms", "lm_head")


def _part(path: str) -> str:
    m = _strip(path)
    if m.startswith("model.embed_tokens"):
        return "embeddings"
    if m.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in m:
        return "attention"  # q/k/v/o, their biases, q/k norms
    if ".block_sparse_moe.experts." in m:
        return "experts"
    if ".block_sparse_moe.shared_expert" in m:
        return "shared_expert"  # the shared expert and its sigmoid gate
    if ".block_sparse_moe.gate" in m:
        return "router"
    if ".mlp." in m:
        return "dense_mlp"
    return "norms"  # layer norms and the final norm


def param_counts(model) -> dict:
    """Base parameters (elements; NF4 by logical shape; the LoRA adapter excluded, a tied lm_head counted once),
    by part, and the ACTIVE count: what one token's forward uses — everything but the routed experts, which
    count k of E (num_experts_per_tok of num_local_experts). Embeddings and lm_head count whole, as the
    published "active" figures (Mixtral 13B/39B, Qwen3-30B-A3B 3.3B) count them.

    -> {"total": int, "active": int, "trainable": int, "by_part": {part: int}, "active_by_part": {part: int}}"""
    c = model.config
    k, E = c.num_experts_per_tok, c.num_local_experts
    by_part = dict.fromkeys(PARTS, 0)
    for name, shape, _ in _base_tensors(model):
        by_part[_part(name)] += math.prod(shape)
    active = dict(by_part, experts=by_part["experts"] // E * k)  # each stack is (E, out, in): k of E
    return {"total": sum(by_part.values()), "active": sum(active.values()),
            "trainable": sum(p.numel() for p in lora_parameters(model)), "by_part": by_part,
            "active_by_part": active}


def memory_estimate(model, dtype_bytes: int = 2) -> dict:
    """Bytes for weights (NF4 as mixtune stores it / all 16-bit), the fp32 adapter, its gradients and AdamW's
    fp32 m and v. NF4 (whatever the model was built with): attention projections, expert stacks, and the dense
    SwiGLU of dense layers and shared experts (model.layout.quantized_linear); the rest (embeddings, norms,
    biases, router, shared-expert gate, lm_head) 16-bit. Activations are not included (they depend on batch,
    length and checkpointing)."""
    trainable = sum(p.numel() for p in lora_parameters(model))
    dense = quantizable = nf4 = 0
    for _, shape, quantized in _base_tensors(model):
        if quantized:
            quantizable += math.prod(shape)
            nf4 += _nf4_bytes(shape)
        else:
            dense += math.prod(shape)
    weights_nf4 = nf4 + dense * dtype_bytes
    weights_16 = (quantizable + dense) * dtype_bytes
    adapter = trainable * 4
    grads = trainable * 4
    optim = trainable * 8
    return {"weights_nf4": weights_nf4, "weights_bf16": weights_16, "adapter_fp32": adapter,
            "gradients_fp32": grads, "optimizer_adamw_fp32": optim,
            "training_total_nf4": weights_nf4 + adapter + grads + optim,
            "training_total_bf16": weights_16 + adapter + grads + optim}
