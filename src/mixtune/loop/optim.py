"""The optimizer over the LoRA parameters: one constructor for the training loop and the benchmark.

    opt = make_optimizer(params, "adamw", lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

- "adamw": torch AdamW, fp32 moments (8 bytes of state per adapter parameter); the fused CUDA kernel on GPU.
- "adamw_8bit": bitsandbytes' AdamW8bit, blockwise-quantized 8-bit moments (2 bytes per parameter + block
  scales). With LoRA on every expert of Mixtral-8x7B at r=64 (~960 M adapter parameters) that is ~1.9 GB of
  state instead of ~7.7 GB, which is what lets the 48 GB class keep more activations. bitsandbytes runs it on
  CPU too. Its state dict round-trips through our checkpoints like torch's.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adamw_8bit")


def make_optimizer(params, name: str = "adamw", lr: float = 1e-5, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters for the optimizer")
    if name == "adamw":
        fused = all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=fused or None)
    if name == "adamw_8bit":
        import logging
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
        # min_8bit_size: tensors smaller than this keep fp32 moments (bitsandbytes' default, 4096 elements)
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state (moments, scales)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v))
