"""Mixtral model: config, modeling, NF4 storage, checkpoint loading."""

from .config import MIXTRAL_8X7B_CONFIG, TINY_CONFIG, MixtralConfig
from .modeling import CausalLMOutput, KVCache, MixtralForCausalLM
from .nf4 import NF4Linear, NF4Weight

__all__ = ["MixtralConfig", "TINY_CONFIG", "MIXTRAL_8X7B_CONFIG", "MixtralForCausalLM", "CausalLMOutput",
           "KVCache", "NF4Weight", "NF4Linear"]
