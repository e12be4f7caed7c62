"""Merge arithmetic: pure functions over checkpoint tensors, no modules.

`merge_into_state_dict` folds an adapter into checkpoint tensors (W + s·B·A in fp32, per expert) and is what
`mixtune.merge` streams through.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

from ..config import ConfigError
from .peft_format import PEFT_PREFIX, adapter_scaling, module_rank_alpha, read_adapter


def adapter_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT adapter tensors -> {checkpoint weight key: (A (r, in), B (out, r))}, e.g.
    'model.layers.0.block_sparse_moe.experts.3.w1.weight' -> (A, B)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"(?:{re.escape(PEFT_PREFIX)})?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ConfigError(f"adapter: unexpected tensor name {key!r} (expected ...lora_A.weight / lora_B.weight)")
        pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = t
    out = {}
    for wkey, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"adapter: {wkey[:-7]} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        out[wkey] = (ab["A"], ab["B"])
    return out


def merge_scaling(cfg: dict, deltas: dict) -> Union[float, dict[str, float]]:
    """alpha / r from adapter_config.json: one float, or {checkpoint weight key: alpha / r} when peft's
    rank_pattern / alpha_pattern give some modules their own rank or alpha."""
    if not (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        return adapter_scaling(cfg)
    per_key = {}
    for wkey in deltas:
        r, alpha = module_rank_alpha(cfg, wkey[: -len(".weight")])
        per_key[wkey] = alpha / r
    return per_key


def merge_into_state_dict(state_dict: dict[str, torch.Tensor], adapter, scaling=None,
                          dtype: Optional[torch.dtype] = None, consumed: Optional[set] = None
                          ) -> dict[str, torch.Tensor]:
    """W' = W + scaling · B @ A for every checkpoint weight the adapter touches, computed in fp32 and cast to
    `dtype` (default: W's dtype). Other tensors pass through (cast to `dtype` if given and floating).
    `scaling`: alpha / r, or {weight key: alpha / r} (see merge_scaling).

    `state_dict` may be any subset of a checkpoint (one shard, one layer) in the real key layout;
    `adapter`: an adapter directory, a dict of PEFT tensors, or the output of `adapter_deltas`.
    Keys merged are added to `consumed` so a streaming caller can check every delta was used."""
    if isinstance(adapter, (str, os.PathLike)):
        cfg, tensors, _ = read_adapter(adapter)  # checked: r / alpha against the tensors, finite values
        deltas = adapter_deltas(tensors)
        scaling = merge_scaling(cfg, deltas) if scaling is None else scaling
    elif adapter and isinstance(next(iter(adapter.values())), tuple):
        deltas = adapter
    else:
        deltas = adapter_deltas(adapter)
    if scaling is None:
        raise ValueError("merge_into_state_dict: scaling is required when passing adapter tensors")
    out = {}
    for key, w in state_dict.items():
        odt = dtype if (dtype is not None and w.is_floating_point()) else w.dtype
        if key in deltas:
            A, B = deltas[key]
            A = A.to(device=w.device, dtype=torch.float32)
            B = B.to(device=w.device, dtype=torch.float32)
            if (B.shape[0], A.shape[1]) != tuple(w.shape):
                raise ConfigError(f"adapter: delta for {key} is {(B.shape[0], A.shape[1])}, weight is {tuple(w.shape)}")
            sc = scaling[key] if isinstance(scaling, dict) else scaling
            out[key] = (w.float() + sc * (B @ A)).to(odt)  # (out, in)
            if consumed is not None:
                consumed.add(key)
        else:
            out[key] = w.to(odt)
    return out


merge_lora_weights = merge_into_state_dict
