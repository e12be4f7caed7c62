"""One MoE decoder in plain PyTorch for every family (model/family.py), module names mirroring Mixtral's keys.

    model = MoEForCausalLM(config)                # random init (or build on the meta device)
    out = model(input_ids, position_ids, labels)  # out.loss, out.logits, out.aux_loss

Packed rows: `position_ids` restart at 0 at each example; the attention mask is derived from them so no
token attends across an example boundary. Routing: softmax over all experts in fp32, top-k, renormalised when
the config says so (Mixtral, Qwen3: norm_topk_prob), cast back. Experts are stacked per layer (`w1`, `w3`:
(E, I, H); `w2`: (E, H, I)) and run through `mixtune.kernels.moe_experts`. The family's variants: biases on
the attention projections, q/k RMSNorm per head (Qwen3) or over the whole projection (OLMoE), q/k/v clipping,
a shared expert with a sigmoid gate (Qwen2-MoE), and dense SwiGLU layers (`mlp`) where the config says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import MoEConfig


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor] = None  # (B, T, V) in the compute dtype, or None
    loss: Optional[torch.Tensor] = None  # mean token CE over shifted labels (fp32)
    loss_sum: Optional[torch.Tensor] = None  # sum of token CE (fp32), for exact accumulation
    n_tokens: Optional[torch.Tensor] = None  # number of label tokens (long)
    aux_loss: Optional[torch.Tensor] = None  # Mixtral load-balancing loss (unscaled), or None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [kernels hook] same arithmetic as below, but saves only x and the row rstd for backward
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return kernels.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids (B, T) -> cos, sin (B, T, head_dim) in `dtype` (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64)
                                .float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q, k, cos, sin):
    """q (B, nh, T, d), k (B, nkv, T, d), cos/sin (B, T, d). (`kernels.apply_rope` fuses it on CUDA.)"""
    if kernels.use_rope_kernel(q):
        return kernels.apply_rope(q, k, cos, sin)
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class KVCache:
    """Pre-allocated per-layer key/value cache for decoding. Shapes (B, n_kv, max_len, head_dim)."""

    def __init__(self, config: MoEConfig, batch: int, max_len: int, device, dtype):
        self.k = [torch.zeros(batch, config.num_key_value_heads, max_len, config.head_dim, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.length = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v (B, n_kv, T, d) at [length, length+T); return all cached keys/values so far."""
        T = k.shape[2]
        s = self.length
        if s + T > self.max_len:
            raise ValueError(f"KV cache overflow: {s + T} > {self.max_len}")
        self.k[layer][:, :, s:s + T] = k
        self.v[layer][:, :, s:s + T] = v
        return self.k[layer][:, :, :s + T], self.v[layer][:, :, :s + T]


class MoEAttention(nn.Module):
    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        fam = config.family
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        H = config.hidden_size
        bias = {n: config.attention_bias and n in fam.bias_on for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=bias["q_proj"])
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias["k_proj"])
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias["v_proj"])
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=bias["o_proj"])
        self.qk_norm = fam.qk_norm
        if fam.qk_norm == "head":  # Qwen3: over head_dim, each head alike
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        elif fam.qk_norm == "proj":  # OLMoE: over the whole projection
            self.q_norm = RMSNorm(self.n_heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.head_dim, config.rms_norm_eps)
        self.clip_qkv = config.clip_qkv if fam.has_clip_qkv else None

    def forward(self, x, cos, sin, attn, kv_cache: Optional[KVCache] = None):
        """x (B, T, H); attn: an `AttentionSpec` built once per forward."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh*d), (B, T, nkv*d) x2
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, d)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, nkv, d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, d), (B, nkv, T, d)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, d)
        o = attn(q, k, v)  # (B, nh, T, d)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MoEExperts(nn.Module):
    """E stacked SwiGLU experts: y = w2 (silu(w1 x) * (w3 x)). Weights are frozen (Parameters with
    requires_grad=False, or NF4Weight submodules); `lora` is an optional ExpertLoRA (see mixtune.lora)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.w1 = nn.Parameter(torch.empty(E, I, H), requires_grad=False)
        self.w3 = nn.Parameter(torch.empty(E, I, H), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, H, I), requires_grad=False)
        self.lora = None
        self.backend = "auto"
        self.precision = "bf16"  # or "fp8": the grouped products in e4m3 (kernels.moe_fp8), in training only

    def forward(self, x, topk_idx, topk_weight):
        """x (N, H), topk_idx (N, k), topk_weight (N, k) -> (N, H). FP8 is a training-speed setting: evaluation
        and generation (eval mode or no grad) run bf16, so their losses compare across precisions."""
        train = self.training and torch.is_grad_enabled()
        return kernels.moe_experts(x, topk_idx, topk_weight, self.w1, self.w3, self.w2, lora=self.lora,
                                   backend=self.backend, precision=self.precision if train else "bf16")


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP: down_proj(silu(gate_proj x) * up_proj x) (dense layers, Qwen2-MoE's shared expert)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """Router (`gate`), routed experts, and (Qwen2-MoE) a shared expert scaled by sigmoid(shared_expert_gate x)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.norm_topk = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = MoEExperts(config)
        if config.family.shared_expert:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, token_weight: Optional[torch.Tensor] = None):
        """x (B, T, H) -> (B, T, H), the layer's `kernels.router.RouterStats` for the load-balancing loss.
        token_weight (B*T,) fp32, optional: weighs each token in those statistics (the attention mask)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)  # (N, H)
        logits = self.gate(flat)  # (N, E) in the compute dtype
        # fp32 softmax -> top-k -> renormalise, fused; topk_w (N, k) fp32, topk_idx (N, k) int64
        topk_w, topk_idx, stats = kernels.moe_route(logits, self.top_k, self.norm_topk, token_weight)
        y = self.experts(flat, topk_idx, topk_w.to(x.dtype))
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return y.view(B, T, H), stats


class MoEDecoderLayer(nn.Module):
    """Attention, then the MoE block (`block_sparse_moe`) or, in a dense layer, a SwiGLU `mlp`."""

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MoEAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.block_sparse_moe = MoEBlock(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.dense_intermediate_size or config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def _attn_block(self, x, cos, sin, attn, kv_cache=None):
        return self.self_attn(self.input_layernorm(x), cos, sin, attn, kv_cache)

    def forward(self, x, cos, sin, attn, kv_cache=None, token_weight=None):
        """token_weight (B*T,) or None: the tokens' weights in the router statistics (MoEBlock)."""
        # [kernels hook] `checkpoint_attn`: recompute only the attention block in backward (keeps its input);
        # the MoE block keeps what its backend saves (grouped_lowmem: little more than its input and output)
        if (getattr(self, "checkpoint_attn", False) and kv_cache is None and self.training
                and torch.is_grad_enabled()):
            x = x + torch.utils.checkpoint.checkpoint(self._attn_block, x, cos, sin, attn, use_reentrant=False)
        else:
            x = x + self._attn_block(x, cos, sin, attn, kv_cache)
        h = self.post_attention_layernorm(x)
        if hasattr(self, "mlp"):  # a dense layer: no routing
            return x + self.mlp(h), None
        y, router = self.block_sparse_moe(h, token_weight)
        return x + y, router


