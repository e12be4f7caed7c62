"""MoE architecture hyper-parameters, read from / written to an HF `config.json` of any supported family.

    cfg = MoEConfig.from_pretrained("ckpt")          # mixtral, qwen3_moe, olmoe, qwen2_moe (model/family.py)
    cfg.family.model_type, cfg.num_local_experts, cfg.intermediate_size   # one expert's size, whatever the key

One set of field names serves every family (Mixtral's where they exist): `num_local_experts` is the expert count
(`num_experts` in Qwen/OLMoE files), `intermediate_size` one expert's width (`moe_intermediate_size` in Qwen
files), `dense_intermediate_size` the dense MLP's (Qwen's `intermediate_size`). `from_dict` / `to_hf_dict`
translate; keys we do not model are kept in `extra` so a config round-trips.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .family import FAMILIES, MIXTRAL, Family, family_of

# stock transformers' defaults where a family's config.json may omit a key (transformers 5.x config classes)
_DEFAULTS = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.001, "bos_token_id": 1,
                "eos_token_id": 2},
    "qwen3_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001, "num_experts": 128,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144},
    "olmoe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.01, "num_experts": 64,
              "num_experts_per_tok": 8, "intermediate_size": 2048, "eos_token_id": 50279},
    "qwen2_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001, "num_experts": 60,
                  "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "intermediate_size": 5632,
                  "shared_expert_intermediate_size": 5632, "qkv_bias": True},
}


@dataclass
class MoEConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336          # one expert's intermediate width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    torch_dtype: str = "bfloat16"
    model_type: str = "mixtral"
    norm_topk_prob: bool = True             # renormalise the top-k routing weights
    dense_intermediate_size: int = 0        # width of the dense MLP of non-MoE layers (Qwen: intermediate_size)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    attention_bias: bool = False            # the family's bias key (attention_bias / qkv_bias) is true
    clip_qkv: Optional[float] = None
    extra: dict = field(default_factory=dict)  # unknown keys, kept for round trips

    def __post_init__(self):
        family_of(self.model_type)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"only silu experts are supported, config has hidden_act={self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} > experts {self.num_local_experts}")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def is_moe_layer(self, layer: int) -> bool:
        return self.family.is_moe_layer(layer, self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        d = dict(d)
        fam = family_of(d.get("model_type", "mixtral"))
        if fam.n_experts_key != "num_local_experts" and "num_local_experts" in d:
            # transformers 5.x writes the attribute alias num_local_experts for num_experts in some families
            d.setdefault(fam.n_experts_key, d.pop("num_local_experts"))
        d = {**_DEFAULTS.get(fam.model_type, {}), **{k: v for k, v in d.items() if v is not None}}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" in rope and ("rope_theta" not in d or "rope_parameters" in d):
            d["rope_theta"] = rope["rope_theta"]
        if d.get("dtype") and not d.get("torch_dtype"):
            d["torch_dtype"] = d["dtype"]
        known: dict = {"model_type": fam.model_type}
        consumed = {"model_type", "dtype"}
        if fam is not MIXTRAL:  # translate the family's spelling into ours
            known["num_local_experts"] = d[fam.n_experts_key]
            known["intermediate_size"] = d[fam.expert_size_key]
            consumed |= {fam.n_experts_key, fam.expert_size_key}
            if fam.expert_size_key != "intermediate_size" and "intermediate_size" in d:
                known["dense_intermediate_size"] = d["intermediate_size"]
                consumed.add("intermediate_size")
            known["norm_topk_prob"] = bool(d.get("norm_topk_prob", fam.norm_topk_default))
            consumed.add("norm_topk_prob")
            if fam.bias_key:
                known["attention_bias"] = bool(d.get(fam.bias_key, False))
                consumed.add(fam.bias_key)
            if d.get("num_key_value_heads") is None:
                d["num_key_value_heads"] = d.get("num_attention_heads", 32)
            if d.get("use_sliding_window"):
                raise ValueError(f"{fam.model_type}: use_sliding_window is not supported")
            d.pop("sliding_window", None)  # off unless use_sliding_window (refused above)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"} - set(known)
        known.update({k: v for k, v in d.items() if k in names and k not in consumed})
        extra = {k: v for k, v in d.items() if k not in names and k not in consumed and k not in known}
        if isinstance(known.get("eos_token_id"), list):
            known["eos_token_id"] = known["eos_token_id"][0]
        if known.get("mlp_only_layers") is None:
            known["mlp_only_layers"] = []
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MoEConfig":
        p = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(p) as fh:
            try:
                d = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: not a JSON object (an HF config.json)")
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{p}: {e}") from None

    def to_hf_dict(self) -> dict:
        """config.json in the family's own spelling (stock transformers loads it)."""
        fam = self.family
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        ours = ("norm_topk_prob", "dense_intermediate_size", "shared_expert_intermediate_size",
                "decoder_sparse_step", "mlp_only_layers", "attention_bias", "clip_qkv")
        mine = {k: d.pop(k) for k in ours}
        out = dict(self.extra)
        out.update(d)
        if fam is not MIXTRAL:
            out.pop("num_local_experts")
            out.pop("intermediate_size")
            out[fam.n_experts_key] = self.num_local_experts
            out[fam.expert_size_key] = self.intermediate_size
            if fam.expert_size_key != "intermediate_size":
                out["intermediate_size"] = mine["dense_intermediate_size"] or self.intermediate_size
            out["norm_topk_prob"] = mine["norm_topk_prob"]
            if fam.bias_key:
                out[fam.bias_key] = mine["attention_bias"]
            if fam.dense_layers:
                out["decoder_sparse_step"] = mine["decoder_sparse_step"]
                out["mlp_only_layers"] = list(mine["mlp_only_layers"])
            if fam.shared_expert:
                out["shared_expert_intermediate_size"] = mine["shared_expert_intermediate_size"]
            if fam.has_clip_qkv:
                out["clip_qkv"] = mine["clip_qkv"]
            out.pop("sliding_window", None)
        out["model_type"] = fam.model_type
        out["architectures"] = [fam.architecture]
        out.setdefault("attention_dropout", 0.0)
        out.setdefault("initializer_range", 0.02)
        out.setdefault("output_router_logits", False)
        out.setdefault("use_cache", True)
        out.pop("rope_parameters", None)
        out.pop("rope_scaling", None)
        out.pop("dtype", None)
        return out

    def save(self, path: str | os.PathLike) -> None:
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump(self.to_hf_dict(), fh, indent=2)


