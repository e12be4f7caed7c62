"""Optional Triton support: one place that decides whether a Triton kernel may run on a tensor.

Triton kernels are built lazily (first use), so a test can set `TRITON_INTERPRET=1` before calling them and
run them on CPU tensors through Triton's interpreter (passing triton=True). Without Triton every op falls back to PyTorch.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


FORCE: bool | None = None  # tests set True (with TRITON_INTERPRET=1) to run every kernel through Triton on CPU


def use_triton(t: torch.Tensor, force: bool | None = None) -> bool:
    """Run the Triton kernel on `t`? force=None: on CUDA when Triton imports. force=True also runs it on CPU
    tensors, which works under `TRITON_INTERPRET=1` (tests)."""
    if force is None:
        force = FORCE
    if force is False or not triton_available():
        return False
    if force:
        return True
    return t.is_cuda


def soft_round() -> bool:
    """FP8 kernels round in software first when Triton's interpreter runs them: its own fp32 -> e4m3 cast
    misrounds values that round up into the next binade. On a GPU the hardware cast rounds to nearest-even."""
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"
