"""Merge arithmetic: pure functions over checkpoint tensors, no modules.

`merge_into_state_dict` folds an adapter into checkpoint tensors (W + s·B·A in fp32, per expert) and is what
`mixtune.merge` streams through.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..config import ConfigError
from .peft_format import PEFT_PREFIX, adapter_scaling, read_adapter


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


def merge_into_state_dict(state_dict: dict[str, torch.Tensor], adapter, scaling: Optional[float] = None,
                          dtype: Optional[torch.dtype] = None, consumed: Optional[set] = None
                          ) -> dict[str, torch.Tensor]:
    """W' = W + scaling · B @ A for every checkpoint weight the adapter touches, computed in fp32 and cast to
    `dtype` (default: W's dtype). Other tensors pass through (cast to `dtype` if given and floating).

    `state_dict` may be any subset of a checkpoint (one shard, one layer) in the real key layout;
    `adapter`: an adapter directory, a dict of PEFT tensors, or the output of `adapter_deltas`.
    Keys merged are added to `consumed` so a streaming caller can check every delta was used."""
    if isinstance(adapter, (str, os.PathLike)):
        cfg, tensors, _ = read_adapter(adapter)
        scaling = adapter_scaling(cfg) if scaling is None else scaling
        deltas = adapter_deltas(tensors)
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
            out[key] = (w.float() + scaling * (B @ A)).to(odt)  # (out, in)
            if consumed is not None:
                consumed.add(key)
        else:
            out[key] = w.to(odt)
    return out


merge_lora_weights = merge_into_state_dict
