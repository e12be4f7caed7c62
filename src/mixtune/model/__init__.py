"""The MoE decoder and its checkpoints: config, modeling, NF4 linears, the key layout, loading and writing
safetensors, locating a model (tiny default / directory / Hub), the tiny random default.

Rooms (arrows point down): loading -> hub -> tiny -> {layout, safetensors_io, modeling} -> {config, nf4}.
"""

from .config import MIXTRAL_8X7B_CONFIG, TINY_CONFIG, MixtralConfig
from .hub import default_cache_dir, load_config_only, resolve_model_path
from .layout import expected_keys, iter_model_state
from .loading import build_model_on_meta, check_checkpoint, human_bytes, load_model
from .modeling import CausalLMOutput, KVCache, MixtralForCausalLM
from .nf4 import NF4Linear, NF4Weight
from .safetensors_io import (INDEX_FILE, CheckpointError, checkpoint_files, iter_checkpoint, parse_size,
                             save_hf_checkpoint)
from .tiny import make_tiny_checkpoint

__all__ = ["MixtralConfig", "TINY_CONFIG", "MIXTRAL_8X7B_CONFIG", "MixtralForCausalLM", "CausalLMOutput",
           "KVCache", "NF4Weight", "NF4Linear", "CheckpointError", "load_model", "load_config_only",
           "build_model_on_meta", "resolve_model_path", "default_cache_dir", "save_hf_checkpoint",
           "iter_checkpoint", "iter_model_state", "expected_keys", "checkpoint_files", "parse_size", "INDEX_FILE",
           "make_tiny_checkpoint", "human_bytes", "check_checkpoint"]