MixtralConfig = MoEConfig  # the name every module used before the families: the same class

# The embedded tiny default: the real tokenizer's vocabulary, Mixtral's structure, CPU-sized.
TINY_CONFIG = MoEConfig(
    vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5,
    num_local_experts=4, num_experts_per_tok=2, torch_dtype="bfloat16",
)

# The reference recipe's model, for `inspect` and for building full-size random models on a GPU.
MIXTRAL_8X7B_CONFIG = MoEConfig()

# Tiny random models of the other families (the offline `--model.family` default and the parity tests): each
# exercises its family's variants (Qwen3: head_dim independent of hidden, a dense layer, renormalised top-k;
# OLMoE: q/k norm over the projection; Qwen2-MoE: shared expert, q/k/v biases, a dense layer).
TINY_FAMILY_CONFIGS = {
    "mixtral": TINY_CONFIG,
    "qwen3_moe": MoEConfig(
        model_type="qwen3_moe", vocab_size=32000, hidden_size=64, intermediate_size=32, dense_intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rope_theta=1e6, rms_norm_eps=1e-6, num_local_experts=8, num_experts_per_tok=4, norm_topk_prob=True,
        mlp_only_layers=[1], router_aux_loss_coef=0.001, bos_token_id=1, eos_token_id=2),
    "olmoe": MoEConfig(
        model_type="olmoe", vocab_size=32000, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, num_local_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
        router_aux_loss_coef=0.01, bos_token_id=1, eos_token_id=2),
    "qwen2_moe": MoEConfig(
        model_type="qwen2_moe", vocab_size=32000, hidden_size=64, intermediate_size=32, dense_intermediate_size=96,
        shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, num_local_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, attention_bias=True, decoder_sparse_step=1, mlp_only_layers=[2],
        router_aux_loss_coef=0.001, bos_token_id=1, eos_token_id=2),
}

# Published geometries of the models people fine-tune (the Hub config.json values), for `mixtune bench
# --geometry` and the random full-size builder; `inspect` reads the same numbers from a real config.json.
GEOMETRIES = {
    "mixtral-8x7b": MIXTRAL_8X7B_CONFIG,
    "mixtral-8x22b": MoEConfig(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, max_position_embeddings=65536, rope_theta=1e6, rms_norm_eps=1e-5,
        num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
    "qwen3-30b-a3b": MoEConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=768,
        dense_intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, num_local_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001, bos_token_id=None,
        eos_token_id=151645),
    "olmoe-1b-7b": MoEConfig(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, num_local_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        router_aux_loss_coef=0.01, bos_token_id=None, eos_token_id=50279),
    "qwen2-57b-a14b": MoEConfig(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=3584, intermediate_size=2560,
        dense_intermediate_size=18944, shared_expert_intermediate_size=20480, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, num_local_experts=64, num_experts_per_tok=8, norm_topk_prob=False, attention_bias=True,
        router_aux_loss_coef=0.001, bos_token_id=None, eos_token_id=151643),
}