class MoEModel(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.attn_implementation = "sdpa"
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def set_checkpointing(self, layers: int = -1, attention: bool = False) -> None:
        """Recompute the first `layers` decoder layers in backward (-1 or >= depth: all, 0: none); with
        `attention`, the other layers recompute their attention block only."""
        n = len(self.model.layers)
        n_full = n if layers < 0 else min(layers, n)
        self.gradient_checkpointing = n_full > 0
        for i, layer in enumerate(self.model.layers):
            layer.checkpoint = i < n_full
            layer.checkpoint_attn = bool(attention) and i >= n_full

    def set_moe_backend(self, backend: str, precision: str | None = None) -> None:
        """The experts' backend (kernels.MOE_BACKENDS) and, if given, their matmul precision (bf16 | fp8)."""
        for layer in self.model.layers:
            if hasattr(layer, "block_sparse_moe"):
                layer.block_sparse_moe.experts.backend = backend
                if precision is not None:
                    layer.block_sparse_moe.experts.precision = precision

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random normal(0, std) matrices, unit norms, zero biases (as transformers initialises these models)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                return_logits: bool = True, output_router_stats: bool = False,
                attention_mask: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """input_ids, position_ids, labels: (B, T). labels are unshifted with -100 where masked.
        attention_mask (B, T), optional: 1 on real tokens, 0 on padding (the batch's `attention_mask` from
        `data.collate`); it only keeps padding out of the router's load-balancing statistics (attention already
        keeps padding to itself: it is its own document)."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        n_rep = self.config.num_attention_heads // self.config.num_key_value_heads
        attn = kernels.build_attention(position_ids, past + T, n_rep, self.attn_implementation,
                                       decoding=kv_cache is not None)
        aux_parts = []
        # padding stays out of the router statistics: each token weighs its attention-mask value in them
        tok_w = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32)  # (B*T,)
        for layer in self.model.layers:
            # [kernels hook] a layer with `checkpoint = False` keeps its activations (selective checkpointing)
            if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                    and getattr(layer, "checkpoint", True)):
                h, router = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn, None, tok_w,
                                                              use_reentrant=False)
            else:
                h, router = layer(h, cos, sin, attn, kv_cache, tok_w)
            if router is not None and (output_router_stats or (labels is not None and self.training)):
                aux_parts.append(router)
        if kv_cache is not None:
            kv_cache.length += T
        h = self.model.norm(h)
        out = CausalLMOutput()
        if aux_parts:
            out.aux_loss = load_balancing_loss(aux_parts, self.config.num_local_experts)
        if labels is not None:
            out.loss_sum, out.n_tokens = kernels.linear_cross_entropy(h, self.lm_head, labels)
            out.loss = out.loss_sum / out.n_tokens.clamp(min=1)
        if return_logits:
            out.logits = self.lm_head(h)
        return out


def load_balancing_loss(router_stats, num_experts: int) -> torch.Tensor:
    """Mixtral's auxiliary loss over all layers' routing, as transformers' `load_balancing_loss_func` computes it:
    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e), over the tokens of all
    layers concatenated. router_stats: one `kernels.router.RouterStats` per MoE layer, each already weighted by the
    attention mask given to `kernels.moe_route` (1 on real tokens: only those enter the two means; none: every token
    counts). () fp32, differentiable through the statistics' prob_sums into the router logits."""
    counts = sum(s.counts for s in router_stats)  # (E,) top-k assignments per expert, all layers
    prob_sums = sum(s.prob_sums for s in router_stats)  # (E,) router probabilities summed, all layers
    n = sum(s.tokens for s in router_stats)  # () tokens (weights) of all layers
    return ((counts / n) * (prob_sums / n)).sum() * num_experts


# the names every module used before the families (the same classes)
MixtralForCausalLM = MoEForCausalLM
MixtralExperts = MoEExperts
