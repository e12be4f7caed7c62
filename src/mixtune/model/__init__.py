"""Mixtral model: config, modeling, NF4 storage, checkpoint loading and writing, the tiny random default."""

from .config import MIXTRAL_8X7B_CONFIG, TINY_CONFIG, MixtralConfig
from .loading import (CheckpointError, build_model_on_meta, iter_checkpoint, iter_model_state, load_config_only,
                      load_model, resolve_dtype, resolve_model_path, save_hf_checkpoint)
from .modeling import CausalLMOutput, KVCache, MixtralForCausalLM
from .nf4 import NF4Linear, NF4Weight
from .tiny import make_tiny_checkpoint

__all__ = ["MixtralConfig", "TINY_CONFIG", "MIXTRAL_8X7B_CONFIG", "MixtralForCausalLM", "CausalLMOutput",
           "KVCache", "NF4Weight", "NF4Linear", "CheckpointError", "load_model", "load_config_only",
           "build_model_on_meta", "resolve_model_path", "resolve_dtype", "save_hf_checkpoint", "iter_checkpoint",
           "iter_model_state", "make_tiny_checkpoint"]
