"""Where and how numbers are computed: device, dtype, bf16 autocast, seeding, moving batches (a foundation).

    device = resolve_device("auto")                  # cuda when available, else cpu; ConfigError if missing
    dtype = resolve_dtype("auto", device)            # bf16 on a bf16-capable GPU, else fp32
    with autocast_context(device, use_bf16(cfg, device, dtype)): ...
    seed_everything(0)

Every verb (train, eval, generate, merge, bench) takes these from here, so one rule decides each choice.
"""

from __future__ import annotations

import contextlib
import random
from typing import Optional

import torch

from .config import Config, ConfigError

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" (or "") -> cuda when available, else cpu; otherwise the named device, which must exist."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device: {name!r} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device: {name!r} requested but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are visible")
    return dev


def resolve_dtype(name, device="cpu") -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA device that supports it, else float32; or the named dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype: unknown dtype {name!r} (auto, bfloat16, float16, float32)")
    return _DTYPES[name]


def use_bf16(cfg: Config, device: torch.device, model_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether to run forward passes under bf16 autocast. train.bf16: auto = on for CUDA devices that support
    bf16, off on CPU (fp32); true/false force it. Never when the model already computes in bfloat16 (the
    default on CUDA): its frozen weights are bf16 and LoRA casts its fp32 parameters to the input dtype, so
    autocast adds nothing there but it does push the grouped-MoE products to fp32 — measured 4.3x slower
    (17,141 vs 73,581 tok/s per step, bench/results/2026-11-29-call10-train-step-diag.log)."""
    if model_dtype == torch.bfloat16:
        return False
    if cfg.train.bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg.train.bf16 == "true"


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def batch_to(batch: dict, device: torch.device) -> dict:
    """Every tensor of a batch on `device` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    """Python's, torch's and numpy's generators from one seed."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
