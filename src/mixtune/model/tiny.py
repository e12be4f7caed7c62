"""A tiny random Mixtral written exactly as a real one is shipped: the embedded default model and test fixture.

    make_tiny_checkpoint("/tmp/tiny")   # config.json, model-0000{1,2}-of-00002.safetensors + index, tokenizer

Weights come from `MixtralForCausalLM.init_weights(seed)` (normal(0, 0.02), unit norms), so the same seed
always gives the same checkpoint. The key layout is the real one (per-expert `experts.{e}.w1.weight`, ...),
so the same loader reads this and Mixtral-8x7B. The tokenizer is the real Mixtral v1 SentencePiece model.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from .config import TINY_CONFIG, MoEConfig
from .layout import iter_model_state
from .safetensors_io import save_hf_checkpoint, shard_size_for
from .modeling import MoEForCausalLM


def make_tiny_checkpoint(out_dir: str, config: MoEConfig = TINY_CONFIG, seed: int = 0, shards: int = 2,
                         dtype: torch.dtype = torch.bfloat16, tokenizer: bool = True) -> str:
    """Write a random model of `config` (any family) to out_dir in `shards` safetensors files (1 = a single
    model.safetensors, no index), stored in `dtype`, with the v1 tokenizer files when `tokenizer`."""
    model = MoEForCausalLM(config)
    model.init_weights(seed)
    state = list(iter_model_state(model, dtype))
    limit = shard_size_for([t.numel() * t.element_size() for _, t in state], max(1, shards))
    save_hf_checkpoint(state, out_dir, config, max_shard_size=limit, dtype=dtype)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, fh)
    if tokenizer:
        write_v1_tokenizer(out_dir)
    return out_dir


def write_v1_tokenizer(out_dir: str) -> None:
    """The Mixtral v1 tokenizer files in out_dir: through mixtune.data when it can save one, else the
    SentencePiece model shipped in mistral-common plus an HF config (legacy=True, as Mixtral's own)."""
    try:
        from ..data import load_tokenizer  # the data package's tokenizer, when present
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        load_tokenizer("").save_pretrained(out_dir)
        return
    import mistral_common

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    shutil.copyfile(src, os.path.join(out_dir, "tokenizer.model"))
    cfg = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
           "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
           "model_max_length": 32768, "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, fh, indent=2)
