"""Mixtral architecture hyper-parameters, read from / written to an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class MixtralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
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
    bos_token_id: int = 1
    eos_token_id: int = 2
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)  # unknown keys, kept for round trips

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"only silu experts are supported, config has hidden_act={self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, d: dict) -> "MixtralConfig":
        d = dict(d)
        mt = d.get("model_type", "mixtral")
        if mt != "mixtral":
            raise ValueError(f"model_type {mt!r} is not supported (mixtral only)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if d.get("dtype") and not d.get("torch_dtype"):
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        extra = {k: v for k, v in d.items() if k not in names}
        if isinstance(known.get("eos_token_id"), list):
            known["eos_token_id"] = known["eos_token_id"][0]
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MixtralConfig":
        p = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(p) as fh:
            try:
                d = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: not a JSON object (an HF config.json)")
        return cls.from_dict(d)

    def to_hf_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out = dict(self.extra)
        out.update(d)
        out["model_type"] = "mixtral"
        out["architectures"] = ["MixtralForCausalLM"]
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


# The embedded tiny default: the real tokenizer's vocabulary, Mixtral's structure, CPU-sized.
TINY_CONFIG = MixtralConfig(
    vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5,
    num_local_experts=4, num_experts_per_tok=2, torch_dtype="bfloat16",
)

# The reference recipe's model, for `inspect` and for building full-size random models on a GPU.
MIXTRAL_8X7B_CONFIG = MixtralConfig()
