"""Learning-rate schedule and step counts.

    f = lr_lambda("cosine", warmup=30, total=1000)     # multiplier of the peak lr after `step` scheduler steps
    torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    total = total_optimizer_steps(cfg, n_rows, per_epoch, world)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from ..config import Config


def lr_lambda(kind: str, warmup: float, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after `step` scheduler steps: linear warm-up over `warmup` steps, then
    cosine decay to 0, linear decay to 0, or constant, until `total`.

    A whole `warmup` ramps as (step + 1) / (warmup + 1), so no step runs at lr 0. A fraction 0 < warmup < 1
    is transformers 4.x's arithmetic for a fractional `warmup_steps` (the tutorial's 0.03): step 0 gets
    step / max(1, warmup) = 0, and later steps decay over total - warmup steps, e.g. linear
    (total - step) / (total - warmup)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            if warmup < 1:  # only step 0 gets here; transformers 4.x: step / max(1, warmup) = 0
                return 0.0
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def warmup_steps(cfg: Config, total: int) -> float:
    """train.warmup_steps when > 0 (a whole number of steps, or a fraction below 1 kept as it is for
    transformers 4.x's arithmetic), else ceil(train.warmup_ratio × total)."""
    w = cfg.train.warmup_steps
    if w > 0:
        return int(w) if float(w).is_integer() else float(w)
    return int(math.ceil(cfg.train.warmup_ratio * total))


def total_optimizer_steps(cfg: Config, n_rows: int, per_epoch: Optional[int] = None, world: int = 1) -> int:
    """train.max_steps, or ceil(num_train_epochs × micro-batches per epoch / (accumulation × ranks))."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if per_epoch is None:
        per_epoch = math.ceil(n_rows / cfg.train.per_device_train_batch_size)
    return max(1, math.ceil(cfg.train.num_train_epochs * per_epoch
                            / (cfg.train.gradient_accumulation_steps * world)))
