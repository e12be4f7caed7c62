"""Metrics of a run: metrics.jsonl (one JSON object per line) and TensorBoard scalars under tb/.

    log = MetricsLog(out_dir, tensorboard=True, resume_step=None)
    log.log({"kind": "train", "step": 10, "loss": 2.1}); log.close()
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from .._fs import open_append, write_text_atomic
from . import trackers
from .report import read_metrics


class MetricsLog:
    """metrics.jsonl + TensorBoard scalars under tb/. On resume, what the killed run logged after its last
    checkpoint is dropped: it will be logged again. The file is (re)created by an atomic rename, so a symlink
    planted at its name is replaced, not written through; appends refuse a symlink (ELOOP)."""

    def __init__(self, out_dir: str, tensorboard: bool, resume_step: Optional[int]):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resume_step is not None and os.path.lexists(self.path):
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] \
                if not os.path.islink(self.path) else []
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None:
            write_text_atomic(self.path, "")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, record: dict) -> None:
        with open_append(self.path) as fh:
            fh.write(json.dumps(record) + "\n")
        trackers.log(record)  # wandb / mlflow (train.report_to), when open
        if self.tb is not None:
            kind = record.get("kind")
            prefix = {"eval": "eval", "generation": f"generation_{record.get('when')}"}.get(kind, "train")
            for k, v in record.items():
                if k not in ("step", "kind", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    name = k if k.startswith("eval_") else f"{prefix}/{k}"
                    self.tb.add_scalar(name.replace("eval_", "eval/"), v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class NoMetrics:
    """Ranks other than 0 log nothing."""
    path = ""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
